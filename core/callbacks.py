"""Completion callbacks: a clinic registers one URL; when one of its cases ends (``succeeded`` or
``failed``), dermq POSTs a small signed notice there, so the portal need not poll.

    POST <url>
    Content-Type: application/json
    Dermq-Event-Id: <case id>
    Dermq-Signature: t=1764151200,v1=<hex HMAC-SHA256(secret, "1764151200." + body)>

    {"case_id":"...","outcome":"diagnosis","status":"succeeded","timestamp":"2026-11-26T10:00:00.123456Z",
     "type":"case.finished"}

``outcome`` is the result's: ``diagnosis``, or ``out_of_distribution`` when the image was not one the
model can judge (no diagnosis made); ``null`` for a case that failed. The body carries no patient
data: no client reference, no image, no label or probabilities. The portal then reads the result
with its API key (``GET /v1/cases/{id}``), an audited read like any other. The receiver checks the
signature with the secret it was shown once at registration (:func:`core.callback_signing.verify`
is the reference), refuses timestamps more than a few minutes old (replays) and de-duplicates by
the body's ``case_id``, which the signature covers (``Dermq-Event-Id`` repeats it, unsigned): delivery
is at least once. For a while after a registration rotated the secret, the secret it replaced signs
too (a second ``v1`` value, before the current one's: :mod:`core.callback_secrets`).

Delivery is durable. The outbox row (:class:`~core.models.CallbackDelivery`) is written in the
transaction that ends the case, and its delivery task is enqueued on that same Session, sent once
it committed (:mod:`core.enqueue`). The worker (:mod:`worker.callbacks`) makes each attempt in three
steps, so that no row lock and no pooled connection is held while a clinic's server takes its time:

1. :func:`core.callback_attempts.lease` — a short transaction counts the attempt, leases the row
   until ``leased_until`` and reads what the POST needs; a duplicated message finds the row leased
   and does nothing; a row whose attempts are spent is given up there (its last attempt never
   recorded an answer), and one whose case was erased is cancelled;
2. the POST: the connection made with no transaction open; then
   :func:`core.callback_attempts.last_look`, a short transaction that locks the case (``FOR
   SHARE``), the clinic and its callback (``FOR KEY SHARE``) while the request is handed to the
   socket, and cancels the
   delivery instead if since the lease the case was erased, the clinic deactivated or the callback
   removed, or gives the attempt back for the message to take again at once if the callback was
   registered again (a new URL or secret: the connection to the old receiver was opened, the request
   is not written); an erasure, deactivation, removal or registration that comes then waits until the
   notice is out; the answer read with no transaction open;
3. :func:`core.callback_attempts.record_attempt` — a short transaction, fenced by the attempt
   number, records the answer (delivered, retry later, or given up), ends the lease and audits the
   attempt (``callback.deliver``: attempt number and HTTP status, never the body or the secret).

Retries back off exponentially with jitter; the sweeper re-publishes rows whose message was lost
(``requeue_grace_seconds`` after the case ended or the retry came due, as it does a queued case's:
:func:`core.recovery.republish_callbacks`).
The signing secrets are stored sealed by envelope encryption (kind ``callback_secret``, bound to the
clinic: :mod:`core.callback_secrets`) and are never logged. Which URLs are accepted is
:mod:`core.callback_urls`; the signature is :mod:`core.callback_signing`.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import cast
from urllib.parse import urlsplit

from celery import Celery
from sqlalchemy import ColumnElement, Table, bindparam, delete, func, or_, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from core import audit, callback_secrets
from core.callback_urls import validate_url
from core.config import Settings
from core.crypto import Keyring
from core.enqueue import enqueue
from core.errors import Forbidden, NotFound, a_or_an
from core.keys import Principal
from core.models import CallbackDelivery, CallbackStatus, Case, ClinicCallback, Role
from core.publisher import callback_task


def now() -> datetime:
    return datetime.now(UTC)


def _clinic_of(principal: Principal, action: str) -> uuid.UUID:
    if principal.role is not Role.CLINIC or principal.clinic_id is None:
        raise Forbidden(
            f"{a_or_an(principal.role.value)} key cannot do this; use the clinic's own key",
            code="role_not_allowed",
            audit=audit.PendingEvent(action, audit.DENIED, "clinic", None, {"reason": "role"}),
        )
    return principal.clinic_id


# --------------------------------------------------------------------------- registration (API)


def register(
    session: Session, *, keyring: Keyring, settings: Settings, principal: Principal, actor: audit.Actor, url: str
) -> tuple[ClinicCallback, str]:
    """Set (or replace) the clinic's callback URL with a new signing secret; returns (row, secret).

    The secret is returned here only: dermq stores it sealed and never shows it again. Registering
    again rotates it; the secret it replaces signs beside it until ``row.previous_secret_until``
    (:mod:`core.callback_secrets`)."""
    clinic_id = _clinic_of(principal, "callback.register")
    url = validate_url(url, settings)
    secret = callback_secrets.new_secret()
    at = now()
    # the registration it replaces, locked: its secret signs beside the new one for a while
    replaced = session.get(ClinicCallback, clinic_id, with_for_update=True)
    sealed, rotation = callback_secrets.sealed(
        keyring, clinic_id, secret, replaced=replaced, at=at, overlap=settings.callback_secret_overlap_hours
    )
    values = {"url": url, **sealed, "updated_at": at}
    row = session.scalar(
        insert(ClinicCallback)
        .values(clinic_id=clinic_id, created_at=now(), **values)
        .on_conflict_do_update(index_elements=[ClinicCallback.clinic_id], set_=values)
        .returning(ClinicCallback),
        execution_options={"populate_existing": True},
    )
    assert row is not None
    audit.record(
        session,
        action="callback.register",
        outcome=audit.SUCCESS,
        actor=actor,
        entity_type="clinic",
        entity_id=clinic_id,
        clinic_id=clinic_id,
        detail={"scheme": urlsplit(url).scheme, "host": host_of(url), **rotation.detail()},
    )
    return row, secret


def end_overlap(session: Session, *, principal: Principal, actor: audit.Actor) -> None:
    """Stop the secrets the clinic's last registrations replaced from signing now, before their
    overlap ends (the portal has the new one, or an old one leaked): audited ``callback.end_overlap``."""
    clinic_id = _clinic_of(principal, "callback.end_overlap")
    row = session.get(ClinicCallback, clinic_id, with_for_update=True)
    if row is None:
        raise NotFound("no callback is registered for this clinic", code="callback_not_registered")
    signing = callback_secrets.overlap_until(row, now()) is not None
    for column, value in callback_secrets.NO_PREVIOUS.items():
        setattr(row, column, value)
    audit.record(
        session,
        action="callback.end_overlap",
        outcome=audit.SUCCESS,
        actor=actor,
        entity_type="clinic",
        entity_id=clinic_id,
        clinic_id=clinic_id,
        detail={"ended": signing},
    )


def registered(session: Session, *, principal: Principal, actor: audit.Actor) -> ClinicCallback:
    """The clinic's callback, its reading audited (``callback.read``: the answer lists case ids)."""
    clinic_id = _clinic_of(principal, "callback.read")
    row = session.get(ClinicCallback, clinic_id)
    if row is None:
        raise NotFound("no callback is registered for this clinic", code="callback_not_registered")
    audit.record(
        session,
        action="callback.read",
        outcome=audit.SUCCESS,
        actor=actor,
        entity_type="clinic",
        entity_id=clinic_id,
        clinic_id=clinic_id,
    )
    return row


@dataclass(frozen=True, slots=True)
class DeliveryHealth:
    """How a clinic's callbacks have fared: deliveries by status over ``hours``, and the latest problems."""

    hours: int
    by_status: dict[str, int]
    problems: list[CallbackDelivery]


def delivery_health(session: Session, clinic_id: uuid.UUID, *, hours: int = 24, problems: int = 10) -> DeliveryHealth:
    """Deliveries of the last ``hours`` by status, and the ``problems`` latest that failed or are still
    being retried after a refusal (no patient data: case ids, attempts, HTTP status)."""
    since = now() - timedelta(hours=hours)
    counts = session.execute(
        select(CallbackDelivery.status, func.count())
        .where(CallbackDelivery.clinic_id == clinic_id, CallbackDelivery.created_at >= since)
        .group_by(CallbackDelivery.status)
    ).all()
    latest = session.scalars(
        select(CallbackDelivery)
        .where(
            CallbackDelivery.clinic_id == clinic_id,
            or_(
                CallbackDelivery.status == CallbackStatus.FAILED.value,
                (CallbackDelivery.status == CallbackStatus.PENDING.value) & (CallbackDelivery.attempts > 0),
            ),
        )
        .order_by(CallbackDelivery.updated_at.desc())
        .limit(problems)
    ).all()
    return DeliveryHealth(hours, {status: count for status, count in counts}, list(latest))


def unregister(session: Session, *, principal: Principal, actor: audit.Actor) -> None:
    """Remove the callback; deliveries still pending are cancelled when their turn comes."""
    clinic_id = _clinic_of(principal, "callback.unregister")
    removed = session.scalar(
        delete(ClinicCallback).where(ClinicCallback.clinic_id == clinic_id).returning(ClinicCallback.clinic_id)
    )
    if removed is None:
        raise NotFound("no callback is registered for this clinic", code="callback_not_registered")
    audit.record(
        session,
        action="callback.unregister",
        outcome=audit.SUCCESS,
        actor=actor,
        entity_type="clinic",
        entity_id=clinic_id,
        clinic_id=clinic_id,
    )


# --------------------------------------------------------------------------- the outbox (worker, sweeper)


def note_finished(session: Session, case_id: uuid.UUID, *, publisher: Celery) -> bool:
    """Write the outbox row for a case that has just ended, if its clinic has a callback, and enqueue
    its delivery (sent by ``publisher`` once this transaction commits); True if it did. Call inside
    the transaction that ended the case."""
    return case_id in note_finished_many(session, [case_id], publisher=publisher)


def note_finished_many(session: Session, case_ids: Sequence[uuid.UUID], *, publisher: Celery) -> set[uuid.UUID]:
    """:func:`note_finished` for several cases in one statement; returns those given an outbox row."""
    if not case_ids:
        return set()
    noted = set(session.scalars(_NOTE_FINISHED, {"ids": list(case_ids)}))
    for case_id in case_ids:
        if case_id in noted:
            enqueue(session, publisher, callback_task(case_id))
    return noted


#: built once (every finished case sends it): an outbox row for each case whose clinic has a callback.
#: Through the table: with parameters, an ORM insert would take them as rows to insert
_NOTE_FINISHED = (
    insert(cast(Table, CallbackDelivery.__table__))
    .from_select(
        ["case_id", "clinic_id"],
        select(Case.id, Case.clinic_id)
        .join(ClinicCallback, ClinicCallback.clinic_id == Case.clinic_id)
        .where(Case.id.in_(bindparam("ids", expanding=True))),
    )
    .on_conflict_do_nothing()
    .returning(CallbackDelivery.case_id)
)


def _stale(cutoff: datetime, due_by: datetime | None) -> tuple[ColumnElement[bool], ...]:
    """Pending, not leased, untouched since ``cutoff``, and with no retry pending or its retry due
    before ``due_by`` (``cutoff`` if None): nothing dermq wrote says its message is still on its way
    (a retry waiting out its backoff is; its row says until when). By the sweeper's clock, as
    ``updated_at`` is compared: hosts' clocks apart shift when a lost message is found, not whether a
    waiting one is doubled (the broker decides that: :func:`core.recovery.republish_callbacks`)."""
    return (
        CallbackDelivery.status == CallbackStatus.PENDING.value,
        CallbackDelivery.updated_at < cutoff,
        or_(CallbackDelivery.next_attempt_at.is_(None), CallbackDelivery.next_attempt_at < (due_by or cutoff)),
        # leases are stamped with the database's clock (core.callback_attempts.lease)
        or_(CallbackDelivery.leased_until.is_(None), CallbackDelivery.leased_until < func.now()),
    )


def stale_deliveries(
    session: Session, cutoff: datetime, ids: list[uuid.UUID], *, due_by: datetime | None = None
) -> list[uuid.UUID]:
    """Those of ``ids`` that are still stale (:func:`_stale`), locked for this sweep (a worker may have
    leased one since they were read)."""
    query = select(CallbackDelivery.case_id).where(*_stale(cutoff, due_by), CallbackDelivery.case_id.in_(ids))
    return list(session.scalars(query.with_for_update(skip_locked=True)))


def stale_page(
    session: Session,
    cutoff: datetime,
    limit: int,
    beyond: tuple[datetime, uuid.UUID] | None = None,
    *,
    due_by: datetime | None = None,
) -> list[tuple[datetime, uuid.UUID]]:
    """A page of the stale deliveries (:func:`_stale`: their message may be lost), as (updated_at,
    case_id), oldest first, after ``beyond`` (the last of the page before). Not locked: a row whose
    message still waits must stay free for the worker that takes it."""
    query = select(CallbackDelivery.updated_at, CallbackDelivery.case_id).where(*_stale(cutoff, due_by))
    if beyond is not None:
        query = query.where(tuple_(CallbackDelivery.updated_at, CallbackDelivery.case_id) > tuple_(*beyond))
    query = query.order_by(CallbackDelivery.updated_at, CallbackDelivery.case_id).limit(limit)
    return [(at, case_id) for at, case_id in session.execute(query)]


def host_of(url: str) -> str | None:
    """The host a callback URL names, lower-cased (never its user, path or query): what the audit
    trail records of where a clinic's news goes."""
    return urlsplit(url).hostname


def touch_deliveries(session: Session, case_ids: list[uuid.UUID]) -> None:
    """Mark deliveries as just published (the next stale check counts from now)."""
    if case_ids:
        session.execute(update(CallbackDelivery).where(CallbackDelivery.case_id.in_(case_ids)).values(updated_at=now()))


def unchecked_after_seconds(settings: Settings) -> float:
    """How long a pending delivery sits untouched before a sweep that cannot ask the broker sends it
    again all the same: longer than the longest backoff a retry may be waiting out, plus one request.
    (A sweep that asks sends a stale one whose message the broker does not hold after
    ``requeue_grace_seconds``, as it does a queued case: :func:`core.recovery.republish_callbacks`.)"""
    return 1.5 * settings.callback_backoff_max_seconds + settings.callback_timeout_seconds + 5


def lease_seconds(settings: Settings) -> float:
    """How long one attempt may hold its row: resolving, connecting and reading, each bounded by the
    timeout, with room to spare, and never less than the task's hard time limit (a resolver or a
    server trickling its answer can hold an attempt that long). A worker that dies mid-attempt blocks
    the row no longer than this."""
    return max(3 * settings.callback_timeout_seconds + 30, settings.task_time_limit + 15)


def backoff_seconds(settings: Settings, attempt: int) -> float:
    """Delay before attempt ``attempt + 1``: base * 2**(attempt-1), times a jitter in [0.5, 1.5), capped."""
    delay = settings.callback_backoff_seconds * 2.0 ** min(max(0, attempt - 1), 30)  # no float overflow
    return min(settings.callback_backoff_max_seconds, delay * (0.5 + random.random()))  # noqa: S311 - jitter

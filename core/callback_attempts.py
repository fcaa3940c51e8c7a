"""One attempt at a completion callback, in the database: the notice it sends, the lease that counts
it, the last look before it is sent (its case not erased, its clinic not deactivated, its callback
not removed nor registered again meanwhile), and the record of what the clinic's server answered (the outbox and its
rules are :mod:`core.callbacks`; the POST around the last look, between the lease and the record,
is :mod:`worker.callbacks`)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, func, or_, select, update
from sqlalchemy.orm import Session

from core import audit, callback_secrets
from core.callback_pacing import Busy, NotDue, attempts_under_way
from core.callbacks import backoff_seconds, host_of, lease_seconds, now
from core.config import Settings
from core.crypto import Keyring
from core.models import CallbackDelivery, CallbackStatus, Case, CaseStatus, Clinic, ClinicCallback, Result

# --------------------------------------------------------------------------- the notice


def notice(case: Case, outcome: str | None = None) -> bytes:
    """The JSON body: ids, state, the result's outcome (``None`` without a result) and time only."""
    finished = (case.finished_at or case.updated_at).astimezone(UTC)
    body = {
        "type": "case.finished",
        "case_id": str(case.id),
        "status": case.status,
        "outcome": outcome,
        "timestamp": finished.isoformat(timespec="microseconds").replace("+00:00", "Z"),
    }
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


# --------------------------------------------------------------------------- one attempt (worker)


@dataclass(frozen=True, slots=True)
class Lease:
    """One attempt a worker holds: the row is leased to it until the lease ends or it records the
    outcome. ``secrets`` sign the notice (:func:`core.callback_secrets.signing`): none when the sealed
    secret cannot be opened (no retry can help). ``registered``: when the clinic registered the callback
    whose URL and secrets these are (its ``updated_at``): the last look sends nothing if it has changed."""

    case_id: uuid.UUID
    clinic_id: uuid.UUID
    attempt: int
    url: str
    body: bytes
    secrets: tuple[str, ...] = field(repr=False)
    registered: datetime


@dataclass(frozen=True, slots=True)
class Held:
    """The callback has something to do, but another transaction held its row when the message looked:
    a turn being handed to it (:func:`core.callback_pacing.next_waiting`), a copy of its message
    leasing it, the sweeper. A turn handed to it can find the clinic's receiver full again and be
    dropped, so the callback's own message must not end on such a look (nothing would bring the
    callback then but the sweeper, minutes later): it looks again, a second later, then after ever
    longer waits, a bounded number of times (:func:`core.callback_pacing.held_seconds`). Those
    transactions are short; one that holds the row longer is not dermq's, and the sweeper sends
    the delivery again once it lets go."""


HELD = Held()


@dataclass(frozen=True, slots=True)
class Cancelled:
    """The callback is cancelled, and nothing sent: its clinic's callback removed, the clinic
    deactivated, or its case erased or gone (``reason``, audited: ``callback_removed``,
    ``clinic_inactive``, ``case_erased``). ``attempts``: the attempts made before."""

    reason: str
    attempts: int


@dataclass(frozen=True, slots=True)
class Delivery:
    """What one delivery attempt came to: ``delivered``, ``retry`` (later), ``failed`` (given up),
    ``cancelled`` (:class:`Cancelled`: nothing was sent, nor will be), ``reregistered`` (the clinic
    registered its callback again between the lease and the last look: nothing was sent to the URL, or
    signed with the secrets, it replaced; the attempt given back, the message takes it again at once),
    ``deferred`` (the clinic's receiver had its fill of attempts under way: nothing was attempted),
    ``early`` (the retry this message brings is not due yet), ``held`` (another transaction held the
    row: :class:`Held`; the message looks again), ``held_too_long`` (held at every look the message
    may take: it ends, and the delivery, still pending, is the sweeper's) or ``skipped`` (nothing to
    do: nothing pending, another worker holds it or took the row over, or another message made the
    attempt this one was for). ``attempt``: the attempt made, or for ``cancelled``, ``reregistered``,
    ``deferred``, ``early``, ``held`` and ``held_too_long`` the attempts made so far."""

    outcome: str
    attempt: int = 0
    http_status: int | None = None
    #: for ``retry``, ``early`` and ``held``: the seconds until the message comes back
    retry_in: float | None = field(default=None, compare=False)


def lease(
    session: Session, *, settings: Settings, keyring: Keyring, case_id: uuid.UUID, after: int | None = None
) -> Lease | Busy | NotDue | Held | Cancelled | None:
    """Count the next attempt of a case's pending callback and lease its row for it. ``after``: the
    attempts the message expects made (a retry's or a waiting callback's message; None for the first
    and for the sweeper's). None if there is nothing to do: delivered, given up, cancelled, leased
    by another worker, an attempt after ``after`` already made (this message is a copy), or a retry
    not due that this message does not bring; :class:`Held` if another transaction holds the row at
    this moment. :class:`~core.callback_pacing.NotDue` for a retry this
    message brings early, :class:`~core.callback_pacing.Busy` while the clinic's receiver has
    ``callback_clinic_concurrency`` attempts under way (:mod:`core.callback_pacing`). A callback whose
    clinic or case is gone, or whose clinic is deactivated, is cancelled here (:class:`Cancelled`;
    reactivating the clinic does not send it later: the clinic reads its cases instead). Commit before
    making the request, and take :func:`last_look` just before sending it."""
    # the database's clock, not this host's: leases are written and compared by different hosts, and
    # one whose clock ran ahead took over a live lease (a second POST of the same attempt's news)
    found = session.execute(
        select(CallbackDelivery, func.now())
        .where(*_leasable(case_id, after))
        .with_for_update(skip_locked=True, of=CallbackDelivery)
    ).first()
    if found is None:
        # nothing to do, or the row locked by another transaction at this moment (skipped above)
        return HELD if session.scalar(select(CallbackDelivery.case_id).where(*_leasable(case_id, after))) else None
    row, at = found
    if row.next_attempt_at is not None and row.next_attempt_at > at:  # its own message, early by its host's clock
        return NotDue((row.next_attempt_at - at).total_seconds())
    endpoint = session.get(ClinicCallback, row.clinic_id)
    # a lease that ran out unrecorded: its worker died or ran out of time, perhaps after its POST went
    # out. The trail says so now, whatever comes next (and that worker, if it lives, records its own).
    unanswered = row.leased_until is not None and row.attempts > 0
    if unanswered:
        row.last_error = UNANSWERED
        # no host: the clinic may have registered another URL since that attempt was sent
        _audit(
            session, row.case_id, row.clinic_id, success=False, detail={"attempt": row.attempts, "error": UNANSWERED}
        )
    case = session.get(Case, case_id)
    active = session.scalar(select(Clinic.active).where(Clinic.id == row.clinic_id))
    why = _withdrawn(endpoint is not None, active, None if case is None else case.status)
    if why is not None:
        row.status, row.updated_at = CallbackStatus.CANCELLED.value, at
        _audit(session, row.case_id, row.clinic_id, success=False, detail={"error": CANCELLED, "reason": why})
        return Cancelled(why, row.attempts)
    assert endpoint is not None and case is not None  # (else withdrawn, above)
    if row.attempts >= settings.callback_max_attempts:
        # every attempt is spent and the last never recorded an answer (audited above; or the setting was
        # lowered since): given up here, or the sweeper would send it again and again
        row.status, row.updated_at, row.leased_until = CallbackStatus.FAILED.value, at, None
        if not unanswered:
            _audit(
                session, row.case_id, row.clinic_id, success=False, detail={"attempt": row.attempts, "error": "spent"}
            )
        return None
    in_flight = attempts_under_way(session, row.clinic_id, settings.callback_clinic_concurrency)
    if in_flight >= settings.callback_clinic_concurrency:
        # nothing holds the row now (a lease that ran out was audited above). Not touched: the clinic's
        # status lists deliveries by their last attempt, and the sweeper finds the waiting message in
        # the broker (held by a worker until its turn)
        row.leased_until = None
        return Busy(in_flight, row.attempts)
    row.attempts += 1
    row.updated_at, row.leased_until = at, at + timedelta(seconds=lease_seconds(settings))
    signing = callback_secrets.signing(keyring, endpoint, at)
    result = session.get(Result, case_id)
    body = notice(case, result.outcome if result else None)
    return Lease(case_id, row.clinic_id, row.attempts, endpoint.url, body, signing, endpoint.updated_at)


def _leasable(case_id: uuid.UUID, after: int | None) -> tuple[ColumnElement[bool], ...]:
    """The callback a message for ``case_id`` that follows ``after`` attempts has something to do for."""
    return (
        CallbackDelivery.case_id == case_id,
        CallbackDelivery.status == CallbackStatus.PENDING.value,
        or_(CallbackDelivery.leased_until.is_(None), CallbackDelivery.leased_until < func.now()),
        # A message with nothing to do matches nothing, and so locks nothing: one that held the
        # row would make the message that has something to do skip it, and be dropped.
        # No retry pending: the first message, come again, or the sweeper's, leave a retry to its own
        # message. After attempts: the attempt this message follows is the last one made (else
        # another message made the next one: this one is a copy).
        or_(CallbackDelivery.next_attempt_at.is_(None), CallbackDelivery.next_attempt_at <= func.now())
        if after is None
        else CallbackDelivery.attempts == after,
    )


def last_look(session: Session, *, lease: Lease) -> Delivery | None:
    """The last look before the leased attempt's notice goes out, in a transaction that stays open
    until the request has been handed to the socket, and no longer (not while the receiver answers:
    :func:`worker.callbacks.post`). The case is locked ``FOR SHARE``, its clinic and the clinic's
    callback ``FOR KEY SHARE``: an erasure, a deactivation, the callback's removal or its registration
    again committed since the lease is seen here, and one that comes now waits until the notice is out
    (each locks one of those rows ``FOR UPDATE`` or deletes it: :func:`core.retention.purge_case`'s
    callers, :func:`core.clinics.set_active`, :func:`core.callbacks.unregister`,
    :func:`core.callbacks.register`); a key rotation's re-wrap of the callback's secret (``FOR NO KEY
    UPDATE SKIP LOCKED``) does not skip it. None if the notice may go out. Else nothing is sent:

    - the case erased, the clinic deactivated or the callback removed: the delivery is cancelled as it
      is at the lease (the same reasons, audited), the attempt given back (none was made);
    - the callback registered again (a new URL, a new secret: a clinic moving away from a receiver it
      no longer trusts): ``reregistered``, the attempt given back and the lease ended, for the message to
      lease it again at once with the registration as it is now;

    ``skipped`` where the row is no longer this attempt's (its lease ran out and another took it over:
    that one's look decides)."""
    status, active, registered = session.execute(
        select(
            _held(Case.status, Case.id == lease.case_id),
            _held(Clinic.active, Clinic.id == lease.clinic_id, key_share=True),
            _held(ClinicCallback.updated_at, ClinicCallback.clinic_id == lease.clinic_id, key_share=True),
        )
    ).one()
    why = _withdrawn(registered is not None, active, status)
    if why is None and registered == lease.registered:
        return None
    given_back = {"attempts": lease.attempt - 1, "leased_until": None, "updated_at": func.now()}
    if why is None:  # registered again: still pending, for the message to lease afresh
        ended = session.scalar(
            update(CallbackDelivery).where(*_still_leased(lease)).values(given_back).returning(CallbackDelivery.case_id)
        )
        return Delivery("skipped", lease.attempt) if ended is None else Delivery("reregistered", lease.attempt - 1)
    cancelled = session.scalar(
        update(CallbackDelivery)
        .where(*_still_leased(lease))
        .values(status=CallbackStatus.CANCELLED.value, **given_back)
        .returning(CallbackDelivery.case_id)
    )
    if cancelled is None:
        return Delivery("skipped", lease.attempt)
    _audit(session, lease.case_id, lease.clinic_id, success=False, detail={"error": CANCELLED, "reason": why})
    return Delivery("cancelled", lease.attempt - 1)


def _withdrawn(has_callback: bool, active: bool | None, status: str | None) -> str | None:
    """Why a callback's notice must not go out, or None: its clinic's callback removed, the clinic
    deactivated (or gone), its case erased (or gone); a deactivated clinic is told nothing more, and an
    erased case is no longer "finished" news."""
    if not has_callback:
        return "callback_removed"
    if not active:
        return "clinic_inactive"
    if status is None or status == CaseStatus.PURGED.value:
        return "case_erased"
    return None


def _held(column: Any, where: ColumnElement[bool], *, key_share: bool = False) -> Any:
    """``column`` of the row ``where`` selects (NULL if there is none), locked ``FOR SHARE`` (``FOR KEY
    SHARE`` with ``key_share``)."""
    return select(column).where(where).with_for_update(read=True, key_share=key_share).scalar_subquery()


def _still_leased(lease: Lease) -> tuple[ColumnElement[bool], ...]:
    """The delivery, still pending and leased for ``lease``'s attempt (a lease that ran out and was
    taken over has a later attempt)."""
    return (
        CallbackDelivery.case_id == lease.case_id,
        CallbackDelivery.attempts == lease.attempt,
        CallbackDelivery.status == CallbackStatus.PENDING.value,
        CallbackDelivery.leased_until.is_not(None),
    )


def record_attempt(
    session: Session,
    *,
    settings: Settings,
    lease: Lease,
    http_status: int | None,
    error: str | None,
    hopeless: bool = False,
) -> Delivery:
    """Record what the leased attempt came to and audit it, ending the lease. Fenced by the attempt
    number: if the lease ran out and another worker took the row over, the row is left to it
    (``skipped``), though the attempt is still audited. ``hopeless``: no later attempt can do better
    (the URL is no longer one dermq calls): the delivery is given up now. A retry is due after a
    backoff (:func:`core.callbacks.backoff_seconds`), stamped on the row: no lease is taken before."""
    delivered = http_status is not None and 200 <= http_status < 300
    hopeless = hopeless or not lease.secrets  # the clinic must register again
    at = now()
    values: dict[str, object] = {
        "last_http_status": http_status,
        "last_error": None if delivered else (error or "http_status")[:64],
        "updated_at": at,
        "leased_until": None,
    }
    retry_in: float | None = None
    if delivered:
        values |= {"status": CallbackStatus.DELIVERED.value, "delivered_at": at}
    elif hopeless or lease.attempt >= settings.callback_max_attempts:
        values["status"] = CallbackStatus.FAILED.value
    else:
        retry_in = backoff_seconds(settings, lease.attempt)
        values["next_attempt_at"] = func.now() + timedelta(seconds=retry_in)  # the leases' clock
    status = session.scalar(
        update(CallbackDelivery).where(*_still_leased(lease)).values(**values).returning(CallbackDelivery.status)
    )
    # where the news went (the host only: a URL's path or query may hold the receiver's token)
    detail: dict[str, object] = {"attempt": lease.attempt, "http_status": http_status, "host": host_of(lease.url)}
    if error:
        detail["error"] = error
    _audit(session, lease.case_id, lease.clinic_id, success=delivered, detail=detail)
    if status is None:
        return Delivery("skipped", lease.attempt, http_status)
    outcome = {CallbackStatus.DELIVERED.value: "delivered", CallbackStatus.FAILED.value: "failed"}.get(status, "retry")
    return Delivery(outcome, lease.attempt, http_status, retry_in if outcome == "retry" else None)


#: the error audited for an attempt given up because the one before it never recorded an answer
UNANSWERED = "unanswered"
#: the error audited for a delivery cancelled before any attempt (its ``reason``: the callback removed,
#: the clinic deactivated, the case erased)
CANCELLED = "cancelled"


def _audit(
    session: Session, case_id: uuid.UUID, clinic_id: uuid.UUID, *, success: bool, detail: dict[str, object]
) -> None:
    audit.record(
        session,
        action="callback.deliver",
        outcome=audit.SUCCESS if success else audit.FAILURE,
        actor=audit.SYSTEM,
        entity_type="case",
        entity_id=case_id,
        clinic_id=clinic_id,
        detail=detail,
    )

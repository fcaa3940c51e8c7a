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
data: no client reference, no image, no label or probabilities. The portal then
reads the result with its API key (``GET /v1/cases/{id}``), an audited read like any other. The
receiver checks the signature with the secret it was shown once at registration (:func:`verify` is
the reference), refuses timestamps more than a few minutes old (replays) and de-duplicates by the
event id: delivery is at least once.

Delivery is durable. The outbox row (:class:`~core.models.CallbackDelivery`) is written in the
transaction that ends the case; a Celery task posts it, retrying with exponential backoff and
jitter, and audits every attempt (``callback.deliver``: attempt number and HTTP status, never the
body or the secret); the sweeper re-publishes rows whose message was lost. The signing secret is
stored sealed by envelope encryption (kind ``callback_secret``, bound to the clinic) and is never
logged.

The notice travels by :mod:`core.callback_http`: the HMAC signature, and a POST that refuses
non-public addresses (SSRF) and connects to the very address it checked.
"""

from __future__ import annotations

import ipaddress
import json
import random
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

from sqlalchemy import delete, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from core import audit
from core.callback_http import EVENT_HEADER as EVENT_HEADER
from core.callback_http import LOCAL_ENVIRONMENTS, post, public_address
from core.callback_http import SIGNATURE_HEADER as SIGNATURE_HEADER
from core.callback_http import SIGNATURE_TOLERANCE_SECONDS as SIGNATURE_TOLERANCE_SECONDS
from core.callback_http import UnsafeAddress as UnsafeAddress
from core.callback_http import sign as sign
from core.callback_http import verify as verify
from core.config import Settings
from core.crypto import Keyring, decrypt_blob, encrypt_blob
from core.errors import DecryptionError, Forbidden, InvalidInput, NotFound
from core.keys import Principal
from core.models import CallbackDelivery, CallbackStatus, Case, ClinicCallback, Result, Role

SECRET_KIND = "callback_secret"  # noqa: S105 - the blob kind, not a secret
INTERNAL_SUFFIXES = (".localhost", ".local", ".internal", ".localdomain", ".home.arpa")


def now() -> datetime:
    return datetime.now(UTC)


def _invalid(message: str) -> InvalidInput:
    return InvalidInput(message, code="invalid_callback_url")


def _clinic_of(principal: Principal, action: str) -> uuid.UUID:
    if principal.role is not Role.CLINIC or principal.clinic_id is None:
        raise Forbidden(
            f"a {principal.role.value} key cannot do this; use the clinic's own key",
            code="role_not_allowed",
            audit=audit.PendingEvent(action, audit.DENIED, "clinic", None, {"reason": "role"}),
        )
    return principal.clinic_id


# --------------------------------------------------------------------------- the URL


def validate_url(url: str, settings: Settings) -> str:
    """The URL as dermq will call it, or :class:`InvalidInput` saying what is wrong with it."""
    url = url.strip()
    limit = settings.callback_url_max_length
    if not url or len(url) > limit:
        raise _invalid(f"the callback URL must be 1 to {limit} characters")
    if any(not ("\x21" <= c <= "\x7e") for c in url):
        raise _invalid("the callback URL must be visible ASCII (write international host names in punycode)")
    parts = urlsplit(url)
    local = settings.environment in LOCAL_ENVIRONMENTS
    allowed = ("https", "http") if local else ("https",)
    if parts.scheme not in allowed:
        raise _invalid("the callback URL must use https")
    if "@" in parts.netloc:
        raise _invalid("the callback URL must not carry credentials; authenticate calls by their signature")
    if parts.fragment:
        raise _invalid("the callback URL must not have a #fragment")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise _invalid("the callback URL has no host")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError:
        raise _invalid("the callback URL's port is not valid") from None
    if not local:
        try:
            literal = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            if host.lower() == "localhost" or host.lower().endswith(INTERNAL_SUFFIXES) or "." not in host:
                raise _invalid("the callback host must be a public DNS name") from None
        else:
            if not public_address(literal):
                raise _invalid("the callback host must be a public address, not a private or local one")
    return url


# --------------------------------------------------------------------------- registration (API)


def register(
    session: Session, *, keyring: Keyring, settings: Settings, principal: Principal, actor: audit.Actor, url: str
) -> tuple[ClinicCallback, str]:
    """Set (or replace) the clinic's callback URL with a new signing secret; returns (row, secret).

    The secret is returned here only: dermq stores it sealed and never shows it again. Registering
    again rotates it."""
    clinic_id = _clinic_of(principal, "callback.register")
    url = validate_url(url, settings)
    secret = "whsec_" + secrets.token_urlsafe(32)
    sealed = encrypt_blob(keyring, secret.encode(), case_id=clinic_id, kind=SECRET_KIND)
    values = {
        "url": url,
        "secret_ciphertext": sealed.ciphertext,
        "secret_nonce": sealed.nonce,
        "secret_wrapped_key": sealed.wrapped_key,
        "kek_id": sealed.kek_id,
        "updated_at": now(),
    }
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
        detail={"scheme": urlsplit(url).scheme},
    )
    return row, secret


def registered(session: Session, *, principal: Principal) -> ClinicCallback:
    clinic_id = _clinic_of(principal, "callback.read")
    row = session.get(ClinicCallback, clinic_id)
    if row is None:
        raise NotFound("no callback is registered for this clinic", code="callback_not_registered")
    return row


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


def note_finished(session: Session, case_id: uuid.UUID) -> bool:
    """Write the outbox row for a case that has just ended, if its clinic has a callback; True if it
    did. Call inside the transaction that ended the case, then publish after the commit."""
    return case_id in note_finished_many(session, [case_id])


def note_finished_many(session: Session, case_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
    """:func:`note_finished` for several cases in one statement; returns those given an outbox row."""
    if not case_ids:
        return set()
    return set(
        session.scalars(
            insert(CallbackDelivery)
            .from_select(
                ["case_id", "clinic_id"],
                select(Case.id, Case.clinic_id)
                .join(ClinicCallback, ClinicCallback.clinic_id == Case.clinic_id)
                .where(Case.id.in_(case_ids)),
            )
            .on_conflict_do_nothing()
            .returning(CallbackDelivery.case_id)
        )
    )


def stale_deliveries(session: Session, cutoff: datetime, limit: int = 500) -> list[uuid.UUID]:
    """Pending deliveries untouched since ``cutoff`` (their message was lost), locked for this sweep."""
    return list(
        session.scalars(
            select(CallbackDelivery.case_id)
            .where(CallbackDelivery.status == CallbackStatus.PENDING.value, CallbackDelivery.updated_at < cutoff)
            .order_by(CallbackDelivery.updated_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    )


def touch_deliveries(session: Session, case_ids: list[uuid.UUID]) -> None:
    """Mark deliveries as just published (the next stale check counts from now)."""
    if case_ids:
        session.execute(update(CallbackDelivery).where(CallbackDelivery.case_id.in_(case_ids)).values(updated_at=now()))


def stale_after_seconds(settings: Settings) -> float:
    """How long a pending delivery may sit untouched before the sweeper republishes it: longer than
    the longest backoff a retry may be waiting out, plus one request."""
    return 1.5 * settings.callback_backoff_max_seconds + settings.callback_timeout_seconds + 5


def backoff_seconds(settings: Settings, attempt: int) -> float:
    """Delay before attempt ``attempt + 1``: base * 2**(attempt-1), times a jitter in [0.5, 1.5), capped."""
    delay = settings.callback_backoff_seconds * 2.0 ** max(0, attempt - 1)
    return min(settings.callback_backoff_max_seconds, delay * (0.5 + random.random()))  # noqa: S311 - jitter


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


# --------------------------------------------------------------------------- delivery (worker)


@dataclass(frozen=True, slots=True)
class Delivery:
    """What one delivery attempt came to: ``delivered``, ``retry`` (later), ``failed`` (given up)
    or ``skipped`` (nothing pending, or another worker holds it)."""

    outcome: str
    attempt: int = 0
    http_status: int | None = None


def deliver(session: Session, *, settings: Settings, keyring: Keyring, case_id: uuid.UUID) -> Delivery:
    """Make the next attempt of a case's pending callback and audit it.

    The outbox row stays locked during the request, so a duplicated message waits for nothing and
    sends nothing twice (``skipped``). The audit event is written after the request: the chain's
    lock is held only for the commit, never while a clinic's server takes its time.
    """
    row = session.scalar(
        select(CallbackDelivery)
        .where(CallbackDelivery.case_id == case_id, CallbackDelivery.status == CallbackStatus.PENDING.value)
        .with_for_update(skip_locked=True)
    )
    if row is None:
        return Delivery("skipped")
    endpoint = session.get(ClinicCallback, row.clinic_id)
    case = session.get(Case, case_id)
    if endpoint is None or case is None:
        row.status, row.updated_at = CallbackStatus.CANCELLED.value, now()
        return Delivery("skipped")
    attempt = row.attempts + 1
    status: int | None
    error: str | None
    try:
        secret = decrypt_blob(
            keyring,
            endpoint.sealed_secret,
            case_id=row.clinic_id,
            kind=SECRET_KIND,
        ).decode()
    except DecryptionError:
        status, error = None, "DecryptionError"
        attempt = settings.callback_max_attempts  # no retry can help: the clinic must register again
    else:
        result = session.get(Result, case_id)
        status, error = post(endpoint.url, notice(case, result.outcome if result else None), secret, settings)
        del secret
    delivered = status is not None and 200 <= status < 300
    row.attempts, row.last_http_status, row.updated_at = attempt, status, now()
    if delivered:
        row.status, row.delivered_at = CallbackStatus.DELIVERED.value, now()
    elif attempt >= settings.callback_max_attempts:
        row.status = CallbackStatus.FAILED.value
    session.flush()
    detail: dict[str, object] = {"attempt": attempt, "http_status": status}
    if error:
        detail["error"] = error
    audit.record(
        session,
        action="callback.deliver",
        outcome=audit.SUCCESS if delivered else audit.FAILURE,
        actor=audit.SYSTEM,
        entity_type="case",
        entity_id=case_id,
        clinic_id=row.clinic_id,
        detail=detail,
    )
    outcome = "delivered" if delivered else ("failed" if row.status == CallbackStatus.FAILED.value else "retry")
    return Delivery(outcome, attempt, status)

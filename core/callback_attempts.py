"""One attempt at a completion callback, in the database: the notice it sends, the lease that counts
it, and the record of what the clinic's server answered (the outbox and its rules are
:mod:`core.callbacks`; the POST between the two transactions is :mod:`worker.callbacks`)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, timedelta

from sqlalchemy import func, or_, select, text, update
from sqlalchemy.orm import Session

from core import audit, callback_secrets
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
    secret cannot be opened (no retry can help)."""

    case_id: uuid.UUID
    clinic_id: uuid.UUID
    attempt: int
    url: str
    body: bytes
    secrets: tuple[str, ...] = field(repr=False)


@dataclass(frozen=True, slots=True)
class Busy:
    """:func:`lease`'s answer for a callback whose clinic's receiver already has its fill of attempts
    under way (``callback_clinic_concurrency``): no attempt is counted, and the callback waits its turn."""

    in_flight: int


@dataclass(frozen=True, slots=True)
class Delivery:
    """What one delivery attempt came to: ``delivered``, ``retry`` (later), ``failed`` (given up),
    ``deferred`` (the clinic's receiver had its fill of attempts under way: nothing was attempted) or
    ``skipped`` (nothing pending, another worker holds it or took the row over, or its retry is not
    due yet)."""

    outcome: str
    attempt: int = 0
    http_status: int | None = None
    #: for ``retry``: the backoff, in seconds, before the next attempt is due
    retry_in: float | None = field(default=None, compare=False)


#: how early a retry's message may come and still be taken: the worker that sends it counts its
#: backoff by its own clock from after the record's commit, the row by the database's from within it
_EARLY = timedelta(seconds=1)


def lease(session: Session, *, settings: Settings, keyring: Keyring, case_id: uuid.UUID) -> Lease | Busy | None:
    """Count the next attempt of a case's pending callback and lease its row for it; None if there is
    nothing to do (delivered, given up, cancelled, leased by another worker, or a retry whose backoff
    has not passed: a second copy of its message), :class:`Busy` if the
    clinic's receiver already has ``callback_clinic_concurrency`` attempts under way. A callback whose
    clinic or case is gone, or whose clinic is deactivated, is cancelled here (reactivating the clinic
    does not send it later: the clinic reads its cases instead). Commit before making the request."""
    # the database's clock, not this host's: leases are written and compared by different hosts, and
    # one whose clock ran ahead took over a live lease (a second POST of the same attempt's news)
    found = session.execute(
        select(CallbackDelivery, func.now())
        .where(
            CallbackDelivery.case_id == case_id,
            CallbackDelivery.status == CallbackStatus.PENDING.value,
            or_(CallbackDelivery.leased_until.is_(None), CallbackDelivery.leased_until < func.now()),
            # a retry not yet due: a second copy of its message (the retry's own comes when it is due)
            or_(CallbackDelivery.next_attempt_at.is_(None), CallbackDelivery.next_attempt_at <= func.now() + _EARLY),
        )
        .with_for_update(skip_locked=True, of=CallbackDelivery)
    ).first()
    if found is None:
        return None
    row, at = found
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
    if endpoint is None or case is None or not active or case.status == CaseStatus.PURGED:
        # a deactivated clinic is told nothing more; an erased case is no longer "finished" news
        row.status, row.updated_at = CallbackStatus.CANCELLED.value, at
        why = "callback_removed" if endpoint is None else "clinic_inactive" if not active else "case_erased"
        _audit(session, row.case_id, row.clinic_id, success=False, detail={"error": CANCELLED, "reason": why})
        return None
    if row.attempts >= settings.callback_max_attempts:
        # every attempt is spent and the last never recorded an answer (audited above; or the setting was
        # lowered since): given up here, or the sweeper would send it again and again
        row.status, row.updated_at, row.leased_until = CallbackStatus.FAILED.value, at, None
        if not unanswered:
            _audit(
                session, row.case_id, row.clinic_id, success=False, detail={"attempt": row.attempts, "error": "spent"}
            )
        return None
    in_flight = _attempts_under_way(session, row.clinic_id)
    if in_flight >= settings.callback_clinic_concurrency:
        # nothing holds the row now (a lease that ran out was audited above); touched, so the sweeper
        # counts from now: the caller sends this callback's message again itself
        row.updated_at, row.leased_until = at, None
        return Busy(in_flight)
    row.attempts += 1
    row.updated_at, row.leased_until = at, at + timedelta(seconds=lease_seconds(settings))
    signing = callback_secrets.signing(keyring, endpoint, at)
    result = session.get(Result, case_id)
    return Lease(
        case_id, row.clinic_id, row.attempts, endpoint.url, notice(case, result.outcome if result else None), signing
    )


#: first key of the advisory locks that take a clinic's callback leases one at a time ("dqcb")
CLINIC_LOCK = 0x64716362
_HOLD_CLINIC = text("SELECT pg_advisory_xact_lock(:cls, :key)")


def _attempts_under_way(session: Session, clinic_id: uuid.UUID) -> int:
    """How many of the clinic's callbacks a worker holds a live lease on, counted under a lock on the
    clinic held until this transaction ends: two workers leasing its callbacks at once count one
    after the other, so neither goes past the limit on a count the other is about to change."""
    key = int.from_bytes(clinic_id.bytes[:4], "big", signed=True)
    session.execute(_HOLD_CLINIC, {"cls": CLINIC_LOCK, "key": key})
    under_way = session.scalar(
        select(func.count())
        .select_from(CallbackDelivery)
        .where(
            CallbackDelivery.clinic_id == clinic_id,
            CallbackDelivery.status == CallbackStatus.PENDING.value,
            CallbackDelivery.leased_until.is_not(None),
            CallbackDelivery.leased_until > func.now(),  # the database's clock, as the leases are stamped
        )
    )
    return under_way or 0


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
        update(CallbackDelivery)
        .where(
            CallbackDelivery.case_id == lease.case_id,
            CallbackDelivery.attempts == lease.attempt,
            CallbackDelivery.status == CallbackStatus.PENDING.value,
            CallbackDelivery.leased_until.is_not(None),
        )
        .values(**values)
        .returning(CallbackDelivery.status)
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

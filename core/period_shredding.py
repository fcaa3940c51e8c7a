"""Period keys and the database: sealing a case under its period's key, listing periods with their
cases, and destroying a period's key (by retention, or by an operator) so that no copy of its cases,
live or in a backup, can be decrypted again (:mod:`core.period_keys` says why and where keys live).

A period is destroyed only once it has ended and no case created in it is still live (every one
purged), and, for retention, once ``DERMQ_RETENTION_DAYS`` plus ``DERMQ_PERIOD_KEY_GRACE_DAYS`` have
passed since its end; an operator may force it (live cases are purged first). A period that has not
ended is never destroyed: requests are still sealing under it.

Sealing and destruction exclude each other through a Postgres advisory lock per period: every
transaction that wraps a data key under a period's key holds it shared until it ends
(:func:`wrapping_key`); destruction takes it exclusive, so it waits for those transactions, then
sees their cases, and none can seal under the period while it checks and destroys. While holding
it, destruction takes no row lock (a sealer may hold row locks while it waits for the period): a
forced destruction purges the live cases first, in a transaction of its own, then checks again
under the lock.
"""

from __future__ import annotations

import logging
import uuid
import zlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, func, not_, or_, select, text
from sqlalchemy.orm import Session

from core import audit, deferred
from core.config import Settings
from core.crypto import Keyring
from core.db import session_scope
from core.errors import Conflict, InvalidInput, KeyringError, ServiceUnavailable
from core.models import AuditEvent, Case, CaseBlob, CaseStatus
from core.period_keys import PeriodKeys
from core.periods import PREFIX, bounds, kek_id
from core.retention_steps import STEP_FAILURES, unreachable

log = logging.getLogger("dermq.keys")

#: first key of the advisory locks on periods ("dqkp")
LOCK_CLASS = 0x64716B70
#: purge-then-check rounds of a forced destruction (cases sealed meanwhile need another purge)
ROUNDS = 5
#: cases a forced destruction purges per transaction
PURGE_BATCH = 200


def _lock_key(period: str) -> int:
    return zlib.crc32(period.encode()) & 0x7FFFFFFF


#: the period locks: the shared one rendered by the driver and deferred (core.deferred), the exclusive
#: one a statement built once (built per call, it cost more CPU than its round trip)
_HOLD_SHARED = "SELECT pg_advisory_xact_lock_shared(%(cls)s, %(key)s)"
_HOLD_EXCLUSIVE = text("SELECT pg_advisory_xact_lock(:cls, :key)")


def _hold(session: Session, period: str, *, exclusive: bool = False) -> None:
    """The period's lock until the transaction ends. The shared one, taken by every transaction that
    wraps keys under the period, goes with the transaction's next statement (:mod:`core.deferred`),
    so before anything is written under it: the period cannot be destroyed meanwhile, since
    destruction waits for its exclusive lock and a period with a live case (a case being created or
    stored under it is live) is never destroyed."""
    if exclusive:
        session.execute(_HOLD_EXCLUSIVE, {"cls": LOCK_CLASS, "key": _lock_key(period)})
    else:
        deferred.defer(session, _HOLD_SHARED, {"cls": LOCK_CLASS, "key": _lock_key(period)})


def wrapping_keys(session: Session, keyring: Keyring, created: Iterable[datetime]) -> dict[datetime, str]:
    """The KEK id to wrap the data keys of a case created at each time under: its period's key
    (created if it has none yet), each period held against destruction until the transaction ends.
    Without period keys, the active KEK."""
    times = list(created)
    if keyring.periods is None:
        return dict.fromkeys(times, keyring.active_id)
    periods = {when: keyring.periods.current(when) for when in times}
    needed = sorted(set(periods.values()))
    for period in needed:  # one order everywhere: no deadlock between batches
        _hold(session, period)
    if not all(keyring.periods.exists(period) for period in needed):
        _refuse_a_stranger_folder(session, keyring.periods)
    return {when: keyring.periods.ensure(period) for when, period in periods.items()}


def _refuse_a_stranger_folder(session: Session, keys: PeriodKeys) -> None:
    """A 503 before a key is created in a folder that holds no key and no tombstone while the database
    already holds data sealed under period keys: that folder is not the one those keys were made in (a
    container without the shared volume sees the empty folder its image made), and a key created there
    would be this process's alone. Checked only when a key must be created and the folder is empty."""
    if not keys.folder.is_dir() or not keys.holds_nothing():
        return  # a missing folder is PeriodKeys.ensure's to refuse
    sealed = session.scalar(select(CaseBlob.kek_id).where(CaseBlob.kek_id.startswith(PREFIX, autoescape=True)).limit(1))
    if sealed is not None:
        raise ServiceUnavailable(
            f"the period key folder {keys.folder} holds no key, but the database holds data sealed under period "
            "keys: it is not the folder the other services use; operators: check that DERMQ_PERIOD_KEY_DIR's "
            "shared volume is mounted (docs/OPERATIONS.md, if it was lost)",
            code="period_keys_unavailable",
        )


def wrapping_key(session: Session, keyring: Keyring, created_at: datetime) -> str:
    return wrapping_keys(session, keyring, [created_at])[created_at]


# --------------------------------------------------------------------------- listing


@dataclass(frozen=True, slots=True)
class PeriodStatus:
    period: str
    #: ``current`` (still taking cases), ``ended``, ``destroyed``
    state: str
    cases: int
    live: int
    blobs: int
    wrapped_by: str | None
    #: when retention destroys it (once no case is live); None once destroyed
    destroy_after: str | None
    destroyed_at: str | None
    #: why its file cannot be read (its mode, its content): this process cannot open its cases
    problem: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def folder(settings: Settings) -> PeriodKeys:
    path = settings.period_key_folder
    if path is None:
        raise KeyringError(
            "no period-key folder: set DERMQ_PERIOD_KEY_DIR "
            "(with DERMQ_KEYS_JSON there is no key file to put it beside)"
        )
    return PeriodKeys(path, settings)


def _status(session: Session, settings: Settings, entry: Any, now: datetime) -> PeriodStatus:
    start, end = bounds(entry.period)
    in_period = (Case.created_at >= start, Case.created_at < end)
    cases = session.scalar(select(func.count()).select_from(Case).where(*in_period)) or 0
    live = (
        session.scalar(select(func.count()).select_from(Case).where(*in_period, Case.status != CaseStatus.PURGED.value))
        or 0
    )
    blobs = session.scalar(select(func.count()).select_from(CaseBlob).where(CaseBlob.kek_id == kek_id(entry.period)))
    state = "destroyed" if entry.destroyed_at is not None else "current" if end > now else "ended"
    after = end + timedelta(days=settings.retention_days + settings.period_key_grace_days)
    return PeriodStatus(
        entry.period,
        state,
        cases,
        live,
        blobs or 0,
        entry.wrapped_by,
        None if entry.destroyed_at else after.isoformat(timespec="seconds"),
        entry.destroyed_at,
        entry.problem,
    )


def periods(session: Session, settings: Settings, *, now: datetime | None = None) -> list[PeriodStatus]:
    """Every period with a key or a tombstone, oldest first, with its cases, live cases and blobs. A
    KeyringError if the folder is missing (a volume not mounted): no period could be read."""
    at = now or datetime.now(UTC)
    keys = folder(settings)
    keys.require_folder()
    _refuse_a_stranger_folder(session, keys)  # an empty folder while data are sealed under period keys
    return [_status(session, settings, entry, at) for entry in keys.list()]


# --------------------------------------------------------------------------- destruction


def _refused(settings: Settings, period: str, actor: audit.Actor, reason: str, detail: dict[str, Any]) -> None:
    with session_scope(settings) as session:  # the refusal is audited in a transaction of its own
        audit.record(
            session,
            action="keys.destroy_period",
            outcome=audit.DENIED,
            actor=actor,
            entity_type="kek",
            entity_id=kek_id(period),
            detail={"reason": reason, **detail},
        )


#: how long after its end a period may still have a case sealed under it: a request that picked the
#: period before midnight seals when its upload has arrived (minutes later, DERMQ_UPLOAD_TIMEOUT_SECONDS)
#: and its host's clock may lag the operator's; a key destroyed meanwhile left an accepted case unreadable
SEALING_MARGIN = timedelta(hours=1)


def destroy_period(
    settings: Settings,
    period: str,
    *,
    force: bool = False,
    actor: audit.Actor = audit.SYSTEM,
    reason: str = "operator",
    now: datetime | None = None,
    audit_refusal: bool = True,
) -> dict[str, Any]:
    """Destroy ``period``'s key (audited): refused while the period has not ended, and while cases of it
    are live unless ``force`` (which purges them first). Returns what was done."""
    try:
        start, end = bounds(period)
    except ValueError as exc:
        raise InvalidInput(str(exc), code="invalid_period") from None
    keys = folder(settings)
    if end + SEALING_MARGIN > (now or datetime.now(UTC)):
        _refused(settings, period, actor, "not_ended", {})
        raise Conflict(
            f"period {period} has not ended: cases are still sealed under its key; it cannot be destroyed",
            code="period_not_ended",
        )
    if not keys.exists(period) and not keys.destroyed(period):
        raise InvalidInput(f"there is no key for period {period} in {keys.folder}", code="unknown_period")
    blobs = kek_id(period)
    already = {"period": period, "reason": reason, "purged": 0, "forced": force, "already": True}
    if keys.destroyed(period):
        with session_scope(settings) as session:
            recorded = _recorded(session, blobs)
        if recorded:
            keys.destroy(period, reason=reason)  # deletes a key file a crash or an old re-wrap left beside it
            return already
    live_in_period = and_(Case.created_at >= start, Case.created_at < end, Case.status != CaseStatus.PURGED.value)
    # a case created outside the period with a blob under its key: none unless created_at was changed
    sealed_under = Case.id.in_(select(CaseBlob.case_id).where(CaseBlob.kek_id == blobs))
    purged = 0
    for _ in range(ROUNDS):
        while force:  # row locks are taken here, never while holding the period: no lock cycle with a sealer
            with session_scope(settings) as session:  # a transaction per batch: a month may hold many thousands
                seen, done = _purge_batch(session, or_(live_in_period, sealed_under), blobs, actor)
            purged += done
            if seen < PURGE_BATCH:
                break
        with session_scope(settings) as session:
            _hold(session, period, exclusive=True)  # waits for every transaction sealing under it
            live = session.scalar(select(func.count()).select_from(Case).where(live_in_period))
            strays = session.scalar(select(func.count()).select_from(CaseBlob).where(CaseBlob.kek_id == blobs))
            if (live or strays) and force:
                continue  # sealed while the purge ran (the lock waited for it): purge again
            if live or strays:
                session.rollback()
                if audit_refusal:
                    _refused(settings, period, actor, "live_cases", {"live": live, "blobs": strays})
                raise Conflict(
                    f"{live} case(s) of period {period} are not purged yet; destroying its key would make them "
                    "unreadable. Wait for retention, erase them, or pass --force to purge them first",
                    code="period_has_live_cases",
                )
            if keys.destroyed(period) and _recorded(session, blobs):  # another destruction won the lock
                keys.destroy(period, reason=reason)
                return already
            detail: dict[str, Any] = {"reason": reason, "purged": purged, "forced": force}
            if keys.destroyed(period):  # tombstoned by a destruction interrupted before its event committed
                detail["completes_interrupted"] = True
            audit.record(
                session,
                action="keys.destroy_period",
                outcome=audit.SUCCESS,
                actor=actor,
                entity_type="kek",
                entity_id=blobs,
                detail=detail,
            )
            session.flush()
            keys.destroy(period, reason=reason)  # still under the lock: nothing is sealed under it meanwhile
        log.info("destroyed a period key", extra={"event": "period_destroyed", "count": purged})
        return {"period": period, **detail}
    raise Conflict(
        f"cases of period {period} kept appearing while they were purged; try again", code="period_has_live_cases"
    )


def _purge_batch(session: Session, due: ColumnElement[bool], blobs: str, actor: audit.Actor) -> tuple[int, int]:
    """Purge a batch of the cases a forced destruction must purge first (``due``); returns how many it
    looked at and how many it purged. The cases are locked first, and one that retention or an erasure
    purged meanwhile (the lock waited for it) is passed over: purged twice, it was recorded twice, two
    ``case.purge`` events for one case. The lock's recheck of ``due`` does not tell: the list of the
    period's blobs it reads once, before the wait, still holds the case's."""
    from core import retention  # it imports this module

    batch = session.scalars(select(Case).where(due).order_by(Case.id).limit(PURGE_BATCH).with_for_update()).all()
    done = 0
    for case in batch:  # a purged case is neither live nor holds a blob: the next batch moves on
        if case.status == CaseStatus.PURGED.value and not _holds_blobs(session, case.id, blobs):
            continue
        retention.purge_case(session, case, actor=actor, reason="period_key_destroyed")
        done += 1
    return len(batch), done


def _holds_blobs(session: Session, case_id: uuid.UUID, blobs: str) -> bool:
    """Whether the case still has a blob sealed under the period's key ``blobs``."""
    held = select(CaseBlob.case_id).where(CaseBlob.case_id == case_id, CaseBlob.kek_id == blobs).limit(1)
    return session.scalar(held) is not None


_RECORDED = select(AuditEvent.entity_id).where(
    AuditEvent.action == "keys.destroy_period", AuditEvent.outcome == audit.SUCCESS
)


def _recorded(session: Session, blobs: str) -> bool:
    return session.scalar(_RECORDED.where(AuditEvent.entity_id == blobs).limit(1)) is not None


def destructions_recorded(settings: Settings) -> set[str]:
    """The period KEK ids whose destruction the audit trail records as done. A tombstone without its
    event is a destruction interrupted between the file change and the commit: the next
    :func:`destroy_expired` (or ``dermq keys destroy-period``) completes it and records it."""
    with session_scope(settings) as session:
        return {entity for entity in session.scalars(_RECORDED) if entity is not None}


def destroy_expired(
    settings: Settings, *, failed: Callable[[str, Exception], None], now: datetime | None = None
) -> list[str]:
    """Retention: destroy every period whose cases are all purged and whose end lies more than the
    retention plus the grace in the past; returns the periods this run destroyed (not one that another
    run, a second beat's or the command's, destroyed while this one waited for the period's lock: that
    run names it, and the audit trail records one destruction). A period that still has a live case is
    left (``dermq keys periods`` shows it). A period whose destruction fails (its key file
    cannot be deleted, say) is handed to ``failed`` with the error, and the others are destroyed all the
    same (they waited behind it for as long as it failed); a database that cannot be reached ends it."""
    if settings.period_key_folder is None:
        return []
    at = now or datetime.now(UTC)
    margin = timedelta(days=settings.retention_days + settings.period_key_grace_days)
    destroyed = []
    recorded = destructions_recorded(settings)
    for entry in folder(settings).list():
        if entry.destroyed_at is not None and kek_id(entry.period) in recorded:
            continue
        if entry.destroyed_at is None and bounds(entry.period)[1] + margin > at:
            continue
        try:  # a period with a live case is skipped quietly, run after run, until its cases are purged
            done = destroy_period(settings, entry.period, reason="retention", now=at, audit_refusal=False)
        except Conflict:
            continue
        except STEP_FAILURES as exc:
            if unreachable(exc):
                raise  # every other period would fail the same way
            failed(entry.period, exc)
            continue
        if not done.get("already"):  # else another run destroyed it meanwhile (a second beat, the command)
            destroyed.append(entry.period)
    return destroyed


def due_for_destruction(settings: Settings, *, now: datetime | None = None) -> list[str]:
    """The periods :func:`destroy_expired` would destroy (or whose interrupted destruction it would
    complete) if the expired cases were purged first, as ``dermq case purge-expired`` does; nothing
    changes (its ``--dry-run``). As :func:`destroy_period` asks: the period ended more than the
    retention plus the grace ago (or is tombstoned without its audit event), and once the expired
    cases are purged no case of it is left live and no blob is left under its key."""
    from core import retention

    if settings.period_key_folder is None:
        return []
    at = now or datetime.now(UTC)
    margin = timedelta(days=settings.retention_days + settings.period_key_grace_days)
    recorded = destructions_recorded(settings)
    kept = not_(and_(*retention.expired(settings, at)))  # what the purge, which runs first, leaves
    due = []
    with session_scope(settings) as session:
        for entry in folder(settings).list():
            if entry.destroyed_at is not None and kek_id(entry.period) in recorded:
                continue
            start, end = bounds(entry.period)
            if entry.destroyed_at is None and end + margin > at:
                continue
            live = select(func.count()).select_from(Case).where(Case.status != CaseStatus.PURGED.value, kept)
            live = live.where(Case.created_at >= start, Case.created_at < end)
            strays = select(func.count()).select_from(CaseBlob).join(Case, Case.id == CaseBlob.case_id)
            strays = strays.where(CaseBlob.kek_id == kek_id(entry.period), kept)
            if not session.scalar(live) and not session.scalar(strays):
                due.append(entry.period)
    return due

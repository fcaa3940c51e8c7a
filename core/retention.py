"""Retention and erasure by crypto-shredding.

Purging a case deletes its ``case_blobs`` rows: the ciphertext of the image, the heat map, the client
reference and the result's findings (label, probabilities, referral...: :mod:`core.results`), and
the wrapped data keys that could decrypt them; findings or a reference still in plain columns (rows
older than their sealing) are emptied, and the confirmed outcome the clinic reported is removed
(the case-free tally of :mod:`core.outcomes` keeps its count). No diagnosis of the case can be read
back afterwards. The case row (status ``purged``), the operational part of its result (model,
timings, ``outcome``) and the audit trail remain. Without the data keys, a copy of the ciphertext
left in a backup is unreadable once the key of the case's period is destroyed, which retention does
when every case of the period is purged (:mod:`core.period_shredding`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import ColumnElement, delete, func, select, update
from sqlalchemy.orm import Session

from core import announcements, audit, callback_secrets, cases, results
from core.config import Settings
from core.db import session_scope
from core.errors import NotFound
from core.keys import Principal
from core.models import CallbackDelivery, CallbackStatus, Case, CaseStatus, ClinicCallback
from core.outcome_models import ConfirmedOutcome, OutcomeMonthlyTally
from core.retention_steps import STEPS, StepFailure, Steps

BATCH = 500


@dataclass
class PurgeReport:
    purged: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {"purged": len(self.purged)}


#: what an erased case keeps in place of its image's SHA-256
ERASED_DIGEST = "0" * 64


def purge_case(session: Session, case: Case, *, actor: audit.Actor, reason: str, action: str = "case.purge") -> None:
    """Crypto-shred one case's patient data now and mark it purged (audited as ``action``, with ``reason``)."""
    blobs = _shred(session, case)
    if not CaseStatus(case.status).terminal:  # erased while queued or running: its long polls end now
        announcements.announce_finished(session, [case.id])
    case.status = CaseStatus.PURGED.value
    case.purged_at = case.updated_at = datetime.now(UTC)
    session.flush()
    _record(session, case, actor, action, {"reason": reason, "blobs": blobs})


def _shred(session: Session, case: Case) -> int:
    """Everything of ``case`` that is patient data, gone; returns how many blobs were deleted."""
    case.plain_client_ref = None  # a reference stored before it was sealed (core.phi)
    # the upload's SHA-256 finds the case from a copy of the photo, in any backup, for good; only an
    # idempotent replay compares it, and a purged case's replay is refused before that (core.cases)
    case.image_sha256 = ERASED_DIGEST
    # and so, nearly as well, do its exact byte count and size, and the result's brightness and
    # contrast to three decimals (nothing shows them for an erased case)
    case.image_width = case.image_height = case.image_bytes = 0
    results.forget_input_statistics(session, case.id)
    # Rows stored before their findings were sealed first: the sweeper may be sealing them right now,
    # holding their locks with its new blobs not yet committed. These statements wait for it, and the
    # blobs' delete below, a statement that starts after it committed, then sees those blobs too.
    results.shred_plain_findings(session, case.id)
    session.execute(delete(ConfirmedOutcome).where(ConfirmedOutcome.case_id == case.id))  # a diagnosis too
    return cases.delete_blobs(session, case.id)  # the image, the heat map, the client reference, the findings


def _record(session: Session, case: Case, actor: audit.Actor, action: str, detail: dict[str, object]) -> None:
    audit.record(
        session,
        action=action,
        outcome=audit.SUCCESS,
        actor=actor,
        entity_type="case",
        entity_id=case.id,
        clinic_id=case.clinic_id,
        detail=detail,
    )


def expired(settings: Settings, now: datetime | None = None) -> tuple[ColumnElement[bool], ...]:
    """The cases retention purges: finished, not purged, submitted more than ``retention_days`` ago."""
    cutoff = (now or datetime.now(UTC)) - timedelta(days=settings.retention_days)
    return (
        Case.created_at < cutoff,
        Case.purged_at.is_(None),
        Case.status.in_([CaseStatus.SUCCEEDED.value, CaseStatus.FAILED.value]),
    )


def expired_cases(session: Session, settings: Settings, *, now: datetime | None = None) -> tuple[int, datetime | None]:
    """How many cases :func:`purge_expired` would purge now, and when the oldest of them was submitted
    (what ``dermq case purge-expired --dry-run`` reports; nothing changes)."""
    query = select(func.count(), func.min(Case.created_at)).where(*expired(settings, now))
    count, oldest = session.execute(query).one()
    return int(count), oldest


def field_months_due(session: Session, settings: Settings) -> int:
    """How many monthly field-tally counts :func:`prune_field_months` would drop now."""
    from core import outcomes

    before = outcomes.window_start(settings.field_window_months)
    older = select(func.count()).select_from(OutcomeMonthlyTally).where(OutcomeMonthlyTally.month < before)
    return session.scalar(older) or 0


def _settled_deliveries(settings: Settings, now: datetime | None) -> tuple[ColumnElement[bool], ...]:
    """Callback deliveries retention deletes: settled (delivered, failed or cancelled) and last updated
    more than ``callback_history_days`` ago (the partial index ix_callback_deliveries_settled)."""
    cutoff = (now or datetime.now(UTC)) - timedelta(days=settings.callback_history_days)
    return (CallbackDelivery.status != CallbackStatus.PENDING.value, CallbackDelivery.updated_at < cutoff)


def prune_callback_deliveries(
    session: Session, settings: Settings, *, now: datetime | None = None, limit: int = BATCH
) -> int:
    """Delete up to ``limit`` settled callback deliveries older than ``callback_history_days`` (one
    batch per call); returns how many. The outbox kept one row per finished case for good; a clinic's
    status (``GET /v1/clinic/callback``) reads the last day, the sweeper only pending rows, and the
    audit trail keeps every attempt (``callback.deliver``)."""
    doomed = (
        select(CallbackDelivery.case_id)
        .where(*_settled_deliveries(settings, now))
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    deleted = session.execute(delete(CallbackDelivery).where(CallbackDelivery.case_id.in_(doomed.scalar_subquery())))
    return int(getattr(deleted, "rowcount", 0) or 0)


def forget_replaced_callback_secrets(session: Session) -> int:
    """Empty the replaced callback secrets whose overlap has ended (they sign nothing any more, and
    stayed sealed in the row until its next registration); returns how many rows."""
    done = session.execute(
        update(ClinicCallback)
        .where(ClinicCallback.previous_secret_until <= func.now())
        .values(**callback_secrets.NO_PREVIOUS)
    )
    return int(getattr(done, "rowcount", 0) or 0)


def callback_deliveries_due(session: Session, settings: Settings) -> int:
    """How many callback deliveries :func:`prune_callback_deliveries` would delete now."""
    query = select(func.count()).select_from(CallbackDelivery).where(*_settled_deliveries(settings, None))
    return session.scalar(query) or 0


@dataclass
class RetentionRun:
    """What one retention run did (beat's purge, ``dermq case purge-expired``): :func:`run`."""

    purged: int
    #: it stopped at its time budget with expired cases left (the next run goes on)
    backlog: bool
    periods_destroyed: list[str]
    field_cells: int
    callback_deliveries: int
    #: what failed (logged, ``retention_step_failed``); the others ran all the same
    failures: list[StepFailure] = field(default_factory=list)

    @property
    def failed(self) -> list[str]:
        """The steps that failed, in the order they ran."""
        return list(dict.fromkeys(failure.step for failure in self.failures))

    def to_dict(self) -> dict[str, object]:
        return {
            "purged": self.purged,
            "periods_destroyed": self.periods_destroyed,
            "field_cells": self.field_cells,
            "callback_deliveries": self.callback_deliveries,
            "failed": self.failed,
        }


def run(
    settings: Settings, *, until: float | None = None, on_failure: Callable[[StepFailure], None] | None = None
) -> RetentionRun:
    """Retention, in order: crypto-shred the expired cases, a batch per transaction; destroy the keys
    of the periods whose every case is purged and past retention plus the grace (no backup can decrypt
    them afterwards); drop the monthly field tally's months before its window and the replaced
    callback secrets whose overlap has ended; delete the settled callback deliveries older than
    ``callback_history_days``. The batched steps stop once ``until`` (``time.monotonic()``) has passed.
    Each step runs on its own (:mod:`core.retention_steps`): one that fails is logged, handed to
    ``on_failure`` at once (a run that then ends without returning, its database lost, has reported it)
    and named in ``failures``, and the others still run; so is each period whose key cannot be
    destroyed, and the other periods are destroyed."""
    from core import period_shredding  # it imports this module

    def once(work: Callable[[Session], int]) -> int:
        with session_scope(settings) as session:
            return work(session)

    steps = Steps(on_failure)
    purged, backlog = steps.run(
        STEPS[0], lambda: _in_batches(settings, lambda s: len(purge_expired(s, settings).purged), until), (0, False)
    )
    destroyed: list[str] = steps.run(
        STEPS[1], lambda: period_shredding.destroy_expired(settings, failed=steps.failed_in(STEPS[1])), []
    )
    cells = steps.run(STEPS[2], lambda: once(lambda s: prune_field_months(s, settings)), 0)
    steps.run(STEPS[3], lambda: once(forget_replaced_callback_secrets), 0)
    deliveries, _ = steps.run(
        STEPS[4], lambda: _in_batches(settings, lambda s: prune_callback_deliveries(s, settings), until), (0, False)
    )
    return RetentionRun(purged, backlog, destroyed, cells, deliveries, steps.failures)


def _in_batches(settings: Settings, step: Callable[[Session], int], until: float | None) -> tuple[int, bool]:
    """Run ``step`` (which handles at most :data:`BATCH` rows) a transaction at a time until it handles
    fewer, or ``until`` has passed: how many it handled, and whether its last batch was full."""
    total = 0
    full = False
    while until is None or time.monotonic() <= until:
        with session_scope(settings) as session:
            done = step(session)
        total += done
        full = done >= BATCH
        if not full:
            break
    return total, full


def purge_expired(session: Session, settings: Settings, *, now: datetime | None = None) -> PurgeReport:
    """Crypto-shred finished cases older than ``retention_days`` (one batch per call)."""
    batch = session.scalars(
        select(Case)
        .where(*expired(settings, now))
        .order_by(Case.created_at)
        .limit(BATCH)
        .with_for_update(skip_locked=True)
    ).all()
    report = PurgeReport()
    for case in batch:
        purge_case(session, case, actor=audit.SYSTEM, reason="retention")
        report.purged.append(str(case.id))
    return report


def erase_case(session: Session, *, principal: Principal, actor: audit.Actor, case_id: uuid.UUID) -> Case:
    """The clinic's erasure request: shred the case's patient data now, whatever its state. Idempotent."""
    case = cases.owned_case(session, principal, case_id, "case.delete", for_update=True)
    _erase(session, case, actor, "clinic_request")
    return case


def erase_by_operator(session: Session, case_id: uuid.UUID, *, actor: audit.Actor) -> tuple[Case, bool]:
    """An operator's erasure of one case (``dermq case erase``), for a patient whose clinic cannot ask
    any more (its keys revoked, the clinic deactivated): the case locked, shredded as the clinic's
    request would (audited ``case.delete``, reason ``operator_request``). Returns the case and whether
    there was anything left to erase; :class:`NotFound` for no such case."""
    case = session.scalar(select(Case).where(Case.id == case_id).with_for_update())
    if case is None:
        raise NotFound("no such case", code="case_not_found")
    return case, _erase(session, case, actor, "operator_request")


def _erase(session: Session, case: Case, actor: audit.Actor, reason: str) -> bool:
    if case.status != CaseStatus.PURGED:
        purge_case(session, case, actor=actor, reason=reason, action="case.delete")
        return True
    # A request to erase is on record even when there was nothing left to erase; whatever an older
    # release or a race left behind (a reference in plain text, a blob) is shredded now (migrations
    # 0016 and 0018 did it once for the cases purged before).
    left = case.plain_client_ref is not None
    blobs = _shred(session, case)
    session.flush()
    _record(session, case, actor, "case.delete", {"reason": reason, "already": True, "blobs": blobs})
    return left or blobs > 0


def prune_field_months(session: Session, settings: Settings) -> int:
    """Delete the monthly field tally's months before the recent window (``DERMQ_FIELD_WINDOW_MONTHS``):
    field performance reads no older month, and fewer small monthly counts sit in every backup (read
    beside the audit trail's outcome reports, a month with few reports says which diagnoses they had).
    The lifetime tally keeps the counts. Returns how many cells went."""
    from core import outcomes  # its model and labels are not needed to purge cases

    return outcomes.prune_monthly(session, before=outcomes.window_start(settings.field_window_months))

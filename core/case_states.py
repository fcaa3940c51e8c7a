"""The worker's side of a case's state machine once a case is claimed (:mod:`core.case_claims`):
store results, fail or requeue cases, note that they were published.

Every function takes a keyword-only or leading ``session`` and only flushes; the caller's scope
commits. Every state change records an audit event in the same transaction. Transitions are fenced
by the attempt number, so a stale worker can never overwrite a newer run's outcome. The API's side
(submit, read, list) is :mod:`core.cases`.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    DateTime,
    Uuid,
    column,
    text,
    update,
)
from sqlalchemy.orm import Session

from core import announcements, audit, case_images, cases, period_shredding, results
from core.crypto import Keyring, encrypt_blob
from core.models import BlobKind, Case, CaseStatus, Outcome


def _finish(session: Session, case_id: uuid.UUID, attempt: int, values: dict[str, Any]) -> Case | None:
    """Fenced running -> terminal transition; None if this attempt no longer owns the case."""
    return session.scalar(
        update(Case)
        .where(Case.id == case_id, Case.status == CaseStatus.RUNNING.value, Case.attempts == attempt)
        .values(finished_at=cases.now(), updated_at=cases.now(), **values)
        .returning(Case)
    )


@dataclass(frozen=True, slots=True)
class Completion:
    """A worker's outcome for one case it claimed: the result's values (stored by :mod:`core.results`:
    the findings sealed) and the heat map PNG."""

    case_id: uuid.UUID
    attempt: int
    result: dict[str, Any]
    heatmap_png: bytes | None
    #: the worker read the intake's working copy of the image (which goes once the case ends); with
    #: False there is none, and storing the batch skips the statement that deletes working copies
    working_copy: bool = True


#: :func:`complete_cases`'s fenced UPDATE: one statement for any number of cases, their ids, attempts
#: and model ids bound as three arrays (a VALUES list built per call made SQLAlchemy compile the
#: statement anew every time: half of its cost)
_COMPLETE = text(
    """UPDATE cases SET status = :succeeded, model_id = done.model_id,
        failure_code = NULL, failure_message = NULL, finished_at = :at, updated_at = :at
    FROM unnest(CAST(:ids AS uuid[]), CAST(:attempts AS integer[]), CAST(:models AS varchar[]))
        AS done(id, attempt, model_id)
    WHERE cases.id = done.id AND cases.status = :running AND cases.attempts = done.attempt
    RETURNING cases.id, cases.clinic_id, cases.created_at"""
).columns(column("id", Uuid()), column("clinic_id", Uuid()), column("created_at", DateTime(timezone=True)))


def complete_cases(
    session: Session, *, keyring: Keyring, completions: Sequence[Completion], actor: audit.Actor = audit.SYSTEM
) -> set[uuid.UUID]:
    """Store each completion's result (and encrypted heat map) and mark its case succeeded, all in the
    caller's transaction; returns the ids stored. A completion whose attempt no longer owns its case
    (taken over or purged meanwhile) is left out, and nothing of it is written.

    A fixed number of statements however many cases: one fenced UPDATE over a VALUES list, one INSERT
    per table, one audit append. That is what lets a worker draining a backlog store a batch for
    about the cost of one case.
    """
    if not completions:
        return set()
    finished_at = cases.now()
    rows = session.execute(
        _COMPLETE,
        {
            "ids": [str(c.case_id) for c in completions],
            "attempts": [c.attempt for c in completions],
            "models": [c.result["model_id"] for c in completions],
            "at": finished_at,
            "succeeded": CaseStatus.SUCCEEDED.value,
            "running": CaseStatus.RUNNING.value,
        },
    ).all()
    clinics = {case_id: clinic_id for case_id, clinic_id, _ in rows}
    stored = [c for c in completions if c.case_id in clinics]
    created = {case_id: created_at for case_id, _, created_at in rows}
    wraps = period_shredding.wrapping_keys(session, keyring, created.values())  # each case's period key
    result_rows, sealed_findings = results.new_results(
        keyring, [(c.case_id, c.result, wraps[created[c.case_id]]) for c in stored]
    )
    results.insert_rows(session, result_rows)  # the findings about the patient are in sealed_findings only
    cases.insert_blobs(
        session,
        sealed_findings
        + [
            (
                c.case_id,
                BlobKind.HEATMAP,
                encrypt_blob(
                    keyring,
                    c.heatmap_png,
                    case_id=c.case_id,
                    kind=BlobKind.HEATMAP.value,
                    kek_id=wraps[created[c.case_id]],
                ),
                "image/png",
            )
            for c in stored
            if c.heatmap_png is not None
        ],
    )
    audit.record_many(
        session,
        [
            audit.Event(
                "case.classify",
                audit.SUCCESS,
                actor,
                "case",
                c.case_id,
                clinics[c.case_id],
                {
                    "attempt": c.attempt,
                    "model_id": c.result["model_id"],
                    "outcome": c.result.get("outcome", Outcome.DIAGNOSIS.value),
                    "gradcam": c.result["gradcam_status"],
                },
            )
            for c in stored
        ],
    )
    case_images.drop_working_copies(session, [c.case_id for c in stored if c.working_copy])
    announcements.announce_finished(session, clinics)
    return set(clinics)


def fail_case(
    session: Session,
    *,
    case_id: uuid.UUID,
    attempt: int | None,
    code: str,
    message: str,
    actor: audit.Actor = audit.SYSTEM,
) -> bool:
    """Mark the case failed: this attempt's while it is running; with ``attempt`` None (the caller never
    claimed it: a failure before the claim, or an operator's or a test's ending), only while it is
    still queued. A running case is some worker's attempt, and only that attempt, or the sweeper
    after it, may end it."""
    values = {"status": CaseStatus.FAILED.value, "failure_code": code, "failure_message": message[:2000]}
    if attempt is None:
        case = session.scalar(
            update(Case)
            .where(Case.id == case_id, Case.status == CaseStatus.QUEUED.value)
            .values(finished_at=cases.now(), updated_at=cases.now(), **values)
            .returning(Case)
        )
    else:
        case = _finish(session, case_id, attempt, values)
    if case is None:
        return False
    _audit_case(session, case, "case.fail", audit.FAILURE, actor, {"attempt": case.attempts, "code": code})
    case_images.drop_working_copies(session, [case_id])
    announcements.announce_finished(session, [case_id])
    return True


def requeue_case(
    session: Session,
    case_id: uuid.UUID,
    *,
    attempt: int,
    reason: str,
    actor: audit.Actor = audit.SYSTEM,
    uncounted: bool = False,
) -> bool:
    """Put a running case back in the queue (recovery, retry); fenced by attempt like the others.
    ``uncounted``: the attempt is given back too, for a stop that is not the case's doing and cost it
    no work (a key the worker could not load): however long an operator takes, its attempts stay."""
    case = session.scalar(
        update(Case)
        .where(Case.id == case_id, Case.status == CaseStatus.RUNNING.value, Case.attempts == attempt)
        .values(
            status=CaseStatus.QUEUED.value,
            updated_at=cases.now(),
            started_at=None,
            attempts=attempt - 1 if uncounted else attempt,
        )
        .returning(Case)
    )
    if case is None:
        return False
    detail = {"attempt": attempt, "reason": reason} | ({"uncounted": True} if uncounted else {})
    _audit_case(session, case, "case.requeue", audit.SUCCESS, actor, detail)
    return True


def spend_failed_claim(
    session: Session, case_id: uuid.UUID, *, error: str, actor: audit.Actor = audit.SYSTEM
) -> int | None:
    """Count an attempt of a queued case whose claim kept failing with errors that look transient (a
    statement or lock timeout that recurs for this case, not an outage: then this fails too). Without
    it such a case would go round the task's retries and the sweeper's republishing for ever, never
    spending an attempt. Returns the attempts now counted, or None when the case is no longer queued
    (a worker took it meanwhile, or it ended). ``error``: the error's type, for the audit event."""
    case = session.scalar(
        update(Case)
        .where(Case.id == case_id, Case.status == CaseStatus.QUEUED.value)
        .values(attempts=Case.attempts + 1, updated_at=cases.now())
        .returning(Case)
    )
    if case is None:
        return None
    detail = {"attempt": case.attempts, "reason": "claim_failed", "error": error}
    _audit_case(session, case, "case.start", audit.FAILURE, actor, detail)
    return case.attempts


def _audit_case(
    session: Session, case: Case, action: str, outcome: str, actor: audit.Actor, detail: dict[str, Any]
) -> None:
    """The audit event of a transition of ``case``, as the transition's statement returned it."""
    audit.record(
        session,
        action=action,
        outcome=outcome,
        actor=actor,
        entity_type="case",
        entity_id=case.id,
        clinic_id=case.clinic_id,
        detail=detail,
    )


def mark_published(session: Session, case_ids: list[uuid.UUID]) -> None:
    if case_ids:
        session.execute(update(Case).where(Case.id.in_(case_ids)).values(published_at=cases.now()))

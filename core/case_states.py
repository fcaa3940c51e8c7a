"""The worker's side of a case's state machine: claim queued cases, load their images, store
results, fail or requeue them, note that they were published.

Every function takes a keyword-only or leading ``session`` and only flushes; the caller's scope
commits. Every state change records an audit event in the same transaction. Transitions are fenced
by the attempt number, so a stale worker can never overwrite a newer run's outcome. The API's side
(submit, read, list) is :mod:`core.cases`.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Connection,
    DateTime,
    Dialect,
    Numeric,
    Uuid,
    bindparam,
    cast,
    column,
    exists,
    func,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy import case as sa_case
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import ReturningUpdate
from sqlalchemy.sql.elements import ColumnElement

from core import announcements, audit, case_images, cases, period_shredding, prepared, results
from core.crypto import Keyring, encrypt_blob
from core.models import BlobKind, Case, CaseStatus, Outcome, Priority

#: The order in which queued cases are served: urgent first, then oldest.
QUEUE_ORDER = (sa_case((Case.priority == Priority.URGENT.value, 0), else_=1), Case.created_at)


def _start(*where: ColumnElement[bool], at: Any = None) -> ReturningUpdate[Any]:
    """The UPDATE that moves the cases ``where`` selects to running, counting the attempt; started
    ``at`` (a bound parameter in a statement built once), by default now."""
    at = cases.now() if at is None else at
    return (
        update(Case)
        .where(*where)
        .values(status=CaseStatus.RUNNING.value, attempts=Case.attempts + 1, started_at=at, updated_at=at)
        .returning(Case)
    )


def _audit_starts(session: Session, started: list[Case], actor: audit.Actor, batch: int | bool | None = None) -> None:
    audit.record_many(
        session,
        [
            audit.Event(
                "case.start",
                audit.SUCCESS,
                actor,
                "case",
                case.id,
                case.clinic_id,
                {"attempt": case.attempts} | ({"batch": batch} if batch is not None else {}),
            )
            for case in started
        ],
    )


def claim_case(session: Session, case_id: uuid.UUID, *, actor: audit.Actor = audit.SYSTEM) -> Case | None:
    """Move a queued case to running and count the attempt; None if it is not queued (already taken,
    finished or purged), which makes a redelivered message harmless."""
    claimed = session.scalar(_start(Case.id == case_id, Case.status == CaseStatus.QUEUED.value))
    if claimed is None:
        return None
    _audit_starts(session, [claimed], actor)
    return claimed


#: built once: the statement :func:`is_queued` sends
_STATUS_OF = select(Case.status).where(Case.id == bindparam("case_id"))


def is_queued(connection: Connection, case_id: uuid.UUID) -> bool:
    """Whether ``case_id`` waits in the queue: one primary-key read on a Core connection (a
    Session's ``connection()``: the worker looks in its claim's transaction). A batch of
    8 leaves 7 messages whose case it took; the worker's main process drops most of them
    (``worker/companions.py``), and those that still reach a child (fetched before the batch marked
    them, or with Redis not answering) end here: on this project's 2-core VM this read costs 0.24 ms
    of CPU against 0.85 ms for the same read through an ORM Session, and far less than
    :func:`claim_batch` finding nothing. A case seen queued may still be taken before the claim; the
    claim decides."""
    return connection.execute(_STATUS_OF, {"case_id": case_id}).scalar() == CaseStatus.QUEUED.value


def claim_batch(
    session: Session,
    case_id: uuid.UUID,
    *,
    limit: int,
    max_pixels: int | None = None,
    reduce_to: int | None = None,
    actor: audit.Actor = audit.SYSTEM,
) -> list[Case]:
    """Claim ``case_id`` and up to ``limit - 1`` more queued cases (urgent first, then oldest) in one
    statement, for a worker that classifies them as one batch.

    With ``max_pixels``, the batch holds at most that many decoded image pixels: a case joins only if
    its image decodes to at most ``max_pixels / limit`` pixels, and a larger ``case_id`` is claimed
    alone. With ``reduce_to`` (what the worker passes to the decoder), a JPEG counts the pixels of its
    draft-mode decode (:func:`decoded_pixels`), every other format its declared size.

    ``FOR UPDATE SKIP LOCKED`` lets concurrent batches take disjoint sets; each claimed case's own
    message later finds it taken and does nothing. Returns nothing if ``case_id`` itself was not
    queued (another batch took it): that worker is already on it.
    """
    per_slot = max_pixels // max(limit, 1) if max_pixels is not None else None
    claim, statement = _claim_statement(limit, per_slot, reduce_to, session.get_bind().dialect)
    prepared.ensure(session.connection(), claim)
    claimed = list(session.scalars(statement, {"case_id": case_id, "now": cases.now()}))
    claimed.sort(key=lambda c: c.id != case_id)
    _audit_starts(session, claimed, actor, batch=len(claimed))
    return claimed


@functools.lru_cache(maxsize=16)
def _claim_statement(
    limit: int, per_slot: int | None, reduce_to: int | None, dialect: Dialect
) -> tuple[prepared.Prepared, Any]:
    """:func:`claim_batch`'s one statement for these bounds, built once per process and prepared once
    per connection (:mod:`core.prepared`), with the case (``case_id``) and the time (``now``) bound per
    call; and its execution, loading Case objects. Building it (two CTEs, the pixel arithmetic,
    RETURNING every column) took about twice the CPU of executing it, deriving its cache key at each
    execution a fifth, and Postgres's parsing and planning of it about 1 ms of an idle claim's wall
    time. Our case, if still queued and not locked, plus, only then, the others."""
    case_id = bindparam("case_id", type_=Case.__table__.c.id.type)
    pixels = decoded_pixels(reduce_to)
    mine = (
        select(Case.id, pixels.label("pixels"))
        .where(Case.id == case_id, Case.status == CaseStatus.QUEUED.value)
        .with_for_update(skip_locked=True)
        .cte("mine")
    )
    small = [] if per_slot is None else [pixels <= per_slot]
    company = select(mine.c.id) if per_slot is None else select(mine.c.id).where(mine.c.pixels <= per_slot)
    others = (
        select(Case.id)
        .where(Case.status == CaseStatus.QUEUED.value, Case.id != case_id, exists(company), *small)
        .order_by(*QUEUE_ORDER)
        .limit(max(0, limit - 1))
        .with_for_update(skip_locked=True)
        .cte("others")
    )
    chosen = Case.id.in_(union_all(select(mine.c.id), select(others.c.id)))
    at = bindparam("now", type_=Case.__table__.c.started_at.type)
    claim = prepared.prepare(_start(chosen, at=at), dialect, [("case_id", "uuid"), ("now", "timestamptz")])
    return claim, select(Case).from_statement(claim.execute)


def decoded_pixels(reduce_to: int | None) -> ColumnElement[Any]:
    """SQL for the pixels a queued case's image decodes to: its declared width x height, divided for a
    JPEG by the square of the draft scale the decoder picks for ``reduce_to`` (1, 2, 4 or 8: the
    largest that keeps the longer side at least ``reduce_to``; ``ml.images.decode``). A case with a
    working copy (:mod:`core.case_images`) decodes to fewer; the bound stays the one for its original."""
    declared = Case.image_width * Case.image_height
    if reduce_to is None:
        return declared
    longer = func.greatest(Case.image_width, Case.image_height)
    steps = func.least(3, func.greatest(0, func.floor(func.log(2.0, cast(longer, Numeric) / reduce_to))))
    scale = func.power(2, steps)
    return sa_case((Case.image_format == "JPEG", cast(declared / (scale * scale), BigInteger)), else_=declared)


def claim_queued(session: Session, *, limit: int, actor: audit.Actor = audit.SYSTEM) -> list[Case]:
    """Claim up to ``limit`` queued cases (urgent first, then oldest) that no one else holds."""
    if limit <= 0:
        return []
    wanted = (
        select(Case.id)
        .where(Case.status == CaseStatus.QUEUED.value)
        .order_by(*QUEUE_ORDER)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .cte("wanted")
    )
    claimed = list(
        session.scalars(_start(Case.id.in_(select(wanted.c.id))).execution_options(synchronize_session=False))
    )
    _audit_starts(session, claimed, actor, batch=True)
    return claimed


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
    audit.record(
        session,
        action="case.fail",
        outcome=audit.FAILURE,
        actor=actor,
        entity_type="case",
        entity_id=case_id,
        clinic_id=case.clinic_id,
        detail={"attempt": case.attempts, "code": code},
    )
    case_images.drop_working_copies(session, [case_id])
    announcements.announce_finished(session, [case_id])
    return True


def requeue_case(
    session: Session, case_id: uuid.UUID, *, attempt: int, reason: str, actor: audit.Actor = audit.SYSTEM
) -> bool:
    """Put a running case back in the queue (recovery, retry); fenced by attempt like the others."""
    case = session.scalar(
        update(Case)
        .where(Case.id == case_id, Case.status == CaseStatus.RUNNING.value, Case.attempts == attempt)
        .values(status=CaseStatus.QUEUED.value, updated_at=cases.now(), started_at=None)
        .returning(Case)
    )
    if case is None:
        return False
    audit.record(
        session,
        action="case.requeue",
        outcome=audit.SUCCESS,
        actor=actor,
        entity_type="case",
        entity_id=case_id,
        clinic_id=case.clinic_id,
        detail={"attempt": attempt, "reason": reason},
    )
    return True


def mark_published(session: Session, case_ids: list[uuid.UUID]) -> None:
    if case_ids:
        session.execute(update(Case).where(Case.id.in_(case_ids)).values(published_at=cases.now()))

"""Claiming queued cases: a worker moves them to running, counting the attempt, one case or a
dynamic batch at a time (the rest of the worker's side of the state machine is :mod:`core.case_states`).

A batch's cases share a fate when the worker running them dies (out of memory, a crash in a native
library): its message comes back and the recovery sweep requeues every case it held, each one an
attempt the poorer. So a case that has been claimed before runs alone: it neither joins a batch nor
takes company. A poison case then costs each case it was batched with one attempt, not all of them,
and fails alone once its own attempts are spent (``max_attempts``).
"""

from __future__ import annotations

import functools
import uuid
from typing import Any

from sqlalchemy import (
    BigInteger,
    Connection,
    Dialect,
    Numeric,
    Select,
    bindparam,
    cast,
    exists,
    func,
    select,
    union_all,
    update,
)
from sqlalchemy import case as sa_case
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import ReturningUpdate
from sqlalchemy.sql.elements import ColumnElement

from core import audit, prepared
from core.models import Case, CaseStatus, Priority

#: The order in which queued cases are served: urgent first, then oldest.
QUEUE_ORDER = (sa_case((Case.priority == Priority.URGENT.value, 0), else_=1), Case.created_at)


def _start(*where: ColumnElement[bool]) -> ReturningUpdate[Any]:
    """The UPDATE that moves the cases ``where`` selects to running, counting the attempt; started now
    by the database's clock, which the sweeper's overdue test reads too (:mod:`core.recovery`): a
    worker host whose clock ran minutes behind the sweeper's made its cases look overdue as soon as
    they were claimed, and they were put back in the queue while they ran."""
    at = func.now()
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

    Only first attempts share a batch: ``case_id`` is claimed alone if it was claimed before, and
    only cases never claimed join it (see the module's docstring). With ``max_pixels``, the batch
    holds at most that many decoded image pixels: a case joins only if its image decodes to at most
    ``max_pixels / limit`` pixels, and a larger ``case_id`` is claimed alone. With ``reduce_to`` (what
    the worker passes to the decoder), a JPEG counts the pixels of its draft-mode decode
    (:func:`decoded_pixels`), every other format its declared size.

    ``FOR NO KEY UPDATE SKIP LOCKED`` (the lock the UPDATE takes anyway: it changes no key) lets
    concurrent batches take disjoint sets, and passes over no case that another transaction only
    holds ``FOR KEY SHARE`` (an intake confirming its case on disk, ``core.cases.confirm_stored``:
    ``FOR UPDATE`` skipped it, and its own message then found nothing to claim). Each claimed case's own
    message later finds it taken and does nothing. Returns nothing if ``case_id`` itself was not
    queued (another batch took it): that worker is already on it.
    """
    per_slot = max_pixels // max(limit, 1) if max_pixels is not None else None
    claim, statement = _claim_statement(limit, per_slot, reduce_to, session.get_bind().dialect)
    prepared.ensure(session.connection(), claim)
    claimed = list(session.scalars(statement, {"case_id": case_id}))
    claimed.sort(key=lambda c: c.id != case_id)
    _audit_starts(session, claimed, actor, batch=len(claimed))
    return claimed


@functools.lru_cache(maxsize=16)
def _claim_statement(
    limit: int, per_slot: int | None, reduce_to: int | None, dialect: Dialect
) -> tuple[prepared.Prepared, Any]:
    """:func:`claim_batch`'s one statement for these bounds, built once per process and prepared once
    per connection (:mod:`core.prepared`), with the case (``case_id``) bound per call; and its
    execution, loading Case objects. Building it (two CTEs, the pixel arithmetic,
    RETURNING every column) took about twice the CPU of executing it, deriving its cache key at each
    execution a fifth, and Postgres's parsing and planning of it about 1 ms of an idle claim's wall
    time. Our case, if still queued and not locked, plus, only if it may have company, the others."""
    case_id = bindparam("case_id", type_=Case.__table__.c.id.type)
    pixels = decoded_pixels(reduce_to)
    mine = (
        select(Case.id, pixels.label("pixels"), Case.attempts)
        .where(Case.id == case_id, Case.status == CaseStatus.QUEUED.value)
        .with_for_update(skip_locked=True, key_share=True)
        .cte("mine")
    )
    company = select(mine.c.id).where(mine.c.attempts == 0, *([] if per_slot is None else [mine.c.pixels <= per_slot]))
    others = (
        select(Case.id)
        .where(Case.id != case_id, *_may_join(pixels, per_slot), exists(company))
        .order_by(*QUEUE_ORDER)
        .limit(max(0, limit - 1))
        .with_for_update(skip_locked=True, key_share=True)
        .cte("others")
    )
    chosen = Case.id.in_(union_all(select(mine.c.id), select(others.c.id)))
    claim = prepared.prepare(_start(chosen), dialect, [("case_id", "uuid")])
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


def join_batch(
    session: Session,
    case_id: uuid.UUID,
    *,
    limit: int,
    batch_size: int,
    max_pixels: int | None = None,
    reduce_to: int | None = None,
    actor: audit.Actor = audit.SYSTEM,
) -> list[Case]:
    """Claim up to ``limit`` more queued cases into the batch that :func:`claim_batch` started with
    ``case_id`` (a GPU worker fills its batch after a short wait), on the same terms: none if
    ``case_id`` runs alone (claimed before this run, or too large for a slot of ``max_pixels /
    batch_size``), and only first attempts that fit a slot (urgent first, then oldest)."""
    if limit <= 0:
        return []
    per_slot = max_pixels // max(batch_size, 1) if max_pixels is not None else None
    wanted = join_candidates(case_id, limit, per_slot, reduce_to).cte("wanted")
    claimed = list(
        session.scalars(_start(Case.id.in_(select(wanted.c.id))).execution_options(synchronize_session=False))
    )
    _audit_starts(session, claimed, actor, batch=True)
    return claimed


def join_candidates(case_id: uuid.UUID, limit: int, per_slot: int | None, reduce_to: int | None) -> Select[Any]:
    """:func:`join_batch`'s choice of company, locked: up to ``limit`` queued first attempts that fit a
    slot of ``per_slot`` pixels, urgent first, then oldest (read from the front of the queue's index,
    migration 0030), if the running ``case_id`` may have company."""
    pixels = decoded_pixels(reduce_to)
    lead = select(Case.id).where(
        Case.id == case_id,
        Case.status == CaseStatus.RUNNING.value,
        Case.attempts == 1,
        *([] if per_slot is None else [pixels <= per_slot]),
    )
    return (
        select(Case.id)
        .where(*_may_join(pixels, per_slot), exists(lead))
        .order_by(*QUEUE_ORDER)
        .limit(limit)
        .with_for_update(skip_locked=True, key_share=True)
    )


def _may_join(pixels: ColumnElement[Any], per_slot: int | None) -> list[ColumnElement[bool]]:
    """Which cases may join another's batch: queued, never claimed, and small enough for a slot."""
    small = [] if per_slot is None else [pixels <= per_slot]
    return [Case.status == CaseStatus.QUEUED.value, Case.attempts == 0, *small]

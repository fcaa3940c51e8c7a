"""The recovery sweeper: Postgres is the source of truth, the broker only a signal that may be lost.

Run by Celery beat every ``sweep_interval_seconds`` (``worker.tasks.sweep``):

1. A case ``running`` for longer than the hard time limit plus ``running_grace_seconds`` lost its
   worker: the child was killed at the hard limit, crashed (a poison image that kills it every
   time), or the host died. Its message, if redelivered, was skipped, because a running case cannot
   be claimed. It goes back to ``queued`` (and is published as soon as the sweep commits) while attempts remain, else it
   ends ``failed`` with ``timeout`` and a message that names the attempts: attempts are counted in
   Postgres at each claim, so a poison case stops after ``max_attempts`` instead of looping. Both
   transitions are fenced by the attempt number, so a late worker can never overwrite them.
2. A case ``queued`` for longer than ``requeue_grace_seconds`` whose message is in none of the
   broker's lists (the publish failed while Redis was down, Redis restarted without its data, an
   operator flushed it) is published again. Messages still waiting are left alone, so a long backlog
   is not duplicated; a duplicate that slips through is harmless (the task claims the case first).
   A message delivered to a worker but not acknowledged counts as waiting only while it is younger
   than that grace: a queued case's (a retry waiting out its countdown, at most 24 s: keep the grace
   above that, or live retries are sent again before their backoff ends) whose
   worker's main process was killed stays in Redis's unacknowledged hash until the visibility
   timeout (300 s), and no worker would take it before then.
3. A completion callback pending and untouched for ``requeue_grace_seconds``, with no retry waiting
   out its backoff, whose message is in none of the broker's lists nor unacknowledged, lost its
   message too: it is published again (:func:`republish_callbacks`).

Every publish is enqueued on the sweep's Session (:mod:`core.enqueue`) and sent once the sweep has
committed, never while its transaction still holds the rows it changed: a worker's claim must find a
requeued case ``queued``, not locked. For the same reason each publish is stamped (``published_at``, a
callback's ``updated_at``: the next sweeps wait from then) in the sweep's own transaction, on rows it
holds already. Stamped after the sends, in a transaction of their own, the rows were locked again
just as the messages arrived: a worker's claim and a callback's lease skip locked rows, so the
message was dropped and the case or callback waited for another sweep. A send that fails after the
commit leaves its case or callback to a later sweep, past the same wait. The report counts what was
sent.

Exactly one result per case is the database's rule (``results.case_id`` is the primary key, and
every worker transition is fenced), not the sweeper's.
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import redis
from celery import Celery
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from core import callbacks, case_states
from core.case_claims import QUEUE_ORDER
from core.config import Settings
from core.enqueue import enqueue
from core.models import Case, CaseStatus
from core.publisher import callback_task, classify_task
from core.queueing import QUEUE_CALLBACKS, QUEUE_CASES, QUEUE_MAINTENANCE, TASK_CALLBACK, TASK_CLASSIFY, queue_lists

log = logging.getLogger("dermq.recovery")
BATCH = 500
#: pages of BATCH pending callbacks one sweep reads, looking past those whose message waits
CALLBACK_PAGES = 20


@dataclass
class SweepReport:
    """What one sweep did. ``republished`` and ``callbacks_republished`` fill in once the sweep's
    transaction has committed and the messages were sent."""

    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    republished: list[str] = field(default_factory=list)
    broker_checked: bool = False
    #: cases failed in this sweep whose clinic gets a callback (enqueued with the failure)
    callbacks: list[str] = field(default_factory=list)
    callbacks_republished: list[str] = field(default_factory=list)

    def published(self, session: Session, case_ids: list[uuid.UUID]) -> None:
        """After the sweep: these classify messages were sent (their rows were stamped by the sweep)."""
        self.republished.extend(str(case_id) for case_id in case_ids)

    def callbacks_published(self, session: Session, case_ids: list[uuid.UUID]) -> None:
        """After the sweep: these callback messages were sent (their rows were touched by the sweep)."""
        self.callbacks_republished.extend(str(case_id) for case_id in case_ids)

    def full(self) -> bool:
        """Whether a part of the sweep stopped at :data:`BATCH`: more may be waiting for the next round."""
        done = (len(self.requeued) + len(self.failed), len(self.republished), len(self.callbacks_republished))
        return max(done) >= BATCH

    def to_dict(self) -> dict[str, int | bool]:
        return {
            "requeued": len(self.requeued),
            "failed": len(self.failed),
            "republished": len(self.republished),
            "broker_checked": self.broker_checked,
            "callbacks_republished": len(self.callbacks_republished),
        }


def _case_id_of(raw: bytes | str, task: str = TASK_CLASSIFY) -> str | None:
    """The case id in a kombu Redis message of ``task`` (a JSON envelope whose headers name the task
    and args)."""
    try:
        message = json.loads(raw)
        if isinstance(message, list):  # the unacked hash stores [message, exchange, routing_key]
            message = message[0]
        headers = message.get("headers") or {}
        if headers.get("task") != task:
            return None
        args = headers.get("argsrepr") or ""
        return str(uuid.UUID(args.strip("[]()'\" ,")))
    except (ValueError, TypeError, AttributeError, KeyError, IndexError):
        return None


def broker_case_ids(
    client: redis.Redis,
    queue: str | tuple[str, ...] = QUEUE_CASES,
    task: str = TASK_CLASSIFY,
    *,
    delivered_since: float | None = None,
) -> set[str]:
    """Ids of every case with a ``task`` message of ``queue`` (or of any of several) waiting or
    delivered-but-unacknowledged (a retry waiting out its countdown in a worker is unacknowledged);
    with ``delivered_since`` (a Unix time), only the unacknowledged ones delivered since then: an
    older one may belong to a worker that was killed, and comes back only after the visibility timeout.
    Kombu stamps a delivery by the consuming worker's clock, compared here with the sweeper's: hosts'
    clocks apart by more than the grace send a live retry's case again (a duplicate: harmless) or wait
    for the visibility timeout, as before."""
    found: set[str] = set()
    for name in [name for one in ((queue,) if isinstance(queue, str) else queue) for name in queue_lists(one)]:
        start = 0
        while True:
            chunk = client.lrange(name, start, start + 999)
            if not chunk:
                break
            found.update(cid for cid in (_case_id_of(raw, task) for raw in chunk) if cid)
            start += len(chunk)
    delivered: dict[Any, float] = {}
    if delivered_since is not None:  # kombu stamps each delivery's time in this index
        delivered = dict(cast("list[tuple[Any, float]]", client.zrange("unacked_index", 0, -1, withscores=True)))
    for tag, raw in cast("dict[Any, Any]", client.hgetall("unacked")).items():
        # (a message with no stamp yet was delivered after the index was read: new, so waiting)
        if delivered_since is not None and delivered.get(tag, math.inf) < delivered_since:
            continue
        cid = _case_id_of(raw, task)
        if cid:
            found.add(cid)
    return found


def recover_running(session: Session, settings: Settings, publisher: Celery, report: SweepReport) -> None:
    # by the database's clock, as claims stamp started_at (core.case_claims): a worker host whose clock
    # ran behind this one's made every case it claimed look overdue at once
    cutoff = func.now() - timedelta(seconds=settings.task_time_limit + settings.running_grace_seconds)
    stuck = session.scalars(
        select(Case)
        .where(Case.status == CaseStatus.RUNNING.value, Case.started_at < cutoff)
        .order_by(Case.started_at)
        .limit(BATCH)
        .with_for_update(skip_locked=True)
    ).all()
    for case in stuck:
        if case.attempts < settings.max_attempts:
            if case_states.requeue_case(session, case.id, attempt=case.attempts, reason="worker_lost"):
                report.requeued.append(str(case.id))
        else:
            message = (
                f"none of {case.attempts} attempts finished within the {settings.task_time_limit:g} s time limit "
                "(each ran out of time or lost its worker); the image may be one that stops the worker. "
                "Submit it again, or contact support with the case id"
            )
            if case_states.fail_case(session, case_id=case.id, attempt=case.attempts, code="timeout", message=message):
                report.failed.append(str(case.id))
                if callbacks.note_finished(session, case.id, publisher=publisher):
                    report.callbacks.append(str(case.id))


def republish_lost(
    session: Session,
    publisher: Celery,
    broker: redis.Redis | None,
    report: SweepReport,
    *,
    cutoff: datetime | None = None,
    ids: list[str] | None = None,
) -> None:
    """Enqueue queued cases whose message the broker does not hold: those untouched since ``cutoff``,
    or exactly ``ids`` (cases the sweeper has just put back in the queue). They are sent after commit.

    The candidates are read without locks and the broker is asked about them before any is locked:
    only the cases that have lost their message are locked (``SKIP LOCKED``) and published. A case
    whose message is waiting stays unlocked for the rest of the sweep's transaction, so the worker
    that receives that message claims it. A lock would make the claim skip it and drop the message,
    delaying the case by another sweep (under a backlog older than the grace period, the head of the
    queue).

    Candidates are read in the order workers serve the queue (urgent first, then oldest) until
    ``BATCH`` have lost their message or none is left: under a backlog older than the grace period,
    whose messages wait, a lost case behind ``BATCH`` waiting ones is found too, an urgent one first.
    Only their ids are read, a chunk at a time."""
    query = select(Case).where(Case.status == CaseStatus.QUEUED.value)
    if ids is not None:
        query = query.where(Case.id.in_([uuid.UUID(i) for i in ids]))
    if cutoff is not None:
        query = query.where(Case.updated_at < cutoff, or_(Case.published_at.is_(None), Case.published_at < cutoff))
    ordered = query.with_only_columns(Case.id).order_by(*QUEUE_ORDER, Case.id)
    if session.scalar(ordered.limit(1)) is None:
        return  # nothing to look for: the broker is not asked
    waiting: set[str] = set()
    if broker is not None:
        try:
            waiting = broker_case_ids(broker, delivered_since=None if cutoff is None else cutoff.timestamp())
            report.broker_checked = True
        except redis.RedisError as exc:
            log.warning("broker unreachable; nothing republished this round", extra={"error": type(exc).__name__})
            return
    lost: list[uuid.UUID] = []
    candidates = session.scalars(ordered.execution_options(yield_per=BATCH))
    try:
        for case_id in candidates:
            if str(case_id) not in waiting:
                lost.append(case_id)
                if len(lost) == BATCH:
                    break
    finally:
        candidates.close()
    if not lost:
        return
    # the same conditions again, under the lock: a worker may have claimed one meanwhile
    targets = session.scalars(
        query.where(Case.id.in_(lost)).order_by(*QUEUE_ORDER, Case.id).with_for_update(skip_locked=True)
    ).all()
    for case in targets:
        enqueue(session, publisher, classify_task(case.id, case.priority), on_sent=report.published)
    case_states.mark_published(session, [case.id for case in targets])  # under the sweep's locks: see above


def republish_callbacks(
    session: Session,
    settings: Settings,
    publisher: Celery,
    broker: redis.Redis | None,
    report: SweepReport,
    at: datetime,
) -> None:
    """Enqueue again the pending callbacks whose message the broker does not hold, once they have been
    untouched for ``requeue_grace_seconds`` (as a queued case) with no retry waiting out its backoff
    (or due for that long): a first message lost is sent again about a minute after the case ended.
    One whose message still waits is left alone: behind a backlog of cases a callback's message waits,
    and each sweep added a copy, whose attempts then came one after another, without the backoff, once
    the backlog drained (a receiver down for those seconds spent every attempt). A callback waiting its
    turn at a clinic's receiver (:mod:`core.callback_pacing`) looks in Postgres just as a lost one does,
    untouched and perhaps never attempted: its message, held by a worker until it looks again, is in
    the broker's unacknowledged hash, and that is what tells them apart. Where the broker cannot be
    asked, only those untouched for longer than any retry waits
    (:func:`core.callbacks.unchecked_after_seconds`) are sent again, unchecked (a copy finds the row
    leased or done, or waits for a turn beside the callback's own message until either makes the
    attempt: the lease lets one attempt's notice out once)."""
    cutoff, due_by = at - timedelta(seconds=settings.requeue_grace_seconds), None
    page = callbacks.stale_page(session, cutoff, BATCH)
    if not page:
        return
    waiting: set[str] | None = None
    if broker is not None:
        try:
            # (on the maintenance queue: a message an earlier release sent, which a classification
            # worker passes on to the callbacks queue)
            waiting = broker_case_ids(broker, (QUEUE_CALLBACKS, QUEUE_MAINTENANCE), TASK_CALLBACK)
        except redis.RedisError as exc:
            log.warning("broker unreachable; callbacks republished unchecked", extra={"error": type(exc).__name__})
    if waiting is None:  # unknown: sent again, but only past any retry's backoff, as before the grace above
        waiting, cutoff, due_by = set(), at - timedelta(seconds=callbacks.unchecked_after_seconds(settings)), at
        page = callbacks.stale_page(session, cutoff, BATCH, due_by=due_by)
    lost: list[uuid.UUID] = []
    # Past the ones whose message waits: callbacks waiting their turn at a clinic's slow receiver
    # (core.callback_pacing) stay untouched, their messages held by a worker, and hundreds of them
    # would fill every page before another clinic's lost one.
    for _ in range(CALLBACK_PAGES):
        lost += [case_id for _, case_id in page if str(case_id) not in waiting]
        if len(lost) >= BATCH or len(page) < BATCH:
            break
        page = callbacks.stale_page(session, cutoff, BATCH, beyond=page[-1], due_by=due_by)
    # the same conditions again, under the lock: a worker may have leased one meanwhile
    locked = callbacks.stale_deliveries(session, cutoff, lost[:BATCH], due_by=due_by) if lost else []
    for case_id in locked:
        enqueue(session, publisher, callback_task(case_id), on_sent=report.callbacks_published)
    callbacks.touch_deliveries(session, locked)  # under the sweep's locks: see the module's docstring


def sweep(session: Session, settings: Settings, publisher: Celery, broker: redis.Redis | None) -> SweepReport:
    """One sweep in the caller's transaction; its messages go out when the caller commits (and the
    report's ``republished`` lists fill in then)."""
    report = SweepReport()
    at = datetime.now(UTC)  # what the cutoffs below compare with is stamped by the hosts' clocks
    recover_running(session, settings, publisher, report)
    session.flush()
    if report.requeued:
        # Published after this commit rather than after another grace period, and without asking the
        # broker: a message of theirs still in the unacknowledged hash belongs to the worker that was
        # lost and would come back only after the visibility timeout. A duplicate is harmless.
        republish_lost(session, publisher, None, report, ids=report.requeued)
    republish_lost(session, publisher, broker, report, cutoff=at - timedelta(seconds=settings.requeue_grace_seconds))
    republish_callbacks(session, settings, publisher, broker, report, at)
    return report


def log_report(report: SweepReport) -> None:
    """Log a sweep that did something (after its commit, when the sends are known)."""
    if report.requeued or report.failed or report.republished or report.callbacks_republished:
        log.info("sweep", extra={"event": "sweep", **report.to_dict()})

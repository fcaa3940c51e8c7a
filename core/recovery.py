"""The recovery sweeper: Postgres is the source of truth, the broker only a signal that may be lost.

Run by Celery beat every ``sweep_interval_seconds`` (``worker.tasks.sweep``):

1. A case ``running`` for longer than the hard time limit plus ``running_grace_seconds`` lost its
   worker: the child was killed at the hard limit, crashed (a poison image that kills it every
   time), or the host died. Its message, if redelivered, was skipped, because a running case cannot
   be claimed. It goes back to ``queued`` (and is published at once) while attempts remain, else it
   ends ``failed`` with ``timeout`` and a message that names the attempts: attempts are counted in
   Postgres at each claim, so a poison case stops after ``max_attempts`` instead of looping. Both
   transitions are fenced by the attempt number, so a late worker can never overwrite them.
2. A case ``queued`` for longer than ``requeue_grace_seconds`` whose message is in none of the
   broker's lists (the publish failed while Redis was down, Redis restarted without its data, an
   operator flushed it) is published again. Messages still waiting are left alone, so a long backlog
   is not duplicated; a duplicate that slips through is harmless (the task claims the case first).
3. A completion callback still pending long after its last attempt lost its message too: it is
   published again (see :mod:`core.callbacks`).

Exactly one result per case is the database's rule (``results.case_id`` is the primary key, and
every worker transition is fenced), not the sweeper's.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import redis
from celery import Celery
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from core import callbacks, case_states
from core.config import Settings
from core.models import Case, CaseStatus
from core.publisher import publish_callback, publish_classify
from core.queueing import QUEUE_CASES, queue_lists

log = logging.getLogger("dermq.recovery")
BATCH = 500


@dataclass
class SweepReport:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    republished: list[str] = field(default_factory=list)
    broker_checked: bool = False
    #: callbacks of the cases failed in this sweep: publish them once the sweep has committed
    callbacks: list[str] = field(default_factory=list)
    callbacks_republished: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "requeued": len(self.requeued),
            "failed": len(self.failed),
            "republished": len(self.republished),
            "broker_checked": self.broker_checked,
            "callbacks_republished": len(self.callbacks_republished),
        }


def _case_id_of(raw: bytes | str) -> str | None:
    """The case id in a kombu Redis message (a JSON envelope whose headers name the task and args)."""
    try:
        message = json.loads(raw)
        if isinstance(message, list):  # the unacked hash stores [message, exchange, routing_key]
            message = message[0]
        headers = message.get("headers") or {}
        if headers.get("task") != "dermq.classify":
            return None
        args = headers.get("argsrepr") or ""
        return str(uuid.UUID(args.strip("[]()'\" ,")))
    except (ValueError, TypeError, AttributeError, KeyError, IndexError):
        return None


def broker_case_ids(client: redis.Redis) -> set[str]:
    """Ids of every case with a classify message waiting or delivered-but-unacknowledged."""
    found: set[str] = set()
    for name in queue_lists(QUEUE_CASES):
        start = 0
        while True:
            chunk = client.lrange(name, start, start + 999)
            if not chunk:
                break
            found.update(cid for cid in map(_case_id_of, chunk) if cid)
            start += len(chunk)
    for raw in client.hvals("unacked"):
        cid = _case_id_of(raw)
        if cid:
            found.add(cid)
    return found


def recover_running(session: Session, settings: Settings, report: SweepReport, at: datetime) -> None:
    cutoff = at - timedelta(seconds=settings.task_time_limit + settings.running_grace_seconds)
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
                if callbacks.note_finished(session, case.id):
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
    """Publish queued cases whose message the broker does not hold: those untouched since ``cutoff``,
    or exactly ``ids`` (cases the sweeper has just put back in the queue)."""
    query = select(Case).where(Case.status == CaseStatus.QUEUED.value)
    if ids is not None:
        query = query.where(Case.id.in_([uuid.UUID(i) for i in ids]))
    if cutoff is not None:
        query = query.where(Case.updated_at < cutoff, or_(Case.published_at.is_(None), Case.published_at < cutoff))
    targets = session.scalars(query.order_by(Case.created_at).limit(BATCH).with_for_update(skip_locked=True)).all()
    if not targets:
        return
    waiting: set[str] = set()
    if broker is not None:
        try:
            waiting = broker_case_ids(broker)
            report.broker_checked = True
        except redis.RedisError as exc:
            log.warning("broker unreachable; nothing republished this round", extra={"error": type(exc).__name__})
            return
    published = []
    for case in targets:
        if str(case.id) in waiting:
            continue
        if not publish_classify(publisher, case.id, case.priority):
            break  # the broker is down: try again next round
        published.append(case.id)
        report.republished.append(str(case.id))
    case_states.mark_published(session, published)


def republish_callbacks(
    session: Session, settings: Settings, publisher: Celery, report: SweepReport, at: datetime
) -> None:
    """Publish again the pending callbacks nobody has touched for longer than any retry waits."""
    cutoff = at - timedelta(seconds=callbacks.stale_after_seconds(settings))
    published = []
    for case_id in callbacks.stale_deliveries(session, cutoff, BATCH):
        if not publish_callback(publisher, case_id):
            break  # the broker is down: the rest stay stale for the next round
        published.append(case_id)
        report.callbacks_republished.append(str(case_id))
    callbacks.touch_deliveries(session, published)


def sweep(session: Session, settings: Settings, publisher: Celery, broker: redis.Redis | None) -> SweepReport:
    report = SweepReport()
    at = datetime.now(UTC)
    recover_running(session, settings, report, at)
    session.flush()
    if report.requeued:
        # Published now rather than after another grace period, and without asking the broker: a
        # message of theirs still in the unacknowledged hash belongs to the worker that was lost and
        # would come back only after the visibility timeout. A duplicate is harmless (claim first).
        republish_lost(session, publisher, None, report, ids=report.requeued)
    republish_lost(session, publisher, broker, report, cutoff=at - timedelta(seconds=settings.requeue_grace_seconds))
    republish_callbacks(session, settings, publisher, report, at)
    if report.requeued or report.failed or report.republished or report.callbacks_republished:
        log.info("sweep", extra={"event": "sweep", **report.to_dict()})
    return report

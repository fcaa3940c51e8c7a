"""Companion messages: once a batch has claimed cases, their own messages stop in the worker's main
process (:mod:`worker.companions`) instead of each going through a child, and a mark that outlives
its purpose costs a case time, never the case.

The real-worker tests run on a broker of their own (``private_broker``: no other test's worker takes
these messages) and a database of their own (``own_database``: their batches find no other test's
queued cases)."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
import redis
from kombu import Message
from sqlalchemy import select

from core.db import session_scope
from core.models import Case
from core.publisher import make_publisher
from core.queueing import queue_lists
from tests import processes, support
from tests.conftest import case_store, new_tenant
from worker import companions
from worker.batching import run_batch
from worker.tasks import sweep_once

pytestmark = pytest.mark.usefixtures("database", "empty_queue")


def _worker(stack_env, stack_dir: Path, settings, broker_url: str, name: str, **extra: str) -> processes.Worker:  # type: ignore[no-untyped-def]
    env = {
        **stack_env,
        "DERMQ_DATABASE_URL": settings.database_url,
        "DERMQ_REDIS_URL": broker_url,
        "DERMQ_WORKER_METRICS_PORT": "0",
        **extra,
    }
    return processes.start_worker(env, stack_dir / f"{name}.log", concurrency=1, queues="cases")


def _classify_runs(worker: processes.Worker) -> int:
    """How many classify messages the worker handed to its child (Celery's own count)."""
    return int(worker.stats().get("total", {}).get("dermq.classify", 0))


def _waiting(broker: redis.Redis) -> int:
    """Messages still in the cases queue, every priority's list counted."""
    return sum(broker.llen(name) for name in queue_lists())


def _statuses(settings, ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:  # type: ignore[no-untyped-def]
    with session_scope(settings) as session:
        return {
            case_id: status for case_id, status in session.execute(select(Case.id, Case.status).where(Case.id.in_(ids)))
        }


@pytest.mark.slow
def test_one_message_runs_per_batch_and_every_case_is_answered(
    own_database, keyring, stack_env, stack_dir: Path, jpeg_bytes: bytes, private_broker
) -> None:  # type: ignore[no-untyped-def]
    """A backlog of 6 cases and their 6 messages, then a worker: its first batch takes all six, and
    the five other messages never reach its child (before, each was traced, sent three events to
    Flower and read the database, for nothing)."""
    settings, tenant = own_database, new_tenant(own_database, keyring)
    store_case = case_store(settings, keyring)
    publisher = make_publisher(settings.model_copy(update={"redis_url": private_broker.url}))
    ids = [store_case(tenant, jpeg_bytes) for _ in range(6)]
    for case_id in ids:
        assert support.publish_classify(publisher, case_id)
    worker = _worker(stack_env, stack_dir, settings, private_broker.url, "companions-worker")
    try:
        support.wait_for(
            lambda: set(_statuses(settings, ids).values()) == {"succeeded"}, timeout=120, what="the backlog"
        )
        broker = redis.Redis.from_url(private_broker.url)
        support.wait_for(lambda: _waiting(broker) == 0, timeout=30, what="the messages to be taken")
        with session_scope(settings) as session:
            batches = len(set(session.scalars(select(Case.started_at).where(Case.id.in_(ids)))))
        assert batches < len(ids)  # a batch of them did form
        assert _classify_runs(worker) == batches
    finally:
        worker.stop()


@pytest.mark.slow
def test_a_message_skipped_on_a_leftover_mark_loses_no_case(
    own_database, keyring, stack_env, stack_dir: Path, jpeg_bytes: bytes, private_broker
) -> None:  # type: ignore[no-untyped-def]
    """A case still queued but marked (a batch that put it back could not clear its mark): its message
    is dropped, and the sweeper, which sends a queued case without a message again only after
    ``requeue_grace_seconds``, sends it once the mark (at most half that long) has gone."""
    grace = 6.0  # the mark lives 3 s: an idle worker takes the message well within that
    settings = own_database.model_copy(update={"requeue_grace_seconds": grace, "redis_url": private_broker.url})
    tenant, store_case = new_tenant(settings, keyring), case_store(settings, keyring)
    worker = _worker(
        stack_env, stack_dir, settings, private_broker.url, "leftover-worker", DERMQ_REQUEUE_GRACE_SECONDS=str(grace)
    )
    broker = redis.Redis.from_url(private_broker.url)
    try:
        case_id = store_case(tenant, jpeg_bytes)
        assert companions.mark_seconds(settings) == grace / 2
        companions.mark(settings, [case_id])  # settings.redis_url is the private broker
        assert support.publish_classify(make_publisher(settings), case_id)
        support.wait_for(lambda: _waiting(broker) == 0, timeout=30, what="the message to be taken")
        assert _statuses(settings, [case_id]) == {case_id: "queued"}
        assert _classify_runs(worker) == 0  # dropped in the main process, not run
        time.sleep(grace)
        report = sweep_once(settings, make_publisher(settings), broker)
        assert report["republished"] == 1
        support.wait_for(lambda: _statuses(settings, [case_id]) == {case_id: "succeeded"}, timeout=60, what="the case")
    finally:
        worker.stop()


def test_a_batch_marks_its_companions_and_clears_the_marks_of_cases_it_puts_back(
    own_database, keyring, fixture_images, redis_client
) -> None:  # type: ignore[no-untyped-def]
    """The marks name the cases the batch took besides its own, live at most ``mark_seconds``, and are
    gone once a stopped batch has put those cases back in the queue (their messages must run)."""
    from sqlalchemy import Engine, event
    from sqlalchemy.exc import OperationalError

    settings = own_database.model_copy(update={"batching": "on", "batch_max_size": 4, "batch_max_wait_ms": 0})
    tenant, store_case = new_tenant(settings, keyring), case_store(settings, keyring)
    images = [fixture_images[k].read_bytes() for k in sorted(fixture_images)[:3]]
    ids = [store_case(tenant, data) for data in images]
    seen: dict[str, float] = {}

    def storing(_conn, _cursor, statement: str, *_args) -> None:  # type: ignore[no-untyped-def]
        if "INSERT INTO RESULTS" in statement.upper():  # the marks as the batch stores (core.deferred may lead)
            seen.update({str(case_id): redis_client.pttl(companions.key(case_id)) / 1000 for case_id in ids})

    event.listen(Engine, "before_cursor_execute", storing)
    try:
        with support.connection_lost_on(settings, "results"), pytest.raises(OperationalError):
            run_batch(settings, ids[0])
        assert len(seen) == len(ids)  # the batch got as far as storing
        assert seen[str(ids[0])] < 0  # the lead case's own message is the one running: no mark
        assert all(0 < seen[str(i)] <= companions.mark_seconds(settings) for i in ids[1:]), seen
        assert not any(redis_client.exists(companions.key(i)) for i in ids)
        assert _statuses(settings, ids[1:]) == dict.fromkeys(ids[1:], "queued")
    finally:
        event.remove(Engine, "before_cursor_execute", storing)
        redis_client.delete(*(companions.key(i) for i in ids))


@pytest.mark.parametrize(
    ("payload", "skippable"),
    [
        ([["6f1c2a1e-0000-4000-8000-000000000001"], {}, {}], True),
        ([["6f1c2a1e-0000-4000-8000-000000000001"], {"requeue_attempt": 1}, {}], False),  # a retry always runs
        ([[], {}, {}], False),
        ({"args": ["x"]}, False),
    ],
)
def test_only_a_first_try_message_can_be_skipped(payload: object, skippable: bool) -> None:
    message = Message(body=json.dumps(payload), content_type="application/json", content_encoding="utf-8")
    assert (companions._plain_case_id(message) is not None) is skippable

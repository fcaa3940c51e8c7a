"""Urgent cases overtake a routine backlog: Redis priority lists, ``queue_order_strategy: priority``
and a prefetch of one, proven with a real worker on a broker of its own (a private redis-server, so
that no other test's worker takes these messages) and a database of its own (so that its batches
find no other test's queued cases)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from core.db import session_scope
from core.models import Case
from core.publisher import make_publisher
from tests import processes, support
from tests.conftest import case_store, new_tenant

pytestmark = [pytest.mark.usefixtures("database"), pytest.mark.slow]


def test_urgent_cases_are_served_before_a_routine_backlog(
    own_database, keyring, stack_env, stack_dir: Path, jpeg_bytes: bytes, private_broker
) -> None:  # type: ignore[no-untyped-def]
    """With the default dynamic batches: the first message out of Redis is an urgent one, and its
    batch claims the urgent cases first; no routine case starts before an urgent one."""
    settings, tenant, store_case = own_database, new_tenant(own_database, keyring), case_store(own_database, keyring)
    broker = private_broker  # a redis-server of this module's own: no other worker takes these messages
    worker = None
    try:
        publisher = make_publisher(settings.model_copy(update={"redis_url": broker.url}))
        routine = [store_case(tenant, jpeg_bytes, "routine") for _ in range(20)]
        urgent = [store_case(tenant, jpeg_bytes, "urgent") for _ in range(5)]
        for case_id in routine:  # the backlog first, while no worker runs
            assert support.publish_classify(publisher, case_id, "routine")
        for case_id in urgent:
            assert support.publish_classify(publisher, case_id, "urgent")

        env = {
            **stack_env,
            "DERMQ_DATABASE_URL": settings.database_url,
            "DERMQ_REDIS_URL": broker.url,
            "DERMQ_WORKER_METRICS_PORT": "0",
        }
        worker = processes.start_worker(env, stack_dir / "priorities-worker.log", concurrency=1)
        every = routine + urgent

        def started() -> dict | None:
            with session_scope(settings) as session:
                rows = session.execute(select(Case.id, Case.status, Case.started_at).where(Case.id.in_(every))).all()
            if any(status != "succeeded" for _, status, _ in rows):
                return None
            return {case_id: started_at for case_id, _, started_at in rows}

        at = support.wait_for(started, timeout=240, interval=0.5, what="the backlog to drain")
        # cases claimed in one batch share their start time; urgent ones must never start later
        assert max(at[c] for c in urgent) <= min(at[c] for c in routine), sorted(
            ("U" if c in urgent else "r", at[c]) for c in every
        )
    finally:
        if worker is not None:
            worker.stop()


def test_callbacks_wait_on_a_queue_no_classification_worker_reads(settings, private_broker) -> None:  # type: ignore[no-untyped-def]
    # They shared the maintenance queue with the sweeper and the sealer, which a classification worker
    # reads: each attempt held one of its children while a clinic's slow receiver took its time, and
    # behind a backlog of them the periodic tasks waited until their messages expired.
    import uuid

    from core.publisher import callback_task, send
    from core.queueing import QUEUE_CALLBACKS, QUEUE_CASES, QUEUE_MAINTENANCE, TASK_CALLBACK
    from worker.celery_app import create_app

    app = create_app(settings.model_copy(update={"redis_url": private_broker.url}))
    schedule = app.conf.beat_schedule
    for _ in range(5):  # as the outbox sends them
        assert send(app, callback_task(uuid.uuid4()))
    for entry in ("sweep", "audit-seal"):
        app.send_task(schedule[entry]["task"], **schedule[entry]["options"])
    taken: dict[str, list[str]] = {}
    with app.connection_for_read() as connection:
        channel = connection.default_channel
        for queue in (QUEUE_CASES, QUEUE_MAINTENANCE, QUEUE_CALLBACKS):  # as a worker takes them, until none is left
            taken[queue] = []
            while (message := channel.basic_get(queue, no_ack=True)) is not None:
                taken[queue].append(message.headers["task"])
    assert taken == {
        QUEUE_CASES: [],
        QUEUE_MAINTENANCE: [schedule["sweep"]["task"], schedule["audit-seal"]["task"]],
        QUEUE_CALLBACKS: [TASK_CALLBACK] * 5,
    }


def test_the_sweeper_goes_ahead_of_a_surge_of_urgent_cases(settings, private_broker) -> None:  # type: ignore[no-untyped-def]
    """A worker reads Redis step by step and, within a step, queue by queue in its --queues order
    (cases, then maintenance). Urgent cases shared step 0 with the periodic tasks and came first: a
    surge of them kept the sweeper and the sealer waiting until their messages expired. Taken here as
    a worker takes them: one consumer of both queues, in that order."""
    import uuid

    from core.queueing import QUEUE_CASES, QUEUE_MAINTENANCE, TASK_CLASSIFY
    from worker.celery_app import create_app

    app = create_app(settings.model_copy(update={"redis_url": private_broker.url}))
    for _ in range(5):  # the surge, already waiting
        assert support.publish_classify(app, uuid.uuid4(), "urgent")
    schedule = app.conf.beat_schedule
    app.send_task(schedule["sweep"]["task"], **schedule["sweep"]["options"])
    assert support.publish_classify(app, uuid.uuid4(), "routine")
    taken: list[str] = []
    queues = [app.amqp.queues[QUEUE_CASES], app.amqp.queues[QUEUE_MAINTENANCE]]  # the workers' --queues order
    with (
        app.connection_for_read() as connection,
        connection.Consumer(queues, callbacks=[lambda _, message: taken.append(message.headers["task"])]),
    ):
        while len(taken) < 7:
            connection.drain_events(timeout=5)
    assert taken == [schedule["sweep"]["task"], *[TASK_CLASSIFY] * 6]


def test_a_worker_whose_clock_runs_a_minute_ahead_of_beats_still_runs_every_periodic_task(settings) -> None:  # type: ignore[no-untyped-def]
    """Beat stamps each periodic message's expiry by its own clock, a worker judges it by its own: with
    an expiry of one interval, a worker 30 s ahead dropped every sweep (1 s ahead, every seal)."""
    from worker.celery_app import celery_config

    for name, entry in celery_config(settings)["beat_schedule"].items():
        assert entry["options"]["expires"] >= entry["schedule"] + 60, name

"""A callback whose delivery row another transaction holds locked: its message looks again, later each
time, a bounded number of times, then ends and leaves the delivery to the sweeper, which sends it
again once the row is free. A real callback worker, on a database and a redis-server of this module's
own, and a session outside dermq holding the row."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from sqlalchemy import select, update

from core import audit, callback_pacing, callbacks, case_states, recovery
from core.config import Settings
from core.db import get_engine, session_scope
from core.keys import Principal
from core.models import CallbackDelivery, Role
from core.publisher import make_publisher
from core.queueing import QUEUE_CALLBACKS, TASK_CALLBACK
from tests import processes, support
from tests.api.test_callbacks import Receiver
from tests.conftest import Tenant, own_database_fixtures

pytestmark = pytest.mark.usefixtures("database")

tenant, store_case = own_database_fixtures()

#: the looks this module's callback worker takes at a held row (DERMQ_CALLBACK_HELD_LOOKS; 8 by default)
LOOKS = 3


@contextmanager
def callback_worker(
    own_database: Settings, private_broker, stack_env: dict[str, str], log: Path, **settings: float
) -> Iterator[tuple]:  # type: ignore[no-untyped-def,type-arg]
    """(settings, a callback worker) on the module's database and broker, with ``settings`` (their
    ``DERMQ_`` variables set for the worker too)."""
    config = own_database.model_copy(update={"redis_url": private_broker.url, **settings})
    env = {
        **stack_env,
        "DERMQ_DATABASE_URL": config.database_url,
        "DERMQ_REDIS_URL": config.redis_url,
        **{f"DERMQ_{name.upper()}": str(value) for name, value in settings.items()},
        "DERMQ_WORKER_METRICS_PORT": "0",
    }
    worker = processes.start_worker(env, log, name=log.stem, app="worker.callbacks_app", queues="callbacks")
    try:
        yield config, worker
    finally:
        worker.stop()


@pytest.fixture(scope="module")
def stack(own_database: Settings, private_broker, stack_env: dict[str, str], stack_dir: Path) -> Iterator[tuple]:  # type: ignore[no-untyped-def,type-arg]
    """(settings, the callback worker) on the module's database and broker."""
    with callback_worker(
        own_database, private_broker, stack_env, stack_dir / "callbacks-held.log", callback_held_looks=LOOKS
    ) as running:
        yield running


def pending_with_lost_message(config: Settings, keyring, tenant: Tenant, store_case, url: str) -> uuid.UUID:  # type: ignore[no-untyped-def]
    """A failed case of a clinic whose callback is ``url``: its delivery pending, its message lost (sent
    to a database of the broker that no worker reads)."""
    nowhere = make_publisher(config.model_copy(update={"redis_url": config.redis_url.rsplit("/", 1)[0] + "/1"}))
    case_id = store_case(tenant, b"finished")
    principal = Principal(tenant.key_id, Role.CLINIC, tenant.clinic_id)
    with session_scope(config) as session:
        callbacks.register(session, keyring=keyring, settings=config, principal=principal, actor=audit.SYSTEM, url=url)
        assert case_states.fail_case(session, case_id=case_id, attempt=None, code="invalid_image", message="no")
        assert callbacks.note_finished(session, case_id, publisher=nowhere)
    return case_id


def _row(config: Settings, case_id: uuid.UUID) -> CallbackDelivery:
    with session_scope(config) as session:
        found = session.get(CallbackDelivery, case_id)
        assert found is not None
        return found


def _sweep(config: Settings, broker: redis.Redis) -> recovery.SweepReport:
    with session_scope(config) as session:
        return recovery.sweep(session, config, make_publisher(config), broker)


def test_a_callback_whose_row_stays_held_stops_looking_and_is_swept_once_the_row_is_free(
    stack, keyring, tenant: Tenant, store_case
) -> None:  # type: ignore[no-untyped-def]
    # The message looked again a second later, whatever held the row: while a session outside dermq
    # held it, the message came back once a second for ever (a worker thread's turn, a lease query
    # and a log line each time).
    config, worker = stack
    broker = redis.Redis.from_url(config.redis_url)
    # the series an operator's alert reads is there before its first count (increase() skips a
    # series' first sample: the first message to stop looking went unseen in each worker process)
    series = ("dermq_callback_deliveries_total", (("outcome", "held_too_long"),))
    support.wait_for(lambda: series in worker.metrics(), timeout=30, what="the worker's callback metrics")
    server = Receiver([])
    try:
        case_id = pending_with_lost_message(config, keyring, tenant, store_case, server.url)
        stale = datetime.now(UTC) - timedelta(seconds=config.requeue_grace_seconds + 60)
        with session_scope(config) as session:  # untouched for long: the sweeper's once its message is gone
            session.execute(
                update(CallbackDelivery).where(CallbackDelivery.case_id == case_id).values(updated_at=stale)
            )
        with get_engine(config).connect() as outside:  # a session someone left open, holding the row
            outside.execute(
                select(CallbackDelivery.case_id).where(CallbackDelivery.case_id == case_id).with_for_update()
            )
            make_publisher(config).send_task(TASK_CALLBACK, args=[str(case_id)], queue=QUEUE_CALLBACKS, priority=6)
            support.wait_for(
                lambda: worker.metric("dermq_callback_deliveries_total", outcome="held_too_long") == 1,
                timeout=60,
                interval=0.2,
                what="the message to stop looking at the held row",
            )
            assert worker.metric("dermq_callback_deliveries_total", outcome="held") == LOOKS - 1
            # its message is done: none waits in the broker or in the worker
            support.wait_for(
                lambda: str(case_id) not in recovery.broker_case_ids(broker, QUEUE_CALLBACKS, TASK_CALLBACK),
                timeout=30,
                what="the message to be acknowledged",
            )
            # ...and the delivery is not lost: still pending, nothing attempted; the sweeper leaves a
            # row it cannot lock for a later sweep
            held = _row(config, case_id)
            assert (held.status, held.attempts, held.leased_until) == ("pending", 0, None)
            assert _sweep(config, broker).callbacks_republished == []
            outside.rollback()
        assert _sweep(config, broker).callbacks_republished == [str(case_id)]  # the row free: sent again
        done = support.wait_for(
            lambda: (row := _row(config, case_id)).status != "pending" and row,
            timeout=60,
            interval=0.2,
            what="the swept callback to be delivered",
        )
        assert (done.status, done.attempts, len(server.calls)) == ("delivered", 1, 1)
    finally:
        server.close()
        broker.close()


def test_the_looks_at_a_held_row_wait_longer_each_time_and_are_bounded(settings: Settings) -> None:
    waits = [callback_pacing.held_seconds(settings, looks) for looks in range(1, settings.callback_held_looks + 1)]
    assert settings.callback_held_looks == 8  # the default
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, None]  # about two minutes, then the sweeper's
    short = settings.model_copy(update={"callback_backoff_max_seconds": 5.0, "callback_held_looks": 30})
    assert max(w for looks in range(1, 30) if (w := callback_pacing.held_seconds(short, looks))) == 5.0
    assert callback_pacing.held_seconds(short, 30) is None

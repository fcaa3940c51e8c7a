"""The sweeper and a callback whose first message was lost (the publish after the case's commit never
reached Redis, or Redis lost it): sent again once it has been untouched for ``requeue_grace_seconds``,
as a queued case is, while the callbacks a worker holds for their clinic's turn, as untouched and
never attempted, are left to their own messages. A real callback worker, on a database and a
redis-server of this module's own."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from core import recovery
from core.config import Settings
from core.db import session_scope
from core.models import CallbackDelivery
from core.publisher import make_publisher
from core.queueing import QUEUE_CALLBACKS, TASK_CALLBACK
from tests import support
from tests.api.test_callbacks import Receiver
from tests.conftest import Tenant, own_database_fixtures
from tests.worker.test_callback_held import callback_worker, pending_with_lost_message

pytestmark = pytest.mark.usefixtures("database")

tenant, store_case = own_database_fixtures()

#: the sweeper's grace here (DERMQ_REQUEUE_GRACE_SECONDS; 60 by default)
GRACE = 3.0
#: the callback timeout of this module's worker: a held request is not given up on during a test
TIMEOUT = 20


@pytest.fixture(scope="module")
def stack(own_database: Settings, private_broker, stack_env: dict[str, str], stack_dir: Path) -> Iterator[tuple]:  # type: ignore[no-untyped-def,type-arg]
    """(settings, the callback worker) on the module's database and broker."""
    log = stack_dir / "callbacks-lost.log"
    settings = {"requeue_grace_seconds": GRACE, "callback_timeout_seconds": TIMEOUT}
    with callback_worker(own_database, private_broker, stack_env, log, **settings) as running:
        yield running


def _sweep(config: Settings, broker: redis.Redis) -> list[str]:
    with session_scope(config) as session:
        report = recovery.sweep(session, config, make_publisher(config), broker)
    return report.callbacks_republished


def _delivered(config: Settings, case_ids: list[uuid.UUID]) -> list[CallbackDelivery] | None:
    with session_scope(config) as session:
        rows = [session.get(CallbackDelivery, case_id) for case_id in case_ids]
    return rows if all(row is not None and row.status == "delivered" for row in rows) else None  # type: ignore[return-value]


def _posts(server: Receiver, case_id: uuid.UUID) -> int:
    return sum(1 for call in server.calls if json.loads(call["body"])["case_id"] == str(case_id))  # type: ignore[arg-type]


def test_a_callback_whose_first_message_was_lost_is_sent_again_after_the_grace(
    stack, keyring, tenant: Tenant, store_case
) -> None:  # type: ignore[no-untyped-def]
    # Only a delivery untouched for longer than any retry's backoff (280 s by default) was sent again:
    # a never-attempted one whose first message was lost reached the clinic four and a half minutes
    # after its case ended, where a queued case's lost message is sent again after a minute.
    config, _worker = stack
    broker = redis.Redis.from_url(config.redis_url)
    server = Receiver([])
    try:
        case_id = pending_with_lost_message(config, keyring, tenant, store_case, server.url)
        assert _sweep(config, broker) == []  # fresh: its own message may still be on its way
        time.sleep(GRACE + 0.5)
        assert _sweep(config, broker) == [str(case_id)]
        (row,) = support.wait_for(
            lambda: _delivered(config, [case_id]), timeout=30, interval=0.2, what="the callback to be delivered"
        )
        assert (row.attempts, _posts(server, case_id)) == (1, 1)
    finally:
        server.close()
        broker.close()


def test_callbacks_a_worker_holds_for_their_clinics_turn_are_not_sent_again(
    stack, keyring, tenant: Tenant, store_case
) -> None:  # type: ignore[no-untyped-def]
    # A clinic's callbacks waiting their turn at its slow receiver are as untouched and unattempted as
    # a lost one, for as long as the receiver takes: their messages, which a worker holds until they
    # look again, are what tells them apart. A copy would be one more message looking, never a second
    # notice (the lease lets one attempt out once), but none is sent.
    config, worker = stack
    broker = redis.Redis.from_url(config.redis_url)
    server = Receiver([], hold=True)
    callbacks_ = 5
    try:
        case_ids = [
            pending_with_lost_message(config, keyring, tenant, store_case, server.url) for _ in range(callbacks_)
        ]
        deferred = worker.metric("dermq_callback_deliveries_total", outcome="deferred")
        publisher = make_publisher(config)
        for case_id in case_ids:  # their own messages, to the worker
            publisher.send_task(TASK_CALLBACK, args=[str(case_id)], queue=QUEUE_CALLBACKS, priority=6)
        waiting = callbacks_ - config.callback_clinic_concurrency
        support.wait_for(
            lambda: (
                len(server.calls) == config.callback_clinic_concurrency
                and worker.metric("dermq_callback_deliveries_total", outcome="deferred") >= deferred + waiting
            ),
            timeout=30,
            interval=0.2,
            what="the clinic's receiver to be full and its other callbacks to wait their turn",
        )
        time.sleep(GRACE + 0.5)  # every waiting one untouched past the grace, its first message held
        with session_scope(config) as session:
            untouched = [session.get(CallbackDelivery, case_id) for case_id in case_ids]
        assert sorted(row.attempts for row in untouched) == [0] * waiting + [1] * config.callback_clinic_concurrency  # type: ignore[union-attr]
        for _ in range(3):
            assert _sweep(config, broker) == []
        server.release()
        rows = support.wait_for(
            lambda: _delivered(config, case_ids),
            timeout=60,
            interval=0.2,
            what="the clinic's callbacks to be delivered",
        )
        assert [(row.attempts, _posts(server, row.case_id)) for row in rows] == [(1, 1)] * callbacks_
    finally:
        server.close()
        broker.close()

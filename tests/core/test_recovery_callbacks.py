"""The sweeper and callbacks waiting their turn at a clinic's slow receiver (core.callback_pacing):
their messages are held by a worker, their rows stay untouched, and a sweep looks past them for the
lost ones, against the real database and a private redis-server."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
import redis
from sqlalchemy import update

from core import callbacks, recovery
from core.config import Settings
from core.db import session_scope
from core.models import CallbackDelivery, ClinicCallback
from core.queueing import QUEUE_CALLBACKS, queue_lists
from tests import support
from tests.conftest import Tenant, own_database_fixtures
from tests.core.test_recovery import callback_messages, finished_with_callback, sweep, sweeping

pytestmark = pytest.mark.usefixtures("database")

tenant, store_case = own_database_fixtures()
__all__ = ["store_case", "sweeping", "tenant"]  # fixtures this module uses


def test_a_lost_callback_behind_a_sweeps_worth_of_waiting_ones_is_published_again(
    sweeping, own_database: Settings, keyring, tenant: Tenant, store_case, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    # A clinic's callbacks waiting their turn keep their first message (held by a worker) and their
    # row untouched: the oldest untouched rows. A sweep read one page of them, found every message
    # waiting, and stopped; another clinic's lost callback behind them waited until the backlog drained.
    monkeypatch.setattr(recovery, "BATCH", 2)  # a sweep's page: two rows here, 500 in production
    _, publisher, client = sweeping
    waiting = [finished_with_callback(own_database, keyring, tenant, store_case, publisher) for _ in range(3)]
    lost = finished_with_callback(own_database, keyring, tenant, store_case, publisher)
    stale = datetime.now(UTC) - timedelta(seconds=own_database.requeue_grace_seconds + 60)
    with session_scope(own_database) as session:  # untouched for long, the lost one the newest
        for offset, case_id in enumerate([*waiting, lost]):
            session.execute(
                update(CallbackDelivery)
                .where(CallbackDelivery.case_id == case_id)
                .values(updated_at=stale + timedelta(seconds=offset))
            )
    for name in queue_lists(QUEUE_CALLBACKS):  # the lost one's message is gone; the others' wait
        for raw in client.lrange(name, 0, -1):
            if str(lost).encode() in raw:
                client.lrem(name, 0, raw)
    assert callback_messages(client, lost) == 0

    report = sweep(sweeping)
    assert report.callbacks_republished == [str(lost)]
    assert callback_messages(client, lost) == 1
    assert [callback_messages(client, case_id) for case_id in waiting] == [1, 1, 1]  # no copies
    with session_scope(own_database) as session:
        session.delete(session.get(ClinicCallback, tenant.clinic_id))


def test_a_retry_whose_message_was_lost_is_sent_again_once_due_for_the_grace_not_before(
    sweeping, own_database: Settings, keyring, tenant: Tenant, store_case
) -> None:  # type: ignore[no-untyped-def]
    # A retry waiting out its backoff keeps its message in a worker until it is due: not sent again
    # before then. Once due, it was sent again only 280 s after the attempt before it, whatever its backoff.
    _, publisher, client = sweeping
    case_id = finished_with_callback(own_database, keyring, tenant, store_case, publisher)
    client.delete(*queue_lists(QUEUE_CALLBACKS))  # its message lost
    grace = own_database.requeue_grace_seconds
    attempted = datetime.now(UTC) - timedelta(seconds=grace + 30)

    def retry_due_in(seconds: float) -> None:
        due = datetime.now(UTC) + timedelta(seconds=seconds)
        _set_delivery(own_database, case_id, attempts=1, updated_at=attempted, next_attempt_at=due)

    retry_due_in(60)  # still waiting out its backoff
    assert str(case_id) not in sweep(sweeping).callbacks_republished
    retry_due_in(-grace + 5)  # due, for less than the grace
    assert str(case_id) not in sweep(sweeping).callbacks_republished
    retry_due_in(-grace - 1)
    assert sweep(sweeping).callbacks_republished == [str(case_id)]
    assert callback_messages(client, case_id) == 1
    with session_scope(own_database) as session:
        session.delete(session.get(ClinicCallback, tenant.clinic_id))


def test_a_sweep_that_cannot_ask_the_broker_sends_only_what_no_retry_can_still_be_waiting_for(
    sweeping, own_database: Settings, keyring, tenant: Tenant, store_case
) -> None:  # type: ignore[no-untyped-def]
    # Without the broker's word, the grace of a minute would double a callback waiting its turn, held by
    # a worker, each minute: those sent unchecked are the ones untouched for longer than any retry waits.
    config, publisher, client = sweeping
    case_id = finished_with_callback(own_database, keyring, tenant, store_case, publisher)
    client.delete(*queue_lists(QUEUE_CALLBACKS))
    unreachable = redis.Redis(port=support.free_port(), socket_connect_timeout=1)

    def untouched_for(seconds: float) -> recovery.SweepReport:
        _set_delivery(own_database, case_id, updated_at=datetime.now(UTC) - timedelta(seconds=seconds))
        with session_scope(config) as session:
            return recovery.sweep(session, config, publisher, unreachable)

    assert untouched_for(own_database.requeue_grace_seconds + 1).callbacks_republished == []
    assert untouched_for(callbacks.unchecked_after_seconds(own_database) + 1).callbacks_republished == [str(case_id)]
    assert callback_messages(client, case_id) == 1
    with session_scope(own_database) as session:
        session.delete(session.get(ClinicCallback, tenant.clinic_id))


def _set_delivery(settings: Settings, case_id: uuid.UUID, **values: object) -> None:
    """Set ``values`` on the case's callback delivery row, as time and attempts would have."""
    with session_scope(settings) as session:
        session.execute(update(CallbackDelivery).where(CallbackDelivery.case_id == case_id).values(**values))

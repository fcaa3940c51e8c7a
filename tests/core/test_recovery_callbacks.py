"""The sweeper and callbacks waiting their turn at a clinic's slow receiver (core.callback_pacing):
their messages are held by a worker, their rows stay untouched, and a sweep looks past them for the
lost ones, against the real database and a private redis-server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from core import callbacks, recovery
from core.config import Settings
from core.db import session_scope
from core.models import CallbackDelivery, ClinicCallback
from core.queueing import QUEUE_CALLBACKS, queue_lists
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
    stale = datetime.now(UTC) - timedelta(seconds=callbacks.stale_after_seconds(own_database) + 60)
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

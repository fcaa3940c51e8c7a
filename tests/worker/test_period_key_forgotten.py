"""A worker child forgets a destroyed period's key within seconds, whatever its traffic.

A child that classified a case of a period holds the period's key (it opened the image and sealed the
result under it). Retention destroys the key only once every case of the period is purged, so no task
asks for it again: the child kept it until it opened another period's key, and a dump of its memory
opened every backup of the period. Its watcher looks for the destroyed periods among the keys it holds
every FORGET_SECONDS and overwrites their keys. This module's worker runs on a database, a broker and a
period-key folder of its own: the destruction touches no other module's keys."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from core.config import Settings
from core.crypto import Keyring
from core.db import session_scope
from core.held_period_keys import FORGET_SECONDS
from core.models import Case
from core.publisher import make_publisher
from tests import processes, support
from tests.api.test_api_processes import children
from tests.api.test_period_key_forgotten import period_key_of
from tests.conftest import case_store, new_tenant, own_period_keys_fixtures

pytestmark = pytest.mark.usefixtures("database")

own, keyring = own_period_keys_fixtures()


@pytest.fixture(scope="module")
def site(own: Settings, private_broker, stack_env, stack_dir: Path) -> Iterator[tuple[Settings, processes.Worker]]:  # type: ignore[no-untyped-def]
    settings = own.model_copy(update={"redis_url": private_broker.url})
    worker = processes.start_own_worker(settings, stack_env, stack_dir / "period-key-forgotten-worker.log")
    try:
        yield settings, worker
    finally:
        worker.stop()


def test_a_worker_child_forgets_a_destroyed_period_key_without_another_task(  # type: ignore[no-untyped-def]
    site, keyring: Keyring, jpeg_bytes: bytes
) -> None:
    settings, worker = site
    tenant = new_tenant(settings, keyring)
    case_id = case_store(settings, keyring)(tenant, jpeg_bytes)
    support.publish_classify(make_publisher(settings), case_id)

    def status() -> str | None:
        with session_scope(settings) as session:
            case = session.get(Case, case_id)
            assert case is not None
            return case.status if case.status in ("succeeded", "failed") else None

    assert support.wait_for(status, timeout=120, what="the case to be classified") == "succeeded"
    folder, period, key = period_key_of(settings, keyring, case_id)
    holders = [pid for pid in children(worker.proc.pid) if processes.memory_holds(pid, key)]
    assert holders  # the child that opened the image and sealed the result
    folder.destroy(period, reason="retention")  # as retention does, in another process
    support.wait_for(  # no task meanwhile: nothing asks the child for a key
        lambda: not any(processes.memory_holds(pid, key) for pid in holders),
        timeout=3 * FORGET_SECONDS,
        interval=1,
        what="the worker child to forget the destroyed period's key",
    )
    assert all(Path(f"/proc/{pid}").exists() for pid in holders)  # forgotten, not gone with its process

"""A retention step that fails is counted where operators look (``dermq_retention_step_failures_total``,
alert DermqRetentionStepFailing), and beat's purge runs the steps after it all the same.

A real purge acts on every case, period key and callback record of its database and folder: this
module's worker runs on a database, a period-key folder and a broker of its own (the shared worker
never takes its purge, nor it another test's tasks)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from core.config import Settings
from core.crypto import load_keyring
from core.db import session_scope
from core.models import CallbackDelivery
from core.publisher import make_publisher
from core.queueing import TASK_PURGE
from tests import processes, support
from tests.conftest import case_store, new_tenant, own_period_keys_fixtures
from worker.celery_app import PERIODIC

pytestmark = pytest.mark.usefixtures("database")

FAILURES = "dermq_retention_step_failures_total"


@dataclass(frozen=True)
class Site:
    settings: Settings
    worker: processes.Worker

    @property
    def folder(self) -> Path:
        assert self.settings.period_key_folder is not None
        return self.settings.period_key_folder

    def purge(self) -> None:
        make_publisher(self.settings).send_task(TASK_PURGE, **PERIODIC)

    def old_delivery(self) -> uuid.UUID:
        """A callback delivery settled long ago: the purge's last step deletes it."""
        keyring = load_keyring(self.settings)
        tenant = new_tenant(self.settings, keyring)
        case_id = case_store(self.settings, keyring)(tenant, b"called back long ago")
        long_ago = datetime.now(UTC) - timedelta(days=self.settings.callback_history_days + 1)
        with session_scope(self.settings) as session:
            session.add(
                CallbackDelivery(case_id=case_id, clinic_id=tenant.clinic_id, status="delivered", updated_at=long_ago)
            )
        return case_id

    def kept(self, delivery: uuid.UUID) -> bool:
        with session_scope(self.settings) as session:
            return session.get(CallbackDelivery, delivery) is not None


own = own_period_keys_fixtures()[0]  # its keyring is not this module's: its other tests use the shared one


@pytest.fixture(scope="module")
def site(own: Settings, private_broker, stack_env, stack_dir: Path) -> Iterator[Site]:  # type: ignore[no-untyped-def]
    settings = own.model_copy(update={"redis_url": private_broker.url})
    worker = processes.start_own_worker(settings, stack_env, stack_dir / "retention-worker.log", preload=False)
    try:
        yield Site(settings, worker)
    finally:
        worker.stop()


def test_a_failing_retention_step_is_counted_by_step(site: Site) -> None:
    before = site.worker.metrics()
    # every step's series is there from the start: Prometheus's increase() skips a series' first sample
    assert (FAILURES, (("step", "destroy_periods"),)) in set(before)
    stray = site.folder / "2019-08.json"  # a folder where a period's key file should be: destroying it fails
    stray.mkdir()
    delivery = site.old_delivery()
    try:
        site.purge()
        _wait_counted(site, before)
        # the steps after it ran, the last one included
        support.wait_for(lambda: not site.kept(delivery), timeout=60, what="the purge's last step")
    finally:
        stray.rmdir()
        (site.folder / "2019-08.destroyed").unlink(missing_ok=True)  # the tombstone its destruction wrote first
    after = site.worker.metrics()
    for step in ("purge_cases", "prune_field_months", "forget_callback_secrets", "prune_callback_deliveries"):
        assert processes.metric_total(after, FAILURES, step=step) == processes.metric_total(before, FAILURES, step=step)


def test_a_failed_step_is_counted_when_a_later_step_loses_the_database(site: Site) -> None:
    """A lost database connection ends the run (no later step could run; that is no failed step). The
    step that had failed before it was counted only once the whole run returned: never, so the alert
    missed it."""
    before = site.worker.metrics()
    stray = site.folder / "2019-09.json"  # destroy_periods fails, as above
    stray.mkdir()
    delivery = site.old_delivery()
    try:
        # forget_callback_secrets, two steps after destroy_periods, loses its connection
        with support.connection_lost_on(site.settings, "clinic_callbacks", "UPDATE"):
            site.purge()
            _wait_counted(site, before)
            support.wait_for(site.worker.idle, timeout=60, what="the purge to end")
    finally:
        stray.rmdir()
        (site.folder / "2019-09.destroyed").unlink(missing_ok=True)
    assert site.kept(delivery)  # the run ended at the lost connection: its last step never ran
    after = site.worker.metrics()
    for step in ("purge_cases", "prune_field_months", "forget_callback_secrets", "prune_callback_deliveries"):
        assert processes.metric_total(after, FAILURES, step=step) == processes.metric_total(before, FAILURES, step=step)


def test_each_period_whose_key_cannot_be_destroyed_is_counted_and_the_others_are_destroyed(site: Site) -> None:
    """The destruction of expired periods stopped at the first that failed, counted once; the periods
    after it kept their keys. Each failing period is counted now, and the others are destroyed."""
    keys = load_keyring(site.settings).periods
    assert keys is not None
    before = site.worker.metrics()
    strays = [site.folder / f"{period}.json" for period in ("2018-01", "2018-03")]
    for stray in strays:
        stray.mkdir()
    keys.ensure("2018-02")  # expired, between the two: its key is destroyed all the same
    try:
        site.purge()
        support.wait_for(lambda: keys.destroyed("2018-02"), timeout=60, what="the purge to destroy 2018-02")
        support.wait_for(site.worker.idle, timeout=60, what="the purge to end")
    finally:
        for stray in strays:
            stray.rmdir()
            (site.folder / stray.name.replace(".json", ".destroyed")).unlink(missing_ok=True)
    after = site.worker.metrics()
    assert not (site.folder / "2018-02.json").exists()
    moved = processes.metric_total(after, FAILURES, step="destroy_periods") - processes.metric_total(
        before, FAILURES, step="destroy_periods"
    )
    assert moved == 2


def _wait_counted(site: Site, before: dict) -> None:  # type: ignore[type-arg]
    """Until the worker has counted one more failed ``destroy_periods`` step than ``before`` shows."""
    support.wait_for(
        lambda: (
            processes.metric_total(site.worker.metrics(), FAILURES, step="destroy_periods")
            - processes.metric_total(before, FAILURES, step="destroy_periods")
            >= 1
        ),
        timeout=60,
        what="the purge's count of its failed step",
    )

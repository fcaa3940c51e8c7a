"""A retention step that fails is counted where operators look (``dermq_retention_step_failures_total``,
alert DermqRetentionStepFailing), and beat's purge runs the steps after it all the same."""

from __future__ import annotations

import shutil

import httpx

from core.publisher import make_publisher
from core.queueing import TASK_PURGE
from tests import support
from tests.api.test_metrics import scrape, total
from worker.celery_app import PERIODIC


def test_a_failing_retention_step_is_counted_by_step(worker, settings, stack_env) -> None:  # type: ignore[no-untyped-def]
    metrics = f"http://127.0.0.1:{stack_env['DERMQ_WORKER_METRICS_PORT']}/metrics"
    support.wait_for(lambda: httpx.get(metrics, timeout=5).status_code == 200, timeout=30, what="worker metrics")
    before = scrape(metrics)
    # every step's series is there from the start: Prometheus's increase() skips a series' first sample
    assert ("dermq_retention_step_failures_total", (("step", "destroy_periods"),)) in set(before)
    folder = settings.period_key_folder
    stray = folder / "2019-08.json"  # a folder where a period's key file should be: destroying it fails
    stray.mkdir()
    try:
        make_publisher(settings).send_task(TASK_PURGE, **PERIODIC)
        support.wait_for(
            lambda: (
                total(scrape(metrics), "dermq_retention_step_failures_total", step="destroy_periods")
                - total(before, "dermq_retention_step_failures_total", step="destroy_periods")
                >= 1
            ),
            timeout=60,
            what="the purge's count of its failed step",
        )
    finally:
        shutil.rmtree(stray)
        (folder / "2019-08.destroyed").unlink(missing_ok=True)  # the tombstone its destruction wrote first
    after = scrape(metrics)
    for step in ("purge_cases", "prune_field_months", "forget_callback_secrets", "prune_callback_deliveries"):
        assert total(after, "dermq_retention_step_failures_total", step=step) == total(
            before, "dermq_retention_step_failures_total", step=step
        )

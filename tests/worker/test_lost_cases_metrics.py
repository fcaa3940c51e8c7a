"""Cases whose worker was lost (a crash, an OOM kill, a hard time limit) are counted where operators
look: the sweep that requeues or fails them counts them in ``dermq_lost_cases_total``, and those it
fails in the failure rate (``dermq_jobs_total{outcome="failed"}``, ``dermq_failures_total{code="timeout"}``).
No worker survived to count them before, so every attempt of a poison image could die unseen."""

from __future__ import annotations

from datetime import timedelta

import httpx
from sqlalchemy import func, update

from core.db import session_scope
from core.models import Case
from core.publisher import make_publisher
from core.queueing import TASK_SWEEP
from tests import support
from tests.api.test_metrics import scrape, total
from tests.conftest import Tenant
from worker.celery_app import PERIODIC


def test_the_sweep_counts_the_cases_whose_worker_was_lost(  # type: ignore[no-untyped-def]
    worker, settings, stack_env, tenant: Tenant, store_case
) -> None:
    metrics = f"http://127.0.0.1:{stack_env['DERMQ_WORKER_METRICS_PORT']}/metrics"
    support.wait_for(lambda: httpx.get(metrics, timeout=5).status_code == 200, timeout=30, what="worker metrics")
    before = scrape(metrics)
    # both series are there from the start: Prometheus's increase() skips a series' first sample
    assert {("dermq_lost_cases_total", (("outcome", o),)) for o in ("requeued", "failed")} <= set(before)
    spent, again = store_case(tenant, b"killed its worker each time"), store_case(tenant, b"killed its worker once")
    overdue = func.now() - timedelta(seconds=settings.task_time_limit + settings.running_grace_seconds + 60)
    with session_scope(settings) as session:  # as a child killed mid-case leaves them
        for case_id, attempts in ((spent, settings.max_attempts), (again, 1)):
            session.execute(
                update(Case).where(Case.id == case_id).values(status="running", attempts=attempts, started_at=overdue)
            )
    make_publisher(settings).send_task(TASK_SWEEP, **PERIODIC)

    def moved(name: str, **labels: str) -> float:
        return total(scrape(metrics), name, **labels) - total(before, name, **labels)

    support.wait_for(
        lambda: (
            moved("dermq_lost_cases_total", outcome="failed") >= 1
            and moved("dermq_lost_cases_total", outcome="requeued") >= 1
        ),
        timeout=30,
        what="the sweep's count of lost cases",
    )
    assert moved("dermq_failures_total", code="timeout") >= 1
    assert moved("dermq_jobs_total", outcome="failed") >= 1
    with session_scope(settings) as session:
        assert session.get(Case, spent).failure_code == "timeout"  # type: ignore[union-attr]

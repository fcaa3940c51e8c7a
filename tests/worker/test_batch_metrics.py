"""A worker's ``dermq_jobs_total`` counts every case a batch ended, also when the batch stops afterwards:
the failure-rate alert (DermqCaseFailureRateHigh) and OPERATIONS.md count cases with
``dermq_jobs_total{outcome=~"succeeded|failed"}``.

On a database of this module's own (a batch claims the oldest queued cases of its database) and a
broker of its own (no other test's worker takes these messages)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, select, text

from core.db import session_scope
from core.models import Case
from core.publisher import make_publisher
from tests import processes, support
from tests.api.test_metrics import scrape, total
from tests.conftest import case_store, new_tenant

pytestmark = pytest.mark.usefixtures("database", "empty_queue")  # empty_queue: tests/conftest.py


@contextmanager
def first_result_insert_lost(settings: Any) -> Iterator[None]:
    """The first connection that inserts into ``results`` while the block runs is really lost (its
    backend terminates itself: the error a database crash gives); later inserts go through."""
    engine = create_engine(settings.database_url, isolation_level="AUTOCOMMIT")
    statements = [
        "CREATE SEQUENCE dermq_test_lose_once",
        "CREATE FUNCTION dermq_test_lose_once() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF nextval('dermq_test_lose_once') = 1 THEN PERFORM pg_terminate_backend(pg_backend_pid()); END IF; "
        "RETURN NULL; END $$",
        "CREATE TRIGGER dermq_test_lose_once BEFORE INSERT ON results EXECUTE FUNCTION dermq_test_lose_once()",
    ]
    try:
        with engine.connect() as connection:
            for statement in statements:
                connection.execute(text(statement))
        yield
    finally:
        with engine.connect() as connection:
            connection.execute(text("DROP TRIGGER IF EXISTS dermq_test_lose_once ON results"))
            connection.execute(text("DROP FUNCTION IF EXISTS dermq_test_lose_once()"))
            connection.execute(text("DROP SEQUENCE IF EXISTS dermq_test_lose_once"))
        engine.dispose()


def _ended(settings: Any, ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:
    with session_scope(settings) as session:
        rows = session.execute(select(Case.id, Case.status).where(Case.id.in_(ids)))
        return {case_id: status for case_id, status in rows}


@pytest.mark.slow
def test_a_case_its_batch_failed_before_the_batch_stopped_is_counted(  # type: ignore[no-untyped-def]
    own_database, keyring, stack_env, stack_dir: Path, jpeg_bytes: bytes, private_broker
) -> None:
    """A batch fails its companion whose image does not decode, then loses its database connection
    storing the others (a transient error: its lead is retried, its other companion put back). The
    failed companion is the batch's alone to count: its own message finds it ended. It went uncounted
    in ``dermq_jobs_total`` (only in ``dermq_failures_total``), so the failure rate never saw it."""
    settings = own_database.model_copy(update={"redis_url": private_broker.url})
    tenant, store_case = new_tenant(settings, keyring), case_store(settings, keyring)
    port = support.free_port()
    env = {
        **stack_env,
        "DERMQ_DATABASE_URL": settings.database_url,
        "DERMQ_REDIS_URL": private_broker.url,
        "DERMQ_WORKER_METRICS_PORT": str(port),
        "DERMQ_BATCHING": "on",
        "DERMQ_BATCH_MAX_SIZE": "4",
        "DERMQ_BATCH_MAX_WAIT_MS": "0",
    }
    worker = processes.start_worker(env, stack_dir / "batch-metrics-worker.log", concurrency=1, queues="cases")
    metrics = f"http://127.0.0.1:{port}/metrics"
    try:
        support.wait_for(lambda: httpx.get(metrics, timeout=5).status_code == 200, timeout=30, what="worker metrics")
        before = scrape(metrics)
        # claimed in this order (oldest first): the lead, a companion that does not decode, a good one
        ids = [store_case(tenant, data) for data in (jpeg_bytes, b"not an image at all", jpeg_bytes)]
        with first_result_insert_lost(settings):
            assert support.publish_classify(make_publisher(settings), ids[0])  # only the lead's message
            support.wait_for(
                lambda: set(_ended(settings, ids).values()) <= {"succeeded", "failed"}, timeout=120, what="the cases"
            )
        assert _ended(settings, ids) == {ids[0]: "succeeded", ids[1]: "failed", ids[2]: "succeeded"}
        with session_scope(settings) as session:  # the batch stopped: its lead ran again, its companion was put back
            attempts = {i: n for i, n in session.execute(select(Case.id, Case.attempts).where(Case.id.in_(ids)))}
        assert attempts == {ids[0]: 2, ids[1]: 1, ids[2]: 2}

        def counted(outcome: str) -> float:
            return total(scrape(metrics), "dermq_jobs_total", outcome=outcome) - total(
                before, "dermq_jobs_total", outcome=outcome
            )

        support.wait_for(lambda: counted("succeeded") == 2, timeout=30, what="the successes counted")
        assert (
            total(scrape(metrics), "dermq_failures_total", code="invalid_image")
            - total(before, "dermq_failures_total", code="invalid_image")
            == 1
        )
        assert counted("failed") == 1
    finally:
        worker.stop()

"""A worker's ``dermq_jobs_total`` counts every case a batch ended, also when the batch stops afterwards:
the failure-rate alert (DermqCaseFailureRateHigh) and OPERATIONS.md count cases with
``dermq_jobs_total{outcome=~"succeeded|failed"}``.

On a database of this module's own (a batch claims the oldest queued cases of its database) and a
broker of its own (no other test's worker takes these messages)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

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

_ACTIONS = {
    "pass": "NULL;",
    "refuse": "RAISE EXCEPTION 'refused';",
    "lose": "PERFORM pg_terminate_backend(pg_backend_pid());",
}


@contextmanager
def result_inserts(settings: Any, *actions: str) -> Iterator[None]:
    """While the block runs, the n-th INSERT statement into ``results`` does what ``actions[n - 1]``
    says: ``"pass"``, ``"refuse"`` (an error raised by the database, not a transient one) or ``"lose"``
    (its connection really lost: its backend terminates itself, the error a database crash gives);
    those after the last action go through."""
    engine = create_engine(settings.database_url, isolation_level="AUTOCOMMIT")
    steps = " ".join(f"WHEN {n} THEN {_ACTIONS[action]}" for n, action in enumerate(actions, 1))
    statements = [
        "CREATE SEQUENCE dermq_test_inserts",
        "CREATE FUNCTION dermq_test_inserts() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"CASE nextval('dermq_test_inserts') {steps} ELSE NULL; END CASE; RETURN NULL; END $$",
        "CREATE TRIGGER dermq_test_inserts BEFORE INSERT ON results EXECUTE FUNCTION dermq_test_inserts()",
    ]
    try:
        with engine.connect() as connection:
            for statement in statements:
                connection.execute(text(statement))
        yield
    finally:
        with engine.connect() as connection:
            connection.execute(text("DROP TRIGGER IF EXISTS dermq_test_inserts ON results"))
            connection.execute(text("DROP FUNCTION IF EXISTS dermq_test_inserts()"))
            connection.execute(text("DROP SEQUENCE IF EXISTS dermq_test_inserts"))
        engine.dispose()


class Stack(NamedTuple):
    settings: Any
    metrics: str


@pytest.fixture(scope="module")
def stack(own_database, keyring, stack_env, stack_dir: Path, private_broker) -> Iterator[Stack]:  # type: ignore[no-untyped-def]
    """A batching worker (one child) on this module's database and broker, and its metrics' address."""
    settings = own_database.model_copy(update={"redis_url": private_broker.url})
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
        yield Stack(settings, metrics)
    finally:
        worker.stop()


def _ended(settings: Any, ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:
    with session_scope(settings) as session:
        rows = session.execute(select(Case.id, Case.status).where(Case.id.in_(ids)))
        return {case_id: status for case_id, status in rows}


def _attempts(settings: Any, ids: list[uuid.UUID]) -> list[int]:
    with session_scope(settings) as session:
        found = {case_id: n for case_id, n in session.execute(select(Case.id, Case.attempts).where(Case.id.in_(ids)))}
    return [found[i] for i in ids]


def _run(
    stack: Stack, keyring: Any, images: list[bytes], *inserts: str
) -> tuple[list[uuid.UUID], Callable[..., float]]:
    """Store a case for each of ``images`` (claimed in that order: oldest first), publish the first
    one's message only, and wait until all have ended, the INSERTs into ``results`` meeting
    ``inserts`` (:func:`result_inserts`). Returns the cases and how much a series of the worker's
    metrics (``dermq_jobs_total`` by outcome unless told) has grown since before."""
    tenant, store_case = new_tenant(stack.settings, keyring), case_store(stack.settings, keyring)
    before = scrape(stack.metrics)
    ids = [store_case(tenant, data) for data in images]
    with result_inserts(stack.settings, *inserts):
        assert support.publish_classify(make_publisher(stack.settings), ids[0])  # only the lead's message
        support.wait_for(
            lambda: set(_ended(stack.settings, ids).values()) <= {"succeeded", "failed"}, timeout=120, what="the cases"
        )

    def counted(value: str, name: str = "dermq_jobs_total", label: str = "outcome") -> float:
        return total(scrape(stack.metrics), name, **{label: value}) - total(before, name, **{label: value})

    return ids, counted


@pytest.mark.slow
def test_a_case_its_batch_failed_before_the_batch_stopped_is_counted(stack: Stack, keyring, jpeg_bytes) -> None:  # type: ignore[no-untyped-def]
    """A batch fails its companion whose image does not decode, then loses its database connection
    storing the others (a transient error: its lead is retried, its other companion put back). The
    failed companion is the batch's alone to count: its own message finds it ended. It went uncounted
    in ``dermq_jobs_total`` (only in ``dermq_failures_total``), so the failure rate never saw it."""
    ids, counted = _run(stack, keyring, [jpeg_bytes, b"not an image at all", jpeg_bytes], "lose")
    assert _ended(stack.settings, ids) == {ids[0]: "succeeded", ids[1]: "failed", ids[2]: "succeeded"}
    assert _attempts(stack.settings, ids) == [2, 1, 2]  # the batch stopped: its lead ran again, a companion too
    support.wait_for(lambda: counted("succeeded") == 2, timeout=30, what="the successes counted")
    assert counted("invalid_image", "dermq_failures_total", "code") == 1
    assert counted("failed") == 1


@pytest.mark.slow
def test_cases_stored_one_by_one_before_the_batch_stopped_are_counted_once(  # type: ignore[no-untyped-def]
    stack: Stack, keyring, jpeg_bytes
) -> None:
    """The database refuses a batch's results (so each case is stored alone), stores the lead's and a
    companion's, then loses its connection storing the last one. The two stored cases ended there,
    but the batch forgot it: the lead was retried all the same (a run that found it ended and counted
    it skipped), and neither was counted succeeded."""
    ids, counted = _run(stack, keyring, [jpeg_bytes] * 3, "refuse", "pass", "pass", "lose")
    assert _ended(stack.settings, ids) == dict.fromkeys(ids, "succeeded")
    assert _attempts(stack.settings, ids) == [1, 1, 2]  # only the case whose store was lost ran again
    support.wait_for(lambda: counted("succeeded") == 3, timeout=30, what="the successes counted")
    assert counted("skipped") == 0

"""What Flower shows of a task: the worker's events. A task's ``task-failed`` event carries the repr
of the error it ended with and its traceback, every error chained to it included, and Flower keeps
them (across restarts with ``DERMQ_FLOWER_STATE_FILE``). A database error's text can quote a row:
Postgres's own ``Failing row contains (...)`` names every column. Every dermq task hands Celery the
error's type and frames only (:class:`worker.withheld.WithholdingTask`); ``classify`` and the
callback task did already, the periodic tasks (the sweep, which seals legacy client references and
digests legacy idempotency keys; retention; drift; the audit tasks) did not.

This module's worker runs on a database and a broker of its own: the constraint it adds to make the
sweep fail reaches no other test, and the events it reads are its worker's alone."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text, update

from core.config import Settings
from core.db import session_scope
from core.models import Case
from core.publisher import make_publisher
from core.queueing import TASK_SWEEP
from tests import processes, support
from tests.conftest import case_store, new_tenant, own_period_keys_fixtures
from worker.celery_app import PERIODIC

pytestmark = pytest.mark.usefixtures("database")

own, keyring = own_period_keys_fixtures()

MARKER = "MRN-5521-Jane-Roe-2019-03-04"


class Events:
    """The worker's events, as Flower receives them, captured on a thread from the broker."""

    def __init__(self, settings: Settings) -> None:
        self.app = make_publisher(settings)
        self.seen: list[dict[str, Any]] = []
        self._connection = self.app.connection()
        self._receiver = self.app.events.Receiver(self._connection, handlers={"*": self.seen.append})
        self._thread = threading.Thread(target=self._receiver.capture, kwargs={"limit": None}, daemon=True)

    def __enter__(self) -> Events:
        self._thread.start()
        # events sent before the receiver listens are lost to it: a heartbeat says it listens
        support.wait_for(lambda: self.of("worker-heartbeat"), timeout=30, what="a worker heartbeat")
        return self

    def __exit__(self, *_exc: object) -> None:
        self._receiver.should_stop = True
        self._thread.join(timeout=10)
        self._connection.release()

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [event for event in list(self.seen) if event.get("type") == kind]


@pytest.fixture(scope="module")
def site(own: Settings, private_broker, stack_env, stack_dir: Path) -> Iterator[tuple[Settings, processes.Worker]]:  # type: ignore[no-untyped-def]
    settings = own.model_copy(update={"redis_url": private_broker.url})
    worker = processes.start_own_worker(settings, stack_env, stack_dir / "task-events-worker.log", preload=False)
    try:
        yield settings, worker
    finally:
        worker.stop()


@contextmanager
def refused_sealing(settings: Settings) -> Iterator[None]:
    """While it lasts, sealing a legacy client reference (the sweep empties its column) violates a
    constraint: Postgres refuses the UPDATE, its message quoting the failing row."""
    engine = create_engine(settings.database_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(
                text("ALTER TABLE cases ADD CONSTRAINT dermq_test_keep_ref CHECK (client_ref IS NOT NULL) NOT VALID")
            )
        yield
    finally:
        with engine.connect() as connection:
            connection.execute(text("ALTER TABLE cases DROP CONSTRAINT IF EXISTS dermq_test_keep_ref"))
        engine.dispose()


def test_a_failed_tasks_event_carries_no_patient_data(site, keyring) -> None:  # type: ignore[no-untyped-def]
    settings, worker = site
    tenant = new_tenant(settings, keyring)
    case_id = case_store(settings, keyring)(tenant, b"an image stored before client references were sealed")
    with session_scope(settings) as session:  # a case of a release before migration 0007, finished
        session.execute(
            update(Case)
            .where(Case.id == case_id)
            .values(
                plain_client_ref="legacy reference",
                idempotency_key=MARKER,  # a plain key, from before keys were digested: a record number
                status="failed",
                failure_code="abandoned",
                failure_message="finished long ago",
            )
        )
    with Events(settings) as events, refused_sealing(settings):
        make_publisher(settings).send_task(TASK_SWEEP, **PERIODIC)
        support.wait_for(lambda: events.of("task-failed"), timeout=60, what="the sweep to fail")
        [failed] = events.of("task-failed")
    told = json.dumps(events.seen)
    assert MARKER not in told and "Failing row" not in told, failed
    assert "IntegrityError" in failed["exception"] and "WithheldError" in failed["exception"], failed
    assert "phi.py" in failed["traceback"]  # where it failed, still
    assert MARKER not in worker.output()


def test_a_memory_error_reaches_celery_as_it_is() -> None:
    """Celery ends a child whose task ran out of memory, and the message comes back for another
    (``task_reject_on_worker_lost``): told as a withheld error instead, it was taken as an ordinary
    failure and acknowledged. Other errors reach Celery withheld, their frames kept."""
    from celery import Celery

    from worker.withheld import WithheldError, WithholdingTask

    app = Celery("withheld-test", task_cls=WithholdingTask, set_as_current=False)

    @app.task
    def fails(kind: str) -> None:
        raise MemoryError() if kind == "memory" else ValueError("Failing row contains (MRN-0042)")

    with pytest.raises(MemoryError):
        fails("memory")
    with pytest.raises(WithheldError) as withheld:
        fails("value")
    assert "MRN" not in str(withheld.value) and withheld.value.__cause__ is None
    assert withheld.value.__traceback__ is not None

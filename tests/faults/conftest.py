"""The fault-injection stack: a private Postgres cluster and redis-server (so that tests may stop and
restart them), the API and Celery workers as real processes, and the recovery sweeper on a timer.

Time limits are short and the sweeper fast, through settings only (see ``FAULT_SETTINGS``). Faults
are injected into a worker's model by starting it as ``celery -A tests.faults.worker_app`` (see
there). Every process, server and temporary folder is removed at the end, failures included.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import processes, support
from tests.conftest import FIXTURE_IMAGES
from tests.faults import worker_app
from tests.faults.servers import PostgresCluster, RedisServer, postgres_bin

#: Short limits so that each fault plays out in seconds. The soft limit must still cover a child's
#: first case on a busy 2-core machine: importing torch and loading the model took 7-9 s there.
FAULT_SETTINGS = {
    "DERMQ_TASK_SOFT_TIME_LIMIT": "15",
    "DERMQ_TASK_TIME_LIMIT": "18",
    "DERMQ_BROKER_VISIBILITY_TIMEOUT": "60",
    "DERMQ_CALLBACK_BACKOFF_MAX_SECONDS": "30",  # a retry's wait plus the hard limit under the visibility timeout
    "DERMQ_CALLBACK_TIMEOUT_SECONDS": "3",  # an attempt's three timeouts and its records within the soft limit
    "DERMQ_RUNNING_GRACE_SECONDS": "1",
    "DERMQ_REQUEUE_GRACE_SECONDS": "1",
    "DERMQ_SWEEP_INTERVAL_SECONDS": "0.5",
    "DERMQ_MAX_ATTEMPTS": "2",
    "DERMQ_DATABASE_POOL_SIZE": "3",
    "DERMQ_WORKER_METRICS_PORT": "0",
    "DERMQ_LOG_LEVEL": "INFO",
}

_reports: dict[str, pytest.TestReport] = {}


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    if report.when == "call":
        _reports[item.nodeid] = report
    return report


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if postgres_bin() is None or shutil.which("redis-server") is None:
        skip = pytest.mark.skip(reason="the fault tests need PostgreSQL server binaries and redis-server")
        for item in items:
            if "tests/faults/" in str(item.fspath):
                item.add_marker(skip)


class Sweeper:
    """The recovery sweep every ``sweep_interval_seconds``, as beat would schedule it, in a thread of
    the test process (``worker.tasks.sweep_once``, the body of the ``dermq.sweep`` task)."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.stopped = threading.Event()
        self.totals: dict[str, int] = {"requeued": 0, "failed": 0, "republished": 0}
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._loop, name="sweeper", daemon=True)

    def _loop(self) -> None:
        import redis

        from core.publisher import make_publisher
        from worker.tasks import sweep_once

        publisher = make_publisher(self.settings)
        broker = redis.Redis.from_url(self.settings.redis_url, socket_connect_timeout=0.5, socket_timeout=2)
        while not self.stopped.wait(self.settings.sweep_interval_seconds):
            try:
                report = sweep_once(self.settings, publisher, broker)
            except Exception as exc:  # Postgres down: try again next round, as beat would
                self.errors.append(type(exc).__name__)
                continue
            for key in self.totals:
                self.totals[key] += int(report[key])  # type: ignore[call-overload]
        broker.close()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(30)


@dataclass
class FaultStack:
    root: Path
    env: dict[str, str]
    settings: Any
    pg: PostgresCluster
    broker: RedisServer
    base_url: str
    api: processes.Process
    sweeper: Sweeper
    headers: dict[str, str] = field(default_factory=dict)
    clinic_id: uuid.UUID | None = None
    images: list[bytes] = field(default_factory=list)
    workers: list[processes.Worker] = field(default_factory=list)
    fault_dirs: dict[str, Path] = field(default_factory=dict)

    # ------------------------------------------------------------------ processes

    def start_worker(self, name: str, faults: dict[str, Any] | None = None, **overrides: str) -> processes.Worker:
        """A worker; with ``faults`` (see :class:`tests.faults.worker_app.Faults`), one whose model acts
        them out."""
        metrics_dir = Path(tempfile.mkdtemp(prefix=f"metrics-{name}-", dir=self.root))
        env = {**self.env, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), **overrides}
        app = "worker.celery_app"
        fault_dir = None
        if faults is not None:
            worker_app.Faults(**faults)  # a typo fails here, not in the worker
            fault_dir = Path(tempfile.mkdtemp(prefix=f"faults-{name}-", dir=self.root))
            env |= {worker_app.FAULTS_ENV: json.dumps(faults), worker_app.COUNTER_ENV: str(fault_dir)}
            app = "tests.faults.worker_app"
        worker = processes.start_worker(
            env, self.root / f"worker-{name}.log", name=f"{name}-{uuid.uuid4().hex[:4]}", app=app
        )
        if fault_dir is not None:
            self.fault_dirs[worker.hostname] = fault_dir
        self.workers.append(worker)
        return worker

    def injected(self, worker: processes.Worker) -> int:
        """How many inferences of ``worker`` its faults have acted on so far."""
        return worker_app.injected(self.fault_dirs[worker.hostname])

    def wait_injected(self, worker: processes.Worker, times: int = 1, timeout: float = 60) -> None:
        """Wait until ``worker``'s faults have acted ``times`` times (a case has reached inference)."""
        support.wait_for(
            lambda: self.injected(worker) >= times, timeout=timeout, what="the classification to reach inference"
        )

    def stop_workers(self) -> None:
        while self.workers:
            self.workers.pop().stop()

    # ------------------------------------------------------------------ HTTP

    def submit(self, image: bytes | None = None, *, timeout: float = 30, **fields: str) -> httpx.Response:
        data = image if image is not None else self.images[0]
        return httpx.post(
            f"{self.base_url}/v1/cases",
            headers=self.headers,
            files={"image": ("lesion.jpg", data, "image/jpeg")},
            data=fields,
            timeout=timeout,
        )

    def accepted(self, image: bytes | None = None, **fields: str) -> uuid.UUID:
        response = self.submit(image, **fields)
        assert response.status_code == 202, response.text
        return uuid.UUID(response.json()["id"])

    # ------------------------------------------------------------------ the database, the truth

    def case(self, case_id: uuid.UUID) -> Any:
        from core.db import session_scope
        from core.models import Case

        with session_scope(self.settings) as session:
            return session.get(Case, case_id)

    def wait_terminal(self, case_id: uuid.UUID, timeout: float = 90) -> Any:
        def done() -> Any:
            try:
                case = self.case(case_id)
            except Exception:  # the database is restarting
                return None
            return case if case is not None and case.status in ("succeeded", "failed") else None

        return support.wait_for(done, timeout=timeout, interval=0.2, what=f"case {case_id} to end")

    def wait_status(self, case_id: uuid.UUID, status: str, timeout: float = 60) -> Any:
        return support.wait_for(
            lambda: (case := self.case(case_id)) is not None and case.status == status and case,
            timeout=timeout,
            interval=0.1,
            what=f"case {case_id} to be {status}",
        )

    def counts(self, case_id: uuid.UUID) -> dict[str, int]:
        """Rows that must exist exactly once (or not at all) for a case."""
        from sqlalchemy import func, select

        from core.db import session_scope
        from core.models import CaseBlob, Result

        with session_scope(self.settings) as session:
            results = session.scalar(select(func.count()).select_from(Result).where(Result.case_id == case_id))
            images = session.scalar(
                select(func.count()).select_from(CaseBlob).where(CaseBlob.case_id == case_id, CaseBlob.kind == "image")
            )
            heatmaps = session.scalar(
                select(func.count())
                .select_from(CaseBlob)
                .where(CaseBlob.case_id == case_id, CaseBlob.kind == "heatmap")
            )
        return {"results": results or 0, "images": images or 0, "heatmaps": heatmaps or 0}

    def clinic_totals(self) -> dict[str, int]:
        """Per status, every case of the test clinic; and cases without exactly one image (half-written)."""
        from sqlalchemy import func, select

        from core.db import session_scope
        from core.models import Case, CaseBlob

        with session_scope(self.settings) as session:
            by_status = dict(
                session.execute(
                    select(Case.status, func.count()).where(Case.clinic_id == self.clinic_id).group_by(Case.status)
                ).all()
            )
            images = (
                select(CaseBlob.case_id, func.count().label("n"))
                .where(CaseBlob.kind == "image")
                .group_by(CaseBlob.case_id)
                .subquery()
            )
            half_written = session.scalar(
                select(func.count())
                .select_from(Case)
                .outerjoin(images, images.c.case_id == Case.id)
                .where(Case.clinic_id == self.clinic_id, Case.status != "purged", func.coalesce(images.c.n, 0) != 1)
            )
        return {**by_status, "half_written": half_written or 0}


def worker_children(pid: int) -> list[int]:
    """Pids of the prefork pool's child processes of the Celery worker ``pid``."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            children.append(int(entry.name))
    return children


@pytest.fixture(scope="session")
def fault_stack() -> Iterator[FaultStack]:
    root = Path(tempfile.mkdtemp(prefix="dermq-faults-"))
    root.chmod(0o755)  # the postgres user must reach its cluster folder inside
    pg = PostgresCluster(root / "pg")
    broker = RedisServer(root / "redis")
    api: processes.Process | None = None
    sweeper: Sweeper | None = None
    stack: FaultStack | None = None
    try:
        pg.init()
        pg.start()
        broker.start()
        port = support.free_port()
        env = support.test_env(
            root, DERMQ_DATABASE_URL=pg.url, DERMQ_REDIS_URL=broker.url, DERMQ_API_PORT=str(port), **FAULT_SETTINGS
        )
        settings, clinic_id, token = support.prepare_stack(env, f"faults-{uuid.uuid4().hex[:6]}")
        api = processes.Process("api", [str(support.VENV_BIN / "dermq-api")], env, root / "api.log")
        base_url = f"http://127.0.0.1:{port}"
        support.wait_for(lambda: processes.api_up(base_url) or not api.alive(), timeout=60, what="the API to start")
        if not api.alive():
            raise RuntimeError(api.output()[-3000:])
        sweeper = Sweeper(settings)
        sweeper.thread.start()
        stack = FaultStack(
            root=root,
            env=env,
            settings=settings,
            pg=pg,
            broker=broker,
            base_url=base_url,
            api=api,
            sweeper=sweeper,
            headers={"Authorization": f"Bearer {token}"},
            clinic_id=clinic_id,
            images=[p.read_bytes() for p in sorted(FIXTURE_IMAGES.glob("*.jpg"))],
        )
        yield stack
    finally:
        if stack is not None:
            stack.stop_workers()
        if sweeper is not None:
            sweeper.stop()
        if api is not None:
            api.stop()
        from core.db import dispose_engines

        dispose_engines()
        broker.destroy()
        pg.destroy()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def stack(fault_stack: FaultStack, request: pytest.FixtureRequest) -> Iterator[FaultStack]:
    """The fault stack with both servers up and no worker; workers a test starts are stopped after it
    (their logs are printed when it failed)."""
    if not fault_stack.pg.running():
        fault_stack.pg.start()
    if fault_stack.broker.proc is None:
        fault_stack.broker.start()
    started = len(fault_stack.workers)
    yield fault_stack
    report = _reports.get(request.node.nodeid)
    if report is not None and report.failed:
        for worker in fault_stack.workers[started:]:
            print(f"----- {worker.log.name} (last 4000 characters)\n{worker.output()[-4000:]}")
        print(f"----- api.log\n{fault_stack.api.output()[-2000:]}")
    fault_stack.stop_workers()
    if not fault_stack.pg.running():
        fault_stack.pg.start()
    if fault_stack.broker.proc is None:
        fault_stack.broker.start()

"""Processes the integration tests start and watch: a ``dermq-api`` server and real Celery workers,
each a subprocess whose output goes to a log file; a worker is watched through what it exposes (the
Celery control API on a connection of its own, and its Prometheus metrics)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.support import ROOT, VENV_BIN, free_port, settings_for, wait_for


class Process:
    """A subprocess whose combined output goes to a log file the tests can read."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.args, self.log = name, args, log
        self.handle = log.open("ab")
        self.proc = subprocess.Popen(
            args,
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=self.handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            except ProcessLookupError:
                pass
        self.handle.close()
        return self.proc.returncode


class Worker(Process):
    """A Celery worker process, watched through what it exposes: the Celery control API (ping,
    inspect) and its Prometheus metrics."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, hostname: str) -> None:
        from core.publisher import make_publisher

        settings = settings_for(env)
        self.control_app = make_publisher(settings)
        # a control call's broadcast goes out on the call's own connection (see _connection), not through
        # kombu's process-wide producer pool
        self.control_app.control.mailbox.producer_pool = None
        self.broker_url = settings.broker_url
        self.hostname = hostname
        self.metrics_url = f"http://127.0.0.1:{env['DERMQ_WORKER_METRICS_PORT']}/metrics"
        super().__init__("worker", args, env, log)

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        """A broker connection of its own for one control call (the broadcast and the replies), closed
        after it. Celery's default, kombu's process-wide pools, are shared by every app on the same
        broker URL in this process (earlier tests' workers, the fault stack's sweeper), and their
        connections, with their channels' state, outlive a broker restart."""
        connection = self.control_app.connection_for_write()
        try:
            yield connection
        finally:
            connection.close()

    def ping(self) -> bool:
        """Whether the worker answers the control API's ping (its consumer is ready for tasks)."""
        try:
            with self._connection() as connection:
                replies = self.control_app.control.ping(destination=[self.hostname], timeout=0.5, connection=connection)
        except Exception:  # the broker is down
            return False
        return any(self.hostname in reply for reply in replies)

    def listening(self) -> int:
        """How many clients of the broker's Redis server are subscribed to pub/sub patterns, which is how
        kombu delivers the control API's broadcasts; pub/sub spans the server's databases, so on a shared
        server other stacks' workers count too. On the fault stack's own server, 0 says the worker never
        listened, and more than 0 that it listened and its replies were lost."""
        import redis

        client = redis.Redis.from_url(self.broker_url, socket_connect_timeout=1, socket_timeout=2)
        try:
            return sum(1 for entry in client.client_list() if int(entry.get("psub", 0)) > 0)
        except redis.RedisError:
            return -1
        finally:
            client.close()

    def active(self) -> list[dict[str, Any]]:
        """The tasks its children are running now, as the control API's ``inspect().active()`` says."""
        return list(self._inspected("active", timeout=1) or [])

    def idle(self) -> bool:
        """Whether it answers the control API and runs no task (a worker that does not answer is not idle)."""
        return self._inspected("active", timeout=1) == []

    def scheduled(self) -> list[dict[str, Any]]:
        """The tasks it holds until their countdown ends (a retry waiting out its backoff), as the control
        API's ``inspect().scheduled()`` says: each an ``eta`` and the task's ``request``."""
        return list(self._inspected("scheduled", timeout=1) or [])

    def stats(self) -> dict[str, Any]:
        """Its statistics, as the control API's ``inspect().stats()`` says ({} when it does not answer)."""
        return dict(self._inspected("stats", timeout=2) or {})

    def _inspected(self, method: str, *, timeout: float) -> Any:
        """Its reply to the control API's ``inspect().<method>()`` on a connection of its own; None if none."""
        with self._connection() as connection:
            inspector = self.control_app.control.inspect(
                destination=[self.hostname], timeout=timeout, connection=connection
            )
            replies = getattr(inspector, method)() or {}
        return replies.get(self.hostname)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Its metrics endpoint's samples, {} while it does not answer."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        try:
            text = httpx.get(self.metrics_url, timeout=5).text
        except httpx.HTTPError:
            return {}
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of ``name`` with these labels (0 if none)."""
        return metric_total(self.metrics(), name, **labels)

    def models_loaded(self) -> int:
        """How many of its children have loaded the model (``dermq_worker_info``, summed over them)."""
        return int(self.metric("dermq_worker_info"))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        try:
            return super().stop(sig, timeout)
        finally:
            self.control_app.close()


def metric_total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(
        value
        for (sample, sample_labels), value in samples.items()
        if sample == name and all(item in sample_labels for item in labels.items())
    )


def start_own_worker(settings: Any, stack_env: dict[str, str], log: Path, *, preload: bool = True) -> Worker:
    """A worker on the database, broker and period-key folder of ``settings`` (a test module's own:
    its tasks reach no other worker, and another module's none of its), with the shared stack's other
    settings (``stack_env``); without ``preload``, one that loads no model (a purge needs none)."""
    env = {
        **stack_env,
        "DERMQ_DATABASE_URL": settings.database_url,
        "DERMQ_REDIS_URL": settings.redis_url,
        "DERMQ_PERIOD_KEY_DIR": str(settings.period_key_folder),
        "DERMQ_WORKER_METRICS_PORT": "0",  # a free one
    }
    if not preload:
        env["DERMQ_PRELOAD_MODEL"] = "false"
    return start_worker(env, log)


def start_worker(
    env: dict[str, str],
    log: Path,
    *,
    name: str | None = None,
    concurrency: int = 1,
    queues: str = "cases,maintenance",
    extra: list[str] | None = None,
    app: str = "worker.celery_app",
    wait_for_model: bool = True,
) -> Worker:
    """Start a worker of ``app`` (a module: tests.faults.worker_app injects faults;
    worker.callbacks_app, the callback worker, runs on the threads its settings give and loads no
    model) and wait until it answers a ping and, with ``wait_for_model`` and model preloading on, until
    each child has loaded the model. A metrics port of 0 (or none) becomes a free one: the wait reads
    the metrics."""
    threads = app == "worker.callbacks_app"
    pool = [] if threads else ["--pool", "prefork", "--concurrency", str(concurrency)]
    env = dict(env)
    if env.get("DERMQ_WORKER_METRICS_PORT", "0") == "0":
        env["DERMQ_WORKER_METRICS_PORT"] = str(free_port())
    hostname = f"{name or 'test-' + uuid.uuid4().hex[:6]}@{socket.gethostname()}"
    args = [
        str(VENV_BIN / "celery"),
        "-A",
        app,
        "worker",
        "--loglevel",
        "INFO",
        *pool,
        "--queues",
        queues,
        "--without-mingle",
        "--without-gossip",
        "--hostname",
        hostname,
        *(extra or []),
    ]
    worker = Worker(args, env, log, hostname)
    try:
        try:  # the log says whether it started at all (CI once saw a worker ready, consuming, and not
            # answering pings, after tests/faults/test_outages.py had restarted the broker)
            wait_for(lambda: worker.ping() or not worker.alive(), timeout=60, what="the worker to answer a ping")
        except TimeoutError as exc:
            listening = f"{worker.listening()} broker clients subscribed to pub/sub patterns"
            raise TimeoutError(f"{exc} ({listening}); its log ends:\n{worker.output()[-3000:]}") from None
        if not worker.alive():
            raise RuntimeError(f"worker exited at start:\n{worker.output()[-3000:]}")
        preloads = env.get("DERMQ_PRELOAD_MODEL", "true").lower() not in ("0", "false", "no", "off")
        if not threads and wait_for_model and preloads:
            # the child preloads the model in the background; a case sent before it is done would spend
            # that load inside its own time limit, which tests of the limits must not depend on
            wait_for(
                lambda: worker.models_loaded() >= concurrency or not worker.alive(),
                timeout=120,
                what="the worker's children to load the model",
            )
            if not worker.alive():
                raise RuntimeError(f"worker exited at start:\n{worker.output()[-3000:]}")
    except BaseException:
        worker.stop()  # never leave a stray worker behind
        raise
    return worker


def api_up(base_url: str) -> bool:
    """Whether the API at ``base_url`` answers its health check."""
    import httpx

    try:
        return httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def api_process(env: dict[str, str], log: Path, *, timeout: float = 60) -> Iterator[tuple[str, Process]]:
    """A ``dermq-api`` process started with ``env`` (its ``DERMQ_API_PORT``), answering its health
    check; yields (base URL, process) and stops it afterwards. Raises with the process's output if it
    dies while starting."""
    server = Process("api", [str(VENV_BIN / "dermq-api")], env, log)
    base = f"http://127.0.0.1:{env['DERMQ_API_PORT']}"
    try:
        wait_for(lambda: api_up(base) or not server.alive(), timeout=timeout, what="the API to start")
        if not server.alive():
            raise RuntimeError(server.output()[-3000:])
        yield base, server
    finally:
        server.stop()


def memory_holds(pid: int, secret: bytes) -> bool:
    """Whether any 16 bytes of ``secret`` (at every eighth offset) are in the writable memory of process
    ``pid`` (a child of the tests, whose memory they may read as a debugger or ``gcore`` would): what a
    dump of that process would reveal. Parts, not the whole: a small buffer freed without being cleared
    keeps all but its first 8 bytes (Python's allocator writes its free list there)."""
    parts = [secret[at : at + 16] for at in range(0, len(secret) - 15, 8)]
    chunk = 64 * 1024 * 1024
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            span, perms, *_ = line.split()
            if not perms.startswith("rw"):  # a key is written at run time: only writable memory can hold it
                continue
            start, end = (int(part, 16) for part in span.split("-"))
            at = start
            while at < end:
                try:
                    mem.seek(at)
                    data = mem.read(min(chunk + len(secret), end - at))
                except OSError:  # a region that cannot be read ([vvar] and the like)
                    break
                if any(part in data for part in parts):
                    return True
                at += chunk
    return False

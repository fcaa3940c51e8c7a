"""The API in several processes behind one port (DERMQ_API_PROCESSES): all of them serve, and the one
metrics listener reports what all of them counted."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from api.metrics import HEARTBEAT_SECONDS
from tests import processes, support
from tests.api.test_metrics import scrape, total


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.fixture
def two_process_api(
    stack_env: dict[str, str], stack_dir: Path, database, redis_client
) -> Iterator[tuple[str, str, int]]:  # type: ignore[no-untyped-def]
    port, metrics_port = support.free_port(), support.free_port()
    env = {
        **stack_env,
        "DERMQ_API_PORT": str(port),
        "DERMQ_METRICS_PORT": str(metrics_port),
        "DERMQ_API_PROCESSES": "2",
    }
    with processes.api_process(env, stack_dir / "two-process-api.log", timeout=90) as (base, server):
        yield base, f"http://127.0.0.1:{metrics_port}/metrics", server.proc.pid


def test_two_api_processes_serve_one_port_and_are_counted_together(two_process_api, tenant) -> None:  # type: ignore[no-untyped-def]
    base, metrics_url, supervisor = two_process_api

    def api_processes() -> list[int]:  # uvicorn's spawned workers (not multiprocessing's resource tracker)
        return [
            p for p in children(supervisor) if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")
        ]

    assert len(support.wait_for(lambda: api_processes() if len(api_processes()) == 2 else None, timeout=60)) == 2
    before = total(scrape(metrics_url), "dermq_http_requests_total", route="/v1/cases", status="200")
    with httpx.Client(base_url=base, timeout=30) as http:
        for _ in range(24):  # new connections: the kernel spreads them over the processes
            assert httpx.get(f"{base}/v1/cases", headers=tenant.headers, timeout=30).status_code == 200
        assert http.get("/readyz").json()["status"] == "ready"
    after = total(scrape(metrics_url), "dermq_http_requests_total", route="/v1/cases", status="200")
    assert after - before == 24


def test_the_heartbeat_is_one_recent_sample_and_sigusr1_ends_no_process(two_process_api) -> None:  # type: ignore[no-untyped-def]
    """The supervisor's metrics listener serves the event loops' heartbeat (DermqApiNotServing) as
    one sample, the stalest live process's; SIGUSR1, the runbook's way to see where a process is stuck,
    ends no process (its default action ends one), not even one still starting (it is held until the
    process's handler is in place), sent the moment the processes appear and again once they serve."""
    base, metrics_url, supervisor = two_process_api

    def api_processes() -> list[int]:
        return [
            p for p in children(supervisor) if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")
        ]

    def beats() -> list[float]:
        samples = scrape(metrics_url)
        return [v for (name, _), v in samples.items() if name == "dermq_api_event_loop_heartbeat_timestamp_seconds"]

    def recent() -> bool:
        found = beats()
        return len(found) == 1 and time.time() - HEARTBEAT_SECONDS - 2 <= found[0] <= time.time()

    workers = support.wait_for(lambda: api_processes() if len(api_processes()) == 2 else None, timeout=60)
    for pid in (*workers, supervisor):  # the processes are still importing the app
        os.kill(pid, signal.SIGUSR1)
    support.wait_for(recent, timeout=30, what="one recent heartbeat sample")
    assert sorted(api_processes()) == sorted(workers)
    for pid in (*workers, supervisor):
        os.kill(pid, signal.SIGUSR1)
    support.wait_for(lambda: httpx.get(f"{base}/healthz", timeout=10).status_code == 200, timeout=10)
    support.wait_for(recent, timeout=30, what="the heartbeat after SIGUSR1")
    assert sorted(api_processes()) == sorted(workers) and Path(f"/proc/{supervisor}").exists()


def test_the_supervisor_serves_the_field_gauges_once(two_process_api, redis_client) -> None:  # type: ignore[no-untyped-def]
    """The dermq_field_* gauges come from the report in Redis, read by the one metrics listener: one
    sample per model and class however many API processes there are."""
    import json

    from prometheus_client.parser import text_string_to_metric_families

    from core import outcomes
    from core.queueing import FIELD_KEY

    _, metrics_url, _ = two_process_api
    rows = [outcomes.Confirmed("field-two-processes", "mel", True, "mel")] * 3
    report = {"models": outcomes.field_performance(rows), "computed_at": 1.0}
    try:
        redis_client.set(FIELD_KEY, json.dumps(report))
        text = httpx.get(metrics_url, timeout=5).text
    finally:
        redis_client.delete(FIELD_KEY)
    confirmed = [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "dermq_field_confirmed_cases"
    ]
    mine = {"model_id": "field-two-processes", "class": "mel", "window": "all"}  # a report with no recent window
    mel = [value for labels, value in confirmed if labels == mine]
    assert mel == [3]
    assert len(confirmed) == 7  # every class of the one model, each once


def test_a_process_that_has_not_beaten_yet_reads_as_started_not_as_1970(two_process_api) -> None:  # type: ignore[no-untyped-def]
    """A process replaced by uvicorn's supervisor (or starting with the rest) counts towards the stalest
    heartbeat from the moment it exists: before its first beat its sample read 0, and the heartbeat
    served was 1970's (``time() - heartbeat`` 56 years: DermqApiNotServing pending at every restart, a
    dashboard's staleness ruined) for as long as the process took to import the app and start."""
    _, metrics_url, supervisor = two_process_api

    def api_processes() -> list[int]:
        return [
            p for p in children(supervisor) if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")
        ]

    first, second = support.wait_for(lambda: api_processes() if len(api_processes()) == 2 else None, timeout=60)
    environ = dict(
        entry.split("=", 1) for entry in Path(f"/proc/{first}/environ").read_text().split("\0") if "=" in entry
    )
    folder = Path(environ["PROMETHEUS_MULTIPROC_DIR"])
    killed = time.time()
    os.kill(first, signal.SIGKILL)
    successor = support.wait_for(
        lambda: next((p for p in api_processes() if p not in (first, second)), None), timeout=30, interval=0.01
    )
    # its heartbeat's sample file made (on importing api.metrics), the app still loading: held there
    support.wait_for(lambda: (folder / f"gauge_livemin_{successor}.db").exists(), timeout=30, interval=0.005)
    time.sleep(0.2)
    os.kill(successor, signal.SIGSTOP)
    try:
        beats = [
            value
            for (name, _), value in scrape(metrics_url).items()
            if name == "dermq_api_event_loop_heartbeat_timestamp_seconds"
        ]
    finally:
        os.kill(successor, signal.SIGCONT)
    assert len(beats) == 1 and killed - HEARTBEAT_SECONDS - 2 <= beats[0] <= time.time(), beats


def test_the_processes_metrics_folder_goes_with_the_supervisor(stack_env, stack_dir, database, redis_client) -> None:  # type: ignore[no-untyped-def]
    """The folder the processes count into is the supervisor's to remove when it stops: each restart
    of the API left one behind in the temporary directory, with a file per process that ever ran."""
    env = {**stack_env, "DERMQ_API_PORT": str(support.free_port()), "DERMQ_METRICS_PORT": str(support.free_port())}
    with processes.api_process(
        {**env, "DERMQ_API_PROCESSES": "2"}, stack_dir / "metrics-folder-api.log", timeout=90
    ) as (
        _,
        server,
    ):
        child = support.wait_for(lambda: next(iter(children(server.proc.pid)), None), timeout=60)
        environ = Path(f"/proc/{child}/environ").read_text()
        folder = Path(
            next(e for e in environ.split("\0") if e.startswith("PROMETHEUS_MULTIPROC_DIR=")).split("=", 1)[1]
        )
        support.wait_for(lambda: any(folder.glob("*.db")), timeout=60, what="the processes' sample files")
    assert server.proc.returncode is not None and not folder.exists()

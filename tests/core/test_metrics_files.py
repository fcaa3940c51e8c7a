"""The multiprocess metrics (the worker's, and the API's with several processes) survive a process's
sample file that is still being created, or was left empty by a process killed while creating it."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from core import metrics_files
from core.metrics_files import MultiProcessFiles

WRITER = textwrap.dedent(
    """
    from prometheus_client import Counter
    Counter("dermq_test_cases", "cases", ["outcome"]).labels("succeeded").inc(3)
    """
)


def record_in_another_process(folder: Path) -> None:
    """A real process writes a counter to its sample file, as a worker child does."""
    env = {"PROMETHEUS_MULTIPROC_DIR": str(folder), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", WRITER], env=env, check=True)


def test_an_empty_sample_file_leaves_the_other_processes_samples_readable(tmp_path: Path) -> None:
    record_in_another_process(tmp_path)
    (tmp_path / "counter_4242.db").touch()  # created, not yet sized (or its process was killed there)
    (tmp_path / "gauge_liveall_4243.db").write_bytes(b"\0\0")  # shorter than the header

    registry = CollectorRegistry()
    MultiProcessFiles(registry, str(tmp_path))
    exposition = generate_latest(registry).decode()

    assert 'dermq_test_cases_total{outcome="succeeded"} 3.0' in exposition


RECORDER = textwrap.dedent(
    """
    from prometheus_client import Counter, Histogram
    Counter("dermq_test_cases", "cases", ["outcome"]).labels("succeeded").inc(3)
    Histogram("dermq_test_seconds", "seconds", buckets=(1, 5)).observe(2)
    """
)


def run_and_exit(folder: Path) -> None:
    """A process that records a counter and a histogram and exits without a word (killed, say)."""
    env = {"PROMETHEUS_MULTIPROC_DIR": str(folder), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", RECORDER], env=env, check=True)


def scrape(folder: Path) -> str:
    registry = CollectorRegistry()
    MultiProcessFiles(registry, str(folder))
    return generate_latest(registry).decode()


def test_dead_processes_keep_counting_from_one_archive_per_kind(tmp_path: Path) -> None:
    """A worker child is replaced every few thousand tasks: each dead one's counts stay, and a scrape
    reads one archive file per kind instead of one file per process that ever lived."""
    for done in range(1, 6):
        run_and_exit(tmp_path)
        exposition = scrape(tmp_path)
        assert f'dermq_test_cases_total{{outcome="succeeded"}} {3.0 * done}' in exposition
        assert f'dermq_test_seconds_bucket{{le="5.0"}} {float(done)}' in exposition
        assert f"dermq_test_seconds_count {float(done)}" in exposition
    assert sorted(p.name for p in tmp_path.glob("*.db")) == ["counter_archive.db", "histogram_archive.db"]


def test_a_child_folds_its_own_counts_as_it_exits(tmp_path: Path) -> None:
    run_and_exit(tmp_path)
    scrape(tmp_path)
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    script = RECORDER.replace(
        "observe(2)",
        "observe(2)\nimport os\nfrom core.metrics_files import fold\n"
        "fold(os.environ['PROMETHEUS_MULTIPROC_DIR'], os.getpid())",
    )
    subprocess.run(
        [sys.executable, "-c", script], env={**env, "PYTHONPATH": str(Path(__file__).parents[2])}, check=True
    )
    assert sorted(p.name for p in tmp_path.glob("*.db")) == ["counter_archive.db", "histogram_archive.db"]
    assert 'dermq_test_cases_total{outcome="succeeded"} 6.0' in scrape(tmp_path)


@pytest.mark.parametrize("step", ["rename", "replace"])
def test_a_fold_cut_short_is_finished_and_counts_each_process_once(tmp_path: Path, monkeypatch, step: str) -> None:  # type: ignore[no-untyped-def]
    """A process killed part way through a fold (before or after it set the dead process's file aside)
    leaves the next scrape to finish it: no count lost, none counted twice, never a lower total."""
    run_and_exit(tmp_path)
    assert 'dermq_test_cases_total{outcome="succeeded"} 3.0' in scrape(tmp_path)
    run_and_exit(tmp_path)
    real = getattr(os, step)

    def killed(*args: object) -> None:
        raise SystemExit("killed mid-fold")

    monkeypatch.setattr(metrics_files.os, step, killed)
    with pytest.raises(SystemExit):
        scrape(tmp_path)
    monkeypatch.setattr(metrics_files.os, step, real)
    assert 'dermq_test_cases_total{outcome="succeeded"} 6.0' in scrape(tmp_path)
    assert 'dermq_test_cases_total{outcome="succeeded"} 6.0' in scrape(tmp_path)


def test_a_child_forked_during_a_scrape_does_not_inherit_the_folds_lock(tmp_path: Path) -> None:
    """A worker's main process scrapes from a thread while it forks children: a child forked mid-scrape
    kept the scrape's lock for its whole life, and every later scrape and child exit waited on it."""
    inside, leave = threading.Event(), threading.Event()

    def scraping() -> None:
        with metrics_files._locked(str(tmp_path)):
            inside.set()
            leave.wait(10)

    scrape_thread = threading.Thread(target=scraping)
    scrape_thread.start()
    assert inside.wait(10)
    releaser = threading.Timer(0.3, leave.set)  # the scrape ends while the fork below waits for it
    releaser.start()
    pid = os.fork()
    if pid == 0:  # the child: the lock is free for it once its parent's scrape is over
        handle = os.open(tmp_path / ".fold.lock", os.O_RDWR)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os._exit(1)
        os._exit(0)
    scrape_thread.join(10)
    releaser.join(10)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with metrics_files._locked(str(tmp_path)):  # and the parent's next scrape is not held up
        pass

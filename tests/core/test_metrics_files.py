"""The multiprocess metrics (the worker's, and the API's with several processes) survive a process's
sample file that is still being created, or was left empty by a process killed while creating it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

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

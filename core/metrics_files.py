"""Prometheus samples summed over several processes (prometheus_client's multiprocess mode), read so
that one process's file cannot break a scrape.

Each process writes its samples to a memory-mapped ``*.db`` file in ``PROMETHEUS_MULTIPROC_DIR``.
prometheus_client creates that file and only then sizes it, so for a moment it exists with 0 bytes;
its collector reads the header of every file, and one empty file makes the whole scrape fail
(``struct.error``: the listener answers 500 and every metric is lost). A process that starts while
Prometheus scrapes meets that window, and a process killed inside it (a worker child past its hard
time limit, an OOM kill) leaves the empty file behind for good (prometheus/client_python#1199).
:class:`MultiProcessFiles` skips files without their 8-byte header: a file that has been sized has
one (zero until its first value is written, which reads as "nothing recorded"), so nothing recorded
is lost.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, multiprocess
from prometheus_client.metrics_core import Metric

#: The used-size integer and its padding at the start of every sample file.
HEADER_BYTES = 8


def _sized(path: str) -> bool:
    try:
        return os.path.getsize(path) >= HEADER_BYTES
    except FileNotFoundError:  # a dead process's file removed since the listing
        return False


class MultiProcessFiles(multiprocess.MultiProcessCollector):
    """prometheus_client's multiprocess collector, skipping sample files still being created."""

    def __init__(self, registry: CollectorRegistry | None, path: str | None = None) -> None:
        self.folder = path or os.environ.get("PROMETHEUS_MULTIPROC_DIR") or ""
        super().__init__(registry, self.folder)

    def collect(self) -> Iterable[Metric]:
        files = [path for path in glob.glob(os.path.join(self.folder, "*.db")) if _sized(path)]
        return self.merge(files, accumulate=True)

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

A dead process's counters and histograms must go on counting (a counter that went down reads as a
reset, and ``rate()`` as a burst), so prometheus_client keeps their files for good: a worker child
is replaced every ``worker_max_tasks_per_child`` tasks, thousands of times a day under load, and
every scrape read every file any child ever wrote. :func:`fold` adds a dead process's counters and
histograms to one archive file per kind and removes its own (the child's exit does it, and each
scrape for processes that died without exiting); a scrape holds the same lock, so it never reads a
fold half done, and a fold cut short is finished before the next read.
"""

from __future__ import annotations

import fcntl
import glob
import os
import re
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, multiprocess
from prometheus_client.metrics_core import Metric
from prometheus_client.mmap_dict import MmapedDict

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
        with _locked(self.folder):
            _finish_folds(self.folder)
            for pid in _dead_processes(self.folder):  # killed: they never ran their exit's fold
                _fold(self.folder, pid)
            files = [path for path in glob.glob(os.path.join(self.folder, "*.db")) if _sized(path)]
            return self.merge(files, accumulate=True)


#: the kinds of sample a dead process's file keeps, summed over processes (a gauge's file goes with its
#: process: prometheus_client's ``mark_process_dead``)
SUMMED = ("counter", "histogram")
ARCHIVE = "archive"  # in place of a pid: counter_archive.db, histogram_archive.db
_PROCESS_FILE = re.compile(r"^(counter|histogram)_(\d+)\.db$")


def fold(folder: str, pid: int) -> None:
    """Add process ``pid``'s counters and histograms to ``folder``'s archive files, remove its sample
    files, and drop its live gauges. For a process that has exited or is exiting (its last values
    written): a worker child at its shutdown, or a scrape for a process that is gone."""
    with _locked(folder):
        _finish_folds(folder)
        _fold(folder, pid)


def _fold(folder: str, pid: int) -> None:
    for kind in SUMMED:
        source = os.path.join(folder, f"{kind}_{pid}.db")
        if not os.path.exists(source):
            continue
        if not _sized(source):  # created and never sized: nothing recorded
            os.remove(source)
            continue
        archive = os.path.join(folder, f"{kind}_{ARCHIVE}.db")
        totals: dict[str, tuple[float, float]] = {}
        for path in (archive, source):
            if os.path.exists(path):
                for key, value, timestamp, _position in MmapedDict.read_all_values_from_file(path):
                    held, stamp = totals.get(key, (0.0, 0.0))
                    totals[key] = (held + value, max(stamp, timestamp))
        staged = f"{archive}.next"
        if os.path.exists(staged):
            os.remove(staged)
        written = MmapedDict(staged)
        try:
            for key, (value, timestamp) in totals.items():
                written.write_value(key, value, timestamp)
        finally:
            written.close()
        # the steps a fold cut short can be finished from (_finish_folds): the source set aside, then
        # the new archive in place, then the source gone
        os.rename(source, f"{source}.folded")
        os.replace(staged, archive)
        os.remove(f"{source}.folded")
    multiprocess.mark_process_dead(pid, folder)


def _finish_folds(folder: str) -> None:
    """Finish a fold that stopped part way (its process killed): a source set aside means its staged
    archive is complete; a staged archive without one was never used."""
    for kind in SUMMED:
        archive = os.path.join(folder, f"{kind}_{ARCHIVE}.db")
        staged = f"{archive}.next"
        aside = glob.glob(os.path.join(folder, f"{kind}_*.db.folded"))
        if aside and os.path.exists(staged):
            os.replace(staged, archive)
        elif os.path.exists(staged):
            os.remove(staged)
        for path in aside:
            os.remove(path)


def _dead_processes(folder: str) -> list[int]:
    """The pids of sample files whose process no longer exists."""
    pids = set()
    for name in os.listdir(folder):
        found = _PROCESS_FILE.match(name)
        if found is not None:
            pids.add(int(found.group(2)))
    return sorted(pid for pid in pids if not _alive(pid))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: alive
        return True
    return True


#: held while this process holds the folder's lock, and taken around every fork: a worker's main
#: process scrapes from a thread while it forks children, and a child forked mid-scrape inherited the
#: locked descriptor, so the lock stayed held for as long as that child lived (every later scrape, and
#: every child's exit, waited for it: the worker stopped)
_held = threading.Lock()
os.register_at_fork(before=_held.acquire, after_in_parent=_held.release, after_in_child=_held.release)


@contextmanager
def _locked(folder: str) -> Iterator[None]:
    """The folder's fold lock (a scrape and the folds of exiting processes take turns); never held
    across a fork (:data:`_held`)."""
    with _held:
        handle = os.open(os.path.join(folder, ".fold.lock"), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield
        finally:
            os.close(handle)

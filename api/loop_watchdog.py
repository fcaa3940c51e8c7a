"""Ending an API process whose event loop is stuck, so that its supervisor starts another.

A coroutine that blocks (a synchronous call where an await belonged, a deadlock in the loop's
thread) stops its process from serving while everything around it still looks alive: uvicorn's
supervisor pings a thread of the process, not its loop; with several processes on one port the
others answer the health checks; the metrics listener is a thread or another process. Requests that
reach the stuck process hang until nginx gives up on them. The loop beats :func:`api.metrics.heartbeat`
every few seconds; this thread, outside the loop, watches the beats and, after ``limit`` seconds
without one, writes every thread's stack to stderr (the log: where it was stuck) and ends the process
with :data:`EXIT_STUCK`. uvicorn's supervisor replaces a process that ended; a single-process API
ends and its container is restarted. DermqApiNotServing reports a stopped heartbeat meanwhile.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import threading
import time
from pathlib import Path

log = logging.getLogger("dermq.api")

#: seconds without a heartbeat after which the process ends itself (the beat comes every 5 s)
STUCK_SECONDS = 60.0
EXIT_STUCK = 70  # EX_SOFTWARE


class LoopWatchdog:
    """A daemon thread that ends the process when :meth:`beat` has not been called for ``limit`` seconds."""

    def __init__(self, limit: float = STUCK_SECONDS, check_every: float = 5.0) -> None:
        self.limit = limit
        self.check_every = check_every
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        self._last = time.monotonic()

    def start(self) -> None:
        self._last = time.monotonic()
        self._thread = threading.Thread(target=self._watch, name="dermq-loop-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.check_every):
            stalled = time.monotonic() - self._last
            if stalled > self.limit and not self._stop.is_set():
                log.critical(
                    "the event loop has run nothing for too long: ending this process for its supervisor to replace",
                    extra={"event": "event_loop_stuck", "seconds": round(stalled, 1)},
                )
                faulthandler.dump_traceback(all_threads=True)
                os._exit(EXIT_STUCK)


#: what the command line of an API process holds: the ``dermq-api`` script, or for each of several
#: processes multiprocessing's spawn (not its resource tracker, which SIGUSR1 would end)
API_COMMANDS = (b"dermq-api", b"spawn_main")


def api_processes(proc: Path = Path("/proc")) -> list[int]:
    """The process ids of this machine's (or container's) API processes."""
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes()
        except OSError:  # ended meanwhile, or not ours to read
            continue
        if any(word in command for word in API_COMMANDS):
            found.append(int(entry.name))
    return sorted(found)


def main() -> int:
    """``python -m api.loop_watchdog``: every API process writes its threads' stacks to its log (SIGUSR1,
    which it answers with faulthandler, and goes on), to see where a stuck one is stuck."""
    for pid in api_processes():
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            continue
        print(f"{pid}: stacks written to its log")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

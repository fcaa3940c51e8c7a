"""An API process whose event loop is stuck ends itself, so that its supervisor starts another: with
several processes on one port, the health checks reach the others, and uvicorn's supervisor pings a
thread of the process, not its loop. In a process of its own, with a short limit."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from api.loop_watchdog import EXIT_STUCK
from tests import support

SCRIPT = textwrap.dedent(
    """
    import asyncio, sys, time
    from api.loop_watchdog import LoopWatchdog
    from api.metrics import heartbeat

    async def main():
        watchdog = LoopWatchdog(limit=1.0, check_every=0.1)
        watchdog.start()
        asyncio.get_running_loop().create_task(heartbeat(watchdog, every=0.1))
        await asyncio.sleep(2.0)  # a loop that runs: beats, and the process lives on
        print("alive", flush=True)
        time.sleep(30)  # a coroutine that blocks its loop

    asyncio.run(main())
    """
)


def test_a_process_whose_loop_blocks_ends_and_one_that_runs_does_not() -> None:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=support.ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == EXIT_STUCK, done.stderr[-2000:]
    assert done.stdout.strip() == "alive"  # two seconds of a running loop (twice the limit) did not end it
    assert time.monotonic() - started < 15  # ended about a second into the block, not after its 30 s


def test_the_stack_command_signals_api_processes_only(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """SIGUSR1 ends a process that does not answer it: multiprocessing's resource tracker and the
    image's health check are Python too, and must not be signalled."""
    from api.loop_watchdog import api_processes

    commands = {
        "11": b"/opt/venv/bin/python3\x00/opt/venv/bin/dermq-api\x00",
        "12": b"/opt/venv/bin/python3\x00-c\x00from multiprocessing.spawn import spawn_main; spawn_main()\x00",
        "13": b"/opt/venv/bin/python3\x00-c\x00from multiprocessing.resource_tracker import main;main(5)\x00",
        "14": b"python\x00/opt/dermq/healthcheck.py\x00api\x00",
        "self": b"not a process",
    }
    for name, command in commands.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "cmdline").write_bytes(command)
    (tmp_path / "15").mkdir()  # ended while listed: no cmdline to read
    assert api_processes(tmp_path) == [11, 12]

"""``make run``'s supervisor stops the whole stack when its terminal closes. Its processes run in
sessions of their own, which a terminal's hang-up never reaches: on SIGHUP the supervisor died and
left the API, the workers, beat and Flower running, holding their ports, and the next ``make run``
failed with "address already in use"."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from tests import support

SUPERVISOR = textwrap.dedent(
    """
    import sys
    from core.devstack import Stack

    stack = Stack()
    stack.stop_on_signals()
    stack.start("sleeper", [sys.executable, "-c", "import time; time.sleep(600)"], {})
    print(stack.processes["sleeper"].pid, flush=True)
    sys.exit(stack.wait())
    """
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_terminal_closing_stops_the_stack() -> None:
    supervisor = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR], stdout=subprocess.PIPE, text=True, cwd=support.ROOT
    )
    assert supervisor.stdout is not None
    child = int(supervisor.stdout.readline())
    try:
        supervisor.stdout.close()  # the terminal is gone: what the supervisor writes now fails
        supervisor.send_signal(signal.SIGHUP)
        supervisor.wait(timeout=60)
        support.wait_for(lambda: not _alive(child), timeout=30, what="the stack's process to stop")
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)
        if supervisor.poll() is None:
            supervisor.kill()

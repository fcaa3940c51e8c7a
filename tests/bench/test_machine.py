"""``bench.machine.cpu_by_role``: the per-process CPU that ``bench.load`` prints per completed case
counts a whole process tree, the children it has already reaped included, and nothing of another's."""

from __future__ import annotations

import subprocess
import sys
import time

from bench.machine import cpu_by_role

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4:\n    pass\n"
#: a parent that runs a child burning 0.4 s of CPU, reaps it, then idles
PARENT = f"import subprocess, sys, time\nsubprocess.run([sys.executable, '-c', {BURN!r}])\ntime.sleep(60)\n"


def test_a_tree_counts_the_cpu_of_the_children_it_reaped_and_this_process_none_of_it() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT])
    try:
        before = cpu_by_role({"tree": parent.pid})
        deadline = time.monotonic() + 30
        while True:  # until the child's burn has been reaped into the parent's account
            after = cpu_by_role({"tree": parent.pid})
            if after["tree"] - before["tree"] >= 0.4 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert after["tree"] - before["tree"] >= 0.4
        assert after["this process"] - before["this process"] < 0.3  # polling, not burning
        assert cpu_by_role({"gone": 2**22 + 12345})["gone"] == 0.0  # no such process: nothing
    finally:
        parent.kill()
        parent.wait()

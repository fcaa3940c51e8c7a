"""``bench.machine.cpu_by_role``: the per-process CPU that ``bench.load`` prints per completed case
counts a whole process tree, the children it has already reaped included, and nothing of another's;
``round_trips`` tells a round trip to a server that was asleep from one right after the last;
``processor`` names the CPU the figures were taken on."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from bench.machine import cpu_by_role, processor, round_trips

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


def test_round_trips_tells_a_sleeping_server_from_a_busy_one() -> None:
    """A server that takes 3 ms to wake after 2 ms without a request (a halted core) and answers at
    once otherwise: the first figure is the busy server's, the second the sleeping one's."""
    last = [0.0]

    def ping() -> None:
        if time.perf_counter() - last[0] > 0.002:
            time.sleep(0.003)
        last[0] = time.perf_counter()

    back_to_back, after_pause = round_trips(ping, count=10, pause=0.004)
    assert back_to_back < 0.001 <= 0.003 <= after_pause


CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni amx_tile

processor\t: 1
model name\t: Another CPU
flags\t\t: fpu sse2
"""


def test_a_benchmark_names_the_cpu_and_the_vector_instructions_that_set_its_ratios(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO)
    assert processor(cpuinfo) == "Intel(R) Xeon(R) Processor (AVX2, AVX-512, VNNI, AMX)"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2\n")
    assert processor(cpuinfo) == "AMD EPYC 7B13 (AVX2)"
    assert processor(tmp_path / "missing")  # elsewhere: the platform's own words

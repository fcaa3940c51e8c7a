"""What else ran on the machine while a benchmark did: the CPU time of processes outside this one's
tree, and the time the hypervisor gave to other virtual machines.

On a shared machine a benchmark's absolute figures move with other people's work. The load average
before the start says whether the cores were already busy; :class:`OtherWork` says how much CPU
everything outside this process and its descendants (the servers it started) used meanwhile, and
how much the virtual machine's cores were stolen. Kernel threads working for the benchmark (disk
writes, Postgres's WAL writer and checkpointer) count as other work: the figure is an upper bound.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")

#: the vector instructions that set the model's speed on a CPU, as /proc/cpuinfo names them
_ISA = (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_vnni", "VNNI"), ("amx_tile", "AMX"))


def processor(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU in words, for a benchmark's header: its model name and which of AVX2, AVX-512, VNNI and
    AMX it has (``Intel(R) Xeon(R) Processor (AVX2, AVX-512, VNNI, AMX)``). The ratios a benchmark
    prints move with them: a faster pass makes every fixed cost around it a larger share. Where
    ``cpuinfo`` cannot be read, the platform's own description."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    fields: dict[str, str] = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())  # the first processor's
    flags = set(fields.get("flags", "").split())
    name = fields.get("model name") or platform.machine()
    have = [label for flag, label in _ISA if flag in flags]
    return f"{name} ({', '.join(have)})" if have else name


def busy_cpu_seconds() -> tuple[float, float]:
    """CPU seconds the whole machine has spent busy since boot, all cores together, and those the
    hypervisor gave to other virtual machines (steal) (/proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq) / TICK, steal / TICK


def own_cpu_seconds(root: int | None = None, markers: tuple[str, ...] = ()) -> float:
    """CPU seconds of process ``root`` (default: this one) and every live process under it, with the
    children they have already reaped; and of the processes whose command line holds one of
    ``markers`` (a Postgres backend names its database there: the work done for this benchmark's own
    scratch database)."""
    table = _process_table()
    roots = {root or os.getpid()} | {
        pid for pid, (*_, command) in table.items() if any(marker in command for marker in markers)
    }
    return sum(table[pid][1] for pid in _tree(table, roots))


class OtherWork:
    """Shares of the machine's cores taken from a benchmark since this was made: by processes outside
    this one's tree (and outside ``markers``, see :func:`own_cpu_seconds`; shared servers such as
    Redis count as other work), and by the hypervisor for other virtual machines (steal)."""

    def __init__(self, markers: tuple[str, ...] = ()) -> None:
        self.markers = markers
        self.started = time.monotonic()
        self.busy, self.steal = busy_cpu_seconds()
        self.own = own_cpu_seconds(markers=markers)

    def shares(self) -> tuple[float, float]:
        """(other processes, steal), each a fraction of all cores over the time since this was made."""
        capacity = (time.monotonic() - self.started) * (os.cpu_count() or 1)
        busy, steal = busy_cpu_seconds()
        others = (busy - self.busy) - (own_cpu_seconds(markers=self.markers) - self.own)
        return max(0.0, others) / capacity, (steal - self.steal) / capacity


def _process_table() -> dict[int, tuple[int, float, float, str]]:
    """pid -> (parent pid, CPU seconds with reaped children, CPU seconds of its own, command line)."""
    table: dict[int, tuple[int, float, float, str]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_text(errors="replace").replace("\0", " ")
        except (OSError, IndexError):  # the process ended meanwhile
            continue
        own = sum(int(v) for v in fields[11:13]) / TICK  # utime, stime
        table[int(stat.parent.name)] = (int(fields[1]), own + sum(int(v) for v in fields[13:15]) / TICK, own, command)
    return table


def _tree(table: dict[int, tuple[int, float, float, str]], roots: set[int]) -> set[int]:
    """The live processes among ``roots`` and every live process under them."""
    children: dict[int, list[int]] = {}
    for pid, (parent, *_rest) in table.items():
        children.setdefault(parent, []).append(pid)
    found: set[int] = set()
    stack = list(roots)
    while stack:
        pid = stack.pop()
        if pid in table and pid not in found:
            found.add(pid)
            stack.extend(children.get(pid, []))
    return found


def cpu_by_role(
    roots: dict[str, int], *, database: str | None = None, besides: frozenset[int] = frozenset()
) -> dict[str, float]:
    """CPU seconds so far of each named process tree (``roots``: name -> pid; the process, its live
    descendants and the children they reaped), of the Postgres backends serving ``database`` (their
    command line names it) as ``postgres`` (but for the backends ``besides``: the benchmark's own
    connections), and of this process alone (its threads, not its children) as ``this process``. Two
    calls bracket a run; their difference is where its CPU went."""
    table = _process_table()
    spent = {name: sum(table[pid][1] for pid in _tree(table, {root})) for name, root in roots.items()}
    if database is not None:
        spent["postgres"] = sum(
            total
            for pid, (_, total, _, command) in table.items()
            if command.startswith("postgres: ") and database in command and pid not in besides
        )
    spent["this process"] = table[os.getpid()][2] if os.getpid() in table else 0.0
    return spent


def round_trips(ping: Callable[[], object], *, count: int = 60, pause: float = 0.005) -> tuple[float, float]:
    """Median seconds of one round trip (``ping``) to a server process: right after the previous one,
    and after ``pause`` seconds of nothing, when the server's process, and on an idle machine its
    core, has gone to sleep. A case at idle meets the second at each of its steps (a statement, a
    Redis command, a hand-off between processes); on a virtual machine whose idle cores halt, waking
    one costs most of it (docs/PERFORMANCE.md)."""
    ping()
    back_to_back, after_pause = [], []
    for _ in range(count):
        started = time.perf_counter()
        ping()
        back_to_back.append(time.perf_counter() - started)
        time.sleep(pause)
        started = time.perf_counter()
        ping()
        after_pause.append(time.perf_counter() - started)
    return statistics.median(back_to_back), statistics.median(after_pause)

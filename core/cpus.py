"""How many cores this process may use: the CPUs it may run on, capped by a cgroup CPU quota.

``os.cpu_count()`` counts the host's cores. In a container with a CPU limit (compose's ``cpus:``, a
Kubernetes ``limits.cpu``) the kernel throttles the process to its quota instead, so a worker that
forked one child per host core (64 on a large GPU host) ran 64 children on the CPU time of a few,
each with its own model in memory and its own Postgres connections. Here the count is the process's
CPU affinity (a ``cpuset``), and no more than its quota in whole cores, rounded down (a partial core
is throttled, not gained), never under 1: the rule Go's ``automaxprocs`` follows.

The quota is the smallest along the process's cgroup and its parents: cgroup v2's ``cpu.max``
("max 100000" or "<quota> <period>"), or v1's ``cpu.cfs_quota_us`` (-1: none) over
``cpu.cfs_period_us``. A cgroup file that cannot be read means no quota.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def usable_cpus() -> int:
    """The cores this process may use: its CPU affinity, capped by its cgroup CPU quota."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        count = os.cpu_count() or 1
    quota = cpu_quota()
    if quota is not None:
        count = min(count, math.floor(quota))
    return max(1, count)


def cpu_quota(root: Path = CGROUP_ROOT, membership: Path = PROC_CGROUP) -> float | None:
    """The process's CPU quota in cores (1.5: one and a half), or ``None`` when it has none."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    quotas: list[float] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # cgroup v2's unified hierarchy: "0::/path"
            quotas += _along(root, path, _v2_quota)
        elif "cpu" in controllers.split(","):  # cgroup v1: "4:cpu,cpuacct:/path"
            quotas += _along(root / controllers, path, _v1_quota)
    return min(quotas) if quotas else None


def _along(mount: Path, path: str, read: Callable[[Path], float | None]) -> list[float]:
    """The quotas set on the cgroup at ``path`` under ``mount`` and on each of its parents. Inside a
    container the mount is usually the container's own cgroup, and its path reads "/": the mount's
    root is read in every case."""
    found: list[float] = []
    parts = [part for part in path.strip("/").split("/") if part and part != ".."]
    for depth in range(len(parts), -1, -1):
        quota = read(mount.joinpath(*parts[:depth]))
        if quota is not None:
            found.append(quota)
    return found


def _v2_quota(group: Path) -> float | None:
    try:
        limit, period = (group / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return _ratio(limit, period)


def _v1_quota(group: Path) -> float | None:
    try:
        limit = (group / "cpu.cfs_quota_us").read_text().strip()
        period = (group / "cpu.cfs_period_us").read_text().strip()
    except OSError:
        return None
    return _ratio(limit, period)


def _ratio(limit: str, period: str) -> float | None:
    try:
        quota, length = int(limit), int(period)
    except ValueError:  # "max": no quota
        return None
    return quota / length if quota > 0 and length > 0 else None

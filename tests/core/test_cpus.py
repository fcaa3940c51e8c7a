"""The cores a process may use: its affinity capped by its cgroup's CPU quota. A worker that counted
the host's cores forked one child per core of a 64-core host inside a container limited to a few,
each with a model in memory and its own Postgres connections. Fake cgroup trees stand in for the
kernel's."""

from __future__ import annotations

from pathlib import Path

import pytest

from core import cpus


def _tree(tmp_path: Path, membership: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(membership)
    return root, proc


def test_cgroup_v2_quota_is_the_smallest_along_the_path(tmp_path: Path) -> None:
    root, proc = _tree(
        tmp_path,
        "0::/kubepods/pod1/container\n",
        {
            "cpu.max": "max 100000\n",
            "kubepods/cpu.max": "800000 100000\n",
            "kubepods/pod1/cpu.max": "250000 100000\n",
            "kubepods/pod1/container/cpu.max": "max 100000\n",
        },
    )
    assert cpus.cpu_quota(root, proc) == 2.5


def test_a_containers_own_cgroup_mounted_at_the_root_counts(tmp_path: Path) -> None:
    """Inside a container (cgroup namespace) the process's path reads "/" and the mount is its cgroup."""
    root, proc = _tree(tmp_path, "0::/\n", {"cpu.max": "150000 100000\n"})
    assert cpus.cpu_quota(root, proc) == 1.5


def test_cgroup_v1_quota_and_no_quota(tmp_path: Path) -> None:
    files = {
        "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "300000\n",
        "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
    }
    root, proc = _tree(tmp_path, "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n", files)
    assert cpus.cpu_quota(root, proc) == 3.0
    unlimited = {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}
    root, proc = _tree(tmp_path / "none", "3:cpu:/\n", unlimited)
    assert cpus.cpu_quota(root, proc) is None
    assert cpus.cpu_quota(tmp_path / "absent", tmp_path / "absent-proc") is None


def test_usable_cpus_is_the_affinity_capped_by_whole_cores_of_the_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda _pid: set(range(64)))
    for quota, expected in ((None, 64), (2.5, 2), (0.5, 1), (128.0, 64)):
        monkeypatch.setattr(cpus, "cpu_quota", lambda quota=quota: quota)
        assert cpus.usable_cpus() == expected

"""Cgroup v1 and v2 against a fake hierarchy in a temporary directory (control files are plain files)."""

from __future__ import annotations

from pathlib import Path

import pytest

from jailer import Cgroup, CgroupError, CgroupMounts, detect_version, limits_settings

HYBRID = """\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
tmpfs /sys/fs/cgroup tmpfs ro,nosuid,nodev,noexec,mode=755 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,nosuid,nodev,noexec,relatime,xattr,name=systemd 0 0
cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,nosuid,nodev,noexec,relatime,cpu,cpuacct 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,nosuid,nodev,noexec,relatime,memory 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,nosuid,nodev,noexec,relatime,pids 0 0
"""
PURE_V2 = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime 0 0\n"


def test_mounts_of_a_hybrid_host() -> None:
    m = CgroupMounts.parse(HYBRID)
    assert m.v2 == "/sys/fs/cgroup/unified"
    assert m.v1 == {"cpu": "/sys/fs/cgroup/cpu,cpuacct", "cpuacct": "/sys/fs/cgroup/cpu,cpuacct",
                    "memory": "/sys/fs/cgroup/memory", "pids": "/sys/fs/cgroup/pids"}
    assert detect_version(m) == 1


def test_mounts_of_a_pure_v2_host_and_of_none() -> None:
    assert detect_version(CgroupMounts.parse(PURE_V2)) == 2
    with pytest.raises(CgroupError):
        detect_version(CgroupMounts.parse(""))


def test_limits_settings_per_version() -> None:
    assert limits_settings(1, memory_bytes=1 << 30, cpu_quota_us=50_000, pids=64) == (
        ("memory.limit_in_bytes", str(1 << 30)), ("cpu.cfs_period_us", "100000"), ("cpu.cfs_quota_us", "50000"),
        ("pids.max", "64"))
    assert limits_settings(2, memory_bytes=1 << 30, cpu_quota_us=50_000, pids=64) == (
        ("memory.max", str(1 << 30)), ("cpu.max", "50000 100000"), ("pids.max", "64"))
    with pytest.raises(CgroupError):
        limits_settings(3, pids=1)


def _touch(directory: Path, *names: str) -> None:
    """The control files the kernel would show in a new cgroup directory."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / name).touch()


def _fake_v1(tmp_path: Path, controllers=("memory", "cpu", "pids", "cpuset")) -> CgroupMounts:
    v1 = {}
    for c in controllers:
        (tmp_path / c).mkdir()
        v1[c] = str(tmp_path / c)
    (tmp_path / "cpuset" / "cpuset.cpus").write_text("0-1\n") if "cpuset" in controllers else None
    (tmp_path / "cpuset" / "cpuset.mems").write_text("0\n") if "cpuset" in controllers else None
    return CgroupMounts(v1=v1)


def test_v1_creates_one_cgroup_per_controller_and_writes_settings_and_joins(tmp_path: Path) -> None:
    mounts = _fake_v1(tmp_path)
    cg = Cgroup(1, "ember/vm1", limits_settings(1, memory_bytes=4096, pids=8) + (("cpuset.cpus", "1"),), mounts)
    assert cg.controllers == ("cpuset", "memory", "pids")
    # A real cgroup directory comes with its (empty) cpuset files: the fake must have them too.
    for level in ("ember", "ember/vm1"):
        (tmp_path / "cpuset" / level).mkdir(parents=True)
        (tmp_path / "cpuset" / level / "cpuset.cpus").write_text("")
        (tmp_path / "cpuset" / level / "cpuset.mems").write_text("")
    _touch(tmp_path / "memory/ember/vm1", "memory.limit_in_bytes", "cgroup.procs")
    _touch(tmp_path / "pids/ember/vm1", "pids.max", "cgroup.procs")
    _touch(tmp_path / "cpuset/ember/vm1", "cgroup.procs")
    cg.create()
    assert (tmp_path / "memory/ember/vm1/memory.limit_in_bytes").read_text() == "4096"
    assert (tmp_path / "pids/ember/vm1/pids.max").read_text() == "8"
    assert (tmp_path / "cpuset/ember/vm1/cpuset.cpus").read_text() == "1"  # the setting, after inheritance
    assert (tmp_path / "cpuset/ember/cpuset.mems").read_text() == "0"  # inherited from the root
    assert (tmp_path / "cpuset/ember/vm1/cpuset.mems").read_text() == "0"
    assert not (tmp_path / "cpu/ember").exists()  # no cpu setting: not joined
    cg.join(0)
    assert (tmp_path / "memory/ember/vm1/cgroup.procs").read_text() == "0"
    assert cg.read("pids.max") == "8"


def test_v1_controller_not_mounted(tmp_path: Path) -> None:
    cg = Cgroup(1, "x", (("hugetlb.limit", "1"),), _fake_v1(tmp_path))
    with pytest.raises(CgroupError, match="hugetlb"):
        cg.create()


def test_v2_enables_controllers_in_every_ancestor(tmp_path: Path) -> None:
    mounts = CgroupMounts(v2=str(tmp_path))
    cg = Cgroup(2, "ember/svc/slot-3", limits_settings(2, memory_bytes=4096, cpu_quota_us=1000, pids=8), mounts)
    for level in ("", "ember", "ember/svc"):
        _touch(tmp_path / level, "cgroup.subtree_control")
    _touch(tmp_path / "ember/svc/slot-3", "memory.max", "cpu.max", "pids.max")
    cg.create()
    for level in ("", "ember", "ember/svc"):
        assert (tmp_path / level / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    assert not (tmp_path / "ember/svc/slot-3/cgroup.subtree_control").exists()
    assert (tmp_path / "ember/svc/slot-3/cpu.max").read_text() == "1000 100000"
    assert cg.dirs() == {"": str(tmp_path / "ember/svc/slot-3")}


def test_remove_is_idempotent(tmp_path: Path) -> None:
    cg = Cgroup(1, "ember/vm", (("pids.max", "3"),), _fake_v1(tmp_path, ("pids",)))
    (tmp_path / "pids/ember/vm").mkdir(parents=True)
    cg.remove()
    cg.remove()
    assert not (tmp_path / "pids/ember/vm").exists()


@pytest.mark.parametrize("path", ["/abs", "a/../b", "", "a//b"])
def test_bad_paths_and_settings_are_refused(path: str) -> None:
    with pytest.raises(CgroupError):
        Cgroup(1, path, (), CgroupMounts())
    with pytest.raises(CgroupError):
        Cgroup(1, "ok", (("nodot", "1"),), CgroupMounts())

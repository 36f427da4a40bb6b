"""Control groups for jailed processes: cgroup v1 (one hierarchy per controller) and v2 (unified).

A setting is a control file name and its value, as Firecracker's jailer
takes them (``--cgroup memory.limit_in_bytes=268435456``); the part before
the first dot names the controller. With v1 each controller has its own
hierarchy (``/sys/fs/cgroup/memory/<path>``, ``/sys/fs/cgroup/pids/<path>``,
...) and a process joins one cgroup per controller. With v2 there is one
directory (``<cgroup2 mount>/<path>``) and the controllers must first be
enabled in every ancestor's ``cgroup.subtree_control``.

Version 1 vs 2 limits, for the settings the pool uses::

    memory   v1 memory.limit_in_bytes         v2 memory.max
    cpu      v1 cpu.cfs_quota_us + period     v2 cpu.max ("quota period")
    pids     v1 pids.max                      v2 pids.max

Hosts may be hybrid (v1 controllers plus a cgroup2 mount without them):
`detect_version` answers 1 whenever a v1 controller hierarchy is mounted.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass, field

__all__ = ["CgroupError", "CgroupMounts", "Cgroup", "detect_version", "limits_settings"]

_RMDIR_WAIT = 2.0
#: The v1 controllers (Documentation/admin-guide/cgroup-v1); a mount's options name the ones it holds.
V1_CONTROLLERS = frozenset({"blkio", "cpu", "cpuacct", "cpuset", "devices", "freezer", "hugetlb", "memory",
                            "misc", "net_cls", "net_prio", "perf_event", "pids", "rdma"})


class CgroupError(Exception):
    """A control group could not be created, configured, joined or removed."""


@dataclass(frozen=True)
class CgroupMounts:
    """Where the cgroup hierarchies are mounted: v1 controller -> mount point, and the cgroup2 mount."""

    v1: dict[str, str] = field(default_factory=dict)
    v2: str | None = None

    @classmethod
    def parse(cls, mounts_text: str) -> CgroupMounts:
        """From the text of ``/proc/self/mounts``."""
        v1: dict[str, str] = {}
        v2: str | None = None
        for line in mounts_text.splitlines():
            parts = line.split()
            if len(parts) < 4:
                continue
            target = parts[1].replace("\\040", " ")
            if parts[2] == "cgroup2" and v2 is None:
                v2 = target
            elif parts[2] == "cgroup":
                for opt in parts[3].split(","):
                    if opt in V1_CONTROLLERS:
                        v1.setdefault(opt, target)
        return cls(v1=v1, v2=v2)

    @classmethod
    def read(cls) -> CgroupMounts:
        """This host's mounts (as the caller's mount namespace sees them)."""
        try:
            with open("/proc/self/mounts") as f:
                return cls.parse(f.read())
        except OSError as exc:
            raise CgroupError(f"cannot read /proc/self/mounts: {exc}") from exc


def detect_version(mounts: CgroupMounts) -> int:
    """1 if any v1 controller hierarchy is mounted (hybrid hosts keep their controllers there), else 2."""
    if mounts.v1:
        return 1
    if mounts.v2 is not None:
        return 2
    raise CgroupError("no cgroup hierarchy is mounted")


def limits_settings(version: int, *, memory_bytes: int | None = None, cpu_quota_us: int | None = None,
                    cpu_period_us: int = 100_000, pids: int | None = None) -> tuple[tuple[str, str], ...]:
    """The control-file settings of a memory, CPU and pids limit for cgroup `version`."""
    out: list[tuple[str, str]] = []
    if version == 1:
        if memory_bytes is not None:
            out.append(("memory.limit_in_bytes", str(memory_bytes)))
        if cpu_quota_us is not None:
            out += [("cpu.cfs_period_us", str(cpu_period_us)), ("cpu.cfs_quota_us", str(cpu_quota_us))]
        if pids is not None:
            out.append(("pids.max", str(pids)))
    elif version == 2:
        if memory_bytes is not None:
            out.append(("memory.max", str(memory_bytes)))
        if cpu_quota_us is not None:
            out.append(("cpu.max", f"{cpu_quota_us} {cpu_period_us}"))
        if pids is not None:
            out.append(("pids.max", str(pids)))
    else:
        raise CgroupError(f"unknown cgroup version {version}")
    return tuple(out)


def _controller(setting: str) -> str:
    ctrl, dot, rest = setting.partition(".")
    if not dot or not ctrl or not rest or "/" in setting:
        raise CgroupError(f"invalid cgroup setting {setting!r}: expected <controller>.<file>")
    return ctrl


@dataclass(frozen=True)
class Cgroup:
    """One cgroup (`path` relative to each hierarchy's root), its settings and where the hierarchies are."""

    version: int
    path: str
    settings: tuple[tuple[str, str], ...]
    mounts: CgroupMounts
    #: Controllers to join even without a setting of theirs.
    extra_controllers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        parts = self.path.split("/")
        if not self.path or self.path.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise CgroupError(f"invalid cgroup path {self.path!r}: a relative path without '.', '..' or '//'")
        if self.version not in (1, 2):
            raise CgroupError(f"unknown cgroup version {self.version}")
        for name, _ in self.settings:
            _controller(name)

    def __repr__(self) -> str:
        return f"<Cgroup v{self.version} {self.path} settings={len(self.settings)}>"

    @property
    def controllers(self) -> tuple[str, ...]:
        """The controllers the settings use (plus `extra_controllers`), sorted, ``cgroup`` itself excluded."""
        names = {_controller(n) for n, _ in self.settings} | set(self.extra_controllers)
        names.discard("cgroup")
        return tuple(sorted(names))

    def dirs(self) -> dict[str, str]:
        """Controller (v2: ``""``) -> this cgroup's directory."""
        if self.version == 2:
            if self.mounts.v2 is None:
                raise CgroupError("cgroup v2 is not mounted on this host")
            return {"": os.path.join(self.mounts.v2, self.path)}
        out = {}
        for ctrl in self.controllers:
            root = self.mounts.v1.get(ctrl)
            if root is None:
                raise CgroupError(f"the cgroup v1 controller {ctrl!r} is not mounted on this host")
            out[ctrl] = os.path.join(root, self.path)
        return out

    def _setting_dir(self, name: str) -> str:
        dirs = self.dirs()
        return dirs[""] if self.version == 2 else dirs[_controller(name)]

    def exists(self) -> bool:
        return all(os.path.isdir(d) for d in self.dirs().values())

    def create(self) -> None:
        """Make the directories (idempotent) and write every setting."""
        if self.version == 2:
            self._enable_v2_controllers()
        for ctrl, path in self.dirs().items():
            try:
                os.makedirs(path, exist_ok=True)
            except OSError as exc:
                raise CgroupError(f"cannot create cgroup {path}: {exc}") from exc
            if ctrl == "cpuset":
                self._inherit_cpuset(path)
        self.apply(self.settings)

    def _enable_v2_controllers(self) -> None:
        """Write ``+<controller>`` into the subtree_control of the v2 root and of every ancestor of the leaf."""
        assert self.mounts.v2 is not None
        wanted = " ".join(f"+{c}" for c in self.controllers)
        if not wanted:
            return
        level = self.mounts.v2
        for part in self.path.split("/"):
            try:
                os.makedirs(level, exist_ok=True)
            except OSError as exc:
                raise CgroupError(f"cannot create cgroup {level}: {exc}") from exc
            self._write(os.path.join(level, "cgroup.subtree_control"), wanted)
            level = os.path.join(level, part)

    def _inherit_cpuset(self, leaf: str) -> None:
        """v1 cpuset cgroups start with empty cpus/mems (no task may join): copy each parent's, top down."""
        root = self.mounts.v1["cpuset"]
        level = root
        for part in self.path.split("/"):
            child = os.path.join(level, part)
            for name in ("cpuset.cpus", "cpuset.mems"):
                if not self._read(os.path.join(child, name)):
                    self._write(os.path.join(child, name), self._read(os.path.join(level, name)))
            level = child
        assert level == leaf

    def apply(self, settings: tuple[tuple[str, str], ...]) -> None:
        """Write `settings` into this (existing) cgroup, in order."""
        for name, value in settings:
            self._write(os.path.join(self._setting_dir(name), name), value)

    def read(self, name: str) -> str:
        """The current content of control file `name` (e.g. ``pids.max``), stripped."""
        return self._read(os.path.join(self._setting_dir(name), name))

    def join(self, pid: int = 0) -> None:
        """Move process `pid` (0: the caller) and all its threads into this cgroup."""
        for path in self.dirs().values():
            self._write(os.path.join(path, "cgroup.procs"), str(pid))

    def procs(self) -> list[int]:
        """The processes in this cgroup (v1: in its first controller's hierarchy)."""
        dirs = list(self.dirs().values())
        if not dirs:
            return []
        text = self._read(os.path.join(dirs[0], "cgroup.procs"))
        return [int(x) for x in text.split()]

    def remove(self) -> None:
        """Remove the directories (idempotent); waits briefly for exiting processes to leave."""
        for path in self.dirs().values():
            deadline = time.monotonic() + _RMDIR_WAIT
            while True:
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                        raise CgroupError(f"cannot remove cgroup {path}: {exc}") from exc
                    time.sleep(0.01)

    @staticmethod
    def _write(path: str, value: str) -> None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        except OSError as exc:
            raise CgroupError(f"cannot open {path}: {exc}") from exc
        try:
            os.write(fd, value.encode())
        except OSError as exc:
            raise CgroupError(f"cannot write {value!r} to {path}: {exc}") from exc
        finally:
            os.close(fd)

    @staticmethod
    def _read(path: str) -> str:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError as exc:
            raise CgroupError(f"cannot read {path}: {exc}") from exc

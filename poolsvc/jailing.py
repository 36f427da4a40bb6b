"""The jail of every pool VMM: a uid/gid and a cgroup per slot, a chroot per VM.

Primer. A *jail slot* is leased by a microVM for its whole life: slot `n`
gives the VMM uid = gid = ``uid_base + n`` (no two live VMMs share one) and
the cgroup ``<cgroup_parent>/<service id>/slot-<n>``. Cgroups are pooled:
creating one (a directory per v1 hierarchy) is a slow host-side operation,
so a slot's cgroup is created on first use, its limits rewritten only when
they change, and it is removed only by `remove_cgroups` (service start and
shutdown). The chroot is the caller's directory (`Launcher`: ``<run
root>/.jail/<vm id>``, on a tmpfs of its own)::

    <chroot>/             owned by the slot's uid, 0700
      dev/kvm, dev/net/tun, dev/userfaultfd   (the host's major/minor, owned by the uid)
      snapshot/vm.state   hard links of the template's files (root-owned, 0444),
      snapshot/vm.state.sig   with its signature when the store has a snapshot key
      snapshot/vm.mem
      snapshot/rootfs.ext4   (a read-only root filesystem shared by every clone)
      rootfs.ext4         (a writable clone's own copy, owned by the uid, bind-mounted read-write)
      api.sock            (bound by the zygote, owned by the uid)
      vsock.sock          (made by the VMM)

Template files on another filesystem than the chroot's are bind-mounted
(read-only, in the VMM's own mount namespace) instead of hard-linked.
The VMM joins the slot's network namespace, if it has one, inside the jail.
"""

from __future__ import annotations

import os
import re
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from snapshot.auth import SIG_SUFFIX

from jailer import (
    BindMount,
    Cgroup,
    CgroupError,
    CgroupMounts,
    CgroupSpec,
    HardLink,
    JailError,
    JailSpec,
    cgroup_of,
    detect_version,
    limits_settings,
    prepare,
)

__all__ = ["JailConfig", "JailPool", "JailedVm", "JailPoolError", "JAIL_API_SOCK", "JAIL_VSOCK"]

MIB = 1 << 20
#: Where the VMM's sockets are inside its jail.
JAIL_API_SOCK = "/api.sock"
JAIL_VSOCK = "/vsock.sock"
_SNAPSHOT_DIR = "/snapshot"
_WRITABLE_ROOTFS = "/rootfs.ext4"
_SLOT_RE = re.compile(r"slot-(\d+)")


class JailPoolError(Exception):
    """A jail slot could not be leased or its jail built."""


@dataclass(frozen=True)
class JailConfig:
    """How pool VMMs are jailed."""

    #: Slot n runs as uid = gid = uid_base + n.
    uid_base: int = 200_000
    #: How many slots (and so uids) there are.
    slots: int = 4096
    #: Slot cgroups live under ``<cgroup_parent>/<service id>/``.
    cgroup_parent: str = "ember"
    #: 1, 2, or 0: detect (1 on hybrid hosts).
    cgroup_version: int = 0
    #: memory limit = guest memory + this (the VMM's own memory).
    mem_overhead_mib: int = 256
    #: CPU limit = (vCPUs + this) cores; None: no CPU limit.
    cpu_extra_cores: float | None = 1.0
    pids_max: int = 128
    no_file: int = 2048
    #: Largest file the VMM may write (RLIMIT_FSIZE): its rootfs clone and logs stay below it.
    fsize_mib: int = 16384
    #: Each VMM is pid 1 of its own PID namespace (through the zygote; direct spawns are not).
    new_pid_ns: bool = True


@dataclass(frozen=True)
class JailedVm:
    """One leased jail: its spec and the paths the launcher needs."""

    spec: JailSpec
    slot: int
    #: Host paths of the VMM's sockets.
    api_sock: Path
    vsock_uds: Path
    #: Paths inside the jail, for the snapshot load.
    state_path: str
    mem_path: str
    rootfs_path: str | None

    def host_path(self, jail_path: str) -> Path:
        return Path(self.spec.host_path(jail_path))


class JailPool:
    """Slots (uid + pooled cgroup) leased by live microVMs. Thread-safe."""

    def __init__(self, config: JailConfig, service_id: str, mounts: CgroupMounts | None = None) -> None:
        self.config = config
        self.service_id = service_id
        self.mounts = mounts if mounts is not None else CgroupMounts.read()
        self.cgroup_version = config.cgroup_version or detect_version(self.mounts)
        self._leases: dict[str, int] = {}
        self._settings: dict[int, tuple[tuple[str, str], ...]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"<JailPool uid={self.config.uid_base}+ cgroup=v{self.cgroup_version} leased={len(self._leases)} "
                f"cgroups={len(self._settings)}>")

    @property
    def cgroup_base(self) -> str:
        return f"{self.config.cgroup_parent.strip('/')}/{self.service_id}"

    def _cgroup(self, slot: int, settings: tuple[tuple[str, str], ...]) -> Cgroup:
        return Cgroup(self.cgroup_version, f"{self.cgroup_base}/slot-{slot}", settings, self.mounts)

    def lease(self, vm_id: str) -> int:
        """The lowest free slot, now `vm_id`'s."""
        with self._lock:
            if vm_id in self._leases:
                return self._leases[vm_id]
            used = set(self._leases.values())
            for slot in range(self.config.slots):
                if slot not in used:
                    self._leases[vm_id] = slot
                    return slot
        raise JailPoolError(f"all {self.config.slots} jail slots are in use")

    def release(self, vm_id: str) -> None:
        """Give `vm_id`'s slot back (its VMM must be dead); its cgroup stays for the next VM."""
        with self._lock:
            self._leases.pop(vm_id, None)

    def leased(self, vm_id: str) -> int | None:
        with self._lock:
            return self._leases.get(vm_id)

    def limits(self, vcpus: int, mem_mib: int) -> tuple[tuple[str, str], ...]:
        cfg = self.config
        quota = None
        if cfg.cpu_extra_cores is not None:
            quota = int((vcpus + cfg.cpu_extra_cores) * 100_000)
        return limits_settings(self.cgroup_version, memory_bytes=(mem_mib + cfg.mem_overhead_mib) * MIB,
                               cpu_quota_us=quota, cpu_period_us=100_000, pids=cfg.pids_max)

    def build(self, vm_id: str, chroot: Path, *, state: Path, mem: Path, rootfs: Path | None, vcpus: int,
              mem_mib: int, netns: str | None = None, new_pid_ns: bool | None = None,
              writable_rootfs: Path | None = None) -> JailedVm:
        """Lease a slot and build `vm_id`'s jail in `chroot` (template files linked in, cgroup ready).

        `rootfs`: a read-only root filesystem shared by the clones.
        `writable_rootfs`: instead, this clone's own copy (the caller's file,
        kept outside the chroot): chowned to the slot's uid and bind-mounted
        read-write at ``/rootfs.ext4``. Releases the slot if it fails.
        """
        slot = self.lease(vm_id)
        try:
            settings = self.limits(vcpus, mem_mib)
            cg = self._cgroup(slot, settings)
            with self._lock:
                known = self._settings.get(slot)
            if known is None:
                cg.create()  # idempotent: a predecessor's leftover directory is reused too
            elif known != settings:
                cg.apply(settings)
            with self._lock:
                self._settings[slot] = settings
            uid = self.config.uid_base + slot
            links, binds = [], []
            sources = {"vm.state": state, "vm.mem": mem}
            if rootfs is not None:
                sources["rootfs.ext4"] = rootfs
            signature = Path(f"{state}{SIG_SUFFIX}")  # a signed template's MAC, checked by the VMM
            if signature.exists():
                sources[f"vm.state{SIG_SUFFIX}"] = signature
            run_dev = os.stat(chroot.parent).st_dev
            for name, src in sources.items():
                _seal_template_file(src)
                target = f"{_SNAPSHOT_DIR}/{name}"
                if os.stat(src).st_dev == run_dev:
                    links.append(HardLink(str(src), target))
                else:
                    binds.append(BindMount(str(src), target, read_only=True))
            if writable_rootfs is not None:
                os.chown(writable_rootfs, uid, uid)
                binds.append(BindMount(str(writable_rootfs), _WRITABLE_ROOTFS, read_only=False))
            spec = JailSpec(
                id=vm_id, chroot=str(chroot), uid=uid, gid=uid, netns=netns,
                cgroup=CgroupSpec(path=cg.path, settings=settings, version=self.cgroup_version),
                rlimits=(("no-file", self.config.no_file), ("fsize", self.config.fsize_mib << 20)),
                new_pid_ns=self.config.new_pid_ns if new_pid_ns is None else new_pid_ns,
                links=tuple(links), binds=tuple(binds))
            prepare(spec, cgroup=False)
        except (JailError, CgroupError, OSError, ValueError) as exc:
            self.release(vm_id)
            raise JailPoolError(f"cannot build the jail of {vm_id!r}: {exc}") from exc
        return JailedVm(spec=spec, slot=slot, api_sock=Path(spec.host_path(JAIL_API_SOCK)),
                        vsock_uds=Path(spec.host_path(JAIL_VSOCK)), state_path=f"{_SNAPSHOT_DIR}/vm.state",
                        mem_path=f"{_SNAPSHOT_DIR}/vm.mem",
                        rootfs_path=(f"{_SNAPSHOT_DIR}/rootfs.ext4" if rootfs is not None
                                     else _WRITABLE_ROOTFS if writable_rootfs is not None else None))

    def cgroup_of(self, spec: JailSpec) -> Cgroup | None:
        return cgroup_of(spec, self.mounts)

    def remove_cgroups(self) -> list[str]:
        """Remove every slot cgroup of this service no live VM leases (service start and shutdown)."""
        removed = []
        with self._lock:
            leased = set(self._leases.values())
        for root in self._hierarchy_roots():
            base = os.path.join(root, self.cgroup_base)
            try:
                names = os.listdir(base)
            except FileNotFoundError:
                continue
            for name in names:
                m = _SLOT_RE.fullmatch(name)
                if m is None or int(m.group(1)) in leased:
                    continue
                try:
                    os.rmdir(os.path.join(base, name))
                    removed.append(os.path.join(base, name))
                except OSError:
                    pass  # still holds a process (a VMM a crashed predecessor left): kept
            for level in (base, os.path.dirname(base)):
                try:
                    os.rmdir(level)
                except OSError:
                    break
        with self._lock:
            for slot in list(self._settings):
                if slot not in leased:
                    del self._settings[slot]
        return removed

    def _hierarchy_roots(self) -> list[str]:
        if self.cgroup_version == 2:
            return [self.mounts.v2] if self.mounts.v2 else []
        return sorted({self.mounts.v1[c] for c in ("memory", "cpu", "pids") if c in self.mounts.v1})


def _seal_template_file(path: Path) -> None:
    """Template files are shared by every jail: root-owned and read-only (0444)."""
    st = os.stat(path)
    if stat.S_IMODE(st.st_mode) != 0o444 or st.st_uid != 0 or st.st_gid != 0:
        os.chown(path, 0, 0)
        os.chmod(path, 0o444)

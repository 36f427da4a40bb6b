"""Snapshots of a paused microVM, and the state a restore starts from (Firecracker's persist.rs).

`create_snapshot` asks every component for its state — each vCPU (on its
own thread), the VM's irqchip/PIT/clock, the legacy devices, every virtio
transport and device, VMGenID — and writes one state tree with
`snapshot.format` (magic, format version, SHA-256) plus the guest memory
file (full, or only the pages dirtied since the last snapshot).

`MicrovmState.read` is the other direction's first half: it reads a state
file as untrusted input and turns it into typed, validated component
states, or raises `SnapshotLoadError` naming what is wrong — before any VM
exists. `builder.build_from_snapshot` does the rest. `MemoryBackend`s give
the restored VM its memory: the memory file mapped MAP_PRIVATE (clones
share the page cache until they write), or anonymous memory registered
with userfaultfd and handed to a page server over a Unix socket, as
Firecracker does (the uffd over SCM_RIGHTS plus the JSON region list).

Tree layout (format 1.x)::

    {"ember": {"version", "instance_id"},
     "machine": {"vcpu_count", "mem_size_mib", "track_dirty_pages", "pvm_compat"},
     "config": <GET /vm/config JSON, as a string>,
     "memory": {"layout": MemoryFileLayout tree, "kind": "full"|"diff",
                "dirty_bitmaps": [bytes per region] (diff only)},
     "vm": VmKvmState tree, "vcpus": [VcpuKvmState tree, ...],
     "devices": {"serial": SerialState, "i8042": I8042State,
                 "virtio": [{"name", "slot", "kind", "transport", "device"}, ...],
                 "vmgenid": VmGenIdState tree or None}}
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import structlog

from snapshot.auth import (
    SnapshotAuthError,
    SnapshotKey,
    SnapshotSignature,
    memory_digest_of_buffers,
    read_signature,
    sign_snapshot,
    signature_path,
    write_signature,
)
from snapshot.format import (
    MemoryFileLayout,
    SnapshotFormatError,
    decode_state,
    read_bounded,
    read_state,
    write_state,
)
from snapshot.memfile import (
    MemoryFileError,
    MemoryFileStats,
    memory_file_sealed,
    verify_memory_fd,
    write_diff_memory_file,
    write_memory_file,
)
from snapshot.uffd import UffdMapping
from snapshot.uffd_server import UffdError, Userfaultfd, send_handshake
from vmm import __version__
from vmm.config import ConfigError, VmConfig
from vmm.devices.acpi import VmGenIdState
from vmm.devices.legacy.i8042 import I8042State
from vmm.devices.legacy.serial import SerialState
from vmm.devices.virtio.block import Block, BlockState
from vmm.devices.virtio.net import Net, NetState
from vmm.devices.virtio.transport.mmio import MmioTransportState
from vmm.devices.virtio.vsock import Vsock, VsockState
from vmm.memory import GuestMemory, GuestMemoryError
from vmm.state_tree import StateTreeError, from_tree, to_tree, warm
from vmm.vstate.persist import VcpuKvmState, VmKvmState, VstatePersistError, save_vm

log = structlog.get_logger("vmm.persist")

__all__ = [
    "PersistError",
    "SnapshotCreateError",
    "SnapshotLoadError",
    "CreateResult",
    "VirtioEntry",
    "MicrovmState",
    "create_snapshot",
    "FileBackend",
    "UffdBackend",
    "open_memory",
    "prepare_uffd",
]

#: Largest state file accepted on load (a 32-vCPU VM's state is ~200 KiB).
MAX_STATE_FILE_SIZE = 16 << 20
_VIRTIO_KINDS: dict[str, type] = {"block": BlockState, "net": NetState, "vsock": VsockState}


def warm_state_types() -> None:
    """Resolve the annotations of every state type a restore reads (see `state_tree.warm`)."""
    warm(MmioTransportState, SerialState, I8042State, VmGenIdState,
         *_VIRTIO_KINDS.values())


class PersistError(Exception):
    """A snapshot could not be created or loaded."""


class SnapshotCreateError(PersistError):
    """The snapshot could not be created; the microVM is unchanged and stays paused."""


class SnapshotLoadError(PersistError):
    """The snapshot cannot be loaded; no microVM was started."""


# --- create ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreateResult:
    state_bytes: int
    memory: MemoryFileStats
    duration_us: int
    signed: bool = False


def _device_kind(device: object) -> str:
    if isinstance(device, Block):
        return "block"
    if isinstance(device, Net):
        return "net"
    if isinstance(device, Vsock):
        return "vsock"
    raise SnapshotCreateError(f"cannot snapshot a {type(device).__name__} device")


def create_snapshot(vmm: Any, *, snapshot_path: str, mem_file_path: str, diff: bool,
                    config: VmConfig, msr_indices: list[int], key: SnapshotKey | None = None) -> CreateResult:
    """Write the state of the paused `vmm` to `snapshot_path` and its memory to `mem_file_path`.

    Must run on the VMM's event loop thread (devices are driven there, so
    none runs while their state is taken) with every vCPU paused. With a
    `key`, the snapshot is signed: ``<snapshot_path>.sig`` holds a MAC over
    the state file and a digest of the *whole* guest memory (for a diff
    snapshot too: the memory file it loads with is the merged one). Without
    one, a stale signature beside `snapshot_path` is removed.
    """
    from vmm.vstate.persist import save_vcpu  # runs on each vCPU's thread

    started = time.monotonic_ns()
    mem: GuestMemory = vmm.vm.memory
    if diff and not vmm.vm.track_dirty_pages:
        raise SnapshotCreateError("Diff snapshots need dirty page tracking: set machine-config "
                                  "\"track_dirty_pages\": true before boot (or on snapshot load).")
    try:
        vcpu_states = [vcpu.call(lambda fd: save_vcpu(fd, msr_indices)) for vcpu in vmm.vcpus]
        vm_state = save_vm(vmm.vm.fd)
    except (VstatePersistError, OSError, RuntimeError, TimeoutError) as exc:
        raise SnapshotCreateError(f"cannot save the vCPU/VM state: {exc}") from exc

    devices = vmm.devices
    virtio = []
    manager = devices.get("virtio")
    for index, attached in enumerate(manager.devices if manager is not None else ()):
        virtio.append({"name": attached.name, "slot": index, "kind": _device_kind(attached.device),
                       "transport": to_tree(attached.transport.state()),
                       "device": to_tree(attached.device.state())})
    vmgenid = devices.get("vmgenid")
    layout = MemoryFileLayout.contiguous([(r.guest_addr, r.size) for r in mem.regions])
    memory_tree: dict[str, Any] = {"layout": layout.to_tree(), "kind": "diff" if diff else "full"}

    buffers = [r.mapping for r in mem.regions]
    bitmaps: list[bytes] | None = None
    if vmm.vm.track_dirty_pages:
        # Reading the dirty log also resets it: the next diff starts from here.
        try:
            kvm_bitmaps = [vmm.vm.fd.get_dirty_log(slot, r.size) for slot, r in enumerate(mem.regions)]
        except OSError as exc:
            raise SnapshotCreateError(f"cannot read KVM's dirty log: {exc}") from exc
        vmm_bitmaps = mem.take_dirty_bitmaps()
        bitmaps = [_or_bitmaps(k, v) for k, v in zip(kvm_bitmaps, vmm_bitmaps)]
    try:
        if diff:
            assert bitmaps is not None
            memory_tree["dirty_bitmaps"] = bitmaps
            stats = write_diff_memory_file(mem_file_path, layout, buffers, bitmaps)
        else:
            stats = write_memory_file(mem_file_path, layout, buffers)
    except (MemoryFileError, OSError) as exc:
        raise SnapshotCreateError(f"cannot write the memory file {mem_file_path}: {exc}") from exc

    tree = {
        "ember": {"version": __version__, "instance_id": vmm.instance_id},
        "machine": {"vcpu_count": len(vmm.vcpus), "mem_size_mib": config.machine_config.mem_size_mib,
                    "track_dirty_pages": bool(vmm.vm.track_dirty_pages),
                    "pvm_compat": bool(getattr(vmm, "pvm_compat", False))},
        "config": json.dumps(config.to_json(), sort_keys=True),
        "memory": memory_tree,
        "vm": vm_state.to_tree(),
        "vcpus": [s.to_tree() for s in vcpu_states],
        "devices": {
            "serial": to_tree(devices["serial"].state()),
            "i8042": to_tree(devices["i8042"].state()),
            "virtio": virtio,
            "vmgenid": to_tree(vmgenid.state()) if vmgenid is not None else None,
        },
    }
    try:
        data = write_state(snapshot_path, tree)
    except (SnapshotFormatError, OSError) as exc:
        # A memory file without its state file is no snapshot: do not leave it (a full disk
        # would stay full; bench/chaos.py).
        try:
            os.unlink(mem_file_path)
        except OSError:
            pass
        raise SnapshotCreateError(f"cannot write the snapshot file {snapshot_path}: {exc}") from exc
    sign_us = _sign(snapshot_path, buffers, key)
    duration_us = (time.monotonic_ns() - started) // 1000
    log.info("snapshot created", path=snapshot_path, mem_file=mem_file_path, kind=memory_tree["kind"],
             state_bytes=len(data), mem_data_bytes=stats.data_bytes, took_us=duration_us,
             signed=key is not None, sign_us=sign_us)
    return CreateResult(len(data), stats, duration_us, signed=key is not None)


def _sign(snapshot_path: str, buffers: list, key: SnapshotKey | None) -> int:
    """Write (with `key`) or remove (without) the signature beside `snapshot_path`; µs spent."""
    started = time.monotonic_ns()
    sig_path = signature_path(snapshot_path)
    try:
        if key is None:
            try:
                os.unlink(sig_path)
            except FileNotFoundError:
                pass
            return 0
        # The state is read back rather than kept: what is signed is what the file holds.
        state = read_bounded(snapshot_path, MAX_STATE_FILE_SIZE)
        write_signature(sig_path, sign_snapshot(key, state, memory_digest_of_buffers(buffers)))
    except (SnapshotFormatError, SnapshotAuthError, OSError) as exc:
        raise SnapshotCreateError(f"cannot sign the snapshot {snapshot_path}: {exc}") from exc
    return (time.monotonic_ns() - started) // 1000


def _or_bitmaps(a: bytes, b: bytes) -> bytes:
    """Bitwise OR of two little-endian page bitmaps (as whole integers: no per-byte loop)."""
    n = max(len(a), len(b))
    return (int.from_bytes(a, "little") | int.from_bytes(b, "little")).to_bytes(n, "little")


# --- load: the state file as untrusted input -------------------------------------------------


@dataclass(frozen=True)
class VirtioEntry:
    name: str
    slot: int
    kind: str
    transport: MmioTransportState
    device: BlockState | NetState | VsockState


@dataclass(frozen=True)
class MicrovmState:
    """A state file, read and checked: every component's typed state."""

    instance_id: str
    ember_version: str
    vcpu_count: int
    mem_size_mib: int
    track_dirty_pages: bool
    pvm_compat: bool
    config: VmConfig
    layout: MemoryFileLayout
    memory_kind: str
    vm: VmKvmState
    vcpus: tuple[VcpuKvmState, ...]
    serial: SerialState
    i8042: I8042State
    virtio: tuple[VirtioEntry, ...]
    vmgenid: VmGenIdState | None
    #: The authenticated signature the state was checked against (None: read without a key).
    signature: SnapshotSignature | None = None

    @classmethod
    def read(cls, path: str, *, key: SnapshotKey | None = None) -> "MicrovmState":
        """Read and validate `path`; `SnapshotLoadError` (with the reason) for anything wrong.

        With a `key`, ``<path>.sig`` must exist and authenticate, and the
        state bytes must be the signed ones — all checked before the state
        is decoded. Without one the state loads as in Firecracker (unsigned;
        a signature beside it is not looked at).
        """
        if key is None:
            try:
                tree = read_state(path, max_size=MAX_STATE_FILE_SIZE)
            except SnapshotFormatError as exc:
                raise SnapshotLoadError(f"invalid snapshot file {path}: {exc}") from exc
            signature = None
        else:
            try:
                signature = read_signature(key, signature_path(path))
                data = read_bounded(path, MAX_STATE_FILE_SIZE)
                signature.check_state(data)
            except SnapshotAuthError as exc:
                raise SnapshotLoadError(f"snapshot {path} is not authentic: {exc}") from exc
            except SnapshotFormatError as exc:
                raise SnapshotLoadError(f"invalid snapshot file {path}: {exc}") from exc
            try:
                tree = decode_state(data, max_size=MAX_STATE_FILE_SIZE)
            except SnapshotFormatError as exc:
                raise SnapshotLoadError(f"invalid snapshot file {path}: {exc}") from exc
        try:
            state = cls.from_tree(tree)
        except (StateTreeError, VstatePersistError, SnapshotFormatError, ConfigError, ValueError) as exc:
            raise SnapshotLoadError(f"invalid snapshot file {path}: {exc}") from exc
        if signature is not None:
            if signature.memory.size != state.layout.file_size:
                raise SnapshotLoadError(f"snapshot {path} is not authentic: the signed memory has "
                                        f"{signature.memory.size} bytes, the layout {state.layout.file_size}")
            state = replace(state, signature=signature)
        return state

    @classmethod
    def from_tree(cls, tree: Any) -> "MicrovmState":
        top = _obj(tree, "state", {"ember", "machine", "config", "memory", "vm", "vcpus", "devices"})
        ember = _obj(top["ember"], "ember", {"version", "instance_id"})
        machine = _obj(top["machine"], "machine", {"vcpu_count", "mem_size_mib", "track_dirty_pages",
                                                    "pvm_compat"})
        vcpu_count = _int(machine["vcpu_count"], "machine.vcpu_count", 1, 32)
        mem_mib = _int(machine["mem_size_mib"], "machine.mem_size_mib", 1, 1 << 24)
        memory = top["memory"]
        if not isinstance(memory, dict) or "layout" not in memory or "kind" not in memory:
            raise StateTreeError("memory: expected an object with layout and kind")
        layout = MemoryFileLayout.from_tree(memory["layout"])
        if memory["kind"] not in ("full", "diff"):
            raise StateTreeError(f"memory.kind: {memory['kind']!r} is not full or diff")
        if layout.guest_size != mem_mib << 20:
            raise StateTreeError(f"memory layout holds {layout.guest_size} bytes, the machine "
                                 f"{mem_mib} MiB")
        if not isinstance(top["config"], str) or len(top["config"]) > 1 << 20:
            raise StateTreeError("config: expected a JSON string")
        config = VmConfig.from_json(json.loads(top["config"]))
        vcpus = top["vcpus"]
        if not isinstance(vcpus, list) or len(vcpus) != vcpu_count:
            raise StateTreeError(f"vcpus: expected {vcpu_count} vCPU states")
        devices = _obj(top["devices"], "devices", {"serial", "i8042", "virtio", "vmgenid"})
        raw_virtio = devices["virtio"]
        if not isinstance(raw_virtio, list) or len(raw_virtio) > 64:
            raise StateTreeError("devices.virtio: expected a list of at most 64 devices")
        entries = []
        for i, raw in enumerate(raw_virtio):
            e = _obj(raw, f"devices.virtio[{i}]", {"name", "slot", "kind", "transport", "device"})
            kind = e["kind"]
            if not isinstance(kind, str) or kind not in _VIRTIO_KINDS:  # a dict or list is unhashable
                raise StateTreeError(f"devices.virtio[{i}].kind: unknown device kind {kind!r}")
            if e["slot"] != i:
                raise StateTreeError(f"devices.virtio[{i}].slot: devices must fill slots in order")
            if not isinstance(e["name"], str):
                raise StateTreeError(f"devices.virtio[{i}].name: expected a string")
            entries.append(VirtioEntry(e["name"], i, kind,
                                       from_tree(MmioTransportState, e["transport"], f"devices.virtio[{i}].transport"),
                                       from_tree(_VIRTIO_KINDS[kind], e["device"], f"devices.virtio[{i}].device")))
        return cls(
            instance_id=_str(ember["instance_id"], "ember.instance_id"),
            ember_version=_str(ember["version"], "ember.version"),
            vcpu_count=vcpu_count, mem_size_mib=mem_mib,
            track_dirty_pages=_bool(machine["track_dirty_pages"], "machine.track_dirty_pages"),
            pvm_compat=_bool(machine["pvm_compat"], "machine.pvm_compat"),
            config=config, layout=layout, memory_kind=memory["kind"],
            vm=VmKvmState.from_tree(top["vm"]),
            vcpus=tuple(VcpuKvmState.from_tree(v) for v in vcpus),
            serial=from_tree(SerialState, devices["serial"], "devices.serial"),
            i8042=from_tree(I8042State, devices["i8042"], "devices.i8042"),
            virtio=tuple(entries),
            vmgenid=VmGenIdState.from_tree(devices["vmgenid"]) if devices["vmgenid"] is not None else None,
        )

    def with_overrides(self, *, network: dict[str, str], drives: dict[str, str],
                       vsock_uds_path: str | None) -> "MicrovmState":
        """Apply a load request's overrides (TAP names, drive paths, vsock socket); unknown ids are errors."""
        by_iface = {e.device.iface_id: e for e in self.virtio if isinstance(e.device, NetState)}
        by_drive = {e.device.drive_id: e for e in self.virtio if isinstance(e.device, BlockState)}
        for iface_id in network:
            if iface_id not in by_iface:
                raise SnapshotLoadError(f"Invalid network interface ID in network_overrides: `{iface_id}` "
                                        "is not in the snapshot.")
        for drive_id in drives:
            if drive_id not in by_drive:
                raise SnapshotLoadError(f"Invalid drive ID in drive_overrides: `{drive_id}` is not in the snapshot.")
        if vsock_uds_path is not None and not any(e.kind == "vsock" for e in self.virtio):
            raise SnapshotLoadError("vsock_override given but the snapshot has no vsock device.")
        entries = []
        for e in self.virtio:
            dev = e.device
            if isinstance(dev, NetState) and dev.iface_id in network:
                dev = replace(dev, host_dev_name=network[dev.iface_id])
            elif isinstance(dev, BlockState) and dev.drive_id in drives:
                dev = replace(dev, path=drives[dev.drive_id])
            elif isinstance(dev, VsockState) and vsock_uds_path is not None:
                dev = replace(dev, uds_path=vsock_uds_path)
            entries.append(replace(e, device=dev))
        config = self.config
        config = replace(
            config,
            drives=tuple(replace(d, path_on_host=drives.get(d.drive_id, d.path_on_host)) for d in config.drives),
            network_interfaces=tuple(replace(n, host_dev_name=network.get(n.iface_id, n.host_dev_name))
                                     for n in config.network_interfaces),
            vsock=(replace(config.vsock, uds_path=vsock_uds_path)
                   if config.vsock is not None and vsock_uds_path is not None else config.vsock))
        return replace(self, virtio=tuple(entries), config=config)


def _obj(value: Any, path: str, keys: set[str]) -> dict:
    if not isinstance(value, dict):
        raise StateTreeError(f"{path}: expected an object")
    missing = keys - set(value)
    if missing:
        raise StateTreeError(f"{path}: missing field {sorted(missing)[0]!r}")
    unknown = set(value) - keys
    if unknown:
        raise StateTreeError(f"{path}: unknown field {sorted(unknown)[0]!r}")
    return value


def _int(value: Any, path: str, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise StateTreeError(f"{path}: expected an integer in {lo}..{hi}, got {value!r}")
    return value


def _str(value: Any, path: str) -> str:
    if not isinstance(value, str) or len(value) > 4096:
        raise StateTreeError(f"{path}: expected a string")
    return value


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise StateTreeError(f"{path}: expected a bool")
    return value


# --- load: memory backends -------------------------------------------------------------------


class FileBackend:
    """The memory file mapped MAP_PRIVATE: clones share its page-cache pages until they write.

    With a `key` and the state's authenticated `signature`, the file is
    checked before it is mapped: a file sealed for this signature by a
    trusted verifier (`snapshot.memfile.memory_file_sealed`: root-owned, no
    write bits, seal xattr) costs an fstat and a getxattr; any other file is
    hashed chunk by chunk (holes without reading). The file is opened once:
    what is checked is the inode that is mapped, whatever the path points
    to meanwhile. `verification` says which check ran ("sealed", "hashed"
    or "none").
    """

    def __init__(self, path: str, *, key: SnapshotKey | None = None,
                 signature: SnapshotSignature | None = None):
        if (key is None) != (signature is None):
            raise ValueError("FileBackend: key and signature go together")
        self.path = path
        self.key = key
        self.signature = signature
        self.verification = "none"
        self.verify_us = 0

    def open(self, layout: MemoryFileLayout) -> GuestMemory:
        offsets = [r.file_offset for r in layout.regions]
        if offsets != sorted(offsets) or any(
                a.file_end != b.file_offset for a, b in zip(layout.regions, layout.regions[1:])) or offsets[0]:
            raise SnapshotLoadError("the memory file layout is not contiguous")
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SnapshotLoadError(f"cannot open the memory file {self.path}: {exc.strerror}") from exc
        try:
            size = os.fstat(fd).st_size
            if size != layout.file_size:
                raise SnapshotLoadError(f"the memory file {self.path} has {size} bytes, the snapshot "
                                        f"needs {layout.file_size}")
            if self.key is not None and self.signature is not None:
                self._verify(fd)
            try:
                # Mapped from the fd just checked: this very inode, not whatever the path names now
                # (and no /proc needed: a jailed VMM has none).
                mem = GuestMemory.from_fd(fd, [(r.guest_addr, r.size) for r in layout.regions], path=self.path)
            except (GuestMemoryError, OSError, ValueError) as exc:
                raise SnapshotLoadError(f"cannot map the memory file {self.path}: {exc}") from exc
        finally:
            os.close(fd)
        for region in mem.regions:
            region.file_path = self.path
        return mem

    def _verify(self, fd: int) -> None:
        assert self.key is not None and self.signature is not None
        started = time.monotonic_ns()
        try:
            if memory_file_sealed(fd, self.key, self.signature):
                self.verification = "sealed"
            else:
                verify_memory_fd(fd, self.signature.memory)
                self.verification = "hashed"
        except SnapshotAuthError as exc:
            raise SnapshotLoadError(f"the memory file {self.path} is not authentic: {exc}") from exc
        except OSError as exc:
            raise SnapshotLoadError(f"cannot read the memory file {self.path}: {exc.strerror}") from exc
        self.verify_us = (time.monotonic_ns() - started) // 1000

    def __repr__(self) -> str:
        return f"<FileBackend {self.path} verification={self.verification}>"


class UffdBackend:
    """Anonymous guest memory served by a page server through userfaultfd.

    `open` creates the memory, registers it with a new userfaultfd, connects
    to the page server's socket at `path` and sends it the uffd (SCM_RIGHTS)
    with Firecracker's JSON region list. The VMM keeps its own reference to
    the uffd: if the page server dies, faults block instead of silently
    reading zeros, and the VMM sees the socket close (`sock`) and fails the
    VM.
    """

    def __init__(self, path: str):
        self.path = path
        self.uffd: Userfaultfd | None = None
        self.sock: socket.socket | None = None

    def open(self, layout: MemoryFileLayout) -> GuestMemory:
        try:
            mem = GuestMemory.anonymous([(r.guest_addr, r.size) for r in layout.regions])
        except (GuestMemoryError, OSError, ValueError) as exc:
            raise SnapshotLoadError(f"cannot create guest memory: {exc}") from exc
        try:
            self.uffd = take_prepared_uffd() or Userfaultfd.create(nonblocking=True)
            mappings = []
            for region, r in zip(mem.regions, sorted(layout.regions, key=lambda r: r.guest_addr)):
                self.uffd.register(region.host_addr, region.size)
                mappings.append(UffdMapping(base_host_virt_addr=region.host_addr, size=region.size,
                                            offset=r.file_offset, page_size=layout.page_size))
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            self.sock = sock
            sock.settimeout(5.0)
            sock.connect(self.path)
            send_handshake(sock, mappings, self.uffd.fd)
            sock.setblocking(False)
        except (UffdError, OSError) as exc:
            self.close()
            mem.close()
            raise SnapshotLoadError(f"cannot hand guest memory to the page server at {self.path}: {exc}") from exc
        return mem

    def on_socket_readable(self, fail: Callable[[str], None]) -> None:
        """Event-loop handler: a closed socket means the page server is gone."""
        assert self.sock is not None
        try:
            data = self.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError as exc:
            data = b""
            log.error("page server socket error", error=str(exc))
        if not data:
            fail(f"the page server at {self.path} closed its connection: guest memory can no longer be served")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.uffd is not None:
            self.uffd.close()
            self.uffd = None

    def __repr__(self) -> str:
        return f"<UffdBackend {self.path} {'connected' if self.sock else 'closed'}>"


_prepared_uffd: Userfaultfd | None = None


def prepare_uffd() -> None:
    """Create (and negotiate) a userfaultfd ahead of a `Uffd` load; a VMM does this while idle."""
    global _prepared_uffd
    if _prepared_uffd is None:
        try:
            _prepared_uffd = Userfaultfd.create(nonblocking=True)
        except UffdError:
            pass  # the load will try again and report the error


def take_prepared_uffd() -> Userfaultfd | None:
    global _prepared_uffd
    uffd, _prepared_uffd = _prepared_uffd, None
    return uffd


def open_memory(backend: FileBackend | UffdBackend, state: MicrovmState) -> GuestMemory:
    """Guest memory for `state` from `backend`.

    A diff snapshot's state loads like a full one once its memory file was
    merged onto its base's (`snapshot.memfile.merge_diff_snapshot`), as in
    Firecracker; the memory file cannot tell whether that was done.
    """
    return backend.open(state.layout)

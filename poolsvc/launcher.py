"""Launching microVMs: templates (boot once, snapshot) and restored clones, one VMM process each.

Primer. A *template* is a microVM booted once, waited on until it is ready,
paused and snapshotted: ``<root>/templates/<name>/`` holds ``vm.state``,
``vm.mem``, its own copy of the root filesystem (``rootfs.ext4``, if any)
and ``template.json``. A *clone* is a fresh VMM process that loads that
snapshot paused (``PUT /snapshot/load``, File backend: the memory file is
mapped MAP_PRIVATE, so clones share its page-cache pages until they write),
with its own vsock socket (``vsock_override``). The root filesystem is
attached read-only, shared by every clone (the guest keeps its writes in
tmpfs); a template declared ``rootfs_writable`` instead gives each clone a
``cp --reflink=auto`` copy (``drive_overrides``).

Processes. `Launcher` forks VMMs from a zygote (``python -m vmm.zygote``,
started by the launcher as its child; see its protocol there): the zygote
has imported everything, so a VMM is one fork away. If the zygote cannot be
started or stops answering, the launcher restarts it once and otherwise
spawns ``python -m vmm.main`` directly (slower, same result). Every VMM runs
in its own session; the launcher makes its own process a child subreaper
(PR_SET_CHILD_SUBREAPER) by default, so VMMs whose zygote died are
re-parented to it and reaped by `destroy`.

Files of one clone, in ``<run root>/<vm_id>/`` (run root: by default
``$EMBER_HOME/run/<service-id>``)::

    api.sock     the VMM's API socket       vsock.sock   its vsock UDS (+ vsock.sock_<port>)
    console.log  the guest's serial output  vmm.log      the VMM's stderr
    vmm.pid      {"pid", "start_time", ...} console.in   a FIFO for console input (optional)
    rootfs.ext4  a writable clone's copy of the root filesystem (optional)

A jailed clone (`poolsvc.jailing`) has its sockets in its chroot instead,
``<run root>/.jail/<vm_id>/``; ``.jail`` is a tmpfs the launcher mounts at
`start` and unmounts at `close` once no clone is left (jails churn inodes
on every launch, which a disk filesystem pays for in CPU).

A process is identified by its pid *and* its start time (``/proc/PID/stat``
field 22), so a recycled pid is never signalled. `cleanup_stale` uses the
``vmm.pid`` files to kill what a crashed predecessor left, after checking
that the process is still an ember-vmm.

Nothing here imports `vmm/`: VMMs are driven through their API socket
(`poolsvc.vmm_client`) and the zygote through its socket.
"""

from __future__ import annotations

import ctypes
import datetime
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from jailer import _sys as jail_sys
from poolsvc.netslots import GUEST_IFACE_ID, GUEST_MAC, NetSlotError, NetSlots, Slot, guest_ip_boot_arg
from poolsvc.jailing import JAIL_VSOCK, JailConfig, JailedVm, JailPool, JailPoolError
from poolsvc.vmm_client import VmmClient, VmmClientError

__all__ = [
    "LauncherError",
    "describe_exit",
    "LaunchError",
    "TemplateError",
    "TemplateNotFound",
    "TemplateExists",
    "TemplateNotAuthentic",
    "ZygoteUnavailable",
    "VmHandle",
    "TemplateInfo",
    "TemplateStore",
    "Launcher",
    "ZygoteClient",
    "StaleVm",
    "VmmMemory",
    "cleanup_stale",
    "vmm_memory",
    "ember_home",
    "process_start_time",
    "DEFAULT_AGENT_PORT",
    "DEFAULT_GUEST_CID",
    "ROOTFS_DRIVE_ID",
]

log = structlog.get_logger("poolsvc.launcher")

#: The vsock port the guest agent listens on (recorded per template).
DEFAULT_AGENT_PORT = 52
#: Saved pool bounds above this are taken as a damaged file (SetPool takes any int32).
MAX_SAVED_WARM = 2**31 - 1
#: The guest CID given to templates (clones keep it: each has its own vsock device and UDS).
DEFAULT_GUEST_CID = 3
#: The drive id of the root filesystem in templates.
ROOTFS_DRIVE_ID = "rootfs"
TEMPLATE_FORMAT = 1

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# sockaddr_un.sun_path is 108 bytes including the NUL.
_SUN_PATH_MAX = 107
# The vsock device connects guest-initiated streams to "<uds>_<port>" (port < 2**32: 10 digits).
_VSOCK_PORT_SUFFIX = 11
_ZYGOTE_SOCK = ".zygote.sock"
_JAIL_DIR = ".jail"
#: The jail root's tmpfs: chroots hold device nodes, empty bind-mount targets and sockets. The cap
#: bounds what jailed VMMs (which own their chroot directories) can write there.
_JAIL_TMPFS_OPTIONS = "size=64m,mode=0711"
_ZYGOTE_PID = ".zygote.pid"
_ZYGOTE_LOG = "zygote.log"
_PID_FILE = "vmm.pid"
_VMM_COMM = "ember-vmm"
_KILL_WAIT = 5.0

PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


class LauncherError(Exception):
    """A microVM could not be launched, resumed or destroyed."""


class LaunchError(LauncherError):
    """A clone could not be restored (its process and files were removed)."""


class ZygoteUnavailable(LauncherError):
    """The zygote could not be started or stopped answering."""


class TemplateError(LauncherError):
    """A template could not be created or read."""


class TemplateNotFound(TemplateError):
    """No template of that name."""


class TemplateNotAuthentic(TemplateError, LaunchError):
    """A template's snapshot does not match its signature (or has none); no VMM was started."""


class TemplateExists(TemplateError):
    """A template of that name already exists (or is being created)."""


def ember_home() -> Path:
    """``$EMBER_HOME`` (default ``~/.cache/ember``)."""
    env = os.environ.get("EMBER_HOME")
    return Path(env) if env else Path.home() / ".cache" / "ember"


def _check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise LauncherError(f"invalid {kind} {name!r}: letters, digits, '_', '.', '-' (not first), at most 64")
    return name


def _check_sun_path(path: Path, extra: int = 0) -> None:
    if len(os.fsencode(path)) + extra > _SUN_PATH_MAX:
        raise LauncherError(f"socket path {path} is too long for a Unix socket (at most {_SUN_PATH_MAX - extra} "
                            "bytes): choose a shorter run root")


def _write_json_atomic(path: Path, doc: dict[str, Any], *, durable: bool = True) -> None:
    """Write `doc` to `path` by rename: readers see the old file or the new one, never a part.

    ``durable=False`` skips the fsync, for records of running processes: a
    service that crashes finds them in the page cache, and a host that
    crashes has no processes left for them to name (~2 ms a launch here).
    """
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2, sort_keys=True)
        f.write("\n")
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


# --- processes -----------------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) of `pid`, or None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may hold spaces and parentheses: the fields after it follow the last ')'.
    fields = data[data.rindex(b")") + 2:].split()
    return fields[0].decode(), int(fields[19])


def process_start_time(pid: int) -> int | None:
    """`pid`'s start time (``/proc/PID/stat`` field 22), None if no such process."""
    st = _proc_stat(pid)
    return None if st is None else st[1]


def _same_process(pid: int, start_time: int) -> bool:
    """`pid` is still the process that started at `start_time` (zombie or not)."""
    st = _proc_stat(pid)
    return st is not None and (start_time == 0 or st[1] == start_time)


def _running(pid: int, start_time: int) -> bool:
    """`pid` is still that process and has not exited (a zombie has)."""
    st = _proc_stat(pid)
    return st is not None and (start_time == 0 or st[1] == start_time) and st[0] not in ("Z", "X")


def _is_ember_vmm(pid: int) -> bool:
    """`pid` runs an ember-vmm: a zygote child (comm) or ``python -m vmm.main`` / ``ember-vmm`` (cmdline)."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if comm == _VMM_COMM:
        return True
    args = [a.decode(errors="replace") for a in cmdline]
    return any(a == "vmm.main" or os.path.basename(a) == _VMM_COMM for a in args)


def _vmm_pids_with_id(vm_id: str) -> list[int]:
    """Running ember-vmm processes whose command line says ``--id vm_id``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        # setproctitle leaves one space-separated string; exec'd VMMs have NUL-separated argv.
        args = raw.replace(b"\0", b" ").decode(errors="replace").split()
        if any(a == "--id" and b == vm_id for a, b in zip(args, args[1:])) and _is_ember_vmm(int(entry)):
            if _running(int(entry), 0):
                out.append(int(entry))
    return out


def _try_reap(pid: int) -> bool:
    """Reap `pid` if it is an exited child of ours; True if it was reaped."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return done == pid


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _file_size(path: Path) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def _threads_left(pid: int) -> int:
    """How many threads `pid` still has (/proc/PID/task; 0 if it is gone)."""
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


def _kill_and_wait(pid: int, start_time: int, timeout: float = _KILL_WAIT) -> None:
    """SIGKILL `pid`'s process group (and `pid`) if it is still that process; wait until it is gone.

    Reaps it if it is our child (it was re-parented to us as subreaper);
    otherwise waits until its parent reaped it or it is a zombie (dead: its
    memory and fds are released).
    """
    if _same_process(pid, start_time):
        for kill in (os.killpg, os.kill):
            try:
                kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while True:
        _try_reap(pid)
        st = _proc_stat(pid)
        if st is None or (start_time and st[1] != start_time):
            return
        if st[0] in ("Z", "X"):
            # Dead once no thread is left but the zombie leader: its parent (not us) reaps it,
            # maybe seconds later (some inits reap lazily): waiting for that made crash recovery
            # take seconds per stale VMM (bench/chaos.py).
            if _try_reap(pid) or _threads_left(pid) <= 1 or time.monotonic() >= deadline:
                return
        elif time.monotonic() >= deadline:
            raise LauncherError(f"process {pid} did not die within {timeout} s of SIGKILL")
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def _set_child_subreaper() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    libc.prctl.restype = ctypes.c_int
    # SAFETY: PR_SET_CHILD_SUBREAPER takes an integer flag by value; no memory is passed.
    return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def _subprocess_env() -> dict[str, str]:
    """The environment of VMM and zygote processes: this checkout on PYTHONPATH if run from one."""
    env = dict(os.environ)
    src = Path(__file__).resolve().parents[1]
    if (src / "vmm" / "__init__.py").exists():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(src), env.get("PYTHONPATH")) if p)
    return env


# --- memory --------------------------------------------------------------------------------


@dataclass(frozen=True)
class VmmMemory:
    """A VMM process's memory (bytes), from ``/proc/PID/smaps``; ``guest_*``: the guest memory file's mappings."""

    rss: int
    pss: int
    private_dirty: int
    guest_rss: int
    guest_pss: int
    guest_private_dirty: int

    @property
    def overhead_rss(self) -> int:
        """Firecracker's method: RSS minus the guest memory mappings."""
        return self.rss - self.guest_rss

    @property
    def overhead_pss(self) -> int:
        return self.pss - self.guest_pss

    @property
    def overhead_private_dirty(self) -> int:
        return self.private_dirty - self.guest_private_dirty


def vmm_memory(pid: int, guest_mem_file: str | Path | None = None) -> VmmMemory:
    """Sum ``/proc/PID/smaps``; mappings of `guest_mem_file` (a restored clone's guest RAM) counted apart."""
    guest = os.path.realpath(guest_mem_file) if guest_mem_file is not None else None
    totals = {"Rss": 0, "Pss": 0, "Private_Dirty": 0}
    guest_totals = dict(totals)
    in_guest = False
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in totals:
                    kib = int(rest.split()[0]) * 1024
                    totals[key] += kib
                    if in_guest:
                        guest_totals[key] += kib
                elif "-" in key and " " in line and not key.startswith(("Vm", "THP")) and key[0] in "0123456789abcdef":
                    # A mapping header: "start-end perms offset dev inode   path".
                    parts = line.split(None, 5)
                    path = parts[5].strip() if len(parts) > 5 else ""
                    in_guest = guest is not None and path == guest
    except OSError as exc:
        raise LauncherError(f"cannot read the memory of process {pid}: {exc}") from exc
    return VmmMemory(rss=totals["Rss"], pss=totals["Pss"], private_dirty=totals["Private_Dirty"],
                     guest_rss=guest_totals["Rss"], guest_pss=guest_totals["Pss"],
                     guest_private_dirty=guest_totals["Private_Dirty"])


# --- handles and templates -----------------------------------------------------------------


@dataclass(frozen=True)
class VmHandle:
    """One microVM: its VMM process and work directory."""

    vm_id: str
    pid: int
    workdir: Path
    api_sock: Path
    vsock_uds: Path
    agent_port: int
    template: str
    #: /proc/PID/stat start time: with `pid`, the process's identity.
    start_time: int = 0
    #: The network slot the VMM runs in (its TAP, the sandbox's address); None without networking.
    net: Slot | None = None

    @property
    def console_log(self) -> Path:
        """The guest's serial console output."""
        return self.workdir / "console.log"

    @property
    def vmm_log(self) -> Path:
        """The VMM's stderr."""
        return self.workdir / "vmm.log"

    @property
    def console_in(self) -> Path:
        """The console input FIFO (exists only when the launcher was asked for console input)."""
        return self.workdir / "console.in"

    def __repr__(self) -> str:
        return f"<VmHandle {self.vm_id} {self.template} pid={self.pid}>"


@dataclass(frozen=True)
class TemplateInfo:
    """A snapshotted template, as ``template.json`` describes it."""

    name: str
    dir: Path
    state_path: Path
    mem_path: Path
    rootfs_path: Path | None
    rootfs_writable: bool
    vcpus: int
    mem_mib: int
    kernel: str
    initrd: str | None
    boot_args: str
    vsock_cid: int
    agent_port: int
    created: str
    #: The guest has a network interface (eth0 on TAP ``tap0``): clones need a network slot.
    network: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"format": TEMPLATE_FORMAT, "name": self.name, "state": self.state_path.name,
                "mem": self.mem_path.name, "rootfs": self.rootfs_path.name if self.rootfs_path else None,
                "rootfs_writable": self.rootfs_writable, "vcpus": self.vcpus, "mem_mib": self.mem_mib,
                "kernel": self.kernel, "initrd": self.initrd, "boot_args": self.boot_args,
                "vsock_cid": self.vsock_cid, "agent_port": self.agent_port, "created": self.created,
                "network": self.network}

    @classmethod
    def from_json(cls, directory: Path, doc: Any) -> TemplateInfo:
        """Validate `doc` (read from `directory`/template.json)."""
        try:
            if not isinstance(doc, dict) or doc.get("format") != TEMPLATE_FORMAT:
                raise TypeError(f"format {doc.get('format') if isinstance(doc, dict) else None!r}")
            rootfs = doc["rootfs"]
            return cls(name=str(doc["name"]), dir=directory, state_path=directory / str(doc["state"]),
                       mem_path=directory / str(doc["mem"]),
                       rootfs_path=directory / str(rootfs) if rootfs else None,
                       rootfs_writable=bool(doc["rootfs_writable"]), vcpus=int(doc["vcpus"]),
                       mem_mib=int(doc["mem_mib"]), kernel=str(doc["kernel"]),
                       initrd=str(doc["initrd"]) if doc.get("initrd") else None, boot_args=str(doc["boot_args"]),
                       vsock_cid=int(doc["vsock_cid"]), agent_port=int(doc["agent_port"]),
                       created=str(doc["created"]), network=bool(doc.get("network", False)))
        except (KeyError, TypeError, ValueError) as exc:
            raise TemplateError(f"bad template.json in {directory}: {exc}") from exc


class TemplateStore:
    """Templates under ``<root>/templates/``: create (boot, wait, snapshot), get, list, remove."""

    def __init__(self, root: str | Path | None = None, *, python: str = sys.executable,
                 network: NetSlots | None = None) -> None:
        """`root`: default `ember_home()`. `network`: templates boot with eth0 in a slot of it."""
        self.root = Path(root) if root is not None else ember_home()
        self.dir = self.root / "templates"
        self.python = python
        self.network = network
        #: The snapshot key (created 0600 by the first `create`); once it exists, templates are
        #: signed and sealed at creation, checked on `get`, and VMMs get `vmm_key_args()`.
        self.key_file = ember_home() / "snapshot.key"
        self._verified: dict[str, tuple[tuple[int, ...], ...]] = {}

    def __repr__(self) -> str:
        return f"<TemplateStore {self.dir} templates={len(self.list())}>"

    def get(self, name: str) -> TemplateInfo:
        """The template `name`; `TemplateNotFound` if there is none (or it is still being created)."""
        _check_name("template name", name)
        path = self.dir / name / "template.json"
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise TemplateNotFound(f"no template {name!r} in {self.dir}") from None
        except (OSError, ValueError) as exc:
            raise TemplateError(f"cannot read {path}: {exc}") from exc
        info = TemplateInfo.from_json(self.dir / name, doc)
        self._authenticate(info)
        return info

    # --- snapshot authentication (docs/snapshots.md) -------------------------------------

    def _key_args_creating(self) -> list[str]:
        """`vmm_key_args`, creating the key (0600) on first use."""
        from snapshot.auth import KeyFileError, ensure_key_file
        try:
            ensure_key_file(self.key_file)
        except (KeyFileError, OSError) as exc:
            raise TemplateError(f"cannot use the snapshot key: {exc}") from exc
        return self.vmm_key_args()

    def vmm_key_args(self) -> list[str]:
        """The VMM flags that make it sign and check snapshots with this store's key (none without one)."""
        return ["--snapshot-key-file", str(self.key_file)] if self.key_file.exists() else []

    def _authenticate(self, info: TemplateInfo) -> None:
        """With a key: `TemplateError` unless the template's files match its signature.

        A sealed memory file (see `_seal`) is not hashed; an unsealed one is,
        and the result is remembered until one of the files changes (inode,
        size or mtime; see `_file_identity`), so `get` on the restore path costs three stats.
        The VMM checks again on load: this is the pool refusing early.
        """
        if not self.key_file.exists():
            return
        from snapshot.auth import SnapshotAuthError, load_key_file, read_signature, signature_path
        from snapshot.format import SnapshotFormatError, read_bounded
        from snapshot.memfile import memory_file_sealed, verify_memory_fd
        files = (info.state_path, Path(signature_path(info.state_path)), info.mem_path)
        identity = tuple(_file_identity(p) for p in files)
        if self._verified.get(info.name) == identity:
            return
        what = "the snapshot key"
        try:
            key = load_key_file(self.key_file)
            what = "its signature"
            signature = read_signature(key, files[1])
            what = f"its state file {info.state_path}"
            signature.check_state(read_bounded(info.state_path, 32 << 20))
            what = f"its memory file {info.mem_path}"
            fd = os.open(info.mem_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if not memory_file_sealed(fd, key, signature):
                    verify_memory_fd(fd, signature.memory)
            finally:
                os.close(fd)
        except (SnapshotAuthError, SnapshotFormatError, OSError) as exc:
            self._verified.pop(info.name, None)
            raise TemplateNotAuthentic(f"template {info.name!r} is not authentic: {what}: {exc}") from exc
        self._verified[info.name] = identity

    def _seal(self, info: TemplateInfo) -> None:
        """Right after creation (the VMM that wrote the files is dead, so nobody holds them open
        for writing): make the snapshot files root-owned and read-only, check them against the
        signature the VMM wrote, and seal the memory file so VMMs need not hash it."""
        if not self.key_file.exists():
            return
        from snapshot.auth import SnapshotAuthError, load_key_file, read_signature, signature_path
        from snapshot.format import SnapshotFormatError, read_bounded
        from snapshot.memfile import seal_memory_file
        sig_path = Path(signature_path(info.state_path))
        try:
            for p in (info.state_path, sig_path):
                os.chmod(p, 0o444)
                if os.geteuid() == 0:
                    os.chown(p, 0, 0)
            key = load_key_file(self.key_file)
            signature = read_signature(key, sig_path)
            signature.check_state(read_bounded(info.state_path, 32 << 20))
            sealed = seal_memory_file(info.mem_path, key, signature)
        except (SnapshotAuthError, SnapshotFormatError, OSError) as exc:
            raise TemplateError(f"the new template's snapshot does not verify: {exc}") from exc
        log.info("template snapshot verified", template=info.name, sealed=sealed)

    def list(self) -> list[TemplateInfo]:
        """Every complete template, by name."""
        out = []
        try:
            names = sorted(os.listdir(self.dir))
        except FileNotFoundError:
            return []
        for name in names:
            if _NAME_RE.fullmatch(name) and (self.dir / name / "template.json").exists():
                try:
                    out.append(self.get(name))
                except TemplateError as exc:
                    log.warning("skipping a broken template", template=name, error=str(exc))
        return out

    # --- pool settings (SetPool survives a restart) ----------------------------------------

    POOL_FILE = "pool.json"

    def pool_settings(self, name: str) -> tuple[int, int] | None:
        """The (min_warm, max_warm) last saved for template `name`; None if never set or unreadable."""
        _check_name("template name", name)
        path = self.dir / name / self.POOL_FILE
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable pool settings", template=name, path=str(path), error=str(exc))
            return None
        lo, hi = (doc.get("min_warm"), doc.get("max_warm")) if isinstance(doc, dict) else (None, None)
        if not (type(lo) is int and type(hi) is int and 0 <= lo <= hi <= MAX_SAVED_WARM):
            log.warning("ignoring invalid pool settings", template=name, path=str(path))
            return None
        return lo, hi

    def save_pool_settings(self, name: str, min_warm: int, max_warm: int) -> None:
        """Record (min_warm, max_warm) for template `name` (atomically); `TemplateNotFound` if it is gone."""
        _check_name("template name", name)
        tdir = self.dir / name
        if not (tdir / "template.json").exists():
            raise TemplateNotFound(f"no template {name!r} in {self.dir}")
        tmp = tdir / f".{self.POOL_FILE}.{os.getpid()}.{threading.get_ident()}"
        try:
            tmp.write_text(json.dumps({"min_warm": min_warm, "max_warm": max_warm}))
            os.replace(tmp, tdir / self.POOL_FILE)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise TemplateError(f"cannot save the pool settings of {name!r}: {exc}") from exc

    def remove(self, name: str) -> None:
        """Delete template `name` (clones running from it keep their mappings); `TemplateNotFound` if absent."""
        _check_name("template name", name)
        src = self.dir / name
        if not (src / "template.json").exists():
            raise TemplateNotFound(f"no template {name!r} in {self.dir}")
        grave = self.dir / f".removing-{name}-{os.getpid()}-{time.monotonic_ns()}"
        os.rename(src, grave)  # atomic: the template is gone for every reader at once
        shutil.rmtree(grave, ignore_errors=True)

    def create(self, name: str, kernel: str | Path, rootfs: str | Path | None = None,
               initrd: str | Path | None = None, boot_args: str = "", vcpus: int = 1, mem_mib: int = 128, *,
               ready: Callable[[VmHandle], bool] | None = None, ready_marker: str | None = None,
               timeout: float = 120.0, rootfs_writable: bool = False, vsock_cid: int = DEFAULT_GUEST_CID,
               agent_port: int = DEFAULT_AGENT_PORT, poll_interval: float = 0.02) -> TemplateInfo:
        """Boot a microVM, wait until it is ready, pause it, snapshot it, kill it.

        Readiness: `ready(handle)` returns True (e.g. the agent answered on
        the vsock UDS ``handle.vsock_uds``, port ``handle.agent_port``), or,
        without `ready`, `ready_marker` appears on the serial console. The
        root filesystem is copied into the template (``cp --reflink=auto``)
        and attached read-only unless `rootfs_writable`. Raises
        `TemplateExists`, or `TemplateError` (nothing is left behind).
        """
        _check_name("template name", name)
        if ready is None and ready_marker is None:
            raise TemplateError("create needs ready (a callable) or ready_marker (a console string)")
        is_ready = ready if ready is not None else _console_marker(ready_marker or "")

        self.dir.mkdir(parents=True, exist_ok=True)
        tdir = self.dir / name
        try:
            tdir.mkdir()
        except FileExistsError:
            raise TemplateExists(f"template {name!r} already exists in {self.dir}") from None
        build = tdir / "build"
        proc: subprocess.Popen[bytes] | None = None
        client: VmmClient | None = None
        slot: Slot | None = None
        if self.network is not None and not any(a.startswith("ip=") for a in boot_args.split()):
            boot_args = f"{boot_args} {guest_ip_boot_arg()}".strip()  # eth0's fixed address (netslots)
        try:
            build.mkdir()
            api_sock, vsock_uds = build / "api.sock", build / "vsock.sock"
            _check_sun_path(api_sock)
            _check_sun_path(vsock_uds, _VSOCK_PORT_SUFFIX)
            rootfs_copy = None
            if rootfs is not None:
                rootfs_copy = tdir / "rootfs.ext4"
                _reflink_copy(Path(rootfs), rootfs_copy)
            info = TemplateInfo(
                name=name, dir=tdir, state_path=tdir / "vm.state", mem_path=tdir / "vm.mem",
                rootfs_path=rootfs_copy, rootfs_writable=rootfs_writable, vcpus=vcpus, mem_mib=mem_mib,
                kernel=str(kernel), initrd=str(initrd) if initrd else None, boot_args=boot_args,
                vsock_cid=vsock_cid, agent_port=agent_port,
                created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                network=self.network is not None)
            prefix: list[str] = []
            if self.network is not None:
                try:
                    slot = self.network.acquire(f"template-{name}")
                except NetSlotError as exc:
                    raise TemplateError(f"no network slot for the template: {exc}") from exc
                prefix = _netns_exec_prefix(slot)
            with open(build / "console.log", "wb") as out, open(build / "vmm.log", "wb") as err:
                proc = subprocess.Popen(
                    [*prefix, self.python, "-m", "vmm.main", "--api-sock", str(api_sock), "--id", f"template-{name}",
                     *self._key_args_creating()],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True, close_fds=True,
                    env=_subprocess_env())
            handle = VmHandle(vm_id=f"template-{name}", pid=proc.pid, workdir=build, api_sock=api_sock,
                              vsock_uds=vsock_uds, agent_port=agent_port, template=name,
                              start_time=process_start_time(proc.pid) or 0)
            client = VmmClient(api_sock, timeout=max(30.0, timeout))
            deadline = time.monotonic() + timeout
            client.wait_until_listening(timeout, alive=lambda: proc is not None and proc.poll() is None)
            client.put_boot_source(str(kernel), boot_args, str(initrd) if initrd else None)
            client.put_machine_config(vcpus, mem_mib)
            if rootfs_copy is not None:
                client.put_drive(ROOTFS_DRIVE_ID, str(rootfs_copy), is_root_device=True,
                                 is_read_only=not rootfs_writable)
            client.put_vsock(vsock_cid, str(vsock_uds))
            if slot is not None:
                client.put(f"/network-interfaces/{GUEST_IFACE_ID}",
                           {"iface_id": GUEST_IFACE_ID, "host_dev_name": slot.tap, "guest_mac": GUEST_MAC})
            client.instance_start()
            while not is_ready(handle):
                if proc.poll() is not None:
                    raise TemplateError(f"the template VM exited ({proc.returncode}) before it was ready")
                if time.monotonic() >= deadline:
                    raise TemplateError(f"the template VM was not ready within {timeout} s")
                time.sleep(poll_interval)
            client.pause()
            client.create_snapshot(str(info.state_path), str(info.mem_path))
            client.close()
            client = None
            _kill_and_wait(proc.pid, handle.start_time)
            proc.wait()
            if slot is not None and self.network is not None:
                self.network.release(slot)
                slot = None
            shutil.rmtree(build)
            self._seal(info)
            _write_json_atomic(tdir / "template.json", info.to_json())
            log.info("template created", template=name, vcpus=vcpus, mem_mib=mem_mib)
            return info
        except BaseException as exc:
            console, vmm_log = _tail(build / "console.log"), _tail(build / "vmm.log")
            if client is not None:
                client.close()
            if proc is not None:
                if proc.poll() is None:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                proc.wait()
            if slot is not None and self.network is not None:
                self.network.release(slot)
            shutil.rmtree(tdir, ignore_errors=True)
            if isinstance(exc, (TemplateError, VmmClientError, LauncherError, OSError)):
                raise TemplateError(f"cannot create template {name!r}: {exc}\n--- console ---\n{console}\n"
                                    f"--- vmm ---\n{vmm_log}") from exc
            raise


def _netns_exec_prefix(slot: Slot) -> list[str]:
    """A command prefix running a program in `slot`'s network namespace (nsenter execs it: same pid)."""
    return ["nsenter", f"--net={slot.netns_path}", "--"]


def _file_identity(path: Path) -> tuple[int, ...]:
    """What changes when a file is replaced or written: (dev, inode, size, mtime); () if absent.

    Not ctime: every jail hard-links the template's files and unlinks them again, and a link
    count change updates ctime, so the remembered verification would be lost on every restore.
    The files are root-owned with no write bits (`_seal`): only root can write one and set its
    mtime back, and a VMM checks the signature again on load.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return ()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _console_marker(marker: str) -> Callable[[VmHandle], bool]:
    """A readiness check: `marker` has appeared in the console output."""
    needle = marker.encode()

    def ready(handle: VmHandle) -> bool:
        try:
            return needle in handle.console_log.read_bytes()
        except FileNotFoundError:
            return False
    return ready


def _reflink_copy(src: Path, dst: Path) -> None:
    """``cp --reflink=auto``: a copy-on-write clone where the filesystem can, a full copy otherwise."""
    try:
        subprocess.run(["cp", "--reflink=auto", "--sparse=always", "--", str(src), str(dst)], check=True,
                       capture_output=True, timeout=600)
    except subprocess.CalledProcessError as exc:
        raise LauncherError(f"cannot copy {src} to {dst}: {exc.stderr.decode(errors='replace').strip()}") from exc


# --- the zygote ----------------------------------------------------------------------------


class ZygoteClient:
    """The zygote process (a child of this one) and JSON-line requests to it, one connection per caller."""

    def __init__(self, socket_path: Path, log_path: Path, *, python: str = sys.executable,
                 start_timeout: float = 60.0) -> None:
        self.socket_path = socket_path
        self.log_path = log_path
        self.python = python
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        pid = self.proc.pid if self.proc else None
        return f"<ZygoteClient {self.socket_path} pid={pid} running={self.running}>"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.running and self.proc else None

    def start(self) -> None:
        """Start the zygote and wait until it answers a ping; `ZygoteUnavailable` if it does not."""
        self.stop()
        try:
            os.unlink(self.socket_path)  # a predecessor's, killed before it could remove it
        except FileNotFoundError:
            pass
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                [self.python, "-m", "vmm.zygote", "--socket", str(self.socket_path), "--parent-pid",
                 str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True, close_fds=True,
                env=_subprocess_env())
        _write_json_atomic(self.socket_path.with_name(_ZYGOTE_PID),
                           {"pid": self.proc.pid, "start_time": process_start_time(self.proc.pid) or 0},
                           durable=False)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise ZygoteUnavailable(f"the zygote exited ({self.proc.returncode}) at start: "
                                        f"{_tail(self.log_path)}")
            try:
                self.request({"op": "ping"}, timeout=5.0)
                return
            except ZygoteUnavailable:
                if time.monotonic() >= deadline:
                    self.stop()
                    raise ZygoteUnavailable(f"the zygote did not answer within {self.start_timeout} s") from None
            time.sleep(0.01)

    def stop(self) -> None:
        """SIGTERM the zygote (its children keep running) and reap it."""
        with self._lock:
            idle, self._idle = self._idle, []
        for s in idle:
            s.close()
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        # Nothing of a stopped zygote stays in the run root (an empty log says nothing either).
        _unlink_quietly(self.socket_path.with_name(_ZYGOTE_PID))
        if _file_size(self.log_path) == 0:
            _unlink_quietly(self.log_path)

    def request(self, doc: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        """Send one request and return its answer; `ZygoteUnavailable` on any transport failure."""
        with self._lock:
            sock = self._idle.pop() if self._idle else None
        try:
            if sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(timeout)
                sock.connect(str(self.socket_path))
            sock.settimeout(timeout)
            sock.sendall(json.dumps(doc).encode() + b"\n")
            buf = bytearray()
            while not buf.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionResetError("the zygote closed the connection")
                buf += chunk
            answer = json.loads(buf)
        except (OSError, ValueError) as exc:
            if sock is not None:
                sock.close()
            raise ZygoteUnavailable(f"zygote request {doc.get('op', 'spawn')} failed: {exc}") from exc
        with self._lock:
            self._idle.append(sock)
        if not isinstance(answer, dict):
            raise ZygoteUnavailable(f"the zygote answered {answer!r}")
        return answer

    def spawn(self, argv: list[str], *, stdin: Path | None, stdout: Path, stderr: Path, cwd: Path,
              netns: Path | None = None, jail: dict[str, Any] | None = None, api_sock: Path | None = None) -> int:
        """Fork a VMM; its pid. `api_sock`: the zygote binds the VMM's API socket there first."""
        doc: dict[str, Any] = {"op": "spawn", "argv": argv, "stdin": str(stdin) if stdin else None,
                               "stdout": str(stdout), "stderr": str(stderr), "cwd": str(cwd)}
        if netns is not None:
            doc["netns"] = str(netns)
        if jail is not None:
            doc["jail"] = jail
        if api_sock is not None:
            doc["api_sock"] = str(api_sock)
        answer = self.request(doc)
        if not answer.get("ok"):
            raise LaunchError(f"the zygote could not spawn a VMM: {answer.get('error')}")
        return int(answer["pid"])

    def wait(self, pid: int, timeout: float) -> str:
        """"exited" (the zygote reaped it), "running" (after `timeout` s) or "unknown" (not its child)."""
        return self.wait_status(pid, timeout)[0]

    def wait_status(self, pid: int, timeout: float) -> tuple[str, int | None]:
        """`wait`'s state and, once "exited", the return code (negative: killed by that signal)."""
        answer = self.request({"op": "wait", "pid": pid, "timeout": timeout}, timeout=timeout + 10.0)
        rc = answer.get("returncode")
        return str(answer.get("state", "unknown")), rc if isinstance(rc, int) else None


# --- the launcher --------------------------------------------------------------------------


@dataclass(frozen=True)
class StaleVm:
    """What `cleanup_stale` found in one leftover work directory."""

    vm_id: str
    pid: int | None
    killed: bool


class Launcher:
    """Restores, resumes and destroys clones of templates; one VMM process each, forked by a zygote.

    Thread-safe: the pool runtime may restore and destroy from several
    threads at once.
    """

    def __init__(self, store: TemplateStore, root: str | Path | None = None, *, service_id: str = "default",
                 use_zygote: bool = True, console_input: bool = False, subreaper: bool = True,
                 python: str = sys.executable, spawn_timeout: float = 30.0, api_timeout: float = 30.0,
                 jail: JailConfig | None = None) -> None:
        """`root`: the run directory of this service (default ``$EMBER_HOME/run/<service_id>``).

        `jail`: jail every VMM (`poolsvc.jailing`: its own uid, chroot in its
        work directory, namespaces, pooled cgroup); None: VMMs run as root.

        `console_input`: give each VMM a FIFO ``console.in`` as its stdin
        (else /dev/null). `subreaper`: make this process a child subreaper,
        so VMMs outliving their zygote are re-parented here and reaped.
        """
        self.store = store
        self.root = Path(root) if root is not None else ember_home() / "run" / _check_name("service id", service_id)
        self.use_zygote = use_zygote
        self.console_input = console_input
        self.python = python
        self.spawn_timeout = spawn_timeout
        self.api_timeout = api_timeout
        self.subreaper = _set_child_subreaper() if subreaper else False
        self.zygote = ZygoteClient(self.root / _ZYGOTE_SOCK, self.root / _ZYGOTE_LOG, python=python)
        self._zygote_failed = False
        self._handles: dict[str, VmHandle] = {}
        self._clients: dict[str, VmmClient] = {}
        self._direct: dict[int, subprocess.Popen[bytes]] = {}
        #: vm id -> its leased network slot (the store's `NetSlots`), given back by `destroy`.
        self._slots: dict[str, Slot] = {}
        self._lock = threading.Lock()
        self._zygote_lock = threading.Lock()
        # Cgroups are named after the run root: services (and tests) on one host never share them.
        jail_name = f"{self.root.name}-{hashlib.sha256(os.fsencode(self.root.resolve())).hexdigest()[:8]}"
        self.jails = JailPool(jail, jail_name) if jail is not None else None
        #: Where the chroots are: ``<root>/.jail/<vm id>`` (not a vm id: `cleanup_stale` skips it).
        self.jail_root = self.root / _JAIL_DIR
        #: vm id -> its jail (when jailed).
        self._jails: dict[str, JailedVm] = {}

    def __repr__(self) -> str:
        mode = "zygote" if self.zygote.running else "direct"
        return f"<Launcher {self.root} vms={len(self._handles)} mode={mode}>"

    # --- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Create the run root (and the jail root) and start the zygote (or note that VMMs will be spawned
        directly)."""
        self.root.mkdir(parents=True, exist_ok=True)
        _check_sun_path(self.root / _ZYGOTE_SOCK)
        if self.jails is not None:
            self.jails.remove_cgroups()  # what a crashed predecessor left (after cleanup_stale)
            _fresh_jail_root(self.jail_root)
        if self.use_zygote:
            self._ensure_zygote()

    def close(self) -> None:
        """Stop the zygote; the microVMs keep running (`destroy` them first for a drain).

        The jail root (and its tmpfs) goes once no microVM of this launcher is left.
        """
        self.zygote.stop()
        with self._lock:
            clients, self._clients = self._clients, {}
            running = bool(self._handles)
        for c in clients.values():
            c.close()
        if self.jails is not None:
            self.jails.remove_cgroups()  # those of live microVMs stay
            if not running:
                _remove_jail_root(self.jail_root)

    def __enter__(self) -> Launcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def handles(self) -> list[VmHandle]:
        """Every microVM restored and not destroyed yet."""
        with self._lock:
            return list(self._handles.values())

    def _ensure_zygote(self) -> bool:
        """The zygote is running (started or restarted now if needed); False if it cannot be."""
        with self._zygote_lock:
            if self.zygote.running:
                return True
            if self._zygote_failed:
                return False
            try:
                self.zygote.start()
                log.info("zygote started", pid=self.zygote.pid)
                return True
            except ZygoteUnavailable as exc:
                self._zygote_failed = True
                log.warning("zygote unavailable; spawning VMMs directly", error=str(exc))
                return False

    # --- spawning ------------------------------------------------------------------------

    def _spawn(self, vm_id: str, workdir: Path, api_sock: Path, stdin: Path | None,
               slot: Slot | None = None, jailed: JailedVm | None = None) -> int:
        argv = ["--api-sock", str(api_sock), "--id", vm_id, *self.store.vmm_key_args()]
        out, err = workdir / "console.log", workdir / "vmm.log"
        if jailed is not None:
            argv[1] = "/api.sock"  # a path inside the jail
        if self.use_zygote:
            for attempt in (1, 2):
                if not self._ensure_zygote():
                    break
                try:
                    # The zygote binds the API socket before it forks: restore's first connect succeeds.
                    return self.zygote.spawn(argv, stdin=stdin, stdout=out, stderr=err, cwd=workdir,
                                             netns=slot.netns_path if slot is not None else None,
                                             jail=jailed.spec.to_json() if jailed is not None else None,
                                             api_sock=api_sock)
                except ZygoteUnavailable as exc:
                    log.warning("zygote request failed; restarting it", error=str(exc), attempt=attempt)
                    with self._zygote_lock:
                        self.zygote.stop()
        if jailed is not None:
            # A direct VMM enters the jail itself (without a PID namespace: nobody forks it into one).
            spec_file = workdir / "jail.json"
            _write_json_atomic(spec_file, jailed.spec.with_(new_pid_ns=False).to_json(), durable=False)
            argv += ["--jail", str(spec_file)]
        fd_in = os.open(stdin, os.O_RDWR) if stdin is not None else subprocess.DEVNULL
        try:
            with open(out, "ab") as fout, open(err, "ab") as ferr:
                prefix = _netns_exec_prefix(slot) if slot is not None else []
                proc = subprocess.Popen([*prefix, self.python, "-m", "vmm.main", *argv], stdin=fd_in, stdout=fout,
                                        stderr=ferr, cwd=workdir, start_new_session=True, close_fds=True,
                                        env=_subprocess_env())
        finally:
            if stdin is not None:
                os.close(fd_in)
        with self._lock:
            self._direct[proc.pid] = proc
        return proc.pid

    # --- the API -------------------------------------------------------------------------

    def restore(self, template_name: str, vm_id: str) -> VmHandle:
        """A new VMM with template `template_name`'s snapshot loaded, PAUSED (`resume` runs it).

        Raises `TemplateNotFound`, or `LaunchError` (then nothing is left:
        no process, no work directory).
        """
        _check_name("vm id", vm_id)
        info = self.store.get(template_name)
        workdir = self.root / vm_id
        api_sock, vsock_uds = workdir / "api.sock", workdir / "vsock.sock"
        _check_sun_path(api_sock)
        _check_sun_path(vsock_uds, _VSOCK_PORT_SUFFIX)
        with self._lock:
            if vm_id in self._handles:
                raise LaunchError(f"microVM {vm_id!r} already exists")
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            workdir.mkdir()
        except FileExistsError:
            raise LaunchError(f"work directory {workdir} already exists") from None
        handle = VmHandle(vm_id=vm_id, pid=0, workdir=workdir, api_sock=api_sock, vsock_uds=vsock_uds,
                          agent_port=info.agent_port, template=template_name)
        try:
            drive_overrides = None
            clone_rootfs = None
            if info.rootfs_path is not None and info.rootfs_writable:
                # In the work directory (on disk), never in the jail's tmpfs: a root filesystem is big.
                clone_rootfs = workdir / "rootfs.ext4"
                _reflink_copy(info.rootfs_path, clone_rootfs)
                drive_overrides = {ROOTFS_DRIVE_ID: str(clone_rootfs)}
            jailed = self._build_jail(info, vm_id, clone_rootfs) if self.jails is not None else None
            if jailed is not None:
                api_sock, vsock_uds = jailed.api_sock, jailed.vsock_uds
                if jailed.rootfs_path is not None:
                    drive_overrides = {ROOTFS_DRIVE_ID: jailed.rootfs_path}
            stdin = None
            if self.console_input:
                stdin = handle.console_in
                os.mkfifo(stdin, 0o600)
            slot = self._lease_slot(info, vm_id)
            pid = self._spawn(vm_id, workdir, api_sock, stdin, slot, jailed)
            start_time = process_start_time(pid) or 0
            handle = VmHandle(vm_id=vm_id, pid=pid, workdir=workdir, api_sock=api_sock, vsock_uds=vsock_uds,
                              agent_port=info.agent_port, template=template_name, start_time=start_time,
                              net=slot)
            _write_json_atomic(workdir / _PID_FILE, {"pid": pid, "start_time": start_time, "vm_id": vm_id,
                                                     "template": template_name}, durable=False)
            with self._lock:
                self._handles[vm_id] = handle
            client = VmmClient(api_sock, timeout=self.api_timeout)
            with self._lock:
                self._clients[vm_id] = client
            client.wait_until_listening(self.spawn_timeout, alive=lambda: self.alive(handle))
            state_path, mem_path, vsock_path = str(info.state_path), str(info.mem_path), str(vsock_uds)
            if jailed is not None:
                state_path, mem_path, vsock_path = jailed.state_path, jailed.mem_path, JAIL_VSOCK
            client.load_snapshot(state_path, mem_path, resume_vm=False,
                                 vsock_uds_path=vsock_path, drive_overrides=drive_overrides,
                                 network_overrides={GUEST_IFACE_ID: slot.tap} if slot is not None else None)
        except BaseException as exc:
            vmm_log = _tail(workdir / "vmm.log")
            try:
                self.destroy(handle)
            except LauncherError as cleanup_exc:
                log.error("cleanup after a failed restore failed", vm_id=vm_id, error=str(cleanup_exc))
            if isinstance(exc, (LauncherError, VmmClientError, OSError)):
                raise LaunchError(f"cannot restore {vm_id!r} from template {template_name!r}: {exc}"
                                  + (f"\n--- vmm ---\n{vmm_log}" if vmm_log else "")) from exc
            raise
        return handle

    def _build_jail(self, info: TemplateInfo, vm_id: str, clone_rootfs: Path | None) -> JailedVm:
        """Lease a jail slot and build `vm_id`'s jail under the jail root (`poolsvc.jailing`)."""
        assert self.jails is not None
        try:
            jailed = self.jails.build(
                vm_id, self.jail_root / vm_id, state=info.state_path, mem=info.mem_path,
                rootfs=info.rootfs_path if info.rootfs_path is not None and not info.rootfs_writable else None,
                vcpus=info.vcpus, mem_mib=info.mem_mib, new_pid_ns=self.use_zygote, writable_rootfs=clone_rootfs)
        except JailPoolError as exc:
            raise LaunchError(str(exc)) from exc
        with self._lock:
            self._jails[vm_id] = jailed
        _check_sun_path(jailed.api_sock)
        _check_sun_path(jailed.vsock_uds, _VSOCK_PORT_SUFFIX)
        return jailed

    def jail_of(self, handle: VmHandle) -> JailedVm | None:
        """`handle`'s jail (None when VMMs are not jailed)."""
        with self._lock:
            return self._jails.get(handle.vm_id)

    def _lease_slot(self, info: TemplateInfo, vm_id: str) -> Slot | None:
        """A network slot for a clone of `info` (None if the template has no network interface)."""
        if not info.network:
            return None
        if self.store.network is None:
            raise LaunchError(f"template {info.name!r} has a network interface and this launcher has no network "
                              "slots (start the service with --net-cidr)")
        try:
            slot = self.store.network.acquire(vm_id)
        except NetSlotError as exc:
            raise LaunchError(f"no network slot for {vm_id!r}: {exc}") from exc
        with self._lock:
            self._slots[vm_id] = slot
        return slot

    def client(self, handle: VmHandle) -> VmmClient:
        """The API client of `handle`'s VMM (one per microVM; not thread-safe)."""
        with self._lock:
            client = self._clients.get(handle.vm_id)
            if client is None:
                client = self._clients[handle.vm_id] = VmmClient(handle.api_sock, timeout=self.api_timeout)
            return client

    def resume(self, handle: VmHandle) -> None:
        """Run a paused microVM (``PATCH /vm Resumed``); `LauncherError` if its VMM refuses or is gone."""
        try:
            self.client(handle).resume()
        except VmmClientError as exc:
            raise LauncherError(f"cannot resume {handle.vm_id!r}: {exc}") from exc

    def pause(self, handle: VmHandle) -> None:
        """Pause a running microVM (``PATCH /vm Paused``)."""
        try:
            self.client(handle).pause()
        except VmmClientError as exc:
            raise LauncherError(f"cannot pause {handle.vm_id!r}: {exc}") from exc

    def alive(self, handle: VmHandle) -> bool:
        """`handle`'s VMM process still runs (a process that exited, even unreaped, does not)."""
        if handle.pid <= 0:
            return False
        with self._lock:
            proc = self._direct.get(handle.pid)
        if proc is not None:
            return proc.poll() is None
        if _running(handle.pid, handle.start_time):
            return True
        _try_reap(handle.pid)  # a VMM re-parented to us after its zygote died
        return False

    def exit_cause(self, handle: VmHandle) -> str:
        """Why `handle`'s dead VMM ended, for the log: ``killed by SIGSYS (seccomp violation)``,
        ``killed by SIGKILL``, ``exit 1: <its last log line>``, or ``unknown``.

        Asks whoever reaped it (the zygote, or this process for a direct
        child); a VMM that is still running is ``running``.
        """
        rc: int | None = None
        with self._lock:
            proc = self._direct.get(handle.pid)
        if proc is not None:
            rc = proc.poll()
            if rc is None:
                return "running"
        elif self.zygote.running and handle.pid > 0:
            try:
                state, rc = self.zygote.wait_status(handle.pid, 0)
            except ZygoteUnavailable:
                state = "unknown"
            if state == "running":
                return "running"
        return describe_exit(rc, _tail(handle.workdir / "vmm.log", 300))

    def destroy(self, handle: VmHandle) -> None:
        """Kill `handle`'s VMM (SIGKILL to its process group), reap it, remove its work directory.

        Idempotent; safe on a half-restored handle and after the zygote was
        restarted or died.
        """
        with self._lock:
            self._handles.pop(handle.vm_id, None)
            client = self._clients.pop(handle.vm_id, None)
            proc = self._direct.pop(handle.pid, None)
        if client is not None:
            client.close()
        if handle.pid > 0:
            self._kill_and_reap(handle, proc)
        with self._lock:
            slot = self._slots.pop(handle.vm_id, None)
        if slot is not None and self.store.network is not None:
            self.store.network.release(slot)  # the VMM is dead: its TAP is closed
        with self._lock:
            jailed = self._jails.pop(handle.vm_id, None)
        if jailed is not None and self.jails is not None:
            self.jails.release(handle.vm_id)  # the VMM is dead: its uid and cgroup are free
        for path in (handle.workdir, Path(jailed.spec.chroot) if jailed is not None else None):
            if path is None:
                continue
            try:
                shutil.rmtree(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise LauncherError(f"cannot remove {path}: {exc}") from exc

    def _kill_and_reap(self, handle: VmHandle, proc: subprocess.Popen[bytes] | None) -> None:
        pid = handle.pid
        if proc is not None:
            if proc.poll() is None:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                proc.wait(_KILL_WAIT)
            except subprocess.TimeoutExpired as exc:
                raise LauncherError(f"VMM {pid} did not die within {_KILL_WAIT} s of SIGKILL") from exc
            return
        if _same_process(pid, handle.start_time):
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        if self.zygote.running:
            try:
                if self.zygote.wait(pid, _KILL_WAIT) == "exited":
                    return
            except ZygoteUnavailable:
                pass
        _kill_and_wait(pid, handle.start_time)

    def destroy_all(self) -> None:
        """Destroy every microVM this launcher knows (a drain)."""
        for handle in self.handles():
            self.destroy(handle)


def describe_exit(returncode: int | None, log_tail: str = "") -> str:
    """A VMM's end in words: its signal (SIGSYS means its seccomp filter killed it) or exit status."""
    if returncode is None:
        return "unknown"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}" + (" (seccomp violation)" if -returncode == signal.SIGSYS else "")
    last = log_tail.strip().splitlines()[-1] if log_tail.strip() else ""
    return f"exit {returncode}" + (f": {last}" if last else "")


# --- crash recovery ------------------------------------------------------------------------


def _fresh_jail_root(path: Path) -> None:
    """An empty jail root at `path`, on a tmpfs of its own if one can be mounted, else a directory.

    A jail (`poolsvc.jailing`) is a few directories, device nodes and sockets
    made and removed for every microVM; on a disk filesystem that churn (new
    inodes, journal) cost ~10-15% of the host's CPU per launch. Whatever a
    predecessor left there (its VMMs are gone: `cleanup_stale` ran) is removed.
    """
    _remove_jail_root(path)
    path.mkdir(mode=0o711)
    try:
        jail_sys.mount("ember-jail", str(path), "tmpfs", jail_sys.MS_NOSUID | jail_sys.MS_NOEXEC,
                       _JAIL_TMPFS_OPTIONS)
    except OSError as exc:
        log.warning("jails stay on the run root's filesystem: cannot mount a tmpfs", path=str(path), error=str(exc))


def _remove_jail_root(path: Path) -> None:
    """Unmount the jail root's tmpfs (every one stacked there) and remove the directory; quiet if absent."""
    while os.path.ismount(path):
        try:
            jail_sys.umount2(str(path), jail_sys.MNT_DETACH)
        except OSError as exc:
            raise LauncherError(f"cannot unmount the jail root {path}: {exc}") from exc
    shutil.rmtree(path, ignore_errors=True)


def cleanup_stale(root: str | Path) -> list[StaleVm]:
    """Kill the VMMs and remove the work directories a crashed predecessor left in run root `root`.

    Call it before starting a `Launcher` on the same root. A VMM is killed
    only if its pid still names the process recorded in ``vmm.pid`` (same
    start time) and that process is an ember-vmm; the zygote recorded in
    ``.zygote.pid`` is stopped the same way.
    """
    root = Path(root)
    found: list[StaleVm] = []
    try:
        entries = sorted(os.listdir(root))
    except FileNotFoundError:
        return found
    zpid = _read_pid_file(root / _ZYGOTE_PID)
    if zpid is not None and _running(*zpid) and _is_zygote(zpid[0]):
        try:
            os.kill(zpid[0], signal.SIGKILL)
        except ProcessLookupError:
            pass
        _kill_and_wait(*zpid)
    for name in (_ZYGOTE_PID, _ZYGOTE_SOCK):
        try:
            os.unlink(root / name)
        except FileNotFoundError:
            pass
    for name in entries:
        path = root / name
        if not _NAME_RE.fullmatch(name) or not path.is_dir() or path.is_symlink():
            continue
        rec = _read_pid_file(path / _PID_FILE)
        killed = False
        if rec is not None:
            pid, start_time = rec
            if _running(pid, start_time) and _is_ember_vmm(pid):
                _kill_and_wait(pid, start_time)
                killed = True
        else:
            # Forked, but the crash came before its pid file was written (bench/chaos.py): find it
            # by its command line's --id (ids are unique to one service start).
            for pid in _vmm_pids_with_id(name):
                _kill_and_wait(pid, process_start_time(pid) or 0)
                killed = True
        shutil.rmtree(path, ignore_errors=True)
        found.append(StaleVm(vm_id=name, pid=rec[0] if rec else None, killed=killed))
        log.info("stale microVM cleaned up", vm_id=name, pid=rec[0] if rec else None, killed=killed)
    return found


def _read_pid_file(path: Path) -> tuple[int, int] | None:
    try:
        doc = json.loads(path.read_text())
        pid, start_time = int(doc["pid"]), int(doc["start_time"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (pid, start_time) if pid > 0 and start_time > 0 else None


def _is_zygote(pid: int) -> bool:
    try:
        return b"vmm.zygote" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False


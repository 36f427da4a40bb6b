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

from poolsvc.vmm_client import VmmClient, VmmClientError

__all__ = [
    "LauncherError",
    "LaunchError",
    "TemplateError",
    "TemplateNotFound",
    "TemplateExists",
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


def _write_json_atomic(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2, sort_keys=True)
        f.write("\n")
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


def _try_reap(pid: int) -> bool:
    """Reap `pid` if it is an exited child of ours; True if it was reaped."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return done == pid


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
            if not _try_reap(pid) and time.monotonic() >= deadline:
                return  # dead; its parent (not us) will reap it
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

    def to_json(self) -> dict[str, Any]:
        return {"format": TEMPLATE_FORMAT, "name": self.name, "state": self.state_path.name,
                "mem": self.mem_path.name, "rootfs": self.rootfs_path.name if self.rootfs_path else None,
                "rootfs_writable": self.rootfs_writable, "vcpus": self.vcpus, "mem_mib": self.mem_mib,
                "kernel": self.kernel, "initrd": self.initrd, "boot_args": self.boot_args,
                "vsock_cid": self.vsock_cid, "agent_port": self.agent_port, "created": self.created}

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
                       created=str(doc["created"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise TemplateError(f"bad template.json in {directory}: {exc}") from exc


class TemplateStore:
    """Templates under ``<root>/templates/``: create (boot, wait, snapshot), get, list, remove."""

    def __init__(self, root: str | Path | None = None, *, python: str = sys.executable) -> None:
        """`root`: default `ember_home()`."""
        self.root = Path(root) if root is not None else ember_home()
        self.dir = self.root / "templates"
        self.python = python

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
        return TemplateInfo.from_json(self.dir / name, doc)

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
                created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
            with open(build / "console.log", "wb") as out, open(build / "vmm.log", "wb") as err:
                proc = subprocess.Popen(
                    [self.python, "-m", "vmm.main", "--api-sock", str(api_sock), "--id", f"template-{name}"],
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
            shutil.rmtree(build)
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
            shutil.rmtree(tdir, ignore_errors=True)
            if isinstance(exc, (TemplateError, VmmClientError, LauncherError, OSError)):
                raise TemplateError(f"cannot create template {name!r}: {exc}\n--- console ---\n{console}\n"
                                    f"--- vmm ---\n{vmm_log}") from exc
            raise


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
                           {"pid": self.proc.pid, "start_time": process_start_time(self.proc.pid) or 0})
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

    def spawn(self, argv: list[str], *, stdin: Path | None, stdout: Path, stderr: Path, cwd: Path) -> int:
        answer = self.request({"op": "spawn", "argv": argv, "stdin": str(stdin) if stdin else None,
                               "stdout": str(stdout), "stderr": str(stderr), "cwd": str(cwd)})
        if not answer.get("ok"):
            raise LaunchError(f"the zygote could not spawn a VMM: {answer.get('error')}")
        return int(answer["pid"])

    def wait(self, pid: int, timeout: float) -> str:
        """"exited" (the zygote reaped it), "running" (after `timeout` s) or "unknown" (not its child)."""
        answer = self.request({"op": "wait", "pid": pid, "timeout": timeout}, timeout=timeout + 10.0)
        return str(answer.get("state", "unknown"))


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
                 python: str = sys.executable, spawn_timeout: float = 30.0, api_timeout: float = 30.0) -> None:
        """`root`: the run directory of this service (default ``$EMBER_HOME/run/<service_id>``).

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
        self._lock = threading.Lock()
        self._zygote_lock = threading.Lock()

    def __repr__(self) -> str:
        mode = "zygote" if self.zygote.running else "direct"
        return f"<Launcher {self.root} vms={len(self._handles)} mode={mode}>"

    # --- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Create the run root and start the zygote (or note that VMMs will be spawned directly)."""
        self.root.mkdir(parents=True, exist_ok=True)
        _check_sun_path(self.root / _ZYGOTE_SOCK)
        if self.use_zygote:
            self._ensure_zygote()

    def close(self) -> None:
        """Stop the zygote; the microVMs keep running (`destroy` them first for a drain)."""
        self.zygote.stop()
        with self._lock:
            clients, self._clients = self._clients, {}
        for c in clients.values():
            c.close()

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

    def _spawn(self, vm_id: str, workdir: Path, api_sock: Path, stdin: Path | None) -> int:
        argv = ["--api-sock", str(api_sock), "--id", vm_id]
        out, err = workdir / "console.log", workdir / "vmm.log"
        if self.use_zygote:
            for attempt in (1, 2):
                if not self._ensure_zygote():
                    break
                try:
                    return self.zygote.spawn(argv, stdin=stdin, stdout=out, stderr=err, cwd=workdir)
                except ZygoteUnavailable as exc:
                    log.warning("zygote request failed; restarting it", error=str(exc), attempt=attempt)
                    with self._zygote_lock:
                        self.zygote.stop()
        fd_in = os.open(stdin, os.O_RDWR) if stdin is not None else subprocess.DEVNULL
        try:
            with open(out, "ab") as fout, open(err, "ab") as ferr:
                proc = subprocess.Popen([self.python, "-m", "vmm.main", *argv], stdin=fd_in, stdout=fout,
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
            if info.rootfs_path is not None and info.rootfs_writable:
                clone_rootfs = workdir / "rootfs.ext4"
                _reflink_copy(info.rootfs_path, clone_rootfs)
                drive_overrides = {ROOTFS_DRIVE_ID: str(clone_rootfs)}
            stdin = None
            if self.console_input:
                stdin = handle.console_in
                os.mkfifo(stdin, 0o600)
            pid = self._spawn(vm_id, workdir, api_sock, stdin)
            start_time = process_start_time(pid) or 0
            handle = VmHandle(vm_id=vm_id, pid=pid, workdir=workdir, api_sock=api_sock, vsock_uds=vsock_uds,
                              agent_port=info.agent_port, template=template_name, start_time=start_time)
            _write_json_atomic(workdir / _PID_FILE, {"pid": pid, "start_time": start_time, "vm_id": vm_id,
                                                     "template": template_name})
            with self._lock:
                self._handles[vm_id] = handle
            client = VmmClient(api_sock, timeout=self.api_timeout)
            with self._lock:
                self._clients[vm_id] = client
            client.wait_until_listening(self.spawn_timeout, alive=lambda: self.alive(handle))
            client.load_snapshot(str(info.state_path), str(info.mem_path), resume_vm=False,
                                 vsock_uds_path=str(vsock_uds), drive_overrides=drive_overrides)
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
        try:
            shutil.rmtree(handle.workdir)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise LauncherError(f"cannot remove {handle.workdir}: {exc}") from exc

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


# --- crash recovery ------------------------------------------------------------------------


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


"""`python -m vmm.zygote --socket PATH`: a fork-server for `ember-vmm` processes.

Starting a VMM with ``python -m vmm.main`` costs an interpreter start and
~100 ms of imports before it even listens. The zygote pays that once: it
imports everything `vmm.main` needs (and the snapshot modules), moves every
object it holds into the GC's permanent generation (`gc.freeze`, so a
child's collections never write to the pages it shares with the zygote),
and then forks one child per microVM. Each child is a full, separate VMM
process (its own session, its own KVM VM); only the clean, read-only pages
of the interpreter are shared.

Protocol primer. The zygote listens on a Unix stream socket. A client sends
one JSON object per line and gets one JSON object per line back, in order:

* spawn (``"op": "spawn"`` may be omitted)::

    {"argv": ["--api-sock", "/run/vm7/api.sock", "--id", "vm7"],
     "stdin": path|null, "stdout": path|null, "stderr": path|null, "cwd": path|null,
     "netns": path|null}
    -> {"ok": true, "pid": 4242}

  `argv` are `vmm.main`'s arguments. stdin defaults to /dev/null (a FIFO
  path is opened read-write, so opening it never blocks and the VMM never
  reads end-of-file); stdout and stderr are opened for appending (created
  0600), /dev/null when null. `netns` (e.g. ``/run/netns/ember-default-3``):
  the child joins that network namespace (setns) before the VMM starts, so
  the TAPs it opens are that namespace's.
  ``"jail": {...}`` (a `jailer.JailSpec` as JSON, prepared by the caller):
  the child enters that jail (`vmm.main.enter_jail`) before the VMM runs;
  paths in `argv` are then paths inside the jail. With ``new_pid_ns`` the
  child is pid 1 of a new PID namespace: the zygote unshares one for its
  next child, forks, and joins its own namespace again (no intermediate
  process, so a jailed VMM costs one fork like any other).
  ``"api_sock": path`` (the host path of the VMM's ``--api-sock``): the
  zygote binds the API socket there and listens *before* it forks (owned by
  the jail's uid/gid, if any); the VMM serves that socket. A client can
  connect, and queue its first request, as soon as it has the answer,
  instead of polling for the socket while the child starts.
* wait: ``{"op": "wait", "pid": N, "timeout": S}`` ->
  ``{"ok": true, "pid": N, "state": "exited", "returncode": RC}`` once the
  child has been reaped (RC is negative for a signal, as in `subprocess`;
  the record is then forgotten), ``"state": "running"`` if it is still
  running after `timeout` seconds (default 0: answer at once), or
  ``"state": "unknown"`` for a pid this zygote did not fork (or whose exit
  was already reported).
* ``{"op": "ping"}`` -> ``{"ok": true, "pid": <zygote pid>, "children": <running>}``.

A bad request gets ``{"ok": false, "error": "..."}`` and the connection
stays open. Exits are recorded whether or not anyone asks (the last
`MAX_EXIT_RECORDS`).

Guarantees:

* The zygote never starts a thread, so every fork copies a single-threaded
  process. The child closes the listening socket, every client connection,
  the selector and the signal wake-up pipe before it runs the VMM, and
  restores the default signal dispositions.
* Children call setsid(): they outlive the zygote and a signal to its
  process group; whoever knows a child's pid can kill it. The zygote reaps
  its children (SIGCHLD through a wake-up pipe, waitpid WNOHANG).
* The child's comm is ``ember-vmm`` (prctl PR_SET_NAME; /proc/PID/comm).
* With ``--parent-pid P`` the zygote exits when its parent is no longer P
  (checked at least once a second), so a crashed pool service does not
  leave it behind. SIGTERM/SIGINT: remove the socket and exit 0; children
  keep running.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import json
import os
import selectors
import signal
import socket
import stat
import sys
import time
import traceback
import types
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, NoReturn

# structlog renders exceptions with `rich` (and colours with `colorama`) when they are
# installed; a VMM never does (its logs are Firecracker's format), and importing them would
# add ~5.5 MiB to the heap every child maps. A None entry makes their import fail cleanly.
for _unused in ("rich", "colorama"):
    sys.modules.setdefault(_unused, None)  # type: ignore[arg-type]


class _ImportedOnUse(types.ModuleType):
    """A stand-in that imports the real module when one of its attributes is first used.

    `structlog.stdlib` imports asyncio at its top for its async logging methods, which a VMM
    (no event loop) never calls; asyncio's ~30 modules would add ~2 MiB to the heap every child
    maps, and to every fork's page tables. ``import asyncio`` finds this stand-in (its
    ``__spec__`` is None: not a module being initialised); ``asyncio.anything`` or a submodule
    import replaces it with the real module.
    """

    def __getattr__(self, attr: str) -> Any:
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        return getattr(importlib.import_module(self.__name__), attr)


if "asyncio" not in sys.modules:
    sys.modules["asyncio"] = _ImportedOnUse("asyncio")

from jailer import JailError, JailSpec, fork_into_new_pid_ns

# Everything `vmm.main.main` imports lazily, imported here once for every child.
import vmm.api  # noqa: F401
import vmm.builder  # noqa: F401
import vmm.config  # noqa: F401
import vmm.logger  # noqa: F401
import vmm.main as vmm_main
import vmm.metrics  # noqa: F401
import vmm.mmds  # noqa: F401
import vmm.procname  # noqa: F401
import vmm.persist  # noqa: F401
import vmm.seccomp
from vmm.api.server import LISTEN_BACKLOG
from vmm.vstate.vm import prepare_shell

vmm_main.preload()  # the list a jailed VMM loads before entering its jail (one list for both)

__all__ = ["Zygote", "ZygoteError", "SpawnRequest", "MAX_EXIT_RECORDS", "CHILD_NAME", "main"]

#: The child's comm (/proc/PID/comm, at most 15 bytes).
CHILD_NAME = b"ember-vmm"
#: Exit statuses kept for `wait` requests that have not come yet.
MAX_EXIT_RECORDS = 4096
#: Longest request line.
MAX_LINE = 64 * 1024
#: A client that does not read its answers for this long is dropped.
SEND_TIMEOUT = 2.0
#: Longest sleep of the loop (the parent check runs at least this often).
LOOP_TICK = 1.0

PR_SET_NAME = 15  # <linux/prctl.h>
CLONE_NEWNET = 0x40000000  # <linux/sched.h>

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.prctl.restype = ctypes.c_int
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int


class ZygoteError(Exception):
    """A zygote request was malformed or could not be carried out."""


@dataclass(frozen=True)
class SpawnRequest:
    """A validated spawn request."""

    argv: tuple[str, ...]
    stdin: str | None = None
    stdout: str | None = None
    stderr: str | None = None
    cwd: str | None = None
    #: A network namespace file the child joins before running the VMM.
    netns: str | None = None
    #: The jail the child enters before running the VMM.
    jail: JailSpec | None = None
    #: A host path where the zygote binds the VMM's API socket before forking it.
    api_sock: str | None = None

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> SpawnRequest:
        """Validate untrusted `doc` (unknown keys are refused)."""
        known = {"op", "argv", "stdin", "stdout", "stderr", "cwd", "netns", "jail", "api_sock"}
        unknown = set(doc) - known
        if unknown:
            raise ZygoteError(f"unknown fields in spawn request: {', '.join(sorted(unknown))}")
        argv = doc.get("argv")
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            raise ZygoteError("argv must be a list of strings")
        paths: dict[str, str | None] = {}
        for key in ("stdin", "stdout", "stderr", "cwd", "netns", "api_sock"):
            value = doc.get(key)
            if value is not None and (not isinstance(value, str) or not value or "\0" in value):
                raise ZygoteError(f"{key} must be a path or null")
            paths[key] = value
        jail = None
        if doc.get("jail") is not None:
            try:
                jail = JailSpec.from_json(doc["jail"])
            except ValueError as exc:
                raise ZygoteError(f"invalid jail: {exc}") from exc
        return cls(argv=tuple(argv), **paths, jail=jail)


@dataclass
class _Conn:
    sock: socket.socket
    buf: bytearray = field(default_factory=bytearray)


@dataclass
class _Waiter:
    conn: _Conn
    pid: int
    deadline: float


def _returncode(status: int) -> int:
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


class Zygote:
    """The fork-server loop: accept, answer requests, fork children, reap them."""

    def __init__(self, socket_path: str, *, parent_pid: int | None = None) -> None:
        self.socket_path = socket_path
        self.parent_pid = parent_pid
        self.children: set[int] = set()
        self.exits: OrderedDict[int, int] = OrderedDict()
        self._conns: dict[int, _Conn] = {}
        self._waiters: list[_Waiter] = []
        self._stopping = False
        self._pid_ns_fd: int | None = None
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(socket_path)
        except OSError as exc:
            self._listener.close()
            raise ZygoteError(f"cannot listen at {socket_path}: {exc}") from exc
        self._listener.listen(128)
        self._listener.setblocking(False)
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)

    def __repr__(self) -> str:
        return (f"<Zygote {self.socket_path} children={len(self.children)} clients={len(self._conns)} "
                f"exits={len(self.exits)}>")

    # --- the loop -------------------------------------------------------------------------

    def serve(self) -> None:
        """Run until SIGTERM/SIGINT or the parent goes away."""
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # the wake-up fd does the work
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        try:
            self._reap()
            while not self._stopping:
                if self.parent_pid is not None and os.getppid() != self.parent_pid:
                    break
                for key, _ in self._sel.select(self._timeout()):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj == self._wake_r:
                        self._drain_wake()
                    else:
                        self._on_readable(key.data)
                self._reap()
                self._expire_waiters()
        finally:
            self.close()

    def _on_stop(self, signum: int, frame: object) -> None:
        self._stopping = True

    def close(self) -> None:
        """Close the socket (removing its file) and every connection; children keep running."""
        for conn in list(self._conns.values()):
            self._drop(conn)
        try:
            self._sel.unregister(self._listener)
        except (KeyError, ValueError):
            pass
        self._listener.close()
        _unlink_socket(self.socket_path)
        self._sel.close()
        signal.set_wakeup_fd(-1)
        for fd in (self._wake_r, self._wake_w, self._pid_ns_fd):
            if fd is None:
                continue
            try:
                os.close(fd)
            except OSError:
                pass

    def _timeout(self) -> float:
        timeout = LOOP_TICK
        now = time.monotonic()
        for w in self._waiters:
            timeout = min(timeout, max(0.0, w.deadline - now))
        return timeout

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        sock.setblocking(False)
        conn = _Conn(sock)
        self._conns[sock.fileno()] = conn
        self._sel.register(sock, selectors.EVENT_READ, conn)

    def _drop(self, conn: _Conn) -> None:
        self._waiters = [w for w in self._waiters if w.conn is not conn]
        fd = conn.sock.fileno()
        if fd >= 0:
            self._conns.pop(fd, None)
            try:
                self._sel.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        conn.sock.close()

    def _on_readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        conn.buf += data
        while True:
            line, sep, rest = conn.buf.partition(b"\n")
            if not sep:
                if len(conn.buf) > MAX_LINE:
                    self._send(conn, {"ok": False, "error": f"request longer than {MAX_LINE} bytes"})
                    self._drop(conn)
                return
            conn.buf = bytearray(rest)
            reply = self._handle(conn, bytes(line))
            if reply is not None and not self._send(conn, reply):
                return

    def _send(self, conn: _Conn, reply: dict[str, Any]) -> bool:
        data = json.dumps(reply).encode() + b"\n"
        try:
            conn.sock.settimeout(SEND_TIMEOUT)
            conn.sock.sendall(data)
            conn.sock.setblocking(False)
            return True
        except OSError:
            self._drop(conn)
            return False

    # --- requests ------------------------------------------------------------------------

    def _handle(self, conn: _Conn, line: bytes) -> dict[str, Any] | None:
        """The answer to one request line, or None if it is deferred (a wait on a running child)."""
        try:
            doc = json.loads(line)
        except ValueError as exc:
            return {"ok": False, "error": f"not JSON: {exc}"}
        if not isinstance(doc, dict):
            return {"ok": False, "error": "a request is a JSON object"}
        op = doc.get("op", "spawn")
        try:
            if op == "spawn":
                pid = self.spawn(SpawnRequest.from_json(doc))
                return {"ok": True, "pid": pid}
            if op == "wait":
                return self._wait(conn, doc)
            if op == "ping":
                return {"ok": True, "pid": os.getpid(), "children": len(self.children)}
        except ZygoteError as exc:
            return {"ok": False, "error": str(exc)}
        return {"ok": False, "error": f"unknown op {op!r}"}

    def _wait(self, conn: _Conn, doc: dict[str, Any]) -> dict[str, Any] | None:
        pid, timeout = doc.get("pid"), doc.get("timeout", 0)
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            raise ZygoteError("wait needs a positive integer pid")
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 <= timeout <= 3600:
            raise ZygoteError("timeout must be a number of seconds in [0, 3600]")
        self._reap()
        answer = self._wait_answer(pid)
        if answer["state"] != "running" or timeout == 0:
            return answer
        self._waiters.append(_Waiter(conn, pid, time.monotonic() + timeout))
        return None

    def _wait_answer(self, pid: int) -> dict[str, Any]:
        if pid in self.exits:
            return {"ok": True, "pid": pid, "state": "exited", "returncode": self.exits.pop(pid)}
        if pid in self.children:
            return {"ok": True, "pid": pid, "state": "running"}
        return {"ok": True, "pid": pid, "state": "unknown"}

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                break
            self.children.discard(pid)
            self.exits[pid] = _returncode(status)
            while len(self.exits) > MAX_EXIT_RECORDS:
                self.exits.popitem(last=False)
        self._answer_finished_waiters()

    def _expire_waiters(self) -> None:
        now = time.monotonic()
        due = [w for w in self._waiters if w.deadline <= now]
        if due:
            self._waiters = [w for w in self._waiters if w.deadline > now]
            for w in due:
                self._send(w.conn, self._wait_answer(w.pid))

    def _answer_finished_waiters(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if w.pid in self.children:
                self._waiters.append(w)
            else:
                self._send(w.conn, self._wait_answer(w.pid))

    # --- forking -------------------------------------------------------------------------

    def spawn(self, req: SpawnRequest) -> int:
        """Fork a child that runs ``vmm.main.main(req.argv)``; its pid."""
        for stream in (sys.stdout, sys.stderr):
            stream.flush()  # nothing buffered may be written twice
        listener = _listen(req) if req.api_sock is not None else None
        try:
            pid = self._fork(req, listener)
        except BaseException:
            if listener is not None:
                listener.close()
                _unlink_socket(req.api_sock)
            raise
        if listener is not None:
            listener.close()  # the child's copy serves it
        return pid

    def _fork(self, req: SpawnRequest, listener: socket.socket | None) -> int:
        try:
            if req.jail is not None and req.jail.new_pid_ns:
                # The child is pid 1 of a new PID namespace and still our own child: no
                # intermediate process (a second fork and exit of this whole address space).
                pid = fork_into_new_pid_ns(own_pid_ns=self._own_pid_ns())
            else:
                # SAFETY: fork from a single-threaded process (the zygote never starts a thread),
                # so no lock is held by a thread that would not exist in the child.
                pid = os.fork()
        except JailError as exc:
            if os.readlink("/proc/self/ns/pid_for_children") != os.readlink("/proc/self/ns/pid"):
                self._stopping = True  # every later child would land in a foreign namespace
            raise ZygoteError(str(exc)) from exc
        except OSError as exc:
            raise ZygoteError(f"fork failed: {exc}") from exc
        if pid == 0:
            self._child_and_exit(req, listener)
        self.children.add(pid)
        return pid

    def _own_pid_ns(self) -> int:
        """An fd of this process's PID namespace (opened once), to return to after each new one."""
        if self._pid_ns_fd is None:
            self._pid_ns_fd = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        return self._pid_ns_fd

    def _child_and_exit(self, req: SpawnRequest, listener: socket.socket | None) -> NoReturn:
        """In a forked child: the VMM; always ends in os._exit with its status."""
        rc = 1
        try:
            rc = self._child(req, listener)
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:  # noqa: BLE001 - the child must end in os._exit, whatever happened
            try:
                traceback.print_exc()
            except BaseException:  # noqa: BLE001
                pass
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except BaseException:  # noqa: BLE001
                    pass
            os._exit(rc & 0xFF if rc >= 0 else 1)

    def _close_inherited(self) -> None:
        """In the child: close every fd of the zygote's (sockets, selector, wake-up pipe)."""
        signal.set_wakeup_fd(-1)
        for conn in list(self._conns.values()):
            os.close(conn.sock.detach())
        self._conns.clear()
        self._waiters.clear()
        os.close(self._listener.detach())
        self._sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self._pid_ns_fd is not None:
            os.close(self._pid_ns_fd)
            self._pid_ns_fd = None

    def _child(self, req: SpawnRequest, listener: socket.socket | None) -> int:
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGPIPE):
            signal.signal(signum, signal.SIG_DFL if signum != signal.SIGPIPE else signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self._close_inherited()
        os.setsid()
        name = ctypes.create_string_buffer(CHILD_NAME, 16)
        # SAFETY: PR_SET_NAME copies at most 16 bytes up to a NUL from the pointer; `name` is a
        # 16-byte zero-filled buffer holding the 9-byte name, alive (a local) for the whole call.
        _libc.prctl(PR_SET_NAME, ctypes.addressof(name), 0, 0, 0)
        _redirect_stdio(req)
        if req.netns is not None:
            _enter_netns(req.netns)
        if req.cwd is not None:
            os.chdir(req.cwd)
        # The VMM process starts now, not when the zygote imported vmm.main.
        vmm_main._START_WALL_NS = time.monotonic_ns()
        vmm_main._START_CPU_NS = time.process_time_ns()
        sys.argv = ["ember-vmm", *req.argv]
        if req.jail is not None:
            # The VMM creates its KVM VM (prepare_shell) itself, inside the jail and its cgroup.
            return vmm_main.main(list(req.argv), jail=req.jail, api_listener=listener)
        prepare_shell()  # KVM VMs belong to the process that creates them: after the fork
        return vmm_main.main(list(req.argv), api_listener=listener)


def _listen(req: SpawnRequest) -> socket.socket:
    """The VMM's API socket, bound at `req.api_sock` and listening; owned by the jail's uid/gid."""
    assert req.api_sock is not None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(req.api_sock)
    except OSError as exc:
        sock.close()
        raise ZygoteError(f"cannot bind the API socket {req.api_sock}: {exc.strerror or exc}") from exc
    try:
        if req.jail is not None:
            # As if the jailed VMM had made it: the socket is its, inside its chroot.
            os.chown(req.api_sock, req.jail.uid, req.jail.gid)
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        _unlink_socket(req.api_sock)
        raise ZygoteError(f"cannot listen on the API socket {req.api_sock}: {exc.strerror or exc}") from exc
    return sock


def _unlink_socket(path: str | None) -> None:
    try:
        if path is not None and stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except OSError:
        pass


def _enter_netns(path: str) -> None:
    """Move this (single-threaded, just forked) process into the network namespace file `path`."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        # SAFETY: setns takes an fd and a flag by value, no memory. The forked child has one
        # thread, so the whole process (and every thread the VMM starts later) is in the namespace.
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise ZygoteError(f"cannot join network namespace {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _open_output(path: str | None) -> int:
    if path is None:
        return os.open(os.devnull, os.O_WRONLY)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)


def _redirect_stdio(req: SpawnRequest) -> None:
    if req.stdin is None:
        fd_in = os.open(os.devnull, os.O_RDONLY)
    else:
        # O_RDWR: opening a FIFO never blocks, and the reader never sees end-of-file.
        fd_in = os.open(req.stdin, os.O_RDWR if stat.S_ISFIFO(os.stat(req.stdin).st_mode) else os.O_RDONLY)
    fd_out = _open_output(req.stdout)
    fd_err = fd_out if req.stderr is not None and req.stderr == req.stdout else _open_output(req.stderr)
    for src, dst in ((fd_in, 0), (fd_out, 1), (fd_err, 2)):
        os.dup2(src, dst)
    for fd in {fd_in, fd_out, fd_err}:
        if fd > 2:
            os.close(fd)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vmm.zygote", description="Fork-server for ember-vmm processes.")
    p.add_argument("--socket", required=True, metavar="PATH", help="Unix socket to listen on (must not exist)")
    p.add_argument("--parent-pid", type=int, metavar="PID", help="exit when the parent is no longer PID")
    args = p.parse_args(argv)
    if args.parent_pid is not None and os.getppid() != args.parent_pid:
        return 1
    try:
        zygote = Zygote(args.socket, parent_pid=args.parent_pid)
    except ZygoteError as exc:
        print(f"vmm.zygote: {exc}", file=sys.stderr)
        return 1
    # Once for every child: the built-in seccomp filters compiled, the MSRs a snapshot saves
    # probed (host facts; a child's filtered VMM thread could not create the probe's VM).
    try:
        vmm.seccomp.filters_from_flags(no_seccomp=False, filter_file=None)
    except vmm.seccomp.SeccompError:
        pass  # each child reports it
    vmm_main.probe_msrs()
    # Every object made so far (modules, functions, the zygote) goes to the permanent
    # generation: no collection in a child writes to those shared pages.
    gc.collect()
    gc.freeze()
    zygote.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())

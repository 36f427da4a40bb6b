"""`ember snapshot ...` and `ember page-server`: the operator side of the snapshot store.

    ember snapshot ls [--json]
    ember snapshot show ID [--json]
    ember snapshot rm ID
    ember snapshot gc [--json]
    ember snapshot put ID --state FILE --mem FILE [--meta KEY=VALUE]... [--json]
    ember snapshot verify [--quick] [--json]
    ember snapshot sign --state FILE --mem FILE [--key-file K]
    ember snapshot verify --state FILE --mem FILE [--key-file K] [--json]
    ember page-server --socket PATH (--mem FILE | --snapshot ID) [--no-prefetch]
                      [--record-working-set] [--record-seconds N] [--once]
                      [--key-file K [--signature FILE]]

Every command takes ``--store DIR`` (default ``$EMBER_HOME/snapshots``).
Errors are one line on stderr and exit status 1.

Signatures (docs/snapshots.md). ``sign`` writes ``FILE.sig`` beside the
state file: an HMAC-SHA256, under the snapshot key, over the state file's
SHA-256 and a per-64-KiB-chunk digest of the memory file. ``verify
--state`` checks such a pair completely. The key defaults to
``$EMBER_HOME/snapshot.key`` (``sign`` creates it, mode 0600, on first
use). ``put`` keeps a signature found beside the state file in the
snapshot's meta. A page server given a key (``--key-file`` or
``$EMBER_SNAPSHOT_KEY_FILE``) serves only signed memory and checks every
chunk against the signature before installing it: the signature comes
from ``--signature`` (with ``--mem``: required) or the store; a chunk that
does not match ends that VM's service (and its VMM is killed).

Page server primer. A VMM restoring a snapshot with a uffd memory backend
(Firecracker's ``"backend_type": "Uffd"``) maps guest memory anonymous,
registers it with a userfaultfd, connects to the page server's Unix socket
and sends one message: the mappings JSON with the uffd attached
(SCM_RIGHTS; see `snapshot.uffd`). It then resumes the VM and keeps the
connection open for the VM's life: the VMM closing it, or exiting, ends
that VM's service. For each connection the server

1. receives the handshake and checks the mappings against the source
   (a raw memory file, or a snapshot in the chunk store); a bad handshake
   is refused — logged, connection closed — and the server keeps running;
2. with ``--snapshot``: if the store holds a working set for the snapshot
   (REAP), installs it in bulk before serving faults. The VMM resumes right
   after the handshake, so faults may race the prefetch: they wait until
   it is done and then find their page present (a wake, no copy);
3. serves faults (UFFDIO_COPY / UFFDIO_ZEROPAGE) and remove events (pages
   the guest gave back read as zeros afterwards, as in Firecracker's
   example handler) until the socket hangs up or the process is gone;
4. when the snapshot had no working set (or with ``--record-working-set``,
   which also skips the prefetch so the set is measured afresh), records
   what was installed, in order, and stores it when the connection ends
   (or after ``--record-seconds``);
5. reports: one line on stderr, one JSON line on stdout (for benches)::

       {"event": "vm-done", "pid": 4242, "faults": 812, "bytes": 53215232,
        "prefetched_bytes": 0, "zero_pages": 96, "seconds": 1.5,
        "working_set": "recorded", "working_set_runs": 812, "end": "hangup", "error": null}

   ``bytes`` counts what was installed on demand (copies and zero pages),
   ``prefetched_bytes`` what the prefetch installed, ``zero_pages`` the
   4 KiB pages installed as zeros on demand. ``end`` is ``hangup`` (the
   VMM closed the socket), ``gone`` (the faulting process exited),
   ``stopped`` (the server was told to stop) or ``error``. Other events:
   ``{"event": "listening", "socket": ...}`` once the socket accepts, and
   ``{"event": "vm-refused", "pid": ..., "error": ...}``.

Connections (clones of one snapshot) are served concurrently, one thread
each, from one shared source. SIGTERM or SIGINT closes the socket, removes
the socket file, stops every connection's service and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import errno
import json
import os
import select
import signal
import socket
import stat
import struct
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from snapshot import (
    ChunkStore,
    ChunkStoreError,
    ChunkStoreSource,
    FaultResolver,
    HandshakeError,
    MemoryFileSource,
    PageServer,
    PageSource,
    PutStats,
    SnapshotFormatError,
    SnapshotInfo,
    UffdError,
    UffdMapping,
    Userfaultfd,
    WorkingSetRecorder,
    prefetch_plan,
    receive_handshake,
)
from snapshot.auth import (
    DEFAULT_SIGN_CHUNK_SIZE,
    KEY_FILE_ENV,
    SignatureMissing,
    SnapshotAuthError,
    SnapshotKey,
    SnapshotSignature,
    VerifiedSource,
    ensure_key_file,
    load_key_file,
    read_signature,
    sign_snapshot,
    signature_path,
    verify_signature,
    write_signature,
)
from snapshot.format import read_bounded
from snapshot.memfile import memory_digest_of_file, verify_memory_fd

__all__ = [
    "SnapshotCliError",
    "StoreMissing",
    "SocketInUse",
    "NotASocket",
    "BadOption",
    "default_store_dir",
    "default_key_file",
    "sign_files",
    "verify_files",
    "snapshot_summary",
    "snapshot_details",
    "VmServiceReport",
    "PageService",
    "bind_unix_socket",
    "cmd_snapshot",
    "cmd_page_server",
    "add_parsers",
]

PAGE_SIZE = 4096
# How long a new connection may take to send its handshake.
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
# How long shutdown waits for each connection's service to wind down.
_JOIN_TIMEOUT = 10.0
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid (SO_PEERCRED)


# --- errors ------------------------------------------------------------------


class SnapshotCliError(Exception):
    """Snapshot command failed."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail)
        self.detail = detail

    def __str__(self) -> str:
        summary = (type(self).__doc__ or type(self).__name__).strip().splitlines()[0].rstrip(".")
        return f"{summary}: {self.detail}" if self.detail else summary


class StoreMissing(SnapshotCliError):
    """No snapshot store at this path."""


class SocketInUse(SnapshotCliError):
    """A page server is already listening on this socket."""


class NotASocket(SnapshotCliError):
    """Path exists and is not a socket."""


class BadOption(SnapshotCliError):
    """Invalid option."""


# Everything a command reports as one line instead of a traceback.
_OPERATOR_ERRORS = (SnapshotCliError, ChunkStoreError, SnapshotFormatError, SnapshotAuthError, UffdError,
                    OSError)
#: Key in a stored snapshot's meta holding its signature file (hex).
META_SIGNATURE = "signature"
_MAX_STATE = 32 << 20


def _fail(exc: BaseException) -> int:
    print(f"ember: {exc}", file=sys.stderr)
    return 1


# --- the store ---------------------------------------------------------------


def default_store_dir() -> Path:
    """``$EMBER_HOME/snapshots`` (EMBER_HOME defaults to ~/.cache/ember)."""
    from guest.images import ember_home
    return ember_home() / "snapshots"


def default_key_file() -> Path:
    """``$EMBER_HOME/snapshot.key``."""
    from guest.images import ember_home
    return ember_home() / "snapshot.key"


def sign_files(key: SnapshotKey, state_path: str | os.PathLike[str], mem_path: str | os.PathLike[str], *,
               chunk_size: int = DEFAULT_SIGN_CHUNK_SIZE) -> SnapshotSignature:
    """Sign a state file and its (full, or merged) memory file: writes ``<state>.sig``.

    The memory is read as it is now: sign only files you trust (a snapshot
    your own VMM just wrote); signing launders whatever they hold.
    """
    state = read_bounded(state_path, _MAX_STATE)
    data = sign_snapshot(key, state, memory_digest_of_file(mem_path, chunk_size=chunk_size))
    write_signature(signature_path(state_path), data)
    return verify_signature(key, data)


def verify_files(key: SnapshotKey, state_path: str | os.PathLike[str],
                 mem_path: str | os.PathLike[str] | None) -> SnapshotSignature:
    """Check ``<state>.sig``, the state file and (unless None) the memory file; `SnapshotAuthError` if not."""
    signature = read_signature(key, signature_path(state_path))
    signature.check_state(read_bounded(state_path, _MAX_STATE))
    if mem_path is not None:
        fd = os.open(mem_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            verify_memory_fd(fd, signature.memory)
        finally:
            os.close(fd)
    return signature


def _open_store(directory: str | os.PathLike[str] | None, *, create: bool = False) -> ChunkStore:
    """The store at `directory`; unless `create`, one must already be there
    (opening a ChunkStore creates an empty one, which a typo should not do)."""
    root = Path(directory) if directory is not None else default_store_dir()
    if not create and not (root / "catalog").is_dir():
        raise StoreMissing(str(root))
    return ChunkStore(root)


def _iso(ns: int) -> str:
    return datetime.datetime.fromtimestamp(ns / 1e9, tz=datetime.timezone.utc).isoformat(timespec="seconds")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _finite(x: float) -> float | None:
    """A ratio for JSON: infinity (nothing written) becomes null."""
    return None if x in (float("inf"), float("-inf")) or x != x else round(x, 3)


def _put_stats(info: SnapshotInfo) -> PutStats | None:
    """The PutStats a snapshot was stored with, if its manifest's record is intact."""
    try:
        return PutStats(snapshot_id=info.snapshot_id, seconds=0.0, **info.stats)
    except TypeError:
        return None


def snapshot_summary(info: SnapshotInfo) -> dict[str, Any]:
    """One `ls` row: id, created, memory size, stored bytes, whether it has a working set.

    ``stored_bytes`` is what the snapshot added to the store when it was put
    (compressed new chunks; chunks shared with earlier snapshots cost nothing).
    """
    return {
        "id": info.snapshot_id,
        "created": _iso(info.created_ns),
        "memory_size": info.memory_size,
        "stored_bytes": int(info.stats.get("new_stored_bytes", 0)),
        "has_working_set": info.has_working_set,
    }


def snapshot_details(info: SnapshotInfo, working_set: list[tuple[int, int]] | None) -> dict[str, Any]:
    """Everything `show` reports: the summary, chunk counts, ratios, layout, working set."""
    stats = _put_stats(info)
    details = snapshot_summary(info)
    meta = dict(info.meta)
    if META_SIGNATURE in meta:  # tens of KiB of hex: say that it is there, not what it is
        meta[META_SIGNATURE] = f"<{len(str(meta[META_SIGNATURE])) // 2} bytes>"
    details.update({
        "created_ns": info.created_ns,
        "meta": meta,
        "chunk_size": info.chunk_size,
        "chunks": info.chunks,
        "zero_chunks": info.zero_chunks,
        "nonzero_chunks": info.chunks - info.zero_chunks,
        "state_size": info.state_size,
        "state_sha256": info.state_digest.hex(),
        "layout": info.layout.to_tree() if info.layout is not None else None,
        "put": dict(info.stats),
        "compression_ratio": _finite(stats.compression_ratio) if stats else None,
        "dedup_ratio": _finite(stats.dedup_ratio) if stats else None,
        "space_ratio": _finite(stats.space_ratio) if stats else None,
        "working_set": None if working_set is None else {
            "runs": len(working_set), "bytes": sum(length for _, length in working_set)},
    })
    return details


def _print_table(rows: list[dict[str, Any]]) -> None:
    header = ("ID", "CREATED", "MEMORY", "STORED", "WORKING SET")
    lines = [header] + [(r["id"], r["created"], _human(r["memory_size"]), _human(r["stored_bytes"]),
                         "yes" if r["has_working_set"] else "no") for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())


def _snapshot_ls(args: argparse.Namespace) -> int:
    try:
        store = _open_store(args.store)
    except StoreMissing:
        rows: list[dict[str, Any]] = []  # no store yet: no snapshots
    else:
        with store:
            rows = [snapshot_summary(info) for info in store.list()]
    if args.json:
        print(json.dumps(rows, indent=2))
    elif rows:
        _print_table(rows)
    return 0


def _snapshot_show(args: argparse.Namespace) -> int:
    with _open_store(args.store) as store:
        info = store.show(args.id)
        details = snapshot_details(info, store.get_working_set(args.id))
    if args.json:
        print(json.dumps(details, indent=2))
        return 0
    put = details["put"]
    ws = details["working_set"]
    lines = [
        ("id", details["id"]),
        ("created", details["created"]),
        ("memory", _human(details["memory_size"])),
        ("chunks", f"{details['chunks']} of {_human(details['chunk_size'])} "
                   f"({details['zero_chunks']} zero, {details['nonzero_chunks']} stored)"),
        ("stored", f"{_human(details['stored_bytes'])} new on put "
                   f"({put.get('new_chunks', '?')} new chunks, "
                   f"{put.get('dedup_within', '?')} dedup within, {put.get('dedup_across', '?')} across)"),
        ("ratios", f"compression {details['compression_ratio']}, dedup {details['dedup_ratio']}, "
                   f"space {details['space_ratio']}"),
        ("state", f"{_human(details['state_size'])} sha256 {details['state_sha256'][:16]}"),
        ("working set", "none" if ws is None else f"{ws['runs']} runs, {_human(ws['bytes'])}"),
    ]
    if details["meta"]:
        lines.append(("meta", json.dumps(details["meta"], sort_keys=True)))
    for key, value in lines:
        print(f"{key:12} {value}")
    return 0


def _snapshot_rm(args: argparse.Namespace) -> int:
    with _open_store(args.store) as store:
        released = store.remove(args.id)
    print(f"removed {args.id}: {released} chunks no longer referenced (`ember snapshot gc` frees them)")
    return 0


def _snapshot_gc(args: argparse.Namespace) -> int:
    with _open_store(args.store) as store:
        stats = store.gc()
    result = {"chunks_deleted": stats.chunks_deleted, "bytes_freed": stats.bytes_freed,
              "tmp_files_deleted": stats.tmp_files_deleted, "chunks_kept": stats.chunks_kept}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"freed {stats.chunks_deleted} chunks, {_human(stats.bytes_freed)} "
              f"({stats.tmp_files_deleted} temporary files); {stats.chunks_kept} chunks kept")
    return 0


def _parse_meta(items: list[str]) -> dict[str, str]:
    meta = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BadOption(f"--meta {item!r} is not KEY=VALUE")
        meta[key] = value
    return meta


def _snapshot_put(args: argparse.Namespace) -> int:
    meta: dict[str, Any] = _parse_meta(args.meta or [])
    sig_path = signature_path(args.state)
    if os.path.exists(sig_path):
        meta[META_SIGNATURE] = read_bounded(sig_path, 16 << 20).hex()
    with _open_store(args.store, create=True) as store:
        stats = store.put_snapshot(args.id, args.state, args.mem, meta)
    if args.json:
        print(json.dumps({"id": args.id, **stats.to_tree(), "seconds": round(stats.seconds, 3),
                          "compression_ratio": _finite(stats.compression_ratio),
                          "dedup_ratio": _finite(stats.dedup_ratio),
                          "space_ratio": _finite(stats.space_ratio)}, indent=2))
    else:
        print(f"stored {args.id}: {_human(stats.logical_bytes)} memory ({_human(stats.zero_bytes)} zero), "
              f"{_human(stats.new_raw_bytes)} new -> {_human(stats.new_stored_bytes)} on disk "
              f"in {stats.seconds:.2f}s")
    return 0


def _key_from(args: argparse.Namespace, *, create: bool = False) -> SnapshotKey:
    path = args.key_file or os.environ.get(KEY_FILE_ENV) or str(default_key_file())
    return ensure_key_file(path) if create else load_key_file(path)


def _snapshot_sign(args: argparse.Namespace) -> int:
    key = _key_from(args, create=True)
    signature = sign_files(key, args.state, args.mem)
    print(f"signed {args.state}: {signature_path(args.state)} (key {key.key_id.hex()}, "
          f"{signature.memory.count} memory chunks)")
    return 0


def _verify_pair(args: argparse.Namespace) -> int:
    if args.mem is None:
        raise BadOption("verify --state needs --mem (the memory file to check)")
    key = _key_from(args)
    try:
        signature = verify_files(key, args.state, args.mem)
    except SnapshotAuthError as exc:
        if args.json:
            print(json.dumps({"ok": False, "error": str(exc)}, indent=2))
        return _fail(exc)
    if args.json:
        print(json.dumps({"ok": True, "key_id": signature.key_id.hex(), "state_size": signature.state_size,
                          "memory_size": signature.memory.size, "chunks": signature.memory.count}, indent=2))
    else:
        print(f"ok: {args.state} and {args.mem} match their signature (key {signature.key_id.hex()})")
    return 0


def _snapshot_verify(args: argparse.Namespace) -> int:
    if args.state is not None:
        return _verify_pair(args)
    if args.mem is not None:
        raise BadOption("--mem needs --state")
    with _open_store(args.store) as store:
        report = store.verify(check_contents=not args.quick)
    if args.json:
        print(json.dumps({"ok": report.ok, "snapshots_checked": report.snapshots_checked,
                          "chunks_checked": report.chunks_checked, "problems": report.problems}, indent=2))
    else:
        for problem in report.problems:
            print(problem)
        print(f"{'ok' if report.ok else 'PROBLEMS'}: {report.snapshots_checked} snapshots, "
              f"{report.chunks_checked} chunks checked, {len(report.problems)} problems")
    return 0 if report.ok else 1


_SNAPSHOT_COMMANDS = {
    "ls": _snapshot_ls, "show": _snapshot_show, "rm": _snapshot_rm,
    "gc": _snapshot_gc, "put": _snapshot_put, "verify": _snapshot_verify, "sign": _snapshot_sign,
}


def cmd_snapshot(args: argparse.Namespace) -> int:
    """`ember snapshot SUBCOMMAND`: exit status 0, or 1 with one line on stderr."""
    try:
        return _SNAPSHOT_COMMANDS[args.snapshot_cmd](args)
    except _OPERATOR_ERRORS as exc:
        return _fail(exc)


# --- the page server ---------------------------------------------------------


@dataclass
class VmServiceReport:
    """How one VMM connection was served (the ``vm-done`` / ``vm-refused`` event)."""

    pid: int | None
    faults: int = 0
    bytes: int = 0
    prefetched_bytes: int = 0
    zero_pages: int = 0
    seconds: float = 0.0
    working_set: str | None = None   # "prefetched", "recorded", or None
    working_set_runs: int = 0
    end: str = ""                    # hangup, gone, stopped, error, refused
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.end in ("hangup", "gone", "stopped")

    def to_json(self) -> dict[str, Any]:
        if self.end == "refused":
            return {"event": "vm-refused", "pid": self.pid, "error": self.error}
        return {"event": "vm-done", **asdict(self), "seconds": round(self.seconds, 6)}

    def log_line(self) -> str:
        if self.end == "refused":
            return f"vm pid={self.pid} refused: {self.error}"
        line = (f"vm pid={self.pid} {self.end}: faults={self.faults} bytes={self.bytes} "
                f"prefetched={self.prefetched_bytes} zero_pages={self.zero_pages} {self.seconds:.3f}s")
        if self.working_set:
            line += f" working-set={self.working_set}({self.working_set_runs} runs)"
        if self.error:
            line += f" error: {self.error}"
        return line


class _CountingUffd(Userfaultfd):
    """A received uffd that counts the bytes it installs, by kind."""

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        self.copied = 0
        self.zeroed = 0

    def copy(self, dest: int, data: bytes, *, wake: bool = True) -> int:
        rc = super().copy(dest, data, wake=wake)
        if rc > 0:
            self.copied += rc
        return rc

    def zeropage(self, dest: int, length: int, *, wake: bool = True) -> int:
        rc = super().zeropage(dest, length, wake=wake)
        if rc > 0:
            self.zeroed += rc
        return rc

    @property
    def installed(self) -> int:
        return self.copied + self.zeroed


class _StoppableRecorder(WorkingSetRecorder):
    """A working-set recorder that can be closed (at --record-seconds) from another thread."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._closed = False

    def record(self, offset: int, length: int) -> None:
        with self._lock:
            if not self._closed:
                super().record(offset, length)

    def close(self) -> list[tuple[int, int]] | None:
        """Stop recording; the runs so far, or None if already closed."""
        with self._lock:
            if self._closed:
                return None
            self._closed = True
            return self.runs


def bind_unix_socket(path: str, backlog: int = 64) -> socket.socket:
    """A listening Unix stream socket at `path`.

    A stale socket file (nobody answers) is removed first; a live one is
    refused with `SocketInUse`, and anything that is not a socket with
    `NotASocket`.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(mode):
            raise NotASocket(path)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        else:
            raise SocketInUse(path)
        finally:
            probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind(path)
        listener.listen(backlog)
    except OSError as exc:
        listener.close()
        if exc.errno == errno.EADDRINUSE:  # another server bound it after our probe
            raise SocketInUse(path) from exc
        raise
    return listener


def _peer_pid(conn: socket.socket) -> int | None:
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    pid = _UCRED.unpack(raw)[0]
    return pid or None


_HANGUP = select.POLLHUP | select.POLLRDHUP | select.POLLERR | select.POLLNVAL


def _watch_hangup(conn: socket.socket, server: PageServer, hung_up: threading.Event) -> None:
    """Stop `server` when the VMM's end of `conn` closes (or ours is shut down).

    Nothing is expected on the socket after the handshake; anything that
    arrives is read and discarded.
    """
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN | select.POLLRDHUP)
    while True:
        events = poller.poll()
        if any(mask & _HANGUP for _, mask in events):
            break
        try:
            if not conn.recv(4096):
                break
        except OSError:
            break
    hung_up.set()
    server.stop()


class PageService:
    """Listens on a Unix socket and serves each VMM that connects from one shared page source.

    `serve_forever` runs the accept loop (one thread per connection);
    `stop` may be called from any thread or a signal handler.
    """

    def __init__(self, socket_path: str, source: PageSource, *, source_name: str = "",
                 store: ChunkStore | None = None, snapshot_id: str | None = None,
                 prefetch: bool = True, record_working_set: bool = False,
                 record_seconds: float | None = None, once: bool = False,
                 handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
                 out: TextIO | None = None, log: TextIO | None = None) -> None:
        if (store is None) != (snapshot_id is None):
            raise ValueError("store and snapshot_id go together")
        if store is None and (record_working_set or record_seconds is not None):
            raise ValueError("recording a working set needs a store and a snapshot id")
        self.socket_path = os.path.abspath(socket_path)
        self.source = source
        self.source_name = source_name or repr(source)
        self.store = store
        self.snapshot_id = snapshot_id
        self.prefetch = prefetch
        self.record_working_set = record_working_set
        self.record_seconds = record_seconds
        self.once = once
        self.handshake_timeout = handshake_timeout
        self.out = out if out is not None else sys.stdout
        self.log = log if log is not None else sys.stderr
        self.served = 0
        self.refused = 0
        self._stopping = False
        self._active: dict[int, PageServer] = {}
        self._handshaking: dict[int, socket.socket] = {}
        self._threads: set[threading.Thread] = set()
        self._threads_lock = threading.Lock()
        self._out_lock = threading.Lock()
        self._ws_lock = threading.Lock()
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._listener: socket.socket | None = bind_unix_socket(self.socket_path)
        self._inode = os.stat(self.socket_path).st_ino

    # --- control -------------------------------------------------------------

    def stop(self) -> None:
        """Stop accepting and stop every connection's service (any thread, signal handlers too)."""
        self._stopping = True
        if self._stop_w >= 0:
            try:
                os.write(self._stop_w, b"x")
            except BlockingIOError:
                pass  # a wake-up is already pending
        for server in list(self._active.values()):
            server.stop()
        for conn in list(self._handshaking.values()):
            try:
                conn.shutdown(socket.SHUT_RDWR)  # its handshake read returns at once: nothing was sent
            except OSError:
                pass

    def close(self) -> None:
        """Close the socket and remove its file (if it is still ours)."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            try:
                if os.stat(self.socket_path).st_ino == self._inode:
                    os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
        for fd in (self._stop_r, self._stop_w):
            if fd >= 0:
                os.close(fd)
        self._stop_r = self._stop_w = -1

    def __enter__(self) -> "PageService":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.close()

    def __repr__(self) -> str:
        return (f"<PageService {self.socket_path} {self.source_name} active={len(self._active)} "
                f"served={self.served} refused={self.refused}>")

    # --- output --------------------------------------------------------------

    def _emit(self, event: dict[str, Any]) -> None:
        with self._out_lock:
            self.out.write(json.dumps(event) + "\n")
            self.out.flush()

    def _log(self, message: str) -> None:
        with self._out_lock:
            self.log.write(f"ember page-server: {message}\n")
            self.log.flush()

    # --- accept loop ---------------------------------------------------------

    def serve_forever(self) -> int:
        """Accept VMM connections until `stop`; returns the exit status.

        With `once`, returns after the first VM's service ends: 0 if it
        ended normally, 1 if it was refused or failed.
        """
        assert self._listener is not None, "closed"
        self._listener.setblocking(False)
        poller = select.poll()
        poller.register(self._listener.fileno(), select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        self._emit({"event": "listening", "socket": self.socket_path, "source": self.source_name,
                    "pid": os.getpid()})
        self._log(f"listening on {self.socket_path}, serving {self.source_name}")
        status = 0
        try:
            while not self._stopping:
                ready = dict(poller.poll())
                if self._stop_r in ready or self._stopping:
                    break
                try:
                    conn, _ = self._listener.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                conn.setblocking(True)
                if self.once:
                    report = self._handle(conn)
                    if report is not None:
                        status = 0 if report.ok else 1
                        break
                    continue
                thread = threading.Thread(target=self._handle, args=(conn,), daemon=True,
                                          name=f"page-server-{self.served + self.refused}")
                with self._threads_lock:
                    self._threads = {t for t in self._threads if t.is_alive()}
                    self._threads.add(thread)
                thread.start()
        finally:
            self.stop()
            self.close()
            with self._threads_lock:
                threads = list(self._threads)
            for thread in threads:
                thread.join(_JOIN_TIMEOUT)
        return status

    # --- one connection ------------------------------------------------------

    def _handle(self, conn: socket.socket) -> VmServiceReport | None:
        """Serve one VMM connection to its end; None if it was only a liveness probe."""
        started = time.monotonic()
        pid = _peer_pid(conn)
        self._handshaking[id(conn)] = conn
        try:
            try:
                if self._stopping:
                    return None
                conn.settimeout(self.handshake_timeout)
                if not conn.recv(1, socket.MSG_PEEK):
                    return None  # closed without a word: a liveness probe, or we are stopping
                mappings, fd = receive_handshake(conn)
            except (HandshakeError, OSError) as exc:
                return self._refuse(pid, f"handshake: {exc}")
            finally:
                self._handshaking.pop(id(conn), None)
            conn.settimeout(None)
            # The server polls the uffd, which only works on a non-blocking one
            # (a blocking uffd polls as POLLERR); the flag is the file's, shared
            # with the VMM, which never reads it.
            os.set_blocking(fd, False)
            uffd = _CountingUffd(fd)
            try:
                return self._serve(conn, uffd, mappings, pid, started)
            finally:
                uffd.close()
        finally:
            conn.close()

    def _refuse(self, pid: int | None, error: str) -> VmServiceReport:
        report = VmServiceReport(pid=pid, end="refused", error=error)
        with self._threads_lock:
            self.refused += 1
        self._log(report.log_line())
        self._emit(report.to_json())
        return report

    def _working_set_plan(self) -> tuple[list[tuple[int, int]] | None, _StoppableRecorder | None]:
        """(runs to prefetch, recorder) for a new connection."""
        if self.store is None or self.snapshot_id is None:
            return None, None
        if self.record_working_set:
            return None, _StoppableRecorder()
        working_set = self.store.get_working_set(self.snapshot_id)
        if working_set is None:
            return None, _StoppableRecorder()
        return (prefetch_plan(working_set) if self.prefetch else None), None

    def _serve(self, conn: socket.socket, uffd: _CountingUffd, mappings: tuple[UffdMapping, ...],
               pid: int | None, started: float) -> VmServiceReport:
        try:
            plan, recorder = self._working_set_plan()
            resolver = FaultResolver(mappings, self.source, recorder)
        except (UffdError, ChunkStoreError) as exc:
            return self._refuse(pid, str(exc))
        report = VmServiceReport(pid=pid)
        server = PageServer(uffd, resolver)
        key = id(server)
        self._active[key] = server
        if self._stopping:
            server.stop()
        hung_up = threading.Event()
        watcher = threading.Thread(target=_watch_hangup, args=(conn, server, hung_up), daemon=True,
                                   name=f"page-server-watch-{pid}")
        watcher.start()
        timer = None
        prefetched_zeros = 0
        if recorder is not None and self.record_seconds is not None:
            timer = threading.Timer(self.record_seconds, self._store_working_set, args=(recorder, report))
            timer.daemon = True
            timer.start()
        try:
            if plan:
                server.prefetch(plan)
                report.prefetched_bytes = uffd.installed
                prefetched_zeros = uffd.zeroed
                report.working_set = "prefetched"
                report.working_set_runs = len(plan)
            server.serve()
            report.end = ("gone" if server.gone else "hangup" if hung_up.is_set()
                          else "stopped" if self._stopping else "hangup")
        except Exception as exc:  # a bad chunk, a fault outside the mappings: this VM cannot go on
            report.end = "error"
            report.error = str(exc)
            self._stop_vm(pid)
        finally:
            self._active.pop(key, None)
            try:
                conn.shutdown(socket.SHUT_RDWR)  # releases the watcher
            except OSError:
                pass
            watcher.join(_JOIN_TIMEOUT)
            if timer is not None:
                timer.cancel()
            server.close()
        if recorder is not None and report.end != "error":
            self._store_working_set(recorder, report)
        report.faults = resolver.faults
        report.bytes = uffd.installed - report.prefetched_bytes
        report.zero_pages = (uffd.zeroed - prefetched_zeros) // PAGE_SIZE
        report.seconds = time.monotonic() - started
        with self._threads_lock:
            self.served += 1
        self._log(report.log_line())
        self._emit(report.to_json())
        return report

    def _store_working_set(self, recorder: _StoppableRecorder, report: VmServiceReport) -> None:
        """Store what `recorder` saw (once: at --record-seconds or at the connection's end)."""
        runs = recorder.close()
        if not runs or self.store is None or self.snapshot_id is None:
            return
        with self._ws_lock:
            try:
                if not self.record_working_set and self.store.get_working_set(self.snapshot_id) is not None:
                    return  # another clone of this snapshot recorded first
                self.store.set_working_set(self.snapshot_id, runs)
            except ChunkStoreError as exc:
                self._log(f"working set of {self.snapshot_id} not stored: {exc}")
                return
        report.working_set = "recorded"
        report.working_set_runs = len(runs)

    def _stop_vm(self, pid: int | None) -> None:
        """A VM whose memory cannot be served must not run on (see `PageServer`): kill its VMM."""
        if pid is None or pid == os.getpid():
            return
        self._log(f"stopping VMM pid={pid}: its memory cannot be served")
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def cmd_page_server(args: argparse.Namespace) -> int:
    """`ember page-server`: serve until SIGTERM/SIGINT (exit 0), or one VM with --once."""
    if args.mem is not None and (args.record_working_set or args.record_seconds is not None):
        return _fail(BadOption("--record-working-set and --record-seconds need --snapshot"))
    store: ChunkStore | None = None
    memfile: MemoryFileSource | None = None
    try:
        key_file = args.key_file or os.environ.get(KEY_FILE_ENV)
        key = load_key_file(key_file) if key_file else None
        if args.signature is not None and key is None:
            raise BadOption("--signature needs --key-file (or $EMBER_SNAPSHOT_KEY_FILE)")
        if args.mem is not None:
            memfile = MemoryFileSource(args.mem)
            source: PageSource = memfile
            name = f"memory file {os.path.abspath(args.mem)}"
        else:
            store = _open_store(args.store)
            source = ChunkStoreSource(store.open(args.snapshot))
            name = f"snapshot {args.snapshot} in {store.root}"
        if key is not None:
            signature = _page_server_signature(key, args, store)
            source = VerifiedSource(source, signature.memory)
            name += f", signed (key {key.key_id.hex()})"
        service = PageService(
            args.socket, source, source_name=name, store=store,
            snapshot_id=args.snapshot if store is not None else None,
            prefetch=not args.no_prefetch, record_working_set=args.record_working_set,
            record_seconds=args.record_seconds, once=args.once, handshake_timeout=args.handshake_timeout)
    except _OPERATOR_ERRORS as exc:
        _close_sources(memfile, store)
        return _fail(exc)
    previous = {sig: signal.signal(sig, lambda *_: service.stop()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return service.serve_forever()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        service.close()
        _close_sources(memfile, store)


def _page_server_signature(key: SnapshotKey, args: argparse.Namespace,
                           store: ChunkStore | None) -> SnapshotSignature:
    """The authenticated signature whose memory digest the page server checks every chunk against."""
    if args.signature is not None:
        signature = read_signature(key, args.signature)
    elif store is not None:
        raw = store.show(args.snapshot).meta.get(META_SIGNATURE)
        if not isinstance(raw, str):
            raise SignatureMissing(f"snapshot {args.snapshot} was stored without a signature")
        try:
            data = bytes.fromhex(raw)
        except ValueError as exc:
            raise SignatureMissing(f"snapshot {args.snapshot}: its stored signature is not hex") from exc
        signature = verify_signature(key, data)
    else:
        raise SignatureMissing("a page server with a key needs --signature FILE (the state file's .sig)")
    if store is not None:
        # The stored state must be the signed one: the signature belongs to this snapshot.
        signature.check_state(store.read_state_bytes(args.snapshot))
    return signature


def _close_sources(memfile: MemoryFileSource | None, store: ChunkStore | None) -> None:
    if memfile is not None:
        memfile.close()
    if store is not None:
        store.close()


# --- argument parsing --------------------------------------------------------


def _store_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", metavar="DIR", default=None,
                        help="snapshot store (default: $EMBER_HOME/snapshots)")


def add_parsers(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register `ember snapshot ...` and `ember page-server` on the CLI's subparsers."""
    snap = sub.add_parser("snapshot", help="list, show, remove, import and check stored snapshots")
    snap_sub = snap.add_subparsers(dest="snapshot_cmd", required=True)
    ls = snap_sub.add_parser("ls", help="stored snapshots")
    ls.add_argument("--json", action="store_true")
    show = snap_sub.add_parser("show", help="one snapshot in full")
    show.add_argument("id")
    show.add_argument("--json", action="store_true")
    rm = snap_sub.add_parser("rm", help="forget a snapshot (gc frees its chunks)")
    rm.add_argument("id")
    gc = snap_sub.add_parser("gc", help="delete chunks no snapshot references")
    gc.add_argument("--json", action="store_true")
    put = snap_sub.add_parser("put", help="import a snapshot: a state file and a memory file")
    put.add_argument("id")
    put.add_argument("--state", required=True, metavar="FILE", help="the VM state file")
    put.add_argument("--mem", required=True, metavar="FILE", help="the full memory file")
    put.add_argument("--meta", action="append", metavar="KEY=VALUE", help="a label kept with the snapshot")
    put.add_argument("--json", action="store_true")
    verify = snap_sub.add_parser("verify", help="check the catalog and every chunk, or (--state) a signed snapshot")
    verify.add_argument("--quick", action="store_true", help="check chunk files exist, not their contents")
    verify.add_argument("--json", action="store_true")
    verify.add_argument("--state", metavar="FILE", help="check this state file and FILE.sig instead of the store")
    verify.add_argument("--mem", metavar="FILE", help="with --state: the memory file to check")
    sign = snap_sub.add_parser("sign", help="sign a state file and its memory file (writes STATE.sig)")
    sign.add_argument("--state", required=True, metavar="FILE", help="the VM state file")
    sign.add_argument("--mem", required=True, metavar="FILE", help="the full (or merged) memory file")
    for parser in (verify, sign):
        parser.add_argument("--key-file", metavar="PATH",
                            help="snapshot key (default: $EMBER_SNAPSHOT_KEY_FILE, else $EMBER_HOME/snapshot.key)")
    for parser in (ls, show, rm, gc, put, verify):
        _store_option(parser)
    snap.set_defaults(func=cmd_snapshot)

    ps = sub.add_parser("page-server", help="serve a restoring VM's memory over userfaultfd")
    ps.add_argument("--socket", required=True, metavar="PATH", help="Unix socket the VMM connects to")
    source = ps.add_mutually_exclusive_group(required=True)
    source.add_argument("--mem", metavar="FILE", help="serve a raw memory file")
    source.add_argument("--snapshot", metavar="ID", help="serve a snapshot from the store")
    _store_option(ps)
    ps.add_argument("--no-prefetch", action="store_true", help="do not install the stored working set up front")
    ps.add_argument("--record-working-set", action="store_true",
                    help="record the working set afresh (no prefetch) and replace the stored one")
    ps.add_argument("--record-seconds", type=float, metavar="N",
                    help="store the recorded working set N seconds after the VM connects")
    ps.add_argument("--once", action="store_true", help="exit after serving one VM")
    ps.add_argument("--key-file", metavar="PATH",
                    help="serve only signed memory, every chunk checked (default: $EMBER_SNAPSHOT_KEY_FILE)")
    ps.add_argument("--signature", metavar="FILE",
                    help="the snapshot's signature (STATE.sig); with --snapshot, default: the stored one")
    ps.add_argument("--handshake-timeout", type=float, default=DEFAULT_HANDSHAKE_TIMEOUT, metavar="S",
                    help=argparse.SUPPRESS)
    ps.set_defaults(func=cmd_page_server)

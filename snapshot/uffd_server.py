"""The userfaultfd page server's I/O half: the uffd ioctls, the socket handshake, the loop.

`uffd` decides what to install for each fault; this module talks to the
kernel (linux/userfaultfd.h) through cffi in ABI mode (no compiler):

* `Userfaultfd` — create one (``/dev/userfaultfd`` + USERFAULTFD_IOC_NEW,
  or the userfaultfd(2) syscall), negotiate the API, register ranges, and
  UFFDIO_COPY / UFFDIO_ZEROPAGE / UFFDIO_WAKE;
* `send_handshake` / `receive_handshake` — the mappings JSON with the uffd
  attached as SCM_RIGHTS, Firecracker's protocol (stdlib `socket.send_fds`);
* `PageServer` — reads fault and remove events, asks a `FaultResolver`
  what to install, installs it.

Kernel rules the loop follows: UFFDIO_COPY fails with EEXIST when a page
in the range is already present (a racing fault, or the VMM wrote it) —
the range is then installed page by page, skipping present pages; it fails
with EAGAIN when the address space is changing (a remove event is queued)
— the fault is retried after the queued events are read; ESRCH/ENOENT mean
the faulting process is gone.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import threading
from collections.abc import Sequence

import cffi

from .uffd import (
    MAX_HANDSHAKE_SIZE,
    FaultResolver,
    HandshakeError,
    Install,
    UffdError,
    UffdMapping,
    Wake,
    encode_handshake,
    parse_handshake,
)

__all__ = [
    "UffdSyscallError",
    "Userfaultfd",
    "PageServer",
    "send_handshake",
    "receive_handshake",
    "UFFD_API",
    "UFFDIO_API",
    "UFFDIO_REGISTER",
    "UFFDIO_UNREGISTER",
    "UFFDIO_WAKE",
    "UFFDIO_COPY",
    "UFFDIO_ZEROPAGE",
    "USERFAULTFD_IOC_NEW",
    "UFFD_FEATURE_EVENT_REMOVE",
    "UFFD_EVENT_PAGEFAULT",
    "UFFD_EVENT_REMOVE",
    "UFFD_MSG_SIZE",
    "serve_in_thread",
]

ffi = cffi.FFI()
# linux/userfaultfd.h (uapi). uffd_msg is __packed in the header; with
# these member types the natural layout is the same 32 bytes (checked below).
ffi.cdef("""
struct uffdio_api { uint64_t api; uint64_t features; uint64_t ioctls; };
struct uffdio_range { uint64_t start; uint64_t len; };
struct uffdio_register { struct uffdio_range range; uint64_t mode; uint64_t ioctls; };
struct uffdio_copy { uint64_t dst; uint64_t src; uint64_t len; uint64_t mode; int64_t copy; };
struct uffdio_zeropage { struct uffdio_range range; uint64_t mode; int64_t zeropage; };
struct uffd_msg {
    uint8_t event; uint8_t reserved1; uint16_t reserved2; uint32_t reserved3;
    union {
        struct { uint64_t flags; uint64_t address; uint32_t ptid; } pagefault;
        struct { uint32_t ufd; } fork;
        struct { uint64_t from; uint64_t to; uint64_t len; } remap;
        struct { uint64_t start; uint64_t end; } remove;
        struct { uint64_t reserved1; uint64_t reserved2; uint64_t reserved3; } reserved;
    } arg;
};
int ioctl(int fd, unsigned long request, ...);
long syscall(long number, ...);
""")
# SAFETY: dlopen(NULL) gives the already-loaded libc; only the two
# functions declared above are called through it.
_libc = ffi.dlopen(None)
# The C types passed to cffi, parsed here, once: a type given as a string is
# parsed by pycparser on its first use, which a forked VMM would pay on
# every restore (~1 ms each) if the zygote had not used it before forking.
_INT = ffi.typeof("int")
_LONG = ffi.typeof("long")
_ULONG = ffi.typeof("unsigned long")
_UINTPTR = ffi.typeof("uintptr_t")
_API_P = ffi.typeof("struct uffdio_api *")
_RANGE_P = ffi.typeof("struct uffdio_range *")
_REGISTER_P = ffi.typeof("struct uffdio_register *")
_COPY_P = ffi.typeof("struct uffdio_copy *")
_ZEROPAGE_P = ffi.typeof("struct uffdio_zeropage *")

UFFD_MSG_SIZE = 32
assert ffi.sizeof("struct uffd_msg") == UFFD_MSG_SIZE
# Messages are parsed with struct from these offsets (no pointers into
# Python buffers): arg.pagefault.{flags,address}, arg.remove.{start,end}.
_ARG = ffi.offsetof("struct uffd_msg", "arg")
_PAGEFAULT = struct.Struct("<QQ")
_REMOVE = struct.Struct("<QQ")


# asm-generic/ioctl.h
def _ioc(direction: int, kind: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (kind << 8) | nr


_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2

# linux/userfaultfd.h
USERFAULTFD_IOC = 0xAA
UFFDIO = 0xAA
UFFD_API = 0xAA
USERFAULTFD_IOC_NEW = _ioc(_IOC_NONE, USERFAULTFD_IOC, 0x00, 0)
UFFDIO_REGISTER = _ioc(_IOC_READ | _IOC_WRITE, UFFDIO, 0x00, ffi.sizeof("struct uffdio_register"))
UFFDIO_UNREGISTER = _ioc(_IOC_READ, UFFDIO, 0x01, ffi.sizeof("struct uffdio_range"))
UFFDIO_WAKE = _ioc(_IOC_READ, UFFDIO, 0x02, ffi.sizeof("struct uffdio_range"))
UFFDIO_COPY = _ioc(_IOC_READ | _IOC_WRITE, UFFDIO, 0x03, ffi.sizeof("struct uffdio_copy"))
UFFDIO_ZEROPAGE = _ioc(_IOC_READ | _IOC_WRITE, UFFDIO, 0x04, ffi.sizeof("struct uffdio_zeropage"))
UFFDIO_API = _ioc(_IOC_READ | _IOC_WRITE, UFFDIO, 0x3F, ffi.sizeof("struct uffdio_api"))

UFFD_EVENT_PAGEFAULT = 0x12
UFFD_EVENT_FORK = 0x13
UFFD_EVENT_REMAP = 0x14
UFFD_EVENT_REMOVE = 0x15
UFFD_EVENT_UNMAP = 0x16
UFFD_FEATURE_EVENT_REMOVE = 1 << 3
UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFD_USER_MODE_ONLY = 1
# asm/unistd_64.h
_NR_USERFAULTFD = 323


class UffdSyscallError(UffdError):
    """userfaultfd operation failed."""

    def __init__(self, detail: str = "", *, err: int = 0) -> None:
        super().__init__(f"{detail}: {os.strerror(err)}" if err else detail)
        self.errno = err


def _ioctl(fd: int, request: int, arg: object) -> int:
    """ioctl returning 0 or -errno."""
    # SAFETY: `arg` is a cffi struct pointer of exactly the type the request
    # number encodes (its size is part of the number); it stays alive for
    # the call because the caller holds it.
    rc = _libc.ioctl(ffi.cast(_INT, fd), ffi.cast(_ULONG, request), arg)
    return -ffi.errno if rc < 0 else rc


class Userfaultfd:
    """One userfaultfd, owned (closed on close())."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.features = 0
        self.ioctls = 0

    @classmethod
    def create(cls, *, features: int = 0, nonblocking: bool = True) -> "Userfaultfd":
        """A new uffd with the API negotiated for `features` (e.g. UFFD_FEATURE_EVENT_REMOVE)."""
        flags = os.O_CLOEXEC | (os.O_NONBLOCK if nonblocking else 0)
        fd = -1
        try:
            dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            dev = -1
        if dev >= 0:
            try:
                # SAFETY: USERFAULTFD_IOC_NEW takes its flags by value, no memory.
                fd = _libc.ioctl(ffi.cast(_INT, dev), ffi.cast(_ULONG, USERFAULTFD_IOC_NEW),
                                 ffi.cast(_INT, flags))
                err = ffi.errno
            finally:
                os.close(dev)
        if fd < 0:
            # SAFETY: userfaultfd(2) takes its flags by value, no memory.
            fd = _libc.syscall(ffi.cast(_LONG, _NR_USERFAULTFD), ffi.cast(_INT, flags))
            err = ffi.errno
        if fd < 0:
            raise UffdSyscallError("cannot create a userfaultfd", err=err)
        uffd = cls(int(fd))
        try:
            uffd.negotiate(features)
        except BaseException:
            uffd.close()
            raise
        return uffd

    def negotiate(self, features: int) -> None:
        """UFFDIO_API: must be the first call on a new uffd."""
        api = ffi.new(_API_P, {"api": UFFD_API, "features": features})
        rc = _ioctl(self.fd, UFFDIO_API, api)
        if rc < 0:
            raise UffdSyscallError(f"UFFDIO_API with features {features:#x}", err=-rc)
        self.features = api.features
        self.ioctls = api.ioctls

    def register(self, start: int, length: int) -> int:
        """Register [start, start+length) for missing-page faults; returns the range's ioctl mask."""
        reg = ffi.new(_REGISTER_P,
                      {"range": {"start": start, "len": length}, "mode": UFFDIO_REGISTER_MODE_MISSING})
        rc = _ioctl(self.fd, UFFDIO_REGISTER, reg)
        if rc < 0:
            raise UffdSyscallError(f"UFFDIO_REGISTER {start:#x}+{length:#x}", err=-rc)
        return int(reg.ioctls)

    def unregister(self, start: int, length: int) -> None:
        rng = ffi.new(_RANGE_P, {"start": start, "len": length})
        rc = _ioctl(self.fd, UFFDIO_UNREGISTER, rng)
        if rc < 0:
            raise UffdSyscallError(f"UFFDIO_UNREGISTER {start:#x}+{length:#x}", err=-rc)

    def copy(self, dest: int, data: bytes, *, wake: bool = True) -> int:
        """UFFDIO_COPY `data` to host address `dest`; returns bytes copied or -errno."""
        # SAFETY: from_buffer pins `data` (immutable bytes) for as long as
        # `src` lives, which spans the ioctl; len is the buffer's own length.
        src = ffi.from_buffer(data)
        req = ffi.new(_COPY_P, {"dst": dest, "src": int(ffi.cast(_UINTPTR, src)),
                                                "len": len(data), "mode": 0 if wake else 1})
        rc = _ioctl(self.fd, UFFDIO_COPY, req)
        del src
        if rc < 0:
            # `copy` holds bytes copied before the failure, or -errno.
            return int(req.copy) if req.copy > 0 else rc
        return int(req.copy)

    def zeropage(self, dest: int, length: int, *, wake: bool = True) -> int:
        """UFFDIO_ZEROPAGE; returns bytes zeroed or -errno."""
        req = ffi.new(_ZEROPAGE_P,
                      {"range": {"start": dest, "len": length}, "mode": 0 if wake else 1})
        rc = _ioctl(self.fd, UFFDIO_ZEROPAGE, req)
        if rc < 0:
            return int(req.zeropage) if req.zeropage > 0 else rc
        return int(req.zeropage)

    def wake(self, dest: int, length: int) -> None:
        rng = ffi.new(_RANGE_P, {"start": dest, "len": length})
        rc = _ioctl(self.fd, UFFDIO_WAKE, rng)
        if rc < 0 and -rc not in (errno.ENOENT, errno.ESRCH):
            raise UffdSyscallError(f"UFFDIO_WAKE {dest:#x}+{length:#x}", err=-rc)

    def read_events(self, max_events: int = 64) -> list[tuple[int, int, int]]:
        """Queued events as (event, a, b): PAGEFAULT (address, flags), REMOVE (start, end), others (0, 0)."""
        try:
            raw = os.read(self.fd, UFFD_MSG_SIZE * max_events)
        except BlockingIOError:
            return []
        events = []
        for pos in range(0, len(raw) - len(raw) % UFFD_MSG_SIZE, UFFD_MSG_SIZE):
            event = raw[pos]
            if event == UFFD_EVENT_PAGEFAULT:
                flags, address = _PAGEFAULT.unpack_from(raw, pos + _ARG)
                events.append((event, address, flags))
            elif event == UFFD_EVENT_REMOVE:
                start, end = _REMOVE.unpack_from(raw, pos + _ARG)
                events.append((event, start, end))
            else:
                events.append((event, 0, 0))
        return events

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        return f"<Userfaultfd fd={self.fd} features={self.features:#x}>"


# --- handshake transport -----------------------------------------------------


def send_handshake(sock: socket.socket, mappings: Sequence[UffdMapping], uffd_fd: int) -> None:
    """Send the mappings JSON with the uffd attached (the VMM's side)."""
    message = encode_handshake(mappings)
    if len(message) > MAX_HANDSHAKE_SIZE:
        raise HandshakeError(f"{len(message)} bytes, limit {MAX_HANDSHAKE_SIZE}")
    socket.send_fds(sock, [message], [uffd_fd])


def receive_handshake(sock: socket.socket) -> tuple[tuple[UffdMapping, ...], int]:
    """Receive and validate the mappings and the uffd (the page server's side).

    Exactly one fd must arrive; extra fds are closed, so a hostile peer
    cannot leak descriptors into the server. Returns the owned uffd fd.
    """
    message, fds, flags, _ = socket.recv_fds(sock, MAX_HANDSHAKE_SIZE + 1, 4)
    try:
        if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            raise HandshakeError("message or control data truncated")
        if len(fds) != 1:
            raise HandshakeError(f"expected one file descriptor, got {len(fds)}")
        mappings = parse_handshake(message)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return mappings, fds[0]


# --- the loop ----------------------------------------------------------------


class PageServer:
    """Serves one uffd from a `FaultResolver` until stopped or the process goes away.

    If `serve` raises (a fault outside every mapping, an unreadable chunk),
    the microVM must be stopped, not left running: once the uffd is closed
    the kernel lets the waiting threads fault in ordinary zero pages, which
    would silently hand the guest zeros for its memory.
    """

    def __init__(self, uffd: Userfaultfd, resolver: FaultResolver) -> None:
        self.uffd = uffd
        self.resolver = resolver
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.installs = 0
        self.gone = False
        self.error: BaseException | None = None

    def stop(self) -> None:
        """Ask `serve` to return (any thread)."""
        try:
            os.write(self._stop_w, b"x")
        except BlockingIOError:
            pass

    def prefetch(self, runs: Sequence[tuple[int, int]]) -> int:
        """Install a prefetch plan's ranges up front; returns bytes installed.

        Demand faults come first: before each unit of the plan, faults already
        pending are served, so a vCPU (or the VMM restoring a device) never
        waits behind the whole working set.
        """
        done = 0
        for op in self.resolver.iter_prefetch(runs):
            if self.gone:
                break
            self.handle_pending()
            if self._install(op, wake=False):
                done += op.length
        return done

    def serve(self) -> None:
        """Handle events until `stop` or the faulting process exits."""
        poller = select.poll()
        poller.register(self.uffd.fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        try:
            while not self.gone:
                ready = dict(poller.poll())
                if self._stop_r in ready:
                    return
                if ready.get(self.uffd.fd, 0) & (select.POLLERR | select.POLLHUP):
                    return
                self.handle_pending()
        except BaseException as exc:
            self.error = exc
            raise

    def handle_pending(self) -> int:
        """Handle every queued event; returns how many."""
        handled = 0
        retry: list[int] = []
        while True:
            events = self.uffd.read_events()
            if not events:
                break
            # Removes first: a fault in the same batch must see them.
            for event, a, b in events:
                if event == UFFD_EVENT_REMOVE:
                    self.resolver.on_remove(a, b)
            for event, a, _ in events:
                if event == UFFD_EVENT_PAGEFAULT and not self._fault(a):
                    retry.append(a)
            handled += len(events)
        for addr in retry:
            # EAGAIN: the mm changed under the copy; events are drained now.
            self._fault(addr)
        return handled

    def _fault(self, addr: int) -> bool:
        """Serve one fault; False if the kernel said to retry (EAGAIN)."""
        for op in self.resolver.on_fault(addr):
            if isinstance(op, Wake):
                self.uffd.wake(op.dest, op.length)
            elif not self._install(op, wake=True):
                return False
        return True

    def _install(self, op: Install, *, wake: bool) -> bool:
        rc = self._do(op.dest, op.length, op.data, wake)
        if rc == -errno.EAGAIN:
            return False
        if rc in (-errno.ESRCH, -errno.ENOENT):
            self.gone = True
            return True
        if rc == -errno.EEXIST or 0 <= rc < op.length:
            # Some page is already present: go page by page, skipping those.
            if not self._install_pagewise(op, wake):
                return False
        elif rc < 0:
            raise UffdSyscallError(f"installing {op!r}", err=-rc)
        self.resolver.done(op)
        self.installs += 1
        return True

    def _install_pagewise(self, op: Install, wake: bool) -> bool:
        """Install `op` one host page at a time, skipping present pages; False on EAGAIN."""
        page = self.resolver.page_size_at(op.dest)
        for off in range(0, op.length, page):
            data = None if op.data is None else op.data[off:off + page]
            rc = self._do(op.dest + off, page, data, wake=False)
            if rc == -errno.EAGAIN:
                return False
            if rc in (-errno.ESRCH, -errno.ENOENT):
                self.gone = True
                return True
            if rc < 0 and rc != -errno.EEXIST:
                raise UffdSyscallError(f"installing page {op.dest + off:#x}", err=-rc)
        if wake:
            self.uffd.wake(op.dest, op.length)
        return True

    def _do(self, dest: int, length: int, data: bytes | None, wake: bool) -> int:
        if data is None:
            return self.uffd.zeropage(dest, length, wake=wake)
        return self.uffd.copy(dest, data, wake=wake)

    def close(self) -> None:
        for fd in (self._stop_r, self._stop_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def __repr__(self) -> str:
        return f"<PageServer {self.uffd!r} installs={self.installs} {self.resolver!r}>"


def serve_in_thread(server: PageServer) -> threading.Thread:
    """Run `server.serve` on a daemon thread (tests, in-process restores)."""
    thread = threading.Thread(target=server.serve, name="uffd-page-server", daemon=True)
    thread.start()
    return thread


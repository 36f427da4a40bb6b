"""Ember's built-in seccomp filters: one allowlist per thread role, each syscall with its reason.

Three roles, as in Firecracker (resources/seccomp/x86_64-unknown-linux-musl.json):

* ``vcpu``: each vCPU thread, from its start. KVM_RUN and the exits it
  handles: port/MMIO emulation (the serial console's output, virtio
  register accesses, device activation), interrupts (irqfd eventfds),
  pause/resume and reading its state for a snapshot.
* ``api``: the API server thread, from its start: accept and serve HTTP
  connections on the API socket, hand each request to the event loop.
* ``vmm``: the main thread once the microVM is built and its vCPU threads
  exist (the event loop: virtio queues, block/net/vsock I/O, MMDS, rate
  limiters, metrics, snapshots, pause/resume, shutdown), and the helper
  threads the VMM starts (the metrics timer, the RIP profiler).

Everything else kills the whole process (SECCOMP_RET_KILL_PROCESS: the
parent sees it die of SIGSYS). Python needs more than a Rust VMM: its
allocator (mmap/munmap/brk/mprotect/madvise/mremap), the GIL and thread
locks (futex), garbage collection that may close a file on any thread
(close), and error reports whose tracebacks read source files (a
read-only openat and what `open()` does around it). docs/seccomp.md lists
every rule with its reason; `python -m vmm.seccomp` prints these filters in
Firecracker's JSON format, the starting point for a `--seccomp-filter`.
"""

from __future__ import annotations

import signal

from vmm.kvm import bindings as kb

from .model import ArgWidth, Condition, Filter, Op, Role, Rule

__all__ = ["BUILTIN_FILTERS", "builtin_filters", "VCPU_IOCTLS", "VMM_IOCTLS"]

# --- argument values (Linux UAPI headers, x86_64) ------------------------------------------------

# <linux/futex.h>: FUTEX_PRIVATE_FLAG | op.
FUTEX_WAIT_PRIVATE = 128
FUTEX_WAKE_PRIVATE = 129
FUTEX_WAIT_BITSET_PRIVATE = 137
FUTEX_WAIT_BITSET_PRIVATE_REALTIME = 393  # | FUTEX_CLOCK_REALTIME
# <asm-generic/mman-common.h>, <linux/mman.h>
PROT_EXEC = 0x4
MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_ANONYMOUS = 0x20
MADV_DONTNEED = 4
# <asm-generic/fcntl.h>
O_ACCMODE = 0o3
O_RDONLY = 0
O_CREAT = 0o100
# <linux/time.h>, <linux/timerfd.h> (TFD_* are O_NONBLOCK, O_CLOEXEC)
CLOCK_MONOTONIC = 1
TFD_NONBLOCK = 0o4000
TFD_CLOEXEC = 0o2000000
# <asm-generic/ioctls.h>
TCGETS = 0x5401
FIONBIO = 0x5421
# <linux/if_tun.h>: _IOW('T', 208, unsigned int)
TUNSETOFFLOAD = 0x400454D0
# <linux/socket.h>, <linux/net.h>
AF_UNIX = 1
SOCK_STREAM = 1
SOCK_NONBLOCK = 0o4000
SOCK_CLOEXEC = 0o2000000
# The vCPU kick (vmm.vstate.vcpu.KICK_SIGNAL).
SIGRTMIN = int(signal.SIGRTMIN)


# --- rule builders ---------------------------------------------------------------------------------

def _allow(syscall: str, reason: str, *args: Condition) -> Rule:
    return Rule(syscall, tuple(args), reason)


def _eq(index: int, value: int, comment: str = "", width: ArgWidth = ArgWidth.DWORD) -> Condition:
    return Condition(index, Op.EQ, value, width, comment=comment)


def _masked(index: int, mask: int, value: int, comment: str = "") -> Condition:
    return Condition(index, Op.MASKED_EQ, value, ArgWidth.DWORD, mask=mask, comment=comment)


def _ioctl(name: str, reason: str) -> Rule:
    number = _HOST_IOCTLS[name] if name in _HOST_IOCTLS else getattr(kb, name)
    return Rule("ioctl", (_eq(1, number, name),), reason)


_HOST_IOCTLS = {"TCGETS": TCGETS, "FIONBIO": FIONBIO, "TUNSETOFFLOAD": TUNSETOFFLOAD}


def _futex(reason: str) -> tuple[Rule, ...]:
    return tuple(_allow("futex", reason, _eq(1, op, name)) for op, name in (
        (FUTEX_WAIT_PRIVATE, "FUTEX_WAIT_PRIVATE"),
        (FUTEX_WAKE_PRIVATE, "FUTEX_WAKE_PRIVATE"),
        (FUTEX_WAIT_BITSET_PRIVATE, "FUTEX_WAIT_BITSET_PRIVATE"),
        (FUTEX_WAIT_BITSET_PRIVATE_REALTIME, "FUTEX_WAIT_BITSET_PRIVATE | FUTEX_CLOCK_REALTIME")))


# --- what every Python thread needs ------------------------------------------------------------------

_NO_EXEC = _masked(2, PROT_EXEC, 0, "PROT_EXEC is not set")

PYTHON_RUNTIME: tuple[Rule, ...] = (
    *_futex("the GIL, thread locks, queues and events (private futexes only)"),
    _allow("mmap", "the allocators' anonymous private memory (pymalloc arenas, malloc); never executable",
           _NO_EXEC, _masked(3, MAP_SHARED | MAP_PRIVATE | MAP_ANONYMOUS, MAP_PRIVATE | MAP_ANONYMOUS,
                             "MAP_PRIVATE | MAP_ANONYMOUS")),
    _allow("munmap", "the allocators give memory back"),
    _allow("mprotect", "glibc grows a thread's malloc arena by making reserved pages writable; never executable",
           _NO_EXEC),
    _allow("madvise", "glibc trims malloc arenas and the stacks of ending threads",
           _eq(2, MADV_DONTNEED, "MADV_DONTNEED")),
    _allow("brk", "glibc's main malloc arena"),
    _allow("mremap", "glibc's realloc of large (mmapped) blocks"),
    _allow("clock_gettime", "time.monotonic/time.time when the clock source has no vDSO fast path"),
    _allow("rt_sigreturn", "return from a signal handler (the vCPU kick, SIGTERM) on whichever thread took it"),
    _allow("rt_sigprocmask", "glibc blocks signals in a thread that is ending"),
    _allow("restart_syscall", "the kernel restarts a sleep (epoll_wait, futex or select with a timeout) that "
           "SIGSTOP/SIGCONT, a cgroup freeze or a debugger interrupted"),
    _allow("write", "log lines (stderr or the log FIFO), eventfd notifications"),
    _allow("close", "a garbage collection may close a file or socket on any thread"),
    _allow("exit", "a thread ends"),
    _allow("exit_group", "the process ends"),
)

# A traceback in an error log line reads the source file of each frame (linecache).
READ_ONLY_OPEN = _allow("openat", "read-only: tracebacks in error reports read Python source files",
                        _masked(2, O_ACCMODE | O_CREAT, O_RDONLY, "O_RDONLY, no O_CREAT"))
ERROR_REPORTS: tuple[Rule, ...] = (
    _allow("newfstatat", "tracebacks: linecache checks whether a source file changed, open() checks "
           "what it opened (glibc's fstat)"),
    _allow("lseek", "tracebacks: open() asks a file for its position"),
    _allow("read", "tracebacks: reading source files; eventfds"),
    _ioctl("TCGETS", "open() asks whether a file is a terminal (isatty) to choose its buffering"),
)

# --- virtio device I/O: the event loop, and a vCPU thread activating a device ---------------------

# A guest's DRIVER_OK activates a device on the vCPU thread that wrote it, and the
# transport then processes every ready queue there (a driver may queue buffers
# before DRIVER_OK); after that, queue notifications reach the event loop through
# ioeventfds. So a vCPU thread may do any device's I/O, as the event loop does.
VIRTIO_IO: tuple[Rule, ...] = (
    _allow("readv", "virtio-net: a frame from the TAP"),
    _allow("writev", "virtio-net: a frame to the TAP"),
    _allow("preadv2", "virtio-block reads (os.preadv, flags 0)", _eq(5, 0, "no RWF_* flags")),
    _allow("pwritev2", "virtio-block writes (os.pwritev, flags 0)", _eq(5, 0, "no RWF_* flags")),
    _allow("fdatasync", "virtio-block flush"),
    _allow("epoll_ctl", "devices start and stop watching their fds (TAP, vsock sockets, timers)"),
    _allow("timerfd_settime", "rate limiters and the vsock muxer arm their timers"),
    _allow("socket", "vsock: a socket to the host's listener for a guest connection",
           _eq(0, AF_UNIX, "AF_UNIX"), _eq(1, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC,
                                          "SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC")),
    _allow("connect", "vsock: connect to the host's listener for a guest connection"),
    _allow("recvfrom", "vsock: data from a host connection"),
    _allow("sendto", "vsock: data to a host connection"),
    _allow("shutdown", "vsock: half-close a host connection"),
    _allow("poll", "vsock: whether a host connection hung up"),
    _allow("getrandom", "MMDS v2 session tokens (os.urandom); snapshot: tempfile's random names"),
)

# --- vcpu --------------------------------------------------------------------------------------------

#: ioctls of a vCPU thread: running, reading its state while paused (snapshots), device activation.
VCPU_IOCTLS: dict[str, str] = {
    "KVM_RUN": "run the guest",
    "KVM_GET_REGS": "the guest RIP for an error report or the RIP profiler; snapshot",
    "KVM_GET_SREGS": "snapshot: read the paused vCPU's state",
    "KVM_GET_MSRS": "snapshot: read the paused vCPU's state",
    "KVM_GET_MP_STATE": "snapshot: read the paused vCPU's state",
    "KVM_GET_XSAVE": "snapshot: read the paused vCPU's state (kernels without KVM_CAP_XSAVE2)",
    "KVM_GET_XSAVE2": "snapshot: read the paused vCPU's state",
    "KVM_GET_XCRS": "snapshot: read the paused vCPU's state",
    "KVM_GET_DEBUGREGS": "snapshot: read the paused vCPU's state",
    "KVM_GET_LAPIC": "snapshot: read the paused vCPU's state",
    "KVM_GET_TSC_KHZ": "snapshot: read the paused vCPU's state",
    "KVM_GET_CPUID2": "snapshot: read the paused vCPU's state",
    "KVM_GET_VCPU_EVENTS": "snapshot: read the paused vCPU's state",
    "KVM_CHECK_EXTENSION": "snapshot: the XSAVE area's size (KVM_CAP_XSAVE2, asked of the VM fd)",
    "KVM_KVMCLOCK_CTRL": "pause: tell a kvmclock guest it was stopped",
    "KVM_IRQ_LINE": "interrupt a device's line on hosts without irqfd",
    "TUNSETOFFLOAD": "virtio-net activation: the TAP's offloads follow the features the driver acked",
}

VCPU_FILTER = Filter((
    *PYTHON_RUNTIME,
    READ_ONLY_OPEN,
    *ERROR_REPORTS,
    *(_ioctl(name, reason) for name, reason in VCPU_IOCTLS.items()),
    *VIRTIO_IO,
))

# --- api ---------------------------------------------------------------------------------------------

API_FILTER = Filter((
    *PYTHON_RUNTIME,
    READ_ONLY_OPEN,
    *ERROR_REPORTS,
    _allow("epoll_wait", "the server's selector"),
    _allow("epoll_ctl", "connections come and go, wait for output"),
    _allow("accept4", "accept a connection on the API socket (SOCK_CLOEXEC)",
           _masked(3, SOCK_CLOEXEC, SOCK_CLOEXEC, "SOCK_CLOEXEC")),
    _allow("getsockname", "socket.accept() checks the new fd is a socket"),
    _ioctl("FIONBIO", "make an accepted connection non-blocking (socket.setblocking)"),
    _allow("recvfrom", "read a request (socket.recv)"),
    _allow("sendto", "write a response (socket.send)"),
    _allow("shutdown", "half-close a connection after an error response"),
))

# --- vmm ---------------------------------------------------------------------------------------------

#: ioctls of the event loop once the microVM runs (everything that builds it ran before the filter).
VMM_IOCTLS: dict[str, str] = {
    "KVM_GET_DIRTY_LOG": "diff snapshot: the pages the guest wrote",
    "KVM_GET_IRQCHIP": "snapshot: the PICs and the IOAPIC",
    "KVM_GET_CLOCK": "snapshot: kvmclock",
    "KVM_GET_PIT2": "snapshot: the PIT",
    "KVM_IRQ_LINE": "interrupt a device's line on hosts without irqfd",
    "FIONBIO": "vsock: make an accepted host connection non-blocking",
}

VMM_FILTER = Filter((
    *PYTHON_RUNTIME,
    _allow("openat", "snapshot files (state, memory, their directory); PATCH /drives opens the new file; "
           "tracebacks read source files"),
    *ERROR_REPORTS,
    *VIRTIO_IO,
    *(_ioctl(name, reason) for name, reason in VMM_IOCTLS.items()),
    _allow("epoll_wait", "the event loop's selector; the vsock muxer's epoll set"),
    _allow("accept4", "vsock: a host connection on the vsock socket (SOCK_CLOEXEC)",
           _masked(3, SOCK_CLOEXEC, SOCK_CLOEXEC, "SOCK_CLOEXEC")),
    _allow("getsockname", "vsock: socket.accept() checks the new fd is a socket"),
    _allow("timerfd_create", "PATCH /drives or /network-interfaces adds a rate limiter: its timer",
           _eq(0, CLOCK_MONOTONIC, "CLOCK_MONOTONIC"), _eq(1, TFD_NONBLOCK | TFD_CLOEXEC,
                                                          "TFD_NONBLOCK | TFD_CLOEXEC")),
    _allow("fsync", "snapshot files and their directory are made durable"),
    _allow("pwrite64", "snapshot: the memory file's non-zero pages"),
    _allow("ftruncate", "snapshot: size the memory file"),
    _allow("rename", "snapshot: move the finished file into place"),
    _allow("unlink", "snapshot: remove a failed temporary file; shutdown: remove the API socket"),
    _allow("fchmod", "snapshot: the state file's mode"),
    _allow("tgkill", "pause, snapshot, shutdown: kick a vCPU out of KVM_RUN",
           _eq(2, SIGRTMIN, "SIGRTMIN (the vCPU kick)")),
    _allow("getpid", "pthread_kill (the vCPU kick) passes the pid to tgkill; tempfile's names"),
    *(_allow("rt_sigaction", "shutdown: the event loop restores its SIGTERM/SIGINT handlers, the "
             "interpreter resets the signals it handled", _eq(0, int(sig), sig.name))
      for sig in (signal.SIGINT, signal.SIGTERM, signal.Signals(SIGRTMIN))),
))

#: The built-in filter of each role.
BUILTIN_FILTERS: dict[Role, Filter] = {Role.VMM: VMM_FILTER, Role.API: API_FILTER, Role.VCPU: VCPU_FILTER}


def builtin_filters() -> dict[Role, Filter]:
    """A copy of the built-in filters (callers may replace one role's filter)."""
    return dict(BUILTIN_FILTERS)

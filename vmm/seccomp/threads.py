"""The process's seccomp filters, and each thread installing its role's filter when it starts.

`vmm.main` decides once, before it starts any thread, which filters the
process uses (`configure`: the built-in ones, a ``--seccomp-filter`` file,
or none for ``--no-seccomp``) and compiles them; a compile error stops the
VMM before anything runs. Then every thread installs its own role's
filter first thing (`enter_thread`), as in Firecracker:

* the API thread when it starts, before it accepts a connection;
* each vCPU thread when it starts, before its first KVM_RUN;
* helper threads (the metrics timer, the RIP profiler) when they start,
  with the ``vmm`` filter;
* the main thread (``vmm`` filter) only once the microVM is built and its
  vCPU threads exist: a filter is inherited by the threads created after it,
  and stacked filters intersect, so a vCPU thread created under the
  ``vmm`` filter could never run KVM_RUN.

Nothing is installed in a process that never called `configure` (unit
tests, tools that build a `Vmm` in-process): `enter_thread` then only
names the thread.

Thread names: `enter_thread` also sets the thread's kernel name
(/proc/PID/task/TID/comm, at most 15 bytes), so ``ps -L`` and
/proc show ``fc_api``, ``fc_vcpu 0``, ``fc_metrics`` as in Firecracker.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from typing import Mapping

from .bpf import BpfProgram, compile_filter
from .model import Filter, Role, SeccompError
from .seccompiler import read_filter_file
from .table import builtin_filters

__all__ = [
    "ThreadFilters",
    "configure",
    "active_filters",
    "enter_thread",
    "install_thread_filter",
    "filters_from_flags",
    "set_thread_name",
]

PR_SET_NAME = 15  # <linux/prctl.h>
TASK_COMM_LEN = 16

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.prctl.restype = ctypes.c_int


@dataclass(frozen=True)
class ThreadFilters:
    """Compiled filters for every role, and where they came from (``built-in`` or a file path)."""

    programs: Mapping[Role, BpfProgram]
    source: str

    @classmethod
    def compile(cls, filters: Mapping[Role, Filter], source: str) -> "ThreadFilters":
        """Compile one filter per role; raises `BpfCompileError` (or `LibseccompUnavailable`)."""
        missing = [r.value for r in Role if r not in filters]
        if missing:
            raise SeccompError(f"no filter for {', '.join(missing)}")
        return cls({role: compile_filter(filters[role]) for role in Role}, source)

    def __repr__(self) -> str:
        sizes = " ".join(f"{r.value}={p.instructions}" for r, p in self.programs.items())
        return f"<ThreadFilters {self.source} {sizes}>"


_active: ThreadFilters | None = None
_lock = threading.Lock()


def configure(filters: ThreadFilters | None) -> None:
    """Set the process's filters (None: no seccomp). Call before starting any VMM thread."""
    global _active
    with _lock:
        _active = filters


def active_filters() -> ThreadFilters | None:
    return _active


def filters_from_flags(*, no_seccomp: bool, filter_file: str | None) -> ThreadFilters | None:
    """What ``--no-seccomp`` / ``--seccomp-filter FILE`` / neither ask for, compiled.

    Raises `SeccompError` (the file is invalid, libseccomp refuses it or is missing).
    """
    if no_seccomp:
        return None
    if filter_file is not None:
        return ThreadFilters.compile(read_filter_file(filter_file), filter_file)
    return _builtin_compiled()


def _builtin_compiled() -> ThreadFilters:
    """The built-in filters, compiled once per process (a zygote compiles them before it forks)."""
    global _builtin
    with _lock:
        if _builtin is None:
            _builtin = ThreadFilters.compile(builtin_filters(), "built-in")
        return _builtin


_builtin: ThreadFilters | None = None


def install_thread_filter(role: Role) -> bool:
    """Install `role`'s filter on the calling thread; False when the process has none.

    Raises `FilterInstallError` if the kernel refuses it (the caller must then
    stop the thread: it must not run unfiltered).
    """
    filters = _active
    if filters is None:
        return False
    filters.programs[role].install()
    return True


def set_thread_name(name: str) -> None:
    """Set the calling thread's kernel name (truncated to 15 bytes); failures are ignored."""
    raw = name.encode("utf-8", "replace")[:TASK_COMM_LEN - 1]
    buf = ctypes.create_string_buffer(raw, TASK_COMM_LEN)
    # SAFETY: PR_SET_NAME reads at most 16 bytes up to a NUL from the pointer; `buf` is a
    # 16-byte NUL-padded buffer (the name is at most 15 bytes), alive for the whole call.
    _libc.prctl(PR_SET_NAME, ctypes.addressof(buf), 0, 0, 0)


def enter_thread(role: Role, name: str) -> bool:
    """First thing a VMM thread does: take its name and install its role's filter (if any)."""
    set_thread_name(name)
    return install_thread_filter(role)

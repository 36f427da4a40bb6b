"""Seccomp filters for `ember-vmm`: one allowlist per thread role, installed by each thread.

Primer. seccomp-bpf lets a thread hand the kernel a small program that
judges each of its system calls before it runs. Like Firecracker, Ember
gives every thread of a VMM process the smallest list it needs, by role
(`Role`: ``api``, ``vmm``, ``vcpu``), and anything else kills the whole
process with SIGSYS (SECCOMP_RET_KILL_PROCESS): a guest that takes over a
vCPU thread through a device bug finds no ``execve``, ``socket(AF_INET)``
or ``ptrace`` to go further with.

* `table` — the built-in allowlists, every rule with the reason Ember needs it
  (docs/seccomp.md is the same list for readers);
* `seccompiler` — Firecracker seccompiler's JSON format, for
  ``--seccomp-filter FILE`` (and ``python -m vmm.seccomp`` to print the
  built-in filters in it);
* `bpf` — compile with libseccomp (cffi, ABI mode), install on one thread;
* `threads` — the process's filters (`configure`, from ``vmm.main``'s
  flags) and `enter_thread(role, name)`, which each VMM thread calls first.
"""

from .bpf import (
    BpfCompileError,
    BpfError,
    BpfProgram,
    FilterInstallError,
    LibseccompUnavailable,
    compile_filter,
    libseccomp_version,
    syscall_number,
)
from .model import (
    ALLOW,
    KILL_PROCESS,
    Action,
    ActionKind,
    ArgWidth,
    Condition,
    Filter,
    Op,
    Role,
    Rule,
    SeccompError,
)
from .seccompiler import FilterFileError, filters_from_json, filters_to_json, read_filter_file
from .table import BUILTIN_FILTERS, builtin_filters
from .threads import (
    ThreadFilters,
    active_filters,
    configure,
    enter_thread,
    filters_from_flags,
    install_thread_filter,
    set_thread_name,
)

__all__ = [
    "ALLOW",
    "KILL_PROCESS",
    "Action",
    "ActionKind",
    "ArgWidth",
    "BUILTIN_FILTERS",
    "BpfCompileError",
    "BpfError",
    "BpfProgram",
    "Condition",
    "Filter",
    "FilterFileError",
    "FilterInstallError",
    "LibseccompUnavailable",
    "Op",
    "Role",
    "Rule",
    "SeccompError",
    "ThreadFilters",
    "active_filters",
    "builtin_filters",
    "compile_filter",
    "configure",
    "enter_thread",
    "filters_from_flags",
    "filters_from_json",
    "filters_to_json",
    "install_thread_filter",
    "libseccomp_version",
    "read_filter_file",
    "set_thread_name",
    "syscall_number",
]

"""The vocabulary of seccomp filters: roles, actions, argument conditions, rules, filters.

Plain frozen data, no I/O: `table.py` writes Ember's built-in filters with
it, `seccompiler.py` reads and writes it as Firecracker's JSON, and
`bpf.py` compiles it with libseccomp.

The semantics are Firecracker seccompiler's (docs/seccompiler.md): a
`Filter` is a list of `Rule`s, OR-ed; a rule matches a call of its syscall
whose arguments satisfy every one of its `Condition`s (AND-ed; no
conditions: any arguments). A matching call gets the filter's
`filter_action`, any other call its `default_action`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Iterable

__all__ = [
    "SeccompError",
    "Role",
    "ActionKind",
    "Action",
    "ALLOW",
    "KILL_PROCESS",
    "Op",
    "ArgWidth",
    "Condition",
    "Rule",
    "Filter",
    "MAX_ARGS",
]

#: A syscall has at most six arguments (indexes 0..5).
MAX_ARGS = 6
_U32 = 0xFFFF_FFFF
_U64 = 0xFFFF_FFFF_FFFF_FFFF


class SeccompError(Exception):
    """A seccomp filter could not be built, compiled or installed."""

    def __init__(self, message: str | None = None) -> None:
        # The docstring is the message when none is given.
        super().__init__(message if message is not None else " ".join((type(self).__doc__ or "").split()))


class Role(str, enum.Enum):
    """The thread categories of a VMM process, each with its own filter (Firecracker's names)."""

    API = "api"    # the HTTP API server thread (`fc_api`)
    VMM = "vmm"    # the main thread's event loop, and the helper threads it starts
    VCPU = "vcpu"  # one thread per vCPU (`fc_vcpu N`)


class ActionKind(str, enum.Enum):
    """What the kernel does with a call (seccomp(2) SECCOMP_RET_*)."""

    ALLOW = "allow"
    KILL_PROCESS = "kill_process"  # the whole process dies of SIGSYS
    KILL_THREAD = "kill_thread"
    TRAP = "trap"                  # SIGSYS to the thread (without a handler: the process dies)
    LOG = "log"                    # allowed, and logged by the kernel (audit)
    ERRNO = "errno"                # the call fails with errno `value`
    TRACE = "trace"                # a ptrace tracer is told, with `value`


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    value: int = 0  # the errno for ERRNO, the message for TRACE (16 bits)

    def __post_init__(self) -> None:
        if self.kind in (ActionKind.ERRNO, ActionKind.TRACE):
            if not 0 <= self.value <= 0xFFFF:
                raise SeccompError(f"{self.kind.value} value {self.value} is outside 0..65535")
        elif self.value != 0:
            raise SeccompError(f"the {self.kind.value} action takes no value")

    def __str__(self) -> str:
        return self.kind.value if self.kind not in (ActionKind.ERRNO, ActionKind.TRACE) \
            else f"{self.kind.value}({self.value})"


#: A matching call goes through.
ALLOW = Action(ActionKind.ALLOW)
#: Ember's default for everything else: the process dies of SIGSYS (SECCOMP_RET_KILL_PROCESS).
KILL_PROCESS = Action(ActionKind.KILL_PROCESS)


class Op(str, enum.Enum):
    """How an argument is compared with a condition's value (seccompiler's `op`)."""

    EQ = "eq"
    NE = "ne"
    LT = "lt"
    LE = "le"
    GT = "gt"
    GE = "ge"
    MASKED_EQ = "masked_eq"  # (arg & mask) == value


class ArgWidth(str, enum.Enum):
    """How much of the 64-bit argument register a condition looks at (seccompiler's `type`)."""

    DWORD = "dword"  # the low 32 bits (C `int`, `unsigned int`, ioctl request numbers)
    QWORD = "qword"  # all 64 bits (pointers, sizes, `unsigned long` flags)


@dataclass(frozen=True)
class Condition:
    """``arg[index] <op> value`` (with `mask` for MASKED_EQ)."""

    index: int
    op: Op
    value: int
    width: ArgWidth = ArgWidth.DWORD
    mask: int | None = None
    comment: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.index < MAX_ARGS:
            raise SeccompError(f"argument index {self.index} is outside 0..{MAX_ARGS - 1}")
        limit = _U32 if self.width is ArgWidth.DWORD else _U64
        if not 0 <= self.value <= limit:
            raise SeccompError(f"value {self.value} does not fit a {self.width.value}")
        if (self.op is Op.MASKED_EQ) != (self.mask is not None):
            raise SeccompError("a mask goes with masked_eq, and only with it")
        if self.mask is not None and not 0 <= self.mask <= limit:
            raise SeccompError(f"mask {self.mask} does not fit a {self.width.value}")

    def matches(self, args: tuple[int, ...]) -> bool:
        """Whether call arguments `args` satisfy this condition (a reference for tests and docs)."""
        arg = args[self.index] & (_U32 if self.width is ArgWidth.DWORD else _U64)
        return {
            Op.EQ: arg == self.value, Op.NE: arg != self.value, Op.LT: arg < self.value,
            Op.LE: arg <= self.value, Op.GT: arg > self.value, Op.GE: arg >= self.value,
            Op.MASKED_EQ: self.mask is not None and (arg & self.mask) == self.value,
        }[self.op]


@dataclass(frozen=True)
class Rule:
    """Allow (the filter action) `syscall` when every condition holds; `reason` says why Ember needs it."""

    syscall: str
    args: tuple[Condition, ...] = ()
    reason: str = ""

    def matches(self, syscall: str, args: tuple[int, ...]) -> bool:
        return syscall == self.syscall and all(c.matches(args) for c in self.args)


@dataclass(frozen=True)
class Filter:
    """One thread category's filter: rules, the action of a match, the action of everything else."""

    rules: tuple[Rule, ...]
    default_action: Action = KILL_PROCESS
    filter_action: Action = ALLOW

    @property
    def syscalls(self) -> tuple[str, ...]:
        """The distinct syscall names the rules name, sorted."""
        return tuple(sorted({r.syscall for r in self.rules}))

    def action_for(self, syscall: str, args: Iterable[int] = ()) -> Action:
        """The action a call gets (the reference semantics the compiled BPF must agree with)."""
        full = tuple(args) + (0,) * MAX_ARGS
        if any(r.matches(syscall, full[:MAX_ARGS]) for r in self.rules):
            return self.filter_action
        return self.default_action

    def without(self, *syscalls: str) -> "Filter":
        """This filter minus every rule for `syscalls` (tests and custom filters start from the built-ins)."""
        return Filter(tuple(r for r in self.rules if r.syscall not in syscalls), self.default_action,
                      self.filter_action)

    def __repr__(self) -> str:
        return (f"<Filter {len(self.syscalls)} syscalls {len(self.rules)} rules "
                f"match={self.filter_action} default={self.default_action}>")

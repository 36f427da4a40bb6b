"""Compiling with libseccomp: the BPF program answers exactly what the filter's rules say."""

from __future__ import annotations

import random

import pytest

from vmm.seccomp import (
    ALLOW,
    BUILTIN_FILTERS,
    KILL_PROCESS,
    Action,
    ActionKind,
    ArgWidth,
    BpfCompileError,
    Condition,
    Filter,
    Op,
    Role,
    Rule,
    compile_filter,
    libseccomp_version,
    syscall_number,
)

from . import cbpf

RET = {ActionKind.ALLOW: 0x7FFF_0000, ActionKind.KILL_PROCESS: 0x8000_0000, ActionKind.KILL_THREAD: 0,
       ActionKind.TRAP: 0x0003_0000, ActionKind.LOG: 0x7FFC_0000, ActionKind.ERRNO: 0x0005_0000,
       ActionKind.TRACE: 0x7FF0_0000}
EXTRA_SYSCALLS = ("execve", "getppid", "ptrace", "clone3", "kill", "socket", "ioctl", "openat", "mmap", "read")


def ret(action: Action) -> int:
    return RET[action.kind] | action.value


def interesting_args(flt: Filter, syscall: str, rng: random.Random) -> list[tuple[int, ...]]:
    """Arguments around every value the rules of `syscall` compare with, plus random ones."""
    values = {0, 1, 0xFFFF_FFFF, 1 << 32}
    for rule in flt.rules:
        if rule.syscall == syscall:
            for c in rule.args:
                for v in (c.value, c.value + 1, c.value - 1, c.value | (1 << 40), c.value ^ (c.mask or 0)):
                    values.add(v & 0xFFFF_FFFF_FFFF_FFFF)
    pool = sorted(values)
    out = [tuple(rng.choice(pool) for _ in range(6)) for _ in range(60)]
    for rule in flt.rules:  # every rule's exact match, the rest random
        if rule.syscall == syscall:
            args = [rng.choice(pool) for _ in range(6)]
            for c in rule.args:
                args[c.index] = c.value
            out.append(tuple(args))
    return out + [tuple(rng.getrandbits(64) for _ in range(6)) for _ in range(20)]


@pytest.mark.parametrize("role", list(Role))
def test_compiled_builtin_filters_agree_with_their_rules(role: Role) -> None:
    flt = BUILTIN_FILTERS[role]
    program = compile_filter(flt)
    assert 10 < program.instructions < 400
    rng = random.Random(role.value)
    for name in sorted(set(flt.syscalls) | set(EXTRA_SYSCALLS)):
        nr = syscall_number(name)
        for args in interesting_args(flt, name, rng):
            got = cbpf.run(program.code, cbpf.seccomp_data(nr, args))
            assert got == ret(flt.action_for(name, args)), (name, [hex(a) for a in args])


def test_the_comparison_can_fail() -> None:
    """The check above sees a program that does not follow its rules."""
    vcpu = BUILTIN_FILTERS[Role.VCPU]
    code = compile_filter(vcpu).code
    write = syscall_number("write")
    assert cbpf.run(code, cbpf.seccomp_data(write, (1, 0, 1))) != ret(vcpu.without("write").action_for("write"))


def test_other_architectures_and_x32_calls_get_the_default_action() -> None:
    flt = Filter((Rule("read"),), default_action=Action(ActionKind.ERRNO, 1))
    code = compile_filter(flt).code
    read = syscall_number("read")
    assert cbpf.run(code, cbpf.seccomp_data(read)) == RET[ActionKind.ALLOW]
    assert cbpf.run(code, cbpf.seccomp_data(read, arch=cbpf.AUDIT_ARCH_I386)) == ret(flt.default_action)
    assert cbpf.run(code, cbpf.seccomp_data(read | cbpf.X32_SYSCALL_BIT)) == ret(flt.default_action)


def test_several_conditions_on_one_argument_are_merged() -> None:
    # (flags & O_ACCMODE) == O_RDONLY and (flags & O_CREAT) == 0: one masked comparison.
    flt = Filter((Rule("openat", (Condition(2, Op.MASKED_EQ, 0, mask=0o3), Condition(2, Op.MASKED_EQ, 0, mask=0o100),
                                  Condition(0, Op.EQ, 0xFFFF_FF9C))),))
    code = compile_filter(flt).code
    nr = syscall_number("openat")
    for flags in (0, 0o2000000, 0o1, 0o100, 0o101, 0o2):
        for dirfd in (0xFFFF_FF9C, 0xFFFF_FFFF_FFFF_FF9C, 3):
            args = (dirfd, 0, flags)
            assert cbpf.run(code, cbpf.seccomp_data(nr, args)) == ret(flt.action_for("openat", args)), args


def test_contradictory_conditions_are_refused() -> None:
    flt = Filter((Rule("ioctl", (Condition(1, Op.EQ, 1), Condition(1, Op.EQ, 2))),))
    with pytest.raises(BpfCompileError, match="contradict"):
        compile_filter(flt)


def test_an_ordering_condition_cannot_share_its_argument() -> None:
    flt = Filter((Rule("read", (Condition(2, Op.LT, 100), Condition(2, Op.NE, 5))),))
    with pytest.raises(BpfCompileError, match="only be combined"):
        compile_filter(flt)


@pytest.mark.parametrize("op", [Op.NE, Op.LT, Op.LE, Op.GT, Op.GE])
def test_ordering_comparisons(op: Op) -> None:
    flt = Filter((Rule("read", (Condition(2, op, 4096, ArgWidth.QWORD),)),))
    code = compile_filter(flt).code
    nr = syscall_number("read")
    for size in (0, 4095, 4096, 4097, 1 << 33):
        args = (0, 0, size)
        assert cbpf.run(code, cbpf.seccomp_data(nr, args)) == ret(flt.action_for("read", args)), (op, size)


def test_unknown_syscalls_and_meaningless_filters_are_refused() -> None:
    with pytest.raises(BpfCompileError, match="unknown syscall 'reed'"):
        compile_filter(Filter((Rule("reed"),)))
    with pytest.raises(BpfCompileError, match="refused the rule"):
        compile_filter(Filter((Rule("read"),), default_action=ALLOW, filter_action=ALLOW))


def test_libseccomp_is_new_enough() -> None:
    assert libseccomp_version() >= (2, 5, 0)
    assert compile_filter(Filter((), default_action=KILL_PROCESS)).instructions > 0

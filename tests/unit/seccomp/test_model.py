"""The filter vocabulary: validation and the reference semantics every compiled filter must match."""

from __future__ import annotations

import pytest

from vmm.seccomp import (
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


def test_roles_are_firecrackers_thread_categories() -> None:
    assert [r.value for r in Role] == ["api", "vmm", "vcpu"]


@pytest.mark.parametrize("kwargs", [
    {"index": 6, "op": Op.EQ, "value": 0},
    {"index": -1, "op": Op.EQ, "value": 0},
    {"index": 0, "op": Op.EQ, "value": 1 << 32},
    {"index": 0, "op": Op.EQ, "value": -1},
    {"index": 0, "op": Op.EQ, "value": 1 << 64, "width": ArgWidth.QWORD},
    {"index": 0, "op": Op.MASKED_EQ, "value": 0},
    {"index": 0, "op": Op.EQ, "value": 0, "mask": 1},
    {"index": 0, "op": Op.MASKED_EQ, "value": 0, "mask": 1 << 32},
])
def test_invalid_conditions_are_refused(kwargs: dict) -> None:
    with pytest.raises(SeccompError):
        Condition(**kwargs)


@pytest.mark.parametrize("kind,value", [(ActionKind.ERRNO, 70000), (ActionKind.TRACE, -1), (ActionKind.ALLOW, 1)])
def test_invalid_actions_are_refused(kind: ActionKind, value: int) -> None:
    with pytest.raises(SeccompError):
        Action(kind, value)


def test_a_dword_condition_looks_at_the_low_32_bits_only() -> None:
    c = Condition(1, Op.EQ, 0xAE80)
    assert c.matches((0, 0xAE80))
    assert c.matches((0, 0xFFFF_FFFF_0000_AE80))
    assert not Condition(1, Op.EQ, 0xAE80, ArgWidth.QWORD).matches((0, 0xFFFF_FFFF_0000_AE80))


@pytest.mark.parametrize("op,arg,expected", [
    (Op.EQ, 5, True), (Op.EQ, 6, False), (Op.NE, 6, True), (Op.NE, 5, False),
    (Op.LT, 4, True), (Op.LT, 5, False), (Op.LE, 5, True), (Op.LE, 6, False),
    (Op.GT, 6, True), (Op.GT, 5, False), (Op.GE, 5, True), (Op.GE, 4, False),
])
def test_comparisons(op: Op, arg: int, expected: bool) -> None:
    assert Condition(0, op, 5).matches((arg,)) is expected


def test_masked_eq() -> None:
    no_exec = Condition(2, Op.MASKED_EQ, 0, mask=0x4)
    assert no_exec.matches((0, 0, 0x3))
    assert not no_exec.matches((0, 0, 0x7))


def test_rules_are_ored_and_their_conditions_anded() -> None:
    flt = Filter((
        Rule("ioctl", (Condition(1, Op.EQ, 1),)),
        Rule("ioctl", (Condition(1, Op.EQ, 2), Condition(2, Op.EQ, 9))),
        Rule("read"),
    ))
    assert flt.action_for("read", (123, 4, 5)) == ALLOW
    assert flt.action_for("ioctl", (3, 1)) == ALLOW
    assert flt.action_for("ioctl", (3, 2, 9)) == ALLOW
    assert flt.action_for("ioctl", (3, 2, 8)) == KILL_PROCESS
    assert flt.action_for("write") == KILL_PROCESS
    assert flt.syscalls == ("ioctl", "read")


def test_without_drops_every_rule_of_a_syscall() -> None:
    flt = Filter((Rule("futex", (Condition(1, Op.EQ, 128),)), Rule("futex", (Condition(1, Op.EQ, 129),)),
                  Rule("write")), default_action=Action(ActionKind.TRAP))
    smaller = flt.without("futex")
    assert smaller.syscalls == ("write",)
    assert smaller.default_action == Action(ActionKind.TRAP)
    assert "2 syscalls" in repr(flt) and "default=trap" in repr(flt)

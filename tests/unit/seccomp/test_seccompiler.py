"""Firecracker seccompiler's JSON format: what a --seccomp-filter file may say, and what it may not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmm.seccomp import (
    ALLOW,
    BUILTIN_FILTERS,
    Action,
    ActionKind,
    ArgWidth,
    FilterFileError,
    Op,
    Role,
    filters_from_json,
    filters_to_json,
    read_filter_file,
)

# Shaped like Firecracker's resources/seccomp/x86_64-unknown-linux-musl.json.
FIRECRACKER_STYLE = {
    "vmm": {"default_action": "trap", "filter_action": "allow", "filter": [
        {"syscall": "epoll_pwait"},
        {"syscall": "fcntl", "comment": "Used by snapshotting", "args": [
            {"index": 1, "type": "dword", "op": "eq", "val": 2, "comment": "FCNTL_F_SETFD"},
            {"index": 2, "type": "dword", "op": "eq", "val": 1, "comment": "FCNTL_FD_CLOEXEC"}]},
        {"syscall": "mmap", "args": [
            {"index": 2, "type": "dword", "op": {"masked_eq": 4}, "val": 0, "comment": "no PROT_EXEC"}]},
    ]},
    "api": {"default_action": {"errno": 1}, "filter_action": "allow", "filter": [
        {"syscall": "read", "args": [{"index": 2, "type": "qword", "op": "le", "val": 65536}]}]},
    "vcpu": {"default_action": "kill_process", "filter_action": "allow", "filter": [
        {"syscall": "ioctl", "args": [{"index": 1, "type": "dword", "op": "eq", "val": 44672,
                                       "comment": "KVM_RUN"}]}]},
}


def test_a_firecracker_style_document() -> None:
    filters = filters_from_json(FIRECRACKER_STYLE)
    vmm, api, vcpu = filters[Role.VMM], filters[Role.API], filters[Role.VCPU]
    assert vmm.default_action == Action(ActionKind.TRAP) and vmm.filter_action == ALLOW
    fcntl = vmm.rules[1]
    assert fcntl.syscall == "fcntl" and fcntl.reason == "Used by snapshotting"
    assert [(c.index, c.op, c.value, c.width, c.comment) for c in fcntl.args] == [
        (1, Op.EQ, 2, ArgWidth.DWORD, "FCNTL_F_SETFD"), (2, Op.EQ, 1, ArgWidth.DWORD, "FCNTL_FD_CLOEXEC")]
    mmap = vmm.rules[2].args[0]
    assert (mmap.op, mmap.mask, mmap.value) == (Op.MASKED_EQ, 4, 0)
    assert api.default_action == Action(ActionKind.ERRNO, 1)
    assert api.rules[0].args[0].width is ArgWidth.QWORD and api.rules[0].args[0].op is Op.LE
    assert vcpu.action_for("ioctl", (5, 44672)) == ALLOW


@pytest.mark.parametrize("name,kind", [("allow", ActionKind.ALLOW), ("trap", ActionKind.TRAP),
                                       ("kill_process", ActionKind.KILL_PROCESS),
                                       ("kill_thread", ActionKind.KILL_THREAD), ("log", ActionKind.LOG),
                                       ("kill", ActionKind.KILL_PROCESS)])
def test_action_names(name: str, kind: ActionKind) -> None:
    doc = json.loads(json.dumps(FIRECRACKER_STYLE))
    doc["vcpu"]["default_action"] = name
    assert filters_from_json(doc)[Role.VCPU].default_action == Action(kind)


def test_the_builtin_filters_round_trip() -> None:
    doc = filters_to_json(BUILTIN_FILTERS)
    assert set(doc) == {"api", "vmm", "vcpu"}
    assert doc["vcpu"]["default_action"] == "kill_process"
    back = filters_from_json(json.loads(json.dumps(doc)))
    for role in Role:
        assert back[role] == BUILTIN_FILTERS[role]


def _broken(path: list, value) -> dict:
    doc = json.loads(json.dumps(FIRECRACKER_STYLE))
    target = doc
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return doc


@pytest.mark.parametrize("path,value,message", [
    (["vcpu"], KeyError, "missing vcpu"),
    (["jailer"], {}, "unknown field jailer"),
    (["api", "default_action"], "explode", "unknown action 'explode'"),
    (["api", "default_action"], {"errno": "EPERM"}, "expected an integer"),
    (["api", "default_action"], {"errno": 1 << 20}, "outside 0..65535"),
    (["api", "filter_action"], KeyError, "missing filter_action"),
    (["api", "filter"], {}, "expected a list of rules"),
    (["vmm", "filter", 0, "sycall"], "read", "unknown field sycall"),
    (["vmm", "filter", 0, "syscall"], 3, "expected a syscall name"),
    (["vmm", "filter", 1, "args", 0, "type"], "word", "expected \"dword\" or \"qword\""),
    (["vmm", "filter", 1, "args", 0, "op"], "masked_eq", "expected eq, ne, lt, le, gt, ge"),
    (["vmm", "filter", 1, "args", 0, "op"], {"masked_ne": 1}, "expected eq, ne, lt, le, gt, ge"),
    (["vmm", "filter", 1, "args", 0, "index"], 6, "argument index 6"),
    (["vmm", "filter", 1, "args", 0, "val"], 1 << 32, "does not fit a dword"),
    (["vmm", "filter", 1, "args", 0, "val"], True, "expected an integer"),
    (["vmm", "filter", 1, "args", 0, "arg_index"], 1, "unknown field arg_index"),
])
def test_mistakes_are_refused_with_their_place(path: list, value, message: str) -> None:
    with pytest.raises(FilterFileError, match=message.replace("(", r"\(")):
        filters_from_json(_broken(path, value))


def test_read_filter_file(tmp_path: Path) -> None:
    good = tmp_path / "f.json"
    good.write_text(json.dumps(FIRECRACKER_STYLE))
    assert read_filter_file(str(good))[Role.VCPU].syscalls == ("ioctl",)
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(FilterFileError, match="is not JSON"):
        read_filter_file(str(bad))
    with pytest.raises(FilterFileError, match="cannot read"):
        read_filter_file(str(tmp_path / "missing.json"))
    not_filters = tmp_path / "list.json"
    not_filters.write_text("[]")
    with pytest.raises(FilterFileError, match=r"list\.json: filter file: expected a JSON object"):
        read_filter_file(str(not_filters))

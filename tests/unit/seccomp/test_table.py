"""Ember's built-in allowlists: small, explained, and free of what an attacker would want."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vmm.kvm import bindings as kb
from vmm.seccomp import BUILTIN_FILTERS, KILL_PROCESS, ALLOW, Filter, Role, builtin_filters, syscall_number
from vmm.seccomp import table

# Upper bounds on the distinct syscalls per role: a new syscall is a decision (docs/seccomp.md),
# not an accident. Firecracker's x86_64 filters: api ~50 rules, vmm ~31, vcpu ~27 syscalls.
MAX_SYSCALLS = {Role.API: 27, Role.VMM: 47, Role.VCPU: 34}

# What a guest that took over a VMM thread would reach for next.
NEVER = ("execve", "execveat", "fork", "vfork", "clone", "clone3", "ptrace", "process_vm_readv",
         "process_vm_writev", "mount", "umount2", "pivot_root", "chroot", "setns", "unshare", "bpf",
         "perf_event_open", "init_module", "finit_module", "kexec_load", "keyctl", "add_key", "userfaultfd",
         "io_uring_setup", "memfd_create", "seccomp", "prctl", "setuid", "setgid", "capset", "open_by_handle_at",
         "name_to_handle_at", "personality", "sendmsg", "recvmsg", "bind", "listen", "kill", "tkill", "pkey_mprotect")


def test_every_role_has_a_kill_process_allowlist() -> None:
    assert set(BUILTIN_FILTERS) == set(Role)
    for flt in BUILTIN_FILTERS.values():
        assert flt.default_action == KILL_PROCESS
        assert flt.filter_action == ALLOW


@pytest.mark.parametrize("role", list(Role))
def test_every_rule_names_a_real_syscall_and_says_why(role: Role) -> None:
    for rule in BUILTIN_FILTERS[role].rules:
        syscall_number(rule.syscall)
        assert len(rule.reason) > 10, rule


@pytest.mark.parametrize("role", list(Role))
def test_the_lists_stay_small(role: Role) -> None:
    assert len(BUILTIN_FILTERS[role].syscalls) <= MAX_SYSCALLS[role]


@pytest.mark.parametrize("role", list(Role))
def test_no_rule_is_repeated(role: Role) -> None:
    rules = [(r.syscall, r.args) for r in BUILTIN_FILTERS[role].rules]
    assert len(rules) == len(set(rules))


@pytest.mark.parametrize("role", list(Role))
def test_nothing_an_attacker_needs(role: Role) -> None:
    assert not set(NEVER) & set(BUILTIN_FILTERS[role].syscalls)


@pytest.mark.parametrize("role", list(Role))
def test_memory_is_never_made_executable(role: Role) -> None:
    flt = BUILTIN_FILTERS[role]
    prot_rw, prot_rx = 0x3, 0x5
    anon_private = 0x22
    assert flt.action_for("mmap", (0, 4096, prot_rw, anon_private, -1 & 0xFFFF_FFFF, 0)) == ALLOW
    assert flt.action_for("mmap", (0, 4096, prot_rx, anon_private, -1 & 0xFFFF_FFFF, 0)) == KILL_PROCESS
    assert flt.action_for("mmap", (0, 4096, prot_rw, 0x01, 5, 0)) == KILL_PROCESS  # a shared file mapping
    assert flt.action_for("mprotect", (0, 4096, prot_rw)) == ALLOW
    assert flt.action_for("mprotect", (0, 4096, prot_rx)) == KILL_PROCESS


def test_only_the_vcpu_runs_the_guest() -> None:
    assert BUILTIN_FILTERS[Role.VCPU].action_for("ioctl", (9, kb.KVM_RUN)) == ALLOW
    for role in (Role.API, Role.VMM):
        assert BUILTIN_FILTERS[role].action_for("ioctl", (9, kb.KVM_RUN)) == KILL_PROCESS


@pytest.mark.parametrize("request_", [kb.KVM_CREATE_VM, kb.KVM_CREATE_VCPU, kb.KVM_SET_USER_MEMORY_REGION,
                                      kb.KVM_SET_REGS, kb.KVM_SET_MSRS, kb.KVM_SET_CPUID2, kb.KVM_IRQFD,
                                      kb.KVM_IOEVENTFD, 0x400454CA])  # TUNSETIFF
def test_nobody_builds_or_rewires_a_vm_after_boot(request_: int) -> None:
    for flt in BUILTIN_FILTERS.values():
        assert flt.action_for("ioctl", (9, request_)) == KILL_PROCESS


def test_the_api_thread_has_no_kvm_or_tap_ioctl() -> None:
    api = BUILTIN_FILTERS[Role.API]
    allowed = {c.value for r in api.rules if r.syscall == "ioctl" for c in r.args if c.index == 1}
    assert allowed == {table.FIONBIO, table.TCGETS}


def test_sockets_are_unix_stream_only() -> None:
    vmm = BUILTIN_FILTERS[Role.VMM]
    unix_stream = (1, 1 | 0o4000 | 0o2000000, 0)
    assert vmm.action_for("socket", unix_stream) == ALLOW
    assert vmm.action_for("socket", (2, 1 | 0o4000 | 0o2000000, 0)) == KILL_PROCESS  # AF_INET
    assert vmm.action_for("socket", (16, 3, 0)) == KILL_PROCESS  # AF_NETLINK
    assert BUILTIN_FILTERS[Role.API].action_for("socket", unix_stream) == KILL_PROCESS


def test_futexes_are_private_and_the_kick_is_the_only_signal() -> None:
    for flt in BUILTIN_FILTERS.values():
        assert flt.action_for("futex", (0, 128)) == ALLOW
        assert flt.action_for("futex", (0, 0)) == KILL_PROCESS  # a shared FUTEX_WAIT
        assert flt.action_for("futex", (0, 12)) == KILL_PROCESS  # FUTEX_CMP_REQUEUE_PI
    vmm = BUILTIN_FILTERS[Role.VMM]
    assert vmm.action_for("tgkill", (1, 2, table.SIGRTMIN)) == ALLOW
    assert vmm.action_for("tgkill", (1, 2, 9)) == KILL_PROCESS


def test_only_the_vmm_thread_writes_files() -> None:
    o_wronly_creat = 0o1 | 0o100
    assert BUILTIN_FILTERS[Role.VMM].action_for("openat", (0, 0, o_wronly_creat)) == ALLOW
    for role in (Role.API, Role.VCPU):
        assert BUILTIN_FILTERS[role].action_for("openat", (0, 0, 0o2000000)) == ALLOW  # O_RDONLY|O_CLOEXEC
        assert BUILTIN_FILTERS[role].action_for("openat", (0, 0, o_wronly_creat)) == KILL_PROCESS
        assert BUILTIN_FILTERS[role].action_for("openat", (0, 0, 0o100)) == KILL_PROCESS  # O_RDONLY|O_CREAT


def test_builtin_filters_is_a_copy() -> None:
    copy = builtin_filters()
    copy[Role.API] = Filter(())
    assert BUILTIN_FILTERS[Role.API].rules


DOC = Path(__file__).resolve().parents[3] / "docs" / "seccomp.md"


@pytest.mark.parametrize("role", list(Role))
def test_docs_explain_every_syscall_of_every_role(role: Role) -> None:
    """docs/seccomp.md: the shared groups once, the rest in the role's own section; the counts."""
    text = DOC.read_text()
    shared = text[text.index("Every role gets"):text.index("### `vcpu`")]
    section = re.search(rf"### `{role.value}`\n(.*?)(?=\n### |\n## )", text, re.S).group(1)
    if role is Role.VMM:  # "as in `vcpu` above": the device I/O group is listed there
        section += re.search(r"### `vcpu`\n(.*?)(?=\n### )", text, re.S).group(1)
    flt = BUILTIN_FILTERS[role]
    for name in flt.syscalls:
        assert f"`{name}" in shared + section, f"{name} ({role.value}) is not explained in docs/seccomp.md"
    for rule in flt.rules:
        if rule.syscall == "ioctl":
            assert rule.args[0].comment in shared + section, rule
    assert f"{role.value} {len(flt.syscalls)}" in text.replace("**", "").replace(" syscalls", "")

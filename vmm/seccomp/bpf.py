"""Compile a `Filter` to a classic BPF program with libseccomp, and install one on the calling thread.

Primer. A seccomp filter is a classic BPF program the kernel runs on every
system call of a thread, over `struct seccomp_data` (syscall number,
architecture, six 64-bit arguments); its return value is the action
(SECCOMP_RET_ALLOW, SECCOMP_RET_KILL_PROCESS, ...). libseccomp
(libseccomp.so.2, bound here with cffi in ABI mode: no compiler needed)
turns rules into that program, including the architecture check that
kills x32 and i386 calls; `compile_filter` exports it as bytes
(`BpfProgram`) so that installing it later is one syscall.

`BpfProgram.install` does what Firecracker's `apply_filter` does:
``prctl(PR_SET_NO_NEW_PRIVS)`` (an unprivileged process may only install
a filter with it, and it also keeps a jailed VMM from gaining privileges
through execve) and then ``seccomp(SECCOMP_SET_MODE_FILTER, 0, &prog)``
without SECCOMP_FILTER_FLAG_TSYNC: the filter applies to the calling
thread and to the threads it creates afterwards, never to threads that
already exist. Filters stack: a thread's calls must pass every filter it
has (the intersection), so each thread installs exactly one.

Argument widths: libseccomp compares whole 64-bit arguments. A `dword`
condition with ``eq`` or ``masked_eq`` is compiled as a masked comparison
of the low 32 bits, as Firecracker's seccompiler does; ``ne``, ``lt``,
``le``, ``gt`` and ``ge`` on a dword compare the whole register (so a
32-bit argument whose upper half is not zero fails ``lt``/``le``/``eq``-like
tests it would pass in Firecracker). Conditions of one rule on the same
argument are merged when they are all ``eq``/``masked_eq`` (libseccomp 2.5
refuses two comparisons of one argument in a rule); other combinations are
refused with `BpfCompileError`.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

from .model import Action, ActionKind, ArgWidth, Condition, Filter, Op, Rule, SeccompError

__all__ = [
    "BpfError",
    "LibseccompUnavailable",
    "BpfCompileError",
    "FilterInstallError",
    "BpfProgram",
    "compile_filter",
    "syscall_number",
    "libseccomp_version",
]


class BpfError(SeccompError):
    """A seccomp filter could not be compiled or installed."""


class LibseccompUnavailable(BpfError):
    """libseccomp.so.2 cannot be loaded: seccomp filters need libseccomp 2.5 or newer."""


class BpfCompileError(BpfError):
    """libseccomp refused the filter."""


class FilterInstallError(BpfError):
    """The kernel refused to install the seccomp filter."""


_CDEF = """
typedef void *scmp_filter_ctx;
struct scmp_arg_cmp { unsigned int arg; int op; uint64_t datum_a; uint64_t datum_b; };
struct scmp_version { unsigned int major; unsigned int minor; unsigned int micro; };
const struct scmp_version *seccomp_version(void);
scmp_filter_ctx seccomp_init(uint32_t def_action);
void seccomp_release(scmp_filter_ctx ctx);
int seccomp_attr_set(scmp_filter_ctx ctx, int attr, uint32_t value);
int seccomp_syscall_resolve_name(const char *name);
int seccomp_rule_add_exact_array(scmp_filter_ctx ctx, uint32_t action, int syscall,
                                 unsigned int arg_cnt, const struct scmp_arg_cmp *arg_array);
int seccomp_export_bpf(const scmp_filter_ctx ctx, int fd);

struct sock_filter { uint16_t code; uint8_t jt; uint8_t jf; uint32_t k; };
struct sock_fprog { unsigned short len; struct sock_filter *filter; };
int prctl(int option, ...);
long syscall(long number, ...);
"""

# <seccomp.h> (libseccomp 2.5).
_SCMP_ACT = {
    ActionKind.KILL_PROCESS: 0x8000_0000,
    ActionKind.KILL_THREAD: 0x0000_0000,
    ActionKind.TRAP: 0x0003_0000,
    ActionKind.ERRNO: 0x0005_0000,
    ActionKind.TRACE: 0x7FF0_0000,
    ActionKind.LOG: 0x7FFC_0000,
    ActionKind.ALLOW: 0x7FFF_0000,
}
_SCMP_CMP = {Op.NE: 1, Op.LT: 2, Op.LE: 3, Op.EQ: 4, Op.GE: 5, Op.GT: 6, Op.MASKED_EQ: 7}
_SCMP_FLTATR_ACT_BADARCH = 2
_SCMP_FLTATR_CTL_NNP = 3
_SCMP_FLTATR_CTL_OPTIMIZE = 8
_NR_SCMP_ERROR = -1
# <linux/prctl.h>, <linux/seccomp.h>, <asm/unistd_64.h>.
_PR_SET_NO_NEW_PRIVS = 38
_SECCOMP_SET_MODE_FILTER = 1
_SYS_SECCOMP = 317
# <linux/filter.h> BPF_MAXINSNS: the kernel's limit on one program.
BPF_MAXINSNS = 4096
_INSN_SIZE = 8
_U32 = 0xFFFF_FFFF

# Created on first use: building an FFI imports cffi's C parser (~30 ms), which a VMM
# without seccomp, or a unit test importing the vCPU code, should not pay for.
_ffi: Any = None
_lib: Any = None
_libc: Any = None
_t: Any = None  # _CTypes of `_ffi`
_load_lock = threading.Lock()


class _CTypes:
    """The C types this module passes to cffi, parsed once, when the FFI is built.

    A type given to cffi as a string is parsed by pycparser on its first use
    (~1 ms each): the zygote builds the FFI (it compiles the filters) but never
    installs one, so with strings every forked VMM parsed these again.
    """

    def __init__(self, ffi: Any) -> None:
        self.int = ffi.typeof("int")
        self.long = ffi.typeof("long")
        self.uint = ffi.typeof("unsigned int")
        self.ulong = ffi.typeof("unsigned long")
        self.filter_array = ffi.typeof("struct sock_filter[]")
        self.fprog_p = ffi.typeof("struct sock_fprog *")
        self.arg_cmp_array = ffi.typeof("struct scmp_arg_cmp[]")


def _libs() -> tuple[Any, Any]:
    global _ffi, _lib, _libc, _t
    with _load_lock:
        if _lib is None:
            import cffi
            _ffi = cffi.FFI()
            _ffi.cdef(_CDEF)
            _t = _CTypes(_ffi)
            try:
                # SAFETY: ABI-mode binding; every declaration in _CDEF matches <seccomp.h> of
                # libseccomp 2.5 (the soname's ABI) or the libc prototypes.
                lib = _ffi.dlopen("libseccomp.so.2")
            except OSError as exc:
                raise LibseccompUnavailable() from exc
            # SAFETY: dlopen(NULL) is the process's own libc, already loaded.
            _libc = _ffi.dlopen(None)
            _lib = lib
    return _lib, _libc


def libseccomp_version() -> tuple[int, int, int]:
    lib, _ = _libs()
    # SAFETY: seccomp_version returns a pointer to a static struct inside the library.
    v = lib.seccomp_version()
    return (v.major, v.minor, v.micro)


def syscall_number(name: str) -> int:
    """The native (x86_64) number of syscall `name`; raises `BpfCompileError` for an unknown name."""
    lib, _ = _libs()
    # SAFETY: a NUL-terminated copy of the name lives for the call; the function only reads it.
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    if nr == _NR_SCMP_ERROR or nr < 0:
        raise BpfCompileError(f"unknown syscall {name!r}")
    return nr


def _action(action: Action) -> int:
    return _SCMP_ACT[action.kind] | (action.value & 0xFFFF)


def _merge_conditions(rule: Rule) -> list[tuple[int, int, int, int]]:
    """The rule's conditions as libseccomp (arg, op, datum_a, datum_b), one per argument."""
    by_arg: dict[int, list[Condition]] = {}
    for c in rule.args:
        by_arg.setdefault(c.index, []).append(c)
    out = []
    for index, conds in sorted(by_arg.items()):
        if len(conds) == 1 and conds[0].op not in (Op.EQ, Op.MASKED_EQ):
            c = conds[0]
            out.append((index, _SCMP_CMP[c.op], c.value, 0))
            continue
        if any(c.op not in (Op.EQ, Op.MASKED_EQ) for c in conds):
            raise BpfCompileError(f"{rule.syscall}: several conditions on argument {index} can only be "
                                  "combined when they are eq or masked_eq")
        mask, value = 0, 0
        for c in conds:
            width = _U32 if c.width is ArgWidth.DWORD else 0xFFFF_FFFF_FFFF_FFFF
            m = (c.mask if c.mask is not None else width) & width
            v = c.value & m
            if (value & m & mask) != (v & mask):
                raise BpfCompileError(f"{rule.syscall}: the conditions on argument {index} contradict "
                                      "each other (the rule could never match)")
            mask, value = mask | m, value | v
        out.append((index, _SCMP_CMP[Op.MASKED_EQ], mask, value))
    return out


@dataclass(frozen=True)
class BpfProgram:
    """A compiled classic BPF seccomp program (struct sock_filter[], native byte order)."""

    code: bytes

    @property
    def instructions(self) -> int:
        return len(self.code) // _INSN_SIZE

    def install(self) -> None:
        """Install this program on the calling thread (no TSYNC); raises `FilterInstallError`."""
        _, libc = _libs()
        n = self.instructions
        # SAFETY: `insns` is a cffi-owned array of exactly n sock_filter records filled from
        # `code` (n * 8 bytes); `prog` points at it, and both stay referenced until the calls
        # return (the kernel copies the program during seccomp()).
        insns = _ffi.new(_t.filter_array, n)
        _ffi.memmove(insns, self.code, n * _INSN_SIZE)
        prog = _ffi.new(_t.fprog_p, {"len": n, "filter": insns})
        # SAFETY: prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) takes only integers; it sets a per-thread
        # flag that can never be cleared, which is what a filtered thread wants.
        rc = libc.prctl(_ffi.cast(_t.int, _PR_SET_NO_NEW_PRIVS), _ffi.cast(_t.ulong, 1),
                        _ffi.cast(_t.ulong, 0), _ffi.cast(_t.ulong, 0),
                        _ffi.cast(_t.ulong, 0))
        if rc != 0:
            err = _ffi.errno
            raise FilterInstallError(f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")
        # SAFETY: seccomp(SECCOMP_SET_MODE_FILTER, flags=0, &prog): `prog` is a valid sock_fprog
        # whose filter pointer covers `len` instructions (above); flags 0 = this thread only.
        rc = libc.syscall(_ffi.cast(_t.long, _SYS_SECCOMP), _ffi.cast(_t.uint, _SECCOMP_SET_MODE_FILTER),
                          _ffi.cast(_t.uint, 0), prog)
        if rc != 0:
            err = _ffi.errno
            raise FilterInstallError(f"seccomp(SECCOMP_SET_MODE_FILTER): {os.strerror(err)}")

    def __repr__(self) -> str:
        return f"<BpfProgram {self.instructions} instructions>"


def compile_filter(flt: Filter) -> BpfProgram:
    """Compile `flt` for this machine's architecture; raises `BpfCompileError`."""
    lib, _ = _libs()
    # SAFETY: seccomp_init returns a new context (NULL on failure) that only
    # seccomp_release frees; the `finally` below releases it on every path.
    ctx = lib.seccomp_init(_action(flt.default_action))
    if ctx == _ffi.NULL:
        raise BpfCompileError(f"seccomp_init({flt.default_action}) failed")
    try:
        for attr, value in ((_SCMP_FLTATR_ACT_BADARCH, _action(flt.default_action)),
                            # The program installs itself later, with NO_NEW_PRIVS set then.
                            (_SCMP_FLTATR_CTL_NNP, 0),
                            # A binary tree of syscall numbers instead of a linear scan.
                            (_SCMP_FLTATR_CTL_OPTIMIZE, 2)):
            # SAFETY: `ctx` is live; the attribute ids and values are libseccomp 2.5's.
            rc = lib.seccomp_attr_set(ctx, attr, value)
            if rc < 0:
                raise BpfCompileError(f"seccomp_attr_set({attr}): {os.strerror(-rc)}")
        action = _action(flt.filter_action)
        for rule in flt.rules:
            nr = syscall_number(rule.syscall)
            conds = _merge_conditions(rule)
            # SAFETY: `cmps` holds len(conds) scmp_arg_cmp records (cffi-owned, alive for the call);
            # libseccomp copies them into the context.
            cmps = _ffi.new(_t.arg_cmp_array, max(len(conds), 1))
            for i, (arg, op, a, b) in enumerate(conds):
                cmps[i].arg, cmps[i].op, cmps[i].datum_a, cmps[i].datum_b = arg, op, a, b
            # SAFETY: `ctx` is live, `cmps` covers `len(conds)` entries (above).
            rc = lib.seccomp_rule_add_exact_array(ctx, action, nr, len(conds), cmps)
            if rc < 0:
                raise BpfCompileError(f"{rule.syscall}: libseccomp refused the rule: {os.strerror(-rc)}")
        fd = os.memfd_create("ember-seccomp-bpf", os.MFD_CLOEXEC)
        try:
            # SAFETY: `ctx` is live and `fd` is an open, writable memfd this function owns.
            rc = lib.seccomp_export_bpf(ctx, fd)
            if rc < 0:
                raise BpfCompileError(f"seccomp_export_bpf: {os.strerror(-rc)}")
            size = os.lseek(fd, 0, os.SEEK_END)
            code = os.pread(fd, size, 0)
        finally:
            os.close(fd)
    finally:
        # SAFETY: `ctx` came from seccomp_init above and is released exactly once.
        lib.seccomp_release(ctx)
    if not code or len(code) % _INSN_SIZE:
        raise BpfCompileError(f"libseccomp exported {len(code)} bytes, not a whole program")
    if len(code) // _INSN_SIZE > BPF_MAXINSNS:
        raise BpfCompileError(f"the program has {len(code) // _INSN_SIZE} instructions; "
                              f"the kernel accepts at most {BPF_MAXINSNS}")
    return BpfProgram(code)

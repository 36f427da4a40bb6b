"""The KVM side of a snapshot: every vCPU's state and the VM's irqchip, PIT and clock.

Primer. KVM keeps a vCPU's architectural state in the kernel and hands it
out through a family of GET/SET ioctls, one per piece: general registers,
segment and control registers, the XSAVE image (x87/SSE/AVX), XCR0, debug
registers, the in-kernel local APIC's register page, pending events
(exceptions, NMIs, interrupt shadow), the multiprocessing state, the CPUID
table, and the MSRs KVM_GET_MSR_INDEX_LIST reports. The VM adds the two
8259 PICs, the IOAPIC, the 8254 PIT and kvmclock's base. `save_vcpu` and
`save_vm` read them into frozen plain data (`VcpuKvmState`, `VmKvmState`),
`restore_vcpu` and `restore_vm` write them into a new VM, and `to_tree` /
`from_tree` convert to and from the tree `snapshot.format` stores; a tree
read back from a file is untrusted input, checked before KVM sees it.

The order of the ioctls matters (KVM documentation, and Firecracker's
arch/x86_64/vcpu.rs): see `save_vcpu` and `restore_vcpu`. Both run on the
vCPU's own thread in the VMM (`Vcpu.call`), with every vCPU paused; the
VM's state is saved and restored with the vCPUs stopped too.

Time. The guest must see neither its clock jump nor a soft lockup:

* kvmclock: by default `restore_vm` sets the saved kvmclock value
  (KVM_SET_CLOCK with no flags), so the guest's monotonic clock continues
  from where it was saved; the time the snapshot spent on disk is invisible
  to it, and its wall clock lags by the snapshot's age until something in
  the guest (NTP, an agent, VMGenID-triggered code) sets it. Firecracker's
  `clock_realtime` load option (`restore_vm(..., clock_realtime=True)`)
  instead advances kvmclock by the host wall time elapsed since the save,
  as KVM_CLOCK_REALTIME does: a warm-pool snapshot restored hours later
  then sees its monotonic clock leap forward and every timer expire at once.
* TSC: IA32_TSC is restored to its saved value, so the TSC and kvmclock
  agree; the saved TSC frequency is re-applied when the host's differs by
  more than KVM's own tolerance (250 ppm).
* soft lockups: `restore_vcpu` ends with KVM_KVMCLOCK_CTRL, which tells a
  kvmclock guest it was stopped (its watchdog then resets).
"""

from __future__ import annotations

import ctypes
import errno
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from vmm.arch.x86_64 import lapic as apic
from vmm.arch.x86_64 import msr as msrs
from vmm.kvm import Kvm, KvmError, VcpuFd, VmFd, exits
from vmm.kvm import bindings as kb

__all__ = [
    "VstatePersistError",
    "InvalidVcpuState",
    "InvalidVmState",
    "VcpuSaveFailed",
    "VcpuRestoreFailed",
    "PendingVcpuExit",
    "MsrNotRead",
    "MsrNotWritten",
    "TscFrequencyMismatch",
    "VmSaveFailed",
    "VmRestoreFailed",
    "MAX_SAVED_MSRS",
    "MAX_XSAVE_SIZE",
    "TSC_KHZ_TOLERANCE_PPM",
    "VcpuKvmState",
    "VmKvmState",
    "msrs_to_save",
    "save_vcpu",
    "restore_vcpu",
    "save_vm",
    "restore_vm",
]

# --- limits and sizes ----------------------------------------------------------------

#: Most MSRs one vCPU state may carry: the list `msrs_to_save` gives has
#: about 65 entries on Intel and AMD hosts; KVM's whole index list a few hundred.
MAX_SAVED_MSRS = 1024
#: Largest XSAVE image accepted: the non-compacted format with every feature
#: Linux 6.x knows (AMX tiles included) is under 12 KiB.
MAX_XSAVE_SIZE = 64 << 10
#: QEMU's and Firecracker's (and KVM's `tsc_tolerance_ppm`) tolerance: TSC
#: frequencies calibrated at boot differ by this much between identical hosts.
TSC_KHZ_TOLERANCE_PPM = 250

_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1
_REGS_SIZE = ctypes.sizeof(kb.kvm_regs)
_SREGS_SIZE = ctypes.sizeof(kb.kvm_sregs)
_XCRS_SIZE = ctypes.sizeof(kb.kvm_xcrs)
_DEBUGREGS_SIZE = ctypes.sizeof(kb.kvm_debugregs)
_LAPIC_SIZE = ctypes.sizeof(kb.kvm_lapic_state)
_EVENTS_SIZE = ctypes.sizeof(kb.kvm_vcpu_events)
_XSAVE_MIN_SIZE = ctypes.sizeof(kb.kvm_xsave)
_IRQCHIP_SIZE = ctypes.sizeof(kb.kvm_irqchip().chip)  # the 512-byte chip union
_PIT2_SIZE = ctypes.sizeof(kb.kvm_pit_state2)
_CPUID_FIELDS = ("function", "index", "flags", "eax", "ebx", "ecx", "edx")

# The multiprocessing states an x86 vCPU can be in (KVM_GET_MP_STATE).
_X86_MP_STATES = {
    kb.KVM_MP_STATE_RUNNABLE: "runnable",
    kb.KVM_MP_STATE_UNINITIALIZED: "uninitialized",
    kb.KVM_MP_STATE_INIT_RECEIVED: "init-received",
    kb.KVM_MP_STATE_HALTED: "halted",
    kb.KVM_MP_STATE_SIPI_RECEIVED: "sipi-received",
}

# MSRs KVM handles but leaves out of KVM_GET_MSR_INDEX_LIST, which a guest
# can read back: the MTRRs (SDM Vol. 3A §12.11; KVM emulates 8 variable
# ranges, MTRRcap.VCNT) and whatever the VMM writes at boot (Ember sets
# MTRRdefType there). Without them a restored guest would read MTRRs disabled.
_UNLISTED_MSRS: tuple[int, ...] = (
    msrs.MSR_MTRRdefType,
    *range(msrs.MSR_MTRR_PHYSBASE0, msrs.MSR_MTRR_PHYSBASE0 + 2 * 8),
    msrs.MSR_MTRRfix64K_00000,
    msrs.MSR_MTRRfix16K_80000,
    msrs.MSR_MTRRfix16K_A0000,
    *range(msrs.MSR_MTRRfix4K_C0000, msrs.MSR_MTRRfix4K_C0000 + 8),
)

# Written after every other MSR, in their own KVM_SET_MSRS: KVM arms the LAPIC's
# TSC-deadline timer against the vCPU's TSC when the deadline is written, so
# IA32_TSC must already hold its restored value (and the LAPIC its LVT timer mode).
_DEFERRED_MSRS = (msrs.MSR_IA32_TSC_DEADLINE,)

# LVT timer register bits 18:17, timer mode (SDM Vol. 3A §11.5.1, Figure 11-8).
_LVTT_MODE_SHIFT = 17
_LVTT_MODE_MASK = 0b11 << _LVTT_MODE_SHIFT
_LVTT_MODE_TSC_DEADLINE = 0b10


# Names for error messages, from the arch module's MSR_* indices (not its bit masks).
_MSR_NAMES = {value: name for name, value in vars(msrs).items()
              if name.startswith("MSR_") and type(value) is int
              and name not in ("MSR_IA32_MISC_ENABLE_FAST_STRING", "MSR_K7_HWCR_TSC_FREQ_SEL")}


def _msr_name(index: int) -> str:
    name = _MSR_NAMES.get(index)
    return f"{index:#x} ({name})" if name else f"{index:#x}"


# --- errors ------------------------------------------------------------------------------


class VstatePersistError(Exception):
    """KVM vCPU or VM state could not be saved or restored."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail)
        self.detail = detail

    @property
    def summary(self) -> str:
        """The first line of the class docstring: what went wrong."""
        doc = type(self).__doc__ or type(self).__name__
        return doc.strip().splitlines()[0].rstrip(".")

    def __str__(self) -> str:
        return f"{self.summary}: {self.detail}" if self.detail else self.summary


class InvalidVcpuState(VstatePersistError):
    """Saved vCPU state is malformed."""


class InvalidVmState(VstatePersistError):
    """Saved VM state (irqchip, PIT, clock) is malformed."""


class VcpuSaveFailed(VstatePersistError):
    """Cannot save the vCPU's KVM state."""


class PendingVcpuExit(VcpuSaveFailed):
    """The vCPU returned an exit that must be handled before its state can be saved."""

    def __init__(self, detail: str = "", vcpu_exit: exits.VcpuExit | None = None) -> None:
        super().__init__(detail)
        self.vcpu_exit = vcpu_exit


class MsrNotRead(VcpuSaveFailed):
    """KVM refused to read an MSR of the save list."""


class VcpuRestoreFailed(VstatePersistError):
    """Cannot restore the vCPU's KVM state."""


class MsrNotWritten(VcpuRestoreFailed):
    """KVM refused to write a saved MSR."""


class TscFrequencyMismatch(VcpuRestoreFailed):
    """The snapshot's TSC frequency cannot be given to the guest on this host."""


class VmSaveFailed(VstatePersistError):
    """Cannot save the VM's irqchip, PIT or clock."""


class VmRestoreFailed(VstatePersistError):
    """Cannot restore the VM's irqchip, PIT or clock."""


# --- checking untrusted trees ----------------------------------------------------------


def _fields(tree: Any, cls: type, names: tuple[str, ...], error: type[VstatePersistError]) -> Mapping[str, Any]:
    if not isinstance(tree, dict):
        raise error(f"{cls.__name__} must be an object, got {type(tree).__name__}")
    missing = [n for n in names if n not in tree]
    if missing:
        raise error(f"{cls.__name__}: missing field {missing[0]!r}")
    unknown = sorted(k for k in tree if k not in names)
    if unknown:
        raise error(f"{cls.__name__}: unknown field {unknown[0]!r}")
    return tree


def _blob(value: Any, where: str, size: int, error: type[VstatePersistError]) -> bytes:
    if type(value) is not bytes:
        raise error(f"{where} must be bytes, got {type(value).__name__}")
    if len(value) != size:
        raise error(f"{where} is {len(value)} bytes, the KVM structure is {size}")
    return value


def _uint(value: Any, where: str | Callable[[], str], maximum: int, error: type[VstatePersistError]) -> int:
    """`value` if it is an int in 0..maximum, else `error` naming `where` (a callable: built only then)."""
    if type(value) is not int:  # bool is an int subclass: refuse it too
        raise error(f"{where if isinstance(where, str) else where()} must be an integer, got {type(value).__name__}")
    if not 0 <= value <= maximum:
        raise error(f"{where if isinstance(where, str) else where()} = {value} is out of range 0..{maximum:#x}")
    return value


def _list(value: Any, where: str, limit: int, error: type[VstatePersistError]) -> list | tuple:
    if not isinstance(value, (list, tuple)):
        raise error(f"{where} must be a list, got {type(value).__name__}")
    if len(value) > limit:
        raise error(f"{where} has {len(value)} entries, at most {limit}")
    return value


# --- vCPU state -------------------------------------------------------------------------


@dataclass(frozen=True)
class VcpuKvmState:
    """One vCPU's state as KVM holds it; blobs are the raw KVM structures.

    `xsave` is the XSAVE image (KVM_GET_XSAVE2, at least 4096 bytes): it
    holds the x87 and SSE state that KVM_GET_FPU gives, plus the AVX and
    later components, and every x86 KVM host supports it (without XSAVE
    hardware it carries the FXSAVE image). `cpuid` entries are
    (function, index, flags, eax, ebx, ecx, edx); `msrs` are (index, value)
    pairs, in the order they are written back. `tsc_khz` is None when KVM
    could not report the frequency.
    """

    regs: bytes
    sregs: bytes
    xsave: bytes
    xcrs: bytes
    debugregs: bytes
    lapic: bytes
    mp_state: int
    vcpu_events: bytes
    cpuid: tuple[tuple[int, int, int, int, int, int, int], ...]
    msrs: tuple[tuple[int, int], ...]
    tsc_khz: int | None

    _TREE_FIELDS = ("regs", "sregs", "xsave", "xcrs", "debugregs", "lapic", "mp_state", "vcpu_events",
                    "cpuid", "msrs", "tsc_khz")

    def __post_init__(self) -> None:
        err = InvalidVcpuState
        _blob(self.regs, "regs", _REGS_SIZE, err)
        _blob(self.sregs, "sregs", _SREGS_SIZE, err)
        if type(self.xsave) is not bytes:
            raise err(f"xsave must be bytes, got {type(self.xsave).__name__}")
        if not _XSAVE_MIN_SIZE <= len(self.xsave) <= MAX_XSAVE_SIZE or len(self.xsave) % 4:
            raise err(f"xsave is {len(self.xsave)} bytes, expected a multiple of 4 "
                      f"from {_XSAVE_MIN_SIZE} to {MAX_XSAVE_SIZE}")
        _blob(self.xcrs, "xcrs", _XCRS_SIZE, err)
        _blob(self.debugregs, "debugregs", _DEBUGREGS_SIZE, err)
        _blob(self.lapic, "lapic", _LAPIC_SIZE, err)
        _blob(self.vcpu_events, "vcpu_events", _EVENTS_SIZE, err)
        _uint(self.mp_state, "mp_state", _U32, err)
        if self.mp_state not in _X86_MP_STATES:
            raise err(f"mp_state {self.mp_state} is not an x86 multiprocessing state")
        if not isinstance(self.cpuid, tuple):
            raise err(f"cpuid must be a tuple, got {type(self.cpuid).__name__}")
        if len(self.cpuid) > kb.KVM_MAX_CPUID_ENTRIES:
            raise err(f"cpuid has {len(self.cpuid)} entries, KVM takes at most {kb.KVM_MAX_CPUID_ENTRIES}")
        for i, entry in enumerate(self.cpuid):
            if not isinstance(entry, tuple) or len(entry) != len(_CPUID_FIELDS):
                raise err(f"cpuid[{i}] must be ({', '.join(_CPUID_FIELDS)})")
            for name, value in zip(_CPUID_FIELDS, entry):
                _uint(value, lambda: f"cpuid[{i}].{name}", _U32, err)  # ~400 values: no message unless one fails
        if not isinstance(self.msrs, tuple):
            raise err(f"msrs must be a tuple, got {type(self.msrs).__name__}")
        if len(self.msrs) > MAX_SAVED_MSRS:
            raise err(f"msrs has {len(self.msrs)} entries, at most {MAX_SAVED_MSRS}")
        seen: set[int] = set()
        for i, pair in enumerate(self.msrs):
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise err(f"msrs[{i}] must be an (index, value) pair")
            index = _uint(pair[0], lambda: f"msrs[{i}] index", _U32, err)
            _uint(pair[1], lambda: f"msrs[{i}] value ({_msr_name(index)})", _U64, err)
            if index in seen:
                raise err(f"msrs[{i}]: MSR {_msr_name(index)} appears twice")
            seen.add(index)
        if self.tsc_khz is not None:
            _uint(self.tsc_khz, "tsc_khz", _U32, err)
            if self.tsc_khz == 0:
                raise err("tsc_khz must be positive (or null when unknown)")

    @property
    def rip(self) -> int:
        # SAFETY: from_buffer_copy copies; __post_init__ checked regs is sizeof(kvm_regs) bytes.
        return kb.kvm_regs.from_buffer_copy(self.regs).rip

    def msr(self, index: int) -> int | None:
        """The saved value of MSR `index`, or None when it was not saved."""
        for i, value in self.msrs:
            if i == index:
                return value
        return None

    def to_tree(self) -> dict[str, Any]:
        """The plain tree (dict/list/int/bytes/None) `snapshot.format` stores."""
        return {
            "regs": self.regs, "sregs": self.sregs, "xsave": self.xsave, "xcrs": self.xcrs,
            "debugregs": self.debugregs, "lapic": self.lapic, "mp_state": self.mp_state,
            "vcpu_events": self.vcpu_events,
            "cpuid": [list(e) for e in self.cpuid],
            "msrs": [list(m) for m in self.msrs],
            "tsc_khz": self.tsc_khz,
        }

    @classmethod
    def from_tree(cls, tree: Any) -> "VcpuKvmState":
        """Rebuild from an untrusted tree; `InvalidVcpuState` names the first thing wrong."""
        err = InvalidVcpuState
        t = _fields(tree, cls, cls._TREE_FIELDS, err)
        cpuid = tuple(tuple(_list(e, f"cpuid[{i}]", len(_CPUID_FIELDS), err))
                      for i, e in enumerate(_list(t["cpuid"], "cpuid", kb.KVM_MAX_CPUID_ENTRIES, err)))
        pairs = tuple(tuple(_list(m, f"msrs[{i}]", 2, err))
                      for i, m in enumerate(_list(t["msrs"], "msrs", MAX_SAVED_MSRS, err)))
        return cls(
            regs=t["regs"], sregs=t["sregs"], xsave=t["xsave"], xcrs=t["xcrs"], debugregs=t["debugregs"],
            lapic=t["lapic"], mp_state=t["mp_state"], vcpu_events=t["vcpu_events"],
            cpuid=cpuid, msrs=pairs, tsc_khz=t["tsc_khz"],  # type: ignore[arg-type]
        )

    def __repr__(self) -> str:
        tsc = f"{self.tsc_khz} kHz" if self.tsc_khz is not None else "unknown"
        return (f"<VcpuKvmState rip={self.rip:#x} {_X86_MP_STATES[self.mp_state]} "
                f"apic_id={apic.apic_id(self.lapic)} msrs={len(self.msrs)} cpuid={len(self.cpuid)} "
                f"xsave={len(self.xsave)}B tsc={tsc}>")


def msrs_to_save(kvm: Kvm) -> list[int]:
    """The MSRs every vCPU saves in a snapshot, IA32_TSC_DEADLINE last.

    KVM_GET_MSR_INDEX_LIST plus the MTRRs (which KVM emulates but does not
    list), filtered by `arch.x86_64.msr.SNAPSHOT_MSR_RANGES`: architectural
    and KVM paravirtual MSRs that hold guest state (TSC, SYSENTER/SYSCALL,
    KERNEL_GS_BASE, PAT, MTRRs, MISC_ENABLE, TSC_DEADLINE, kvmclock, steal
    time, async PF, PV EOI...), without PMU, nested-virtualization and
    Hyper-V MSRs.

    Then probed on a scratch VM with an in-kernel irqchip and a vCPU holding
    KVM's supported CPUID: an MSR KVM lists but refuses to read, or to take
    back, is dropped (a host KVM, like kvm_pvm, may list MSRs its backend
    does not implement; saving would otherwise fail on every snapshot).
    Probed once per process (the answer depends only on the host's KVM), so
    a VMM calls it before its seccomp filter, which has no KVM_CREATE_VM.
    """
    global _probed_msrs
    if _probed_msrs is None:
        _probed_msrs = _msrs_to_save(kvm)
    return list(_probed_msrs)


_probed_msrs: list[int] | None = None


def _msrs_to_save(kvm: Kvm) -> list[int]:
    candidates = msrs.snapshot_msr_indices(sorted(set(kvm.get_msr_index_list()) | set(_UNLISTED_MSRS)))
    vm = kvm.create_vm()
    try:
        vm.create_irq_chip()
        vcpu = vm.create_vcpu(0)
        try:
            try:
                vcpu.set_cpuid2(kvm.get_supported_cpuid())
            except KvmError:
                pass  # probe with KVM's default (empty) CPUID: host-initiated accesses barely depend on it
            return _probe_msrs(vcpu, candidates)
        finally:
            vcpu.close()
    finally:
        vm.close()


def _probe_msrs(vcpu: VcpuFd, candidates: list[int]) -> list[int]:
    """The `candidates` KVM reads and writes back on `vcpu`, in their order."""
    readable: list[tuple[int, int]] = []
    rest = list(candidates)
    while rest:  # KVM_GET_MSRS stops at the first MSR it refuses: skip it, go on after it
        chunk = rest[:kb.KVM_MAX_MSR_ENTRIES]
        got = vcpu.get_msrs(chunk)
        readable += got
        rest = rest[len(got) + (len(got) < len(chunk)):]
    kept: list[int] = []
    pending = readable
    while pending:
        chunk = pending[:kb.KVM_MAX_MSR_ENTRIES]
        n = vcpu.set_msrs(chunk)
        kept += [i for i, _ in chunk[:n]]
        pending = pending[n + (n < len(chunk)):]
    return kept


def _complete_pending_io(fd: VcpuFd) -> None:
    """Let KVM finish the instruction behind the last PIO/MMIO exit, running nothing else.

    After an I/O exit the instruction is complete (RIP past it, an IN's value
    in RAX) only once KVM_RUN is re-entered; until then KVM keeps the rest to
    itself, outside any state an ioctl can read (KVM API documentation,
    "KVM_RUN": "userspace should ensure that the operation is completed
    before performing a live migration"). KVM_RUN with immediate_exit set
    completes it and returns EINTR before running guest code; on a vCPU with
    nothing pending it returns at once.
    """
    run = fd.run_struct
    previous = run.immediate_exit
    fd.set_immediate_exit(True)
    try:
        ex = fd.run()
    except KvmError as exc:
        raise VcpuSaveFailed(f"vCPU {fd.id}: KVM_RUN to complete pending I/O: {exc.strerror or exc}") from exc
    finally:
        run.immediate_exit = previous
    if not isinstance(ex, exits.Interrupted):
        # A string I/O instruction larger than the kvm_run data page exits again.
        raise PendingVcpuExit(f"vCPU {fd.id}: {ex!r}", ex)


def _get(step: str, fd: VcpuFd, fn: Any) -> Any:
    try:
        return fn()
    except KvmError as exc:
        raise VcpuSaveFailed(f"vCPU {fd.id}: {step}: {exc.strerror or exc}") from exc


def _read_msrs(fd: VcpuFd, indices: Sequence[int]) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    for start in range(0, len(indices), kb.KVM_MAX_MSR_ENTRIES):
        chunk = [int(i) for i in indices[start:start + kb.KVM_MAX_MSR_ENTRIES]]
        got = _get("KVM_GET_MSRS", fd, lambda chunk=chunk: fd.get_msrs(chunk))
        if len(got) < len(chunk):
            raise MsrNotRead(f"vCPU {fd.id}: MSR {_msr_name(chunk[len(got)])} "
                             f"(KVM read {start + len(got)} of {len(indices)})")
        out += got
    return tuple(out)


def save_vcpu(fd: VcpuFd, msr_indices: Sequence[int]) -> VcpuKvmState:
    """Read the state of a paused vCPU (on its own thread); `msr_indices` from `msrs_to_save`.

    First completes the instruction of a pending I/O exit (`PendingVcpuExit`
    if that produced another exit, which the caller must handle before
    retrying). Then, as Firecracker orders it: MP state first, because
    KVM_GET_MP_STATE makes the LAPIC accept pending INIT/SIPI events, which
    may change the rest; the LAPIC (which KVM_GET_LAPIC may update too)
    before the MSRs; vCPU events last, as the other GETs may still change
    what is pending. Other vCPUs must be paused: KVM_GET_VCPU_EVENTS is not
    consistent while they run.
    """
    if len(msr_indices) > MAX_SAVED_MSRS:
        raise VcpuSaveFailed(f"{len(msr_indices)} MSRs asked for, at most {MAX_SAVED_MSRS}")
    _complete_pending_io(fd)
    mp_state = _get("KVM_GET_MP_STATE", fd, fd.get_mp_state)
    regs = _get("KVM_GET_REGS", fd, fd.get_regs)
    sregs = _get("KVM_GET_SREGS", fd, fd.get_sregs)
    xsave = _get("KVM_GET_XSAVE2", fd, fd.get_xsave2)
    xcrs = _get("KVM_GET_XCRS", fd, fd.get_xcrs)
    debugregs = _get("KVM_GET_DEBUGREGS", fd, fd.get_debugregs)
    lapic = _get("KVM_GET_LAPIC", fd, fd.get_lapic)
    try:
        tsc_khz: int | None = fd.get_tsc_khz() or None
    except KvmError:
        tsc_khz = None  # restorable on this host only; KVM_SET_TSC_KHZ is then never needed
    cpuid = _get("KVM_GET_CPUID2", fd, fd.get_cpuid2)
    saved_msrs = _read_msrs(fd, msr_indices)
    events = _get("KVM_GET_VCPU_EVENTS", fd, fd.get_vcpu_events)
    try:
        return VcpuKvmState(
            regs=bytes(regs), sregs=bytes(sregs), xsave=xsave, xcrs=xcrs, debugregs=debugregs,
            lapic=lapic, mp_state=mp_state, vcpu_events=events,
            cpuid=tuple(tuple(getattr(e, f) for f in _CPUID_FIELDS) for e in cpuid),  # type: ignore[misc]
            msrs=saved_msrs, tsc_khz=tsc_khz,
        )
    except InvalidVcpuState as exc:
        raise VcpuSaveFailed(f"vCPU {fd.id}: KVM returned unexpected state: {exc.detail}") from exc


def _msr_write_batches(state: VcpuKvmState) -> list[list[tuple[int, int]]]:
    """The saved MSRs as KVM_SET_MSRS batches: deferred MSRs (TSC deadline) last, on their own.

    A TSC deadline of 0 with the LVT timer in TSC-deadline mode is written as
    the saved TSC instead, an already-passed deadline: the timer interrupt
    fires once on resume. Firecracker found vCPUs whose deadline read 0 at
    snapshot time although the interrupt was never delivered, so they never
    got a timer tick again after restore; a spurious tick costs a tickless
    guest nothing. (Outside TSC-deadline mode KVM ignores the write.)
    """
    regular = [m for m in state.msrs if m[0] not in _DEFERRED_MSRS]
    deferred = [m for m in state.msrs if m[0] in _DEFERRED_MSRS]
    tsc = state.msr(msrs.MSR_IA32_TSC)
    lvtt_mode = (apic.get_reg(state.lapic, apic.APIC_LVTT) & _LVTT_MODE_MASK) >> _LVTT_MODE_SHIFT
    if tsc is not None and lvtt_mode == _LVTT_MODE_TSC_DEADLINE:
        deferred = [(i, tsc if i == msrs.MSR_IA32_TSC_DEADLINE and v == 0 else v) for i, v in deferred]
    batches = [regular[i:i + kb.KVM_MAX_MSR_ENTRIES] for i in range(0, len(regular), kb.KVM_MAX_MSR_ENTRIES)]
    if deferred:
        batches.append(deferred)
    return batches


def _set(step: str, fd: VcpuFd, fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except KvmError as exc:
        raise VcpuRestoreFailed(f"vCPU {fd.id}: {step}: {exc.strerror or exc}") from exc


def _set_tsc_khz(fd: VcpuFd, saved_khz: int | None) -> None:
    if saved_khz is None:
        return
    try:
        host_khz: int | None = fd.get_tsc_khz()
    except KvmError:
        host_khz = None
    if host_khz is not None and abs(host_khz - saved_khz) * 1_000_000 <= saved_khz * TSC_KHZ_TOLERANCE_PPM:
        return
    try:
        fd.set_tsc_khz(saved_khz)
    except KvmError as exc:
        # Without TSC scaling KVM can only run a guest TSC faster than the host's (by catching up).
        host = f"{host_khz} kHz" if host_khz is not None else "unknown"
        raise TscFrequencyMismatch(f"the snapshot's TSC runs at {saved_khz} kHz, this host's at {host}; "
                                   f"KVM_SET_TSC_KHZ: {exc.strerror or exc}") from exc


def restore_vcpu(fd: VcpuFd, state: VcpuKvmState) -> None:
    """Load `state` into a new, never-run vCPU of a restored VM (on the vCPU's thread).

    Order (KVM documentation and Firecracker's restore_state): the TSC
    frequency before anything reads the TSC; CPUID first of the rest, since
    KVM checks MSRs, XCR0 and the XSAVE image against it; MP state; regs
    before vCPU events, because KVM_SET_REGS clears pending exceptions that
    KVM_SET_VCPU_EVENTS restores; sregs (with APIC_BASE) before the LAPIC;
    the LAPIC before the MSRs, since the TSC-deadline MSR only takes when
    the LAPIC timer is in TSC-deadline mode; IA32_TSC before the deadline;
    vCPU events last; then KVM_KVMCLOCK_CTRL so a kvmclock guest's watchdog
    knows it was stopped.
    """
    _set_tsc_khz(fd, state.tsc_khz)
    cpuid = [kb.kvm_cpuid_entry2(**dict(zip(_CPUID_FIELDS, e))) for e in state.cpuid]
    _set("KVM_SET_CPUID2", fd, fd.set_cpuid2, cpuid)
    _set("KVM_SET_MP_STATE", fd, fd.set_mp_state, state.mp_state)
    # SAFETY: from_buffer_copy copies into fresh structures; a VcpuKvmState's
    # blobs have exactly the KVM structure sizes (checked in __post_init__), and
    # the fd methods pass structures of the ioctl's encoded size.
    _set("KVM_SET_REGS", fd, fd.set_regs, kb.kvm_regs.from_buffer_copy(state.regs))
    _set("KVM_SET_SREGS", fd, fd.set_sregs, kb.kvm_sregs.from_buffer_copy(state.sregs))
    _set("KVM_SET_XSAVE", fd, fd.set_xsave2, state.xsave)
    _set("KVM_SET_XCRS", fd, fd.set_xcrs, state.xcrs)
    _set("KVM_SET_DEBUGREGS", fd, fd.set_debugregs, state.debugregs)
    _set("KVM_SET_LAPIC", fd, fd.set_lapic, state.lapic)
    for batch in _msr_write_batches(state):
        try:
            n = fd.set_msrs(batch)
        except KvmError as exc:
            raise VcpuRestoreFailed(f"vCPU {fd.id}: KVM_SET_MSRS: {exc.strerror or exc}") from exc
        if n < len(batch):
            index, value = batch[n]
            raise MsrNotWritten(f"vCPU {fd.id}: MSR {_msr_name(index)} = {value:#x}")
    _set("KVM_SET_VCPU_EVENTS", fd, fd.set_vcpu_events, state.vcpu_events)
    try:
        fd.kvmclock_ctrl()
    except KvmError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: the guest has not enabled kvmclock
            raise VcpuRestoreFailed(f"vCPU {fd.id}: KVM_KVMCLOCK_CTRL: {exc.strerror or exc}") from exc


# --- VM state ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class VmKvmState:
    """The VM's in-kernel devices: both 8259 PICs, the IOAPIC, the PIT, and kvmclock.

    The chip and PIT blobs are KVM's structures (the 512-byte kvm_irqchip
    union, struct kvm_pit_state2). `clock` is kvmclock in nanoseconds at
    save time; `clock_flags` what KVM_GET_CLOCK reported with it (kept for
    the record: a restore never passes them back, see the module docstring);
    `realtime` the host's CLOCK_REALTIME in nanoseconds at that moment
    (KVM's own reading where it reports KVM_CLOCK_REALTIME, else the VMM's,
    taken right after KVM_GET_CLOCK).
    """

    pic_master: bytes
    pic_slave: bytes
    ioapic: bytes
    pit2: bytes
    clock: int
    clock_flags: int
    realtime: int

    _TREE_FIELDS = ("pic_master", "pic_slave", "ioapic", "pit2", "clock", "clock_flags", "realtime")

    def __post_init__(self) -> None:
        err = InvalidVmState
        for name in ("pic_master", "pic_slave", "ioapic"):
            _blob(getattr(self, name), name, _IRQCHIP_SIZE, err)
        _blob(self.pit2, "pit2", _PIT2_SIZE, err)
        _uint(self.clock, "clock", _U64, err)
        _uint(self.clock_flags, "clock_flags", _U32, err)
        _uint(self.realtime, "realtime", _U64, err)

    def to_tree(self) -> dict[str, Any]:
        """The plain tree (dict/int/bytes) `snapshot.format` stores."""
        return {name: getattr(self, name) for name in self._TREE_FIELDS}

    @classmethod
    def from_tree(cls, tree: Any) -> "VmKvmState":
        """Rebuild from an untrusted tree; `InvalidVmState` names the first thing wrong."""
        t = _fields(tree, cls, cls._TREE_FIELDS, InvalidVmState)
        return cls(**{name: t[name] for name in cls._TREE_FIELDS})

    def __repr__(self) -> str:
        return f"<VmKvmState clock={self.clock / 1e9:.3f}s flags={self.clock_flags:#x}>"


def save_vm(fd: VmFd) -> VmKvmState:
    """Read the irqchip, PIT and kvmclock of a VM whose vCPUs are all paused."""
    try:
        pit2 = fd.get_pit2()
        clock = fd.get_clock()
        realtime = clock.realtime if clock.flags & kb.KVM_CLOCK_REALTIME else time.time_ns()
        pic_master = fd.get_irqchip(kb.KVM_IRQCHIP_PIC_MASTER)
        pic_slave = fd.get_irqchip(kb.KVM_IRQCHIP_PIC_SLAVE)
        ioapic = fd.get_irqchip(kb.KVM_IRQCHIP_IOAPIC)
    except KvmError as exc:
        raise VmSaveFailed(exc.strerror or str(exc)) from exc
    return VmKvmState(pic_master=pic_master, pic_slave=pic_slave, ioapic=ioapic, pit2=pit2,
                      clock=clock.clock, clock_flags=clock.flags, realtime=realtime)


def restore_vm(fd: VmFd, state: VmKvmState, *, clock_realtime: bool = False) -> None:
    """Load `state` into a new VM that has its irqchip and PIT.

    kvmclock is set to the saved value, with no flags (older kernels refuse
    every flag). With `clock_realtime` the host wall time elapsed since the
    save is added first: what KVM_CLOCK_REALTIME does, computed here so that
    it works on hosts whose KVM does not report KVM_CLOCK_REALTIME (those
    without a TSC-based clocksource, such as kvm_pvm ones).
    """
    clock = state.clock
    if clock_realtime:
        clock = min(clock + max(0, time.time_ns() - state.realtime), _U64)
    steps = (
        ("KVM_SET_PIT2", lambda: fd.set_pit2(state.pit2)),
        ("KVM_SET_CLOCK", lambda: fd.set_clock(clock, 0)),
        ("KVM_SET_IRQCHIP (PIC master)", lambda: fd.set_irqchip(kb.KVM_IRQCHIP_PIC_MASTER, state.pic_master)),
        ("KVM_SET_IRQCHIP (PIC slave)", lambda: fd.set_irqchip(kb.KVM_IRQCHIP_PIC_SLAVE, state.pic_slave)),
        ("KVM_SET_IRQCHIP (IOAPIC)", lambda: fd.set_irqchip(kb.KVM_IRQCHIP_IOAPIC, state.ioapic)),
    )
    for step, fn in steps:
        try:
            fn()
        except KvmError as exc:
            raise VmRestoreFailed(f"{step}: {exc.strerror or exc}") from exc

"""Save and restore of KVM vCPU and VM state (vmm.vstate.persist) on the real /dev/kvm."""

from __future__ import annotations

import dataclasses
import struct
import time

import pytest

from snapshot.format import decode_state, encode_state
from vmm.arch.x86_64 import lapic as apic
from vmm.arch.x86_64 import msr
from vmm.kvm import Kvm, exits
from vmm.kvm import bindings as kb
from vmm.vstate.persist import (
    MAX_SAVED_MSRS,
    InvalidVcpuState,
    InvalidVmState,
    MsrNotRead,
    MsrNotWritten,
    VcpuKvmState,
    VmKvmState,
    VstatePersistError,
    _msr_write_batches,
    restore_vcpu,
    restore_vm,
    save_vcpu,
    save_vm,
)

from tests.unit.vstate.conftest import NewVm, configure_like_builder

# Values a fresh vCPU never has, all accepted by KVM from the VMM.
MSR_VALUES = {
    msr.MSR_STAR: 0x0023_0010_0000_0000,
    msr.MSR_LSTAR: 0xFFFF_FFFF_81A0_0000,
    msr.MSR_CSTAR: 0xFFFF_FFFF_81A0_0100,
    msr.MSR_SYSCALL_MASK: 0x47700,
    msr.MSR_KERNEL_GS_BASE: 0xFFFF_8880_0000_0000,
    msr.MSR_IA32_SYSENTER_CS: 0x10,
    msr.MSR_IA32_SYSENTER_ESP: 0x7000,
    msr.MSR_IA32_SYSENTER_EIP: 0xFFFF_FFFF_81A0_0200,
    msr.MSR_IA32_CR_PAT: 0x0407_0506_0007_0106,
    msr.MSR_KVM_SYSTEM_TIME_NEW: 0x2001,  # kvmclock on, its pvclock page at 0x2000
    msr.MSR_MTRR_PHYSBASE0: 0x6,
}
LVTT_TSC_DEADLINE = 0b10 << 17
# The XSAVE area's legacy region and header (SDM Vol. 1 §13.4, Table 10-2).
XSAVE_FCW, XSAVE_MXCSR, XSAVE_XMM, XSAVE_XSTATE_BV = 0, 24, 160, 512


def _custom_vcpu(kvm: Kvm, new_vm: NewVm):
    """A vCPU configured as for boot, then given non-default state in every part."""
    vm, fd = new_vm()
    configure_like_builder(kvm, fd)
    regs = fd.get_regs()
    for i, (name, _) in enumerate(kb.kvm_regs._fields_[:16]):
        setattr(regs, name, 0x1111_0000_0000_0000 * (i % 15 + 1) + i)
    regs.rip, regs.rflags = 0x1234, 0x246
    fd.set_regs(regs)
    sregs = fd.get_sregs()
    sregs.gdt.base, sregs.gdt.limit = 0x500, 0x27
    sregs.idt.base, sregs.idt.limit = 0x600, 0xFF
    sregs.es.selector, sregs.es.base = 0x10, 0x100
    sregs.cr2 = 0xDEAD000
    fd.set_sregs(sregs)
    # x87/SSE state through the XSAVE image: KVM_SET_FPU leaves XSTATE_BV alone,
    # so on an XSAVE host neither KVM_GET_XSAVE nor the guest sees it.
    xsave = bytearray(fd.get_xsave2())
    struct.pack_into("<H", xsave, XSAVE_FCW, 0x27F)
    struct.pack_into("<I", xsave, XSAVE_MXCSR, 0x3F80)
    xsave[XSAVE_XMM + 3 * 16:XSAVE_XMM + 4 * 16] = bytes(range(16))
    struct.pack_into("<Q", xsave, XSAVE_XSTATE_BV, struct.unpack_from("<Q", xsave, XSAVE_XSTATE_BV)[0] | 0b11)
    fd.set_xsave2(bytes(xsave))
    assert fd.set_msrs(list(MSR_VALUES.items())) == len(MSR_VALUES)
    image = fd.get_lapic()
    for reg, value in ((apic.APIC_TASKPRI, 0x20), (apic.APIC_SPIV, 0x1FF), (apic.APIC_LVTT, 0x100EC),
                       (apic.APIC_LVTERR, 0x100FE), (apic.APIC_TDCR, 0xB)):
        image = apic.set_reg(image, reg, value)
    fd.set_lapic(image)
    dbg = kb.kvm_debugregs.from_buffer_copy(fd.get_debugregs())
    dbg.db[0], dbg.db[1], dbg.dr7 = 0x1000, 0x2000, 0x405
    fd.set_debugregs(bytes(dbg))
    events = bytearray(fd.get_vcpu_events())
    events[14] = 1  # nmi.masked
    fd.set_vcpu_events(bytes(events))
    fd.set_mp_state(kb.KVM_MP_STATE_HALTED)
    return vm, fd


def _without_tsc(tree: dict) -> dict:
    return {**tree, "msrs": [m for m in tree["msrs"] if m[0] != msr.MSR_IA32_TSC]}


# --- the MSR list -------------------------------------------------------------------------


def test_msrs_to_save_has_what_linux_needs(kvm: Kvm, msr_indices: list[int]) -> None:
    listed = set(kvm.get_msr_index_list())
    must = {msr.MSR_IA32_TSC, msr.MSR_IA32_SYSENTER_CS, msr.MSR_IA32_SYSENTER_ESP, msr.MSR_IA32_SYSENTER_EIP,
            msr.MSR_STAR, msr.MSR_LSTAR, msr.MSR_SYSCALL_MASK, msr.MSR_KERNEL_GS_BASE, msr.MSR_IA32_CR_PAT,
            msr.MSR_MTRRdefType, msr.MSR_MTRR_PHYSBASE0}
    for pv in (msr.MSR_IA32_MISC_ENABLE, msr.MSR_IA32_TSC_DEADLINE, msr.MSR_KVM_SYSTEM_TIME_NEW,
               msr.MSR_KVM_WALL_CLOCK_NEW, msr.MSR_KVM_ASYNC_PF_EN, msr.MSR_KVM_STEAL_TIME, msr.MSR_KVM_PV_EOI_EN):
        if pv in listed:
            must.add(pv)
    assert must <= set(msr_indices)
    assert len(set(msr_indices)) == len(msr_indices)
    assert msr.MSR_IA32_MCG_CTL not in msr_indices  # listed by KVM, refused without MCG_CAP.CTL_P
    if msr.MSR_IA32_TSC_DEADLINE in msr_indices:
        assert msr_indices[-1] == msr.MSR_IA32_TSC_DEADLINE


def test_save_names_an_msr_kvm_refuses(new_vm: NewVm, msr_indices: list[int]) -> None:
    _, fd = new_vm()
    with pytest.raises(MsrNotRead, match="0xdeadbeef"):
        save_vcpu(fd, [msr.MSR_LSTAR, 0xDEADBEEF, msr.MSR_STAR])


# --- vCPU round trip ------------------------------------------------------------------------


def test_vcpu_state_survives_restore_into_another_vm(kvm: Kvm, new_vm: NewVm, msr_indices: list[int]) -> None:
    _, fd_a = _custom_vcpu(kvm, new_vm)
    saved = save_vcpu(fd_a, msr_indices)
    assert saved.mp_state == kb.KVM_MP_STATE_HALTED
    for index, value in MSR_VALUES.items():
        assert saved.msr(index) == value, hex(index)

    _, fd_b = new_vm()
    restore_vcpu(fd_b, saved)
    again = save_vcpu(fd_b, msr_indices)

    # Everything comes back bit for bit except the TSC, which kept counting
    # from its restored value while the test ran (KVM derives it from the
    # host TSC): later than saved, by less than a second.
    assert _without_tsc(again.to_tree()) == _without_tsc(saved.to_tree())
    ticks = again.msr(msr.MSR_IA32_TSC) - saved.msr(msr.MSR_IA32_TSC)
    assert 0 <= ticks < (saved.tsc_khz or 10_000_000) * 1000

    # And KVM's other views of the same state agree.
    fpu = fd_b.get_fpu()  # KVM_GET_FPU does not report MXCSR
    assert (fpu.fcw, bytes(fpu.xmm[3])) == (0x27F, bytes(range(16)))
    assert struct.unpack_from("<I", fd_b.get_xsave2(), XSAVE_MXCSR)[0] == 0x3F80
    regs = fd_b.get_regs()
    assert (regs.rip, regs.rflags, regs.rbx) == (0x1234, 0x246, 0x2222_0000_0000_0001)
    assert apic.get_reg(fd_b.get_lapic(), apic.APIC_TASKPRI) == 0x20
    assert kb.kvm_debugregs.from_buffer_copy(fd_b.get_debugregs()).db[1] == 0x2000
    assert fd_b.get_sregs().cr2 == 0xDEAD000


def test_vcpu_tree_survives_the_state_file(kvm: Kvm, new_vm: NewVm, msr_indices: list[int]) -> None:
    _, fd = _custom_vcpu(kvm, new_vm)
    saved = save_vcpu(fd, msr_indices)
    tree = decode_state(encode_state({"vcpus": [saved.to_tree()]}))["vcpus"][0]
    assert VcpuKvmState.from_tree(tree) == saved


def test_restore_names_the_msr_kvm_refuses(kvm: Kvm, new_vm: NewVm, msr_indices: list[int]) -> None:
    _, fd_a = new_vm()
    configure_like_builder(kvm, fd_a)
    saved = save_vcpu(fd_a, msr_indices)
    bad = dataclasses.replace(saved, msrs=saved.msrs[:3] + ((0xDEADBEEF, 1),) + saved.msrs[3:])
    _, fd_b = new_vm()
    with pytest.raises(MsrNotWritten, match=r"MSR 0xdeadbeef = 0x1"):
        restore_vcpu(fd_b, bad)


def test_tsc_deadline_goes_last_and_a_lost_deadline_is_rearmed(kvm: Kvm, new_vm: NewVm,
                                                                msr_indices: list[int]) -> None:
    _, fd = new_vm()
    configure_like_builder(kvm, fd)
    saved = save_vcpu(fd, msr_indices)
    tsc = saved.msr(msr.MSR_IA32_TSC)
    state = dataclasses.replace(saved, msrs=((msr.MSR_IA32_TSC_DEADLINE, 0),) + tuple(
        m for m in saved.msrs if m[0] != msr.MSR_IA32_TSC_DEADLINE))
    batches = _msr_write_batches(state)
    assert batches[-1] == [(msr.MSR_IA32_TSC_DEADLINE, 0)]  # LVT timer not in TSC-deadline mode
    assert all(i != msr.MSR_IA32_TSC_DEADLINE for batch in batches[:-1] for i, _ in batch)

    deadline_lvtt = apic.set_reg(state.lapic, apic.APIC_LVTT, LVTT_TSC_DEADLINE | 0xEC)
    in_deadline_mode = dataclasses.replace(state, lapic=deadline_lvtt)
    assert _msr_write_batches(in_deadline_mode)[-1] == [(msr.MSR_IA32_TSC_DEADLINE, tsc)]
    armed = dataclasses.replace(in_deadline_mode, msrs=tuple(
        (i, 0x1234 if i == msr.MSR_IA32_TSC_DEADLINE else v) for i, v in in_deadline_mode.msrs))
    assert _msr_write_batches(armed)[-1] == [(msr.MSR_IA32_TSC_DEADLINE, 0x1234)]


# --- a running guest continues in another VM ------------------------------------------------

# Real mode at 0x1000: in al, 0x80; out 0x81, al; inc ebx; jmp 0x1000
LOOP_CODE = bytes([0xE4, 0x80, 0xE6, 0x81, 0x66, 0x43, 0xEB, 0xF8])
LOOP_ADDR = 0x1000
IN_PORT, OUT_PORT = 0x80, 0x81


def _start_loop(fd) -> None:
    sregs = fd.get_sregs()
    sregs.cs.base, sregs.cs.selector = 0, 0
    fd.set_sregs(sregs)
    regs = fd.get_regs()
    regs.rip, regs.rflags, regs.rax, regs.rbx = LOOP_ADDR, 0x2, 0, 0
    fd.set_regs(regs)


def _next_exit(fd) -> exits.VcpuExit:
    for _ in range(8):
        ex = fd.run()
        if not isinstance(ex, exits.Interrupted):
            return ex
    raise AssertionError("no exit after 8 KVM_RUNs")


def _echo(fd, value: int) -> None:
    """Answer the guest's IN with `value`, expect it echoed by OUT, run to the next IN."""
    fd.set_io_in_data(bytes([value]))
    assert _next_exit(fd) == exits.IoOut(OUT_PORT, 1, bytes([value]))
    assert _next_exit(fd) == exits.IoIn(IN_PORT, 1, 1)


def test_guest_continues_after_restore_into_another_vm(kvm: Kvm, new_vm: NewVm, msr_indices: list[int]) -> None:
    vm_a, fd_a = new_vm()
    configure_like_builder(kvm, fd_a)
    vm_a.memory.write(LOOP_ADDR, LOOP_CODE)
    _start_loop(fd_a)
    assert _next_exit(fd_a) == exits.IoIn(IN_PORT, 1, 1)
    for value in (1, 2, 3):
        _echo(fd_a, value)
    # Paused as the vCPU thread pauses: the 4th IN answered, KVM_RUN not yet
    # re-entered. save_vcpu completes the IN first (AL = 4, RIP past it): a
    # restored guest must not ask again, nor lose the value.
    fd_a.set_io_in_data(bytes([4]))
    vcpu_state = save_vcpu(fd_a, msr_indices)
    vm_state = save_vm(vm_a.fd)
    regs = kb.kvm_regs.from_buffer_copy(vcpu_state.regs)
    assert (regs.rax & 0xFF, regs.rbx & 0xFFFF, regs.rip) == (4, 3, LOOP_ADDR + 2)

    vm_b, fd_b = new_vm()
    vm_b.memory.write(0, vm_a.memory.read(0, 0x10000))
    restore_vm(vm_b.fd, VmKvmState.from_tree(decode_state(encode_state(vm_state.to_tree()))))
    restore_vcpu(fd_b, VcpuKvmState.from_tree(decode_state(encode_state(vcpu_state.to_tree()))))
    assert _next_exit(fd_b) == exits.IoOut(OUT_PORT, 1, bytes([4]))
    assert _next_exit(fd_b) == exits.IoIn(IN_PORT, 1, 1)
    _echo(fd_b, 5)
    assert fd_b.get_regs().rbx & 0xFFFF == 5
    # The original runs on, undisturbed.
    assert _next_exit(fd_a) == exits.IoOut(OUT_PORT, 1, bytes([4]))


# --- VM state --------------------------------------------------------------------------------

# struct kvm_pit_state2: three 24-byte kvm_pit_channel_state, count at +0,
# count_load_time (host ktime, reset by KVM_SET_PIT2) at +16.
_PIT_CHANNEL = 24
_PIT_LOAD_TIME = 16
# struct kvm_ioapic_state: redirection table (u64 entries) at +24; kvm_pic_state: imr at +2.
_IOAPIC_REDIRTBL = 24
_PIC_IMR = 2


def _pit_without_load_times(pit2: bytes) -> bytes:
    out = bytearray(pit2)
    for ch in range(3):
        at = ch * _PIT_CHANNEL + _PIT_LOAD_TIME
        out[at:at + 8] = bytes(8)
    return bytes(out)


def test_vm_state_survives_restore_into_another_vm(new_vm: NewVm) -> None:
    vm_a, _ = new_vm()
    fd = vm_a.fd
    pic = bytearray(fd.get_irqchip(kb.KVM_IRQCHIP_PIC_MASTER))
    pic[_PIC_IMR] = 0xFA
    fd.set_irqchip(kb.KVM_IRQCHIP_PIC_MASTER, bytes(pic))
    ioapic = bytearray(fd.get_irqchip(kb.KVM_IRQCHIP_IOAPIC))
    struct.pack_into("<Q", ioapic, _IOAPIC_REDIRTBL + 8 * 5, 0x0100_0000_0001_0035)  # masked, vector 0x35
    fd.set_irqchip(kb.KVM_IRQCHIP_IOAPIC, bytes(ioapic))
    pit = bytearray(fd.get_pit2())
    for ch, count in enumerate((0x1234, 0x10000, 0x2345)):
        struct.pack_into("<I", pit, ch * _PIT_CHANNEL, count)
    fd.set_pit2(bytes(pit))
    ten_seconds = 10_000_000_000
    fd.set_clock(ten_seconds)

    saved = save_vm(fd)
    assert saved.clock >= ten_seconds
    vm_b, _ = new_vm()
    restore_vm(vm_b.fd, saved)
    again = save_vm(vm_b.fd)

    assert (again.pic_master, again.pic_slave, again.ioapic) == (saved.pic_master, saved.pic_slave, saved.ioapic)
    assert again.pic_master[_PIC_IMR] == 0xFA
    assert _pit_without_load_times(again.pit2) == _pit_without_load_times(saved.pit2)
    assert struct.unpack_from("<I", again.pit2, 0)[0] == 0x1234
    # kvmclock continues from the saved value: no jump to VM B's own clock
    # (milliseconds since it was created) nor to the host's.
    assert saved.clock <= again.clock < saved.clock + 1_000_000_000


def test_clock_realtime_adds_the_time_since_the_save(new_vm: NewVm) -> None:
    vm_a, _ = new_vm()
    vm_a.fd.set_clock(10_000_000_000)
    saved = save_vm(vm_a.fd)
    assert abs(saved.realtime - time.time_ns()) < 1_000_000_000
    five_seconds_ago = dataclasses.replace(saved, realtime=saved.realtime - 5_000_000_000)
    vm_b, _ = new_vm()
    restore_vm(vm_b.fd, five_seconds_ago, clock_realtime=True)
    clock = vm_b.fd.get_clock().clock
    assert saved.clock + 5_000_000_000 <= clock < saved.clock + 6_000_000_000


def test_vm_tree_survives_the_state_file(new_vm: NewVm) -> None:
    vm, _ = new_vm()
    saved = save_vm(vm.fd)
    assert VmKvmState.from_tree(decode_state(encode_state(saved.to_tree()))) == saved


# --- untrusted trees ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_vcpu_tree(kvm: Kvm, msr_indices: list[int]) -> dict:
    vm = kvm.create_vm()
    vm.create_irq_chip()
    fd = vm.create_vcpu(0)
    try:
        fd.set_cpuid2(kvm.get_supported_cpuid())
        return save_vcpu(fd, msr_indices).to_tree()
    finally:
        fd.close()
        vm.close()


def _set(key, value):
    return lambda t: {**t, key: value}


VCPU_BREAKAGE = [
    ("not a dict", lambda t: [t], "must be an object"),
    ("missing", lambda t: {k: v for k, v in t.items() if k != "lapic"}, "missing field 'lapic'"),
    ("unknown", _set("fpu", b""), "unknown field 'fpu'"),
    ("short regs", lambda t: {**t, "regs": t["regs"][:-1]}, "regs is 143 bytes, the KVM structure is 144"),
    ("long lapic", lambda t: {**t, "lapic": t["lapic"] + b"\0"}, "lapic is 1025 bytes"),
    ("str blob", lambda t: {**t, "sregs": t["sregs"].hex()}, "sregs must be bytes, got str"),
    ("short xsave", lambda t: {**t, "xsave": t["xsave"][:4092]}, "xsave is 4092 bytes"),
    ("huge xsave", _set("xsave", bytes(1 << 20)), "xsave is 1048576 bytes"),
    ("bool mp_state", _set("mp_state", True), "mp_state must be an integer, got bool"),
    ("bad mp_state", _set("mp_state", 7), "mp_state 7 is not an x86 multiprocessing state"),
    ("msrs not list", _set("msrs", {"16": 0}), "msrs must be a list"),
    ("too many msrs", _set("msrs", [[i, 0] for i in range(MAX_SAVED_MSRS + 1)]), "at most 1024"),
    ("msr index too big", _set("msrs", [[1 << 32, 0]]), "msrs[0] index = 4294967296 is out of range"),
    ("negative msr value", _set("msrs", [[msr.MSR_LSTAR, -1]]), r"msrs[0] value (0xc0000082 (MSR_LSTAR))"),
    ("msr value str", _set("msrs", [[msr.MSR_LSTAR, "0"]]), "must be an integer, got str"),
    ("duplicate msr", _set("msrs", [[0x10, 1], [0x10, 2]]), "appears twice"),
    ("msr triple", _set("msrs", [[0x10, 1, 2]]), "msrs[0] has 3 entries"),
    ("cpuid short entry", _set("cpuid", [[0, 0, 0, 0, 0, 0]]), "cpuid[0] must be (function"),
    ("too many cpuid", _set("cpuid", [[i, 0, 0, 0, 0, 0, 0] for i in range(257)]), "at most 256"),
    ("cpuid bytes", _set("cpuid", [[0, 0, 0, b"", 0, 0, 0]]), "cpuid[0].eax must be an integer"),
    ("zero tsc", _set("tsc_khz", 0), "tsc_khz must be positive"),
    ("float tsc", _set("tsc_khz", 2.5e6), "tsc_khz must be an integer, got float"),
]


@pytest.mark.parametrize("mutate,message", [(m, msg) for _, m, msg in VCPU_BREAKAGE],
                         ids=[name for name, _, _ in VCPU_BREAKAGE])
def test_vcpu_from_tree_refuses(good_vcpu_tree: dict, mutate, message: str) -> None:
    with pytest.raises(InvalidVcpuState) as info:
        VcpuKvmState.from_tree(mutate(good_vcpu_tree))
    assert message in str(info.value)
    assert str(info.value).startswith("Saved vCPU state is malformed: ")
    assert isinstance(info.value, VstatePersistError)


def test_vcpu_from_tree_accepts_a_larger_xsave_and_unknown_tsc(good_vcpu_tree: dict) -> None:
    state = VcpuKvmState.from_tree({**good_vcpu_tree, "xsave": bytes(11008), "tsc_khz": None})
    assert (len(state.xsave), state.tsc_khz) == (11008, None)


VM_BREAKAGE = [
    ("short pit", lambda t: {**t, "pit2": t["pit2"][:111]}, "pit2 is 111 bytes, the KVM structure is 112"),
    ("missing ioapic", lambda t: {k: v for k, v in t.items() if k != "ioapic"}, "missing field 'ioapic'"),
    ("negative clock", _set("clock", -1), "clock = -1 is out of range"),
    ("flags str", _set("clock_flags", "2"), "clock_flags must be an integer, got str"),
    ("realtime bool", _set("realtime", False), "realtime must be an integer, got bool"),
    ("pic list", _set("pic_master", [0] * 512), "pic_master must be bytes, got list"),
]


@pytest.mark.parametrize("mutate,message", [(m, msg) for _, m, msg in VM_BREAKAGE],
                         ids=[name for name, _, _ in VM_BREAKAGE])
def test_vm_from_tree_refuses(new_vm: NewVm, mutate, message: str) -> None:
    vm, _ = new_vm()
    with pytest.raises(InvalidVmState, match="^Saved VM state") as info:
        VmKvmState.from_tree(mutate(save_vm(vm.fd).to_tree()))
    assert message in str(info.value)


def test_reprs_are_one_line(good_vcpu_tree: dict, new_vm: NewVm) -> None:
    vm, _ = new_vm()
    vcpu = repr(VcpuKvmState.from_tree(good_vcpu_tree))
    assert vcpu.startswith("<VcpuKvmState rip=0xfff0 runnable apic_id=0 ") and "\n" not in vcpu
    assert repr(save_vm(vm.fd)).startswith("<VmKvmState clock=")

"""The KVM userspace ABI for x86_64: every ioctl number and structure, in one table.

Values and layouts are from the kernel's include/uapi/linux/kvm.h and
arch/x86/include/uapi/asm/kvm.h (Linux 6.1). Sizes are asserted at import time
so a layout mistake fails loudly instead of corrupting an ioctl argument.
"""

from __future__ import annotations

import ctypes
from ctypes import c_int32, c_uint8, c_uint16, c_uint32, c_uint64

# --- ioctl number encoding (include/uapi/asm-generic/ioctl.h) ---------------

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _iow(nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, nr, size)


def _ior(nr: int, size: int) -> int:
    return _ioc(_IOC_READ, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


# --- structures ------------------------------------------------------------


class kvm_regs(ctypes.Structure):
    _fields_ = [(n, c_uint64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class kvm_segment(ctypes.Structure):
    _fields_ = [
        ("base", c_uint64), ("limit", c_uint32), ("selector", c_uint16),
        ("type", c_uint8), ("present", c_uint8), ("dpl", c_uint8), ("db", c_uint8),
        ("s", c_uint8), ("l", c_uint8), ("g", c_uint8), ("avl", c_uint8),
        ("unusable", c_uint8), ("padding", c_uint8),
    ]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", c_uint64), ("limit", c_uint16), ("padding", c_uint16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(ctypes.Structure):
    _fields_ = [
        ("cs", kvm_segment), ("ds", kvm_segment), ("es", kvm_segment), ("fs", kvm_segment),
        ("gs", kvm_segment), ("ss", kvm_segment), ("tr", kvm_segment), ("ldt", kvm_segment),
        ("gdt", kvm_dtable), ("idt", kvm_dtable),
        ("cr0", c_uint64), ("cr2", c_uint64), ("cr3", c_uint64), ("cr4", c_uint64),
        ("cr8", c_uint64), ("efer", c_uint64), ("apic_base", c_uint64),
        ("interrupt_bitmap", c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_fpu(ctypes.Structure):
    _fields_ = [
        ("fpr", (c_uint8 * 16) * 8), ("fcw", c_uint16), ("fsw", c_uint16),
        ("ftwx", c_uint8), ("pad1", c_uint8), ("last_opcode", c_uint16),
        ("last_ip", c_uint64), ("last_dp", c_uint64), ("xmm", (c_uint8 * 16) * 16),
        ("mxcsr", c_uint32), ("pad2", c_uint32),
    ]


class kvm_msr_entry(ctypes.Structure):
    _fields_ = [("index", c_uint32), ("reserved", c_uint32), ("data", c_uint64)]


class kvm_msrs_header(ctypes.Structure):
    _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32)]


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [
        ("function", c_uint32), ("index", c_uint32), ("flags", c_uint32),
        ("eax", c_uint32), ("ebx", c_uint32), ("ecx", c_uint32), ("edx", c_uint32),
        ("padding", c_uint32 * 3),
    ]


class kvm_cpuid2_header(ctypes.Structure):
    _fields_ = [("nent", c_uint32), ("padding", c_uint32)]


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [
        ("slot", c_uint32), ("flags", c_uint32), ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64), ("userspace_addr", c_uint64),
    ]


class kvm_irq_level(ctypes.Structure):
    _fields_ = [("irq", c_uint32), ("level", c_uint32)]


class kvm_irqfd(ctypes.Structure):
    _fields_ = [("fd", c_uint32), ("gsi", c_uint32), ("flags", c_uint32),
                ("resamplefd", c_uint32), ("pad", c_uint8 * 16)]


class kvm_ioeventfd(ctypes.Structure):
    _fields_ = [("datamatch", c_uint64), ("addr", c_uint64), ("len", c_uint32),
                ("fd", c_int32), ("flags", c_uint32), ("pad", c_uint8 * 36)]


class kvm_pit_config(ctypes.Structure):
    _fields_ = [("flags", c_uint32), ("pad", c_uint32 * 15)]


class kvm_irqchip(ctypes.Structure):
    _fields_ = [("chip_id", c_uint32), ("pad", c_uint32), ("chip", c_uint8 * 512)]


class kvm_pit_state2(ctypes.Structure):
    _fields_ = [("data", c_uint8 * 112)]  # opaque: saved and restored whole


class kvm_clock_data(ctypes.Structure):
    _fields_ = [("clock", c_uint64), ("flags", c_uint32), ("pad0", c_uint32),
                ("realtime", c_uint64), ("host_tsc", c_uint64), ("pad", c_uint32 * 4)]


class kvm_lapic_state(ctypes.Structure):
    _fields_ = [("regs", c_uint8 * 1024)]


class kvm_vcpu_events(ctypes.Structure):
    _fields_ = [("data", c_uint8 * 64)]  # opaque: saved and restored whole


class kvm_debugregs(ctypes.Structure):
    _fields_ = [("db", c_uint64 * 4), ("dr6", c_uint64), ("dr7", c_uint64),
                ("flags", c_uint64), ("reserved", c_uint64 * 9)]


class kvm_xcr(ctypes.Structure):
    _fields_ = [("xcr", c_uint32), ("reserved", c_uint32), ("value", c_uint64)]


class kvm_xcrs(ctypes.Structure):
    _fields_ = [("nr_xcrs", c_uint32), ("flags", c_uint32), ("xcrs", kvm_xcr * 16),
                ("padding", c_uint64 * 16)]


class kvm_xsave(ctypes.Structure):
    _fields_ = [("region", c_uint32 * 1024)]  # 4096 bytes; KVM_GET_XSAVE2 may need more


class kvm_mp_state(ctypes.Structure):
    _fields_ = [("mp_state", c_uint32)]


class kvm_enable_cap(ctypes.Structure):
    _fields_ = [("cap", c_uint32), ("flags", c_uint32), ("args", c_uint64 * 4), ("pad", c_uint8 * 64)]


class kvm_dirty_log(ctypes.Structure):
    _fields_ = [("slot", c_uint32), ("padding1", c_uint32), ("dirty_bitmap", c_uint64)]


class kvm_msr_list_header(ctypes.Structure):
    _fields_ = [("nmsrs", c_uint32)]


# struct kvm_run: the fixed head, then a 256-byte union of per-exit data.
class kvm_run_io(ctypes.Structure):
    _fields_ = [("direction", c_uint8), ("size", c_uint8), ("port", c_uint16),
                ("count", c_uint32), ("data_offset", c_uint64)]


class kvm_run_mmio(ctypes.Structure):
    _fields_ = [("phys_addr", c_uint64), ("data", c_uint8 * 8), ("len", c_uint32), ("is_write", c_uint8)]


class kvm_run_fail_entry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", c_uint64), ("cpu", c_uint32)]


class kvm_run_internal(ctypes.Structure):
    _fields_ = [("suberror", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class kvm_run_system_event(ctypes.Structure):
    _fields_ = [("type", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class kvm_run_ex(ctypes.Structure):
    _fields_ = [("exception", c_uint32), ("error_code", c_uint32)]


class kvm_run_exit_union(ctypes.Union):
    _fields_ = [
        ("io", kvm_run_io), ("mmio", kvm_run_mmio), ("fail_entry", kvm_run_fail_entry),
        ("internal", kvm_run_internal), ("system_event", kvm_run_system_event),
        ("ex", kvm_run_ex), ("padding", c_uint8 * 256),
    ]


class kvm_run(ctypes.Structure):
    _fields_ = [
        ("request_interrupt_window", c_uint8), ("immediate_exit", c_uint8), ("padding1", c_uint8 * 6),
        ("exit_reason", c_uint32), ("ready_for_interrupt_injection", c_uint8), ("if_flag", c_uint8),
        ("flags", c_uint16), ("cr8", c_uint64), ("apic_base", c_uint64),
        ("u", kvm_run_exit_union),
    ]


for _t, _size in (
    (kvm_regs, 144), (kvm_sregs, 312), (kvm_fpu, 416), (kvm_segment, 24), (kvm_cpuid_entry2, 40),
    (kvm_userspace_memory_region, 32), (kvm_irqfd, 32), (kvm_ioeventfd, 64), (kvm_pit_config, 64),
    (kvm_irqchip, 520), (kvm_pit_state2, 112), (kvm_clock_data, 48), (kvm_lapic_state, 1024),
    (kvm_vcpu_events, 64), (kvm_debugregs, 128), (kvm_xcrs, 392), (kvm_xsave, 4096),
    (kvm_enable_cap, 104), (kvm_dirty_log, 16), (kvm_msr_entry, 16),
):
    assert ctypes.sizeof(_t) == _size, (_t.__name__, ctypes.sizeof(_t), _size)
assert kvm_run.u.offset == 32

# --- the ioctl table ---------------------------------------------------------

# system (/dev/kvm)
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, 4)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, 8)
# VM
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, 16)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, 32)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, 8)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, 8)
KVM_GET_IRQCHIP = _iowr(0x62, 520)
KVM_SET_IRQCHIP = _ior(0x63, 520)
KVM_IRQFD = _iow(0x76, 32)
KVM_CREATE_PIT2 = _iow(0x77, 64)
KVM_IOEVENTFD = _iow(0x79, 64)
KVM_SET_CLOCK = _iow(0x7B, 48)
KVM_GET_CLOCK = _ior(0x7C, 48)
KVM_GET_PIT2 = _ior(0x9F, 112)
KVM_SET_PIT2 = _iow(0xA0, 112)
KVM_ENABLE_CAP = _iow(0xA3, 104)
# vCPU
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, 144)
KVM_SET_REGS = _iow(0x82, 144)
KVM_GET_SREGS = _ior(0x83, 312)
KVM_SET_SREGS = _iow(0x84, 312)
KVM_GET_MSRS = _iowr(0x88, 8)
KVM_SET_MSRS = _iow(0x89, 8)
KVM_GET_FPU = _ior(0x8C, 416)
KVM_SET_FPU = _iow(0x8D, 416)
KVM_GET_LAPIC = _ior(0x8E, 1024)
KVM_SET_LAPIC = _iow(0x8F, 1024)
KVM_SET_CPUID2 = _iow(0x90, 8)
KVM_GET_CPUID2 = _iowr(0x91, 8)
KVM_GET_MP_STATE = _ior(0x98, 4)
KVM_SET_MP_STATE = _iow(0x99, 4)
KVM_GET_VCPU_EVENTS = _ior(0x9F, 64)
KVM_SET_VCPU_EVENTS = _iow(0xA0, 64)
KVM_GET_DEBUGREGS = _ior(0xA1, 128)
KVM_SET_DEBUGREGS = _iow(0xA2, 128)
KVM_GET_XSAVE = _ior(0xA4, 4096)
KVM_SET_XSAVE = _iow(0xA5, 4096)
KVM_GET_XCRS = _ior(0xA6, 392)
KVM_SET_XCRS = _iow(0xA7, 392)
KVM_KVMCLOCK_CTRL = _io(0xAD)
KVM_GET_TSC_KHZ = _io(0xA3)
KVM_SET_TSC_KHZ = _io(0xA2)
# KVM_GET_XSAVE2 is encoded with struct kvm_xsave's 4096 bytes, but KVM copies
# out the vCPU's whole XSAVE image: KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) bytes.
KVM_GET_XSAVE2 = _ior(0xCF, 4096)

# --- constants ---------------------------------------------------------------

KVM_API_VERSION = 12

# capabilities (KVM_CHECK_EXTENSION)
KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_PIT = 11
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_IRQ_INJECT_STATUS = 26
KVM_CAP_IOEVENTFD = 36
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_IRQFD = 32
KVM_CAP_PIT2 = 33
KVM_CAP_PIT_STATE2 = 35
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_DEBUGREGS = 50
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_TSC_CONTROL = 60
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_TSC_DEADLINE_TIMER = 72
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_XSAVE2 = 208

# KVM_RUN exit reasons
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

# irqchip ids for KVM_GET/SET_IRQCHIP
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2

KVM_PIT_SPEAKER_DUMMY = 1

# vCPU multiprocessing states
KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1

KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2

# struct kvm_clock_data flags (KVM_GET_CLOCK reports them; KVM_SET_CLOCK
# honours REALTIME and HOST_TSC since Linux 5.16 and refuses any flag before).
KVM_CLOCK_TSC_STABLE = 2
KVM_CLOCK_REALTIME = 1 << 2
KVM_CLOCK_HOST_TSC = 1 << 3

# arch/x86/include/uapi/asm/kvm.h: entries in struct kvm_xcrs.
KVM_MAX_XCRS = 16

KVM_MAX_CPUID_ENTRIES = 256
KVM_MAX_MSR_ENTRIES = 256

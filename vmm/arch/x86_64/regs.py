"""Boot-time vCPU register state: segments, GDT, identity page tables, sregs.

Primer. A vCPU enters a Linux kernel's 64-bit entry (boot.rst, "64-bit Boot
Protocol") already in long mode: paging on with an identity map covering
the kernel, boot_params and command line, a GDT with a 64-bit code segment
(selector 0x10 in Linux's own GDT, but any flat one works since the kernel
reloads its GDT at once), %rsi = boot_params. A PVH entry (Xen
docs/misc/pvh.pandoc) is in 32-bit protected mode with paging off, flat 4 GiB
segments, and %ebx = the hvm_start_info address.

KVM loads segment registers from the `kvm_sregs` we give it and never reads
the GDT for that; the GDT written to guest memory is for the guest, which
may reload a selector from it (Linux does `lgdt` early and reloads all).
Everything here writes guest memory or returns plain data; `vmm.kvm` turns
SpecialRegs/GeneralRegs into `kvm_sregs`/`kvm_regs`.

Page tables: Firecracker identity-maps only the first 1 GiB (regs.rs
setup_page_tables: one PD). Ember maps at least the first 4 GiB, and up to
the top of RAM (at most 16 GiB), with 2 MiB pages. A Linux kernel builds its
own tables straight away and needs just its image, but Ember's freestanding
test guests run on this map: they must reach all low RAM (3.25 GiB for a
3.5 GiB guest), the RAM above 4 GiB, and the MMIO gap (boot timer, virtio
windows, APIC) without building tables of their own.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from vmm.memory import GuestMemory, GuestMemoryError

from .layout import (
    APIC_ADDR,
    BOOT_GDT_MAX,
    BOOT_GDT_OFFSET,
    BOOT_IDT_OFFSET,
    BOOT_STACK_POINTER,
    FIRST_ADDR_PAST_32BITS,
    PAGE_SIZE,
    PDE_MAX_PAGES,
    PDE_START,
    PDPTE_START,
    PML4_START,
    PVH_INFO_START,
    ZERO_PAGE_START,
    ram_top,
)

__all__ = [
    "RegsError",
    "SegmentNotEncodable",
    "BootTablesOutsideMemory",
    "Segment",
    "DescriptorTable",
    "SpecialRegs",
    "GeneralRegs",
    "gdt_entry",
    "segment_from_gdt_entry",
    "boot_gdt_linux64",
    "boot_gdt_pvh",
    "identity_map_size",
    "setup_page_tables",
    "setup_long_mode",
    "setup_pvh_sregs",
    "boot_regs_linux64",
    "boot_regs_pvh",
    "X86_CR0_PE",
    "X86_CR0_ET",
    "X86_CR0_NW",
    "X86_CR0_CD",
    "X86_CR0_PG",
    "X86_CR4_PAE",
    "EFER_LME",
    "EFER_LMA",
    "APIC_BASE_BSP",
    "APIC_BASE_ENABLE",
    "BOOT_RFLAGS",
    "BOOT_FPU_FCW",
    "BOOT_FPU_MXCSR",
    "GDT_CODE_SELECTOR",
    "GDT_DATA_SELECTOR",
    "GDT_TSS_SELECTOR",
]

# Intel SDM Vol. 3A §2.5 "Control Registers".
X86_CR0_PE = 1 << 0
X86_CR0_ET = 1 << 4
X86_CR0_NW = 1 << 29
X86_CR0_CD = 1 << 30
X86_CR0_PG = 1 << 31
X86_CR4_PAE = 1 << 5
# Intel SDM Vol. 3A §2.2.1 "Extended Feature Enable Register".
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
# Intel SDM Vol. 3A §11.4.4 "Local APIC Status and Location" (IA32_APIC_BASE).
APIC_BASE_BSP = 1 << 8
APIC_BASE_ENABLE = 1 << 11
# RFLAGS bit 1 is reserved and always 1 (SDM Vol. 1 §3.4.3); IF stays clear.
BOOT_RFLAGS = 0x2
# FPU state at boot (SDM Vol. 1 §8.1.5 FNINIT control word, §10.2.3.1 MXCSR
# power-up value), as Firecracker's setup_fpu.
BOOT_FPU_FCW = 0x37F
BOOT_FPU_MXCSR = 0x1F80

# Selectors of the boot GDT: index * 8, TI = 0, RPL = 0.
GDT_CODE_SELECTOR = 1 * 8
GDT_DATA_SELECTOR = 2 * 8
GDT_TSS_SELECTOR = 3 * 8

# Intel SDM Vol. 3A §4.5, Tables 4-15/4-17: paging-structure entry bits.
_PTE_PRESENT = 1 << 0
_PTE_WRITABLE = 1 << 1
_PDE_PAGE_SIZE = 1 << 7
_PAGE_2M = 1 << 21
_GIB = 1 << 30
_ENTRIES_PER_TABLE = 512


class RegsError(Exception):
    """Boot register state could not be built."""


class SegmentNotEncodable(RegsError):
    """Segment cannot be written as a GDT descriptor."""


class BootTablesOutsideMemory(RegsError):
    """Boot GDT, IDT or page tables do not fit in guest memory."""


@dataclass(frozen=True)
class Segment:
    """A segment register as KVM holds it (struct kvm_segment).

    `limit` is the effective byte limit: with g=1 the descriptor's 20-bit
    limit counts 4 KiB units, so 0xfffff there is 0xffffffff here.
    """

    base: int = 0
    limit: int = 0
    selector: int = 0
    type: int = 0
    present: int = 0
    dpl: int = 0
    db: int = 0
    s: int = 0
    l: int = 0  # noqa: E741 - the architectural name of the long-mode bit
    g: int = 0
    avl: int = 0
    unusable: int = 0


@dataclass(frozen=True)
class DescriptorTable:
    """GDTR/IDTR: linear base and limit (size in bytes minus one)."""

    base: int = 0
    limit: int = 0


# The LDTR as KVM's vCPU reset leaves it (present, type 2 = LDT, limit
# 0xffff): VMX entry checks accept it, and no boot path uses an LDT.
_LDT_AT_RESET = Segment(limit=0xFFFF, type=2, present=1)


@dataclass(frozen=True)
class SpecialRegs:
    """The parts of struct kvm_sregs a boot path sets (interrupt_bitmap stays 0)."""

    cs: Segment
    ds: Segment
    es: Segment
    fs: Segment
    gs: Segment
    ss: Segment
    tr: Segment
    ldt: Segment = _LDT_AT_RESET
    gdt: DescriptorTable = field(default_factory=DescriptorTable)
    idt: DescriptorTable = field(default_factory=DescriptorTable)
    cr0: int = 0
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0


@dataclass(frozen=True)
class GeneralRegs:
    """struct kvm_regs."""

    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = BOOT_RFLAGS


# --- GDT descriptors (Intel SDM Vol. 3A §3.4.5, Figure 3-8) -------------------


def gdt_entry(seg: Segment) -> int:
    """Encode `seg` as a 64-bit segment descriptor (selector is not part of it).

    Bits: limit[15:0] 0-15, base[23:0] 16-39, type 40-43, S 44, DPL 45-46,
    P 47, limit[19:16] 48-51, AVL 52, L 53, D/B 54, G 55, base[31:24] 56-63.
    """
    if not 0 <= seg.base <= 0xFFFFFFFF:
        raise SegmentNotEncodable(f"base {seg.base:#x} is wider than 32 bits")
    if seg.g:
        if seg.limit & 0xFFF != 0xFFF or seg.limit > 0xFFFFFFFF:
            raise SegmentNotEncodable(f"limit {seg.limit:#x} is not a 4 KiB-granular limit")
        raw_limit = seg.limit >> 12
    else:
        if not 0 <= seg.limit <= 0xFFFFF:
            raise SegmentNotEncodable(f"byte-granular limit {seg.limit:#x} is wider than 20 bits")
        raw_limit = seg.limit
    for name, value, width in (
        ("type", seg.type, 4), ("present", seg.present, 1), ("dpl", seg.dpl, 2),
        ("db", seg.db, 1), ("s", seg.s, 1), ("l", seg.l, 1), ("g", seg.g, 1), ("avl", seg.avl, 1),
    ):
        if not 0 <= value < (1 << width):
            raise SegmentNotEncodable(f"{name}={value} does not fit in {width} bits")
    return (
        (raw_limit & 0xFFFF)
        | ((seg.base & 0xFFFFFF) << 16)
        | (seg.type << 40)
        | (seg.s << 44)
        | (seg.dpl << 45)
        | (seg.present << 47)
        | ((raw_limit >> 16) << 48)
        | (seg.avl << 52)
        | (seg.l << 53)
        | (seg.db << 54)
        | (seg.g << 55)
        | ((seg.base >> 24) << 56)
    )


def segment_from_gdt_entry(entry: int, index: int) -> Segment:
    """Decode the descriptor at GDT slot `index` into the segment KVM loads."""
    if not 0 <= entry < (1 << 64):
        raise SegmentNotEncodable(f"descriptor {entry:#x} is not a 64-bit value")
    g = (entry >> 55) & 1
    raw_limit = (entry & 0xFFFF) | (((entry >> 48) & 0xF) << 16)
    present = (entry >> 47) & 1
    return Segment(
        base=((entry >> 16) & 0xFFFFFF) | (((entry >> 56) & 0xFF) << 24),
        limit=(raw_limit << 12) | 0xFFF if g else raw_limit,
        selector=index * 8,
        type=(entry >> 40) & 0xF,
        present=present,
        dpl=(entry >> 45) & 3,
        db=(entry >> 54) & 1,
        s=(entry >> 44) & 1,
        l=(entry >> 53) & 1,
        g=g,
        avl=(entry >> 52) & 1,
        unusable=0 if present else 1,
    )


# Type fields (SDM Vol. 3A §3.4.5.1 Table 3-1, §3.5 Table 3-2): 0xb code
# execute/read accessed, 0x3 data read/write accessed, 0xb busy TSS (64-bit
# in long mode, 32-bit in protected mode; VM entry requires a busy TSS).
_CODE_TYPE = 0xB
_DATA_TYPE = 0x3
_TSS_BUSY_TYPE = 0xB
_FLAT_4G = 0xFFFFFFFF
_NULL = Segment()


def boot_gdt_linux64() -> tuple[Segment, ...]:
    """GDT for the 64-bit entry: null, 64-bit code 0x08, data 0x10, TSS 0x18."""
    return (
        _NULL,
        Segment(limit=_FLAT_4G, selector=GDT_CODE_SELECTOR, type=_CODE_TYPE, present=1, s=1, l=1, g=1),
        Segment(limit=_FLAT_4G, selector=GDT_DATA_SELECTOR, type=_DATA_TYPE, present=1, db=1, s=1, g=1),
        Segment(limit=_FLAT_4G, selector=GDT_TSS_SELECTOR, type=_TSS_BUSY_TYPE, present=1, g=1),
    )


def boot_gdt_pvh() -> tuple[Segment, ...]:
    """GDT for the PVH entry: null, flat 32-bit code 0x08 and data 0x10, TSS 0x18.

    pvh.pandoc: "cs: must be a 32-bit read/execute code segment with a base
    of 0 and a limit of 0xFFFFFFFF", "ds, es, ss: ... read/write data
    segment", "tr: must be a 32-bit TSS (active) with a base of '0' and a
    limit of '0x67'".
    """
    return (
        _NULL,
        Segment(limit=_FLAT_4G, selector=GDT_CODE_SELECTOR, type=_CODE_TYPE, present=1, db=1, s=1, g=1),
        Segment(limit=_FLAT_4G, selector=GDT_DATA_SELECTOR, type=_DATA_TYPE, present=1, db=1, s=1, g=1),
        Segment(limit=0x67, selector=GDT_TSS_SELECTOR, type=_TSS_BUSY_TYPE, present=1),
    )


def _write(mem: GuestMemory, gpa: int, data: bytes, what: str) -> None:
    try:
        mem.write(gpa, data)
    except GuestMemoryError as exc:
        raise BootTablesOutsideMemory(f"{what} at {gpa:#x}+{len(data):#x}") from exc


def _write_gdt_idt(mem: GuestMemory, gdt: tuple[Segment, ...]) -> tuple[DescriptorTable, DescriptorTable]:
    """Write `gdt` at BOOT_GDT_OFFSET and an empty one-entry IDT after it.

    In long mode the TSS descriptor is 16 bytes; its upper half (base[63:32],
    zero) falls on the IDT's first 8 bytes, which are zero too.
    """
    assert len(gdt) == BOOT_GDT_MAX
    raw = b"".join(struct.pack("<Q", gdt_entry(s)) for s in gdt)
    _write(mem, BOOT_GDT_OFFSET, raw, "boot GDT")
    _write(mem, BOOT_IDT_OFFSET, bytes(8), "boot IDT")
    return DescriptorTable(BOOT_GDT_OFFSET, len(raw) - 1), DescriptorTable(BOOT_IDT_OFFSET, 8 - 1)


def _apic_base(cpu_index: int) -> int:
    return APIC_ADDR | APIC_BASE_ENABLE | (APIC_BASE_BSP if cpu_index == 0 else 0)


# --- identity page tables (Intel SDM Vol. 3A §4.5 "4-Level Paging") ------------


def identity_map_size(mem_size: int) -> int:
    """Bytes identity-mapped for `mem_size` bytes of RAM: >= 4 GiB, <= 16 GiB."""
    top = ram_top(mem_size)
    gib = max(FIRST_ADDR_PAST_32BITS // _GIB, -(-top // _GIB))
    return min(gib, PDE_MAX_PAGES) * _GIB


def setup_page_tables(mem: GuestMemory, mem_size: int) -> int:
    """Write a PML4, a PDPT and PDs identity-mapping RAM with 2 MiB pages.

    Returns the CR3 value (PML4_START). Pages are present and writable,
    supervisor-only, write-back; the whole pages are written so no stale
    entry survives a reused memory.
    """
    n_pd = identity_map_size(mem_size) // _GIB
    pml4 = struct.pack("<Q", PDPTE_START | _PTE_PRESENT | _PTE_WRITABLE).ljust(PAGE_SIZE, b"\0")
    pdpt = b"".join(
        struct.pack("<Q", (PDE_START + i * PAGE_SIZE) | _PTE_PRESENT | _PTE_WRITABLE) for i in range(n_pd)
    ).ljust(PAGE_SIZE, b"\0")
    flags = _PTE_PRESENT | _PTE_WRITABLE | _PDE_PAGE_SIZE
    pds = struct.pack(
        f"<{n_pd * _ENTRIES_PER_TABLE}Q",
        *((i * _PAGE_2M) | flags for i in range(n_pd * _ENTRIES_PER_TABLE)),
    )
    _write(mem, PML4_START, pml4, "PML4")
    _write(mem, PDPTE_START, pdpt, "PDPT")
    _write(mem, PDE_START, pds, "page directories")
    return PML4_START


def setup_long_mode(mem: GuestMemory, mem_size: int, *, cpu_index: int = 0) -> SpecialRegs:
    """Boot GDT, IDT and identity map in `mem`; sregs for the 64-bit entry.

    CR0 = PE | ET | PG (CD and NW clear: caches on), CR4 = PAE,
    EFER = LME | LMA, CR3 = PML4_START. `cpu_index` 0 is the bootstrap
    processor (IA32_APIC_BASE.BSP). Writing again for another vCPU is
    harmless: the tables are identical.
    """
    gdt = boot_gdt_linux64()
    gdtr, idtr = _write_gdt_idt(mem, gdt)
    cr3 = setup_page_tables(mem, mem_size)
    code, data, tss = gdt[1], gdt[2], gdt[3]
    return SpecialRegs(
        cs=code, ds=data, es=data, fs=data, gs=data, ss=data, tr=tss,
        gdt=gdtr, idt=idtr,
        cr0=X86_CR0_PE | X86_CR0_ET | X86_CR0_PG,
        cr3=cr3,
        cr4=X86_CR4_PAE,
        efer=EFER_LME | EFER_LMA,
        apic_base=_apic_base(cpu_index),
    )


def setup_pvh_sregs(mem: GuestMemory, *, cpu_index: int = 0) -> SpecialRegs:
    """Boot GDT and IDT in `mem`; sregs for a PVH entry (pvh.pandoc).

    32-bit protected mode, paging off: CR0 = PE | ET, CR4 = 0, EFER = 0.
    """
    gdt = boot_gdt_pvh()
    gdtr, idtr = _write_gdt_idt(mem, gdt)
    code, data, tss = gdt[1], gdt[2], gdt[3]
    return SpecialRegs(
        cs=code, ds=data, es=data, fs=data, gs=data, ss=data, tr=tss,
        gdt=gdtr, idt=idtr,
        cr0=X86_CR0_PE | X86_CR0_ET,
        apic_base=_apic_base(cpu_index),
    )


def boot_regs_linux64(entry: int, boot_params: int = ZERO_PAGE_START) -> GeneralRegs:
    """General registers at the 64-bit entry: %rsi = boot_params, stack at 0x8ff0."""
    return GeneralRegs(
        rip=entry, rsp=BOOT_STACK_POINTER, rbp=BOOT_STACK_POINTER, rsi=boot_params, rflags=BOOT_RFLAGS,
    )


def boot_regs_pvh(entry: int, start_info: int = PVH_INFO_START) -> GeneralRegs:
    """General registers at the PVH entry: %ebx = hvm_start_info, IF clear."""
    return GeneralRegs(rip=entry, rbx=start_info, rflags=BOOT_RFLAGS)

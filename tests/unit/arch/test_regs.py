from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmm.arch.x86_64 import layout
from vmm.arch.x86_64.regs import (
    APIC_BASE_BSP,
    APIC_BASE_ENABLE,
    EFER_LMA,
    EFER_LME,
    X86_CR0_CD,
    X86_CR0_ET,
    X86_CR0_NW,
    X86_CR0_PE,
    X86_CR0_PG,
    X86_CR4_PAE,
    BootTablesOutsideMemory,
    GeneralRegs,
    Segment,
    SegmentNotEncodable,
    boot_gdt_linux64,
    boot_gdt_pvh,
    boot_regs_linux64,
    boot_regs_pvh,
    gdt_entry,
    identity_map_size,
    segment_from_gdt_entry,
    setup_long_mode,
    setup_pvh_sregs,
)
from vmm.memory import GuestMemory

GIB = 1 << 30


# --- GDT descriptors ----------------------------------------------------------------

def test_linux64_gdt_encodings_match_the_classic_values():
    # The descriptors every Linux-booting VMM writes (0xa09b/0xc093/0x808b
    # flags with limit 0xfffff, e.g. Firecracker's regs.rs test values).
    code, data, tss = (gdt_entry(s) for s in boot_gdt_linux64()[1:])
    assert code == 0x00AF9B000000FFFF
    assert data == 0x00CF93000000FFFF
    assert tss == 0x008F8B000000FFFF
    assert gdt_entry(boot_gdt_linux64()[0]) == 0


def test_pvh_gdt_encodings():
    code, data, tss = (gdt_entry(s) for s in boot_gdt_pvh()[1:])
    assert code == 0x00CF9B000000FFFF
    assert data == 0x00CF93000000FFFF
    assert tss == 0x00008B0000000067


def test_decode_known_descriptor():
    seg = segment_from_gdt_entry(0x00AF9B000000FFFF, 1)
    assert seg == Segment(base=0, limit=0xFFFFFFFF, selector=8, type=0xB, present=1, dpl=0, db=0, s=1,
                          l=1, g=1, avl=0, unusable=0)
    base = segment_from_gdt_entry(0x12CF93345678FFFF, 2)
    assert base.base == 0x12345678 and base.selector == 16
    assert segment_from_gdt_entry(0, 0).unusable == 1


@given(st.integers(min_value=0, max_value=(1 << 64) - 1), st.integers(min_value=0, max_value=8191))
def test_descriptor_round_trip(entry, index):
    seg = segment_from_gdt_entry(entry, index)
    assert seg.selector == index * 8
    assert gdt_entry(seg) == entry
    assert segment_from_gdt_entry(gdt_entry(seg), index) == seg


@pytest.mark.parametrize("seg", [
    Segment(base=1 << 32),
    Segment(limit=0x100000),                 # byte granular, > 20 bits
    Segment(limit=0x1000, g=1),              # not ...fff
    Segment(type=16),
    Segment(dpl=4),
])
def test_unencodable_segments(seg):
    with pytest.raises(SegmentNotEncodable):
        gdt_entry(seg)


# --- long mode ---------------------------------------------------------------------

def _walk(mem: GuestMemory, cr3: int, va: int) -> int | None:
    """Translate `va` through 4-level paging with 2 MiB / 1 GiB / 4 KiB pages."""
    addr_mask = ((1 << 52) - 1) & ~0xFFF
    pml4e = mem.read_u64(cr3 + ((va >> 39) & 511) * 8)
    if not pml4e & 1:
        return None
    pdpte = mem.read_u64((pml4e & addr_mask) + ((va >> 30) & 511) * 8)
    if not pdpte & 1:
        return None
    if pdpte & 0x80:
        return (pdpte & addr_mask & ~(GIB - 1)) | (va & (GIB - 1))
    pde = mem.read_u64((pdpte & addr_mask) + ((va >> 21) & 511) * 8)
    if not pde & 1:
        return None
    if pde & 0x80:
        return (pde & addr_mask & ~((1 << 21) - 1)) | (va & ((1 << 21) - 1))
    pte = mem.read_u64((pde & addr_mask) + ((va >> 12) & 511) * 8)
    return (pte & addr_mask) | (va & 0xFFF) if pte & 1 else None


def test_long_mode_sregs(mem16):
    sregs = setup_long_mode(mem16, 16 << 20)
    assert sregs.cr0 & (X86_CR0_PE | X86_CR0_PG | X86_CR0_ET) == X86_CR0_PE | X86_CR0_PG | X86_CR0_ET
    assert not sregs.cr0 & (X86_CR0_CD | X86_CR0_NW)
    assert sregs.cr4 & X86_CR4_PAE
    assert sregs.efer & (EFER_LME | EFER_LMA) == EFER_LME | EFER_LMA
    assert sregs.cr3 == layout.PML4_START
    assert sregs.cs.l == 1 and sregs.cs.db == 0 and sregs.cs.selector == 0x08
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        assert seg.selector == 0x10 and seg.type == 3 and seg.present == 1 and seg.limit == 0xFFFFFFFF
    assert sregs.tr.selector == 0x18 and sregs.tr.type == 0xB and sregs.tr.s == 0
    assert sregs.gdt.base == layout.BOOT_GDT_OFFSET and sregs.gdt.limit == 31
    assert sregs.idt.base == layout.BOOT_IDT_OFFSET and sregs.idt.limit == 7
    assert sregs.apic_base == layout.APIC_ADDR | APIC_BASE_ENABLE | APIC_BASE_BSP
    assert setup_long_mode(mem16, 16 << 20, cpu_index=1).apic_base == layout.APIC_ADDR | APIC_BASE_ENABLE
    # The GDT in memory decodes to the segments KVM is told to load.
    for seg in (sregs.cs, sregs.ds, sregs.tr):
        idx = seg.selector // 8
        raw = mem16.read_u64(layout.BOOT_GDT_OFFSET + idx * 8)
        assert segment_from_gdt_entry(raw, idx) == seg
    assert mem16.read_u64(layout.BOOT_GDT_OFFSET) == 0
    assert mem16.read_u64(layout.BOOT_IDT_OFFSET) == 0


def test_identity_map_covers_4_gib_with_2_mib_pages(mem16):
    sregs = setup_long_mode(mem16, 16 << 20)
    assert mem16.read_u64(layout.PML4_START) == layout.PDPTE_START | 3
    assert mem16.read_u64(layout.PDPTE_START) == layout.PDE_START | 3
    assert mem16.read_u64(layout.PDE_START + 8) == (1 << 21) | 0x83
    for va in (0, 0x1234, layout.HIMEM_START + 0x42, (16 << 20) - 1, GIB + 5, layout.MMIO_MEM_START,
               layout.BOOT_TIMER_ADDR + 0x10, layout.IOAPIC_ADDR, layout.APIC_ADDR + 0x300, (4 * GIB) - 1):
        assert _walk(mem16, sregs.cr3, va) == va
    assert _walk(mem16, sregs.cr3, 4 * GIB) is None  # nothing past 4 GiB for a small guest
    assert mem16.read_u64(layout.PDPTE_START + 4 * 8) == 0
    assert identity_map_size(16 << 20) == 4 * GIB


def test_identity_map_reaches_ram_above_the_gap():
    size = 3 * GIB + GIB // 2
    regions = layout.arch_memory_regions(size)
    mem = GuestMemory.anonymous(regions)  # MAP_NORESERVE: only touched pages cost memory
    try:
        sregs = setup_long_mode(mem, size)
        assert identity_map_size(size) == 5 * GIB
        for va in (layout.MMIO_MEM_START - 1, 4 * GIB, 4 * GIB + GIB // 4 - 1):
            assert _walk(mem, sregs.cr3, va) == va
        assert _walk(mem, sregs.cr3, 5 * GIB) is None
    finally:
        mem.close()


def test_identity_map_is_capped():
    assert identity_map_size(64 * GIB) == layout.PDE_MAX_PAGES * GIB


def test_rewriting_clears_stale_entries(mem16):
    mem16.write_u64(layout.PML4_START + 8 * 7, 0xDEAD003)
    mem16.write_u64(layout.PDPTE_START + 8 * 9, 0xBEEF003)
    setup_long_mode(mem16, 16 << 20)
    assert mem16.read_u64(layout.PML4_START + 8 * 7) == 0
    assert mem16.read_u64(layout.PDPTE_START + 8 * 9) == 0


def test_tables_outside_memory():
    tiny = GuestMemory.anonymous([(0, 0x4000)])
    try:
        with pytest.raises(BootTablesOutsideMemory):
            setup_long_mode(tiny, 16 << 20)
    finally:
        tiny.close()


# --- PVH -----------------------------------------------------------------------------

def test_pvh_sregs(mem16):
    sregs = setup_pvh_sregs(mem16)
    assert sregs.cr0 == X86_CR0_PE | X86_CR0_ET
    assert sregs.cr4 == 0 and sregs.efer == 0 and sregs.cr3 == 0
    assert sregs.cs.db == 1 and sregs.cs.l == 0 and sregs.cs.base == 0 and sregs.cs.limit == 0xFFFFFFFF
    for seg in (sregs.ds, sregs.es, sregs.ss):
        assert seg.db == 1 and seg.base == 0 and seg.limit == 0xFFFFFFFF and seg.type == 3
    assert sregs.tr.limit == 0x67 and sregs.tr.base == 0 and sregs.tr.g == 0 and sregs.tr.type == 0xB
    assert mem16.read_u64(layout.BOOT_GDT_OFFSET + 8) == 0x00CF9B000000FFFF


# --- general registers ----------------------------------------------------------------

def test_boot_regs_linux64():
    regs = boot_regs_linux64(0x1000000)
    assert regs == GeneralRegs(rip=0x1000000, rsp=0x8FF0, rbp=0x8FF0, rsi=layout.ZERO_PAGE_START, rflags=2)


def test_boot_regs_pvh():
    regs = boot_regs_pvh(0x1000A00)
    assert regs.rip == 0x1000A00 and regs.rbx == layout.PVH_INFO_START and regs.rflags == 2
    assert regs.rsp == 0 and regs.rsi == 0


def test_boot_stack_is_below_the_page_tables():
    assert layout.ZERO_PAGE_START + 4096 <= layout.BOOT_STACK_POINTER < layout.PML4_START

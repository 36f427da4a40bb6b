from __future__ import annotations

import pytest

from vmm.arch.x86_64 import layout
from vmm.arch.x86_64.layout import (
    FIRST_ADDR_PAST_32BITS,
    MMIO_MEM_START,
    GuestMemoryTooSmall,
    GuestMemoryUnaligned,
    NoMmioSlotLeft,
    arch_memory_regions,
    ram_top,
    virtio_mmio_slot,
)

GIB = 1 << 30
MIB = 1 << 20


def test_small_guest_is_one_region():
    assert arch_memory_regions(128 * MIB) == [(0, 128 * MIB)]


def test_exactly_up_to_the_gap_is_one_region():
    assert arch_memory_regions(MMIO_MEM_START) == [(0, MMIO_MEM_START)]


def test_3_5_gib_splits_around_the_mmio_gap():
    regions = arch_memory_regions(3 * GIB + GIB // 2)
    assert regions == [(0, 3 * GIB + GIB // 4), (4 * GIB, GIB // 4)]
    assert sum(size for _, size in regions) == 3 * GIB + GIB // 2
    assert ram_top(3 * GIB + GIB // 2) == 4 * GIB + GIB // 4


def test_gap_constants():
    assert MMIO_MEM_START == 0xD0000000 == 13 * GIB // 4
    assert FIRST_ADDR_PAST_32BITS == 4 * GIB
    assert layout.MMIO_MEM_SIZE == 3 * GIB // 4
    for addr in (layout.IOAPIC_ADDR, layout.APIC_ADDR, layout.KVM_TSS_ADDRESS,
                 layout.KVM_IDENTITY_MAP_ADDRESS, layout.BOOT_TIMER_ADDR):
        assert MMIO_MEM_START <= addr < FIRST_ADDR_PAST_32BITS
    # KVM's identity map takes one page and its TSS three, above the APIC page.
    assert layout.APIC_ADDR + 0x1000 <= layout.KVM_IDENTITY_MAP_ADDRESS
    assert layout.KVM_IDENTITY_MAP_ADDRESS + 0x1000 <= layout.KVM_TSS_ADDRESS
    assert layout.KVM_TSS_ADDRESS + 3 * 0x1000 <= FIRST_ADDR_PAST_32BITS


def test_low_memory_structures_do_not_overlap():
    spans = {
        "gdt": (layout.BOOT_GDT_OFFSET, 8 * layout.BOOT_GDT_MAX),
        "idt": (layout.BOOT_IDT_OFFSET, 8),
        "pvh_info": (layout.PVH_INFO_START, 56),
        "modlist": (layout.MODLIST_START, 32 * layout.MODLIST_MAX),
        "memmap": (layout.MEMMAP_START, 24 * layout.MEMMAP_MAX),
        "zero_page": (layout.ZERO_PAGE_START, 4096),
        "stack": (layout.BOOT_STACK_POINTER - 0x100, 0x100),
        "pml4": (layout.PML4_START, 4096),
        "pdpt": (layout.PDPTE_START, 4096),
        "pds": (layout.PDE_START, 4096 * layout.PDE_MAX_PAGES),
        "cmdline": (layout.CMDLINE_START, layout.CMDLINE_MAX_SIZE),
    }
    items = sorted(spans.items(), key=lambda kv: kv[1][0])
    for (na, (a, la)), (nb, (b, _)) in zip(items, items[1:]):
        assert a + la <= b, f"{na} overlaps {nb}"
    assert layout.CMDLINE_START + layout.CMDLINE_MAX_SIZE <= layout.EBDA_START
    assert layout.EBDA_START < layout.RSDP_ADDR < layout.ACPI_TABLES_END == layout.HIMEM_START
    assert layout.RSDP_ADDR % 16 == 0


@pytest.mark.parametrize("size,exc", [
    (0, GuestMemoryTooSmall),
    (MIB, GuestMemoryTooSmall),
    (128 * MIB + 1, GuestMemoryUnaligned),
])
def test_bad_sizes(size, exc):
    with pytest.raises(exc):
        arch_memory_regions(size)


def test_virtio_slots_follow_the_boot_timer():
    first = virtio_mmio_slot(0)
    assert first.addr == MMIO_MEM_START + 0x1000 and first.len == 0x1000 and first.irq == 5
    assert layout.BOOT_TIMER_ADDR == MMIO_MEM_START
    last = virtio_mmio_slot(layout.IRQ_MAX - layout.IRQ_BASE)
    assert last.irq == 23 and last.addr == MMIO_MEM_START + 0x1000 * 19
    irqs = {virtio_mmio_slot(i).irq for i in range(19)}
    assert not irqs & {layout.COM1_IRQ, layout.I8042_IRQ}
    with pytest.raises(NoMmioSlotLeft):
        virtio_mmio_slot(19)
    with pytest.raises(NoMmioSlotLeft):
        virtio_mmio_slot(-1)

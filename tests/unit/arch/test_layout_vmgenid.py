"""Where the VM generation ID lives and which line the GED uses: out of the
guest's RAM, clear of every other boot structure and interrupt line."""

from __future__ import annotations

from vmm.arch.x86_64 import layout
from vmm.arch.x86_64.acpi import build_acpi_tables
from vmm.arch.x86_64.bootparams import E820_RAM, E820_RESERVED, e820_map
from vmm.arch.x86_64.mptable import mptable_size

MIB = 1 << 20


def test_vmgenid_is_in_e820_reserved_memory():
    for mem in (128 * MIB, 4 << 30):
        entries = e820_map(layout.arch_memory_regions(mem))
        start, end = layout.VMGENID_ADDR, layout.VMGENID_ADDR + layout.VMGENID_LEN
        holding = [e for e in entries if e.addr <= start and end <= e.end]
        assert [e.type for e in holding] == [E820_RESERVED]
        assert not any(e.type == E820_RAM and e.addr < end and start < e.end for e in entries)


def test_vmgenid_is_backed_by_the_first_ram_region():
    gpa, size = layout.arch_memory_regions(2 * MIB)[0]
    assert gpa <= layout.VMGENID_ADDR and layout.VMGENID_ADDR + layout.VMGENID_LEN <= gpa + size


def test_vmgenid_clears_the_mp_table_and_the_acpi_tables():
    assert layout.EBDA_START + mptable_size(layout.MAX_VCPUS) <= layout.VMGENID_ADDR
    assert layout.VMGENID_ADDR + layout.VMGENID_LEN <= layout.RSDP_ADDR
    tables = build_acpi_tables(2, [])
    assert all(addr >= layout.VMGENID_ADDR + layout.VMGENID_LEN for addr, _ in tables.tables)


def test_vmgenid_alignment():
    assert layout.VMGENID_LEN == 16
    assert layout.VMGENID_ADDR % 8 == 0
    # Not where Linux's option-ROM probe looks for a 0x55AA header (every 2 KiB).
    assert layout.VMGENID_ADDR % 2048 != 0


def test_ged_irq_collides_with_no_other_line():
    virtio = set(range(layout.IRQ_BASE, layout.IRQ_MAX + 1))
    assert layout.GED_IRQ not in virtio
    assert layout.GED_IRQ not in {layout.COM1_IRQ, layout.I8042_IRQ, 0, 2}   # 0: PIT, 2: PIC cascade
    assert 0 <= layout.GED_IRQ <= layout.IRQ_MAX                              # an IOAPIC pin

"""The x86_64 guest physical address map Ember gives every microVM.

Primer. The low megabyte keeps the PC layout Linux expects: real-mode IVT
and BIOS data area at 0, boot structures Ember writes below 0x20000 (GDT,
IDT, zero page, boot stack, identity page tables, PVH start info), the
command line at 0x20000, the Extended BIOS Data Area from 0x9fc00 (the MP
table lives there) and the BIOS area 0xe0000..0x100000 (ACPI tables). The
kernel loads at 1 MiB. RAM runs up to the 32-bit MMIO gap at 3.25 GiB;
whatever does not fit below it continues at 4 GiB. The gap holds the boot
timer, the virtio-mmio windows (4 KiB each), KVM's TSS / identity-map pages,
the IOAPIC and the local APIC.

    0x0000_0500  boot GDT (4 entries)        0x0000_0520  boot IDT (1 entry)
    0x0000_6000  PVH hvm_start_info          0x0000_6040  PVH module list
    0x0000_6100  PVH memory map              0x0000_7000  zero page (boot_params)
    0x0000_8ff0  boot stack pointer          0x0000_9000  PML4
    0x0000_a000  PDPT                        0x0000_b000  PDs (one per GiB mapped)
    0x0002_0000  kernel command line         0x0009_fc00  EBDA: MP table
    0x000d_fff0  VMGenID generation ID       0x000e_0000  RSDP, then ACPI tables
    0x0010_0000  kernel (HIMEM_START)
    0xd000_0000  boot timer                  0xd000_1000  virtio-mmio windows ...
    0xfec0_0000  IOAPIC                      0xfee0_0000  local APIC
    0xfffb_c000  KVM identity map page       0xfffb_d000  KVM TSS (3 pages)
    0x1_0000_0000  RAM above the gap

Constants keep Firecracker's names (src/vmm/src/arch/x86_64/layout.rs and
regs.rs) where it has them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "LayoutError",
    "GuestMemoryTooSmall",
    "GuestMemoryUnaligned",
    "NoMmioSlotLeft",
    "PAGE_SIZE",
    "BOOT_GDT_OFFSET",
    "BOOT_IDT_OFFSET",
    "BOOT_GDT_MAX",
    "PVH_INFO_START",
    "MODLIST_START",
    "MODLIST_MAX",
    "MEMMAP_START",
    "MEMMAP_MAX",
    "ZERO_PAGE_START",
    "BOOT_STACK_POINTER",
    "PML4_START",
    "PDPTE_START",
    "PDE_START",
    "PDE_MAX_PAGES",
    "CMDLINE_START",
    "CMDLINE_MAX_SIZE",
    "EBDA_START",
    "SYSTEM_MEM_START",
    "RSDP_ADDR",
    "ACPI_TABLES_END",
    "VMGENID_ADDR",
    "VMGENID_LEN",
    "HIMEM_START",
    "MMIO_MEM_START",
    "MMIO_MEM_SIZE",
    "FIRST_ADDR_PAST_32BITS",
    "IOAPIC_ADDR",
    "APIC_ADDR",
    "KVM_TSS_ADDRESS",
    "KVM_IDENTITY_MAP_ADDRESS",
    "BOOT_TIMER_ADDR",
    "BOOT_TIMER_SIZE",
    "MMIO_LEN",
    "VIRTIO_MMIO_START",
    "IRQ_BASE",
    "IRQ_MAX",
    "I8042_IRQ",
    "COM1_IRQ",
    "GED_IRQ",
    "COM1_PORT",
    "COM1_PORT_LEN",
    "I8042_DATA_PORT",
    "I8042_COMMAND_PORT",
    "MAX_VCPUS",
    "MmioSlot",
    "arch_memory_regions",
    "ram_top",
    "virtio_mmio_slot",
]

PAGE_SIZE = 0x1000

# --- low memory: boot structures (Firecracker arch/x86_64/regs.rs, layout.rs) --

# Boot GDT and IDT; the GDT has 4 entries (null, code, data, TSS), so it ends
# exactly where the IDT begins.
BOOT_GDT_OFFSET = 0x500
BOOT_IDT_OFFSET = 0x520
BOOT_GDT_MAX = 4

# PVH boot (xen/include/public/arch-x86/hvm/start_info.h): hvm_start_info is
# 56 bytes; the module list (32-byte hvm_modlist_entry) follows it, then the
# memory map (24-byte hvm_memmap_table_entry). Firecracker puts the memory map
# at 0x7000, on top of the (unused for PVH) zero page; Ember keeps it apart so
# both boot structures can coexist: 0x6100 + 128 * 24 = 0x6d00 < 0x7000.
PVH_INFO_START = 0x6000
MODLIST_START = 0x6040
MODLIST_MAX = (0x6100 - MODLIST_START) // 32
MEMMAP_START = 0x6100
MEMMAP_MAX = 128

# Linux boot protocol: the zero page (struct boot_params, 4 KiB) and the
# initial stack of the 64-bit entry (Documentation/x86/boot.rst, "64-bit Boot
# Protocol": %rsi holds the boot_params address).
ZERO_PAGE_START = 0x7000
BOOT_STACK_POINTER = 0x8FF0

# Identity-map page tables for the 64-bit entry: PML4, one PDPT, and one PD
# per GiB mapped with 2 MiB pages. PDs may run from 0xb000 up to 0x1b000
# (16 GiB), well below the command line at 0x20000.
PML4_START = 0x9000
PDPTE_START = 0xA000
PDE_START = 0xB000
PDE_MAX_PAGES = 16

# Kernel command line. CMDLINE_MAX_SIZE includes the NUL: Linux copies at most
# COMMAND_LINE_SIZE = 2048 bytes (arch/x86/include/asm/setup.h; head64.c
# copy_bootdata), so a longer line would be cut silently. Firecracker uses the
# same limit (layout.rs CMDLINE_MAX_SIZE).
CMDLINE_START = 0x20000
CMDLINE_MAX_SIZE = 2048

# Extended BIOS Data Area: Linux scans 639 KiB..640 KiB for the MP floating
# pointer (arch/x86/kernel/mpparse.c, find_smp_config). E820 marks
# [EBDA_START, HIMEM_START) reserved. Firecracker: SYSTEM_MEM_START.
EBDA_START = 0x9FC00
SYSTEM_MEM_START = EBDA_START

# ACPI 6.5 §5.2.5.1: on IA-PC the RSDP may sit on a 16-byte boundary in the
# BIOS read-only area 0xe0000..0xfffff, where Linux also scans for it. The
# tables Ember writes follow it, all below ACPI_TABLES_END.
RSDP_ADDR = 0xE0000
ACPI_TABLES_END = 0x100000

# The VM Generation ID (Microsoft "Virtual Machine Generation ID" spec;
# Linux drivers/virt/vmgenid.c): 16 bytes of guest memory the guest maps
# (memremap) and re-reads when notified. They sit in the E820-reserved span
# [EBDA_START, HIMEM_START), so the guest never allocates them: the last 16
# bytes of the option-ROM area, just below the RSDP, as Firecracker places
# it (end of its system memory). Not on a 2 KiB boundary, so Linux's option
# ROM probe (arch/x86/kernel/probe_roms.c, 0x55AA signatures every 2 KiB in
# 0xc0000..0xe0000) never reads a random ID as a ROM header; and above the
# end of the largest MP table (0x9fc00 + 5364 bytes for 254 vCPUs).
VMGENID_LEN = 16
VMGENID_ADDR = RSDP_ADDR - VMGENID_LEN

# Where the kernel is loaded (boot.rst: protected-mode kernel at 0x100000).
HIMEM_START = 0x100000

# --- the 32-bit MMIO gap -------------------------------------------------------

# RAM stops at 3.25 GiB; [MMIO_MEM_START, 4 GiB) is device space.
MMIO_MEM_START = 0xD0000000
FIRST_ADDR_PAST_32BITS = 1 << 32
MMIO_MEM_SIZE = FIRST_ADDR_PAST_32BITS - MMIO_MEM_START

# arch/x86/include/asm/apicdef.h: IO_APIC_DEFAULT_PHYS_BASE, APIC_DEFAULT_PHYS_BASE.
IOAPIC_ADDR = 0xFEC00000
APIC_ADDR = 0xFEE00000

# KVM_SET_TSS_ADDR needs three pages and KVM_SET_IDENTITY_MAP_ADDR one page of
# guest physical space that is not RAM (Documentation/virt/kvm/api.rst); both
# sit just below the 4 GiB BIOS area, inside the gap (Firecracker layout.rs).
KVM_TSS_ADDRESS = 0xFFFBD000
KVM_IDENTITY_MAP_ADDRESS = 0xFFFBC000

# Each MMIO device gets a 4 KiB window: the boot timer first, then virtio.
MMIO_LEN = 0x1000
BOOT_TIMER_ADDR = MMIO_MEM_START
BOOT_TIMER_SIZE = MMIO_LEN
VIRTIO_MMIO_START = MMIO_MEM_START + MMIO_LEN

# --- legacy I/O and interrupt lines --------------------------------------------

# Firecracker GSI_LEGACY_START/END: virtio devices take IOAPIC pins 5..23
# (KVM's in-kernel IOAPIC has 24 pins; 0 = PIT, 1 = i8042, 4 = COM1 stay
# with the legacy devices).
IRQ_BASE = 5
IRQ_MAX = 23
I8042_IRQ = 1
COM1_IRQ = 4
# The ACPI Generic Event Device (ACPI 6.5 §5.6.9) that tells the guest its
# VM generation ID changed: ISA IRQ 3 (COM2's, and Ember has no COM2), so it
# never collides with the virtio lines 5..23 whatever the device count.
# Edge-triggered, active high, like every Ember line (irqfd pulses it).
GED_IRQ = 3
COM1_PORT = 0x3F8
COM1_PORT_LEN = 8
I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64

# xAPIC IDs are 8 bits and the IOAPIC needs one: at most 254 vCPUs can be
# described by the MP table, MADT (type 0 entries) and CPUID leaf 1.
MAX_VCPUS = 254


class LayoutError(ValueError):
    """Invalid guest memory layout request."""


class GuestMemoryTooSmall(LayoutError):
    """Guest memory must be larger than the 1 MiB of boot structures."""


class GuestMemoryUnaligned(LayoutError):
    """Guest memory size must be a multiple of 4 KiB."""


class NoMmioSlotLeft(LayoutError):
    """No interrupt line left for another virtio-mmio device (IRQs 5..23)."""


def arch_memory_regions(mem_size_bytes: int) -> list[tuple[int, int]]:
    """Guest RAM regions `(gpa, size)` for `mem_size_bytes` of memory.

    RAM fills [0, MMIO_MEM_START); the rest continues at 4 GiB, so a 3.5 GiB
    guest gets [0, 3.25 GiB) and [4 GiB, 4.25 GiB).
    """
    if mem_size_bytes % PAGE_SIZE:
        raise GuestMemoryUnaligned(f"{mem_size_bytes:#x}")
    if mem_size_bytes <= HIMEM_START:
        raise GuestMemoryTooSmall(f"{mem_size_bytes:#x} bytes")
    if mem_size_bytes <= MMIO_MEM_START:
        return [(0, mem_size_bytes)]
    return [(0, MMIO_MEM_START), (FIRST_ADDR_PAST_32BITS, mem_size_bytes - MMIO_MEM_START)]


def ram_top(mem_size_bytes: int) -> int:
    """First guest physical address past the highest RAM byte."""
    gpa, size = arch_memory_regions(mem_size_bytes)[-1]
    return gpa + size


@dataclass(frozen=True)
class MmioSlot:
    """Where virtio-mmio device number `index` lives and which IRQ it raises."""

    index: int
    addr: int
    len: int
    irq: int


def virtio_mmio_slot(index: int) -> MmioSlot:
    """The MMIO window and IRQ of the `index`-th virtio-mmio device (from 0)."""
    if index < 0:
        raise NoMmioSlotLeft(f"negative device index {index}")
    irq = IRQ_BASE + index
    if irq > IRQ_MAX:
        raise NoMmioSlotLeft(f"device index {index} would need IRQ {irq}")
    return MmioSlot(index, VIRTIO_MMIO_START + index * MMIO_LEN, MMIO_LEN, irq)

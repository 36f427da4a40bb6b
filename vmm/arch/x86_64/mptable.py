"""Intel MultiProcessor Specification 1.4 table, for guests booted `acpi=off`.

Primer. Before ACPI, firmware described CPUs and interrupt wiring with an MP
table: a 16-byte floating pointer structure ("_MP_") that the OS finds by
scanning the first KiB of the EBDA, the last KiB of base memory or the BIOS
ROM (MP spec §4; Linux arch/x86/kernel/mpparse.c find_smp_config scans
639 KiB..640 KiB, where Ember puts it), pointing at a configuration table
("PCMP") of entries: one per processor, the ISA bus, the IOAPIC, one I/O
interrupt assignment per IRQ line, and the local interrupts of virtual-wire
mode (LINT0 = ExtINT, LINT1 = NMI). Both structures carry a byte checksum
that makes all their bytes sum to 0 mod 256. A guest with ACPI ignores this
table and reads the MADT; Ember writes both.

Structure layouts: MP spec 1.4 §4.1 (floating pointer, Figure 4-2 / Table
4-1), §4.2 (header, Table 4-2), §4.3 (entries, Tables 4-4 to 4-12); Linux
arch/x86/include/asm/mpspec_def.h.
"""

from __future__ import annotations

import struct

from vmm.memory import GuestMemory, GuestMemoryError

from .layout import EBDA_START, IOAPIC_ADDR, APIC_ADDR, IRQ_MAX, MAX_VCPUS, RSDP_ADDR

__all__ = [
    "MptableError",
    "TooManyCpus",
    "MptableOutsideMemory",
    "SMP_MAGIC_IDENT",
    "MPC_SIGNATURE",
    "MP_PROCESSOR",
    "MP_BUS",
    "MP_IOAPIC",
    "MP_INTSRC",
    "MP_LINTSRC",
    "MPF_INTEL_SIZE",
    "MPC_TABLE_SIZE",
    "mptable_size",
    "build_mptable",
    "setup_mptable",
]

SMP_MAGIC_IDENT = b"_MP_"
MPC_SIGNATURE = b"PCMP"
MPC_SPEC = 4                 # MP spec revision 1.4
MPC_OEM = b"EMBER   "
MPC_PRODUCT_ID = b"MICROVM     "
# Entry types (MP spec Table 4-3).
MP_PROCESSOR = 0
MP_BUS = 1
MP_IOAPIC = 2
MP_INTSRC = 3
MP_LINTSRC = 4
# Processor entry (Table 4-5): CPU flags and the feature words of CPUID 1.
CPU_ENABLED = 1 << 0
CPU_BOOTPROCESSOR = 1 << 1
CPU_SIGNATURE = 0x600        # family 6, model 0, stepping 0 (as Firecracker)
CPU_FEATURE_FPU = 1 << 0
CPU_FEATURE_APIC = 1 << 9
# KVM's in-kernel models: lapic.c APIC_VERSION 0x14 (xAPIC), ioapic.h
# IOAPIC_VERSION_ID 0x11.
APIC_VERSION = 0x14
IOAPIC_VERSION = 0x11
MPC_APIC_USABLE = 1 << 0
BUS_TYPE_ISA = b"ISA   "
# Interrupt types (Table 4-11) and "conforms to bus" polarity/trigger (0):
# on ISA that is edge-triggered, active high.
MP_INT = 0
MP_NMI = 1
MP_EXTINT = 3
MP_IRQPOL_DEFAULT = 0
MP_APIC_ALL = 0xFF

MPF_INTEL_SIZE = 16
MPC_TABLE_SIZE = 44
_CPU_SIZE = 20
_ENTRY_SIZE = 8


class MptableError(Exception):
    """MP table could not be built."""


class TooManyCpus(MptableError):
    """MP table describes 1 to 254 vCPUs (8-bit APIC IDs, one for the IOAPIC)."""


class MptableOutsideMemory(MptableError):
    """MP table does not fit in guest memory below the ACPI area."""


def _checksum(data: bytes) -> int:
    """The byte that makes `data` plus it sum to 0 mod 256."""
    return (-sum(data)) & 0xFF


def mptable_size(cpu_count: int) -> int:
    """Bytes of floating pointer plus configuration table for `cpu_count` vCPUs."""
    n_irqs = IRQ_MAX + 1
    return MPF_INTEL_SIZE + MPC_TABLE_SIZE + _CPU_SIZE * cpu_count + _ENTRY_SIZE * (2 + n_irqs + 2)


def build_mptable(cpu_count: int, addr: int = EBDA_START) -> bytes:
    """The floating pointer at `addr` followed by the configuration table.

    The IOAPIC gets ID `cpu_count` (the first one no vCPU uses). Interrupt
    assignments cover IRQs 0..IRQ_MAX (23), each to the IOAPIC pin of the
    same number: KVM's default routing (kvm_setup_default_irq_routing) wires
    GSI n to IOAPIC pin n, and virtio devices use IRQs 5..23, beyond ISA's
    0..15. They are listed on the ISA bus, with the bus's default polarity.
    """
    if not 1 <= cpu_count <= MAX_VCPUS:
        raise TooManyCpus(f"cpu_count={cpu_count}")
    ioapic_id = cpu_count
    entries: list[bytes] = []
    for cpu in range(cpu_count):
        flags = CPU_ENABLED | (CPU_BOOTPROCESSOR if cpu == 0 else 0)
        entries.append(struct.pack(
            "<BBBBII8x", MP_PROCESSOR, cpu, APIC_VERSION, flags, CPU_SIGNATURE,
            CPU_FEATURE_FPU | CPU_FEATURE_APIC,
        ))
    entries.append(struct.pack("<BB6s", MP_BUS, 0, BUS_TYPE_ISA))
    entries.append(struct.pack("<BBBBI", MP_IOAPIC, ioapic_id, IOAPIC_VERSION, MPC_APIC_USABLE, IOAPIC_ADDR))
    for irq in range(IRQ_MAX + 1):
        entries.append(struct.pack("<BBHBBBB", MP_INTSRC, MP_INT, MP_IRQPOL_DEFAULT, 0, irq, ioapic_id, irq))
    entries.append(struct.pack("<BBHBBBB", MP_LINTSRC, MP_EXTINT, MP_IRQPOL_DEFAULT, 0, 0, 0, 0))
    entries.append(struct.pack("<BBHBBBB", MP_LINTSRC, MP_NMI, MP_IRQPOL_DEFAULT, 0, 0, MP_APIC_ALL, 1))
    body = b"".join(entries)

    def header(checksum: int) -> bytes:
        return struct.pack(
            "<4sHBB8s12sIHHIHBB", MPC_SIGNATURE, MPC_TABLE_SIZE + len(body), MPC_SPEC, checksum,
            MPC_OEM, MPC_PRODUCT_ID, 0, 0, len(entries), APIC_ADDR, 0, 0, 0,
        )

    table = header(_checksum(header(0) + body)) + body

    def mpf(checksum: int) -> bytes:
        # physptr, length in 16-byte units, spec rev, checksum, feature bytes
        # 1..5 all 0: a configuration table is present (no default config)
        # and the IMCR is absent (virtual-wire mode).
        return struct.pack("<4sIBBB5x", SMP_MAGIC_IDENT, addr + MPF_INTEL_SIZE, 1, MPC_SPEC, checksum)

    out = mpf(_checksum(mpf(0))) + table
    assert len(out) == mptable_size(cpu_count)
    return out


def setup_mptable(mem: GuestMemory, cpu_count: int, addr: int = EBDA_START) -> int:
    """Write the MP table at `addr` (default the EBDA); return its end address."""
    data = build_mptable(cpu_count, addr)
    end = addr + len(data)
    if end > RSDP_ADDR:
        raise MptableOutsideMemory(f"{addr:#x}..{end:#x} runs into the ACPI area at {RSDP_ADDR:#x}")
    try:
        mem.write(addr, data)
    except GuestMemoryError as exc:
        raise MptableOutsideMemory(f"{addr:#x}..{end:#x}") from exc
    return end

"""ACPI tables for a hardware-reduced x86 microVM: RSDP, XSDT, FADT, MADT, DSDT.

Primer. The guest finds the RSDP (ACPI 6.5 §5.2.5) from boot_params /
hvm_start_info, or by scanning 0xe0000..0xfffff. The RSDP (revision 2)
points at the XSDT (§5.2.8), a list of 64-bit table addresses: here the
FADT and the MADT. Each table starts with the 36-byte System Description
Table header (§5.2.6) whose checksum byte makes the whole table sum to 0.

* FADT (§5.2.9): HW_REDUCED_ACPI, as Firecracker: no PM timer, no SCI, no
  fixed power/sleep buttons, no 8259 use (Linux acpi_generic_reduced_hw_init
  drops the legacy PIC and the PIT/HPET timer setup, so the guest runs on
  its local APIC timer). It points at the DSDT (X_DSDT), tells the guest
  there is no VGA, no MSI and no CMOS RTC, whether an 8042 exists, and
  names the hypervisor.
* MADT (§5.2.12): one enabled Local APIC per vCPU (APIC ID = vCPU index),
  the IOAPIC at IOAPIC_ADDR with GSI base 0, LINT1 = NMI on all CPUs. No
  Interrupt Source Override: KVM's default routing wires GSI n to IOAPIC
  pin n for all 24 pins, IRQ 0 included (real chipsets wire the PIT to pin
  2 and need "IRQ0 -> GSI2"; here that override would point the timer at
  the wrong pin).
* ISA IRQs in hardware-reduced mode. Linux installs no legacy PIC, so
  nr_legacy_irqs() is 0: the IOAPIC gets a *dynamic* IRQ domain
  (acpi_parse_ioapic), mp_config_acpi_legacy_irqs() maps nothing, and no
  Linux IRQ 0-15 ever exists. A GSI gets a Linux IRQ number (24 and up)
  only when a driver registers it from firmware: the DSDT _CRS below, read
  by PNP/ACPI drivers (8250_pnp for PNP0501, i8042's PNP probe for
  PNP0303, virtio_mmio for LNRO0005). Drivers that use a fixed ISA number
  instead (the legacy 8250 platform port "irq = 4", the i8042 under
  `i8042.nopnp`) fail request_irq() with -EINVAL; an override would not
  help (measured: overrides for IRQ 1 and 4 became Linux IRQs 24 and 25).
  So the guest needs a DSDT that loads and CONFIG_PNP/SERIAL_8250_PNP, and
  must not be booted with `i8042.nopnp` (Firecracker dropped it from its
  default command line for the same reason).
* DSDT (§5.2.11.1): AML in \\_SB for COM1 (PNP0501), the i8042 (PNP0303),
  one LNRO0005 device per virtio-mmio window (Linux
  drivers/virtio/virtio_mmio.c matches that _HID and takes the first
  memory and IRQ resources of _CRS), then whatever the caller adds.

Firecracker's equivalents: src/acpi-tables/src/*.rs and
src/vmm/src/acpi/{mod,x86_64}.rs.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

from vmm.memory import GuestMemory, GuestMemoryError

from ..layout import (
    ACPI_TABLES_END,
    APIC_ADDR,
    COM1_IRQ,
    COM1_PORT,
    COM1_PORT_LEN,
    I8042_COMMAND_PORT,
    I8042_DATA_PORT,
    I8042_IRQ,
    IOAPIC_ADDR,
    MAX_VCPUS,
    RSDP_ADDR,
)
from .aml import (
    IO,
    AmlError,
    AmlNode,
    Device,
    EisaId,
    Interrupt,
    Memory32Fixed,
    Method,
    Name,
    Package,
    ResourceTemplate,
    Return,
    Scope,
    name_string,
)

__all__ = [
    "AcpiError",
    "AcpiTablesTooLarge",
    "AcpiOutsideMemory",
    "BadAcpiDevice",
    "TooManyCpusForMadt",
    "OEM_ID",
    "OEM_REVISION",
    "CREATOR_ID",
    "CREATOR_REVISION",
    "HYPERVISOR_VENDOR_ID",
    "SDT_HEADER_SIZE",
    "RSDP_SIZE",
    "FADT_SIZE",
    "FADT_F_PWR_BUTTON",
    "FADT_F_SLP_BUTTON",
    "FADT_F_HW_REDUCED_ACPI",
    "IAPC_BOOT_ARCH_8042",
    "IAPC_BOOT_ARCH_VGA_NOT_PRESENT",
    "IAPC_BOOT_ARCH_MSI_NOT_PRESENT",
    "IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT",
    "MADT_LOCAL_APIC",
    "MADT_IO_APIC",
    "MADT_LOCAL_APIC_NMI",
    "VIRTIO_MMIO_HID",
    "AcpiMmioDevice",
    "AcpiTables",
    "checksum",
    "sdt",
    "rsdp",
    "xsdt",
    "fadt",
    "madt",
    "dsdt",
    "com1_device",
    "i8042_device",
    "virtio_mmio_device",
    "vmgenid_device",
    "build_acpi_tables",
    "create_acpi_tables",
]

OEM_ID = b"EMBER "
OEM_REVISION = 1
CREATOR_ID = b"EMBR"
CREATOR_REVISION = 1
# FADT "Hypervisor Vendor Identity" (§5.2.9, ACPI 6.0+): lets the guest know
# which VMM it runs on.
HYPERVISOR_VENDOR_ID = b"EMBERVMM"

SDT_HEADER_SIZE = 36
RSDP_SIZE = 36
# §5.2.9 Table 5.9: the FADT of ACPI 6.5 (revision 6, minor 5) is 276 bytes.
FADT_SIZE = 276
FADT_REVISION = 6
FADT_MINOR_REVISION = 5
MADT_REVISION = 6
XSDT_REVISION = 1
# DSDT revision 2+: AML integers are 64 bits wide (§5.2.11.1).
DSDT_REVISION = 2
RSDP_REVISION = 2

# FADT Flags (§5.2.9.3 Table 5.10).
FADT_F_PWR_BUTTON = 1 << 4     # power button is a control-method device (no fixed one)
FADT_F_SLP_BUTTON = 1 << 5     # same for the sleep button
FADT_F_HW_REDUCED_ACPI = 1 << 20
# IA-PC Boot Architecture Flags (§5.2.9.3 Table 5.11).
IAPC_BOOT_ARCH_8042 = 1 << 1
IAPC_BOOT_ARCH_VGA_NOT_PRESENT = 1 << 2
IAPC_BOOT_ARCH_MSI_NOT_PRESENT = 1 << 3
IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT = 1 << 5

# FADT field offsets (§5.2.9 Table 5.9).
_FADT_IAPC_BOOT_ARCH = 109
_FADT_FLAGS = 112
_FADT_MINOR_VERSION = 131
_FADT_X_DSDT = 140
_FADT_HYPERVISOR_VENDOR_ID = 268

# MADT interrupt controller structure types (§5.2.12 Table 5.21).
MADT_LOCAL_APIC = 0
MADT_IO_APIC = 1
MADT_LOCAL_APIC_NMI = 4
_MADT_LAPIC_ENABLED = 1 << 0
_MADT_ALL_PROCESSORS = 0xFF
_MADT_FLAGS_NONE = 0           # MPS INTI flags: conforms to the bus
_IOAPIC_ID = 0                 # KVM's IOAPIC reports ID 0 at reset

VIRTIO_MMIO_HID = "LNRO0005"
_TABLE_ALIGN = 16


class AcpiError(Exception):
    """ACPI tables could not be built."""


class AcpiTablesTooLarge(AcpiError):
    """ACPI tables do not fit in the BIOS area (0xe0000..0x100000)."""


class AcpiOutsideMemory(AcpiError):
    """ACPI tables do not fit in guest memory."""


class BadAcpiDevice(AcpiError):
    """Device cannot be described in the DSDT."""


class TooManyCpusForMadt(AcpiError):
    """MADT describes 1 to 254 vCPUs (8-bit xAPIC IDs)."""


def checksum(data: bytes) -> int:
    """The byte that makes `data` plus it sum to 0 mod 256."""
    return (-sum(data)) & 0xFF


def _pad(raw: bytes, n: int, what: str) -> bytes:
    if len(raw) > n:
        raise AcpiError(f"{what} {raw!r} is longer than {n} bytes")
    return raw.ljust(n, b" ")


def sdt(signature: bytes, revision: int, body: bytes, *, oem_table_id: bytes) -> bytes:
    """A table: the §5.2.6 header (signature, length, revision, checksum, OEM
    ID, OEM table ID, OEM revision, creator ID, creator revision) + `body`."""
    if len(signature) != 4:
        raise AcpiError(f"signature {signature!r} is not 4 bytes")
    length = SDT_HEADER_SIZE + len(body)

    def header(csum: int) -> bytes:
        return struct.pack(
            "<4sIBB6s8sI4sI", signature, length, revision, csum, _pad(OEM_ID, 6, "OEM ID"),
            _pad(oem_table_id, 8, "OEM table ID"), OEM_REVISION, CREATOR_ID, CREATOR_REVISION,
        )

    return header(checksum(header(0) + body)) + body


def rsdp(xsdt_addr: int) -> bytes:
    """RSDP revision 2 (§5.2.5.3): the first-20-byte checksum covers the ACPI
    1.0 part, the extended checksum the whole 36 bytes. No RSDT."""

    def pack(csum: int, ext: int) -> bytes:
        return struct.pack(
            "<8sB6sBIIQB3x", b"RSD PTR ", csum, _pad(OEM_ID, 6, "OEM ID"), RSDP_REVISION, 0, RSDP_SIZE,
            xsdt_addr, ext,
        )

    first = pack(0, 0)
    csum = checksum(first[:20])
    ext = checksum(pack(csum, 0))
    return pack(csum, ext)


def xsdt(table_addrs: Iterable[int]) -> bytes:
    """XSDT (§5.2.8): header + 64-bit table addresses."""
    addrs = list(table_addrs)
    return sdt(b"XSDT", XSDT_REVISION, struct.pack(f"<{len(addrs)}Q", *addrs), oem_table_id=b"EMBRXSDT")


def fadt(
    dsdt_addr: int,
    *,
    flags: int = FADT_F_HW_REDUCED_ACPI | FADT_F_PWR_BUTTON | FADT_F_SLP_BUTTON,
    iapc_boot_arch: int = (
        IAPC_BOOT_ARCH_8042 | IAPC_BOOT_ARCH_VGA_NOT_PRESENT | IAPC_BOOT_ARCH_MSI_NOT_PRESENT
        | IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT
    ),
    hypervisor_vendor_id: bytes = HYPERVISOR_VENDOR_ID,
) -> bytes:
    """FADT revision 6.5 (276 bytes) pointing at the DSDT through X_DSDT only.

    In hardware-reduced mode every PM/GPE block, SCI_INT, SMI_CMD and the
    reset register stay zero (§4.1); the 32-bit DSDT field stays 0 because
    X_DSDT is set (§5.2.9: "If the X_DSDT field contains a non-zero value
    ... this field must be ignored").
    """
    body = bytearray(FADT_SIZE - SDT_HEADER_SIZE)

    def put(fmt: str, offset: int, value: int | bytes) -> None:
        struct.pack_into(fmt, body, offset - SDT_HEADER_SIZE, value)

    put("<H", _FADT_IAPC_BOOT_ARCH, iapc_boot_arch)
    put("<I", _FADT_FLAGS, flags)
    put("<B", _FADT_MINOR_VERSION, FADT_MINOR_REVISION)
    put("<Q", _FADT_X_DSDT, dsdt_addr)
    put("8s", _FADT_HYPERVISOR_VENDOR_ID, _pad(hypervisor_vendor_id, 8, "hypervisor vendor ID"))
    return sdt(b"FACP", FADT_REVISION, bytes(body), oem_table_id=b"EMBRFACP")


def madt(cpu_count: int) -> bytes:
    """MADT: local APIC address, flags 0 (no 8259 PCAT compatibility), then
    Local APIC (type 0: UID, APIC ID, enabled) per vCPU, the IOAPIC (type 1:
    ID, address, GSI base 0) and a Local APIC NMI (type 4: all processors,
    LINT1)."""
    if not 1 <= cpu_count <= MAX_VCPUS:
        raise TooManyCpusForMadt(f"cpu_count={cpu_count}")
    body = struct.pack("<II", APIC_ADDR, 0)
    for cpu in range(cpu_count):
        body += struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, cpu, cpu, _MADT_LAPIC_ENABLED)
    body += struct.pack("<BBBBII", MADT_IO_APIC, 12, _IOAPIC_ID, 0, IOAPIC_ADDR, 0)
    body += struct.pack("<BBBHB", MADT_LOCAL_APIC_NMI, 6, _MADT_ALL_PROCESSORS, _MADT_FLAGS_NONE, 1)
    return sdt(b"APIC", MADT_REVISION, body, oem_table_id=b"EMBRAPIC")


def dsdt(aml: bytes) -> bytes:
    """DSDT: header + AML definition block."""
    return sdt(b"DSDT", DSDT_REVISION, aml, oem_table_id=b"EMBRDSDT")


# --- DSDT devices ---------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class AcpiMmioDevice:
    """A device behind an MMIO window and one edge-triggered, active-high GSI.

    `name` is the 4-character ACPI name (e.g. "V000"); `hid` defaults to
    LNRO0005, the virtio-mmio ID Linux's virtio_mmio driver matches.
    """

    name: str
    uid: int
    mmio_base: int
    mmio_len: int
    irq: int
    hid: str = VIRTIO_MMIO_HID


def com1_device() -> Device:
    """COM1: 16550 at I/O 0x3f8..0x3ff, IRQ 4."""
    return Device("COM1", [
        Name("_HID", EisaId("PNP0501")),
        Name("_UID", 0),
        Name("_DDN", "COM1"),
        Name("_CRS", ResourceTemplate([
            IO(COM1_PORT, COM1_PORT, 1, COM1_PORT_LEN),
            Interrupt(COM1_IRQ, edge=True, active_low=False, shared=False),
        ])),
    ])


def i8042_device() -> Device:
    """i8042 keyboard controller: data port 0x60, command/status 0x64, IRQ 1."""
    return Device("PS2_", [
        Name("_HID", EisaId("PNP0303")),
        Name("_CRS", ResourceTemplate([
            IO(I8042_DATA_PORT, I8042_DATA_PORT, 1, 1),
            IO(I8042_COMMAND_PORT, I8042_COMMAND_PORT, 1, 1),
            Interrupt(I8042_IRQ, edge=True, active_low=False, shared=False),
        ])),
    ])


def virtio_mmio_device(dev: AcpiMmioDevice) -> Device:
    """_HID, _UID, _CCA (DMA is cache-coherent) and _CRS: Memory32Fixed
    window + Interrupt(consumer, edge, active high, exclusive)."""
    try:
        name_string(dev.name)
        return Device(dev.name, [
            Name("_HID", dev.hid),
            Name("_UID", dev.uid),
            Name("_CCA", 1),
            Name("_CRS", ResourceTemplate([
                Memory32Fixed(dev.mmio_base, dev.mmio_len, read_write=True),
                Interrupt(dev.irq, edge=True, active_low=False, shared=False),
            ])),
        ])
    except AmlError as exc:
        raise BadAcpiDevice(f"{dev}: {exc}") from exc


def vmgenid_device(addr: int, path: str = "\\_SB_.VGEN") -> Device:
    """A VM Generation ID device (Microsoft "Virtual Machine Generation ID",
    Linux drivers/virt/vmgenid.c): _HID "VMGENCTR", _CID/_DDN
    "VM_Gen_Counter", and method ADDR returning Package {low 32 bits, high
    32 bits} of the 16-byte generation ID's guest physical address."""
    return Device(path, [
        Name("_HID", "VMGENCTR"),
        Name("_CID", "VM_Gen_Counter"),
        Name("_DDN", "VM_Gen_Counter"),
        Method("ADDR", [Return(Package([addr & 0xFFFFFFFF, addr >> 32]))]),
    ])


# --- layout and writing -----------------------------------------------------------------


def _align(addr: int) -> int:
    return (addr + _TABLE_ALIGN - 1) // _TABLE_ALIGN * _TABLE_ALIGN


@dataclass(frozen=True)
class AcpiTables:
    """Every table's bytes and guest address, RSDP first."""

    rsdp_addr: int
    tables: tuple[tuple[int, bytes], ...]

    def address_of(self, signature: bytes) -> int:
        for addr, data in self.tables:
            if data[:4] == signature or (signature == b"RSD PTR " and data[:8] == signature):
                return addr
        raise KeyError(signature)

    @property
    def end(self) -> int:
        addr, data = self.tables[-1]
        return addr + len(data)

    def __repr__(self) -> str:
        sigs = " ".join(d[:4].decode("latin-1") for _, d in self.tables)
        return f"<AcpiTables rsdp={self.rsdp_addr:#x} [{sigs}] end={self.end:#x}>"


def build_acpi_tables(
    cpu_count: int,
    devices: Iterable[AcpiMmioDevice],
    *,
    extra_dsdt: Iterable[AmlNode | bytes] = (),
    serial: bool = True,
    i8042: bool = True,
    rsdp_addr: int = RSDP_ADDR,
    limit: int = ACPI_TABLES_END,
) -> AcpiTables:
    """Lay out RSDP at `rsdp_addr`, then DSDT, FADT, MADT, XSDT (16-byte aligned).

    The DSDT holds Scope(\\_SB_) { COM1, PS2_, one device per `devices` }
    followed by `extra_dsdt` (AML nodes or raw AML at the definition block's
    top level; give them absolute paths such as "\\_SB_.VGEN").
    """
    sb: list[AmlNode] = []
    if serial:
        sb.append(com1_device())
    if i8042:
        sb.append(i8042_device())
    seen: set[str] = set()
    for dev in devices:
        if dev.name in seen:
            raise BadAcpiDevice(f"two devices named {dev.name!r}")
        seen.add(dev.name)
        sb.append(virtio_mmio_device(dev))
    try:
        aml = Scope("\\_SB_", sb).encode() + b"".join(
            x if isinstance(x, (bytes, bytearray)) else x.encode() for x in extra_dsdt
        )
    except AmlError as exc:
        raise BadAcpiDevice(str(exc)) from exc

    iapc = IAPC_BOOT_ARCH_VGA_NOT_PRESENT | IAPC_BOOT_ARCH_MSI_NOT_PRESENT | IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT
    if i8042:
        iapc |= IAPC_BOOT_ARCH_8042
    dsdt_addr = _align(rsdp_addr + RSDP_SIZE)
    dsdt_bytes = dsdt(aml)
    fadt_addr = _align(dsdt_addr + len(dsdt_bytes))
    fadt_bytes = fadt(dsdt_addr, iapc_boot_arch=iapc)
    madt_addr = _align(fadt_addr + len(fadt_bytes))
    madt_bytes = madt(cpu_count)
    xsdt_addr = _align(madt_addr + len(madt_bytes))
    xsdt_bytes = xsdt([fadt_addr, madt_addr])
    tables = AcpiTables(rsdp_addr, (
        (rsdp_addr, rsdp(xsdt_addr)),
        (dsdt_addr, dsdt_bytes),
        (fadt_addr, fadt_bytes),
        (madt_addr, madt_bytes),
        (xsdt_addr, xsdt_bytes),
    ))
    if tables.end > limit:
        raise AcpiTablesTooLarge(f"tables end at {tables.end:#x} > {limit:#x}")
    return tables


def create_acpi_tables(
    mem: GuestMemory,
    cpu_count: int,
    devices: Iterable[AcpiMmioDevice],
    *,
    extra_dsdt: Iterable[AmlNode | bytes] = (),
    serial: bool = True,
    i8042: bool = True,
) -> int:
    """Write all tables into `mem` (RSDP at RSDP_ADDR); return the RSDP address."""
    tables = build_acpi_tables(cpu_count, devices, extra_dsdt=extra_dsdt, serial=serial, i8042=i8042)
    for addr, data in tables.tables:
        try:
            mem.write(addr, data)
        except GuestMemoryError as exc:
            raise AcpiOutsideMemory(f"{data[:4]!r} at {addr:#x}+{len(data):#x}") from exc
    return tables.rsdp_addr

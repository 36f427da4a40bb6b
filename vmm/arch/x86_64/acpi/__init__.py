"""ACPI for x86_64 guests: an AML builder and the RSDP/XSDT/FADT/MADT/DSDT tables."""

from . import aml
from .aml import (
    IO,
    Arg,
    DWord,
    If,
    LEqual,
    Local,
    NamePath,
    Notify,
    QWord,
    Store,
    ONE,
    ONES,
    ZERO,
    AmlError,
    AmlNode,
    BadAmlName,
    BadAmlValue,
    Buffer,
    Device,
    EisaId,
    Integer,
    Interrupt,
    IRQNoFlags,
    Memory32Fixed,
    Method,
    Name,
    Package,
    ResourceTemplate,
    Return,
    Scope,
    String,
)
from .tables import (
    VIRTIO_MMIO_HID,
    AcpiError,
    AcpiMmioDevice,
    AcpiOutsideMemory,
    AcpiTables,
    AcpiTablesTooLarge,
    BadAcpiDevice,
    TooManyCpusForMadt,
    build_acpi_tables,
    checksum,
    com1_device,
    create_acpi_tables,
    i8042_device,
    virtio_mmio_device,
    vmgenid_device,
)

__all__ = [
    "aml",
    # AML builder
    "AmlNode", "Integer", "String", "EisaId", "Buffer", "Package", "Name", "Scope", "Device",
    "DWord", "QWord", "NamePath", "Arg", "Local", "LEqual", "If", "Notify", "Store",
    "Method", "Return", "ResourceTemplate", "Memory32Fixed", "IO", "IRQNoFlags", "Interrupt",
    "ZERO", "ONE", "ONES",
    # tables
    "AcpiMmioDevice", "AcpiTables", "VIRTIO_MMIO_HID", "build_acpi_tables", "create_acpi_tables",
    "checksum", "com1_device", "i8042_device", "virtio_mmio_device", "vmgenid_device",
    # errors
    "AmlError", "BadAmlName", "BadAmlValue", "AcpiError", "AcpiTablesTooLarge", "AcpiOutsideMemory",
    "BadAcpiDevice", "TooManyCpusForMadt",
]

"""Devices and the buses that route vCPU exits to them.

`bus` is the address-space registry; `legacy` holds the PC devices (serial,
i8042), `pseudo` the boot timer, `virtio` the virtio devices and transport.
Subpackages are imported explicitly (`from vmm.devices.legacy import ...`);
only the bus is re-exported here, so importing a bus never pulls in every
device.
"""

from vmm.devices.bus import (
    MMIO_SPACE_SIZE,
    PIO_SPACE_SIZE,
    Bus,
    BusAccessInvalid,
    BusDevice,
    BusError,
    BusRangeInvalid,
    BusRangeNotFound,
    BusRangeOverlap,
    ByteRegisterAdapter,
    ByteRegisters,
)

__all__ = [
    "MMIO_SPACE_SIZE",
    "PIO_SPACE_SIZE",
    "Bus",
    "BusAccessInvalid",
    "BusDevice",
    "BusError",
    "BusRangeInvalid",
    "BusRangeNotFound",
    "BusRangeOverlap",
    "ByteRegisterAdapter",
    "ByteRegisters",
]

"""Devices the guest finds only through ACPI: VM Generation ID and the Generic Event Device.

`vmgenid` owns the 16-byte generation ID that changes on every snapshot
restore; `ged` describes the ACPI0013 device whose interrupt tells the
guest to look at it again.
"""

from vmm.devices.acpi.ged import GED_EVT_ARGS, GED_HID, GED_PATH, BadGedDevice, GedError, ged_device
from vmm.devices.acpi.vmgenid import (
    VMGENID_ALIGN,
    VMGENID_NOTIFY,
    VMGENID_PATH,
    VMGENID_SIZE,
    BadVmGenIdState,
    VmGenId,
    VmGenIdError,
    VmGenIdOutsideMemory,
    VmGenIdRngFailed,
    VmGenIdState,
)

__all__ = [
    # VMGenID
    "VmGenId", "VmGenIdState", "VMGENID_SIZE", "VMGENID_ALIGN", "VMGENID_PATH", "VMGENID_NOTIFY",
    # Generic Event Device
    "ged_device", "GED_HID", "GED_PATH", "GED_EVT_ARGS",
    # errors
    "VmGenIdError", "BadVmGenIdState", "VmGenIdOutsideMemory", "VmGenIdRngFailed", "GedError",
    "BadGedDevice",
]

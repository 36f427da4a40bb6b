"""The ACPI Generic Event Device (GED): how a hardware-reduced machine raises ACPI events.

Primer. A hardware-reduced platform (Ember's FADT sets HW_REDUCED_ACPI)
has no SCI and no GPE blocks, so it cannot run the classic _Lxx/_Exx GPE
handlers. ACPI 6.5 §5.6.9 "Interrupt-signaled ACPI events" replaces them
with a device of _HID "ACPI0013" whose _CRS lists ordinary interrupts and
whose `_EVT(Arg0)` method the OS calls with the interrupt number that
fired. Linux's driver is drivers/acpi/evged.c (built whenever CONFIG_ACPI
is): for each interrupt of _CRS it requests a threaded IRQ and, when it
fires, evaluates `_Exx`/`_Lxx` (GSI <= 255, if defined) or else `_EVT`
with the GSI as its argument.

Ember's GED has one edge-triggered, active-high interrupt and an `_EVT`
that, for that GSI, sends `Notify(target, value)` to each device listed;
the VMM raises the event by pulsing the interrupt (an irqfd). Only the
AML lives here: the interrupt line belongs to whoever raises the event
(see `vmgenid.VmGenId.notify`).

    Device (\\_SB.GED_) {
        Name (_HID, "ACPI0013")
        Name (_UID, Zero)
        Name (_CRS, ResourceTemplate () {
            Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { gsi } })
        Method (_EVT, 1, Serialized) {
            If (Arg0 == gsi) { Notify (\\_SB.VGEN, 0x80) }
        }
    }
"""

from __future__ import annotations

from collections.abc import Sequence

from vmm.arch.x86_64.acpi.aml import (
    AmlError,
    Arg,
    Device,
    If,
    Interrupt,
    LEqual,
    Method,
    Name,
    Notify,
    ResourceTemplate,
    name_string,
)

__all__ = [
    "GedError",
    "BadGedDevice",
    "GED_HID",
    "GED_PATH",
    "GED_EVT_ARGS",
    "ged_device",
]

# ACPI 6.5 §5.6.9 "Interrupt-signaled ACPI events": the GED's hardware ID.
GED_HID = "ACPI0013"
# Where Ember puts it (a DSDT top-level absolute path; "GED" padded to 4).
GED_PATH = "\\_SB_.GED_"
# §5.6.9.1 "_EVT (Event Method)": one argument, the interrupt number.
GED_EVT_ARGS = 1
_GSI_MAX = 0xFFFFFFFF  # §6.4.3.6: Extended Interrupt Descriptor numbers are 32 bits
_NOTIFY_VALUE_MAX = 0xFF  # §5.6.6: notification values are one byte


class GedError(Exception):
    """The Generic Event Device could not be described."""


class BadGedDevice(GedError):
    """The Generic Event Device's GSI, path or notifications cannot be encoded in AML."""


def ged_device(gsi: int, notifications: Sequence[tuple[str, int]], *, path: str = GED_PATH) -> Device:
    """The GED at `path` (absolute, for the DSDT's top level): _HID ACPI0013,
    _UID 0, _CRS with `gsi` (consumer, edge, active high, exclusive), and
    `_EVT(Arg0)` that, when Arg0 is `gsi`, notifies each (target path,
    value) of `notifications` in order.

    `_EVT` is Serialized: evged.c runs each GSI's handler on its own IRQ
    thread, so two events could otherwise run the method concurrently.
    """
    if not 0 <= gsi <= _GSI_MAX:
        raise BadGedDevice(f"GSI {gsi} outside 0..2^32-1")
    if not notifications:
        raise BadGedDevice("a GED with no notification would raise an event that does nothing")
    for target, value in notifications:
        if not 0 <= value <= _NOTIFY_VALUE_MAX:
            raise BadGedDevice(f"notify value {value:#x} for {target!r} is not one byte")
    try:
        name_string(path)
        for target, _ in notifications:
            name_string(target)
        return Device(path, [
            Name("_HID", GED_HID),
            Name("_UID", 0),
            Name("_CRS", ResourceTemplate([Interrupt(gsi, edge=True, active_low=False, shared=False)])),
            Method("_EVT", [
                If(LEqual(Arg(0), gsi), [Notify(target, value) for target, value in notifications]),
            ], args=GED_EVT_ARGS, serialized=True),
        ])
    except AmlError as exc:
        raise BadGedDevice(f"GED {path!r}: {exc}") from exc

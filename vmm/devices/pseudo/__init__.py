"""Pseudo devices: VMM-only devices with no hardware counterpart."""

from vmm.devices.pseudo.boot_timer import (
    BOOT_TIMER_MMIO_BASE,
    BOOT_TIMER_MMIO_SIZE,
    MAGIC_VALUE_SIGNAL_GUEST_BOOT_COMPLETE,
    BootTimer,
    format_boot_time,
)

__all__ = [
    "BOOT_TIMER_MMIO_BASE",
    "BOOT_TIMER_MMIO_SIZE",
    "MAGIC_VALUE_SIGNAL_GUEST_BOOT_COMPLETE",
    "BootTimer",
    "format_boot_time",
]

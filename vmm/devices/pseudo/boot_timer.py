"""The boot-timer pseudo device: the guest says "booted" and the VMM logs how long it took.

Firecracker's convention (its boot-time tests rely on it): the guest's init
writes the byte 123 to offset 0 of a one-page MMIO region at 0xd0000000
(e.g. `devmem 0xd0000000 8 123`) once userspace is up. The VMM then logs
wall-clock and process CPU time since its own start, in the exact format
Firecracker uses, so existing log scrapers work. Only the first signal
counts; reads return zeros and other writes are ignored.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

__all__ = [
    "BOOT_TIMER_MMIO_BASE",
    "BOOT_TIMER_MMIO_SIZE",
    "MAGIC_VALUE_SIGNAL_GUEST_BOOT_COMPLETE",
    "BootTimer",
    "format_boot_time",
]

# Firecracker arch/x86_64 layout: the boot timer's MMIO page.
BOOT_TIMER_MMIO_BASE = 0xD000_0000
BOOT_TIMER_MMIO_SIZE = 0x1000
# Firecracker devices/pseudo/boot_timer.rs.
MAGIC_VALUE_SIGNAL_GUEST_BOOT_COMPLETE = 123


def format_boot_time(wall_us: int, cpu_us: int) -> str:
    """Firecracker's log line, character for character."""
    return (f"Guest-boot-time = {wall_us:>6} us {wall_us // 1000} ms, "
            f"{cpu_us:>6} CPU us {cpu_us // 1000} CPU ms")


class BootTimer:
    """An MMIO bus device (`bus.insert(t, BOOT_TIMER_MMIO_BASE, BOOT_TIMER_MMIO_SIZE)`).

    `start_wall_ns` and `start_cpu_ns` are the VMM's start instants on the
    clocks `wall_clock_ns` (monotonic) and `cpu_clock_ns` (this process's CPU
    time). On the guest's signal, `log(line)` gets the formatted line and
    `on_boot(wall_us, cpu_us)`, if given, the numbers. Thread-safe.
    """

    def __init__(self, start_wall_ns: int, start_cpu_ns: int, log: Callable[[str], None], *,
                 on_boot: Callable[[int, int], None] | None = None,
                 wall_clock_ns: Callable[[], int] = time.monotonic_ns,
                 cpu_clock_ns: Callable[[], int] = time.process_time_ns):
        self.start_wall_ns = start_wall_ns
        self.start_cpu_ns = start_cpu_ns
        self._log = log
        self._on_boot = on_boot
        self._wall_clock_ns = wall_clock_ns
        self._cpu_clock_ns = cpu_clock_ns
        self._lock = threading.Lock()
        self.boot_time_us: tuple[int, int] | None = None  # (wall, cpu) once the guest signalled

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        # Firecracker handles single-byte writes at offset 0 only.
        if offset != 0 or len(data) != 1 or data[0] != MAGIC_VALUE_SIGNAL_GUEST_BOOT_COMPLETE:
            return
        wall_ns, cpu_ns = self._wall_clock_ns(), self._cpu_clock_ns()
        with self._lock:
            if self.boot_time_us is not None:
                return
            wall_us = max(0, wall_ns - self.start_wall_ns) // 1000
            cpu_us = max(0, cpu_ns - self.start_cpu_ns) // 1000
            self.boot_time_us = (wall_us, cpu_us)
        self._log(format_boot_time(wall_us, cpu_us))
        if self._on_boot is not None:
            self._on_boot(wall_us, cpu_us)

    def __repr__(self) -> str:
        if self.boot_time_us is None:
            return "<BootTimer waiting>"
        return f"<BootTimer booted wall_us={self.boot_time_us[0]} cpu_us={self.boot_time_us[1]}>"

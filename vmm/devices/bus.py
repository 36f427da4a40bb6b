"""Address-space buses: the one place a vCPU exit is routed to a device.

A `Bus` is a registry of non-overlapping ranges `[base, base + length)`, each
owned by one device. Ember has two: one for port I/O (16-bit port space) and
one for MMIO (64-bit guest physical addresses). A vCPU thread that takes an
I/O or MMIO exit calls `bus.read(addr, size)` or `bus.write(addr, data)`; the
bus finds the range holding the whole access and calls the device with the
offset relative to the range's base.

What the guest gets, whatever it does (the guest is hostile, the VMM must
not fall over):

* an access that hits no device, or straddles the end of a range, reads as
  all-ones (what an unclaimed ISA/PCI read returns) and its writes are
  dropped; both are counted (`unhandled_reads`, `unhandled_writes`);
* a device that raises is contained: the exception is counted
  (`device_errors`) and logged once per device, the read returns all-ones and
  the write is dropped.

Concurrency: every vCPU thread calls into the same bus. The range table is
copy-on-write: `insert`/`remove` build a new immutable table under a lock and
publish it with one reference assignment, so lookups (the hot path) take no
lock and always see a consistent table; a lookup is a `bisect` over the sorted
bases, O(log n). The bus holds no lock while it calls a device, and it does
not serialise calls into one device: a device reachable from several vCPUs,
or also driven from another thread (console input, timers), protects itself
with its own lock (`ByteRegisterAdapter` does this for the legacy devices).
"""

from __future__ import annotations

import bisect
import threading
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import structlog

__all__ = [
    "BusDevice",
    "ByteRegisters",
    "ByteRegisterAdapter",
    "Bus",
    "BusError",
    "BusRangeInvalid",
    "BusRangeOverlap",
    "BusRangeNotFound",
    "BusAccessInvalid",
    "PIO_SPACE_SIZE",
    "MMIO_SPACE_SIZE",
]

log = structlog.get_logger("vmm.devices.bus")

# x86 port I/O space: ports 0x0000-0xffff (Intel SDM Vol. 1 §19.2 "I/O Port Addressing").
PIO_SPACE_SIZE = 1 << 16
# Guest physical address space as seen by KVM_EXIT_MMIO (a 64-bit address).
MMIO_SPACE_SIZE = 1 << 64


class BusError(Exception):
    """A bus range could not be registered or removed."""


class BusRangeInvalid(BusError):
    """A bus range is empty or lies outside the bus's address space."""


class BusRangeOverlap(BusError):
    """A bus range overlaps a range that is already registered."""


class BusRangeNotFound(BusError):
    """No bus range starts at the given base address."""


class BusAccessInvalid(BusError):
    """A bus access has no bytes (a caller bug, not a guest action)."""


@runtime_checkable
class BusDevice(Protocol):
    """What a bus calls. `offset` is relative to the base of the device's range.

    The bus guarantees `0 <= offset` and `offset + size <= length` of the
    range. `read` must return exactly `size` bytes (anything else counts as a
    device error and the guest reads all-ones). Implementations must be safe
    to call from several vCPU threads at once (see the module docstring).
    """

    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


class ByteRegisters(Protocol):
    """A register model addressed one byte at a time (the legacy devices)."""

    def read(self, offset: int) -> int: ...

    def write(self, offset: int, value: int) -> None: ...


class ByteRegisterAdapter:
    """Make a byte-register model a `BusDevice`, thread-safe.

    An access wider than a byte (e.g. `inw` on a UART port) is split into
    consecutive byte accesses, lowest address first, as the ISA bus splits a
    16-bit cycle to an 8-bit device. Every call into the model runs under
    `lock`, so the model itself can stay single-threaded; code outside the
    bus that drives the same model (console input, Ctrl-Alt-Del) must hold
    the same lock.
    """

    def __init__(self, model: ByteRegisters, *, lock: AbstractContextManager[Any] | None = None):
        self.model = model
        self.lock: AbstractContextManager[Any] = lock if lock is not None else threading.Lock()

    def read(self, offset: int, size: int) -> bytes:
        with self.lock:
            return bytes(self.model.read(offset + i) & 0xFF for i in range(size))

    def write(self, offset: int, data: bytes) -> None:
        with self.lock:
            for i, value in enumerate(data):
                self.model.write(offset + i, value)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.model!r}>"


@dataclass(eq=False)
class _Range:
    base: int
    length: int
    device: BusDevice
    # Set once the first error of this device has been logged (log once per device).
    error_logged: bool = field(default=False)

    @property
    def end(self) -> int:
        return self.base + self.length


@dataclass(frozen=True)
class _Table:
    """An immutable snapshot of the ranges, sorted by base."""

    bases: tuple[int, ...] = ()
    ranges: tuple[_Range, ...] = ()

    def find(self, addr: int) -> _Range | None:
        i = bisect.bisect_right(self.bases, addr) - 1
        if i < 0:
            return None
        r = self.ranges[i]
        return r if addr < r.end else None


class Bus:
    """A set of device ranges in one address space (port I/O or MMIO)."""

    def __init__(self, name: str, space_size: int):
        if space_size <= 0:
            raise ValueError("space_size must be positive")
        self.name = name
        self.space_size = space_size
        self._table = _Table()
        self._table_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self.unhandled_reads = 0
        self.unhandled_writes = 0
        self.device_errors = 0

    @classmethod
    def pio(cls) -> Bus:
        """The x86 port I/O bus (ports 0..0xffff)."""
        return cls("pio", PIO_SPACE_SIZE)

    @classmethod
    def mmio(cls) -> Bus:
        """The MMIO bus (the whole 64-bit guest physical space)."""
        return cls("mmio", MMIO_SPACE_SIZE)

    # --- registry --------------------------------------------------------------

    def insert(self, device: BusDevice, base: int, length: int) -> None:
        """Register `device` for `[base, base + length)`."""
        if length <= 0:
            raise BusRangeInvalid(f"{self.name}: empty range at {base:#x} (length {length})")
        if base < 0 or base + length > self.space_size:
            raise BusRangeInvalid(f"{self.name}: range {base:#x}+{length:#x} is outside the address space")
        with self._table_lock:
            table = self._table
            i = bisect.bisect_left(table.bases, base)
            # The neighbour below may run into us, or we may run into the one at/after us.
            if i > 0 and table.ranges[i - 1].end > base:
                other = table.ranges[i - 1]
                raise BusRangeOverlap(
                    f"{self.name}: {base:#x}+{length:#x} overlaps {other.base:#x}+{other.length:#x}")
            if i < len(table.ranges) and table.ranges[i].base < base + length:
                other = table.ranges[i]
                raise BusRangeOverlap(
                    f"{self.name}: {base:#x}+{length:#x} overlaps {other.base:#x}+{other.length:#x}")
            ranges = table.ranges[:i] + (_Range(base, length, device),) + table.ranges[i:]
            self._table = _Table(tuple(r.base for r in ranges), ranges)

    def remove(self, base: int) -> BusDevice:
        """Unregister the range starting at `base`; returns its device."""
        with self._table_lock:
            table = self._table
            i = bisect.bisect_left(table.bases, base)
            if i == len(table.bases) or table.bases[i] != base:
                raise BusRangeNotFound(f"{self.name}: no range starts at {base:#x}")
            removed = table.ranges[i]
            ranges = table.ranges[:i] + table.ranges[i + 1:]
            self._table = _Table(tuple(r.base for r in ranges), ranges)
            return removed.device

    def lookup(self, addr: int) -> tuple[int, int, BusDevice] | None:
        """The `(base, length, device)` of the range holding `addr`, if any."""
        r = self._table.find(addr)
        return None if r is None else (r.base, r.length, r.device)

    def ranges(self) -> list[tuple[int, int, BusDevice]]:
        """All ranges as `(base, length, device)`, by ascending base."""
        return [(r.base, r.length, r.device) for r in self._table.ranges]

    @property
    def range_count(self) -> int:
        return len(self._table.ranges)

    # --- access (vCPU threads) ---------------------------------------------------

    def _route(self, addr: int, size: int) -> _Range | None:
        if size <= 0:
            raise BusAccessInvalid(f"{self.name}: access of {size} bytes at {addr:#x}")
        r = self._table.find(addr)
        if r is None or addr + size > r.end:
            return None
        return r

    def read(self, addr: int, size: int) -> bytes:
        """Read `size` bytes at `addr`; all-ones (0xff...) if nothing answers."""
        r = self._route(addr, size)
        if r is None:
            with self._stats_lock:
                self.unhandled_reads += 1
            return b"\xff" * size
        try:
            data = r.device.read(addr - r.base, size)
            if len(data) != size:
                raise BusError(f"device returned {len(data)} bytes for a {size}-byte read")
            return bytes(data)
        except Exception as exc:  # noqa: BLE001 - a device must never crash a vCPU thread
            self._device_failed(r, "read", addr, size, exc)
            return b"\xff" * size

    def write(self, addr: int, data: bytes) -> bool:
        """Write `data` at `addr`; False if no device took it (dropped)."""
        r = self._route(addr, len(data))
        if r is None:
            with self._stats_lock:
                self.unhandled_writes += 1
            return False
        try:
            r.device.write(addr - r.base, bytes(data))
            return True
        except Exception as exc:  # noqa: BLE001 - a device must never crash a vCPU thread
            self._device_failed(r, "write", addr, len(data), exc)
            return False

    def _device_failed(self, r: _Range, op: str, addr: int, size: int, exc: Exception) -> None:
        with self._stats_lock:
            self.device_errors += 1
            first = not r.error_logged
            r.error_logged = True
        if first:
            log.error("bus device failed; further errors of this device are counted, not logged",
                      bus=self.name, device=repr(r.device), op=op, addr=hex(addr), size=size,
                      exc_info=exc)

    def __repr__(self) -> str:
        return (f"<Bus {self.name} ranges={self.range_count} unhandled_reads={self.unhandled_reads} "
                f"unhandled_writes={self.unhandled_writes} device_errors={self.device_errors}>")

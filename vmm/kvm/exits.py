"""Typed results of KVM_RUN: what the vCPU stopped for, as plain values."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class IoIn:
    """The guest read `size` bytes from an I/O port; answer with `VcpuFd.set_io_in_data`."""
    port: int
    size: int
    count: int


@dataclass(frozen=True, slots=True)
class IoOut:
    """The guest wrote `data` (size*count bytes) to an I/O port."""
    port: int
    size: int
    data: bytes


@dataclass(frozen=True, slots=True)
class MmioRead:
    """The guest read `size` bytes at a GPA no memory slot covers; answer with `set_mmio_read_data`."""
    addr: int
    size: int


@dataclass(frozen=True, slots=True)
class MmioWrite:
    addr: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Hlt:
    """The vCPU halted (only seen without an in-kernel LAPIC)."""


@dataclass(frozen=True, slots=True)
class Shutdown:
    """The guest triple-faulted (KVM_EXIT_SHUTDOWN)."""


@dataclass(frozen=True, slots=True)
class SystemEvent:
    """The guest asked for reset / shutdown / reported a crash (PSCI-style system event)."""
    type: int
    flags: int


@dataclass(frozen=True, slots=True)
class Interrupted:
    """KVM_RUN returned early: a signal arrived or `immediate_exit` was set (EINTR)."""


@dataclass(frozen=True, slots=True)
class FailEntry:
    """The hardware refused VM entry."""
    reason: int
    cpu: int


@dataclass(frozen=True, slots=True)
class InternalError:
    """KVM could not handle an exit itself, e.g. its emulator met an unsupported instruction."""
    suberror: int
    data: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Unknown:
    """An exit reason Ember does not handle."""
    reason: int


VcpuExit = (IoIn | IoOut | MmioRead | MmioWrite | Hlt | Shutdown | SystemEvent
            | Interrupted | FailEntry | InternalError | Unknown)

"""Attaching virtio-mmio devices: MMIO window, IRQ, ioeventfds, irqfd, discovery.

Each device gets the next 4 KiB window from `layout.virtio_mmio_slot(i)`
and its IRQ (GSI 5 + i). Its interrupt line is an irqfd, so a device raises
it from any thread without a KVM exit. Each queue's QueueNotify register
gets an ioeventfd with the queue index as datamatch: the guest's doorbell
write completes inside KVM, and the VMM's event loop (not the vCPU) runs
the device. Where KVM lacks ioeventfds the write exits to the vCPU thread
and the transport runs the device there; both paths take the device lock.

Guests find the devices in the ACPI DSDT (`LNRO0005`, how Firecracker's
current guests and distro kernels do), or, for a kernel booted with
`acpi=off`, from `virtio_mmio.device=` arguments on the command line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import structlog

from vmm.arch.x86_64 import AcpiMmioDevice, virtio_mmio_slot
from vmm.devices.bus import Bus
from vmm.devices.virtio.device import VirtioDevice, VirtioInterrupt
from vmm.devices.virtio.transport.mmio import MmioTransport
from vmm.kvm import KvmError
from vmm.loader import virtio_mmio_device_arg
from vmm.memory import GuestMemory
from vmm.vstate.vm import Vm

log = structlog.get_logger("vmm.device_manager")


class DeviceManagerError(Exception):
    """A device could not be attached."""


@dataclass
class AttachedDevice:
    """One virtio device as the VMM sees it."""
    name: str
    device: VirtioDevice
    transport: MmioTransport
    addr: int
    length: int
    irq: int
    notify_fds: list[tuple[int, int]] = field(default_factory=list)  # (eventfd, queue index)


class MmioDeviceManager:
    """Owns the virtio-mmio windows of one VM."""

    def __init__(self, vm: Vm, mmio_bus: Bus, mem: GuestMemory, *, use_ioeventfd: bool = True):
        self.vm = vm
        self.mmio_bus = mmio_bus
        self.mem = mem
        self.use_ioeventfd = use_ioeventfd
        self.devices: list[AttachedDevice] = []

    def attach(self, name: str, device: VirtioDevice) -> AttachedDevice:
        slot = virtio_mmio_slot(len(self.devices))
        transport = MmioTransport(device, self.mem)
        try:
            transport.interrupt.connect(self.vm.interrupt_line(slot.irq))
        except (KvmError, OSError) as exc:
            raise DeviceManagerError(f"cannot wire the interrupt of {name}: {exc}") from exc
        return self._insert(name, device, transport, slot)

    def restore(self, name: str, slot_index: int,
                build: Callable[[VirtioInterrupt], tuple[VirtioDevice, MmioTransport]]) -> AttachedDevice:
        """Re-attach a device from a snapshot at its saved slot (slots are restored in order).

        `build(interrupt)` restores the device and its transport around the
        slot's interrupt line (already wired to the VM) and may raise.
        """
        if slot_index != len(self.devices):
            raise DeviceManagerError(f"{name}: slot {slot_index} restored out of order")
        slot = virtio_mmio_slot(slot_index)
        try:
            interrupt = VirtioInterrupt(self.vm.interrupt_line(slot.irq))
        except (KvmError, OSError) as exc:
            raise DeviceManagerError(f"cannot wire the interrupt of {name}: {exc}") from exc
        device, transport = build(interrupt)
        return self._insert(name, device, transport, slot)

    def _insert(self, name: str, device: VirtioDevice, transport: MmioTransport, slot) -> AttachedDevice:
        self.mmio_bus.insert(transport, slot.addr, slot.len)
        attached = AttachedDevice(name, device, transport, slot.addr, slot.len, slot.irq)
        if self.use_ioeventfd:
            for offset, index in transport.notify_addresses():
                efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                try:
                    self.vm.fd.register_ioeventfd(efd, slot.addr + offset, 4, datamatch=index)
                except KvmError as exc:
                    os.close(efd)
                    log.warning("no ioeventfd; queue notifications exit to the vCPU", device=name, error=str(exc))
                    break
                attached.notify_fds.append((efd, index))
        self.devices.append(attached)
        log.info("virtio device attached", name=name, type=device.device_type, addr=hex(slot.addr),
                 irq=slot.irq, ioeventfds=len(attached.notify_fds))
        return attached

    def event_sources(self) -> list[tuple[int, Callable[[], None]]]:
        """(fd, handler) pairs for the VMM event loop: one per queue ioeventfd."""
        sources = []
        for dev in self.devices:
            for efd, index in dev.notify_fds:
                def on_notify(efd: int = efd, transport: MmioTransport = dev.transport, index: int = index) -> None:
                    try:
                        os.eventfd_read(efd)
                    except BlockingIOError:
                        return
                    transport.notify(index)
                sources.append((efd, on_notify))
        return sources

    def acpi_devices(self) -> list[AcpiMmioDevice]:
        return [AcpiMmioDevice(name=f"V{i:03X}", uid=i, mmio_base=d.addr, mmio_len=d.length, irq=d.irq)
                for i, d in enumerate(self.devices)]

    def cmdline_args(self) -> list[str]:
        return [virtio_mmio_device_arg(d.addr, d.length, d.irq) for d in self.devices]

    def close(self) -> None:
        for dev in self.devices:
            for efd, _ in dev.notify_fds:
                os.close(efd)
            dev.notify_fds.clear()

    def get(self, name: str) -> AttachedDevice | None:
        return next((d for d in self.devices if d.name == name), None)

    def __repr__(self) -> str:
        return f"<MmioDeviceManager {len(self.devices)} devices>"

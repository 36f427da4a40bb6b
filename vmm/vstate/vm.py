"""The VM: KVM fds, memory slots, in-kernel irqchip + PIT, interrupt lines."""

from __future__ import annotations

import os
from typing import Callable

import structlog

from vmm.kvm import Kvm, VmFd
from vmm.kvm import bindings as kb
from vmm.memory import GuestMemory

log = structlog.get_logger("vmm.vm")

# Firecracker's x86_64 choices: the TSS and identity map sit just below the
# 4 GiB boundary, inside the MMIO gap and away from the LAPIC/IOAPIC pages.
KVM_TSS_ADDRESS = 0xFFFB_D000
KVM_IDENTITY_MAP_ADDRESS = 0xFFFB_C000


class VmError(Exception):
    """The VM could not be created or configured."""


class Vm:
    """A KVM VM with guest memory registered and the legacy interrupt controllers in the kernel."""

    def __init__(self, kvm: Kvm, memory: GuestMemory, *, track_dirty_pages: bool = False):
        self.kvm = kvm
        self.memory = memory
        self.track_dirty_pages = track_dirty_pages
        self.fd: VmFd = kvm.create_vm()
        self._eventfds: list[int] = []
        try:
            self.fd.set_tss_address(KVM_TSS_ADDRESS)
            self.fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            self.fd.create_irq_chip()
            self.fd.create_pit2(kb.KVM_PIT_SPEAKER_DUMMY)
            flags = kb.KVM_MEM_LOG_DIRTY_PAGES if track_dirty_pages else 0
            for slot, region in enumerate(memory.regions):
                self.fd.set_user_memory_region(slot, region.guest_addr, region.size, region.host_addr, flags)
        except OSError as exc:
            self.close()
            raise VmError(f"cannot set up the VM: {exc}") from exc
        self.supports_irqfd = bool(kvm.check_extension(kb.KVM_CAP_IRQFD))

    def interrupt_line(self, gsi: int) -> Callable[[], None]:
        """An edge trigger for `gsi`: an irqfd where KVM has them, else an IRQ_LINE pulse."""
        if self.supports_irqfd:
            efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self.fd.register_irqfd(efd, gsi)
            self._eventfds.append(efd)

            def trigger(efd: int = efd) -> None:
                try:
                    os.eventfd_write(efd, 1)
                except BlockingIOError:
                    pass  # counter saturated: an interrupt is already pending
            return trigger

        def pulse() -> None:
            self.fd.set_irq_line(gsi, True)
            self.fd.set_irq_line(gsi, False)
        return pulse

    def close(self) -> None:
        for efd in self._eventfds:
            os.close(efd)
        self._eventfds.clear()
        self.fd.close()

    def __repr__(self) -> str:
        return f"<Vm {self.memory.total_size >> 20} MiB, {len(self.memory.regions)} slots>"

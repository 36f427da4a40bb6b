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


def _new_shell(kvm: Kvm) -> VmFd:
    """A VM with everything that does not depend on its memory: TSS, identity map, irqchip, PIT.

    Creating the PIT (and registering memory) waits for a KVM SRCU grace
    period, ~3.5 ms each on a nested host: a VMM waiting for its API request
    prepares this shell in advance (`prepare_shell`) so a snapshot restore
    does not pay for it.
    """
    fd = kvm.create_vm()
    try:
        fd.set_tss_address(KVM_TSS_ADDRESS)
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
        fd.create_irq_chip()
        fd.create_pit2(kb.KVM_PIT_SPEAKER_DUMMY)
    except OSError:
        fd.close()
        raise
    return fd


_prepared: tuple[Kvm, VmFd] | None = None


def prepare_shell() -> None:
    """Create one VM shell (and its /dev/kvm handle) for the next `take_shell`; errors are left for later."""
    global _prepared
    if _prepared is not None:
        return
    try:
        kvm = Kvm()
    except OSError:
        return
    try:
        _prepared = (kvm, _new_shell(kvm))
    except OSError:
        kvm.close()


def take_shell() -> tuple[Kvm, VmFd] | None:
    """The prepared (kvm, VM shell), once; None if none was prepared."""
    global _prepared
    shell, _prepared = _prepared, None
    return shell


class Vm:
    """A KVM VM with guest memory registered and the legacy interrupt controllers in the kernel."""

    def __init__(self, kvm: Kvm, memory: GuestMemory, *, track_dirty_pages: bool = False,
                 shell: VmFd | None = None):
        """`shell`: a VM fd from `prepare_shell` (TSS, identity map, irqchip and PIT already set up)."""
        self.kvm = kvm
        self.memory = memory
        self.track_dirty_pages = track_dirty_pages
        self._eventfds: list[int] = []
        try:
            self.fd: VmFd = shell if shell is not None else _new_shell(kvm)
        except OSError as exc:
            raise VmError(f"cannot create the VM: {exc}") from exc
        try:
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

"""Fixtures for the vstate tests: real /dev/kvm VMs with 16 MiB of memory, no guest kernel."""

from __future__ import annotations

import os
from typing import Callable, Iterator

import pytest

from vmm.arch import x86_64 as arch
from vmm.kvm import Kvm, VcpuFd
from vmm.kvm import bindings as kb
from vmm.memory import GuestMemory
from vmm.vstate.persist import msrs_to_save
from vmm.vstate.vm import Vm

MiB = 1 << 20


@pytest.fixture(scope="module")
def kvm() -> Iterator[Kvm]:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("needs /dev/kvm")
    k = Kvm()
    yield k
    k.close()


@pytest.fixture(scope="module")
def msr_indices(kvm: Kvm) -> list[int]:
    return msrs_to_save(kvm)


def configure_like_builder(kvm: Kvm, fd: VcpuFd) -> None:
    """What `builder.build_for_boot` does to vCPU 0 before the first KVM_RUN (CPUID, boot MSRs, FPU, LINT)."""
    supported = [arch.CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                 for e in kvm.get_supported_cpuid()]
    hidden = arch.PVM_HOST_HIDDEN if arch.is_pvm_host() else frozenset()
    table = arch.build_cpuid(supported, fd.id, 1, hide_features=hidden,
                             tsc_deadline=bool(kvm.check_extension(kb.KVM_CAP_TSC_DEADLINE_TIMER)))
    fd.set_cpuid2([kb.kvm_cpuid_entry2(function=e.function, index=e.index, flags=e.flags,
                                       eax=e.eax, ebx=e.ebx, ecx=e.ecx, edx=e.edx) for e in table])
    assert fd.set_msrs(arch.boot_msrs()) >= len(arch.boot_msrs()) - 1  # HWCR bit: refused by old KVMs
    fpu = kb.kvm_fpu()
    fpu.fcw, fpu.mxcsr = 0x37F, 0x1F80
    fd.set_fpu(fpu)
    fd.set_lapic(arch.set_lint(fd.get_lapic()))


NewVm = Callable[[], tuple[Vm, VcpuFd]]


@pytest.fixture
def new_vm(kvm: Kvm) -> Iterator[NewVm]:
    """A factory of (Vm with 16 MiB at 0, its fresh vCPU 0); everything is closed after the test."""
    made: list[tuple[Vm, VcpuFd, GuestMemory]] = []

    def make() -> tuple[Vm, VcpuFd]:
        mem = GuestMemory.anonymous([(0, 16 * MiB)])
        vm = Vm(kvm, mem)
        fd = vm.fd.create_vcpu(0)
        made.append((vm, fd, mem))
        return vm, fd

    yield make
    for vm, fd, mem in reversed(made):
        fd.close()
        vm.close()
        mem.close()

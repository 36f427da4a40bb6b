from __future__ import annotations

from vmm.arch.x86_64 import msr


def test_boot_msrs_match_firecracker():
    got = dict(msr.boot_msrs())
    assert len(got) == len(msr.boot_msrs())  # no index twice
    for index in (msr.MSR_IA32_SYSENTER_CS, msr.MSR_IA32_SYSENTER_ESP, msr.MSR_IA32_SYSENTER_EIP,
                  msr.MSR_STAR, msr.MSR_LSTAR, msr.MSR_CSTAR, msr.MSR_SYSCALL_MASK,
                  msr.MSR_KERNEL_GS_BASE, msr.MSR_IA32_TSC):
        assert got[index] == 0
    assert got[msr.MSR_IA32_MISC_ENABLE] == 1
    assert got[msr.MSR_MTRRdefType] == 0x806


def test_boot_msrs_set_hwcr_tsc_freq_sel_last():
    # Linux bsp_init_amd() warns "[Firmware Bug]: TSC doesn't count with P0 frequency!" when
    # HWCR bit 24 is clear; KVM resets HWCR to 0. It goes last: KVM_SET_MSRS stops at the first
    # refusal, and an older host KVM refuses the bit.
    assert msr.MSR_K7_HWCR == 0xC0010015 and msr.MSR_K7_HWCR_TSC_FREQ_SEL == 1 << 24
    assert msr.boot_msrs()[-1] == (msr.MSR_K7_HWCR, 1 << 24)
    assert msr.msr_should_save(msr.MSR_K7_HWCR)  # and a snapshot carries it over


def test_index_values():
    assert (msr.MSR_EFER, msr.MSR_STAR, msr.MSR_LSTAR, msr.MSR_CSTAR, msr.MSR_SYSCALL_MASK) == (
        0xC0000080, 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084)
    assert (msr.MSR_IA32_CR_PAT, msr.MSR_IA32_TSC_DEADLINE, msr.MSR_IA32_MISC_ENABLE) == (0x277, 0x6E0, 0x1A0)
    assert (msr.MSR_KVM_SYSTEM_TIME_NEW, msr.MSR_KVM_WALL_CLOCK_NEW) == (0x4B564D01, 0x4B564D00)
    assert (msr.MSR_KVM_ASYNC_PF_EN, msr.MSR_KVM_STEAL_TIME, msr.MSR_KVM_PV_EOI_EN) == (
        0x4B564D02, 0x4B564D03, 0x4B564D04)


# KVM_GET_MSR_INDEX_LIST of a typical host (msrs_to_save + emulated MSRs).
KVM_LIST = [
    0x11, 0x12, 0x4B564D00, 0x4B564D01, 0x4B564D02, 0x4B564D03, 0x4B564D04, 0x4B564D05, 0x4B564D06,
    0x4B564D07, 0x4B564D08, 0x40000000, 0x40000001, 0x40000020, 0x174, 0x175, 0x176, 0x10, 0x1B,
    0x3A, 0x3B, 0x48, 0x10A, 0x179, 0x17A, 0x17B, 0x1A0, 0x277, 0x2FF, 0x6E0, 0xC0000080, 0xC0000081,
    0xC0000082, 0xC0000083, 0xC0000084, 0xC0000100, 0xC0000101, 0xC0000102, 0xC0000103, 0xC1, 0xC2,
    0x186, 0x187, 0x38D, 0x38F, 0x480, 0x481, 0xDA0, 0xC0010015, 0x1D9, 0x6E0,
    0x34, 0x8B, 0xCE, 0x140, 0x1DB, 0x1DC, 0x1DD, 0x1DE, 0x1FC, 0x345, 0xC0010117, 0xC001011F,
]


def test_snapshot_msrs_filter_and_order():
    got = msr.snapshot_msr_indices(KVM_LIST)
    assert got[-1] == msr.MSR_IA32_TSC_DEADLINE
    assert got.index(msr.MSR_IA32_TSC) < got.index(msr.MSR_IA32_TSC_DEADLINE)
    assert len(got) == len(set(got))
    assert got[:-1] == sorted(got[:-1])
    for wanted in (msr.MSR_IA32_CR_PAT, msr.MSR_KVM_SYSTEM_TIME_NEW, msr.MSR_KVM_WALL_CLOCK_NEW,
                   msr.MSR_KVM_ASYNC_PF_EN, msr.MSR_KVM_STEAL_TIME, msr.MSR_KVM_PV_EOI_EN,
                   msr.MSR_KVM_SYSTEM_TIME, msr.MSR_EFER, msr.MSR_LSTAR, msr.MSR_KERNEL_GS_BASE,
                   msr.MSR_IA32_MISC_ENABLE, msr.MSR_MTRRdefType, msr.MSR_IA32_APICBASE, msr.MSR_IA32_XSS,
                   msr.MSR_MISC_FEATURES_ENABLES, msr.MSR_AMD64_VIRT_SPEC_CTRL, msr.MSR_IA32_LASTINTTOIP):
        assert wanted in got, hex(wanted)
    for unwanted in (msr.MSR_IA32_MCG_CTL, 0xC1, 0x186, 0x38D, 0x345, 0x480, 0xC0010117, 0x40000000, 0x40000020):
        assert unwanted not in got, hex(unwanted)


def test_snapshot_msrs_only_from_what_kvm_lists():
    assert msr.snapshot_msr_indices([msr.MSR_IA32_TSC]) == [msr.MSR_IA32_TSC]
    assert msr.snapshot_msr_indices([]) == []

"""Model-specific registers: indices, boot values, and what a snapshot saves.

Primer. KVM keeps most vCPU MSRs itself; the VMM sets a few at boot
(KVM_SET_MSRS) and, for a snapshot, reads back every MSR that carries guest
state (KVM_GET_MSRS) from the list KVM_GET_MSR_INDEX_LIST reports. As in
Firecracker (src/vmm/src/arch/x86_64/msr.rs), the snapshot list is KVM's
list filtered by a table of MSR ranges known to hold guest state.

Indices: Intel SDM Vol. 4 "Model-Specific Registers", Table 2-2
(architectural MSRs); AMD64 APM Vol. 2 Appendix A; KVM's paravirtual MSRs:
Linux Documentation/virt/kvm/x86/msr.rst.
"""

from __future__ import annotations

__all__ = [
    "MSR_IA32_TSC",
    "MSR_IA32_APICBASE",
    "MSR_IA32_FEATURE_CONTROL",
    "MSR_IA32_TSC_ADJUST",
    "MSR_IA32_SPEC_CTRL",
    "MSR_IA32_ARCH_CAPABILITIES",
    "MSR_IA32_SYSENTER_CS",
    "MSR_IA32_SYSENTER_ESP",
    "MSR_IA32_SYSENTER_EIP",
    "MSR_IA32_MCG_CAP",
    "MSR_IA32_MCG_STATUS",
    "MSR_IA32_MCG_CTL",
    "MSR_IA32_MISC_ENABLE",
    "MSR_IA32_MISC_ENABLE_FAST_STRING",
    "MSR_IA32_DEBUGCTL",
    "MSR_MTRRcap",
    "MSR_MTRR_PHYSBASE0",
    "MSR_MTRRfix64K_00000",
    "MSR_MTRRfix16K_80000",
    "MSR_MTRRfix16K_A0000",
    "MSR_MTRRfix4K_C0000",
    "MSR_IA32_CR_PAT",
    "MSR_MTRRdefType",
    "MTRR_DEF_TYPE_ENABLE",
    "MTRR_TYPE_WRBACK",
    "MSR_IA32_TSC_DEADLINE",
    "MSR_IA32_XSS",
    "MSR_EFER",
    "MSR_STAR",
    "MSR_LSTAR",
    "MSR_CSTAR",
    "MSR_SYSCALL_MASK",
    "MSR_FS_BASE",
    "MSR_GS_BASE",
    "MSR_KERNEL_GS_BASE",
    "MSR_TSC_AUX",
    "MSR_K7_HWCR",
    "MSR_K7_HWCR_TSC_FREQ_SEL",
    "MSR_SMI_COUNT",
    "MSR_IA32_UCODE_REV",
    "MSR_PLATFORM_INFO",
    "MSR_MISC_FEATURES_ENABLES",
    "MSR_IA32_LASTBRANCHFROMIP",
    "MSR_IA32_LASTINTTOIP",
    "MSR_IA32_POWER_CTL",
    "MSR_AMD64_VIRT_SPEC_CTRL",
    "MSR_KVM_WALL_CLOCK",
    "MSR_KVM_SYSTEM_TIME",
    "MSR_KVM_WALL_CLOCK_NEW",
    "MSR_KVM_SYSTEM_TIME_NEW",
    "MSR_KVM_ASYNC_PF_EN",
    "MSR_KVM_STEAL_TIME",
    "MSR_KVM_PV_EOI_EN",
    "MSR_KVM_POLL_CONTROL",
    "MSR_KVM_ASYNC_PF_INT",
    "MSR_KVM_ASYNC_PF_ACK",
    "MSR_KVM_MIGRATION_CONTROL",
    "MSR_KVM_RANGE",
    "SNAPSHOT_MSR_RANGES",
    "boot_msrs",
    "msr_should_save",
    "snapshot_msr_indices",
]

# --- architectural (Intel SDM Vol. 4, Table 2-2) ----------------------------------
MSR_IA32_TSC = 0x10
MSR_IA32_APICBASE = 0x1B
MSR_SMI_COUNT = 0x34
MSR_IA32_FEATURE_CONTROL = 0x3A
MSR_IA32_TSC_ADJUST = 0x3B
MSR_IA32_SPEC_CTRL = 0x48
MSR_IA32_UCODE_REV = 0x8B
MSR_PLATFORM_INFO = 0xCE
MSR_IA32_ARCH_CAPABILITIES = 0x10A
MSR_MISC_FEATURES_ENABLES = 0x140  # bit 0: CPUID faulting, guest-writable
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MCG_CAP = 0x179
MSR_IA32_MCG_STATUS = 0x17A
MSR_IA32_MCG_CTL = 0x17B
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_IA32_MISC_ENABLE_FAST_STRING = 1 << 0  # bit 0: fast-string operations enabled
MSR_IA32_DEBUGCTL = 0x1D9
MSR_IA32_LASTBRANCHFROMIP = 0x1DB  # .. LASTINTTOIP 0x1de
MSR_IA32_LASTINTTOIP = 0x1DE
MSR_IA32_POWER_CTL = 0x1FC
# Memory type range registers (SDM Vol. 3A §12.11).
MSR_MTRRcap = 0xFE
MSR_MTRR_PHYSBASE0 = 0x200  # PHYSBASEn = 0x200 + 2n, PHYSMASKn = 0x201 + 2n
MSR_MTRRfix64K_00000 = 0x250
MSR_MTRRfix16K_80000 = 0x258
MSR_MTRRfix16K_A0000 = 0x259
MSR_MTRRfix4K_C0000 = 0x268  # .. 0x26f
MSR_IA32_CR_PAT = 0x277
MSR_MTRRdefType = 0x2FF
MTRR_DEF_TYPE_ENABLE = 1 << 11  # IA32_MTRR_DEF_TYPE.E
MTRR_TYPE_WRBACK = 6
MSR_IA32_TSC_DEADLINE = 0x6E0
MSR_IA32_XSS = 0xDA0
# x86-64 system registers (SDM Vol. 4 Table 2-2, 0xC000_0080 .. 0xC000_0103).
MSR_EFER = 0xC0000080
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_FS_BASE = 0xC0000100
MSR_GS_BASE = 0xC0000101
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_TSC_AUX = 0xC0000103
# AMD64 APM Vol. 2 Appendix A: hardware configuration register; AMD's
# "Speculative Store Bypass Disable" control for guests (KVM emulates it).
MSR_K7_HWCR = 0xC0010015
# AMD PPR for family 17h/19h, MSRC001_0015 [Hardware Configuration] bit 24
# TscFreqSel: "the TSC increments at the P0 frequency" (read-as-one on every
# CPU since family 10h revision C). KVM resets HWCR to 0 and, since the 2023
# change "KVM: x86: Virtualize HWCR.TscFreqSel [bit 24]", lets the VMM set it.
MSR_K7_HWCR_TSC_FREQ_SEL = 1 << 24
MSR_AMD64_VIRT_SPEC_CTRL = 0xC001011F

# --- KVM paravirtual MSRs (Documentation/virt/kvm/x86/msr.rst) --------------------
MSR_KVM_WALL_CLOCK = 0x11
MSR_KVM_SYSTEM_TIME = 0x12
MSR_KVM_WALL_CLOCK_NEW = 0x4B564D00
MSR_KVM_SYSTEM_TIME_NEW = 0x4B564D01
MSR_KVM_ASYNC_PF_EN = 0x4B564D02
MSR_KVM_STEAL_TIME = 0x4B564D03
MSR_KVM_PV_EOI_EN = 0x4B564D04
MSR_KVM_POLL_CONTROL = 0x4B564D05
MSR_KVM_ASYNC_PF_INT = 0x4B564D06
MSR_KVM_ASYNC_PF_ACK = 0x4B564D07
MSR_KVM_MIGRATION_CONTROL = 0x4B564D08
# msr.rst: "custom MSRs ... in the range 0x4b564d00-0x4b564dff".
MSR_KVM_RANGE = range(0x4B564D00, 0x4B564E00)


def boot_msrs() -> list[tuple[int, int]]:
    """(index, value) pairs set on every vCPU before the first KVM_RUN.

    As Firecracker's create_boot_msr_entries: SYSENTER and SYSCALL MSRs,
    KERNEL_GS_BASE and the TSC zeroed (a fresh CPU; the kernel programs its
    own), fast strings on in IA32_MISC_ENABLE, and MTRRs enabled with
    write-back as the default type so all RAM is cacheable (no variable or
    fixed range is set).

    Last, HWCR.TscFreqSel as AMD hardware has it: Linux's bsp_init_amd()
    reads it on family > 10h CPUs with an invariant TSC and otherwise warns
    "[Firmware Bug]: TSC doesn't count with P0 frequency!". Intel guests
    never read it. It is last because KVM_SET_MSRS stops at the first MSR
    it refuses, and an older host KVM refuses this bit: there the guest only
    keeps its warning. (Xen stopped exposing the bit because OpenBSD 7.3
    then reads the P-state MSRs, which a VM lacks; Ember's guests are Linux.)
    """
    return [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        (MSR_MTRRdefType, MTRR_DEF_TYPE_ENABLE | MTRR_TYPE_WRBACK),
        (MSR_K7_HWCR, MSR_K7_HWCR_TSC_FREQ_SEL),
    ]


# MSRs that hold guest state worth saving, as half-open ranges (Firecracker's
# SERIALIZABLE_MSR_RANGES, plus AMD's VIRT_SPEC_CTRL). Left out on
# purpose: IA32_MCG_CTL (KVM_GET_MSRS fails unless MCG_CAP.CTL_P, which
# Ember does not set up), PMU counters (leaf 0xA is zeroed, so KVM refuses
# them), IA32_PERF_CAPABILITIES (CPUID PDCM is cleared), VMX capability
# MSRs, AMD's VM_HSAVE_PA and Hyper-V MSRs (no nested virtualization or
# Hyper-V enlightenments for Ember guests),
# x2APIC registers 0x800.. (the LAPIC is saved whole with KVM_GET_LAPIC).
SNAPSHOT_MSR_RANGES: tuple[range, ...] = (
    range(MSR_KVM_WALL_CLOCK, MSR_KVM_SYSTEM_TIME + 1),
    range(MSR_IA32_TSC, MSR_IA32_TSC + 1),
    range(MSR_IA32_APICBASE, MSR_IA32_APICBASE + 1),
    range(MSR_SMI_COUNT, MSR_SMI_COUNT + 1),
    range(MSR_IA32_FEATURE_CONTROL, MSR_IA32_TSC_ADJUST + 1),
    range(MSR_IA32_SPEC_CTRL, MSR_IA32_SPEC_CTRL + 1),
    range(MSR_IA32_UCODE_REV, MSR_IA32_UCODE_REV + 1),
    range(MSR_PLATFORM_INFO, MSR_PLATFORM_INFO + 1),
    range(MSR_IA32_ARCH_CAPABILITIES, MSR_IA32_ARCH_CAPABILITIES + 1),
    range(MSR_MISC_FEATURES_ENABLES, MSR_MISC_FEATURES_ENABLES + 1),
    range(MSR_MTRRcap, MSR_MTRRcap + 1),
    range(MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_EIP + 1),
    range(MSR_IA32_MCG_CAP, MSR_IA32_MCG_STATUS + 1),
    range(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE + 1),
    range(MSR_IA32_DEBUGCTL, MSR_IA32_DEBUGCTL + 1),
    range(MSR_IA32_LASTBRANCHFROMIP, MSR_IA32_LASTINTTOIP + 1),
    range(MSR_IA32_POWER_CTL, MSR_IA32_POWER_CTL + 1),
    range(MSR_MTRR_PHYSBASE0, MSR_MTRR_PHYSBASE0 + 0x100),  # variable + fixed MTRRs, PAT, def type
    range(MSR_IA32_TSC_DEADLINE, MSR_IA32_TSC_DEADLINE + 1),
    range(MSR_IA32_XSS, MSR_IA32_XSS + 1),
    range(MSR_EFER, MSR_SYSCALL_MASK + 1),
    range(MSR_FS_BASE, MSR_TSC_AUX + 1),
    range(MSR_K7_HWCR, MSR_K7_HWCR + 1),
    range(MSR_AMD64_VIRT_SPEC_CTRL, MSR_AMD64_VIRT_SPEC_CTRL + 1),
    MSR_KVM_RANGE,
)


def msr_should_save(index: int) -> bool:
    """Whether MSR `index` is part of a vCPU's snapshot state."""
    return any(index in r for r in SNAPSHOT_MSR_RANGES)


def snapshot_msr_indices(supported: list[int]) -> list[int]:
    """The MSRs to save, from KVM_GET_MSR_INDEX_LIST's `supported` indices.

    Sorted, without duplicates, IA32_TSC_DEADLINE last: KVM interprets a
    written deadline against the vCPU's TSC, so on restore the TSC must be
    set first (KVM_SET_MSRS writes in list order).
    """
    chosen = sorted({i for i in supported if msr_should_save(i)})
    if MSR_IA32_TSC_DEADLINE in chosen:
        chosen.remove(MSR_IA32_TSC_DEADLINE)
        chosen.append(MSR_IA32_TSC_DEADLINE)
    return chosen

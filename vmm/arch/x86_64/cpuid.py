"""Guest CPUID: normalize KVM's supported table into one table per vCPU.

Primer. KVM_GET_SUPPORTED_CPUID returns what KVM can expose; the VMM edits
it and hands each vCPU its own table with KVM_SET_CPUID2. The edits are
Firecracker's "normalize" (src/vmm/src/cpu_config/x86_64/cpuid/normalize.rs,
intel/normalize.rs, amd/normalize.rs), written afresh:

* topology: every vCPU is one core of one package, one thread per core.
  The APIC ID is the vCPU index (leaf 1 EBX[31:24], leaf 0xB EDX, AMD
  0x8000001E EAX), leaf 0xB/0x1F describe an SMT level of 1 thread and a
  core level of `cpu_count` cores, leaf 4 / 0x8000001D say L1/L2 are
  private and L3 shared by all;
* leaf 1 ECX: HYPERVISOR set (guests check it before using paravirt
  features), PDCM clear (no IA32_PERF_CAPABILITIES), TSC_DEADLINE set when
  asked (see `build_cpuid`);
* leaf 6 (power management): only ARAT (APIC timer always running) stays;
* leaf 0xA (architectural PMU): zero, so the guest sees no PMU;
* leaf 7: WAITPKG clear (UMWAIT/TPAUSE would idle the physical core),
  FDP_EXCPTN_ONLY and ZERO_FCS_FDS set on Intel, ARCH_CAPABILITIES clear
  on AMD (as Firecracker);
* KVM's leaves 0x40000000 ("KVMKVMKVM\\0\\0\\0") and 0x40000001 (paravirt
  features) pass through, less the paravirt features `hide_features` names
  (KVM_PV_FEATURES; the kvm_pvm profile hides those that need hypercalls).

`hide_features` clears named feature bits (Linux's /proc/cpuinfo names, the
same words `clearcpuid=` takes) and every feature that depends on them
(Linux arch/x86/kernel/cpu/cpuid-deps.c).

On a kvm_pvm host (shared notes, host-kvm.md) ring-0 guest code
runs in KVM's instruction emulator, which cannot run several instructions a
kernel picks when it sees the matching feature. CX16 is honoured when
cleared in the table; the others also appear at ring 0 from the host, so the
kernel must be told with `clearcpuid=` too: `PVM_HOST_HIDDEN` and
`pvm_compat_cmdline()`.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, replace

__all__ = [
    "CpuidError",
    "MissingCpuidLeaf",
    "BadCpuTopology",
    "UnknownCpuFeature",
    "BadVendorString",
    "CpuidEntry",
    "FeatureBit",
    "FEATURES",
    "FEATURE_DEPENDS",
    "KVM_PV_FEATURES",
    "KVM_PV_MM_FEATURES",
    "KVM_CPUID_FLAG_SIGNIFICANT_INDEX",
    "KVM_CPUID_SIGNATURE",
    "KVM_SIGNATURE",
    "KVM_CPUID_FEATURES",
    "VENDOR_INTEL",
    "VENDOR_AMD",
    "VENDOR_HYGON",
    "PVM_CLEARCPUID",
    "PVM_HOST_HIDDEN",
    "build_cpuid",
    "feature_closure",
    "vendor_of",
    "is_pvm_host",
    "pvm_compat_cmdline",
]

# Documentation/virt/kvm/api.rst, KVM_GET_SUPPORTED_CPUID: flags.
KVM_CPUID_FLAG_SIGNIFICANT_INDEX = 1
# Documentation/virt/kvm/x86/cpuid.rst.
KVM_CPUID_SIGNATURE = 0x40000000
KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"
KVM_CPUID_FEATURES = 0x40000001

VENDOR_INTEL = "GenuineIntel"
VENDOR_AMD = "AuthenticAMD"
VENDOR_HYGON = "HygonGenuine"

# xAPIC IDs are 8 bits; one is the IOAPIC's (layout.MAX_VCPUS).
_MAX_CPUS = 254


class CpuidError(Exception):
    """Guest CPUID could not be built."""


class MissingCpuidLeaf(CpuidError):
    """KVM's supported CPUID lacks a leaf every guest needs."""


class BadCpuTopology(CpuidError):
    """vCPU index and count do not describe a valid topology (1..254 vCPUs)."""


class UnknownCpuFeature(CpuidError):
    """No CPUID feature has this name."""


class BadVendorString(CpuidError):
    """CPU vendor string must be 12 ASCII characters."""


@dataclass(frozen=True)
class CpuidEntry:
    """One struct kvm_cpuid_entry2: the result of CPUID(function, index)."""

    function: int
    index: int = 0
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0

    @property
    def key(self) -> tuple[int, int]:
        return self.function, self.index

    def reg(self, name: str) -> int:
        return int(getattr(self, name))

    def with_reg(self, name: str, value: int) -> "CpuidEntry":
        return replace(self, **{name: value & 0xFFFFFFFF})

    def __repr__(self) -> str:
        return (
            f"CpuidEntry({self.function:#x}.{self.index} flags={self.flags} eax={self.eax:#010x} "
            f"ebx={self.ebx:#010x} ecx={self.ecx:#010x} edx={self.edx:#010x})"
        )


@dataclass(frozen=True)
class FeatureBit:
    """Where a feature flag lives: CPUID(leaf, subleaf).reg[bit]."""

    leaf: int
    subleaf: int
    reg: str
    bit: int


def _bits(leaf: int, subleaf: int, reg: str, names: dict[int, str]) -> dict[str, FeatureBit]:
    return {name: FeatureBit(leaf, subleaf, reg, bit) for bit, name in names.items()}


# KVM's paravirtual features in CPUID 0x40000001 EAX, named after their
# KVM_FEATURE_ constants (Linux Documentation/virt/kvm/x86/cpuid.rst;
# /proc/cpuinfo has no names for them and `clearcpuid=` does not reach them).
# Only the ones a guest kernel drives with a KVM hypercall (VMCALL/VMMCALL,
# Documentation/virt/kvm/x86/hypercalls.rst) are listed: PV_UNHALT
# (KVM_HC_KICK_CPU, paravirt spinlocks), PV_SEND_IPI (KVM_HC_SEND_IPI),
# PV_SCHED_YIELD (KVM_HC_SCHED_YIELD) and HC_MAP_GPA_RANGE.
KVM_PV_FEATURES: dict[str, FeatureBit] = _bits(KVM_CPUID_FEATURES, 0, "eax", {
    7: "kvm_pv_unhalt", 11: "kvm_pv_send_ipi", 13: "kvm_pv_sched_yield", 16: "kvm_hc_map_gpa_range",
})
# KVM paravirt features that rely on the host acting for the guest's memory
# management: PV TLB flush (the guest skips shootdown IPIs to preempted
# vCPUs and trusts the host to flush on their next entry) and async page
# faults. On a kvm_pvm host (shadow paging) a 2-vCPU Linux guest with these
# on saw user processes read zeroes from their own mapped pages (stale
# translations); hidden there, so the guest uses plain IPIs and faults.
KVM_PV_MM_FEATURES: dict[str, FeatureBit] = _bits(KVM_CPUID_FEATURES, 0, "eax", {
    4: "kvm_async_pf", 9: "kvm_pv_tlb_flush", 10: "kvm_async_pf_vmexit", 14: "kvm_async_pf_int",
})

# Feature flags by Linux name (arch/x86/include/asm/cpufeatures.h: the quoted
# name, else the lower-cased X86_FEATURE_ suffix). Bit positions: Intel SDM
# Vol. 2A, CPUID instruction, Table 3-10 (leaf 1 ECX), Table 3-11 (leaf 1
# EDX), Table 3-8 (leaf 7 sub-leaves 0 and 1, leaf 0DH sub-leaf 1); AMD64 APM
# Vol. 3 Appendix E.3.2 (leaf 8000_0001h ECX/EDX). Then KVM_PV_FEATURES.
FEATURES: dict[str, FeatureBit] = {
    **_bits(0x1, 0, "ecx", {
        0: "pni", 1: "pclmulqdq", 3: "monitor", 5: "vmx", 9: "ssse3", 12: "fma", 13: "cx16",
        15: "pdcm", 17: "pcid", 19: "sse4_1", 20: "sse4_2", 21: "x2apic", 22: "movbe",
        23: "popcnt", 24: "tsc_deadline_timer", 25: "aes", 26: "xsave", 27: "osxsave",
        28: "avx", 29: "f16c", 30: "rdrand", 31: "hypervisor",
    }),
    **_bits(0x1, 0, "edx", {
        3: "pse", 12: "mtrr", 15: "cmov", 19: "clflush", 23: "mmx", 24: "fxsr",
        25: "sse", 26: "sse2", 28: "ht",
    }),
    **_bits(0x7, 0, "ebx", {
        0: "fsgsbase", 3: "bmi1", 4: "hle", 5: "avx2", 7: "smep", 8: "bmi2", 9: "erms",
        10: "invpcid", 11: "rtm", 14: "mpx", 16: "avx512f", 17: "avx512dq", 18: "rdseed",
        19: "adx", 20: "smap", 21: "avx512ifma", 23: "clflushopt", 24: "clwb",
        26: "avx512pf", 27: "avx512er", 28: "avx512cd", 29: "sha_ni", 30: "avx512bw",
        31: "avx512vl",
    }),
    **_bits(0x7, 0, "ecx", {
        1: "avx512vbmi", 2: "umip", 3: "pku", 5: "waitpkg", 6: "avx512_vbmi2", 8: "gfni",
        9: "vaes", 10: "vpclmulqdq", 11: "avx512_vnni", 12: "avx512_bitalg",
        14: "avx512_vpopcntdq", 16: "la57", 22: "rdpid", 27: "movdiri", 28: "movdir64b",
    }),
    **_bits(0x7, 0, "edx", {
        2: "avx512_4vnniw", 3: "avx512_4fmaps", 8: "avx512_vp2intersect", 22: "amx_bf16",
        23: "avx512_fp16", 24: "amx_tile", 25: "amx_int8",
    }),
    **_bits(0x7, 1, "eax", {4: "avx_vnni", 5: "avx512_bf16"}),
    **_bits(0xD, 1, "eax", {0: "xsaveopt", 1: "xsavec", 2: "xgetbv1", 3: "xsaves"}),
    **_bits(0x80000001, 0, "ecx", {
        0: "lahf_lm", 5: "abm", 6: "sse4a", 8: "3dnowprefetch", 11: "xop", 16: "fma4",
        21: "tbm", 22: "topoext",
    }),
    **_bits(0x80000001, 0, "edx", {20: "nx", 26: "pdpe1gb", 27: "rdtscp"}),
    **KVM_PV_FEATURES,
    **KVM_PV_MM_FEATURES,
}

# feature -> the feature it needs (Linux arch/x86/kernel/cpu/cpuid-deps.c, for
# the features above; osxsave and the AMX/AVX-VNNI rows follow the SDM's
# enumeration rules: they require XSAVE / AVX state).
FEATURE_DEPENDS: dict[str, tuple[str, ...]] = {
    "osxsave": ("xsave",),
    "xsaveopt": ("xsave",), "xsavec": ("xsave",), "xsaves": ("xsave",), "xgetbv1": ("xsave",),
    "avx": ("xsave",), "pku": ("xsave",), "mpx": ("xsave",),
    "xsave": ("fxsr",), "sse": ("fxsr",), "mmx": ("fxsr",), "cmov": ("fxsr",),
    "sse2": ("sse",), "pni": ("sse2",), "sse4_1": ("sse2",), "sse4_2": ("sse2",),
    "pclmulqdq": ("sse2",), "ssse3": ("sse2",), "f16c": ("sse2",), "aes": ("sse2",),
    "sha_ni": ("sse2",), "gfni": ("sse2",),
    "fma": ("avx",), "vaes": ("avx",), "vpclmulqdq": ("avx",), "avx2": ("avx",),
    "avx512f": ("avx",), "avx_vnni": ("avx",),
    "avx512ifma": ("avx512f",), "avx512pf": ("avx512f",), "avx512er": ("avx512f",),
    "avx512cd": ("avx512f",), "avx512dq": ("avx512f",), "avx512bw": ("avx512f",),
    "avx512vl": ("avx512f",), "avx512vbmi": ("avx512f",), "avx512_4vnniw": ("avx512f",),
    "avx512_4fmaps": ("avx512f",), "avx512_vpopcntdq": ("avx512f",),
    "avx512_vbmi2": ("avx512vl",), "avx512_vnni": ("avx512vl",), "avx512_bitalg": ("avx512vl",),
    "avx512_vp2intersect": ("avx512vl",), "avx512_bf16": ("avx512vl",),
    "avx512_fp16": ("avx512bw",),
    "amx_tile": ("xsave",), "amx_bf16": ("amx_tile",), "amx_int8": ("amx_tile",),
}

# The clearcpuid= list measured on the kvm_pvm host (host-kvm.md, third and
# fourth attempts). The value must stay under 128 characters: Linux reads it
# into `char arg[128]` (arch/x86/kernel/cpu/common.c cpu_parse_early_param).
PVM_CLEARCPUID: tuple[str, ...] = (
    "smap", "popcnt", "avx", "avx2", "bmi1", "bmi2", "fma", "f16c", "movbe", "aes",
    "pclmulqdq", "sha_ni", "xsaveopt", "rdrand", "rdseed", "umip",
)
# Hidden in the CPUID table on a kvm_pvm host: CX16 (SLUB's cmpxchg16b; the
# table bit is honoured), XSAVE (xrstor64; the kernel also gets `noxsave`),
# the clearcpuid list, so table and kernel agree, and KVM's hypercall-based
# paravirt features. A hypercall from emulated ring 0 never completes there:
# KVM's emulator handles VMCALL by rewriting it into the vendor's native
# hypercall instruction and re-executing it, which lands in the emulator
# again (measured: a 2-vCPU Linux guest's AP spun forever on the VMCALL of
# KVM_HC_SEND_IPI in __send_ipi_mask during SMP bring-up). Without them
# Linux sends IPIs through the local APIC and spins natively.
# PCID/INVPCID: with them Linux switches CR3 keeping tagged TLB entries (the
# no-flush bit), which this host's shadow paging mishandles across vCPUs:
# with 2 vCPUs, user processes intermittently read zeroes from their own TLS
# page (busybox NULL dereference on either CPU) until PCID was hidden.
PVM_HOST_HIDDEN: frozenset[str] = frozenset(
    {"cx16", "xsave", "pcid", "invpcid", *PVM_CLEARCPUID, *KVM_PV_FEATURES, *KVM_PV_MM_FEATURES})

# Linux cpufeatures.h word numbers of the CPUID registers above, for
# `clearcpuid=` bit numbers (word * 32 + bit).
_LINUX_CAP_WORD: dict[tuple[int, int, str], int] = {
    (0x1, 0, "edx"): 0, (0x80000001, 0, "edx"): 1, (0x1, 0, "ecx"): 4,
    (0x80000001, 0, "ecx"): 6, (0x7, 0, "ebx"): 9, (0xD, 1, "eax"): 10,
    (0x7, 1, "eax"): 12, (0x7, 0, "ecx"): 16, (0x7, 0, "edx"): 18,
}


def feature_closure(names: set[str] | frozenset[str]) -> frozenset[str]:
    """`names` (fnmatch patterns allowed, e.g. "avx512*") plus every feature
    that depends on one of them, transitively."""
    chosen: set[str] = set()
    for pattern in names:
        matches = fnmatch.filter(FEATURES, pattern)
        if not matches:
            raise UnknownCpuFeature(pattern)
        chosen.update(matches)
    changed = True
    while changed:
        changed = False
        for feat, needs in FEATURE_DEPENDS.items():
            if feat not in chosen and any(n in chosen for n in needs):
                chosen.add(feat)
                changed = True
    return frozenset(chosen)


def vendor_of(entries: list[CpuidEntry]) -> str:
    """The 12-character vendor string of leaf 0 (EBX, EDX, ECX)."""
    leaf0 = next((e for e in entries if e.key == (0, 0)), None)
    if leaf0 is None:
        raise MissingCpuidLeaf("leaf 0x0")
    raw = b"".join(v.to_bytes(4, "little") for v in (leaf0.ebx, leaf0.edx, leaf0.ecx))
    return raw.decode("latin-1")


# --- bit helpers ---------------------------------------------------------------


def _set_bit(value: int, bit: int, on: bool) -> int:
    return (value | (1 << bit)) if on else (value & ~(1 << bit))


def _set_field(value: int, lo: int, hi: int, field: int) -> int:
    width = hi - lo + 1
    if not 0 <= field < (1 << width):
        raise BadCpuTopology(f"value {field} does not fit bits {lo}..{hi}")
    mask = ((1 << width) - 1) << lo
    return (value & ~mask) | (field << lo)


def _get_field(value: int, lo: int, hi: int) -> int:
    return (value >> lo) & ((1 << (hi - lo + 1)) - 1)


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


class _Table:
    """Entries by (function, index), keeping edits in one place."""

    def __init__(self, entries: list[CpuidEntry]) -> None:
        self.by_key: dict[tuple[int, int], CpuidEntry] = {}
        for e in entries:
            self.by_key[e.key] = e

    def get(self, function: int, index: int = 0) -> CpuidEntry | None:
        return self.by_key.get((function, index))

    def put(self, e: CpuidEntry) -> None:
        self.by_key[e.key] = e

    def subleaves(self, function: int) -> list[CpuidEntry]:
        return sorted((e for e in self.by_key.values() if e.function == function), key=lambda e: e.index)

    def drop(self, function: int) -> None:
        for key in [k for k in self.by_key if k[0] == function]:
            del self.by_key[key]

    def max_basic(self) -> int:
        leaf0 = self.get(0)
        return leaf0.eax if leaf0 else 0

    def sorted(self) -> list[CpuidEntry]:
        return [self.by_key[k] for k in sorted(self.by_key)]


# --- normalization steps ---------------------------------------------------------


def _leaf1(t: _Table, cpu_index: int, cpu_count: int, tsc_deadline: bool) -> None:
    e = t.get(0x1)
    if e is None:
        raise MissingCpuidLeaf("leaf 0x1")
    # SDM Table 3-8, leaf 01H EBX: [15:8] CLFLUSH line size in 8-byte units
    # (64 bytes), [23:16] max addressable logical processor IDs in the package
    # (valid with EDX.HTT; the next power of two, 0xff standing for 256),
    # [31:24] initial APIC ID.
    ebx = _set_field(e.ebx, 8, 15, 8)
    ebx = _set_field(ebx, 16, 23, min(_next_pow2(cpu_count), 0xFF))
    ebx = _set_field(ebx, 24, 31, cpu_index)
    ecx = _set_bit(e.ecx, 15, False)            # PDCM
    ecx = _set_bit(ecx, 24, tsc_deadline)        # TSC-Deadline
    ecx = _set_bit(ecx, 31, True)                # hypervisor present (reserved on bare metal)
    edx = _set_bit(e.edx, 28, cpu_count > 1)     # HTT: EBX[23:16] is valid
    t.put(replace(e, ebx=ebx, ecx=ecx, edx=edx))


def _cache_sharing(eax: int, cpu_count: int) -> int:
    """EAX[25:14] (logical processors sharing the cache - 1): L1/L2 private, L3 shared."""
    level = _get_field(eax, 5, 7)
    if level in (1, 2):
        return _set_field(eax, 14, 25, 0)
    if level == 3:
        return _set_field(eax, 14, 25, cpu_count - 1)
    return eax


def _leaf4(t: _Table, cpu_count: int) -> None:
    # SDM Table 3-8, leaf 04H "Deterministic Cache Parameters": stop at the
    # first null cache type (EAX[4:0] = 0); EAX[31:26] = cores in package - 1.
    for e in t.subleaves(0x4):
        if _get_field(e.eax, 0, 4) == 0:
            break
        eax = _cache_sharing(e.eax, cpu_count)
        eax = _set_field(eax, 26, 31, min(cpu_count - 1, 63))
        t.put(replace(e, eax=eax))


def _leaf6(t: _Table) -> None:
    # SDM Table 3-8, leaf 06H "Thermal and Power Management": keep only ARAT
    # (EAX[2], APIC timer runs in every C-state; KVM's always does). Turbo,
    # HWP, EPB and the rest describe host power management the guest must
    # not drive.
    e = t.get(0x6)
    if e is not None:
        t.put(replace(e, eax=e.eax & (1 << 2), ebx=0, ecx=0, edx=0))


def _leaf7(t: _Table, vendor: str) -> None:
    e = t.get(0x7, 0)
    if e is None:
        return
    ebx, ecx, edx = e.ebx, e.ecx, e.edx
    ecx = _set_bit(ecx, 5, False)  # WAITPKG (SDM Table 3-8, leaf 07H ECX[5])
    if vendor == VENDOR_INTEL:
        # FDP_EXCPTN_ONLY (EBX[6]) and "deprecates FPU CS and DS" (EBX[13]):
        # true of every CPU KVM runs on and what Linux's KVM recommends.
        ebx = _set_bit(_set_bit(ebx, 6, True), 13, True)
    else:
        # IA32_ARCH_CAPABILITIES (EDX[29]) does not exist on AMD.
        edx = _set_bit(edx, 29, False)
    t.put(replace(e, ebx=ebx, ecx=ecx, edx=edx))


def _leafa(t: _Table) -> None:
    # SDM Table 3-8, leaf 0AH "Architectural Performance Monitoring": version
    # 0 means no PMU.
    e = t.get(0xA)
    if e is not None:
        t.put(replace(e, eax=0, ebx=0, ecx=0, edx=0))


def _topology_leaf(t: _Table, function: int, cpu_index: int, cpu_count: int) -> None:
    # SDM Table 3-8, leaf 0BH "Extended Topology Enumeration" (0x1F has the
    # same layout): EAX[4:0] shift to the next level's ID, EBX[15:0] logical
    # processors at this level, ECX[7:0] the sub-leaf, ECX[15:8] level type
    # (1 SMT, 2 core, 0 invalid: the end), EDX the x2APIC ID.
    core_shift = (cpu_count - 1).bit_length()
    flags = KVM_CPUID_FLAG_SIGNIFICANT_INDEX
    t.drop(function)
    t.put(CpuidEntry(function, 0, flags, eax=0, ebx=1, ecx=(1 << 8) | 0, edx=cpu_index))
    t.put(CpuidEntry(function, 1, flags, eax=core_shift, ebx=cpu_count, ecx=(2 << 8) | 1, edx=cpu_index))
    t.put(CpuidEntry(function, 2, flags, eax=0, ebx=0, ecx=2, edx=cpu_index))


def _amd_topology(t: _Table, cpu_index: int, cpu_count: int) -> None:
    # AMD64 APM Vol. 3 Appendix E.4.7: 8000_0008h ECX[7:0] NC = threads - 1,
    # ECX[15:12] ApicIdSize (bits of APIC ID that index threads in the
    # package; 0 lets software derive it from NC).
    e = t.get(0x80000008)
    if e is not None:
        ecx = _set_field(e.ecx, 0, 7, cpu_count - 1)
        ecx = _set_field(ecx, 12, 15, (cpu_count - 1).bit_length())
        t.put(replace(e, ecx=ecx))
    # E.4.15: 8000_001Dh cache topology, same NumSharingCache rule as leaf 4.
    for e in t.subleaves(0x8000001D):
        if _get_field(e.eax, 0, 4) == 0:
            break
        t.put(replace(e, eax=_cache_sharing(e.eax, cpu_count)))
    # E.4.16: 8000_001Eh EAX extended APIC ID, EBX[7:0] compute unit (core)
    # ID, EBX[15:8] threads per compute unit - 1, ECX[7:0] node ID,
    # ECX[10:8] nodes per processor - 1.
    e = t.get(0x8000001E)
    if e is not None:
        ebx = _set_field(_set_field(e.ebx, 0, 7, cpu_index), 8, 15, 0)
        ecx = _set_field(_set_field(e.ecx, 0, 7, 0), 8, 10, 0)
        t.put(replace(e, eax=cpu_index, ebx=ebx, ecx=ecx))


def _vendor(t: _Table, vendor_string: str) -> None:
    raw = vendor_string.encode("ascii", errors="replace")
    if len(raw) != 12 or not vendor_string.isascii():
        raise BadVendorString(repr(vendor_string))
    e = t.get(0)
    assert e is not None
    ebx, edx, ecx = (int.from_bytes(raw[i:i + 4], "little") for i in (0, 4, 8))
    t.put(replace(e, ebx=ebx, ecx=ecx, edx=edx))


def _hide(t: _Table, names: frozenset[str]) -> None:
    for name in sorted(names):
        fb = FEATURES[name]
        e = t.get(fb.leaf, fb.subleaf)
        if e is not None:
            t.put(e.with_reg(fb.reg, _set_bit(e.reg(fb.reg), fb.bit, False)))


def build_cpuid(
    supported: list[CpuidEntry],
    cpu_index: int,
    cpu_count: int,
    *,
    hide_features: set[str] | frozenset[str] = frozenset(),
    vendor_string: str | None = None,
    tsc_deadline: bool = True,
) -> list[CpuidEntry]:
    """The CPUID table for vCPU `cpu_index` of `cpu_count`, sorted by (function, index).

    `supported` is KVM_GET_SUPPORTED_CPUID's answer (leaves 0 and 1 must be
    there; any other leaf is normalized when present). Vendor-specific edits
    follow the vendor of `supported` (the real CPU); `vendor_string`, if
    given, only replaces what the guest reads from leaf 0.

    `tsc_deadline` sets leaf 1 ECX[24]. KVM_GET_SUPPORTED_CPUID never
    reports it: TSC-deadline mode is emulated by KVM's in-kernel local APIC
    and advertised by KVM_CAP_TSC_DEADLINE_TIMER instead. Pass True when the
    VM has an in-kernel irqchip and that capability (Firecracker always sets
    it); a tickless guest then programs one-shot deadlines instead of
    calibrating the APIC timer.
    """
    if not 1 <= cpu_count <= _MAX_CPUS:
        raise BadCpuTopology(f"cpu_count={cpu_count}")
    if not 0 <= cpu_index < cpu_count:
        raise BadCpuTopology(f"cpu_index={cpu_index} of {cpu_count}")
    hidden = feature_closure(hide_features)
    t = _Table(supported)
    vendor = vendor_of(supported)
    if vendor_string is not None:
        _vendor(t, vendor_string)
    _leaf1(t, cpu_index, cpu_count, tsc_deadline)
    if vendor == VENDOR_INTEL:
        _leaf4(t, cpu_count)
    _leaf6(t)
    _leaf7(t, vendor)
    _leafa(t)
    if t.max_basic() >= 0xB:
        _topology_leaf(t, 0xB, cpu_index, cpu_count)
    if t.get(0x1F) is not None:
        _topology_leaf(t, 0x1F, cpu_index, cpu_count)
    if vendor in (VENDOR_AMD, VENDOR_HYGON):
        _amd_topology(t, cpu_index, cpu_count)
    _hide(t, hidden)
    return t.sorted()


# --- kvm_pvm hosts -----------------------------------------------------------------


def is_pvm_host(sysfs: str = "/sys") -> bool:
    """True when /dev/kvm is provided by the kvm_pvm module (nested PVM)."""
    return os.path.isdir(os.path.join(sysfs, "module", "kvm_pvm"))


def pvm_compat_cmdline(*, numeric: bool = False) -> str:
    """Kernel arguments a non-PVM guest kernel needs on a kvm_pvm host.

    `noxsave` (no xrstor64 in FPU init), `clearcpuid=` for the features whose
    instructions the emulator cannot run, `mitigations=off` and
    `init_on_alloc=0` (fewer emulated instructions). Linux 6.1 takes a
    comma-separated list of /proc/cpuinfo names (needs
    CONFIG_X86_FEATURE_NAMES, default y, selected by PROC_FS) or bit numbers
    (word * 32 + bit, always accepted); `numeric=True` gives the numbers.

    `nofsgsbase`: with FSGSBASE the kernel's paranoid entry (NMI, #MC, #DB)
    finds its per-CPU base with LSL, which the emulator cannot run, so any
    NMI killed the guest; without it the entry reads MSR_GS_BASE.
    `rcupdate.rcu_cpu_stall_suppress=1`: a vCPU whose emulated ring-0 code is
    starved of host CPU for the stall timeout (21 s) is not stalled in any
    way the guest can fix, and the stall report's NMI backtrace is what hit
    the LSL above (measured: 2-vCPU guest, six VMs on two host cores).
    """
    if numeric:
        words = []
        for name in PVM_CLEARCPUID:
            fb = FEATURES[name]
            words.append(str(_LINUX_CAP_WORD[(fb.leaf, fb.subleaf, fb.reg)] * 32 + fb.bit))
        value = ",".join(words)
    else:
        value = ",".join(PVM_CLEARCPUID)
    return (f"noxsave clearcpuid={value} mitigations=off init_on_alloc=0 nofsgsbase nopcid "
            "rcupdate.rcu_cpu_stall_suppress=1")

from __future__ import annotations

import pytest

from vmm.arch.x86_64.cpuid import (
    FEATURE_DEPENDS,
    FEATURES,
    KVM_PV_FEATURES,
    KVM_PV_MM_FEATURES,
    PVM_CLEARCPUID,
    PVM_HOST_HIDDEN,
    BadCpuTopology,
    BadVendorString,
    CpuidEntry,
    MissingCpuidLeaf,
    UnknownCpuFeature,
    build_cpuid,
    feature_closure,
    is_pvm_host,
    pvm_compat_cmdline,
    vendor_of,
)

E = CpuidEntry


def _vendor_regs(s: str) -> dict[str, int]:
    b = s.encode()
    return {"ebx": int.from_bytes(b[0:4], "little"), "edx": int.from_bytes(b[4:8], "little"),
            "ecx": int.from_bytes(b[8:12], "little")}


# A KVM_GET_SUPPORTED_CPUID answer shaped like a Sapphire Rapids host's.
INTEL = [
    E(0x0, 0, 0, eax=0x1F, **_vendor_regs("GenuineIntel")),
    E(0x1, 0, 0, eax=0x000806F8, ebx=0x03000800, ecx=0xF7FAB223, edx=0x1F8BFBFF),
    E(0x4, 0, 1, eax=0xFC004121, ebx=0x02C0003F, ecx=0x3F, edx=0),
    E(0x4, 1, 1, eax=0xFC004122, ebx=0x01C0003F, ecx=0x3F, edx=0),
    E(0x4, 2, 1, eax=0xFC01C143, ebx=0x03C0003F, ecx=0x7FF, edx=0),
    E(0x4, 3, 1, eax=0xFC3FC163, ebx=0x03C0003F, ecx=0x1BFFF, edx=4),
    E(0x4, 4, 1),
    E(0x6, 0, 0, eax=0x00000077, ebx=0x2, ecx=0x9, edx=0x0),
    E(0x7, 0, 1, eax=1, ebx=0xF1BF07AB, ecx=0x1B415F6E, edx=0xA4010C10),
    E(0x7, 1, 1, eax=0x00001030),
    E(0xA, 0, 0, eax=0x07300802, ebx=0, ecx=0, edx=0x00000603),
    E(0xB, 0, 1, eax=1, ebx=2, ecx=0x100, edx=0x2A),
    E(0xB, 1, 1, eax=7, ebx=0x60, ecx=0x201, edx=0x2A),
    E(0xD, 0, 1, eax=0x2E7, ebx=0xA88, ecx=0x2B00, edx=0),
    E(0xD, 1, 1, eax=0x1F),
    E(0x1F, 0, 1, eax=1, ebx=2, ecx=0x100, edx=0x2A),
    E(0x1F, 1, 1, eax=7, ebx=0x60, ecx=0x201, edx=0x2A),
    E(0x1F, 2, 1, eax=0, ebx=0, ecx=2, edx=0x2A),
    E(0x40000000, 0, 0, eax=0x40000001, ebx=0x4B4D564B, ecx=0x564B4D56, edx=0x4D),
    E(0x40000001, 0, 0, eax=0x01007AFB),
    E(0x80000000, 0, 0, eax=0x80000008),
    E(0x80000001, 0, 0, ecx=0x00000121, edx=0x2C100800),
    E(0x80000008, 0, 0, eax=0x3030),
]

# The answer of this project's kvm_pvm development host (AMD, trimmed).
AMD = [
    E(0x0, 0, 0, eax=0x1C, ebx=0x68747541, ecx=0x444D4163, edx=0x69746E65),
    E(0x1, 0, 0, eax=0x00A10F11, ebx=0x01020800, ecx=0x81202000, edx=0x078BFBFF),
    E(0x4, 0, 1),
    E(0x6, 0, 0, eax=0x4),
    E(0x7, 0, 1, eax=1, ebx=0x01800002, ecx=0x104, edx=0x20000000),
    E(0xA, 0, 0),
    E(0xB, 0, 1, edx=1),
    E(0x40000000, 0, 0, eax=0x40000001, ebx=0x4B4D564B, ecx=0x564B4D56, edx=0x4D),
    E(0x40000001, 0, 0, eax=0x01007EFB),
    E(0x80000000, 0, 0, eax=0x80000021, ebx=0x68747541, ecx=0x444D4163, edx=0x69746E65),
    E(0x80000001, 0, 0, eax=0x00A10F11, ebx=0x40000000, ecx=0x00400393, edx=0x23D3FBFF),
    E(0x80000008, 0, 0, eax=0x3030, ebx=0x50020005, ecx=0x7001),
    E(0x8000001D, 0, 1, eax=0x121, ebx=0x01C0003F, ecx=0x3F),
    E(0x8000001D, 1, 1, eax=0x122, ebx=0x01C0003F, ecx=0x3F),
    E(0x8000001D, 2, 1, eax=0x143, ebx=0x01C0003F, ecx=0x7FF, edx=2),
    E(0x8000001D, 3, 1, eax=0x4163, ebx=0x03C0003F, ecx=0x7FFF, edx=1),
    E(0x8000001D, 4, 1),
    E(0x8000001E, 0, 0, eax=0x7, ebx=0x103, ecx=0x301),
]


def _get(entries, function, index=0) -> CpuidEntry:
    found = [e for e in entries if e.function == function and e.index == index]
    assert len(found) == 1, (hex(function), index)
    return found[0]


def _bits(v: int, lo: int, hi: int) -> int:
    return (v >> lo) & ((1 << (hi - lo + 1)) - 1)


def _has(entries, name: str) -> bool:
    fb = FEATURES[name]
    return bool(getattr(_get(entries, fb.leaf, fb.subleaf), fb.reg) >> fb.bit & 1)


# --- topology --------------------------------------------------------------------------

@pytest.mark.parametrize("table", [INTEL, AMD], ids=["intel", "amd"])
@pytest.mark.parametrize("idx", range(4))
def test_topology_per_vcpu(table, idx):
    out = build_cpuid(table, idx, 4)
    leaf1 = _get(out, 1)
    assert _bits(leaf1.ebx, 24, 31) == idx      # initial APIC ID
    assert _bits(leaf1.ebx, 16, 23) == 4        # addressable logical IDs
    assert _bits(leaf1.ebx, 8, 15) == 8         # CLFLUSH: 64 bytes
    assert leaf1.edx >> 28 & 1                   # HTT
    smt, core, end = (_get(out, 0xB, i) for i in range(3))
    assert (smt.eax & 0x1F, smt.ebx & 0xFFFF, smt.ecx, smt.edx) == (0, 1, 0x100, idx)
    assert (core.eax & 0x1F, core.ebx & 0xFFFF, core.ecx, core.edx) == (2, 4, 0x201, idx)
    assert _bits(end.ecx, 8, 15) == 0 and end.ecx & 0xFF == 2 and end.edx == idx
    assert all(e.flags == 1 for e in (smt, core, end))


def test_single_vcpu_topology():
    out = build_cpuid(INTEL, 0, 1)
    assert not _get(out, 1).edx >> 28 & 1
    assert _bits(_get(out, 1).ebx, 16, 23) == 1
    core = _get(out, 0xB, 1)
    assert core.eax & 0x1F == 0 and core.ebx == 1


def test_large_vcpu_count_fits_leaf1():
    out = build_cpuid(INTEL, 200, 254)
    assert _bits(_get(out, 1).ebx, 16, 23) == 0xFF and _bits(_get(out, 1).ebx, 24, 31) == 200
    assert _get(out, 0xB, 1).eax & 0x1F == 8


def test_intel_leaf4_caches_and_leaf1f():
    out = build_cpuid(INTEL, 1, 3)
    for sub in (0, 1, 2):                       # L1d, L1i, L2: private
        eax = _get(out, 4, sub).eax
        assert _bits(eax, 14, 25) == 0 and _bits(eax, 26, 31) == 2
        assert eax & 0x3FFF == _get(INTEL, 4, sub).eax & 0x3FFF  # type/level bits kept
    assert _bits(_get(out, 4, 3).eax, 14, 25) == 2  # L3: all three vCPUs
    assert _get(out, 4, 4) == _get(INTEL, 4, 4)
    for i in range(3):
        assert _get(out, 0x1F, i) == E(0x1F, i, 1, **{r: getattr(_get(out, 0xB, i), r)
                                                      for r in ("eax", "ebx", "ecx", "edx")})


def test_amd_extended_topology():
    out = build_cpuid(AMD, 2, 3)
    e1e = _get(out, 0x8000001E)
    assert e1e.eax == 2 and e1e.ebx & 0xFF == 2 and _bits(e1e.ebx, 8, 15) == 0
    assert e1e.ecx & 0x7FF == 0
    e08 = _get(out, 0x80000008)
    assert e08.ecx & 0xFF == 2 and _bits(e08.ecx, 12, 15) == 2
    assert _bits(_get(out, 0x8000001D, 0).eax, 14, 25) == 0
    assert _bits(_get(out, 0x8000001D, 3).eax, 14, 25) == 2
    assert not _get(out, 7).edx >> 29 & 1        # no IA32_ARCH_CAPABILITIES on AMD
    assert _get(out, 4) == _get(AMD, 4)           # Intel-only leaf untouched


# --- feature normalization ---------------------------------------------------------------

def test_leaf1_flags():
    out = build_cpuid(INTEL, 0, 2)
    assert _has(out, "hypervisor")
    assert not _has(out, "pdcm")
    assert _has(out, "tsc_deadline_timer")
    assert not _has(build_cpuid(INTEL, 0, 2, tsc_deadline=False), "tsc_deadline_timer")
    assert _has(build_cpuid(AMD, 0, 1), "x2apic")


def test_power_pmu_and_waitpkg():
    out = build_cpuid(INTEL, 0, 2)
    assert _get(out, 6) == E(6, 0, 0, eax=0x4)  # only ARAT
    assert _get(out, 0xA) == E(0xA, 0, 0)
    leaf7 = _get(out, 7)
    assert not _has(out, "waitpkg")
    assert leaf7.ebx >> 6 & 1 and leaf7.ebx >> 13 & 1
    assert leaf7.edx == _get(INTEL, 7).edx


def test_kvm_leaves_pass_through():
    for table in (INTEL, AMD):
        out = build_cpuid(table, 1, 2)
        for f in (0x40000000, 0x40000001):
            assert _get(out, f) == _get(table, f)
        sig = _get(out, 0x40000000)
        raw = b"".join(v.to_bytes(4, "little") for v in (sig.ebx, sig.ecx, sig.edx))
        assert raw == b"KVMKVMKVM\0\0\0"


def test_pvm_profile_hides_hypercall_paravirt_features():
    # On kvm_pvm a VMCALL from emulated ring 0 never completes: a 2-vCPU guest's AP hung on
    # KVM_HC_SEND_IPI during SMP bring-up. Documentation/virt/kvm/x86/cpuid.rst bit numbers.
    hypercall_bits = {"kvm_pv_unhalt": 7, "kvm_pv_send_ipi": 11, "kvm_pv_sched_yield": 13,
                      "kvm_hc_map_gpa_range": 16}
    assert {n: fb.bit for n, fb in KVM_PV_FEATURES.items()} == hypercall_bits
    assert all((fb.leaf, fb.subleaf, fb.reg) == (0x40000001, 0, "eax") for fb in KVM_PV_FEATURES.values())
    assert PVM_HOST_HIDDEN >= set(KVM_PV_FEATURES)
    mm_bits = {"kvm_async_pf": 4, "kvm_pv_tlb_flush": 9, "kvm_async_pf_vmexit": 10, "kvm_async_pf_int": 14}
    assert {n: fb.bit for n, fb in KVM_PV_MM_FEATURES.items()} == mm_bits
    assert PVM_HOST_HIDDEN >= set(KVM_PV_MM_FEATURES)
    mask = sum(1 << b for b in (*hypercall_bits.values(), *mm_bits.values()))
    for table in (INTEL, AMD):
        out = build_cpuid(table, 1, 2, hide_features=PVM_HOST_HIDDEN)
        assert _get(out, 0x40000000) == _get(table, 0x40000000)
        before, after = _get(table, 0x40000001).eax, _get(out, 0x40000001).eax
        assert before & (1 << 11)  # the host offers PV_SEND_IPI ...
        assert after == before & ~mask  # ... and only the hypercall and PV-MM features go
        assert after & 1 and after >> 24 & 1  # kvmclock and its stable bit stay
    # Clearing a KVM paravirt bit must not leak into clearcpuid=, which cannot name it.
    assert "kvm" not in pvm_compat_cmdline() and "kvm" not in pvm_compat_cmdline(numeric=True)


def test_output_is_sorted_unique_and_input_untouched():
    before = list(INTEL)
    out = build_cpuid(INTEL, 1, 2, hide_features={"avx2"})
    assert INTEL == before
    keys = [(e.function, e.index) for e in out]
    assert keys == sorted(set(keys))
    assert {(e.function, e.index) for e in INTEL} <= set(keys)


# --- hiding -----------------------------------------------------------------------------

def test_hide_single_feature():
    base = build_cpuid(INTEL, 0, 1)
    out = build_cpuid(INTEL, 0, 1, hide_features={"avx2"})
    assert _has(base, "avx2") and not _has(out, "avx2")
    assert _has(out, "avx") and _has(out, "bmi2")
    changed = [(a, b) for a, b in zip(base, out) if a != b]
    assert len(changed) == 1 and changed[0][0].function == 7


def test_hide_xsave_takes_its_dependents():
    out = build_cpuid(INTEL, 0, 1, hide_features={"xsave"})
    for name in ("xsave", "osxsave", "avx", "avx2", "fma", "avx512f", "avx512vl", "avx512_bf16", "avx_vnni",
                 "xsaveopt", "xsavec", "xsaves", "pku", "amx_tile"):
        assert not _has(out, name), name
    for name in ("sse4_2", "aes", "bmi1", "popcnt"):
        assert _has(out, name), name


def test_hide_patterns():
    out = build_cpuid(INTEL, 0, 1, hide_features={"avx512*"})
    assert not any(_has(out, n) for n in FEATURES if n.startswith("avx512"))
    assert _has(out, "avx2")
    assert feature_closure(frozenset({"sse2"})) >= {"sse2", "pni", "sse4_1", "sse4_2", "ssse3", "aes"}


def test_hide_unknown_feature():
    with pytest.raises(UnknownCpuFeature):
        build_cpuid(INTEL, 0, 1, hide_features={"warp_drive"})


def test_pvm_hidden_set_on_the_real_host_table():
    out = build_cpuid(AMD, 0, 1, hide_features=PVM_HOST_HIDDEN)
    assert not _has(out, "cx16") and not _has(out, "umip")
    leaf1 = _get(out, 1)
    assert leaf1.ecx == (0x81202000 & ~(1 << 13)) | (1 << 31) | (1 << 24)


def test_feature_table_is_consistent():
    assert PVM_HOST_HIDDEN >= set(PVM_CLEARCPUID) | {"cx16", "xsave"}
    for name, needs in FEATURE_DEPENDS.items():
        assert name in FEATURES and all(n in FEATURES for n in needs)
    seen = {}
    for name, fb in FEATURES.items():
        assert 0 <= fb.bit < 32 and fb.reg in ("eax", "ebx", "ecx", "edx")
        where = (fb.leaf, fb.subleaf, fb.reg, fb.bit)
        assert where not in seen, (name, seen.get(where))
        seen[where] = name
    # Spot checks against the SDM tables.
    assert FEATURES["cx16"] == FEATURES["cx16"].__class__(1, 0, "ecx", 13)
    assert (FEATURES["smap"].leaf, FEATURES["smap"].reg, FEATURES["smap"].bit) == (7, "ebx", 20)
    assert (FEATURES["umip"].reg, FEATURES["umip"].bit) == ("ecx", 2)
    assert (FEATURES["xsaveopt"].leaf, FEATURES["xsaveopt"].subleaf) == (0xD, 1)
    assert (FEATURES["pdpe1gb"].leaf, FEATURES["pdpe1gb"].bit) == (0x80000001, 26)


# --- vendor and errors ---------------------------------------------------------------------

def test_vendor_override_keeps_host_normalization():
    out = build_cpuid(INTEL, 0, 2, vendor_string="EmberEmberVM")
    assert vendor_of(out) == "EmberEmberVM"
    assert vendor_of(INTEL) == "GenuineIntel"
    assert _bits(_get(out, 4, 3).eax, 14, 25) == 1   # still Intel's leaf 4 treatment
    with pytest.raises(BadVendorString):
        build_cpuid(INTEL, 0, 1, vendor_string="short")


@pytest.mark.parametrize("idx,count", [(0, 0), (0, 255), (2, 2), (-1, 2)])
def test_bad_topology(idx, count):
    with pytest.raises(BadCpuTopology):
        build_cpuid(INTEL, idx, count)


def test_missing_leaves():
    with pytest.raises(MissingCpuidLeaf):
        build_cpuid([e for e in INTEL if e.function != 0], 0, 1)
    with pytest.raises(MissingCpuidLeaf):
        build_cpuid([e for e in INTEL if e.function != 1], 0, 1)


def test_minimal_table_without_topology_leaves():
    table = [E(0, 0, 0, eax=1, **_vendor_regs("GenuineIntel")), E(1, 0, 0)]
    out = build_cpuid(table, 0, 2)
    assert [e.function for e in out] == [0, 1]


# --- kvm_pvm -------------------------------------------------------------------------------

def test_pvm_cmdline_names():
    assert pvm_compat_cmdline() == (
        "noxsave clearcpuid=smap,popcnt,avx,avx2,bmi1,bmi2,fma,f16c,movbe,aes,pclmulqdq,sha_ni,"
        "xsaveopt,rdrand,rdseed,umip mitigations=off init_on_alloc=0 nofsgsbase nopcid "
        "rcupdate.rcu_cpu_stall_suppress=1"
    )


def test_pvm_cmdline_numbers():
    args = pvm_compat_cmdline(numeric=True).split()
    value = next(a for a in args if a.startswith("clearcpuid=")).split("=", 1)[1]
    nums = [int(n) for n in value.split(",")]
    # arch/x86/include/asm/cpufeatures.h: SMAP 9*32+20, POPCNT 4*32+23, AVX 4*32+28,
    # XSAVEOPT 10*32+0, UMIP 16*32+2.
    assert nums[:3] == [308, 151, 156]
    assert nums[PVM_CLEARCPUID.index("xsaveopt")] == 320
    assert nums[PVM_CLEARCPUID.index("umip")] == 514
    assert len(nums) == len(PVM_CLEARCPUID)


@pytest.mark.parametrize("numeric", [False, True])
def test_clearcpuid_value_fits_linux_buffer(numeric):
    # cpu_parse_early_param reads the value into char arg[128].
    value = next(a for a in pvm_compat_cmdline(numeric=numeric).split() if a.startswith("clearcpuid="))
    assert len(value.split("=", 1)[1]) < 128


def test_is_pvm_host(tmp_path):
    assert not is_pvm_host(str(tmp_path))
    (tmp_path / "module" / "kvm_pvm").mkdir(parents=True)
    assert is_pvm_host(str(tmp_path))

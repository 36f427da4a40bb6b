from __future__ import annotations

import struct

import pytest

from vmm.arch.x86_64 import layout
from vmm.arch.x86_64.mptable import (
    MP_BUS,
    MP_INTSRC,
    MP_IOAPIC,
    MP_LINTSRC,
    MP_PROCESSOR,
    MptableOutsideMemory,
    TooManyCpus,
    build_mptable,
    mptable_size,
    setup_mptable,
)
from vmm.memory import GuestMemory

ENTRY_SIZES = {MP_PROCESSOR: 20, MP_BUS: 8, MP_IOAPIC: 8, MP_INTSRC: 8, MP_LINTSRC: 8}


def _parse(mem: GuestMemory, addr: int):
    mpf = mem.read(addr, 16)
    assert mpf[:4] == b"_MP_"
    assert sum(mpf) % 256 == 0
    physptr, length, spec = struct.unpack_from("<IBB", mpf, 4)
    assert length == 1 and spec == 4
    assert mpf[11:16] == bytes(5)  # feature bytes: config table present, no IMCR
    hdr = mem.read(physptr, 44)
    sig, tlen, tspec, _csum, oem, prod, oemptr, oemsize, count, lapic = struct.unpack_from(
        "<4sHBB8s12sIHHI", hdr)
    assert sig == b"PCMP" and tspec == 4 and lapic == layout.APIC_ADDR
    table = mem.read(physptr, tlen)
    assert sum(table) % 256 == 0
    entries = []
    off = 44
    while off < tlen:
        kind = table[off]
        size = ENTRY_SIZES[kind]
        entries.append(table[off:off + size])
        off += size
    assert off == tlen and len(entries) == count
    return physptr, entries


@pytest.mark.parametrize("cpus", [1, 2, 4, 254])
def test_mptable_contents_and_checksums(mem16, cpus):
    end = setup_mptable(mem16, cpus)
    assert end == layout.EBDA_START + mptable_size(cpus) <= layout.RSDP_ADDR
    physptr, entries = _parse(mem16, layout.EBDA_START)
    assert physptr == layout.EBDA_START + 16
    procs = [struct.unpack("<BBBBII8x", e) for e in entries if e[0] == MP_PROCESSOR]
    assert [p[1] for p in procs] == list(range(cpus))
    assert procs[0][3] == 3 and all(p[3] == 1 for p in procs[1:])  # enabled, BSP only on cpu 0
    assert all(p[5] & (1 << 9) for p in procs)                      # APIC feature flag
    buses = [e for e in entries if e[0] == MP_BUS]
    assert buses == [struct.pack("<BB6s", MP_BUS, 0, b"ISA   ")]
    ioapics = [struct.unpack("<BBBBI", e) for e in entries if e[0] == MP_IOAPIC]
    assert ioapics == [(MP_IOAPIC, cpus, 0x11, 1, layout.IOAPIC_ADDR)]
    intsrc = [struct.unpack("<BBHBBBB", e) for e in entries if e[0] == MP_INTSRC]
    assert [(i[4], i[5], i[6]) for i in intsrc] == [(irq, cpus, irq) for irq in range(24)]
    assert all(i[1] == 0 and i[2] == 0 and i[3] == 0 for i in intsrc)  # INT, bus default, ISA bus
    lint = [struct.unpack("<BBHBBBB", e) for e in entries if e[0] == MP_LINTSRC]
    assert [(x[1], x[5], x[6]) for x in lint] == [(3, 0, 0), (1, 0xFF, 1)]  # ExtINT->LINT0, NMI->LINT1


def test_mptable_is_deterministic_and_relocatable():
    a = build_mptable(2, 0x9FC00)
    assert a == build_mptable(2, 0x9FC00)
    b = build_mptable(2, 0xF0000)
    assert struct.unpack_from("<I", b, 4)[0] == 0xF0010
    assert sum(b[:16]) % 256 == 0


@pytest.mark.parametrize("cpus", [0, 255])
def test_bad_cpu_counts(mem16, cpus):
    with pytest.raises(TooManyCpus):
        setup_mptable(mem16, cpus)


def test_mptable_must_fit(mem16):
    small = GuestMemory.anonymous([(0, 0xA0000)])
    try:
        with pytest.raises(MptableOutsideMemory):
            setup_mptable(small, 64)
        setup_mptable(small, 1)
    finally:
        small.close()
    with pytest.raises(MptableOutsideMemory):
        setup_mptable(mem16, 4, addr=layout.RSDP_ADDR - 100)

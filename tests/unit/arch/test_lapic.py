from __future__ import annotations

import struct

import pytest

from vmm.arch.x86_64.lapic import (
    APIC_ID,
    APIC_LVT0,
    APIC_LVT1,
    APIC_LVT_MASKED,
    APIC_MODE_EXTINT,
    APIC_MODE_NMI,
    BadLapicImage,
    BadLapicRegister,
    apic_id,
    delivery_mode,
    get_reg,
    set_lint,
    set_reg,
)


def _image(**regs: int) -> bytes:
    b = bytearray(1024)
    for off, v in regs.items():
        struct.pack_into("<I", b, int(off, 16), v)
    return bytes(b)


def test_set_lint_virtual_wire():
    # KVM's reset value for both LVTs is "masked" (0x10000).
    regs = _image(**{"0x350": APIC_LVT_MASKED, "0x360": APIC_LVT_MASKED | 0x200, "0x20": 3 << 24})
    out = set_lint(regs)
    assert get_reg(out, APIC_LVT0) == APIC_LVT_MASKED | 0x700      # ExtINT, mask kept
    assert get_reg(out, APIC_LVT1) == APIC_LVT_MASKED | 0x400      # NMI replaces the old mode
    assert delivery_mode(out, APIC_LVT0) == APIC_MODE_EXTINT
    assert delivery_mode(out, APIC_LVT1) == APIC_MODE_NMI
    assert len(out) == 1024
    # Nothing else changed.
    diff = [i for i in range(1024) if out[i] != regs[i]]
    assert all(0x350 <= i < 0x354 or 0x360 <= i < 0x364 for i in diff)
    assert apic_id(out) == 3


def test_get_set_reg_round_trip():
    regs = bytes(1024)
    out = set_reg(regs, APIC_ID, 0x05000000)
    assert get_reg(out, APIC_ID) == 0x05000000 and apic_id(out) == 5
    assert out[0x20:0x24] == b"\0\0\0\x05"
    assert regs == bytes(1024)  # input untouched


@pytest.mark.parametrize("offset", [-16, 0x351, 0x400, 0x8])
def test_bad_offsets(offset):
    with pytest.raises(BadLapicRegister):
        get_reg(bytes(1024), offset)


def test_bad_image_and_values():
    with pytest.raises(BadLapicImage):
        set_lint(bytes(1023))
    with pytest.raises(BadLapicRegister):
        set_reg(bytes(1024), APIC_ID, 1 << 32)

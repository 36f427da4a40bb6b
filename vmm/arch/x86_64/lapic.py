"""Local APIC register page as KVM exchanges it (struct kvm_lapic_state).

Primer. KVM_GET_LAPIC / KVM_SET_LAPIC move the in-kernel local APIC as a
1024-byte image of its xAPIC register page: each 32-bit register sits at
its MMIO offset (Intel SDM Vol. 3A §11.4.1, Table 11-1), registers 16 bytes
apart. Linux, booting without an MP table's or MADT's say-so, expects the
BIOS to have left the APIC in "virtual wire" mode: LINT0 delivering the
8259 PIC's interrupts as ExtINT and LINT1 delivering NMIs (MP spec 1.4
§3.6.2.2; Firecracker arch/x86_64/interrupts.rs set_lint). These helpers
edit the image as bytes; `vmm.kvm` does the ioctls.
"""

from __future__ import annotations

import struct

__all__ = [
    "LapicError",
    "BadLapicImage",
    "BadLapicRegister",
    "KVM_APIC_REG_SIZE",
    "APIC_ID",
    "APIC_LVR",
    "APIC_TASKPRI",
    "APIC_SPIV",
    "APIC_ICR",
    "APIC_LVTT",
    "APIC_LVT0",
    "APIC_LVT1",
    "APIC_LVTERR",
    "APIC_TMICT",
    "APIC_TMCCT",
    "APIC_TDCR",
    "APIC_MODE_FIXED",
    "APIC_MODE_NMI",
    "APIC_MODE_EXTINT",
    "APIC_LVT_MASKED",
    "get_reg",
    "set_reg",
    "delivery_mode",
    "set_delivery_mode",
    "apic_id",
    "set_lint",
]

# arch/x86/include/uapi/asm/kvm.h: KVM_APIC_REG_SIZE.
KVM_APIC_REG_SIZE = 0x400

# SDM Vol. 3A Table 11-1 "Local APIC Register Address Map" (offsets from the
# APIC base; Linux names from arch/x86/include/asm/apicdef.h).
APIC_ID = 0x20
APIC_LVR = 0x30
APIC_TASKPRI = 0x80
APIC_SPIV = 0xF0
APIC_ICR = 0x300
APIC_LVTT = 0x320
APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_LVTERR = 0x370
APIC_TMICT = 0x380
APIC_TMCCT = 0x390
APIC_TDCR = 0x3E0

# SDM Vol. 3A §11.5.1 Figure 11-8 "Local Vector Table": bits 10:8 delivery
# mode, bit 16 mask.
APIC_MODE_FIXED = 0b000
APIC_MODE_NMI = 0b100
APIC_MODE_EXTINT = 0b111
APIC_LVT_MASKED = 1 << 16
_DELIVERY_MODE_SHIFT = 8
_DELIVERY_MODE_MASK = 0b111 << _DELIVERY_MODE_SHIFT


class LapicError(Exception):
    """Local APIC register image could not be edited."""


class BadLapicImage(LapicError):
    """LAPIC state must be exactly 1024 bytes (struct kvm_lapic_state)."""


class BadLapicRegister(LapicError):
    """Not a local APIC register offset (16-byte aligned, below 0x400)."""


def _check(regs: bytes | bytearray, offset: int) -> None:
    if len(regs) != KVM_APIC_REG_SIZE:
        raise BadLapicImage(f"{len(regs)} bytes")
    if offset < 0 or offset % 16 or offset >= KVM_APIC_REG_SIZE:
        raise BadLapicRegister(f"{offset:#x}")


def get_reg(regs: bytes | bytearray, offset: int) -> int:
    """The 32-bit register at `offset`."""
    _check(regs, offset)
    return struct.unpack_from("<I", regs, offset)[0]


def set_reg(regs: bytes | bytearray, offset: int, value: int) -> bytes:
    """A copy of `regs` with the register at `offset` set to `value`."""
    _check(regs, offset)
    if not 0 <= value <= 0xFFFFFFFF:
        raise BadLapicRegister(f"value {value:#x} is not 32 bits")
    out = bytearray(regs)
    struct.pack_into("<I", out, offset, value)
    return bytes(out)


def delivery_mode(regs: bytes | bytearray, lvt_offset: int) -> int:
    """Bits 10:8 of an LVT register."""
    return (get_reg(regs, lvt_offset) & _DELIVERY_MODE_MASK) >> _DELIVERY_MODE_SHIFT


def set_delivery_mode(regs: bytes | bytearray, lvt_offset: int, mode: int) -> bytes:
    """A copy of `regs` with the LVT register's delivery mode set, other bits kept."""
    if not 0 <= mode <= 0b111:
        raise BadLapicRegister(f"delivery mode {mode:#b}")
    value = (get_reg(regs, lvt_offset) & ~_DELIVERY_MODE_MASK) | (mode << _DELIVERY_MODE_SHIFT)
    return set_reg(regs, lvt_offset, value)


def apic_id(regs: bytes | bytearray) -> int:
    """The xAPIC ID (APIC ID register bits 31:24)."""
    return get_reg(regs, APIC_ID) >> 24


def set_lint(regs: bytes | bytearray) -> bytes:
    """Virtual-wire mode: LINT0 -> ExtINT, LINT1 -> NMI (mask bits untouched)."""
    regs = set_delivery_mode(regs, APIC_LVT0, APIC_MODE_EXTINT)
    return set_delivery_mode(regs, APIC_LVT1, APIC_MODE_NMI)

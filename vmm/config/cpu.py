"""Custom CPU templates: CPUID and MSR bit modifiers, extra KVM capabilities.

Spec: `CpuConfig` (PUT /cpu-config, ``cpu-config`` in the config file, where
it may also be the path of a JSON file holding the template), with
`CpuidLeafModifier`, `CpuidRegisterModifier` and `MsrModifier`. Ember runs
on x86_64 only, so, like an x86_64 Firecracker, it rejects the aarch64
fields (`reg_modifiers`, `vcpu_features`) as unknown.

A bitmap is a tri-state string, most significant bit first: ``1`` sets the
bit, ``0`` clears it, ``x`` leaves it alone; an optional ``0b`` prefix and
``_`` separators are allowed, and missing high bits are ``x``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .errors import InvalidValue
from .schema import (
    U32,
    ConfigType,
    Reader,
    Field,
    Schema,
    enum_of,
    nested,
    read_str,
    sequence_of,
)

__all__ = [
    "CpuConfig",
    "CpuidLeafModifier",
    "CpuidRegister",
    "CpuidRegisterModifier",
    "KvmCapability",
    "MsrModifier",
    "RegisterBitmap",
]


@dataclass(frozen=True)
class RegisterBitmap:
    """Which bits of a `width`-bit register to force (`mask`) and to what (`value`)."""

    width: int
    mask: int
    value: int

    def __post_init__(self) -> None:
        full = (1 << self.width) - 1
        if not (0 <= self.mask <= full and 0 <= self.value <= full):
            raise ValueError(f"bitmap wider than {self.width} bits")
        if self.value & ~self.mask:
            raise ValueError("bitmap value sets bits outside its mask")

    @classmethod
    def parse(cls, text: str, width: int) -> RegisterBitmap:
        """Parse a tri-state string; raises ValueError with Firecracker's wording."""
        digits = text[2:] if text.startswith("0b") else text
        mask = value = 0
        bit = 0
        for ch in reversed(digits):
            if ch == "_":
                continue
            if bit == width:
                raise ValueError(
                    f"Failed to parse string [{text}] as a bitmap - string is too long"
                )
            if ch in "01":
                mask |= 1 << bit
                value |= int(ch) << bit
            elif ch != "x":
                raise ValueError(
                    f"Failed to parse string [{text}] as a bitmap - unknown character: {ch}"
                )
            bit += 1
        return cls(width, mask, value)

    def apply(self, register: int) -> int:
        """`register` with the forced bits replaced."""
        return (register & ~self.mask) | self.value

    def to_json(self) -> str:
        chars = []
        for bit in reversed(range(self.width)):
            chars.append(str(self.value >> bit & 1) if self.mask >> bit & 1 else "x")
        return "0b" + "".join(chars)


def _bitmap_reader(width: int) -> Reader[RegisterBitmap]:
    def read(value: object, path: str) -> RegisterBitmap:
        text = read_str(value, path)
        try:
            return RegisterBitmap.parse(text, width)
        except ValueError as exc:
            raise InvalidValue(str(exc), path=path) from None

    read.__name__ = f"read_bitmap{width}"
    return read


def _parse_number(text: str) -> int:
    if text.startswith("0x"):
        return int(text[2:], 16) if _all_in(text[2:], "0123456789abcdefABCDEF") else -1
    if text.startswith("0b"):
        return int(text[2:], 2) if _all_in(text[2:], "01") else -1
    return int(text) if _all_in(text, "0123456789") else -1


# Longer digit strings cannot be a u32 (and would make int() slow or fail).
_MAX_DIGITS = 40


def _all_in(text: str, alphabet: str) -> bool:
    return 0 < len(text) <= _MAX_DIGITS and all(ch in alphabet for ch in text)


def read_u32_string(value: object, path: str) -> int:
    """A u32 written as a string: ``"0x1f"``, ``"0b101"`` or ``"31"``."""
    text = read_str(value, path)
    number = _parse_number(text)
    if not 0 <= number <= 0xFFFF_FFFF:
        raise InvalidValue(
            f"Failed to parse string [{text}] as a number for CPU template: expected a "
            "u32 written in hexadecimal ('0x' prefix), binary ('0b' prefix) or decimal",
            path=path,
        )
    return number


def _hex(number: int) -> str:
    return f"{number:#x}"


@dataclass(frozen=True)
class KvmCapability:
    """A KVM capability number Ember must check for (or, with `remove`, must not)."""

    number: int
    remove: bool = False

    def to_json(self) -> str:
        return f"!{self.number}" if self.remove else str(self.number)


def read_kvm_capability(value: object, path: str) -> KvmCapability:
    text = read_str(value, path)
    remove = text.startswith("!")
    digits = text[1:] if remove else text
    number = int(digits) if _all_in(digits, "0123456789") else -1
    if not 0 <= number <= 0xFFFF_FFFF:
        raise InvalidValue(
            f"Failed to parse string [{text}] as a kvm capability - can not convert "
            "to numeric",
            path=path,
        )
    return KvmCapability(number, remove)


class CpuidRegister(enum.StrEnum):
    EAX = "eax"
    EBX = "ebx"
    ECX = "ecx"
    EDX = "edx"


@dataclass(frozen=True)
class CpuidRegisterModifier(ConfigType):
    """Spec `CpuidRegisterModifier`: a 32-bit bitmap applied to one register."""

    register: CpuidRegister
    bitmap: RegisterBitmap

    SCHEMA = Schema(
        "CpuidRegisterModifier",
        [
            Field("register", enum_of(CpuidRegister)),
            Field("bitmap", _bitmap_reader(32)),
        ],
    )


@dataclass(frozen=True)
class CpuidLeafModifier(ConfigType):
    """Spec `CpuidLeafModifier`: modifiers for one (leaf, subleaf) and its KVM flags."""

    leaf: int
    subleaf: int
    flags: int
    modifiers: tuple[CpuidRegisterModifier, ...]

    SCHEMA = Schema(
        "CpuidLeafModifier",
        [
            Field("leaf", read_u32_string, write=_hex),
            Field("subleaf", read_u32_string, write=_hex),
            Field("flags", U32),
            Field("modifiers", sequence_of(nested(CpuidRegisterModifier))),
        ],
    )

    def __post_init__(self) -> None:
        if not isinstance(self.modifiers, tuple):
            object.__setattr__(self, "modifiers", tuple(self.modifiers))


@dataclass(frozen=True)
class MsrModifier(ConfigType):
    """Spec `MsrModifier`: a 64-bit bitmap applied to one model-specific register."""

    addr: int
    bitmap: RegisterBitmap

    SCHEMA = Schema(
        "RegisterModifier",
        [
            Field("addr", read_u32_string, write=_hex),
            Field("bitmap", _bitmap_reader(64)),
        ],
    )


@dataclass(frozen=True)
class CpuConfig(ConfigType):
    """Spec `CpuConfig` (x86_64 part): a custom CPU template."""

    kvm_capabilities: tuple[KvmCapability, ...] = ()
    cpuid_modifiers: tuple[CpuidLeafModifier, ...] = ()
    msr_modifiers: tuple[MsrModifier, ...] = ()

    SCHEMA = Schema(
        "CustomCpuTemplate",
        [
            Field("kvm_capabilities", sequence_of(read_kvm_capability), default=()),
            Field("cpuid_modifiers", sequence_of(nested(CpuidLeafModifier)), default=()),
            Field("msr_modifiers", sequence_of(nested(MsrModifier)), default=()),
        ],
    )

    def __post_init__(self) -> None:
        for name in ("kvm_capabilities", "cpuid_modifiers", "msr_modifiers"):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))

"""A small builder of ACPI Machine Language (AML) byte code.

Primer. The DSDT's body is AML: a tree of named objects encoded in prefix
form (ACPI 6.5 §20 "ACPI Machine Language (AML) Specification"). Objects
that contain others (Scope, Device, Method, Package, Buffer) carry a
PkgLength saying how many bytes they span (§20.2.4); names are 4-character
segments, optionally rooted (`\\`) or joined into paths (§20.2.2). Device
resources (_CRS) are a Buffer of resource descriptors closed by an End Tag
(§6.4 "Resource Data Types for ACPI"), which ASL writes as a
ResourceTemplate. Every node here has `encode() -> bytes`; Python ints,
strings, bytes and lists/tuples stand for Integer, String, Buffer and
Package wherever a data object is expected.

Only what Ember's DSDT needs is here: Scope, Device, Name, Method with
Return, Package, Integer (smallest encoding), DWord and QWord (fixed
width), String, EISAID, Buffer, ResourceTemplate with Memory32Fixed, IO,
IRQNoFlags and Interrupt, and for method bodies (§20.2.5.3-4, §20.2.6):
If/Else, LEqual, Notify, Store, Arg0-6, Local0-7 and NamePath (a reference
to a named object, where a bare Python str would be a String).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Union

__all__ = [
    "AmlError",
    "BadAmlName",
    "BadAmlValue",
    "AmlNode",
    "AmlValue",
    "ZERO",
    "ONE",
    "ONES",
    "pkg_length",
    "name_string",
    "encode",
    "Integer",
    "DWord",
    "QWord",
    "String",
    "EisaId",
    "Buffer",
    "Package",
    "Name",
    "Scope",
    "Device",
    "Method",
    "Return",
    "NamePath",
    "Arg",
    "Local",
    "If",
    "LEqual",
    "Notify",
    "Store",
    "ResourceTemplate",
    "ResourceDescriptor",
    "Memory32Fixed",
    "IO",
    "IRQNoFlags",
    "Interrupt",
]

# --- opcodes (ACPI 6.5 §20.3 "AML Byte Stream Byte Values") ----------------------
ZERO_OP = 0x00
ONE_OP = 0x01
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
METHOD_OP = 0x14
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82             # after EXT_OP_PREFIX
ROOT_CHAR = 0x5C             # '\'
PARENT_PREFIX_CHAR = 0x5E    # '^'
LOCAL0_OP = 0x60             # Local0Op..Local7Op = 0x60..0x67
ARG0_OP = 0x68               # Arg0Op..Arg6Op = 0x68..0x6E
STORE_OP = 0x70
NOTIFY_OP = 0x86
LEQUAL_OP = 0x93
IF_OP = 0xA0
ELSE_OP = 0xA1
RETURN_OP = 0xA4
ONES_OP = 0xFF

# --- resource descriptor tags (ACPI 6.5 §6.4.2 small, §6.4.3 large) ---------------
_SMALL_IRQ = 0x04
_SMALL_IO = 0x08
_SMALL_END_TAG = 0x0F
_LARGE_MEMORY32_FIXED = 0x86
_LARGE_EXTENDED_IRQ = 0x89

_U64_MAX = (1 << 64) - 1
_PKG_LENGTH_MAX = (1 << 28) - 1
_NAME_SEG = re.compile(r"^[A-Z_][A-Z0-9_]{0,3}$")


class AmlError(Exception):
    """AML could not be encoded."""


class BadAmlName(AmlError):
    """Not a valid ACPI name (4-character segments of A-Z, 0-9, _, not starting with a digit)."""


class BadAmlValue(AmlError):
    """Value cannot be encoded as the requested AML object."""


class AmlNode:
    """Something that encodes to AML bytes."""

    def encode(self) -> bytes:
        raise NotImplementedError


AmlValue = Union[AmlNode, int, str, bytes, Sequence["AmlValue"]]


def pkg_length(payload_len: int) -> bytes:
    """PkgLength for `payload_len` bytes following it (§20.2.4).

    The encoded length counts the PkgLength bytes themselves. One byte
    holds up to 63; otherwise bits 7:6 of the lead byte give the number
    of following bytes (1-3), bits 3:0 the low nybble, and each following
    byte the next 8 bits.
    """
    if payload_len < 0:
        raise BadAmlValue(f"negative length {payload_len}")
    if payload_len + 1 <= 0x3F:
        return bytes([payload_len + 1])
    for extra in (1, 2, 3):
        total = payload_len + 1 + extra
        if total < 1 << (4 + 8 * extra):
            out = [(extra << 6) | (total & 0xF)]
            out += [(total >> (4 + 8 * i)) & 0xFF for i in range(extra)]
            return bytes(out)
    raise BadAmlValue(f"{payload_len} bytes exceed the 2^28 PkgLength limit")


def _name_seg(seg: str) -> bytes:
    if not _NAME_SEG.match(seg):
        raise BadAmlName(repr(seg))
    return seg.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    """NameString (§20.2.2): `\\` root or `^` parent prefixes, then segments.

    Segments shorter than 4 characters are padded with `_` as ASL does
    ("_SB" is "_SB_").
    """
    i = 0
    prefix = b""
    if path.startswith("\\"):
        prefix, i = bytes([ROOT_CHAR]), 1
    else:
        while i < len(path) and path[i] == "^":
            i += 1
        prefix = bytes([PARENT_PREFIX_CHAR]) * i
    rest = path[i:]
    segs = [_name_seg(s) for s in rest.split(".")] if rest else []
    if not segs:
        if not prefix:
            raise BadAmlName("empty name")
        return prefix + b"\0"  # NullName
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segs)
    if len(segs) > 255:
        raise BadAmlName(f"{len(segs)} segments")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


def encode(value: AmlValue) -> bytes:
    """Encode a node, or a Python int/str/bytes/sequence as Integer/String/Buffer/Package."""
    if isinstance(value, AmlNode):
        return value.encode()
    if isinstance(value, bool):
        raise BadAmlValue("bool is ambiguous; use 0/1 or ZERO/ONE")
    if isinstance(value, int):
        return Integer(value).encode()
    if isinstance(value, str):
        return String(value).encode()
    if isinstance(value, (bytes, bytearray)):
        return Buffer(bytes(value)).encode()
    if isinstance(value, (list, tuple)):
        return Package(list(value)).encode()
    raise BadAmlValue(f"cannot encode {type(value).__name__}")


# --- data objects ------------------------------------------------------------------


@dataclass(frozen=True)
class Integer(AmlNode):
    """An integer in its smallest encoding (§20.2.3): Zero/One/Ones, then
    Byte, Word, DWord or QWord constants. Ones means all 64 bits set (DSDT
    revision 2 and later)."""

    value: int

    def encode(self) -> bytes:
        v = self.value
        if not 0 <= v <= _U64_MAX:
            raise BadAmlValue(f"integer {v} outside 0..2^64-1")
        if v == 0:
            return bytes([ZERO_OP])
        if v == 1:
            return bytes([ONE_OP])
        if v == _U64_MAX:
            return bytes([ONES_OP])
        if v <= 0xFF:
            return bytes([BYTE_PREFIX, v])
        if v <= 0xFFFF:
            return bytes([WORD_PREFIX]) + struct.pack("<H", v)
        if v <= 0xFFFFFFFF:
            return bytes([DWORD_PREFIX]) + struct.pack("<I", v)
        return bytes([QWORD_PREFIX]) + struct.pack("<Q", v)


ZERO = Integer(0)
ONE = Integer(1)
ONES = Integer(_U64_MAX)


@dataclass(frozen=True)
class DWord(AmlNode):
    """DWordConst := DWordPrefix DWordData (§20.2.3): always 4 bytes, whatever
    the value (ASL `DWordConst`), so a table's size does not depend on it."""

    value: int

    def encode(self) -> bytes:
        if not 0 <= self.value <= 0xFFFFFFFF:
            raise BadAmlValue(f"DWord {self.value} outside 0..2^32-1")
        return bytes([DWORD_PREFIX]) + struct.pack("<I", self.value)


@dataclass(frozen=True)
class QWord(AmlNode):
    """QWordConst := QWordPrefix QWordData (§20.2.3): always 8 bytes (ASL
    `QWordConst`). Only DSDT revision 2+ keeps all 64 bits (§5.2.11.1)."""

    value: int

    def encode(self) -> bytes:
        if not 0 <= self.value <= _U64_MAX:
            raise BadAmlValue(f"QWord {self.value} outside 0..2^64-1")
        return bytes([QWORD_PREFIX]) + struct.pack("<Q", self.value)


@dataclass(frozen=True)
class String(AmlNode):
    """A NUL-terminated ASCII string (§20.2.3 String := StringPrefix AsciiCharList NullChar)."""

    value: str

    def encode(self) -> bytes:
        if not all(0x01 <= ord(c) <= 0x7F for c in self.value):
            raise BadAmlValue(f"string {self.value!r} must be ASCII 0x01-0x7f")
        return bytes([STRING_PREFIX]) + self.value.encode("ascii") + b"\0"


@dataclass(frozen=True)
class EisaId(AmlNode):
    """ASL EISAID("PNP0501"): a compressed 7-character ID as a DWord constant.

    Three letters of 5 bits each ('A' = 1) then four hex digits, stored
    big-endian (ACPI 6.5 §19.6.35), so PNP0501 is the DWord 0x0105D041.
    Always a DWord constant, as iasl emits it.
    """

    id: str

    def value(self) -> int:
        s = self.id
        if len(s) != 7 or not all("A" <= c <= "Z" for c in s[:3]) or not re.fullmatch(r"[0-9A-F]{4}", s[3:]):
            raise BadAmlValue(f"EISA ID {s!r} must be 3 capital letters and 4 hex digits")
        vendor = ((ord(s[0]) - 0x40) << 10) | ((ord(s[1]) - 0x40) << 5) | (ord(s[2]) - 0x40)
        big_endian = (vendor << 16) | int(s[3:], 16)
        return int.from_bytes(big_endian.to_bytes(4, "big"), "little")

    def encode(self) -> bytes:
        return bytes([DWORD_PREFIX]) + struct.pack("<I", self.value())


@dataclass(frozen=True)
class Buffer(AmlNode):
    """DefBuffer := BufferOp PkgLength BufferSize ByteList (§20.2.5.4)."""

    data: bytes

    def encode(self) -> bytes:
        payload = Integer(len(self.data)).encode() + bytes(self.data)
        return bytes([BUFFER_OP]) + pkg_length(len(payload)) + payload


class Package(AmlNode):
    """DefPackage := PackageOp PkgLength NumElements PackageElementList (§20.2.5.4)."""

    def __init__(self, elements: Iterable[AmlValue]) -> None:
        self.elements = list(elements)

    def encode(self) -> bytes:
        if len(self.elements) > 255:
            raise BadAmlValue(f"{len(self.elements)} elements; a Package holds at most 255")
        payload = bytes([len(self.elements)]) + b"".join(encode(e) for e in self.elements)
        return bytes([PACKAGE_OP]) + pkg_length(len(payload)) + payload

    def __repr__(self) -> str:
        return f"Package({self.elements!r})"


# --- named objects and control -------------------------------------------------------


class Name(AmlNode):
    """DefName := NameOp NameString DataRefObject (§20.2.5.1)."""

    def __init__(self, path: str, value: AmlValue) -> None:
        self.path = path
        self.value = value

    def encode(self) -> bytes:
        return bytes([NAME_OP]) + name_string(self.path) + encode(self.value)

    def __repr__(self) -> str:
        return f"Name({self.path!r}, {self.value!r})"


class _Container(AmlNode):
    _opcode: bytes = b""

    def __init__(self, path: str, children: Iterable[AmlNode | bytes]) -> None:
        self.path = path
        self.children = list(children)

    def _body(self) -> bytes:
        return b"".join(c if isinstance(c, (bytes, bytearray)) else c.encode() for c in self.children)

    def _head(self) -> bytes:
        return name_string(self.path)

    def encode(self) -> bytes:
        payload = self._head() + self._body()
        return self._opcode + pkg_length(len(payload)) + payload

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, {len(self.children)} children)"


class Scope(_Container):
    """DefScope := ScopeOp PkgLength NameString TermList (§20.2.5.1)."""

    _opcode = bytes([SCOPE_OP])


class Device(_Container):
    """DefDevice := DeviceOp PkgLength NameString TermList (§20.2.5.2)."""

    _opcode = bytes([EXT_OP_PREFIX, DEVICE_OP])


class Method(_Container):
    """DefMethod := MethodOp PkgLength NameString MethodFlags TermList (§20.2.5.2).

    MethodFlags: bits 2:0 argument count, bit 3 serialized, bits 7:4 sync level.
    """

    _opcode = bytes([METHOD_OP])

    def __init__(
        self, path: str, body: Iterable[AmlNode | bytes], *, args: int = 0, serialized: bool = False,
        sync_level: int = 0,
    ) -> None:
        super().__init__(path, body)
        if not 0 <= args <= 7:
            raise BadAmlValue(f"{args} arguments; a method takes 0..7")
        if not 0 <= sync_level <= 15:
            raise BadAmlValue(f"sync level {sync_level}")
        self.flags = args | (int(serialized) << 3) | (sync_level << 4)

    def _head(self) -> bytes:
        return name_string(self.path) + bytes([self.flags])


class Return(AmlNode):
    """DefReturn := ReturnOp ArgObject (§20.2.5.3)."""

    def __init__(self, value: AmlValue) -> None:
        self.value = value

    def encode(self) -> bytes:
        return bytes([RETURN_OP]) + encode(self.value)

    def __repr__(self) -> str:
        return f"Return({self.value!r})"


# --- method bodies: references, arguments, locals, control (§20.2.5.3-4, §20.2.6) -------


def _term_list(terms: Iterable[AmlNode | bytes]) -> bytes:
    return b"".join(t if isinstance(t, (bytes, bytearray)) else t.encode() for t in terms)


@dataclass(frozen=True)
class NamePath(AmlNode):
    """A reference to a named object: the bare NameString (§20.2.2), as a
    SuperName (Notify's target, Store's destination) or a TermArg (the
    object's value, or a call when it names a method without arguments).

    Needed because a Python str elsewhere means a String constant.
    """

    path: str

    def encode(self) -> bytes:
        return name_string(self.path)


@dataclass(frozen=True)
class Arg(AmlNode):
    """ArgObj (§20.2.6.1): Arg0Op (0x68) .. Arg6Op (0x6E), the method's arguments."""

    index: int

    def encode(self) -> bytes:
        if not 0 <= self.index <= 6:
            raise BadAmlValue(f"Arg{self.index}: a method has Arg0..Arg6")
        return bytes([ARG0_OP + self.index])


@dataclass(frozen=True)
class Local(AmlNode):
    """LocalObj (§20.2.6.2): Local0Op (0x60) .. Local7Op (0x67), a method's locals."""

    index: int

    def encode(self) -> bytes:
        if not 0 <= self.index <= 7:
            raise BadAmlValue(f"Local{self.index}: a method has Local0..Local7")
        return bytes([LOCAL0_OP + self.index])


def _super_name(target: AmlNode | str) -> bytes:
    """SuperName := SimpleName | DebugObj | ReferenceTypeOpcode (§20.2.2):
    a str here is a path, since a String constant is never a SuperName."""
    if isinstance(target, str):
        return name_string(target)
    if isinstance(target, (NamePath, Arg, Local)):
        return target.encode()
    raise BadAmlValue(f"{target!r} is not a SuperName (a path, ArgN or LocalN)")


class LEqual(AmlNode):
    """DefLEqual := LequalOp Operand Operand (§20.2.5.4): ASL `LEqual(a, b)`,
    or `a == b` in ASL 2.0; evaluates to Ones if equal, else Zero."""

    def __init__(self, left: AmlValue, right: AmlValue) -> None:
        self.left = left
        self.right = right

    def encode(self) -> bytes:
        return bytes([LEQUAL_OP]) + encode(self.left) + encode(self.right)

    def __repr__(self) -> str:
        return f"LEqual({self.left!r}, {self.right!r})"


class If(AmlNode):
    """DefIfElse := IfOp PkgLength Predicate TermList DefElse, and
    DefElse := Nothing | <ElseOp PkgLength TermList> (§20.2.5.3).

    `else_body=None` emits no Else at all (iasl does the same for an If
    without Else); an empty list emits an empty Else.
    """

    def __init__(
        self, predicate: AmlValue, body: Iterable[AmlNode | bytes],
        else_body: Iterable[AmlNode | bytes] | None = None,
    ) -> None:
        self.predicate = predicate
        self.body = list(body)
        self.else_body = None if else_body is None else list(else_body)

    def encode(self) -> bytes:
        payload = encode(self.predicate) + _term_list(self.body)
        out = bytes([IF_OP]) + pkg_length(len(payload)) + payload
        if self.else_body is not None:
            rest = _term_list(self.else_body)
            out += bytes([ELSE_OP]) + pkg_length(len(rest)) + rest
        return out

    def __repr__(self) -> str:
        tail = "" if self.else_body is None else f", else {len(self.else_body)} terms"
        return f"If({self.predicate!r}, {len(self.body)} terms{tail})"


class Notify(AmlNode):
    """DefNotify := NotifyOp NotifyObject NotifyValue (§20.2.5.3), with
    NotifyObject a SuperName (a device, processor or thermal zone path)
    and NotifyValue a TermArg; values 0x80-0xFF are device-specific (§5.6.6)."""

    def __init__(self, target: AmlNode | str, value: AmlValue) -> None:
        self.target = target
        self.value = value

    def encode(self) -> bytes:
        return bytes([NOTIFY_OP]) + _super_name(self.target) + encode(self.value)

    def __repr__(self) -> str:
        return f"Notify({self.target!r}, {self.value!r})"


class Store(AmlNode):
    """DefStore := StoreOp TermArg SuperName (§20.2.5.4): ASL `Store(value, target)`."""

    def __init__(self, value: AmlValue, target: AmlNode | str) -> None:
        self.value = value
        self.target = target

    def encode(self) -> bytes:
        return bytes([STORE_OP]) + encode(self.value) + _super_name(self.target)

    def __repr__(self) -> str:
        return f"Store({self.value!r}, {self.target!r})"


# --- resource descriptors (ACPI 6.5 §6.4) ----------------------------------------------


class ResourceDescriptor(AmlNode):
    """One resource data item of a ResourceTemplate (raw bytes, not AML)."""


@dataclass(frozen=True)
class Memory32Fixed(ResourceDescriptor):
    """32-Bit Fixed Memory Range Descriptor (§6.4.3.4): tag 0x86, length 9,
    information (bit 0: read-write), base, length."""

    base: int
    length: int
    read_write: bool = True

    def encode(self) -> bytes:
        if not (0 <= self.base <= 0xFFFFFFFF and 0 <= self.length <= 0xFFFFFFFF):
            raise BadAmlValue(f"Memory32Fixed {self.base:#x}+{self.length:#x} is not 32-bit")
        if self.base + self.length > 1 << 32:
            raise BadAmlValue(f"Memory32Fixed {self.base:#x}+{self.length:#x} crosses 4 GiB")
        return struct.pack("<BHBII", _LARGE_MEMORY32_FIXED, 9, int(self.read_write), self.base, self.length)


@dataclass(frozen=True)
class IO(ResourceDescriptor):
    """I/O Port Descriptor (§6.4.2.5), ASL IO(Decode16, min, max, align, len):
    tag 0x47, information (bit 0: 16-bit decode), min, max, alignment, length."""

    minimum: int
    maximum: int
    alignment: int
    length: int
    decode16: bool = True

    def encode(self) -> bytes:
        if not (0 <= self.minimum <= self.maximum <= 0xFFFF):
            raise BadAmlValue(f"IO range {self.minimum:#x}..{self.maximum:#x}")
        if not (0 <= self.alignment <= 0xFF and 0 <= self.length <= 0xFF):
            raise BadAmlValue(f"IO alignment {self.alignment} / length {self.length} exceed a byte")
        tag = (_SMALL_IO << 3) | 7
        return struct.pack("<BBHHBB", tag, int(self.decode16), self.minimum, self.maximum, self.alignment,
                           self.length)


class IRQNoFlags(ResourceDescriptor):
    """IRQ Descriptor without the flags byte (§6.4.2.1): tag 0x22 and a 16-bit
    mask of ISA IRQs; edge-triggered, active high, exclusive."""

    def __init__(self, irqs: Iterable[int]) -> None:
        self.irqs = sorted(set(irqs))

    def encode(self) -> bytes:
        if not self.irqs or not all(0 <= i <= 15 for i in self.irqs):
            raise BadAmlValue(f"IRQNoFlags takes ISA IRQs 0..15, got {self.irqs}")
        mask = sum(1 << i for i in self.irqs)
        return struct.pack("<BH", (_SMALL_IRQ << 3) | 2, mask)

    def __repr__(self) -> str:
        return f"IRQNoFlags({self.irqs})"


class Interrupt(ResourceDescriptor):
    """Extended Interrupt Descriptor (§6.4.3.6), ASL Interrupt(ResourceConsumer,
    Edge|Level, ActiveHigh|ActiveLow, Exclusive|Shared) {gsi, ...}: tag 0x89,
    length, flags (bit 0 consumer, bit 1 edge, bit 2 active low, bit 3
    shared), count, then 32-bit interrupt numbers. No resource source."""

    def __init__(
        self, irqs: int | Iterable[int], *, consumer: bool = True, edge: bool = True,
        active_low: bool = False, shared: bool = False,
    ) -> None:
        self.irqs = [irqs] if isinstance(irqs, int) else list(irqs)
        self.flags = int(consumer) | (int(edge) << 1) | (int(active_low) << 2) | (int(shared) << 3)

    def encode(self) -> bytes:
        if not 1 <= len(self.irqs) <= 255 or not all(0 <= i <= 0xFFFFFFFF for i in self.irqs):
            raise BadAmlValue(f"Interrupt takes 1..255 32-bit numbers, got {self.irqs}")
        body = struct.pack("<BB", self.flags, len(self.irqs)) + struct.pack(f"<{len(self.irqs)}I", *self.irqs)
        return struct.pack("<BH", _LARGE_EXTENDED_IRQ, len(body)) + body

    def __repr__(self) -> str:
        return f"Interrupt({self.irqs}, flags={self.flags:#x})"


class ResourceTemplate(AmlNode):
    """ASL ResourceTemplate(): a Buffer of descriptors ending with an End Tag
    (§6.4.2.9: tag 0x79, checksum 0 = "treat as correct")."""

    def __init__(self, descriptors: Iterable[ResourceDescriptor]) -> None:
        self.descriptors = list(descriptors)

    def encode(self) -> bytes:
        data = b"".join(d.encode() for d in self.descriptors) + bytes([(_SMALL_END_TAG << 3) | 1, 0])
        return Buffer(data).encode()

    def __repr__(self) -> str:
        return f"ResourceTemplate({self.descriptors!r})"

"""AML encodings checked against byte sequences worked out from ACPI 6.5 §20
(and cross-checked with iasl, whose output for the same ASL is quoted)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from vmm.arch.x86_64.acpi.aml import (
    IO,
    ONE,
    ONES,
    ZERO,
    BadAmlName,
    BadAmlValue,
    Buffer,
    Device,
    EisaId,
    Integer,
    Interrupt,
    IRQNoFlags,
    Memory32Fixed,
    Method,
    Name,
    Package,
    ResourceTemplate,
    Return,
    Scope,
    String,
    encode,
    name_string,
    pkg_length,
)


def h(s: str) -> bytes:
    return bytes.fromhex(s.replace(" ", ""))


# --- PkgLength (§20.2.4) -------------------------------------------------------------

@pytest.mark.parametrize("payload,expected", [
    (0, "01"),
    (10, "0b"),
    (62, "3f"),                  # largest one-byte encoding: 63 including itself
    (63, "41 04"),               # 65 = 0x041: lead 0x40 | 1, then 0x04
    (0xFFD, "4f ff"),            # 0xfff: largest two-byte encoding
    (0xFFE, "81 00 01"),         # 0x1001 needs three bytes
    (0xFFFFC, "8f ff ff"),       # 0xfffff: largest three-byte encoding
    (0xFFFFD, "c1 00 00 01"),    # 0x100001
])
def test_pkg_length(payload, expected):
    assert pkg_length(payload) == h(expected)


def test_pkg_length_decodes_back():
    for payload in (0, 1, 62, 63, 64, 200, 4093, 4094, 70000, 1 << 20, (1 << 28) - 5):
        enc = pkg_length(payload)
        extra = enc[0] >> 6
        assert len(enc) == extra + 1
        value = enc[0] & (0x3F if extra == 0 else 0x0F)
        for i in range(extra):
            value |= enc[1 + i] << (4 + 8 * i)
        assert value == payload + len(enc)
    with pytest.raises(BadAmlValue):
        pkg_length(1 << 28)


# --- names (§20.2.2) ----------------------------------------------------------------

@pytest.mark.parametrize("path,expected", [
    ("_HID", "5f484944"),
    ("_SB", "5f53425f"),                                         # padded like ASL
    ("\\_SB_", "5c 5f53425f"),
    ("\\_SB_.COM1", "5c 2e 5f53425f 434f4d31"),                  # DualNamePrefix
    ("\\_SB_.PCI0.ISA_", "5c 2f 03 5f53425f 50434930 4953415f"),  # MultiNamePrefix
    ("^^FOO_", "5e5e 464f4f5f"),
    ("\\", "5c 00"),                                             # root, NullName
])
def test_name_strings(path, expected):
    assert name_string(path) == h(expected)


@pytest.mark.parametrize("path", ["", "1ABC", "ABCDE", "ab", "A.B..C", "_SB-"])
def test_bad_names(path):
    with pytest.raises(BadAmlName):
        name_string(path)


# --- data objects (§20.2.3) -----------------------------------------------------------

@pytest.mark.parametrize("value,expected", [
    (0, "00"), (1, "01"), (2, "0a 02"), (0xFF, "0a ff"), (0x100, "0b 00 01"), (0xFFFF, "0b ff ff"),
    (0x10000, "0c 00 00 01 00"), (0xFFFFFFFF, "0c ff ff ff ff"),
    (0x100000000, "0e 00 00 00 00 01 00 00 00"), ((1 << 64) - 2, "0e fe ff ff ff ff ff ff ff"),
    ((1 << 64) - 1, "ff"),
])
def test_integer_smallest_encoding(value, expected):
    assert Integer(value).encode() == h(expected)
    assert encode(value) == h(expected)


def test_integer_constants_and_range():
    assert (ZERO.encode(), ONE.encode(), ONES.encode()) == (b"\x00", b"\x01", b"\xff")
    for bad in (-1, 1 << 64):
        with pytest.raises(BadAmlValue):
            Integer(bad).encode()
    with pytest.raises(BadAmlValue):
        encode(True)


def test_string():
    assert String("COM1").encode() == h("0d 434f4d31 00")
    assert encode("") == h("0d 00")
    with pytest.raises(BadAmlValue):
        String("caf\u00e9").encode()
    with pytest.raises(BadAmlValue):
        String("a\0b").encode()


@pytest.mark.parametrize("eisa,dword", [
    ("PNP0501", 0x0105D041),   # iasl: EisaId ("PNP0501") -> 0C 41 D0 05 01
    ("PNP0303", 0x0303D041),
    ("PNP0A03", 0x030AD041),
    ("QEMU0002", None),
])
def test_eisaid(eisa, dword):
    if dword is None:
        with pytest.raises(BadAmlValue):
            EisaId(eisa).encode()
        return
    assert EisaId(eisa).value() == dword
    assert EisaId(eisa).encode() == b"\x0c" + dword.to_bytes(4, "little")


def test_buffer_and_package():
    assert Buffer(b"\x01\x02\x03").encode() == h("11 06 0a 03 010203")
    assert Buffer(b"").encode() == h("11 02 00")
    assert Package([1, 0x1234, "A"]).encode() == h("12 09 03 01 0b 3412 0d 41 00")
    assert encode([]) == h("12 02 00")
    assert encode([[2]]) == h("12 07 01 12 04 01 0a 02")
    with pytest.raises(BadAmlValue):
        Package(range(256)).encode()


def test_long_buffer_uses_multibyte_pkglength():
    data = bytes(range(100))
    enc = Buffer(data).encode()
    # 100 data bytes + BytePrefix 0x64 = 102, + 2 PkgLength bytes = 0x68: lead 0x48, then 0x06.
    assert enc[:4] == h("11 48 06 0a") and enc[4] == 100 and enc[5:] == data


# --- named objects and methods (§20.2.5) ---------------------------------------------

def test_name_with_eisaid():
    # iasl: Name (_HID, EisaId ("PNP0501"))
    assert Name("_HID", EisaId("PNP0501")).encode() == h("08 5f484944 0c 41d00501")


def test_method_returning_integer():
    # iasl: Method (_STA, 0, NotSerialized) { Return (0x0F) }
    assert Method("_STA", [Return(0x0F)]).encode() == h("14 09 5f535441 00 a4 0a 0f")


def test_method_flags():
    m = Method("FOO_", [Return(ZERO)], args=3, serialized=True, sync_level=2)
    assert m.encode() == h("14 08 464f4f5f 2b a4 00")
    with pytest.raises(BadAmlValue):
        Method("FOO_", [], args=8)


def test_method_returning_package():
    m = Method("ADDR", [Return(Package([0x45678ABC, 0x123]))])
    assert m.encode() == h("14 12 41444452 00 a4 12 0a 02 0c bc8a6745 0b 2301")


def test_device_and_scope():
    dev = Device("DEV0", [Name("_UID", 1)])
    assert dev.encode() == h("5b82 0b 44455630 08 5f554944 01")
    assert Scope("\\_SB_", [dev]).encode() == h("10 13 5c 5f53425f 5b82 0b 44455630 08 5f554944 01")
    assert Scope("\\_SB_", [b"\xaa"]).encode() == h("10 07 5c 5f53425f aa")


# --- resource descriptors (§6.4) --------------------------------------------------------

def test_io_descriptor():
    # iasl: IO (Decode16, 0x03F8, 0x03F8, 0x01, 0x08)
    assert IO(0x3F8, 0x3F8, 1, 8).encode() == h("47 01 f803 f803 01 08")
    assert IO(0x60, 0x60, 1, 1, decode16=False).encode() == h("47 00 6000 6000 01 01")
    with pytest.raises(BadAmlValue):
        IO(0x100, 0x10, 1, 1).encode()


def test_memory32fixed():
    # iasl: Memory32Fixed (ReadWrite, 0xD0001000, 0x00001000)
    assert Memory32Fixed(0xD0001000, 0x1000).encode() == h("86 0900 01 0010 00d0 00100000")
    assert Memory32Fixed(0xFEC00000, 0x1000, read_write=False).encode()[3] == 0
    with pytest.raises(BadAmlValue):
        Memory32Fixed(0xFFFFF000, 0x2000).encode()


def test_extended_interrupt():
    # iasl: Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) {5}
    assert Interrupt(5).encode() == h("89 0600 03 01 05000000")
    # Interrupt (ResourceConsumer, Level, ActiveLow, Shared, ,, ) {9, 10}
    assert Interrupt([9, 10], edge=False, active_low=True, shared=True).encode() == h(
        "89 0a00 0d 02 09000000 0a000000")
    with pytest.raises(BadAmlValue):
        Interrupt([]).encode()


def test_irq_no_flags():
    assert IRQNoFlags([4]).encode() == h("22 1000")
    assert IRQNoFlags([1, 12]).encode() == h("22 0210")
    with pytest.raises(BadAmlValue):
        IRQNoFlags([16]).encode()


def test_resource_template():
    # iasl: Name (_CRS, ResourceTemplate () { IRQNoFlags () {1} })
    assert ResourceTemplate([IRQNoFlags([1])]).encode() == h("11 08 0a 05 22 0200 79 00")
    assert ResourceTemplate([]).encode() == h("11 05 0a 02 79 00")


# --- cross-check with iasl ------------------------------------------------------------------

ASL = """
DefinitionBlock ("", "DSDT", 2, "EMBER ", "EMBRDSDT", 1)
{
    Scope (\\_SB)
    {
        Device (DEV0)
        {
            Name (_HID, EisaId ("PNP0501"))
            Name (_UID, 0x1234)
            Name (STR0, "hello")
            Name (_CRS, ResourceTemplate ()
            {
                IO (Decode16, 0x03F8, 0x03F8, 0x01, 0x08, )
                Memory32Fixed (ReadWrite, 0xD0001000, 0x00001000, )
                Interrupt (ResourceConsumer, Level, ActiveLow, Shared, ,, ) {9, 10}
                IRQNoFlags () {4}
            })
            Method (_STA, 0, NotSerialized) { Return (0x0F) }
            Name (PKG0, Package (0x03) { One, 0x100000000, "x" })
            Name (BUF0, Buffer (0x03) { 0x01, 0x02, 0x03 })
        }
    }
}
"""


@pytest.mark.skipif(shutil.which("iasl") is None, reason="iasl (acpica-tools) not installed")
def test_matches_iasl(tmp_path):
    (tmp_path / "t.asl").write_text(ASL)
    # -on: keep name paths as written (no \_SB -> _SB shortening).
    subprocess.run(["iasl", "-on", "-p", str(tmp_path / "t"), str(tmp_path / "t.asl")],
                   check=True, capture_output=True)
    theirs = (tmp_path / "t.aml").read_bytes()[36:]
    ours = Scope("\\_SB_", [Device("DEV0", [
        Name("_HID", EisaId("PNP0501")),
        Name("_UID", 0x1234),
        Name("STR0", "hello"),
        Name("_CRS", ResourceTemplate([
            IO(0x3F8, 0x3F8, 1, 8),
            Memory32Fixed(0xD0001000, 0x1000),
            Interrupt([9, 10], edge=False, active_low=True, shared=True),
            IRQNoFlags([4]),
        ])),
        Method("_STA", [Return(0x0F)]),
        Name("PKG0", Package([ONE, 0x100000000, "x"])),
        Name("BUF0", Buffer(b"\x01\x02\x03")),
    ])]).encode()
    assert ours == theirs

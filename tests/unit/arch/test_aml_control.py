"""AML method-body ops (If/Else, LEqual, Notify, Store, ArgN, LocalN, NamePath)
and fixed-width integers, against byte sequences worked out from ACPI 6.5
§20.2-§20.3, then cross-checked with iasl on the same ASL."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from vmm.arch.x86_64.acpi.aml import (
    Arg,
    BadAmlName,
    BadAmlValue,
    Device,
    DWord,
    If,
    LEqual,
    Local,
    Method,
    Name,
    NamePath,
    Notify,
    QWord,
    Return,
    Scope,
    Store,
)


def h(s: str) -> bytes:
    return bytes.fromhex(s.replace(" ", ""))


# --- DWordConst / QWordConst (§20.2.3; prefixes 0x0C, 0x0E in §20.3) ------------------


@pytest.mark.parametrize("value,expected", [
    (0, "0c 00000000"),          # never shrunk to ZeroOp
    (1, "0c 01000000"),
    (0x000DFFF0, "0c f0ff0d00"),
    (0xFFFFFFFF, "0c ffffffff"),
])
def test_dword_is_always_five_bytes(value, expected):
    assert DWord(value).encode() == h(expected)


@pytest.mark.parametrize("value,expected", [
    (0, "0e 0000000000000000"),
    (0x1_2345_6789, "0e 8967452301000000"),
    ((1 << 64) - 1, "0e ffffffffffffffff"),   # never shrunk to OnesOp
])
def test_qword_is_always_nine_bytes(value, expected):
    assert QWord(value).encode() == h(expected)


@pytest.mark.parametrize("node", [DWord(-1), DWord(1 << 32), QWord(-1), QWord(1 << 64)])
def test_fixed_width_out_of_range(node):
    with pytest.raises(BadAmlValue):
        node.encode()


# --- ArgObj / LocalObj (§20.2.6.1-2; 0x68-0x6E and 0x60-0x67 in §20.3) ---------------


def test_args_and_locals():
    assert [Arg(i).encode() for i in range(7)] == [bytes([0x68 + i]) for i in range(7)]
    assert [Local(i).encode() for i in range(8)] == [bytes([0x60 + i]) for i in range(8)]
    for bad in (Arg(7), Arg(-1), Local(8), Local(-1)):
        with pytest.raises(BadAmlValue):
            bad.encode()


def test_name_path_is_a_bare_name_string():
    assert NamePath("\\_SB_.VGEN").encode() == b"\\" + h("2e") + b"_SB_VGEN"
    assert NamePath("VGEN").encode() == b"VGEN"
    assert NamePath("^PCI0").encode() == b"^PCI0"
    with pytest.raises(BadAmlName):
        NamePath("vgen").encode()


# --- LEqual (§20.2.5.4, LEqualOp 0x93) ------------------------------------------------


def test_lequal():
    # ASL: LEqual (Arg0, 0x03) -> 93 68 0a 03
    assert LEqual(Arg(0), 3).encode() == h("93 68 0a03")
    # LEqual (Local1, 0x12345678) and a string operand
    assert LEqual(Local(1), 0x12345678).encode() == h("93 61 0c 78563412")
    assert LEqual(Arg(1), "ab").encode() == h("93 69 0d 616200")


# --- If / Else (§20.2.5.3, IfOp 0xA0, ElseOp 0xA1) -------------------------------------


def test_if_without_else():
    # If (Arg0 == One) { Return (0x05) }: A0 PkgLength(6) 93 68 01 A4 0A 05
    assert If(LEqual(Arg(0), 1), [Return(5)]).encode() == h("a0 07 93 68 01 a4 0a05")


def test_if_with_else():
    # ... Else { Return (Zero) }: A1 PkgLength(2) A4 00
    node = If(LEqual(Arg(0), 1), [Return(5)], [Return(0)])
    assert node.encode() == h("a0 07 93 68 01 a4 0a05  a1 03 a4 00")
    # An empty Else is still an Else.
    assert If(Arg(0), [], []).encode() == h("a0 02 68  a1 01")


def test_if_long_body_uses_a_two_byte_pkg_length():
    body = [Store(i, Local(0)) for i in range(2, 42)]           # 40 x (70 0a ii 60) = 160 bytes
    enc = If(Arg(0), body).encode()
    payload_len = 1 + 40 * 4                                    # Arg0 + body
    assert enc[0] == 0xA0
    total = payload_len + 2                                     # two PkgLength bytes count themselves
    assert enc[1:3] == bytes([0x40 | (total & 0xF), total >> 4])
    assert len(enc) == 1 + 2 + payload_len


def test_if_accepts_raw_aml():
    assert If(1, [h("a3")]).encode() == h("a0 03 01 a3")      # Noop (0xA3) as raw bytes


# --- Notify (§20.2.5.3, NotifyOp 0x86) and Store (§20.2.5.4, StoreOp 0x70) ----------------


def test_notify():
    # Notify (\_SB.VGEN, 0x80): 86 5C 2E "_SB_" "VGEN" 0A 80
    expected = h("86 5c 2e") + b"_SB_VGEN" + h("0a 80")
    assert Notify("\\_SB_.VGEN", 0x80).encode() == expected
    assert Notify(NamePath("\\_SB_.VGEN"), 0x80).encode() == expected
    assert Notify(Arg(0), Local(2)).encode() == h("86 68 62")


def test_store():
    assert Store(Arg(0), Local(0)).encode() == h("70 68 60")
    assert Store(0x1234, "\\CNT0").encode() == h("70 0b 3412 5c") + b"CNT0"


@pytest.mark.parametrize("target", [3, b"VGEN", ["VGEN"], Return(0)])
def test_super_name_refuses_non_names(target):
    with pytest.raises(BadAmlValue):
        Notify(target, 0x80).encode()
    with pytest.raises(BadAmlValue):
        Store(0, target).encode()


def test_bad_target_path():
    with pytest.raises(BadAmlName):
        Notify("\\_SB_.TOOLONG", 0x80).encode()


def test_reprs_are_one_line():
    for node in (If(LEqual(Arg(0), 3), [Notify("VGEN", 0x80)], []), LEqual(Local(0), 1),
                 Notify("VGEN", 0x80), Store(1, Local(0)), NamePath("VGEN"), DWord(5)):
        assert "\n" not in repr(node)


# --- cross-check with iasl -----------------------------------------------------------------

ASL = """
DefinitionBlock ("", "DSDT", 2, "EMBER ", "EMBRDSDT", 1)
{
    Scope (\\_SB)
    {
        Device (VGEN)
        {
            Name (_UID, Zero)
        }
        Device (GED0)
        {
            Name (CNT0, Zero)
            Method (_EVT, 1, Serialized)
            {
                Store (Arg0, Local0)
                If (LEqual (Local0, 0x03))
                {
                    Notify (\\_SB.VGEN, 0x80)
                    Store (0x1234, CNT0)
                }
                Else
                {
                    Notify (VGEN, 0x81)
                }
                Return (Local0)
            }
        }
    }
}
"""


@pytest.mark.skipif(shutil.which("iasl") is None, reason="iasl (acpica-tools) not installed")
def test_matches_iasl(tmp_path):
    (tmp_path / "t.asl").write_text(ASL)
    # -on: keep name paths as written (no \_SB.VGEN -> VGEN shortening).
    res = subprocess.run(["iasl", "-on", "-p", str(tmp_path / "t"), str(tmp_path / "t.asl")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    theirs = (tmp_path / "t.aml").read_bytes()[36:]
    ours = Scope("\\_SB_", [
        Device("VGEN", [Name("_UID", 0)]),
        Device("GED0", [
            Name("CNT0", 0),
            Method("_EVT", [
                Store(Arg(0), Local(0)),
                If(LEqual(Local(0), 3), [
                    Notify("\\_SB_.VGEN", 0x80),
                    Store(0x1234, "CNT0"),
                ], [
                    Notify("VGEN", 0x81),
                ]),
                Return(Local(0)),
            ], args=1, serialized=True),
        ]),
    ]).encode()
    assert ours == theirs

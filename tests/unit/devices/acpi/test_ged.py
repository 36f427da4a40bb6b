"""The Generic Event Device's AML, byte for byte and against iasl."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from vmm.arch.x86_64.acpi.aml import Device, Name
from vmm.devices.acpi import GED_HID, GED_PATH, BadGedDevice, ged_device


def h(s: str) -> bytes:
    return bytes.fromhex(s.replace(" ", ""))


def test_ged_bytes():
    enc = ged_device(3, [("\\_SB_.VGEN", 0x80)]).encode()
    # DeviceOp, PkgLength 79 (two bytes: 0x4F = 0x40 | 0xF, 0x04), \_SB_.GED_
    head = h("5b 82 4f 04  5c 2e") + b"_SB_GED_"
    hid = h("08") + b"_HID" + h("0d") + b"ACPI0013\0"
    uid = h("08") + b"_UID" + h("00")
    # _CRS: Buffer (11 bytes) { Extended Interrupt (§6.4.3.6): length 6, flags
    # 0x03 = consumer | edge (active high, exclusive), 1 GSI = 3; End Tag }
    crs = h("08") + b"_CRS" + h("11 0e 0a 0b  89 0600 03 01 03000000  79 00")
    # Method _EVT, flags 0x09 = 1 arg | Serialized:
    #   If (LEqual (Arg0, 3)) { Notify (\_SB.VGEN, 0x80) }
    evt = (h("14 19") + b"_EVT" + h("09  a0 12  93 68 0a03  86 5c 2e") + b"_SB_VGEN" + h("0a 80"))
    assert enc == head + hid + uid + crs + evt
    assert len(enc) == 2 + 79


def test_several_notifications_in_order():
    enc = ged_device(9, [("\\_SB_.AAAA", 0x80), ("\\_SB_.BBBB", 0x81)]).encode()
    assert enc.index(b"AAAA") < enc.index(b"BBBB")
    assert h("0a 81") in enc


def test_path_is_configurable():
    enc = ged_device(3, [("VGEN", 0x80)], path="\\GED1").encode()
    assert enc[:2] == h("5b 82") and enc[4:9] == b"\\GED1"     # after a two-byte PkgLength
    assert GED_PATH == "\\_SB_.GED_" and GED_HID == "ACPI0013"


@pytest.mark.parametrize("gsi,notes,path", [
    (-1, [("VGEN", 0x80)], GED_PATH),
    (1 << 32, [("VGEN", 0x80)], GED_PATH),
    (3, [], GED_PATH),
    (3, [("VGEN", 0x100)], GED_PATH),
    (3, [("VGEN", -1)], GED_PATH),
    (3, [("vgen", 0x80)], GED_PATH),
    (3, [("VGEN", 0x80)], "\\_SB_.TOOLONG"),
])
def test_bad_ged(gsi, notes, path):
    with pytest.raises(BadGedDevice):
        ged_device(gsi, notes, path=path)


ASL = """
DefinitionBlock ("", "DSDT", 2, "EMBER ", "EMBRDSDT", 1)
{
    Device (\\_SB.VGEN)
    {
        Name (_UID, Zero)
    }
    Device (\\_SB.GED)
    {
        Name (_HID, "ACPI0013")
        Name (_UID, Zero)
        Name (_CRS, ResourceTemplate ()
        {
            Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) {3}
        })
        Method (_EVT, 1, Serialized)
        {
            If ((Arg0 == 0x03))
            {
                Notify (\\_SB.VGEN, 0x80)
            }
        }
    }
}
"""


@pytest.mark.skipif(shutil.which("iasl") is None, reason="iasl (acpica-tools) not installed")
def test_matches_iasl(tmp_path):
    (tmp_path / "t.asl").write_text(ASL)
    res = subprocess.run(["iasl", "-on", "-p", str(tmp_path / "t"), str(tmp_path / "t.asl")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    theirs = (tmp_path / "t.aml").read_bytes()[36:]
    vgen = Device("\\_SB_.VGEN", [Name("_UID", 0)]).encode()
    assert vgen + ged_device(3, [("\\_SB_.VGEN", 0x80)]).encode() == theirs

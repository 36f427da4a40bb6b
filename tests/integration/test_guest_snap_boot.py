"""The test guest's `snap` mode, booted without any snapshot.

`snap` (tests/guests/modes/snap.c; docs/test-guests.md) is the guest the
snapshot/restore tests pause, save, restore in a new VMM process and resume.
Here it just runs to the end, which checks what those tests rely on: its
rounds are numbered 1..n without gaps, paced by the armed LAPIC timer (tick
counts at least `round_ticks` apart), memory and virtio-blk verify `ok` in every
round (`blk=none` without a drive), and it PASSes and resets (exit status 0).
"""

from __future__ import annotations

import random
import re
import zlib

import pytest

pytestmark = pytest.mark.kvm

SECTOR = 512
ROUND = re.compile(r"SNAP round=(\d+) ticks=(\d+) mem=(\S+) blk=(\S+)")


def check_rounds(result, rounds: int, round_ticks: int, blk: str) -> None:
    """`rounds` round lines, 1..rounds, ticks at least `round_ticks` apart, all
    mem=ok and blk=`blk`, then PASS; nothing else between the first round and PASS."""
    result.assert_guest_passed("snap")
    lines = result.lines
    assert not any(line.startswith("SNAP FAIL") for line in lines), result.describe()
    first = next(i for i, line in enumerate(lines) if line.startswith("SNAP round="))
    end = lines.index("TESTGUEST snap PASS")
    matches = [ROUND.fullmatch(line) for line in lines[first:end]]
    assert all(matches), result.describe()
    assert [int(m[1]) for m in matches] == list(range(1, rounds + 1)), result.describe()
    ticks = [int(m[2]) for m in matches]
    assert ticks[0] >= round_ticks, result.describe()
    assert all(b - a >= round_ticks for a, b in zip(ticks, ticks[1:])), result.describe()
    assert all(m[3] == "ok" and m[4] == blk for m in matches), result.describe()


@pytest.mark.parametrize("idle", ["hlt", "spin"])
def test_snap_rounds_without_a_drive(testguest, run_vmm, idle):
    result = run_vmm(testguest, f"mode=snap snap.rounds=5 snap.round_ms=50 snap.idle={idle}")
    assert f"SNAP CONFIG rounds=5 round_ms=50 hz=100 round_ticks=5 mem_mb=8 seed=0x5eed idle={idle}" in result.lines, \
        result.describe()
    assert "SNAP BLK none" in result.lines, result.describe()
    check_rounds(result, rounds=5, round_ticks=5, blk="none")


@pytest.mark.parametrize("idle", ["hlt", "spin"])
def test_snap_rounds_read_drive_0(testguest, run_vmm, tmp_path, idle):
    data = random.Random(5).randbytes(64 << 10)  # 128 sectors
    disk = tmp_path / "rootfs.img"
    disk.write_bytes(data)
    drives = [{"drive_id": "rootfs", "path_on_host": str(disk), "is_root_device": True, "is_read_only": False}]
    result = run_vmm(testguest, f"mode=snap snap.rounds=5 snap.round_ms=50 snap.idle={idle}",
                     config_extra={"drives": drives})
    sum0 = zlib.crc32(data[:16 * SECTOR])
    assert f"SNAP BLK drive=0 slot=0 capacity=128 sectors=16 sum={sum0:08x}" in result.lines, result.describe()
    check_rounds(result, rounds=5, round_ticks=5, blk="ok")
    assert disk.read_bytes() == data  # the mode only reads


def test_snap_options_are_checked(testguest, run_vmm):
    result = run_vmm(testguest, "mode=snap snap.idle=busy")
    assert "TESTGUEST snap FAIL snap.idle=busy: must be hlt or spin" in result.lines, result.describe()
    assert not any(line.startswith("SNAP round=") for line in result.lines), result.describe()
    assert result.returncode == 0, result.describe()

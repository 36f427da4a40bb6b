"""VMGenID: the ID sits where ADDR says, a restore always changes it, notify
raises the GED line, and saved state is checked as untrusted input."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from collections.abc import Iterator

import pytest

from vmm.arch.x86_64 import layout
from vmm.arch.x86_64.acpi import build_acpi_tables
from vmm.devices.acpi import (
    VMGENID_SIZE,
    BadVmGenIdState,
    VmGenId,
    VmGenIdError,
    VmGenIdOutsideMemory,
    VmGenIdRngFailed,
    VmGenIdState,
)
from vmm.memory import GuestMemory
from vmm.state_tree import to_tree

ID_A = bytes(range(16))
ID_B = bytes(range(16, 32))


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory.anonymous([(0, 2 << 20)])
    yield m
    m.close()


class Line:
    """An interrupt line that counts its pulses."""

    def __init__(self) -> None:
        self.pulses = 0

    def __call__(self) -> None:
        self.pulses += 1


def ids(*values: bytes):
    """A fake random source handing out `values` in order."""
    it = iter(values)

    def rng(n: int) -> bytes:
        assert n == VMGENID_SIZE
        return next(it)
    return rng


def _aml_integer(buf: bytes, i: int) -> tuple[int, int]:
    """Decode one ComputationalData integer at buf[i] (ACPI 6.5 §20.2.3)."""
    op = buf[i]
    if op in (0x00, 0x01):
        return op, i + 1
    if op == 0xFF:
        return (1 << 64) - 1, i + 1
    width = {0x0A: 1, 0x0B: 2, 0x0C: 4, 0x0E: 8}[op]
    return int.from_bytes(buf[i + 1:i + 1 + width], "little"), i + 1 + width


def addr_method_result(aml: bytes) -> int:
    """What `Method (ADDR) { Return (Package { low, high }) }` returns, as one address."""
    i = aml.index(b"ADDR") + 4
    assert aml[i] == 0x00                 # MethodFlags: no args, not serialized
    assert aml[i + 1] == 0xA4             # ReturnOp
    assert aml[i + 2] == 0x12             # PackageOp
    assert aml[i + 4] == 2                # PkgLength (1 byte here), NumElements
    low, j = _aml_integer(aml, i + 5)
    high, _ = _aml_integer(aml, j)
    assert low <= 0xFFFFFFFF and high <= 0xFFFFFFFF
    return low | high << 32


# --- boot ------------------------------------------------------------------------------


def test_create_writes_the_id_where_addr_points(mem):
    dev = VmGenId.create(mem, layout.GED_IRQ, Line(), rng=ids(ID_A))
    assert dev.generation_id == ID_A
    vgen, ged = dev.acpi_nodes()
    addr = addr_method_result(vgen.encode())
    assert addr == dev.addr == layout.VMGENID_ADDR
    assert mem.read(addr, VMGENID_SIZE) == ID_A


def test_addr_above_4_gib_is_split_into_low_and_high():
    m = GuestMemory.anonymous([(0, 2 << 20), (1 << 32, 2 << 20)])
    try:
        dev = VmGenId.create(m, 3, Line(), rng=ids(ID_A), addr=(1 << 32) + 0x1238)
        assert addr_method_result(dev.acpi_nodes()[0].encode()) == (1 << 32) + 0x1238
        assert m.read((1 << 32) + 0x1238, 16) == ID_A
    finally:
        m.close()


def test_real_random_ids_differ(mem):
    a = VmGenId.create(mem, 3, Line())
    b = VmGenId.create(mem, 3, Line())
    assert len(a.generation_id) == 16 and a.generation_id != b.generation_id
    assert mem.read(layout.VMGENID_ADDR, 16) == b.generation_id


def test_ged_node_carries_the_gsi(mem):
    dev = VmGenId.create(mem, 7, Line(), rng=ids(ID_A))
    ged = dev.acpi_nodes()[1].encode()
    assert b"ACPI0013" in ged
    assert bytes.fromhex("89 0600 03 01") + struct.pack("<I", 7) in ged      # _CRS Interrupt {7}
    assert bytes.fromhex("93 68 0a 07") in ged                               # If (Arg0 == 7)


@pytest.mark.parametrize("kwargs,exc", [
    ({"gsi": -1}, BadVmGenIdState),
    ({"gsi": layout.IRQ_MAX + 1}, BadVmGenIdState),
    ({"addr": layout.VMGENID_ADDR + 4}, BadVmGenIdState),        # not 8-byte aligned
    ({"addr": 64 << 20}, VmGenIdOutsideMemory),                  # past the 2 MiB of RAM
    ({"addr": (2 << 20) - 8}, VmGenIdOutsideMemory),             # straddles the end of RAM
])
def test_create_refuses(mem, kwargs, exc):
    args = {"gsi": 3, "addr": layout.VMGENID_ADDR, **kwargs}
    with pytest.raises(exc):
        VmGenId.create(mem, args["gsi"], Line(), rng=ids(ID_A), addr=args["addr"])


@pytest.mark.parametrize("bad", [b"short", b"x" * 17, "0123456789abcdef"])
def test_create_refuses_a_broken_rng(mem, bad):
    with pytest.raises(VmGenIdRngFailed):
        VmGenId.create(mem, 3, Line(), rng=lambda n: bad)


# --- notify -------------------------------------------------------------------------------


def test_notify_pulses_the_ged_line(mem):
    line = Line()
    dev = VmGenId.create(mem, 3, line, rng=ids(ID_A))
    assert line.pulses == 0                 # creating or restoring never interrupts
    dev.notify()
    dev.notify()
    assert line.pulses == 2


# --- snapshot and restore ----------------------------------------------------------------


def test_restore_writes_a_new_id_at_the_saved_address(mem):
    template = VmGenId.create(mem, 3, Line(), rng=ids(ID_A))
    state = template.state()
    assert state == VmGenIdState(layout.VMGENID_ADDR, 3, ID_A)
    line = Line()
    clone = VmGenId.restore(state, mem, line, rng=ids(ID_B))
    assert clone.generation_id == ID_B != template.generation_id
    assert mem.read(state.addr, 16) == ID_B
    assert (clone.addr, clone.gsi) == (state.addr, state.gsi)
    assert line.pulses == 0
    clone.notify()
    assert line.pulses == 1


def test_restore_uses_the_saved_address_and_gsi_not_the_layout(mem):
    state = VmGenIdState(0x5000, 11, ID_A)
    clone = VmGenId.restore(state, mem, Line(), rng=ids(ID_B))
    assert mem.read(0x5000, 16) == ID_B
    assert addr_method_result(clone.acpi_nodes()[0].encode()) == 0x5000
    assert clone.state() == VmGenIdState(0x5000, 11, ID_B)


def test_clones_of_one_template_all_differ(mem):
    state = VmGenId.create(mem, 3, Line()).state()
    seen = {state.generation_id}
    for _ in range(20):
        clone = VmGenId.restore(state, mem, Line())
        assert clone.generation_id not in seen
        seen.add(clone.generation_id)


def test_restore_redraws_when_the_rng_repeats_the_template(mem):
    state = VmGenIdState(layout.VMGENID_ADDR, 3, ID_A)
    clone = VmGenId.restore(state, mem, Line(), rng=ids(ID_A, ID_A, ID_B))
    assert clone.generation_id == ID_B
    with pytest.raises(VmGenIdRngFailed):
        VmGenId.restore(state, mem, Line(), rng=lambda n: ID_A)


def test_restore_outside_memory(mem):
    with pytest.raises(VmGenIdOutsideMemory):
        VmGenId.restore(VmGenIdState(16 << 20, 3, ID_A), mem, Line(), rng=ids(ID_B))


def test_restore_refuses_a_non_state(mem):
    with pytest.raises(BadVmGenIdState):
        VmGenId.restore({"addr": 0, "gsi": 3, "generation_id": ID_A}, mem, Line())  # type: ignore[arg-type]


def test_state_tree_round_trip(mem):
    state = VmGenId.create(mem, 3, Line()).state()
    tree = state.to_tree()
    assert tree == {"addr": layout.VMGENID_ADDR, "gsi": 3, "generation_id": state.generation_id}
    assert tree == to_tree(state)                       # what persist.py stores
    assert VmGenIdState.from_tree(tree) == state


GOOD = {"addr": layout.VMGENID_ADDR, "gsi": 3, "generation_id": ID_A}


@pytest.mark.parametrize("tree", [
    None,
    [],
    "state",
    {k: v for k, v in GOOD.items() if k != "gsi"},                      # missing key
    {**GOOD, "extra": 1},                                               # unknown key
    {**GOOD, "addr": "0xdfff0"},
    {**GOOD, "addr": -8},
    {**GOOD, "addr": layout.VMGENID_ADDR + 1},                          # unaligned
    {**GOOD, "addr": 1 << 64},
    {**GOOD, "gsi": True},                                              # a bool is not an int
    {**GOOD, "gsi": -1},
    {**GOOD, "gsi": 24},                                                # no such IOAPIC pin
    {**GOOD, "generation_id": ID_A[:15]},
    {**GOOD, "generation_id": ID_A + b"\0"},
    {**GOOD, "generation_id": ID_A.hex()},                              # str, not bytes
    {**GOOD, "generation_id": None},
])
def test_from_tree_rejects(tree):
    with pytest.raises(BadVmGenIdState):
        VmGenIdState.from_tree(tree)


def test_errors_are_value_errors():
    """persist.MicrovmState.read turns ValueError into SnapshotLoadError."""
    assert issubclass(VmGenIdError, ValueError)
    for exc in (BadVmGenIdState, VmGenIdOutsideMemory, VmGenIdRngFailed):
        assert issubclass(exc, VmGenIdError)


def test_reprs_are_one_line(mem):
    dev = VmGenId.create(mem, 3, Line(), rng=ids(ID_A))
    assert repr(dev) == f"<VmGenId addr={layout.VMGENID_ADDR:#x} gsi=3 id={ID_A.hex()}>"
    assert "\n" not in repr(dev.state())


# --- the DSDT the guest gets ----------------------------------------------------------------


@pytest.mark.skipif(shutil.which("iasl") is None, reason="iasl (acpica-tools) not installed")
def test_iasl_disassembles_the_dsdt(tmp_path, mem):
    dev = VmGenId.create(mem, layout.GED_IRQ, Line())
    tables = build_acpi_tables(1, [], extra_dsdt=dev.acpi_nodes())
    (tmp_path / "DSDT.dat").write_bytes(tables.tables[1][1])
    res = subprocess.run(["iasl", "-d", "DSDT.dat"], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    dsl = (tmp_path / "DSDT.dsl").read_text()
    assert "Error" not in dsl and "Invalid" not in dsl, dsl
    for needle in ("Device (\\_SB.VGEN)", "Device (\\_SB.GED)", '"ACPI0013"', '"VMGENCTR"',
                   "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )",
                   "Method (_EVT, 1, Serialized)", "If ((Arg0 == 0x03))", "Notify (\\_SB.VGEN, 0x80)"):
        assert needle in dsl, needle
    # ADDR's package, as iasl reads it, points at the ID in guest memory.
    addr_pkg = re.search(r"Method \(ADDR.*?Package \(0x02\)\s*\{\s*(\w+),\s*(\w+)\s*\}", dsl, re.S)
    assert addr_pkg is not None, dsl
    low, high = (0 if v == "Zero" else 1 if v == "One" else int(v, 16) for v in addr_pkg.groups())
    assert mem.read(low | high << 32, 16) == dev.generation_id
    assert re.search(r"Interrupt \(ResourceConsumer.*?\{\s*0x00000003,", dsl, re.S)

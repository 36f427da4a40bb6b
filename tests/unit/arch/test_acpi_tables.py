from __future__ import annotations

import shutil
import struct
import subprocess

import pytest

from vmm.arch.x86_64 import layout
from vmm.arch.x86_64.acpi import (
    AcpiMmioDevice,
    AcpiOutsideMemory,
    AcpiTablesTooLarge,
    BadAcpiDevice,
    TooManyCpusForMadt,
    build_acpi_tables,
    com1_device,
    create_acpi_tables,
    i8042_device,
    virtio_mmio_device,
    vmgenid_device,
)
from vmm.arch.x86_64.acpi.aml import Scope
from vmm.arch.x86_64.acpi.tables import (
    FADT_F_HW_REDUCED_ACPI,
    FADT_F_PWR_BUTTON,
    FADT_F_SLP_BUTTON,
    IAPC_BOOT_ARCH_8042,
    IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT,
    IAPC_BOOT_ARCH_MSI_NOT_PRESENT,
    IAPC_BOOT_ARCH_VGA_NOT_PRESENT,
    checksum,
)
from vmm.memory import GuestMemory


def _devices(n: int) -> list[AcpiMmioDevice]:
    out = []
    for i in range(n):
        slot = layout.virtio_mmio_slot(i)
        out.append(AcpiMmioDevice(name=f"V{i:03d}", uid=i, mmio_base=slot.addr, mmio_len=slot.len, irq=slot.irq))
    return out


def _table(mem: GuestMemory, addr: int, signature: bytes) -> bytes:
    hdr = mem.read(addr, 36)
    assert hdr[:4] == signature
    length = struct.unpack_from("<I", hdr, 4)[0]
    data = mem.read(addr, length)
    assert sum(data) % 256 == 0, f"{signature!r} checksum"
    assert data[10:16] == b"EMBER " and data[28:32] == b"EMBR"
    return data


def _walk(mem: GuestMemory, rsdp_addr: int) -> dict[bytes, tuple[int, bytes]]:
    rsdp = mem.read(rsdp_addr, 36)
    assert rsdp[:8] == b"RSD PTR "
    assert sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    revision, rsdt, length, xsdt_addr = struct.unpack_from("<BIIQ", rsdp, 15)
    assert (revision, rsdt, length) == (2, 0, 36)
    xsdt = _table(mem, xsdt_addr, b"XSDT")
    n = (len(xsdt) - 36) // 8
    assert len(xsdt) == 36 + 8 * n
    found = {b"XSDT": (xsdt_addr, xsdt)}
    for addr in struct.unpack_from(f"<{n}Q", xsdt, 36):
        sig = mem.read(addr, 4)
        found[sig] = (addr, _table(mem, addr, sig))
    fadt = found[b"FACP"][1]
    dsdt_addr = struct.unpack_from("<Q", fadt, 140)[0]
    found[b"DSDT"] = (dsdt_addr, _table(mem, dsdt_addr, b"DSDT"))
    return found


@pytest.fixture
def tables(mem16):
    devices = _devices(3)
    rsdp = create_acpi_tables(mem16, 2, devices, extra_dsdt=[vmgenid_device(0x9000_0000)])
    assert rsdp == layout.RSDP_ADDR
    return mem16, devices, _walk(mem16, rsdp)


def test_xsdt_points_at_fadt_and_madt(tables):
    _, _, found = tables
    assert set(found) == {b"XSDT", b"FACP", b"APIC", b"DSDT"}
    spans = sorted((addr, addr + len(data)) for addr, data in found.values())
    spans.insert(0, (layout.RSDP_ADDR, layout.RSDP_ADDR + 36))
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end <= start
    assert spans[-1][1] <= layout.ACPI_TABLES_END
    assert all(addr % 8 == 0 for addr, _ in spans)


def test_fadt(tables):
    _, _, found = tables
    fadt = found[b"FACP"][1]
    assert len(fadt) == 276 and fadt[8] == 6 and fadt[131] == 5            # revision 6.5
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert flags == FADT_F_HW_REDUCED_ACPI | FADT_F_PWR_BUTTON | FADT_F_SLP_BUTTON
    iapc = struct.unpack_from("<H", fadt, 109)[0]
    assert iapc == (IAPC_BOOT_ARCH_8042 | IAPC_BOOT_ARCH_VGA_NOT_PRESENT | IAPC_BOOT_ARCH_MSI_NOT_PRESENT
                    | IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT)
    assert struct.unpack_from("<I", fadt, 40)[0] == 0                         # 32-bit DSDT unused
    assert struct.unpack_from("<Q", fadt, 140)[0] == found[b"DSDT"][0]        # X_DSDT
    assert struct.unpack_from("<H", fadt, 46)[0] == 0                         # no SCI
    assert fadt[268:276] == b"EMBERVMM"


def test_madt(tables):
    _, _, found = tables
    madt = found[b"APIC"][1]
    assert madt[8] == 6
    lapic_addr, flags = struct.unpack_from("<II", madt, 36)
    assert lapic_addr == layout.APIC_ADDR and flags == 0
    entries = []
    off = 44
    while off < len(madt):
        kind, length = madt[off], madt[off + 1]
        entries.append(madt[off:off + length])
        off += length
    assert off == len(madt)
    lapics = [struct.unpack("<BBBBI", e) for e in entries if e[0] == 0]
    assert lapics == [(0, 8, 0, 0, 1), (0, 8, 1, 1, 1)]
    ioapics = [struct.unpack("<BBBBII", e) for e in entries if e[0] == 1]
    assert ioapics == [(1, 12, 0, 0, layout.IOAPIC_ADDR, 0)]
    nmis = [struct.unpack("<BBBHB", e) for e in entries if e[0] == 4]
    assert nmis == [(4, 6, 0xFF, 0, 1)]
    assert not [e for e in entries if e[0] == 2]  # no interrupt source overrides


def test_dsdt_holds_the_devices(tables):
    _, devices, found = tables
    dsdt = found[b"DSDT"][1]
    assert dsdt[8] == 2
    body = dsdt[36:]
    sb = Scope("\\_SB_", [com1_device(), i8042_device(), *(virtio_mmio_device(d) for d in devices)]).encode()
    assert body == sb + vmgenid_device(0x9000_0000).encode()
    assert b"LNRO0005" in body and b"VMGENCTR" in body


def test_many_cpus_and_devices_fit(mem16):
    rsdp = create_acpi_tables(mem16, layout.MAX_VCPUS, _devices(19))
    found = _walk(mem16, rsdp)
    assert len(found[b"APIC"][1]) == 44 + 8 * layout.MAX_VCPUS + 12 + 6


def test_optional_legacy_devices():
    t = build_acpi_tables(1, [], serial=False, i8042=False)
    dsdt = t.tables[1][1]
    assert b"COM1" not in dsdt and b"PS2_" not in dsdt
    fadt = t.tables[2][1]
    assert not struct.unpack_from("<H", fadt, 109)[0] & IAPC_BOOT_ARCH_8042
    assert repr(t).startswith("<AcpiTables rsdp=0xe0000 [RSD  DSDT FACP APIC XSDT]")


def test_errors(mem16):
    with pytest.raises(AcpiTablesTooLarge):
        build_acpi_tables(1, [], extra_dsdt=[bytes(0x20000)])
    with pytest.raises(AcpiTablesTooLarge):
        build_acpi_tables(4, _devices(4), limit=layout.RSDP_ADDR + 0x100)
    dup = _devices(1) * 2
    with pytest.raises(BadAcpiDevice):
        build_acpi_tables(1, dup)
    with pytest.raises(BadAcpiDevice):
        build_acpi_tables(1, [AcpiMmioDevice(name="virtio0", uid=0, mmio_base=0, mmio_len=1, irq=5)])
    with pytest.raises(BadAcpiDevice):
        build_acpi_tables(1, [AcpiMmioDevice(name="V000", uid=0, mmio_base=1 << 32, mmio_len=0x1000, irq=5)])
    with pytest.raises(TooManyCpusForMadt):
        build_acpi_tables(255, [])
    small = GuestMemory.anonymous([(0, 0xE0000)])
    try:
        with pytest.raises(AcpiOutsideMemory):
            create_acpi_tables(small, 1, [])
    finally:
        small.close()


def test_checksum_helper():
    assert checksum(b"") == 0
    assert checksum(b"\x01\x02\x03") == 250
    assert (sum(b"\xff") + checksum(b"\xff")) % 256 == 0


@pytest.mark.skipif(shutil.which("iasl") is None, reason="iasl (acpica-tools) not installed")
def test_iasl_disassembles_every_table(tmp_path):
    t = build_acpi_tables(2, _devices(2), extra_dsdt=[vmgenid_device(0x1_2345_6000)])
    for _, data in t.tables[1:]:
        sig = data[:4].decode()
        (tmp_path / f"{sig}.dat").write_bytes(data)
        res = subprocess.run(["iasl", "-d", f"{sig}.dat"], cwd=tmp_path, capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr
        dsl = (tmp_path / f"{sig}.dsl").read_text()
        assert "Error" not in dsl and "Invalid" not in dsl, dsl
    dsl = (tmp_path / "DSDT.dsl").read_text()
    for needle in ('EisaId ("PNP0501")', 'EisaId ("PNP0303")', '"LNRO0005"', "Memory32Fixed (ReadWrite",
                   "0xD0002000", "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )",
                   "Method (ADDR, 0, NotSerialized)", "0x23456000", "Device (\\_SB.VGEN)"):
        assert needle in dsl, needle
    fadt = (tmp_path / "FACP.dsl").read_text()
    assert "Hardware Reduced (V5) : 1" in fadt
    assert "Hypervisor ID : " + b"EMBERVMM"[::-1].hex().upper() in fadt  # shown as a little-endian u64

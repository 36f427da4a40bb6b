from __future__ import annotations

import struct

import pytest

from vmm.arch.x86_64 import layout
from vmm.arch.x86_64.bootparams import (
    E820_RAM,
    E820_RESERVED,
    XEN_HVM_START_MAGIC_VALUE,
    BadMemoryRegions,
    BadSetupHeader,
    BootParams,
    BootStructureOutsideMemory,
    CmdlineInvalid,
    CmdlineTooLong,
    E820Entry,
    InitrdOutOfReach,
    PvhStartInfo,
    TooManyE820Entries,
    TooManyModules,
    e820_map,
    write_cmdline,
)
from vmm.memory import GuestMemory

MIB = 1 << 20
GIB = 1 << 30


def _u8(b: bytes, off: int) -> int:
    return b[off]


def _u16(b: bytes, off: int) -> int:
    return struct.unpack_from("<H", b, off)[0]


def _u32(b: bytes, off: int) -> int:
    return struct.unpack_from("<I", b, off)[0]


def _u64(b: bytes, off: int) -> int:
    return struct.unpack_from("<Q", b, off)[0]


def _e820_from_zero_page(zp: bytes) -> list[E820Entry]:
    n = zp[0x1E8]
    return [E820Entry(*struct.unpack_from("<QQI", zp, 0x2D0 + 20 * i)) for i in range(n)]


# --- E820 ---------------------------------------------------------------------------

def test_e820_128_mib():
    entries = e820_map(layout.arch_memory_regions(128 * MIB))
    assert entries == [
        E820Entry(0, 0x9FC00, E820_RAM),
        E820Entry(0x9FC00, 0x100000 - 0x9FC00, E820_RESERVED),
        E820Entry(0x100000, 128 * MIB - 0x100000, E820_RAM),
    ]


def test_e820_3_5_gib_leaves_the_mmio_gap_out():
    entries = e820_map(layout.arch_memory_regions(3 * GIB + GIB // 2))
    assert entries[:2] == [E820Entry(0, 0x9FC00, E820_RAM), E820Entry(0x9FC00, 0x60400, E820_RESERVED)]
    assert entries[2] == E820Entry(0x100000, 0xD0000000 - 0x100000, E820_RAM)
    assert entries[3] == E820Entry(4 * GIB, GIB // 4, E820_RAM)
    ram = sum(e.size for e in entries if e.type == E820_RAM)
    assert ram == 3 * GIB + GIB // 2 - (0x100000 - 0x9FC00)
    for e in entries:  # nothing claims the 32-bit gap
        assert e.end <= layout.MMIO_MEM_START or e.addr >= layout.FIRST_ADDR_PAST_32BITS


@pytest.mark.parametrize("regions", [
    [],
    [(0x1000, 64 * MIB)],
    [(0, 0x80000)],
    [(0, 64 * MIB), (32 * MIB, MIB)],
])
def test_e820_rejects_bad_regions(regions):
    with pytest.raises(BadMemoryRegions):
        e820_map(regions)


# --- command line -------------------------------------------------------------------

def test_write_cmdline(mem16):
    n = write_cmdline(mem16, "console=ttyS0 reboot=k")
    assert n == 22
    assert mem16.read(layout.CMDLINE_START, 23) == b"console=ttyS0 reboot=k\0"


def test_cmdline_limits(mem16):
    assert write_cmdline(mem16, "x" * (layout.CMDLINE_MAX_SIZE - 1)) == layout.CMDLINE_MAX_SIZE - 1
    with pytest.raises(CmdlineTooLong):
        write_cmdline(mem16, "x" * layout.CMDLINE_MAX_SIZE)
    with pytest.raises(CmdlineInvalid):
        write_cmdline(mem16, "a\0b")
    with pytest.raises(CmdlineInvalid):
        write_cmdline(mem16, "caf\u00e9")
    with pytest.raises(CmdlineInvalid):
        write_cmdline(mem16, b"\xff")


# --- zero page ------------------------------------------------------------------------

def test_vmlinux_zero_page_fields(mem16):
    e820 = e820_map([(0, 16 * MIB)])
    bp = BootParams(e820=e820, cmdline_len=22, initrd=(0x800000, 0x12345))
    assert bp.write(mem16) == layout.ZERO_PAGE_START
    zp = mem16.read(layout.ZERO_PAGE_START, 4096)
    assert len(bp.to_bytes()) == 4096
    assert _u16(zp, 0x1FE) == 0xAA55                 # boot_flag
    assert zp[0x202:0x206] == b"HdrS"                # header
    assert _u8(zp, 0x210) == 0xFF                    # type_of_loader
    assert _u8(zp, 0x211) & 0x01                     # loadflags: LOADED_HIGH
    assert not _u8(zp, 0x211) & 0x80                 # no CAN_USE_HEAP
    assert _u32(zp, 0x218) == 0x800000               # ramdisk_image
    assert _u32(zp, 0x21C) == 0x12345                # ramdisk_size
    assert _u32(zp, 0x228) == layout.CMDLINE_START   # cmd_line_ptr
    assert _u32(zp, 0x230) == 0x01000000             # kernel_alignment
    assert _u32(zp, 0x238) == 22                     # cmdline_size
    assert _u64(zp, 0x070) == layout.RSDP_ADDR       # acpi_rsdp_addr
    assert _u32(zp, 0x0C0) == _u32(zp, 0x0C4) == _u32(zp, 0x0C8) == 0
    assert zp[0x1EF] == 0                            # sentinel
    assert _e820_from_zero_page(zp) == e820


def test_initrd_and_cmdline_above_4g_use_ext_fields():
    bp = BootParams(e820=e820_map([(0, 16 * MIB)]), cmdline_addr=0x1_2000_0000,
                    initrd=(0x1_0000_0000 + 0x200000, (1 << 32) + 7))
    zp = bp.to_bytes()
    assert _u32(zp, 0x218) == 0x200000 and _u32(zp, 0x0C0) == 1
    assert _u32(zp, 0x21C) == 7 and _u32(zp, 0x0C4) == 1
    assert _u32(zp, 0x228) == 0x2000_0000 and _u32(zp, 0x0C8) == 1


def _bzimage_header(version=0x020F, cmdline_size=2047, initrd_max=0x7FFFFFFF, xloadflags=0x1,
                    loadflags=0x01) -> bytes:
    hdr = bytearray(0x268 + 4 - 0x1F1)

    def put(fmt, off, v):
        struct.pack_into(fmt, hdr, off - 0x1F1, v)

    put("<B", 0x1F1, 27)            # setup_sects
    put("<H", 0x1FE, 0xAA55)
    put("<I", 0x202, 0x53726448)
    put("<H", 0x206, version)
    put("<B", 0x211, loadflags | 0x80)  # the image claims CAN_USE_HEAP
    put("<I", 0x22C, initrd_max)
    put("<I", 0x230, 0x200000)
    put("<H", 0x236, xloadflags)
    put("<I", 0x238, cmdline_size)
    put("<Q", 0x258, 0x1000000)     # pref_address
    return bytes(hdr)


def test_bzimage_header_is_copied_and_patched():
    hdr = _bzimage_header()
    zp = BootParams(e820=e820_map([(0, 16 * MIB)]), cmdline_len=100, setup_header=hdr).to_bytes()
    assert zp[0x1F1] == 27
    assert _u16(zp, 0x206) == 0x020F
    assert _u32(zp, 0x230) == 0x200000            # kept, not the vmlinux default
    assert _u64(zp, 0x258) == 0x1000000
    assert _u32(zp, 0x238) == 2047                # the kernel's own limit stays
    assert zp[0x210] == 0xFF
    assert zp[0x211] == 0x01                      # CAN_USE_HEAP cleared, LOADED_HIGH kept


def test_bzimage_cmdline_limit():
    hdr = _bzimage_header(cmdline_size=255)
    BootParams(e820=e820_map([(0, 16 * MIB)]), cmdline_len=255, setup_header=hdr).to_bytes()
    with pytest.raises(CmdlineTooLong):
        BootParams(e820=e820_map([(0, 16 * MIB)]), cmdline_len=256, setup_header=hdr).to_bytes()


def test_bzimage_initrd_addr_max():
    e820 = e820_map([(0, 16 * MIB)])
    hdr = _bzimage_header(initrd_max=0x37FFFFFF)
    BootParams(e820=e820, initrd=(0x37000000, 0x1000000), setup_header=hdr).to_bytes()
    with pytest.raises(InitrdOutOfReach):
        BootParams(e820=e820, initrd=(0x37000000, 0x1000001), setup_header=hdr).to_bytes()
    above = _bzimage_header(initrd_max=0x37FFFFFF, xloadflags=0x3)  # XLF_CAN_BE_LOADED_ABOVE_4G
    BootParams(e820=e820, initrd=(0x1_0000_0000, 0x1000), setup_header=above).to_bytes()


@pytest.mark.parametrize("hdr", [b"\0" * 0x20, b"\0" * 0xA0, _bzimage_header()[:10]])
def test_bad_setup_headers(hdr):
    with pytest.raises(BadSetupHeader):
        BootParams(e820=[], setup_header=hdr).to_bytes()


def test_too_many_e820_entries():
    entries = [E820Entry(i * 0x1000, 0x1000, E820_RAM) for i in range(129)]
    with pytest.raises(TooManyE820Entries):
        BootParams(e820=entries).to_bytes()
    BootParams(e820=entries[:128]).to_bytes()


def test_zero_page_outside_memory():
    tiny = GuestMemory.anonymous([(0, 0x4000)])
    try:
        with pytest.raises(BootStructureOutsideMemory):
            BootParams(e820=[]).write(tiny)
    finally:
        tiny.close()


# --- PVH ---------------------------------------------------------------------------------

def test_pvh_start_info(mem16):
    memmap = e820_map([(0, 16 * MIB)])
    info = PvhStartInfo(memmap=memmap, modules=[(0x800000, 0x4000)])
    assert info.write(mem16) == layout.PVH_INFO_START
    raw = mem16.read(layout.PVH_INFO_START, 56)
    (magic, version, flags, nr_modules, modlist, cmdline, rsdp, memmap_paddr, entries,
     reserved) = struct.unpack("<IIIIQQQQII", raw)
    assert magic == XEN_HVM_START_MAGIC_VALUE == 0x336EC578
    assert version == 1 and flags == 0 and reserved == 0
    assert nr_modules == 1 and modlist == layout.MODLIST_START
    assert cmdline == layout.CMDLINE_START and rsdp == layout.RSDP_ADDR
    assert memmap_paddr == layout.MEMMAP_START and entries == 3
    assert struct.unpack("<QQQQ", mem16.read(layout.MODLIST_START, 32)) == (0x800000, 0x4000, 0, 0)
    for i, e in enumerate(memmap):
        assert struct.unpack("<QQII", mem16.read(layout.MEMMAP_START + 24 * i, 24)) == (e.addr, e.size, e.type, 0)
    # The PVH structures and the zero page can coexist.
    assert layout.MEMMAP_START + 24 * layout.MEMMAP_MAX <= layout.ZERO_PAGE_START


def test_pvh_without_modules_has_no_modlist():
    raw = PvhStartInfo(memmap=e820_map([(0, 16 * MIB)])).start_info_bytes()
    assert struct.unpack_from("<IQ", raw, 12) == (0, 0)


def test_pvh_limits(mem16):
    memmap = e820_map([(0, 16 * MIB)])
    with pytest.raises(TooManyModules):
        PvhStartInfo(memmap=memmap, modules=[(0x800000, 1)] * (layout.MODLIST_MAX + 1)).write(mem16)
    with pytest.raises(TooManyE820Entries):
        PvhStartInfo(memmap=[E820Entry(0, 1, 1)] * (layout.MEMMAP_MAX + 1)).write(mem16)
    with pytest.raises(InitrdOutOfReach):
        PvhStartInfo(memmap=memmap, modules=[(0, 10)]).write(mem16)

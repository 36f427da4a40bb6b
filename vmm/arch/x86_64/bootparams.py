"""Linux zero page (struct boot_params), the E820 map, and PVH start info.

Primer. A 64-bit Linux entry gets %rsi pointing at a 4 KiB `struct
boot_params` (Documentation/x86/zero-page.rst; arch/x86/include/uapi/asm/
bootparam.h). Its `struct setup_header` at 0x1f1 is the bzImage's own
header (copied from the file, then patched by the loader:
Documentation/x86/boot.rst, "The Real-Mode Kernel Header") or, for a plain
vmlinux, a minimal one the loader makes up. The loader fills in where the
command line and initrd are, and the E820 table describing RAM. Fields are
little-endian at fixed offsets, cited by each constant below.

A PVH entry instead gets %ebx pointing at `struct hvm_start_info`
(xen/include/public/arch-x86/hvm/start_info.h, also in Linux as
include/xen/interface/hvm/start_info.h), which points at a module list
(the initrd) and a memory map whose entries use the E820 types.

Everything here is plain data until `write*` puts it in guest memory.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from vmm.memory import GuestMemory, GuestMemoryError

from .layout import (
    CMDLINE_MAX_SIZE,
    CMDLINE_START,
    EBDA_START,
    HIMEM_START,
    MEMMAP_MAX,
    MEMMAP_START,
    MODLIST_MAX,
    MODLIST_START,
    PVH_INFO_START,
    RSDP_ADDR,
    ZERO_PAGE_START,
)

__all__ = [
    "BootParamsError",
    "CmdlineTooLong",
    "CmdlineInvalid",
    "BadSetupHeader",
    "TooManyE820Entries",
    "BadMemoryRegions",
    "InitrdOutOfReach",
    "TooManyModules",
    "BootStructureOutsideMemory",
    "E820_RAM",
    "E820_RESERVED",
    "E820_ACPI",
    "E820_NVS",
    "E820_UNUSABLE",
    "E820_MAX_ENTRIES_ZEROPAGE",
    "BOOT_PARAMS_SIZE",
    "SETUP_HEADER_OFFSET",
    "SETUP_HEADER_MAX_SIZE",
    "KERNEL_BOOT_FLAG_MAGIC",
    "KERNEL_HDR_MAGIC",
    "KERNEL_LOADER_OTHER",
    "KERNEL_MIN_ALIGNMENT_BYTES",
    "LOADED_HIGH",
    "CAN_USE_HEAP",
    "XLF_CAN_BE_LOADED_ABOVE_4G",
    "XEN_HVM_START_MAGIC_VALUE",
    "HVM_START_INFO_SIZE",
    "HVM_MODLIST_ENTRY_SIZE",
    "HVM_MEMMAP_ENTRY_SIZE",
    "E820Entry",
    "e820_map",
    "write_cmdline",
    "BootParams",
    "PvhStartInfo",
]

# --- struct boot_params (Documentation/x86/zero-page.rst) ----------------------

BOOT_PARAMS_SIZE = 4096
OFF_ACPI_RSDP_ADDR = 0x070       # /8 acpi_rsdp_addr (boot protocol 2.14 era)
OFF_EXT_RAMDISK_IMAGE = 0x0C0    # /4 ramdisk_image high 32 bits
OFF_EXT_RAMDISK_SIZE = 0x0C4     # /4 ramdisk_size high 32 bits
OFF_EXT_CMD_LINE_PTR = 0x0C8     # /4 cmd_line_ptr high 32 bits
OFF_E820_ENTRIES = 0x1E8         # /1 number of entries in e820_table
OFF_SENTINEL = 0x1EF             # /1 must stay 0 (nonzero: "broken bootloader")
OFF_E820_TABLE = 0x2D0           # /0xa00 array of struct boot_e820_entry
E820_MAX_ENTRIES_ZEROPAGE = 128  # arch/x86/include/uapi/asm/setup_data.h
E820_ENTRY_SIZE = 20             # struct boot_e820_entry { u64 addr, size; u32 type } packed

# --- struct setup_header (Documentation/x86/boot.rst, "Real-mode kernel header")

SETUP_HEADER_OFFSET = 0x1F1
# bootparam.h pads the header area up to edd_mbr_sig_buffer at 0x290.
SETUP_HEADER_MAX_SIZE = 0x290 - SETUP_HEADER_OFFSET
OFF_BOOT_FLAG = 0x1FE            # /2 0xAA55
OFF_HEADER = 0x202               # /4 "HdrS"
OFF_VERSION = 0x206              # /2 boot protocol version
OFF_TYPE_OF_LOADER = 0x210       # /1
OFF_LOADFLAGS = 0x211            # /1
OFF_RAMDISK_IMAGE = 0x218        # /4
OFF_RAMDISK_SIZE = 0x21C         # /4
OFF_CMD_LINE_PTR = 0x228         # /4 (2.02+)
OFF_INITRD_ADDR_MAX = 0x22C      # /4 (2.03+)
OFF_KERNEL_ALIGNMENT = 0x230     # /4 (2.05+)
OFF_XLOADFLAGS = 0x236           # /2 (2.12+)
OFF_CMDLINE_SIZE = 0x238         # /4 (2.06+)

KERNEL_BOOT_FLAG_MAGIC = 0xAA55
KERNEL_HDR_MAGIC = 0x53726448    # "HdrS"
KERNEL_LOADER_OTHER = 0xFF       # boot.rst type_of_loader: 0xFF = undefined/other
KERNEL_MIN_ALIGNMENT_BYTES = 0x01000000  # as Firecracker for a header-less vmlinux
# boot.rst loadflags: bit 0 LOADED_HIGH (protected-mode code at 0x100000),
# bit 7 CAN_USE_HEAP (heap_end_ptr valid; only for the real-mode entry).
LOADED_HIGH = 1 << 0
CAN_USE_HEAP = 1 << 7
# boot.rst xloadflags bit 1: the initrd may live above 4 GiB.
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1
_PROTOCOL_INITRD_ADDR_MAX = 0x0203
_PROTOCOL_CMDLINE_SIZE = 0x0206
_PROTOCOL_XLOADFLAGS = 0x020C

# arch/x86/include/asm/e820/types.h, enum e820_type.
E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3
E820_NVS = 4
E820_UNUSABLE = 5

# --- PVH (start_info.h) ----------------------------------------------------------

XEN_HVM_START_MAGIC_VALUE = 0x336EC578
HVM_START_INFO_VERSION = 1
HVM_START_INFO_SIZE = 56         # version 1 layout, through `reserved`
HVM_MODLIST_ENTRY_SIZE = 32      # paddr, size, cmdline_paddr, reserved
HVM_MEMMAP_ENTRY_SIZE = 24       # addr, size, type, reserved

_4G = 1 << 32


class BootParamsError(Exception):
    """Boot parameters could not be built."""


class CmdlineTooLong(BootParamsError):
    """Kernel command line is longer than the kernel accepts."""


class CmdlineInvalid(BootParamsError):
    """Kernel command line must be ASCII without NUL bytes."""


class BadSetupHeader(BootParamsError):
    """Setup header is not a Linux boot protocol header."""


class TooManyE820Entries(BootParamsError):
    """Memory map has more entries than the boot structure can hold."""


class BadMemoryRegions(BootParamsError):
    """Guest RAM regions cannot be described by the x86 memory map."""


class InitrdOutOfReach(BootParamsError):
    """Initrd lies above the highest address the kernel accepts."""


class TooManyModules(BootParamsError):
    """PVH module list does not fit its reserved area."""


class BootStructureOutsideMemory(BootParamsError):
    """Boot structure does not fit in guest memory."""


def _write(mem: GuestMemory, gpa: int, data: bytes, what: str) -> None:
    try:
        mem.write(gpa, data)
    except GuestMemoryError as exc:
        raise BootStructureOutsideMemory(f"{what} at {gpa:#x}+{len(data):#x}") from exc


# --- E820 --------------------------------------------------------------------------


@dataclass(frozen=True)
class E820Entry:
    """One range of the physical memory map: [addr, addr + size) of `type`."""

    addr: int
    size: int
    type: int

    @property
    def end(self) -> int:
        return self.addr + self.size

    def pack(self) -> bytes:
        """struct boot_e820_entry (20 bytes, packed)."""
        return struct.pack("<QQI", self.addr, self.size, self.type)

    def pack_hvm(self) -> bytes:
        """struct hvm_memmap_table_entry (24 bytes, reserved = 0)."""
        return struct.pack("<QQII", self.addr, self.size, self.type, 0)


def e820_map(regions: list[tuple[int, int]], *, reserved_end: int = HIMEM_START) -> list[E820Entry]:
    """The memory map for guest RAM `regions` ((gpa, size), sorted or not).

    RAM [0, EBDA_START); reserved [EBDA_START, reserved_end) (EBDA with the
    MP table, VGA hole, BIOS area with the ACPI tables); RAM from
    HIMEM_START to the end of the first region; every other region as RAM.
    The MMIO gap between regions is left out, as on a PC.
    """
    if not regions:
        raise BadMemoryRegions("no RAM regions")
    ordered = sorted(regions)
    first_gpa, first_size = ordered[0]
    if first_gpa != 0:
        raise BadMemoryRegions(f"first RAM region starts at {first_gpa:#x}, not 0")
    if first_size <= reserved_end:
        raise BadMemoryRegions(f"first RAM region ends at {first_size:#x}, inside the low megabyte")
    for (a, sa), (b, _) in zip(ordered, ordered[1:]):
        if a + sa > b:
            raise BadMemoryRegions(f"regions at {a:#x} and {b:#x} overlap")
    entries = [
        E820Entry(0, EBDA_START, E820_RAM),
        E820Entry(EBDA_START, reserved_end - EBDA_START, E820_RESERVED),
        E820Entry(reserved_end, first_size - reserved_end, E820_RAM),
    ]
    entries += [E820Entry(gpa, size, E820_RAM) for gpa, size in ordered[1:] if size]
    return entries


# --- command line ------------------------------------------------------------------


def write_cmdline(
    mem: GuestMemory,
    cmdline: str | bytes,
    addr: int = CMDLINE_START,
    *,
    max_size: int = CMDLINE_MAX_SIZE,
) -> int:
    """Write `cmdline` NUL-terminated at `addr`; return its length without NUL.

    `max_size` counts the NUL (Linux's COMMAND_LINE_SIZE).
    """
    text = cmdline if isinstance(cmdline, str) else bytes(cmdline).decode("latin-1")
    if not text.isascii():
        raise CmdlineInvalid("contains non-ASCII characters")
    if "\0" in text:
        raise CmdlineInvalid("contains a NUL byte")
    raw = text.encode("ascii")
    if len(raw) + 1 > max_size:
        raise CmdlineTooLong(f"{len(raw)} bytes + NUL > {max_size}")
    _write(mem, addr, raw + b"\0", "command line")
    return len(raw)


# --- boot_params ------------------------------------------------------------------


def _u16(buf: bytes | bytearray, off: int) -> int:
    return struct.unpack_from("<H", buf, off)[0]


def _u32(buf: bytes | bytearray, off: int) -> int:
    return struct.unpack_from("<I", buf, off)[0]


@dataclass
class BootParams:
    """Builder for the zero page of the Linux 64-bit boot protocol.

    `setup_header` is the bzImage's header (file bytes from 0x1f1, up to its
    end at 0x202 + byte[0x201]), or None for a vmlinux, which gets a minimal
    header (boot flag, "HdrS", kernel_alignment). `cmdline_len` excludes the
    NUL; `initrd` is (gpa, size) or None.
    """

    e820: list[E820Entry]
    cmdline_addr: int = CMDLINE_START
    cmdline_len: int = 0
    initrd: tuple[int, int] | None = None
    rsdp_addr: int = RSDP_ADDR
    setup_header: bytes | None = None

    def _check_header(self, hdr: bytes) -> None:
        if len(hdr) > SETUP_HEADER_MAX_SIZE:
            raise BadSetupHeader(f"{len(hdr)} bytes, more than {SETUP_HEADER_MAX_SIZE}")
        if len(hdr) < OFF_VERSION + 2 - SETUP_HEADER_OFFSET:
            raise BadSetupHeader(f"only {len(hdr)} bytes")
        if _u32(hdr, OFF_HEADER - SETUP_HEADER_OFFSET) != KERNEL_HDR_MAGIC:
            raise BadSetupHeader("no HdrS magic at 0x202")

    def to_bytes(self) -> bytes:
        """The 4096-byte zero page."""
        if len(self.e820) > E820_MAX_ENTRIES_ZEROPAGE:
            raise TooManyE820Entries(f"{len(self.e820)} > {E820_MAX_ENTRIES_ZEROPAGE}")
        zp = bytearray(BOOT_PARAMS_SIZE)
        if self.setup_header is not None:
            self._check_header(self.setup_header)
            zp[SETUP_HEADER_OFFSET:SETUP_HEADER_OFFSET + len(self.setup_header)] = self.setup_header
        else:
            struct.pack_into("<I", zp, OFF_KERNEL_ALIGNMENT, KERNEL_MIN_ALIGNMENT_BYTES)
            zp[OFF_LOADFLAGS] = LOADED_HIGH
        struct.pack_into("<H", zp, OFF_BOOT_FLAG, KERNEL_BOOT_FLAG_MAGIC)
        struct.pack_into("<I", zp, OFF_HEADER, KERNEL_HDR_MAGIC)
        version = _u16(zp, OFF_VERSION)
        zp[OFF_TYPE_OF_LOADER] = KERNEL_LOADER_OTHER
        # Loader-writable loadflags bits: no real-mode heap here.
        zp[OFF_LOADFLAGS] &= ~CAN_USE_HEAP & 0xFF

        self._set_cmdline(zp, version)
        self._set_initrd(zp, version)
        struct.pack_into("<Q", zp, OFF_ACPI_RSDP_ADDR, self.rsdp_addr)
        zp[OFF_E820_ENTRIES] = len(self.e820)
        table = b"".join(e.pack() for e in self.e820)
        zp[OFF_E820_TABLE:OFF_E820_TABLE + len(table)] = table
        assert zp[OFF_SENTINEL] == 0
        return bytes(zp)

    def _set_cmdline(self, zp: bytearray, version: int) -> None:
        if self.cmdline_len < 0 or self.cmdline_len + 1 > CMDLINE_MAX_SIZE:
            raise CmdlineTooLong(f"{self.cmdline_len} bytes + NUL > {CMDLINE_MAX_SIZE}")
        if self.setup_header is not None and version >= _PROTOCOL_CMDLINE_SIZE:
            # boot.rst: cmdline_size (read) is the kernel's limit, NUL excluded.
            limit = _u32(zp, OFF_CMDLINE_SIZE)
            if self.cmdline_len > limit:
                raise CmdlineTooLong(f"{self.cmdline_len} bytes > the kernel's cmdline_size {limit}")
        elif self.setup_header is None:
            struct.pack_into("<I", zp, OFF_CMDLINE_SIZE, self.cmdline_len)
        struct.pack_into("<I", zp, OFF_CMD_LINE_PTR, self.cmdline_addr & 0xFFFFFFFF)
        struct.pack_into("<I", zp, OFF_EXT_CMD_LINE_PTR, self.cmdline_addr >> 32)

    def _set_initrd(self, zp: bytearray, version: int) -> None:
        if self.initrd is None:
            return
        addr, size = self.initrd
        if addr <= 0 or size <= 0:
            raise InitrdOutOfReach(f"initrd {addr:#x}+{size:#x} is empty or at 0")
        if self.setup_header is not None and version >= _PROTOCOL_INITRD_ADDR_MAX:
            xload = _u16(zp, OFF_XLOADFLAGS) if version >= _PROTOCOL_XLOADFLAGS else 0
            if not xload & XLF_CAN_BE_LOADED_ABOVE_4G:
                limit = _u32(zp, OFF_INITRD_ADDR_MAX)
                if addr + size - 1 > limit:
                    raise InitrdOutOfReach(f"initrd ends at {addr + size - 1:#x} > initrd_addr_max {limit:#x}")
        struct.pack_into("<I", zp, OFF_RAMDISK_IMAGE, addr & 0xFFFFFFFF)
        struct.pack_into("<I", zp, OFF_RAMDISK_SIZE, size & 0xFFFFFFFF)
        struct.pack_into("<I", zp, OFF_EXT_RAMDISK_IMAGE, addr >> 32)
        struct.pack_into("<I", zp, OFF_EXT_RAMDISK_SIZE, size >> 32)

    def write(self, mem: GuestMemory, addr: int = ZERO_PAGE_START) -> int:
        """Write the zero page at `addr`; return `addr` (the %rsi value)."""
        _write(mem, addr, self.to_bytes(), "zero page")
        return addr

    def __repr__(self) -> str:
        kind = "bzImage" if self.setup_header is not None else "vmlinux"
        initrd = f"{self.initrd[0]:#x}+{self.initrd[1]:#x}" if self.initrd else "none"
        return (
            f"<BootParams {kind} e820={len(self.e820)} cmdline={self.cmdline_addr:#x}/{self.cmdline_len} "
            f"initrd={initrd} rsdp={self.rsdp_addr:#x}>"
        )


# --- PVH hvm_start_info -----------------------------------------------------------


@dataclass
class PvhStartInfo:
    """Builder for hvm_start_info (version 1), its module list and memory map.

    `modules` are (gpa, size) pairs; Linux takes the first as the initrd
    (arch/x86/platform/pvh/enlighten.c). `memmap` uses the E820 types, which
    match XEN_HVM_MEMMAP_TYPE_*.
    """

    memmap: list[E820Entry]
    cmdline_addr: int = CMDLINE_START
    modules: list[tuple[int, int]] = field(default_factory=list)
    rsdp_addr: int = RSDP_ADDR
    flags: int = 0

    def start_info_bytes(self) -> bytes:
        """struct hvm_start_info: magic, version, flags, nr_modules, modlist_paddr,
        cmdline_paddr, rsdp_paddr, memmap_paddr, memmap_entries, reserved."""
        return struct.pack(
            "<IIIIQQQQII",
            XEN_HVM_START_MAGIC_VALUE,
            HVM_START_INFO_VERSION,
            self.flags,
            len(self.modules),
            MODLIST_START if self.modules else 0,
            self.cmdline_addr,
            self.rsdp_addr,
            MEMMAP_START if self.memmap else 0,
            len(self.memmap),
            0,
        )

    def modlist_bytes(self) -> bytes:
        """struct hvm_modlist_entry[]: paddr, size, cmdline_paddr = 0, reserved."""
        return b"".join(struct.pack("<QQQQ", gpa, size, 0, 0) for gpa, size in self.modules)

    def memmap_bytes(self) -> bytes:
        """struct hvm_memmap_table_entry[]."""
        return b"".join(e.pack_hvm() for e in self.memmap)

    def write(self, mem: GuestMemory, addr: int = PVH_INFO_START) -> int:
        """Write start info at `addr`, modules at MODLIST_START, map at MEMMAP_START.

        Returns `addr` (the %ebx value).
        """
        if len(self.modules) > MODLIST_MAX:
            raise TooManyModules(f"{len(self.modules)} > {MODLIST_MAX}")
        if len(self.memmap) > MEMMAP_MAX:
            raise TooManyE820Entries(f"{len(self.memmap)} > {MEMMAP_MAX}")
        for gpa, size in self.modules:
            if gpa <= 0 or size <= 0:
                raise InitrdOutOfReach(f"module {gpa:#x}+{size:#x} is empty or at 0")
        _write(mem, addr, self.start_info_bytes(), "hvm_start_info")
        if self.modules:
            _write(mem, MODLIST_START, self.modlist_bytes(), "PVH module list")
        if self.memmap:
            _write(mem, MEMMAP_START, self.memmap_bytes(), "PVH memory map")
        return addr

    def __repr__(self) -> str:
        return (
            f"<PvhStartInfo memmap={len(self.memmap)} modules={len(self.modules)} "
            f"cmdline={self.cmdline_addr:#x} rsdp={self.rsdp_addr:#x}>"
        )

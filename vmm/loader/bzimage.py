"""Load a bzImage for the 64-bit Linux/x86 boot protocol.

Primer (Documentation/x86/boot.rst). A bzImage file is a real-mode part
(the 512-byte boot sector plus `setup_sects` 512-byte sectors of setup code)
followed by the protected-mode kernel: a small decompressor with the
compressed kernel inside. The setup header sits at file offset 0x1f1 and
ends at 0x202 + the byte at 0x201; a 64-bit boot loader copies it into
struct boot_params ("zero page") at the same offset, loads the
protected-mode part (bzImages at 0x100000, "Loading The Rest of The
Kernel"), and enters it in long mode at load address + 0x200 ("64-bit Boot
Protocol"), which exists when xloadflags has XLF_KERNEL_64.

Minimum protocol: 2.12. Entering at load + 0x200 is only defined for
kernels announcing XLF_KERNEL_64, and xloadflags first exists in 2.12
(Linux 3.8); every older field the loader relies on (syssize 2.04,
initrd_addr_max 2.03, relocatable_kernel 2.05, cmdline_size 2.06,
pref_address and init_size 2.10) is then present too.

The decompressor does not run where it was loaded: a relocatable kernel
moves to align_up(load, kernel_alignment), but never below pref_address
(LOAD_PHYSICAL_ADDR; arch/x86/boot/compressed/head_64.S), and needs
init_size bytes there; a non-relocatable one runs at pref_address. The
loader checks that this area is guest RAM and reports its end as
`kernel_end`, so that an initrd is never placed where the kernel will
decompress over it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vmm.memory import GuestMemory

from .common import (
    HIMEM_START,
    ImageEmpty,
    ImageSource,
    ImageTruncated,
    KernelLoadResult,
    LoaderError,
    align_up,
    open_image,
)

__all__ = [
    "BzImageError",
    "BzImageBadMagic",
    "BzImageUnsupported",
    "BzImageBadHeader",
    "BzImageOutsideMemory",
    "SetupHeader",
    "parse_setup_header",
    "load_bzimage",
    "SETUP_HEADER_OFFSET",
    "HDRS_MAGIC",
    "MIN_BOOT_PROTOCOL",
    "LOADED_HIGH",
    "XLF_KERNEL_64",
    "XLF_CAN_BE_LOADED_ABOVE_4G",
    "KERNEL_64_ENTRY_OFFSET",
]

# boot.rst, "The Real-Mode Kernel Header": file offsets of the fields used.
SETUP_HEADER_OFFSET = 0x1F1   # setup_sects, first byte of struct setup_header
OFF_SETUP_SECTS = 0x1F1       # /1
OFF_SYSSIZE = 0x1F4           # /4, 2.04+
OFF_BOOT_FLAG = 0x1FE         # /2, 0xAA55
OFF_JUMP = 0x200              # /2, short jump; its second byte gives the header end
OFF_HEADER = 0x202            # /4, "HdrS"
OFF_VERSION = 0x206           # /2
OFF_LOADFLAGS = 0x211         # /1
OFF_INITRD_ADDR_MAX = 0x22C   # /4, 2.03+
OFF_KERNEL_ALIGNMENT = 0x230  # /4, 2.05+
OFF_RELOCATABLE = 0x234       # /1, 2.05+
OFF_MIN_ALIGNMENT = 0x235     # /1, 2.10+
OFF_XLOADFLAGS = 0x236        # /2, 2.12+
OFF_CMDLINE_SIZE = 0x238      # /4, 2.06+
OFF_PREF_ADDRESS = 0x258      # /8, 2.10+
OFF_INIT_SIZE = 0x260         # /4, 2.10+

BOOT_FLAG = 0xAA55
HDRS_MAGIC = b"HdrS"
MIN_BOOT_PROTOCOL = 0x020C
# Header end for protocol 2.12: through handover_offset (0x264/4).
MIN_HEADER_END = 0x268
# arch/x86/include/uapi/asm/bootparam.h: struct boot_params pads the header
# area up to 0x290, so no header may extend past it.
MAX_HEADER_END = 0x290
# boot.rst, setup_sects: "If this field is 0, the real value is 4."
SETUP_SECTS_DEFAULT = 4
SECTOR_SIZE = 512
# boot.rst, loadflags bit 0 / xloadflags bits 0 and 1.
LOADED_HIGH = 0x01
XLF_KERNEL_64 = 0x01
XLF_CAN_BE_LOADED_ABOVE_4G = 0x02
# boot.rst, "64-bit Boot Protocol": entry = start of loaded kernel + 0x200.
KERNEL_64_ENTRY_OFFSET = 0x200

_4G = 1 << 32


class BzImageError(LoaderError):
    """Invalid bzImage."""


class BzImageBadMagic(BzImageError):
    """Not a bzImage (no HdrS setup header at 0x202)."""


class BzImageUnsupported(BzImageError):
    """bzImage cannot be booted with the 64-bit boot protocol."""


class BzImageBadHeader(BzImageError):
    """Malformed bzImage setup header."""


class BzImageOutsideMemory(BzImageError):
    """bzImage does not fit in guest memory."""


def _u8(h: bytes, off: int) -> int:
    return h[off - SETUP_HEADER_OFFSET]


def _u16(h: bytes, off: int) -> int:
    return struct.unpack_from("<H", h, off - SETUP_HEADER_OFFSET)[0]


def _u32(h: bytes, off: int) -> int:
    return struct.unpack_from("<I", h, off - SETUP_HEADER_OFFSET)[0]


def _u64(h: bytes, off: int) -> int:
    return struct.unpack_from("<Q", h, off - SETUP_HEADER_OFFSET)[0]


@dataclass(frozen=True, repr=False)
class SetupHeader:
    """A validated struct setup_header and the fields Ember reads from it.

    `raw` is the header exactly as in the file (from offset 0x1f1); it is
    what goes into boot_params. Offsets in field comments are file offsets.
    """

    raw: bytes
    setup_sects: int       # 0x1f1, with 0 already turned into 4
    syssize: int           # 0x1f4, in 16-byte paragraphs
    version: int           # 0x206
    loadflags: int         # 0x211
    initrd_addr_max: int   # 0x22c, highest address an initrd byte may use
    kernel_alignment: int  # 0x230
    relocatable_kernel: bool  # 0x234
    min_alignment: int     # 0x235
    xloadflags: int        # 0x236
    cmdline_size: int      # 0x238, excluding the terminating NUL
    pref_address: int      # 0x258
    init_size: int         # 0x260

    @property
    def setup_size(self) -> int:
        """Bytes of real-mode code before the protected-mode kernel."""
        return (self.setup_sects + 1) * SECTOR_SIZE

    @property
    def initrd_limit(self) -> int:
        """First address an initrd must stay below (initrd_addr_max + 1)."""
        return self.initrd_addr_max + 1

    def runtime_start(self, load_addr: int) -> int:
        """Where the kernel decompresses itself when loaded at `load_addr`."""
        if self.relocatable_kernel:
            return max(align_up(load_addr, self.kernel_alignment), self.pref_address)
        return self.pref_address

    def __repr__(self) -> str:
        return (
            f"<SetupHeader v{self.version >> 8}.{self.version & 0xFF:02} setup_sects={self.setup_sects} "
            f"pref={self.pref_address:#x} init_size={self.init_size:#x} xloadflags={self.xloadflags:#x}>"
        )


def parse_setup_header(header: bytes) -> SetupHeader:
    """Validate a setup header: the file's bytes from offset 0x1f1 onwards.

    `header` may run past the header's end (its end is read from the jump
    at 0x200); the returned `raw` is trimmed to it.
    """
    have_end = SETUP_HEADER_OFFSET + len(header)
    if have_end < OFF_HEADER + len(HDRS_MAGIC):
        raise ImageTruncated(f"file ends at {have_end:#x}, before the setup header magic")
    magic = header[OFF_HEADER - SETUP_HEADER_OFFSET:OFF_HEADER - SETUP_HEADER_OFFSET + 4]
    if magic != HDRS_MAGIC:
        raise BzImageBadMagic(f"found {magic!r}")
    if have_end < OFF_VERSION + 2:
        raise ImageTruncated(f"file ends at {have_end:#x}, inside the setup header")
    version = _u16(header, OFF_VERSION)
    if version < MIN_BOOT_PROTOCOL:
        raise BzImageUnsupported(
            f"boot protocol {version >> 8}.{version & 0xFF:02} is older than "
            f"{MIN_BOOT_PROTOCOL >> 8}.{MIN_BOOT_PROTOCOL & 0xFF:02}"
        )
    end = OFF_HEADER + _u8(header, OFF_JUMP + 1)
    if not MIN_HEADER_END <= end <= MAX_HEADER_END:
        raise BzImageBadHeader(f"header ends at {end:#x}, expected {MIN_HEADER_END:#x}..{MAX_HEADER_END:#x}")
    if have_end < end:
        raise ImageTruncated(f"file ends at {have_end:#x}, inside the setup header (ends at {end:#x})")
    raw = bytes(header[:end - SETUP_HEADER_OFFSET])
    if _u16(raw, OFF_BOOT_FLAG) != BOOT_FLAG:
        raise BzImageBadHeader(f"boot_flag is {_u16(raw, OFF_BOOT_FLAG):#06x}, expected {BOOT_FLAG:#06x}")
    loadflags = _u8(raw, OFF_LOADFLAGS)
    if not loadflags & LOADED_HIGH:
        raise BzImageUnsupported("loadflags lacks LOADED_HIGH (a zImage, not a bzImage)")
    xloadflags = _u16(raw, OFF_XLOADFLAGS)
    if not xloadflags & XLF_KERNEL_64:
        raise BzImageUnsupported("xloadflags lacks XLF_KERNEL_64 (no 64-bit entry point)")
    relocatable = bool(_u8(raw, OFF_RELOCATABLE))
    kernel_alignment = _u32(raw, OFF_KERNEL_ALIGNMENT)
    if relocatable and (kernel_alignment == 0 or kernel_alignment & (kernel_alignment - 1)):
        raise BzImageBadHeader(f"kernel_alignment {kernel_alignment:#x} is not a power of two")
    pref_address = _u64(raw, OFF_PREF_ADDRESS)
    if not relocatable and pref_address == 0:
        raise BzImageBadHeader("kernel is not relocatable and has no pref_address")
    init_size = _u32(raw, OFF_INIT_SIZE)
    if init_size == 0:
        raise BzImageBadHeader("init_size is 0")
    return SetupHeader(
        raw=raw,
        setup_sects=_u8(raw, OFF_SETUP_SECTS) or SETUP_SECTS_DEFAULT,
        syssize=_u32(raw, OFF_SYSSIZE),
        version=version,
        loadflags=loadflags,
        initrd_addr_max=_u32(raw, OFF_INITRD_ADDR_MAX),
        kernel_alignment=kernel_alignment,
        relocatable_kernel=relocatable,
        min_alignment=_u8(raw, OFF_MIN_ALIGNMENT),
        xloadflags=xloadflags,
        cmdline_size=_u32(raw, OFF_CMDLINE_SIZE),
        pref_address=pref_address,
        init_size=init_size,
    )


def load_bzimage(mem: GuestMemory, source: ImageSource, *, load_addr: int = HIMEM_START) -> KernelLoadResult:
    """Load a bzImage's protected-mode kernel at `load_addr` (default 0x100000).

    Checks that the loaded kernel and its decompression area
    (init_size bytes at its runtime address) are guest RAM; raises a
    BzImageError (or another LoaderError) and leaves guest memory untouched
    if not, or if the image is invalid.
    """
    if load_addr < 0:
        raise ValueError(f"load_addr must be >= 0, got {load_addr}")
    with open_image(source) as image:
        if image.size == 0:
            raise ImageEmpty()
        head = image.read_at(0, min(image.size, MAX_HEADER_END))
        hdr = parse_setup_header(head[SETUP_HEADER_OFFSET:])

        kernel_offset = hdr.setup_size
        kernel_size = image.size - kernel_offset
        if kernel_size <= KERNEL_64_ENTRY_OFFSET:
            raise ImageTruncated(
                f"{max(kernel_size, 0)} bytes of protected-mode kernel after the "
                f"{kernel_offset}-byte setup, entry point at +{KERNEL_64_ENTRY_OFFSET:#x}"
            )
        if hdr.syssize * 16 > kernel_size:
            raise ImageTruncated(
                f"syssize says {hdr.syssize * 16} bytes of protected-mode kernel, the file has {kernel_size}"
            )

        where = f"{kernel_size:#x} bytes at {load_addr:#x}"
        if not mem.check_range(load_addr, kernel_size):
            raise BzImageOutsideMemory(f"{where} ({mem!r})")
        if load_addr + kernel_size > _4G and not hdr.xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G:
            raise BzImageOutsideMemory(f"{where} crosses 4 GiB and the kernel lacks XLF_CAN_BE_LOADED_ABOVE_4G")
        runtime = hdr.runtime_start(load_addr)
        if not mem.check_range(runtime, hdr.init_size):
            raise BzImageOutsideMemory(
                f"the kernel decompresses to {runtime:#x}..{runtime + hdr.init_size:#x} (init_size) ({mem!r})"
            )

        image.copy_to_guest(kernel_offset, kernel_size, mem, load_addr)

    return KernelLoadResult(
        kernel_load=load_addr,
        kernel_end=max(load_addr + kernel_size, runtime + hdr.init_size),
        entry_64=load_addr + KERNEL_64_ENTRY_OFFSET,
        pvh_entry=None,
        setup_header=hdr.raw,
    )

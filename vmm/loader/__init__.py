"""Kernel, initrd and command-line loading for x86_64 guests.

`load_kernel` sniffs the file and hands it to the ELF loader (vmlinux or a
freestanding test guest: segments at their physical addresses, optional PVH
entry note) or the bzImage loader (64-bit boot protocol). Both only write
guest memory; building boot_params, page tables and registers is the job of
`vmm.arch.x86_64`.
"""

from __future__ import annotations

from vmm.memory import GuestMemory

from .bzimage import (
    HDRS_MAGIC,
    KERNEL_64_ENTRY_OFFSET,
    MIN_BOOT_PROTOCOL,
    SETUP_HEADER_OFFSET,
    BzImageBadHeader,
    BzImageBadMagic,
    BzImageError,
    BzImageOutsideMemory,
    BzImageUnsupported,
    SetupHeader,
    load_bzimage,
    parse_setup_header,
)
from .cmdline import (
    COMMAND_LINE_SIZE,
    Cmdline,
    CmdlineBadKey,
    CmdlineBadValue,
    CmdlineError,
    CmdlineInvalidText,
    CmdlineTooLong,
    split_args,
    virtio_mmio_device_arg,
)
from .common import (
    HIMEM_START,
    PAGE_SIZE,
    GuestMemoryWriteFailed,
    ImageEmpty,
    ImageFile,
    ImageNotFound,
    ImageSource,
    ImageTruncated,
    ImageUnreadable,
    KernelLoadResult,
    LoaderError,
    UnknownImageFormat,
    open_image,
)
from .elf import (
    ELFMAG,
    XEN_ELFNOTE_PHYS32_ENTRY,
    ElfBadEntry,
    ElfBadHeader,
    ElfBadMagic,
    ElfBadNote,
    ElfBadProgramHeader,
    ElfBadPvhEntry,
    ElfError,
    ElfNoLoadableSegment,
    ElfSegmentOutsideMemory,
    ElfSegmentsOverlap,
    ElfSegmentTooLow,
    ElfUnsupported,
    load_elf,
)
from .initrd import InitrdDoesNotFit, InitrdError, load_initrd, place_initrd

__all__ = [
    # entry points
    "load_kernel",
    "load_elf",
    "load_bzimage",
    "load_initrd",
    "place_initrd",
    "KernelLoadResult",
    "SetupHeader",
    "parse_setup_header",
    "Cmdline",
    "split_args",
    "virtio_mmio_device_arg",
    "open_image",
    "ImageFile",
    "ImageSource",
    # constants
    "HIMEM_START",
    "PAGE_SIZE",
    "COMMAND_LINE_SIZE",
    "ELFMAG",
    "HDRS_MAGIC",
    "SETUP_HEADER_OFFSET",
    "MIN_BOOT_PROTOCOL",
    "KERNEL_64_ENTRY_OFFSET",
    "XEN_ELFNOTE_PHYS32_ENTRY",
    # errors
    "LoaderError",
    "ImageNotFound",
    "ImageUnreadable",
    "ImageEmpty",
    "ImageTruncated",
    "UnknownImageFormat",
    "GuestMemoryWriteFailed",
    "ElfError",
    "ElfBadMagic",
    "ElfUnsupported",
    "ElfBadHeader",
    "ElfBadProgramHeader",
    "ElfNoLoadableSegment",
    "ElfSegmentOutsideMemory",
    "ElfSegmentTooLow",
    "ElfSegmentsOverlap",
    "ElfBadEntry",
    "ElfBadNote",
    "ElfBadPvhEntry",
    "BzImageError",
    "BzImageBadMagic",
    "BzImageUnsupported",
    "BzImageBadHeader",
    "BzImageOutsideMemory",
    "InitrdError",
    "InitrdDoesNotFit",
    "CmdlineError",
    "CmdlineInvalidText",
    "CmdlineBadKey",
    "CmdlineBadValue",
    "CmdlineTooLong",
]

# Signatures of formats people mistake for a kernel image, for a better
# message than "unknown format".
_KNOWN_NOT_KERNELS = (
    (b"\x1f\x8b", "gzip-compressed data (decompress it first)"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed data (decompress it first)"),
    (b"\xfd7zXZ\x00", "xz-compressed data (decompress it first)"),
    (b"MZ", "a PE/EFI executable without a Linux setup header"),
)


def load_kernel(mem: GuestMemory, source: ImageSource, *, lowest_kernel_addr: int = HIMEM_START) -> KernelLoadResult:
    """Load an ELF (vmlinux, test guest) or bzImage kernel, chosen by content.

    An ELF is loaded at its segments' physical addresses, each at or above
    `lowest_kernel_addr`; a bzImage at `lowest_kernel_addr` (0x100000 by
    default, as the boot protocol says). Any problem with the file raises a
    LoaderError whose message names the file and the problem.
    """
    with open_image(source) as image:
        if image.size == 0:
            raise ImageEmpty()
        head = image.read_at(0, min(image.size, SETUP_HEADER_OFFSET + 0x20))
        if head[:4] == ELFMAG or (len(head) < 4 and ELFMAG.startswith(head)):
            return load_elf(mem, image, lowest_kernel_addr=lowest_kernel_addr)
        if head[0x202:0x206] == HDRS_MAGIC:
            return load_bzimage(mem, image, load_addr=lowest_kernel_addr)
        for magic, what in _KNOWN_NOT_KERNELS:
            if head.startswith(magic):
                raise UnknownImageFormat(what)
        raise UnknownImageFormat(f"{image.size} bytes starting {head[:8].hex()}")

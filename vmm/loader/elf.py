"""Load an uncompressed ELF64 x86_64 kernel (`vmlinux`) or a freestanding guest.

Primer. An ELF executable starts with a 64-byte header (Elf64_Ehdr) naming
the program header table: e_phnum entries of e_phentsize bytes at e_phoff.
Each PT_LOAD program header describes one segment: p_filesz bytes at file
offset p_offset, to be placed at physical address p_paddr and followed by
p_memsz - p_filesz zero bytes (the bss). PT_NOTE segments hold a sequence of
notes (Elf64_Nhdr: namesz, descsz, type, then the name and the descriptor,
each padded to the segment's alignment, 4 bytes in practice).

Linux's vmlinux links its segments at virtual 0xffffffff81000000 and
physical 0x1000000 (p_vaddr != p_paddr); its e_entry is the physical address
of startup_64 (`ENTRY(phys_startup_64)` in arch/x86/kernel/vmlinux.lds.S).
With CONFIG_PVH it also carries a Xen note XEN_ELFNOTE_PHYS32_ENTRY whose
descriptor is the physical address of the 32-bit PVH entry (pvh_start_xen).

Everything in the file is untrusted: all headers are parsed and checked and
the load plan validated against the file and guest memory before the first
byte of guest memory is written.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vmm.memory import GuestMemory

from .common import (
    HIMEM_START,
    ImageEmpty,
    ImageFile,
    ImageSource,
    ImageTruncated,
    KernelLoadResult,
    LoaderError,
    align_up,
    open_image,
    zero_guest,
)

__all__ = [
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
    "ElfHeader",
    "ProgramHeader",
    "ELFMAG",
    "XEN_ELFNOTE_PHYS32_ENTRY",
    "parse_elf_header",
    "parse_program_headers",
    "find_pvh_entry",
    "load_elf",
]

# ELF-64 Object File Format 1.5, §3 "File header", e_ident indexes and values
# (names as in <elf.h>).
ELFMAG = b"\x7fELF"
EI_CLASS = 4
ELFCLASS64 = 2
EI_DATA = 5
ELFDATA2LSB = 1
EI_VERSION = 6
EV_CURRENT = 1
# §3 e_type / e_machine
ET_EXEC = 2
EM_X86_64 = 62
# §5 "Program header table": p_type
PT_LOAD = 1
PT_NOTE = 4
# gABI: e_phnum == PN_XNUM means the real count is in section 0 (extended
# numbering); never used by a kernel, rejected here.
PN_XNUM = 0xFFFF

# Elf64_Ehdr, Elf64_Phdr, Elf64_Nhdr layouts.
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_NHDR = struct.Struct("<III")
EHDR_SIZE = _EHDR.size  # 64
PHDR_SIZE = _PHDR.size  # 56
NHDR_SIZE = _NHDR.size  # 12

# Xen public/elfnote.h: "Physical entry point into the kernel", a 32-bit
# physical address given as a 4- or 8-byte number, in a note named "Xen".
XEN_ELFNOTE_PHYS32_ENTRY = 18
XEN_NOTE_NAME = b"Xen"

# Sanity limits on untrusted counts and sizes. A vmlinux has about six
# program headers and a few hundred bytes of notes; these bounds are far
# above any real image and keep a hostile one from making us parse megabytes.
MAX_PHNUM = 256
MAX_NOTE_SEGMENT = 1 << 20

_U64_LIMIT = 1 << 64
_U32_LIMIT = 1 << 32


class ElfError(LoaderError):
    """Invalid ELF kernel image."""


class ElfBadMagic(ElfError):
    """Not an ELF file (bad magic)."""


class ElfUnsupported(ElfError):
    """Not a 64-bit little-endian x86_64 ELF executable."""


class ElfBadHeader(ElfError):
    """Malformed ELF header."""


class ElfBadProgramHeader(ElfError):
    """Malformed ELF program header."""


class ElfNoLoadableSegment(ElfError):
    """ELF file has no loadable segment."""


class ElfSegmentOutsideMemory(ElfError):
    """ELF segment does not fit in guest memory."""


class ElfSegmentTooLow(ElfError):
    """ELF segment lies below the lowest allowed kernel address."""


class ElfSegmentsOverlap(ElfError):
    """ELF segments overlap in physical memory."""


class ElfBadEntry(ElfError):
    """ELF entry point is not inside a loadable segment."""


class ElfBadNote(ElfError):
    """Malformed ELF note."""


class ElfBadPvhEntry(ElfError):
    """Invalid PVH entry point note."""


@dataclass(frozen=True)
class ElfHeader:
    """The fields of Elf64_Ehdr the loader uses, already validated."""

    entry: int
    phoff: int
    phnum: int


@dataclass(frozen=True)
class ProgramHeader:
    """One Elf64_Phdr, already validated against the file size."""

    index: int
    type: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    align: int

    @property
    def paddr_end(self) -> int:
        return self.paddr + self.memsz


def parse_elf_header(data: bytes, file_size: int) -> ElfHeader:
    """Validate the first 64 bytes of a file of `file_size` bytes."""
    if not data:
        raise ImageEmpty()
    if data[:4] != ELFMAG[:len(data)]:
        raise ElfBadMagic(f"first bytes are {data[:4].hex()}")
    if len(data) < EHDR_SIZE:
        raise ImageTruncated(f"{len(data)} bytes is shorter than an ELF header ({EHDR_SIZE})")
    (ident, e_type, e_machine, e_version, e_entry, e_phoff, _e_shoff, _e_flags,
     e_ehsize, e_phentsize, e_phnum, _e_shentsize, _e_shnum, _e_shstrndx) = _EHDR.unpack_from(data)
    if ident[EI_CLASS] != ELFCLASS64:
        raise ElfUnsupported(f"EI_CLASS is {ident[EI_CLASS]}, expected ELFCLASS64 ({ELFCLASS64})")
    if ident[EI_DATA] != ELFDATA2LSB:
        raise ElfUnsupported(f"EI_DATA is {ident[EI_DATA]}, expected ELFDATA2LSB ({ELFDATA2LSB})")
    if ident[EI_VERSION] != EV_CURRENT or e_version != EV_CURRENT:
        raise ElfUnsupported(f"ELF version {ident[EI_VERSION]}/{e_version}, expected {EV_CURRENT}")
    if e_machine != EM_X86_64:
        raise ElfUnsupported(f"e_machine is {e_machine}, expected EM_X86_64 ({EM_X86_64})")
    if e_type != ET_EXEC:
        raise ElfUnsupported(f"e_type is {e_type}, expected ET_EXEC ({ET_EXEC})")
    if e_ehsize != EHDR_SIZE:
        raise ElfBadHeader(f"e_ehsize is {e_ehsize}, expected {EHDR_SIZE}")
    if e_phentsize != PHDR_SIZE:
        raise ElfBadHeader(f"e_phentsize is {e_phentsize}, expected {PHDR_SIZE}")
    if e_phnum == 0:
        raise ElfBadHeader("no program headers")
    if e_phnum > MAX_PHNUM:
        raise ElfBadHeader(f"e_phnum is {e_phnum}, more than {MAX_PHNUM}")
    table_end = e_phoff + e_phnum * PHDR_SIZE
    if e_phoff < EHDR_SIZE or table_end > file_size:
        raise ElfBadHeader(
            f"program header table {e_phoff:#x}..{table_end:#x} is outside the file ({file_size} bytes)"
        )
    return ElfHeader(entry=e_entry, phoff=e_phoff, phnum=e_phnum)


def parse_program_headers(data: bytes, phnum: int, file_size: int) -> list[ProgramHeader]:
    """Validate `phnum` Elf64_Phdr entries; return the PT_LOAD and PT_NOTE ones.

    Other types (PT_GNU_STACK and the like) need no action and are dropped.
    """
    if len(data) < phnum * PHDR_SIZE:
        raise ImageTruncated("program header table is cut short")
    headers = []
    for i in range(phnum):
        p_type, _flags, offset, vaddr, paddr, filesz, memsz, align = _PHDR.unpack_from(data, i * PHDR_SIZE)
        if p_type not in (PT_LOAD, PT_NOTE):
            continue
        where = f"program header {i}"
        if filesz > memsz and p_type == PT_LOAD:
            raise ElfBadProgramHeader(f"{where}: p_filesz {filesz:#x} exceeds p_memsz {memsz:#x}")
        if filesz and offset + filesz > file_size:
            raise ElfBadProgramHeader(
                f"{where}: file range {offset:#x}..{offset + filesz:#x} is outside the file ({file_size} bytes)"
            )
        if paddr + memsz > _U64_LIMIT or vaddr + memsz > _U64_LIMIT:
            raise ElfBadProgramHeader(f"{where}: address range wraps past 2^64")
        headers.append(ProgramHeader(i, p_type, offset, vaddr, paddr, filesz, memsz, align))
    return headers


def find_pvh_entry(notes: bytes, align: int = 4) -> int | None:
    """The PHYS32_ENTRY value among the notes of one PT_NOTE segment.

    `align` is the note padding (the segment's p_align when it is 8, else 4).
    Every note is bounds-checked; unknown notes are skipped.
    """
    pad = 8 if align == 8 else 4
    end = len(notes)
    offset = 0
    while offset < end:
        if end - offset < NHDR_SIZE:
            if any(notes[offset:]):
                raise ElfBadNote(f"{end - offset} stray bytes at note offset {offset:#x}")
            break  # trailing zero padding
        namesz, descsz, n_type = _NHDR.unpack_from(notes, offset)
        name_at = offset + NHDR_SIZE
        desc_at = name_at + align_up(namesz, pad)
        if name_at + namesz > end or desc_at + descsz > end:
            raise ElfBadNote(
                f"note at offset {offset:#x} (namesz {namesz}, descsz {descsz}) runs past the segment end {end:#x}"
            )
        name = notes[name_at:name_at + namesz].rstrip(b"\0")
        if name == XEN_NOTE_NAME and n_type == XEN_ELFNOTE_PHYS32_ENTRY:
            desc = notes[desc_at:desc_at + descsz]
            if descsz == 4:
                (entry,) = struct.unpack("<I", desc)
            elif descsz == 8:
                (entry,) = struct.unpack("<Q", desc)
            else:
                raise ElfBadPvhEntry(f"descriptor is {descsz} bytes, expected 4 or 8")
            if entry >= _U32_LIMIT:
                raise ElfBadPvhEntry(f"entry {entry:#x} is not a 32-bit address")
            return entry
        offset = desc_at + align_up(descsz, pad)
    return None


def _resolve_entry(entry: int, loads: list[ProgramHeader]) -> int:
    """Translate e_entry to a physical address inside a loaded segment.

    vmlinux's e_entry is already physical; an image whose e_entry is a
    virtual address (vaddr != paddr) is translated through the segment
    holding it. The physical reading wins when both would match.
    """
    for seg in loads:
        if seg.paddr <= entry < seg.paddr_end:
            return entry
    for seg in loads:
        if seg.vaddr <= entry < seg.vaddr + seg.memsz:
            return seg.paddr + (entry - seg.vaddr)
    raise ElfBadEntry(f"e_entry {entry:#x} is in no PT_LOAD segment")


def _plan_segments(loads: list[ProgramHeader], mem: GuestMemory, lowest_kernel_addr: int) -> list[ProgramHeader]:
    """Check where the PT_LOAD segments land; return them sorted by address."""
    placed = sorted((s for s in loads if s.memsz), key=lambda s: s.paddr)
    if not placed:
        raise ElfNoLoadableSegment()
    for seg in placed:
        where = f"segment {seg.index} at {seg.paddr:#x}..{seg.paddr_end:#x}"
        if seg.paddr < lowest_kernel_addr:
            raise ElfSegmentTooLow(f"{where} starts below {lowest_kernel_addr:#x}")
        if not mem.check_range(seg.paddr, seg.memsz):
            raise ElfSegmentOutsideMemory(f"{where} ({mem!r})")
    for a, b in zip(placed, placed[1:]):
        if a.paddr_end > b.paddr:
            raise ElfSegmentsOverlap(f"segment {a.index} ends at {a.paddr_end:#x}, segment {b.index} starts at {b.paddr:#x}")
    return placed


def _pvh_entry(image: ImageFile, notes: list[ProgramHeader], placed: list[ProgramHeader]) -> int | None:
    for seg in notes:
        if seg.filesz > MAX_NOTE_SEGMENT:
            raise ElfBadNote(f"PT_NOTE segment {seg.index} is {seg.filesz} bytes, more than {MAX_NOTE_SEGMENT}")
        entry = find_pvh_entry(image.read_at(seg.offset, seg.filesz), seg.align)
        if entry is None:
            continue
        if not any(s.paddr <= entry < s.paddr_end for s in placed):
            raise ElfBadPvhEntry(f"entry {entry:#x} is in no PT_LOAD segment")
        return entry
    return None


def load_elf(
    mem: GuestMemory,
    source: ImageSource,
    *,
    lowest_kernel_addr: int = HIMEM_START,
) -> KernelLoadResult:
    """Load an ELF64 x86_64 executable's PT_LOAD segments at their p_paddr.

    Every segment must lie in one guest memory region at or above
    `lowest_kernel_addr`. Raises an ElfError (or another LoaderError) and
    leaves guest memory untouched if the image is invalid.
    """
    if lowest_kernel_addr < 0:
        raise ValueError(f"lowest_kernel_addr must be >= 0, got {lowest_kernel_addr}")
    with open_image(source) as image:
        header = parse_elf_header(image.read_at(0, min(EHDR_SIZE, image.size)), image.size)
        headers = parse_program_headers(
            image.read_at(header.phoff, header.phnum * PHDR_SIZE), header.phnum, image.size
        )
        placed = _plan_segments([h for h in headers if h.type == PT_LOAD], mem, lowest_kernel_addr)
        entry_64 = _resolve_entry(header.entry, placed)
        pvh_entry = _pvh_entry(image, [h for h in headers if h.type == PT_NOTE], placed)

        for seg in placed:
            image.copy_to_guest(seg.offset, seg.filesz, mem, seg.paddr)
            zero_guest(mem, seg.paddr + seg.filesz, seg.memsz - seg.filesz)

    return KernelLoadResult(
        kernel_load=placed[0].paddr,
        kernel_end=max(s.paddr_end for s in placed),
        entry_64=entry_64,
        pvh_entry=pvh_entry,
        setup_header=None,
    )

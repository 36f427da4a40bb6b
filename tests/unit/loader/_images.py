"""Crafted kernel images for the loader tests, built with struct.pack."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")
PT_LOAD, PT_NOTE = 1, 4


@dataclass
class Segment:
    paddr: int
    data: bytes
    memsz: int | None = None  # defaults to len(data)
    vaddr: int | None = None  # defaults to paddr


def note(name: bytes, n_type: int, desc: bytes, align: int = 4) -> bytes:
    """One ELF note, name NUL-terminated, both parts padded to `align`."""
    name_z = name + b"\0"
    pad = lambda b: b + bytes(-len(b) % align)  # noqa: E731
    return struct.pack("<III", len(name_z), len(desc), n_type) + pad(name_z) + pad(desc)


def pvh_note(entry: int, size: int = 4) -> bytes:
    return note(b"Xen", 18, entry.to_bytes(size, "little"))


@dataclass
class ElfSpec:
    segments: list[Segment]
    entry: int
    notes: bytes | None = None
    note_align: int = 4
    e_ident_class: int = 2
    e_ident_data: int = 1
    e_type: int = 2
    e_machine: int = 62
    e_phentsize: int = 56
    extra_phdrs: list[tuple] = field(default_factory=list)  # raw PHDR tuples


def build_elf(spec: ElfSpec) -> bytes:
    """An ELF64 executable: header, program headers, notes, segment data."""
    n_ph = len(spec.segments) + (1 if spec.notes is not None else 0) + len(spec.extra_phdrs)
    offset = 64 + 56 * n_ph
    phdrs = []
    body = b""
    if spec.notes is not None:
        phdrs.append(PHDR.pack(PT_NOTE, 4, offset, 0, 0, len(spec.notes), len(spec.notes), spec.note_align))
        body += spec.notes
        offset += len(spec.notes)
    for seg in spec.segments:
        pad = -offset % 16
        body += bytes(pad)
        offset += pad
        memsz = len(seg.data) if seg.memsz is None else seg.memsz
        vaddr = seg.paddr if seg.vaddr is None else seg.vaddr
        phdrs.append(PHDR.pack(PT_LOAD, 7, offset, vaddr, seg.paddr, len(seg.data), memsz, 0x1000))
        body += seg.data
        offset += len(seg.data)
    phdrs.extend(PHDR.pack(*raw) for raw in spec.extra_phdrs)
    ident = b"\x7fELF" + bytes([spec.e_ident_class, spec.e_ident_data, 1]) + bytes(9)
    ehdr = EHDR.pack(ident, spec.e_type, spec.e_machine, 1, spec.entry, 64, 0, 0, 64,
                     spec.e_phentsize, n_ph, 64, 0, 0)
    return ehdr + b"".join(phdrs) + body


def simple_elf(**overrides) -> bytes:
    """Two segments at 1 MiB (code, then data with bss) and a PVH note."""
    spec = ElfSpec(
        segments=[
            Segment(0x100000, b"\xf4" * 0x300),
            Segment(0x101000, b"DATA" * 64, memsz=0x2000),
        ],
        entry=0x100010,
        notes=note(b"GNU", 3, b"\x11" * 20) + pvh_note(0x100020),
    )
    for key, value in overrides.items():
        setattr(spec, key, value)
    return build_elf(spec)


# --- bzImage -------------------------------------------------------------------

def build_bzimage(
    *,
    setup_sects: int = 4,
    version: int = 0x020F,
    loadflags: int = 0x01,
    xloadflags: int = 0x03,
    relocatable: int = 1,
    kernel_alignment: int = 0x200000,
    pref_address: int = 0x1000000,
    init_size: int = 0x400000,
    header_end: int = 0x26C,
    boot_flag: int = 0xAA55,
    magic: bytes = b"HdrS",
    payload: bytes | None = None,
    syssize: int | None = None,
    initrd_addr_max: int = 0x7FFFFFFF,
    cmdline_size: int = 2047,
) -> bytes:
    """A bzImage with a valid (or deliberately bent) setup header."""
    real_sects = setup_sects or 4
    setup = bytearray((real_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    if payload is None:
        payload = bytes(range(256)) * 16 + b"\x48\x31\xc0\xf4" * 64
    struct.pack_into("<I", setup, 0x1F4, (len(payload) // 16) if syssize is None else syssize)
    struct.pack_into("<H", setup, 0x1FE, boot_flag)
    setup[0x200] = 0xEB
    setup[0x201] = header_end - 0x202
    setup[0x202:0x206] = magic
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = loadflags
    struct.pack_into("<I", setup, 0x214, 0x100000)  # code32_start
    struct.pack_into("<I", setup, 0x22C, initrd_addr_max)
    struct.pack_into("<I", setup, 0x230, kernel_alignment)
    setup[0x234] = relocatable
    setup[0x235] = 21
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    struct.pack_into("<Q", setup, 0x258, pref_address)
    struct.pack_into("<I", setup, 0x260, init_size)
    return bytes(setup) + payload

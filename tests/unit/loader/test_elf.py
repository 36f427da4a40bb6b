"""ELF loader: crafted vmlinux-like images, corrupt variants, a toolchain-built guest."""

from __future__ import annotations

import io
import shutil
import struct
import subprocess

import pytest

from vmm.loader import (
    ElfBadEntry,
    ElfBadHeader,
    ElfBadMagic,
    ElfBadNote,
    ElfBadProgramHeader,
    ElfBadPvhEntry,
    ElfNoLoadableSegment,
    ElfSegmentOutsideMemory,
    ElfSegmentsOverlap,
    ElfSegmentTooLow,
    ElfUnsupported,
    ImageEmpty,
    ImageTruncated,
    LoaderError,
    load_elf,
)
from vmm.loader.elf import find_pvh_entry
from vmm.memory import GuestMemory

from tests.unit.loader._images import ElfSpec, Segment, build_elf, note, pvh_note, simple_elf


@pytest.fixture
def mem():
    m = GuestMemory.anonymous([(0, 16 << 20)])
    yield m
    m.close()


def dirty(mem: GuestMemory, gpa: int, n: int) -> None:
    mem.write(gpa, b"\xff" * n)


def test_loads_segments_zeroes_bss_and_finds_pvh(mem, tmp_path):
    dirty(mem, 0x100000, 0x4000)
    path = tmp_path / "guest.elf"
    path.write_bytes(simple_elf())

    result = load_elf(mem, str(path))

    assert result.kernel_load == 0x100000
    assert result.kernel_end == 0x103000
    assert result.entry_64 == 0x100010
    assert result.pvh_entry == 0x100020
    assert result.setup_header is None
    assert mem.read(0x100000, 0x300) == b"\xf4" * 0x300
    # Between segments nothing is written.
    assert mem.read(0x100300, 0x10) == b"\xff" * 0x10
    assert mem.read(0x101000, 256) == b"DATA" * 64
    assert mem.read(0x101100, 0x1F00) == bytes(0x1F00)
    assert mem.read(0x103000, 4) == b"\xff" * 4
    assert "entry_64=0x100010" in repr(result)


def test_vmlinux_layout_physical_entry():
    # Like Linux: linked at 0xffffffff81000000, loaded at 0x1000000, e_entry physical.
    mem = GuestMemory.anonymous([(0, 32 << 20)])
    image = build_elf(ElfSpec(
        segments=[
            Segment(0x1000000, b"\x90" * 0x1000, vaddr=0xFFFFFFFF81000000),
            Segment(0x1200000, b"\x01" * 0x100, memsz=0x10000, vaddr=0xFFFFFFFF81200000),
            # A percpu-style segment: vaddr 0, paddr after data.
            Segment(0x1300000, b"\x02" * 0x40, vaddr=0),
        ],
        entry=0x1000000,
        notes=note(b"Linux", 1, b"6.1\0") + pvh_note(0x1000800, size=8),
    ))
    result = load_elf(mem, io.BytesIO(image))
    assert result.entry_64 == 0x1000000
    assert result.pvh_entry == 0x1000800
    assert (result.kernel_load, result.kernel_end) == (0x1000000, 0x1300040)
    assert mem.read(0x1300000, 0x40) == b"\x02" * 0x40


def test_virtual_entry_is_translated(mem):
    image = build_elf(ElfSpec(
        segments=[Segment(0x200000, b"\x90" * 0x100, vaddr=0xFFFFFFFF80200000)],
        entry=0xFFFFFFFF80200040,
    ))
    assert load_elf(mem, io.BytesIO(image)).entry_64 == 0x200040


def test_no_notes_means_no_pvh(mem):
    assert load_elf(mem, io.BytesIO(simple_elf(notes=None))).pvh_entry is None
    assert load_elf(mem, io.BytesIO(simple_elf(notes=note(b"GNU", 3, b"id")))).pvh_entry is None


def test_eight_byte_aligned_notes(mem):
    notes = note(b"GNU", 5, b"\x00" * 12, align=8) + note(b"Xen", 18, (0x100040).to_bytes(8, "little"), align=8)
    assert load_elf(mem, io.BytesIO(simple_elf(notes=notes, note_align=8))).pvh_entry == 0x100040


def test_lowest_kernel_addr_is_enforced(mem):
    image = simple_elf()
    with pytest.raises(ElfSegmentTooLow):
        load_elf(mem, io.BytesIO(image), lowest_kernel_addr=0x101000)
    low = build_elf(ElfSpec(segments=[Segment(0x8000, b"\x90" * 16)], entry=0x8000))
    with pytest.raises(ElfSegmentTooLow):
        load_elf(mem, io.BytesIO(low))
    assert load_elf(mem, io.BytesIO(low), lowest_kernel_addr=0).entry_64 == 0x8000


def _patch(image: bytes, offset: int, fmt: str, value: int) -> bytes:
    buf = bytearray(image)
    struct.pack_into(fmt, buf, offset, value)
    return bytes(buf)


PH0 = 64  # first program header (the PT_NOTE in simple_elf)
PH1 = 64 + 56  # first PT_LOAD
PH2 = 64 + 112  # second PT_LOAD


CORRUPT = {
    "bad magic": (lambda i: b"\x7fELG" + i[4:], ElfBadMagic),
    "32-bit class": (lambda i: _patch(i, 4, "<B", 1), ElfUnsupported),
    "big endian": (lambda i: _patch(i, 5, "<B", 2), ElfUnsupported),
    "bad ident version": (lambda i: _patch(i, 6, "<B", 0), ElfUnsupported),
    "aarch64": (lambda i: _patch(i, 18, "<H", 183), ElfUnsupported),
    "ET_DYN": (lambda i: _patch(i, 16, "<H", 3), ElfUnsupported),
    "ehsize": (lambda i: _patch(i, 52, "<H", 32), ElfBadHeader),
    "phentsize": (lambda i: _patch(i, 54, "<H", 32), ElfBadHeader),
    "phnum zero": (lambda i: _patch(i, 56, "<H", 0), ElfBadHeader),
    "phnum huge": (lambda i: _patch(i, 56, "<H", 0xFFFF), ElfBadHeader),
    "phnum past file": (lambda i: _patch(i, 56, "<H", 200), ElfBadHeader),
    "phoff past file": (lambda i: _patch(i, 32, "<Q", 1 << 40), ElfBadHeader),
    "phoff wraps": (lambda i: _patch(i, 32, "<Q", (1 << 64) - 8), ElfBadHeader),
    "segment offset past file": (lambda i: _patch(i, PH1 + 8, "<Q", 0x10000), ElfBadProgramHeader),
    "segment offset wraps": (lambda i: _patch(i, PH1 + 8, "<Q", (1 << 64) - 1), ElfBadProgramHeader),
    "filesz > memsz": (lambda i: _patch(i, PH2 + 40, "<Q", 0x10), ElfBadProgramHeader),
    "paddr wraps": (lambda i: _patch(i, PH1 + 24, "<Q", (1 << 64) - 0x10), ElfBadProgramHeader),
    "memsz huge": (lambda i: _patch(i, PH2 + 40, "<Q", (1 << 64) - 1), ElfBadProgramHeader),
    "segment outside memory": (lambda i: _patch(i, PH2 + 24, "<Q", 0xFFF000), ElfSegmentOutsideMemory),
    "segment far outside memory": (lambda i: _patch(i, PH2 + 24, "<Q", 1 << 40), ElfSegmentOutsideMemory),
    "segments overlap": (lambda i: _patch(i, PH2 + 24, "<Q", 0x100200), ElfSegmentsOverlap),
    "entry outside": (lambda i: _patch(i, 24, "<Q", 0x900000), ElfBadEntry),
    "note namesz overflow": (lambda i: _patch(i, _note_offset(i), "<I", 0xFFFFFFFF), ElfBadNote),
    "note descsz overflow": (lambda i: _patch(i, _note_offset(i) + 4, "<I", 0x1000), ElfBadNote),
    "note segment past file": (lambda i: _patch(i, PH0 + 32, "<Q", 1 << 20), ElfBadProgramHeader),
    "notes cut mid-header": (lambda i: _patch(i, PH0 + 32, "<Q", 36 + 8), ElfBadNote),
    "pvh note outside segments": (lambda i: _patch(i, _note_offset(i) + 36 + 16, "<I", 0x800000), ElfBadPvhEntry),
}


def _note_offset(image: bytes) -> int:
    return struct.unpack_from("<Q", image, PH0 + 8)[0]


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_corrupt_images_raise_clean_errors(name, mem, tmp_path):
    mutate, error = CORRUPT[name]
    image = mutate(simple_elf())
    path = tmp_path / "bad.elf"
    path.write_bytes(image)
    dirty(mem, 0x100000, 0x4000)

    with pytest.raises(error) as info:
        load_elf(mem, str(path))

    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert "\n" not in message
    # Parse, then act: nothing was written.
    assert mem.read(0x100000, 0x4000) == b"\xff" * 0x4000


def test_pvh_descriptor_of_odd_size(mem):
    image = simple_elf(notes=note(b"Xen", 18, b"\x00\x00\x10"))
    with pytest.raises(ElfBadPvhEntry, match="3 bytes"):
        load_elf(mem, io.BytesIO(image))


def test_pvh_entry_above_4g(mem):
    image = simple_elf(notes=pvh_note(1 << 33, size=8))
    with pytest.raises(ElfBadPvhEntry, match="32-bit"):
        load_elf(mem, io.BytesIO(image))


def test_only_bss_and_empty_segments():
    spec = ElfSpec(segments=[Segment(0x100000, b"", memsz=0)], entry=0x100000)
    with pytest.raises(ElfNoLoadableSegment):
        load_elf(GuestMemory.anonymous([(0, 4 << 20)]), io.BytesIO(build_elf(spec)))
    spec = ElfSpec(segments=[Segment(0x100000, b"\x90"), Segment(0x200000, b"", memsz=0x1000)], entry=0x200000)
    assert load_elf(GuestMemory.anonymous([(0, 4 << 20)]), io.BytesIO(build_elf(spec))).kernel_end == 0x201000


def test_bss_only_segment_may_point_past_end_of_file(mem):
    bss_only = (1, 6, 1 << 40, 0x200000, 0x200000, 0, 0x1000, 0x1000)
    image = simple_elf(extra_phdrs=[bss_only])
    mem.write(0x200000, b"\xff" * 0x1000)
    assert load_elf(mem, io.BytesIO(image)).kernel_end == 0x201000
    assert mem.read(0x200000, 0x1000) == bytes(0x1000)


def test_segment_spanning_two_regions_is_refused():
    mem = GuestMemory.anonymous([(0, 2 << 20), (2 << 20, 2 << 20)])
    image = build_elf(ElfSpec(segments=[Segment(0x1FF000, b"\x90" * 0x2000)], entry=0x1FF000))
    with pytest.raises(ElfSegmentOutsideMemory):
        load_elf(mem, io.BytesIO(image))


def test_other_program_header_types_are_ignored(mem):
    gnu_stack = (0x6474E551, 6, 0, 0, 0, 0, 0, 16)
    image = simple_elf(extra_phdrs=[gnu_stack])
    assert load_elf(mem, io.BytesIO(image)).entry_64 == 0x100010


@pytest.mark.parametrize("cut", [0, 3, 40, 64, 100, 200, 300, 700])
def test_truncated_files(cut, mem):
    image = simple_elf()[:cut]
    expected = ImageEmpty if cut == 0 else LoaderError
    with pytest.raises(expected):
        load_elf(mem, io.BytesIO(image))


def test_truncated_header_is_reported_as_truncation(mem):
    with pytest.raises(ImageTruncated):
        load_elf(mem, io.BytesIO(simple_elf()[:40]))


def test_find_pvh_entry_tolerates_trailing_zero_padding():
    assert find_pvh_entry(pvh_note(0x1234) + bytes(8)) == 0x1234
    with pytest.raises(ElfBadNote):
        find_pvh_entry(note(b"GNU", 3, b"id") + b"\x01" + bytes(7))
    assert find_pvh_entry(b"") is None


def test_first_pvh_note_wins():
    assert find_pvh_entry(note(b"Xen", 1, b"\0" * 8) + pvh_note(0x10) + pvh_note(0x20)) == 0x10


# --- a guest built by the real toolchain -----------------------------------------

GUEST_ASM = r"""
    .section .text, "ax"
    .code64
    .globl _start
_start:
    hlt
    jmp _start
    .code32
pvh_start:
    hlt
    .section .bss
    .skip 0x3000
    .section .note.Xen, "a", @note
    .balign 4
    .long 4, 4, 18
    .asciz "Xen"
    .long pvh_start - 0xffffffff80000000
"""

GUEST_LDS = """
ENTRY(phys_start)
phys_start = _start - 0xffffffff80000000;
PHDRS { text PT_LOAD; data PT_LOAD; note PT_NOTE; }
SECTIONS {
    . = 0xffffffff80200000;
    .text : AT(0x200000) { *(.text) } :text
    .note : { *(.note.Xen) } :text :note
    . = ALIGN(0x1000);
    .bss : AT(ADDR(.bss) - 0xffffffff80000000) { *(.bss) } :data
    /DISCARD/ : { *(.note.gnu.property) }
}
"""


@pytest.mark.skipif(not (shutil.which("as") and shutil.which("ld")), reason="needs binutils")
def test_toolchain_built_guest(tmp_path, mem):
    (tmp_path / "g.S").write_text(GUEST_ASM)
    (tmp_path / "g.lds").write_text(GUEST_LDS)
    subprocess.run(["as", "-o", str(tmp_path / "g.o"), str(tmp_path / "g.S")], check=True)
    subprocess.run(["ld", "-static", "-nostdlib", "-T", str(tmp_path / "g.lds"),
                    "-o", str(tmp_path / "g.elf"), str(tmp_path / "g.o")], check=True)
    dirty(mem, 0x200000, 0x5000)

    result = load_elf(mem, str(tmp_path / "g.elf"))

    assert result.entry_64 == 0x200000
    assert result.pvh_entry == 0x200003  # hlt; jmp rel8 = 3 bytes
    assert mem.read(0x200000, 3) == b"\xf4\xeb\xfd"
    assert result.kernel_load == 0x200000
    assert result.kernel_end >= 0x203000
    assert mem.read(result.kernel_end - 0x3000, 0x3000) == bytes(0x3000)

"""bzImage loader: setup header validation and placement."""

from __future__ import annotations

import io

import pytest

from vmm.loader import (
    BzImageBadHeader,
    BzImageBadMagic,
    BzImageOutsideMemory,
    BzImageUnsupported,
    ImageTruncated,
    load_bzimage,
    parse_setup_header,
)
from vmm.memory import GuestMemory

from tests.unit.loader._images import build_bzimage


@pytest.fixture
def mem():
    m = GuestMemory.anonymous([(0, 32 << 20)])
    yield m
    m.close()


def test_loads_protected_mode_kernel_at_1mib(mem, tmp_path):
    image = build_bzimage()
    path = tmp_path / "bzImage"
    path.write_bytes(image)
    payload = image[5 * 512:]

    result = load_bzimage(mem, str(path))

    assert result.kernel_load == 0x100000
    assert result.entry_64 == 0x100200
    assert result.pvh_entry is None
    assert result.setup_header == image[0x1F1:0x26C]
    assert len(result.setup_header) == 0x7B  # sizeof(struct setup_header) in 6.1
    assert mem.read(0x100000, len(payload)) == payload
    # Relocatable, loaded at 1 MiB: decompresses at pref_address (head_64.S clamp).
    assert result.kernel_end == 0x1000000 + 0x400000


def test_setup_sects_zero_means_four(mem):
    image = build_bzimage(setup_sects=0)
    result = load_bzimage(mem, io.BytesIO(image))
    assert mem.read(0x100000, 16) == image[5 * 512:5 * 512 + 16]
    assert result.setup_header[0] == 0


def test_larger_setup(mem):
    image = build_bzimage(setup_sects=27)
    load_bzimage(mem, io.BytesIO(image))
    assert mem.read(0x100000, 16) == image[28 * 512:28 * 512 + 16]


def test_parsed_header_fields():
    image = build_bzimage(initrd_addr_max=0x37FFFFFF, cmdline_size=4095)
    hdr = parse_setup_header(image[0x1F1:])
    assert hdr.version == 0x020F
    assert hdr.setup_sects == 4
    assert hdr.setup_size == 5 * 512
    assert hdr.initrd_limit == 0x38000000
    assert hdr.cmdline_size == 4095
    assert hdr.pref_address == 0x1000000
    assert hdr.kernel_alignment == 0x200000
    assert hdr.relocatable_kernel
    assert hdr.runtime_start(0x100000) == 0x1000000
    assert hdr.runtime_start(0x2100000) == 0x2200000
    assert hdr.raw == image[0x1F1:0x26C]
    assert "v2.15" in repr(hdr)


def test_non_relocatable_runs_at_pref_address(mem):
    image = build_bzimage(relocatable=0, pref_address=0x1800000, init_size=0x900000)
    with pytest.raises(BzImageOutsideMemory, match="decompresses"):
        load_bzimage(mem, io.BytesIO(image))
    image = build_bzimage(relocatable=0, pref_address=0x1800000, init_size=0x800000)
    assert load_bzimage(mem, io.BytesIO(image)).kernel_end == 0x2000000


def test_custom_load_address(mem):
    result = load_bzimage(mem, io.BytesIO(build_bzimage()), load_addr=0x1400000)
    assert result.entry_64 == 0x1400200
    # align_up(0x1400000, 2 MiB) is above pref_address.
    assert result.kernel_end == 0x1400000 + 0x400000


CORRUPT = {
    "bad magic": (dict(magic=b"HdrX"), BzImageBadMagic),
    "protocol 2.11": (dict(version=0x020B), BzImageUnsupported),
    "protocol 2.00": (dict(version=0x0200), BzImageUnsupported),
    "zImage": (dict(loadflags=0), BzImageUnsupported),
    "32-bit only": (dict(xloadflags=0), BzImageUnsupported),
    "bad boot flag": (dict(boot_flag=0x1234), BzImageBadHeader),
    "header too short": (dict(header_end=0x230), BzImageBadHeader),
    "header too long": (dict(header_end=0x2A0), BzImageBadHeader),
    "alignment not a power of two": (dict(kernel_alignment=0x300000), BzImageBadHeader),
    "alignment zero": (dict(kernel_alignment=0), BzImageBadHeader),
    "init_size zero": (dict(init_size=0), BzImageBadHeader),
    "fixed kernel without pref_address": (dict(relocatable=0, pref_address=0), BzImageBadHeader),
    "syssize beyond file": (dict(syssize=0x10000), ImageTruncated),
    "no protected-mode kernel": (dict(payload=b""), ImageTruncated),
    "kernel shorter than entry": (dict(payload=b"\x90" * 0x200), ImageTruncated),
    "init_size beyond memory": (dict(init_size=0x2000000), BzImageOutsideMemory),
    "pref_address beyond memory": (dict(pref_address=1 << 40), BzImageOutsideMemory),
}


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_corrupt_images_raise_clean_errors(name, mem, tmp_path):
    kwargs, error = CORRUPT[name]
    path = tmp_path / "bzImage"
    path.write_bytes(build_bzimage(**kwargs))
    mem.write(0x100000, b"\xff" * 0x2000)

    with pytest.raises(error) as info:
        load_bzimage(mem, str(path))

    assert str(info.value).startswith(f"{path}: ")
    assert "\n" not in str(info.value)
    assert mem.read(0x100000, 0x2000) == b"\xff" * 0x2000


def test_kernel_larger_than_memory():
    small = GuestMemory.anonymous([(0, 1 << 20), (2 << 20, 16 << 20)])
    with pytest.raises(BzImageOutsideMemory, match="0x100000"):
        load_bzimage(small, io.BytesIO(build_bzimage()))


def test_above_4g_needs_the_xloadflag():
    mem = GuestMemory.anonymous([(0, 1 << 20), ((4 << 30) - 0x1000, 0x2000)])
    image = build_bzimage(xloadflags=0x01, payload=b"\x90" * 0x1800, pref_address=0, init_size=0x10,
                          kernel_alignment=0x1000)
    with pytest.raises(BzImageOutsideMemory, match="4 GiB"):
        load_bzimage(mem, io.BytesIO(image), load_addr=(4 << 30) - 0x1000)


@pytest.mark.parametrize("cut", [0x100, 0x1F8, 0x204, 0x207, 0x220, 0x26B, 0x26C, 0x9FF])
def test_truncated_files(cut, mem):
    with pytest.raises((ImageTruncated, BzImageBadMagic)):
        load_bzimage(mem, io.BytesIO(build_bzimage()[:cut]))


def test_truncated_inside_header_says_truncated(mem):
    for cut in (0x204, 0x220, 0x26B):
        with pytest.raises(ImageTruncated):
            load_bzimage(mem, io.BytesIO(build_bzimage()[:cut]))

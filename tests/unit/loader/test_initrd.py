"""Initrd placement: page aligned, as high as allowed, above the kernel."""

from __future__ import annotations

import io

import pytest

from vmm.loader import ImageEmpty, ImageNotFound, InitrdDoesNotFit, load_initrd, place_initrd
from vmm.memory import GuestMemory


@pytest.fixture
def mem():
    m = GuestMemory.anonymous([(0, 16 << 20)])
    yield m
    m.close()


def test_placed_at_top_of_memory(mem, tmp_path):
    data = bytes(range(256)) * 40 + b"tail"  # 10244 bytes: not a page multiple
    path = tmp_path / "initrd.cpio"
    path.write_bytes(data)

    addr, size = load_initrd(mem, str(path), kernel_end=0x200000, max_addr=16 << 20)

    assert size == len(data)
    assert addr % 0x1000 == 0
    assert addr + size <= 16 << 20
    assert addr == (16 << 20) - 0x3000
    assert mem.read(addr, size) == data


def test_respects_max_addr(mem):
    addr, _ = load_initrd(mem, io.BytesIO(b"x" * 0x1000), kernel_end=0x200000, max_addr=0x800000)
    assert addr == 0x7FF000
    # initrd_addr_max + 1 style limit that is not page aligned
    addr, _ = load_initrd(mem, io.BytesIO(b"x" * 10), kernel_end=0x200000, max_addr=0x800800)
    assert addr == 0x800000 and addr + 10 <= 0x800800


def test_must_stay_above_kernel(mem):
    with pytest.raises(InitrdDoesNotFit) as info:
        load_initrd(mem, io.BytesIO(b"x" * 0x200000), kernel_end=0xF00000, max_addr=16 << 20)
    assert "\n" not in str(info.value)
    # Exactly fits between the kernel and the top.
    addr, _ = load_initrd(mem, io.BytesIO(b"x" * 0x100000), kernel_end=0xF00000, max_addr=16 << 20)
    assert addr == 0xF00000


def test_picks_highest_region_that_fits():
    mem = GuestMemory.anonymous([(0, 8 << 20), (1 << 32, 4 << 20)])
    # max_addr below 4 GiB: the high region is out of bounds.
    assert place_initrd(mem, 0x1000, kernel_end=0x200000, max_addr=1 << 32) == (8 << 20) - 0x1000
    # Unbounded: the high region wins.
    assert place_initrd(mem, 0x1000, kernel_end=0x200000, max_addr=1 << 40) == (1 << 32) + (4 << 20) - 0x1000
    # Too big for the high region but fits low.
    assert place_initrd(mem, 5 << 20, kernel_end=0x200000, max_addr=1 << 40) == 3 << 20
    with pytest.raises(InitrdDoesNotFit):
        place_initrd(mem, 5 << 20, kernel_end=0x400000, max_addr=1 << 40)


def test_larger_than_memory(mem):
    with pytest.raises(InitrdDoesNotFit):
        place_initrd(mem, 1 << 40, kernel_end=0, max_addr=1 << 50)


def test_empty_and_missing(mem, tmp_path):
    path = tmp_path / "empty"
    path.write_bytes(b"")
    with pytest.raises(ImageEmpty) as info:
        load_initrd(mem, str(path), kernel_end=0, max_addr=16 << 20)
    assert str(info.value) == f"{path}: File is empty"
    with pytest.raises(ImageNotFound):
        load_initrd(mem, str(tmp_path / "missing"), kernel_end=0, max_addr=16 << 20)

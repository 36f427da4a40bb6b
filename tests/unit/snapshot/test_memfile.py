"""Memory files: sparse full writes, diff writes from dirty bitmaps, merging a diff onto its base."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapshot import (
    BadDirtyBitmap,
    MemoryBufferMismatch,
    MemoryFileLayout,
    MemoryFileUnusable,
    dirty_runs,
    merge_diff,
    write_diff_memory_file,
    write_memory_file,
)
from snapshot.memfile import data_extents, is_zero
from vmm.memory import GuestMemory

from tests.unit.snapshot._guest import PAGE, MiB, layout_of, pattern_page

GiB = 1 << 30


def bitmap_for(pages: set[int], npages: int) -> bytes:
    """KVM's dirty-log layout: bit i of byte i // 8, LSB first; whole u64 words."""
    bm = bytearray(-(-npages // 64) * 8)
    for p in pages:
        bm[p // 8] |= 1 << (p % 8)
    return bytes(bm)


def test_a_big_guest_with_little_memory_in_use_makes_a_small_file(tmp_path):
    mem = GuestMemory.anonymous([(0, GiB)])
    used = random.Random(1).sample(range(GiB // PAGE), 2000)
    for p in used:
        mem.write(p * PAGE, pattern_page(p))
    path = tmp_path / "vm.mem"
    stats = write_memory_file(path, layout_of(mem), [r.mapping for r in mem.regions])
    st = os.stat(path)
    assert st.st_size == GiB
    assert stats.data_bytes == 2000 * PAGE
    assert stats.zero_bytes == GiB - 2000 * PAGE
    assert st.st_blocks * 512 <= 2 * 2000 * PAGE  # holes everywhere else
    back = GuestMemory.from_file(str(path), [(0, GiB)])
    for p in used[:50]:
        assert back.read(p * PAGE, PAGE) == pattern_page(p)
    unused = next(p for p in range(GiB // PAGE) if p not in set(used))
    assert back.read(unused * PAGE, PAGE) == bytes(PAGE)
    back.close()
    mem.close()


def test_multi_region_file_matches_guest_memory_byte_for_byte(tmp_path):
    # Two regions around a "hole" in guest-physical space, like x86's 32-bit gap.
    mem = GuestMemory.anonymous([(0, 3 * MiB), (64 * MiB, 2 * MiB)])
    rng = random.Random(2)
    for r in mem.regions:
        for p in range(0, r.size // PAGE, 3):
            mem.write(r.guest_addr + p * PAGE + rng.randrange(PAGE - 8), rng.randbytes(8))
    layout = layout_of(mem)
    path = tmp_path / "vm.mem"
    write_memory_file(path, layout, [r.mapping for r in mem.regions])
    data = path.read_bytes()
    assert data == mem.read(0, 3 * MiB) + mem.read(64 * MiB, 2 * MiB)
    extents = list(data_extents(os.open(path, os.O_RDONLY), 0, layout.file_size))
    assert extents and all(s % PAGE == 0 and e > s for s, e in extents)


def test_buffers_must_match_the_layout(tmp_path):
    layout = MemoryFileLayout.contiguous([(0, 2 * MiB)])
    with pytest.raises(MemoryBufferMismatch, match="1 buffers for 2 regions"):
        write_memory_file(tmp_path / "m", MemoryFileLayout.contiguous([(0, MiB), (4 * MiB, MiB)]), [bytes(MiB)])
    with pytest.raises(MemoryBufferMismatch, match="buffer 0 has 1048576 bytes"):
        write_memory_file(tmp_path / "m", layout, [bytes(MiB)])
    assert os.listdir(tmp_path) == []


@settings(max_examples=200, deadline=None)
@given(st.sets(st.integers(0, 199), max_size=60))
def test_dirty_runs_match_the_set_bits(pages):
    runs = list(dirty_runs(bitmap_for(pages, 200), 200))
    expanded = {p for first, count in runs for p in range(first, first + count)}
    assert expanded == pages
    # Runs are maximal and ordered.
    for (a, n), (b, _) in zip(runs, runs[1:]):
        assert a + n < b


def test_dirty_bitmaps_are_checked_against_their_region():
    with pytest.raises(BadDirtyBitmap, match="cannot cover"):
        list(dirty_runs(bytes(1), 9))
    with pytest.raises(BadDirtyBitmap, match="past page 10"):
        list(dirty_runs(bitmap_for({10}, 64), 10))
    with pytest.raises(BadDirtyBitmap, match="past page 16"):
        list(dirty_runs(bitmap_for({40}, 64), 16))
    assert list(dirty_runs(bitmap_for({0, 15}, 64), 16)) == [(0, 1), (15, 1)]


def test_diff_holds_only_dirty_pages_and_merges_onto_the_base(tmp_path):
    size = 8 * MiB
    npages = size // PAGE
    mem = GuestMemory.anonymous([(0, size)])
    for p in range(0, npages, 2):
        mem.write(p * PAGE, pattern_page(p))
    layout = layout_of(mem)
    base = tmp_path / "base.mem"
    write_memory_file(base, layout, [mem.regions[0].mapping])

    # The guest runs on: some pages change, one becomes zero, one new page appears.
    dirty = {2, 3, 100, 101, 102, 2047}
    for p in dirty:
        mem.write(p * PAGE, pattern_page(p + 10_000))
    mem.write(100 * PAGE, bytes(PAGE))
    diff = tmp_path / "diff.mem"
    stats = write_diff_memory_file(diff, layout, [mem.regions[0].mapping], [bitmap_for(dirty, npages)])
    assert os.path.getsize(diff) == size
    assert stats.data_bytes == (len(dirty) - 1) * PAGE  # the zeroed page is a hole
    assert os.stat(diff).st_blocks * 512 <= 2 * len(dirty) * PAGE
    # Clean pages are holes in the diff.
    assert diff.read_bytes()[4 * PAGE:5 * PAGE] == bytes(PAGE)

    merge_diff(base, diff, [bitmap_for(dirty, npages)], layout)
    assert base.read_bytes() == mem.read(0, size)
    # Idempotent: a merge interrupted and run again gives the same file.
    merge_diff(base, diff, [bitmap_for(dirty, npages)], layout)
    assert base.read_bytes() == mem.read(0, size)
    mem.close()


def test_chain_of_diffs_merges_to_the_final_memory(tmp_path):
    mem = GuestMemory.anonymous([(0, 2 * MiB), (16 * MiB, 2 * MiB)])
    layout = layout_of(mem)
    rng = random.Random(3)
    base = tmp_path / "base.mem"
    write_memory_file(base, layout, [r.mapping for r in mem.regions])
    for step in range(4):
        dirty_per_region = []
        for r in mem.regions:
            pages = set(rng.sample(range(r.size // PAGE), 40))
            for p in pages:
                mem.write(r.guest_addr + p * PAGE, rng.randbytes(PAGE) if rng.random() < 0.8 else bytes(PAGE))
            dirty_per_region.append(bitmap_for(pages, r.size // PAGE))
        diff = tmp_path / f"diff{step}.mem"
        write_diff_memory_file(diff, layout, [r.mapping for r in mem.regions], dirty_per_region)
        merge_diff(base, diff, dirty_per_region, layout)
    assert base.read_bytes() == mem.read(0, 2 * MiB) + mem.read(16 * MiB, 2 * MiB)


def test_merge_refuses_files_of_the_wrong_size(tmp_path):
    layout = MemoryFileLayout.contiguous([(0, MiB)])
    base = tmp_path / "base.mem"
    diff = tmp_path / "diff.mem"
    base.write_bytes(bytes(MiB))
    diff.write_bytes(bytes(MiB // 2))
    bm = [bitmap_for({1}, 256)]
    with pytest.raises(MemoryFileUnusable, match="524288 bytes, layout needs 1048576"):
        merge_diff(base, diff, bm, layout)
    with pytest.raises(MemoryFileUnusable, match="No such file"):
        merge_diff(tmp_path / "absent", diff, bm, layout)
    with pytest.raises(BadDirtyBitmap):
        merge_diff(base, diff, [], layout)


def test_is_zero():
    assert is_zero(b"") and is_zero(bytes(3 * MiB)) and is_zero(memoryview(bytearray(100)))
    assert not is_zero(bytes(3 * MiB - 1) + b"\1")
    assert not is_zero(b"\1" + bytes(5000))

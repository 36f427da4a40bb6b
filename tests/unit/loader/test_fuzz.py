"""Fuzzing: random and mutated images give a result or a LoaderError, nothing else."""

from __future__ import annotations

import io

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmm.loader import KernelLoadResult, LoaderError, load_bzimage, load_elf, load_kernel
from vmm.loader.elf import find_pvh_entry
from vmm.memory import GuestMemory

from tests.unit.loader._images import build_bzimage, note, pvh_note, simple_elf

# One small guest memory for every example: fresh mmaps per example would
# only slow the search down, and loaders may write anywhere in it.
MEM = GuestMemory.anonymous([(0, 4 << 20)])

VALID_ELF = simple_elf()
VALID_BZIMAGE = build_bzimage(pref_address=0x200000, init_size=0x100000)

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def mutate(base: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    buf = bytearray(base)
    for pos, value in edits:
        buf[pos % len(buf)] = value
    return bytes(buf[:cut]) if cut is not None else bytes(buf)


def check(loader, data: bytes) -> None:
    try:
        result = loader(MEM, io.BytesIO(data))
    except LoaderError as exc:
        text = str(exc)
        assert text and "\n" not in text
        return
    assert isinstance(result, KernelLoadResult)
    assert MEM.check_range(result.kernel_load, result.kernel_end - result.kernel_load)
    assert result.kernel_load <= result.entry_64 < result.kernel_end


edits = st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=8)
cuts = st.none() | st.integers(0, 4096)


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes(data):
    check(load_kernel, data)
    check(load_elf, data)
    check(load_bzimage, data)


@FUZZ
@given(edits, cuts)
def test_mutated_elf(e, cut):
    data = mutate(VALID_ELF, e, cut)
    check(load_elf, data)
    check(load_kernel, data)


# Mutations aimed at the headers, where the interesting fields are.
header_edits = st.lists(st.tuples(st.integers(0, 64 + 3 * 56 + 80), st.integers(0, 255)), min_size=1, max_size=6)


@FUZZ
@given(header_edits)
def test_mutated_elf_headers(e):
    check(load_elf, mutate(VALID_ELF, e, None))


@FUZZ
@given(st.lists(st.tuples(st.integers(0x1F1, 0x26B), st.integers(0, 255)), min_size=1, max_size=6), cuts)
def test_mutated_bzimage_header(e, cut):
    data = mutate(VALID_BZIMAGE, e, cut)
    check(load_bzimage, data)
    check(load_kernel, data)


@FUZZ
@given(st.binary(max_size=256), st.sampled_from([4, 8]))
def test_random_notes(data, align):
    for notes in (data, note(b"GNU", 3, b"x" * 5) + data, pvh_note(0x100000) + data):
        try:
            entry = find_pvh_entry(notes, align)
        except LoaderError:
            continue
        assert entry is None or 0 <= entry < 1 << 32

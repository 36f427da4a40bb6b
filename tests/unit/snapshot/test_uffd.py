"""The pure page-server core: handshake parsing, fault resolution, ranges, working sets."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapshot import (
    ChunkStoreSource,
    FaultOutsideMappings,
    FaultResolver,
    HandshakeError,
    Install,
    MemoryFileSource,
    SourceMismatch,
    UffdMapping,
    Wake,
    WorkingSetRecorder,
    encode_handshake,
    parse_handshake,
    prefetch_plan,
    resolve_fault,
)
from snapshot.uffd import RangeSet
from vmm.memory import GuestMemory

from tests.unit.snapshot._guest import PAGE, MiB, pattern_page, save_guest

BASE = 0x7F00_0000_0000
CHUNK = 64 << 10


class FakeSource:
    """A page source over bytes with a chosen unit; records reads."""

    def __init__(self, data: bytes, unit: int) -> None:
        self.data = data
        self.unit_size = unit
        self.reads: list[tuple[int, int]] = []

    @property
    def size(self) -> int:
        return len(self.data)

    def unit(self, offset: int) -> tuple[int, int]:
        start = offset - offset % self.unit_size
        return start, min(start + self.unit_size, len(self.data))

    def read(self, offset: int, length: int) -> bytes | None:
        self.reads.append((offset, length))
        chunk = self.data[offset:offset + length]
        return None if chunk == bytes(length) else chunk


def pages(n: int, zero: set[int] = frozenset()) -> bytes:
    return b"".join(bytes(PAGE) if i in zero else pattern_page(i) for i in range(n))


# --- handshake ---------------------------------------------------------------


def test_handshake_round_trip_sorted_by_address():
    mappings = [UffdMapping(BASE + (1 << 30), 2 * MiB, 128 * MiB, PAGE), UffdMapping(BASE, 128 * MiB, 0, PAGE)]
    parsed = parse_handshake(encode_handshake(mappings))
    assert parsed == tuple(sorted(mappings, key=lambda m: m.base_host_virt_addr))


def test_firecracker_message_with_huge_pages_and_the_legacy_key():
    text = json.dumps([{"base_host_virt_addr": BASE, "size": 4 << 20, "offset": 0, "page_size": 2 << 20}])
    assert parse_handshake(text.encode())[0].page_size == 2 << 20
    legacy = json.dumps([{"base_host_virt_addr": BASE, "size": 4 << 20, "offset": 0, "page_size_kib": 4}])
    assert parse_handshake(legacy)[0].page_size == PAGE


def entry(**overrides):
    e = {"base_host_virt_addr": BASE, "size": MiB, "offset": 0, "page_size": PAGE}
    e.update(overrides)
    return {k: v for k, v in e.items() if v is not None}


@pytest.mark.parametrize("message,match", [
    (b"\xff\xfe", "not JSON"),
    (b"[", "not JSON"),
    (b"{}", "expected a list"),
    (b"[]", "expected a list"),
    (json.dumps([entry()] * 257).encode(), "expected a list"),
    (b'[{"base_host_virt_addr": 1, "base_host_virt_addr": 2}]', "duplicate key"),
    (b'[{"base_host_virt_addr": NaN, "size": 1, "offset": 0, "page_size": 4096}]', "not a valid number"),
    (json.dumps([[1, 2, 3, 4]]).encode(), "not an object"),
    (json.dumps([entry(page_size=None)]).encode(), "has keys"),
    (json.dumps([entry(extra=1)]).encode(), "has keys"),
    (json.dumps([{**entry(), "page_size_kib": 4}]).encode(), "has keys"),
    (json.dumps([entry(size=-4096)]).encode(), "not a u64"),
    (json.dumps([entry(size=2**64)]).encode(), "not a u64"),
    (json.dumps([entry(size=True)]).encode(), "not a u64"),
    (json.dumps([entry(size=4096.0)]).encode(), "not a u64"),
    (json.dumps([entry(size="4096")]).encode(), "not a u64"),
    (json.dumps([entry(page_size=8192)]).encode(), "page size 8192"),
    (json.dumps([entry(size=0)]).encode(), "non-zero multiples"),
    (json.dumps([entry(base_host_virt_addr=BASE + 1)]).encode(), "non-zero multiples"),
    (json.dumps([entry(page_size=2 << 20)]).encode(), "non-zero multiples"),
    (json.dumps([entry(base_host_virt_addr=2**64 - PAGE, size=2 * PAGE)]).encode(), "wraps"),
    (json.dumps([entry(), entry(base_host_virt_addr=BASE + MiB - PAGE, offset=MiB)]).encode(), "overlap in host memory"),
    (json.dumps([entry(), entry(base_host_virt_addr=BASE + 2 * MiB, offset=MiB - PAGE)]).encode(),
     "overlap in the memory file"),
    (b"[" * 60_000, "not JSON"),  # deeper than json's recursion allows
    (b" " * (64 << 10) + b"[]", "limit"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_hostile_handshakes_are_refused(message, match):
    with pytest.raises(HandshakeError, match=match):
        parse_handshake(message)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512) | st.text(max_size=256).map(str.encode)
       | st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                      lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=20), c, max_size=5),
                      max_leaves=20).map(lambda v: json.dumps(v).encode()))
def test_handshake_fuzz_gives_mappings_or_handshake_error(message):
    try:
        mappings = parse_handshake(message)
    except HandshakeError:
        return
    assert all(isinstance(m, UffdMapping) for m in mappings)


# --- resolve_fault -----------------------------------------------------------


def test_raw_file_faults_install_one_page():
    src = FakeSource(pages(64, zero={3}), PAGE)
    mappings = (UffdMapping(BASE, 64 * PAGE, 0, PAGE),)
    op = resolve_fault(BASE + 5 * PAGE + 123, mappings, src)
    assert op == Install(BASE + 5 * PAGE, PAGE, 5 * PAGE, pattern_page(5))
    zero = resolve_fault(BASE + 3 * PAGE, mappings, src)
    assert zero.zero and zero.length == PAGE


def test_chunk_sources_install_the_whole_chunk_around_the_fault():
    src = FakeSource(pages(64), CHUNK)
    # The mapping shows the second half of the file.
    mappings = (UffdMapping(BASE, 32 * PAGE, 32 * PAGE, PAGE),)
    op = resolve_fault(BASE + 20 * PAGE, mappings, src)
    # File page 52 lies in the chunk of file pages 48..63, host pages 16..31.
    assert (op.dest, op.length, op.offset) == (BASE + 16 * PAGE, CHUNK, 48 * PAGE)
    assert op.data == pages(64)[48 * PAGE:64 * PAGE]


def test_installs_are_clipped_to_the_mapping():
    # A chunk straddles two mappings: each gets only its own part.
    src = FakeSource(pages(32), CHUNK)
    mappings = (UffdMapping(BASE, 8 * PAGE, 0, PAGE), UffdMapping(BASE + MiB, 24 * PAGE, 8 * PAGE, PAGE))
    first = resolve_fault(BASE + PAGE, mappings, src)
    assert (first.dest, first.length) == (BASE, 8 * PAGE)
    second = resolve_fault(BASE + MiB, mappings, src)
    assert (second.dest, second.length, second.offset) == (BASE + MiB, 8 * PAGE, 8 * PAGE)


def test_huge_page_mappings_widen_small_units_to_the_page():
    huge = 2 << 20
    src = FakeSource(pages(2 * huge // PAGE), CHUNK)
    mappings = (UffdMapping(BASE, 2 * huge, 0, huge),)
    op = resolve_fault(BASE + huge + 5 * PAGE, mappings, src)
    assert (op.dest, op.length, op.offset) == (BASE + huge, huge, huge)
    assert len(op.data) == huge


def test_faults_outside_the_mappings_are_errors():
    src = FakeSource(pages(16), PAGE)
    mappings = (UffdMapping(BASE, 16 * PAGE, 0, PAGE),)
    for addr in (BASE - 1, BASE + 16 * PAGE, 0):
        with pytest.raises(FaultOutsideMappings):
            resolve_fault(addr, mappings, src)


def test_sources_must_cover_the_mappings():
    with pytest.raises(SourceMismatch, match="reads file bytes up to"):
        FaultResolver((UffdMapping(BASE, 32 * PAGE, 0, PAGE),), FakeSource(pages(16), PAGE))


# --- the resolver state machine ---------------------------------------------


def test_second_fault_on_an_installed_page_only_wakes():
    resolver = FaultResolver((UffdMapping(BASE, 64 * PAGE, 0, PAGE),), FakeSource(pages(64), CHUNK))
    ops = resolver.on_fault(BASE + 3 * PAGE)
    assert len(ops) == 1 and ops[0].length == CHUNK
    # Not yet performed: the same fault gets the same answer.
    assert resolver.on_fault(BASE + 3 * PAGE) == ops
    resolver.done(ops[0])
    assert resolver.on_fault(BASE + 7 * PAGE) == [Wake(BASE + 7 * PAGE, PAGE)]


def test_partly_installed_chunks_install_only_the_rest():
    resolver = FaultResolver((UffdMapping(BASE, 64 * PAGE, 0, PAGE),), FakeSource(pages(64), CHUNK))
    resolver.done(Install(BASE + 4 * PAGE, 2 * PAGE, 4 * PAGE, b""))
    ops = resolver.on_fault(BASE)
    assert [(op.dest - BASE, op.length) for op in ops] == [(0, 4 * PAGE), (6 * PAGE, 10 * PAGE)]
    assert ops[1].data == pages(64)[6 * PAGE:16 * PAGE]


def test_removed_pages_come_back_as_zeros():
    src = FakeSource(pages(64), CHUNK)
    resolver = FaultResolver((UffdMapping(BASE, 64 * PAGE, 0, PAGE),), src)
    for op in resolver.on_fault(BASE):
        resolver.done(op)
    # The balloon takes pages 2..3 back: MADV_DONTNEED, a remove event.
    resolver.on_remove(BASE + 2 * PAGE, BASE + 4 * PAGE)
    ops = resolver.on_fault(BASE + 2 * PAGE)
    assert ops == [Install(BASE + 2 * PAGE, 2 * PAGE, 2 * PAGE, None)]
    # A chunk with a removed hole: data around it, zeros in it.
    resolver.on_remove(BASE + 20 * PAGE, BASE + 21 * PAGE)
    ops = resolver.on_fault(BASE + 16 * PAGE)
    assert [(op.dest - BASE, op.length, op.zero) for op in ops] == [
        (16 * PAGE, 4 * PAGE, False), (20 * PAGE, PAGE, True), (21 * PAGE, 11 * PAGE, False)]
    assert repr(resolver).startswith("<FaultResolver 1 mappings faults=3")


def test_working_set_records_installs_in_first_fault_order():
    recorder = WorkingSetRecorder()
    resolver = FaultResolver((UffdMapping(BASE, 64 * PAGE, 0, PAGE),), FakeSource(pages(64), CHUNK), recorder)
    for addr in (BASE + 40 * PAGE, BASE, BASE + 41 * PAGE, BASE + 2 * PAGE):
        for op in resolver.on_fault(addr):
            if isinstance(op, Install):
                resolver.done(op)
    assert recorder.runs == [(32 * PAGE, CHUNK), (0, CHUNK)]


def test_prefetch_installs_a_plan_and_skips_what_is_present():
    src = FakeSource(pages(64), CHUNK)
    resolver = FaultResolver((UffdMapping(BASE, 64 * PAGE, 0, PAGE),), src)
    for op in resolver.on_fault(BASE + 20 * PAGE):
        resolver.done(op)
    ops = resolver.prefetch([(PAGE, PAGE), (16 * PAGE, 20 * PAGE)])
    assert [(op.offset, op.length) for op in ops] == [(0, CHUNK), (32 * PAGE, CHUNK)]


# --- ranges and prefetch plans -----------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 60), st.integers(0, 12)), max_size=30))
def test_rangeset_matches_a_set_of_integers(ops):
    model: set[int] = set()
    ranges = RangeSet()
    for add, start, length in ops:
        if add:
            ranges.add(start, start + length)
            model |= set(range(start, start + length))
        else:
            ranges.remove(start, start + length)
            model -= set(range(start, start + length))
    listed = list(ranges)
    assert {i for s, e in listed for i in range(s, e)} == model
    assert all(s < e for s, e in listed)
    assert all(a[1] < b[0] for a, b in zip(listed, listed[1:]))  # disjoint, merged, sorted
    for start in range(0, 70, 7):
        assert ranges.covers(start, start + 3) == all(i in model for i in range(start, start + 3))
        inside = ranges.overlapping(start, start + 9)
        assert {i for s, e in inside for i in range(s, e)} == model & set(range(start, start + 9))


def test_prefetch_plan_merges_and_splits():
    ws = [(10 * PAGE, PAGE), (0, PAGE), (PAGE, PAGE), (12 * PAGE, 2 * PAGE), (5 * PAGE, PAGE), (PAGE, PAGE)]
    assert prefetch_plan(ws) == [(0, 2 * PAGE), (5 * PAGE, PAGE), (10 * PAGE, PAGE), (12 * PAGE, 2 * PAGE)]
    assert prefetch_plan(ws, max_gap=PAGE) == [(0, 2 * PAGE), (5 * PAGE, PAGE), (10 * PAGE, 4 * PAGE)]
    assert prefetch_plan(ws, max_gap=4 * PAGE) == [(0, 14 * PAGE)]
    assert prefetch_plan(ws, max_gap=4 * PAGE, max_run=5 * PAGE) == [
        (0, 5 * PAGE), (5 * PAGE, 5 * PAGE), (10 * PAGE, 4 * PAGE)]
    assert prefetch_plan([]) == []


# --- real sources ------------------------------------------------------------


def test_memory_file_and_chunk_store_sources_agree(tmp_path, store):
    mem = GuestMemory.anonymous([(0, 4 * MiB)])
    for p in range(0, 1024, 3):
        mem.write(p * PAGE, pattern_page(p))
    state, memory = save_guest(mem, tmp_path)
    store.put_snapshot("vm", state, memory)
    raw = MemoryFileSource(memory)
    chunked = ChunkStoreSource(store.open("vm"))
    mappings = (UffdMapping(BASE, 4 * MiB, 0, PAGE),)
    for addr in (BASE, BASE + 7 * PAGE, BASE + 4 * MiB - PAGE):
        small = resolve_fault(addr, mappings, raw)
        big = resolve_fault(addr, mappings, chunked)
        assert big.dest <= small.dest < small.dest + small.length <= big.dest + big.length
        assert big.length == CHUNK
        inner = big.data[small.dest - big.dest:small.dest - big.dest + PAGE]
        assert (small.data or bytes(PAGE)) == inner
    assert chunked.read(PAGE, 3 * PAGE) == memory.read_bytes()[PAGE:4 * PAGE]  # a range, not a chunk
    raw.close()
    mem.close()

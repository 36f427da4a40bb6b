"""Fuzzing the state file reader: any bytes give a tree or a SnapshotFormatError, quickly, in bounded memory."""

from __future__ import annotations

import hashlib
import struct
import time
import tracemalloc

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapshot.format import MAGIC, SnapshotFormatError, decode_state, decode_value, encode_state

from tests.unit.snapshot.test_format import SAMPLE

FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VALID = encode_state(SAMPLE)
VALID_PAYLOAD = VALID[56:]


def with_header(payload: bytes) -> bytes:
    """A well-formed header and checksum around any payload: the fuzz reaches the decoder."""
    header = MAGIC + struct.pack("<HHIQ", 1, 0, 0, len(payload))
    return header + hashlib.sha256(header + payload).digest() + payload


def check(data: bytes) -> None:
    """Decoding ends in a value or a SnapshotFormatError, in time and memory linear in the input."""
    tracemalloc.start()
    began = time.perf_counter()
    try:
        decode_state(data, max_size=1 << 20)
    except SnapshotFormatError as exc:
        assert str(exc) and "\n" not in str(exc)
    finally:
        elapsed = time.perf_counter() - began
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert elapsed < 1.0
    # Output objects cost at most ~100 bytes per input byte (a list of small
    # ints), plus a fixed allowance; a length field can never buy more.
    assert peak < 200 * len(data) + (256 << 10), (peak, len(data))


def mutate(base: bytes, edits: list[tuple[int, int]], cut: int | None, insert: bytes) -> bytes:
    buf = bytearray(base)
    for pos, value in edits:
        buf[pos % len(buf)] = value
    if insert:
        at = edits[0][0] % len(buf) if edits else 0
        buf[at:at] = insert
    return bytes(buf[:cut]) if cut is not None else bytes(buf)


edits = st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), min_size=0, max_size=8)
cuts = st.none() | st.integers(0, len(VALID))


@FUZZ
@given(st.binary(max_size=4096))
def test_random_files(data):
    check(data)


@FUZZ
@given(st.binary(max_size=4096))
def test_random_files_with_magic(data):
    check(MAGIC + data)


@FUZZ
@given(st.binary(max_size=2048))
def test_random_payloads_behind_a_valid_header(payload):
    check(with_header(payload))


@FUZZ
@given(edits, cuts, st.binary(max_size=16))
def test_mutated_files(e, cut, insert):
    check(mutate(VALID, e, cut, insert))


@FUZZ
@given(edits, st.none() | st.integers(0, len(VALID_PAYLOAD)), st.binary(max_size=16))
def test_mutated_payloads_behind_a_valid_checksum(e, cut, insert):
    check(with_header(mutate(VALID_PAYLOAD, e, cut, insert)))


def test_huge_counts_do_not_allocate():
    # A list claiming 2**63 items, a byte string claiming 2**63 bytes.
    for payload in (b"\x07" + b"\xff" * 8 + b"\x7f", b"\x05" + b"\xff" * 8 + b"\x7f", b"\x08" + b"\xff" * 8 + b"\x7f"):
        check(with_header(payload))


def test_wide_flat_payload_decodes_in_linear_time():
    # 200k one-byte items: the worst case per byte; must stay well under a second.
    count = 200_000
    payload = b"\x07" + bytes([0x80 | (count & 0x7F), 0x80 | (count >> 7 & 0x7F), count >> 14]) + b"\x00" * count
    began = time.perf_counter()
    assert decode_value(payload) == [None] * count
    assert time.perf_counter() - began < 1.0

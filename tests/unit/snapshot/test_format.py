"""The state file: round trips, canonical encoding, version refusal, corruption, limits."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import snapshot.format as fmt
from snapshot.format import (
    HEADER_SIZE,
    MAGIC,
    BadHeader,
    BadMagic,
    ChecksumMismatch,
    InvalidMemoryLayout,
    MalformedPayload,
    MemoryFileLayout,
    MemoryFileRegion,
    NestingTooDeep,
    SnapshotFormatError,
    StateFileTooLarge,
    StateFileTruncated,
    StateFileUnreadable,
    UnencodableValue,
    UnsupportedFormatVersion,
    decode_state,
    decode_value,
    encode_state,
    encode_value,
    read_state,
    write_state,
)

# A tree shaped like what the VMM will save.
SAMPLE = {
    "vcpus": [{"regs": {"rip": 0xFFFF_FFFF_8100_0000, "rflags": 2}, "lapic": bytes(range(256)) * 4,
               "msrs": [[0xC000_0080, 0xD01], [0x10, 2**64 - 1]]}],
    "devices": {"serial": {"ier": 0, "lcr": 3, "fifo": b"login: "}, "virtio-block": None},
    "memory": MemoryFileLayout.contiguous([(0, 128 << 20)]).to_tree(),
    "name": "python-3.11 ✓",
    "negative": -(2**63),
    "flags": [True, False, None],
    "empty": {"list": [], "dict": {}, "bytes": b"", "str": ""},
}

plain = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64 - 1) | st.binary(max_size=64) | st.text(max_size=16),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=6),
    max_leaves=40,
)


def test_sample_round_trips_through_a_file(tmp_path):
    path = tmp_path / "vm.state"
    checksum = write_state(path, SAMPLE)
    assert read_state(path) == SAMPLE
    data = path.read_bytes()
    assert data[:8] == MAGIC
    assert struct.unpack_from("<HH", data, 8) == fmt.FORMAT_VERSION
    assert data[24:56] == checksum
    assert not [p for p in os.listdir(tmp_path) if p != "vm.state"]  # no temporary file left


@settings(max_examples=300, deadline=None)
@given(plain)
def test_any_plain_tree_round_trips(tree):
    assert decode_state(encode_state(tree)) == tree


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=6), st.integers(0, 9), max_size=12))
def test_encoding_is_canonical_whatever_the_dict_order(d):
    reordered = dict(reversed(list(d.items())))
    assert encode_value(d) == encode_value(reordered)


def test_tuples_and_buffers_encode_as_lists_and_bytes():
    assert decode_value(encode_value((1, bytearray(b"ab"), memoryview(b"cd")))) == [1, b"ab", b"cd"]


@pytest.mark.parametrize("value", [
    1.5, {1: 2}, {"a": object()}, 2**64, -(2**64) - 1, "\ud800", {("t",): 1}, {b"k": 1},
])
def test_values_outside_plain_data_are_refused(value):
    with pytest.raises(UnencodableValue):
        encode_value(value)


def test_cycles_and_deep_nesting_are_refused_when_writing():
    loop: list = []
    loop.append(loop)
    with pytest.raises(UnencodableValue, match="nested deeper"):
        encode_value(loop)
    deep: list = []
    for _ in range(fmt.MAX_DEPTH + 1):
        deep = [deep]
    with pytest.raises(UnencodableValue):
        encode_value(deep)


def test_the_deepest_tree_written_can_be_read():
    deep: list = []
    for _ in range(fmt.MAX_DEPTH - 1):
        deep = [deep]
    assert decode_value(encode_value(deep)) == deep


# --- versions ----------------------------------------------------------------


def test_other_major_is_refused_with_both_versions(tmp_path):
    path = tmp_path / "new.state"
    write_state(path, SAMPLE, version=(2, 0))
    with pytest.raises(UnsupportedFormatVersion) as info:
        read_state(path)
    assert str(info.value) == f"{path}: snapshot format 2.0 is not supported: this Ember reads 1.x"


def test_older_major_is_refused():
    with pytest.raises(UnsupportedFormatVersion, match="snapshot format 0.7 is not supported: this Ember reads 1.x"):
        decode_state(encode_state(SAMPLE, version=(0, 7)))


def test_newer_minor_is_refused_and_older_minor_is_read(monkeypatch):
    monkeypatch.setattr(fmt, "FORMAT_VERSION", (1, 2))
    for minor in (0, 1, 2):
        assert decode_state(encode_state(SAMPLE, version=(1, minor))) == SAMPLE
    with pytest.raises(UnsupportedFormatVersion) as info:
        decode_state(encode_state(SAMPLE, version=(1, 3)))
    assert str(info.value) == "snapshot format 1.3 is newer than this Ember supports: this Ember reads 1.0 to 1.2"


def test_version_is_checked_before_the_checksum():
    data = bytearray(encode_state(SAMPLE, version=(3, 1)))
    data[-1] ^= 0xFF  # also corrupt: the version message still wins, it says more
    with pytest.raises(UnsupportedFormatVersion, match="3.1"):
        decode_state(bytes(data))


# --- corruption --------------------------------------------------------------


GOOD = encode_state(SAMPLE)


def test_bad_magic():
    with pytest.raises(BadMagic):
        decode_state(b"NOTEMBER" + GOOD[8:])
    with pytest.raises(BadMagic):
        decode_state(b"\x7fELF")


def test_every_single_bit_flip_is_detected():
    # Magic/version flips give their own errors; everything else the checksum.
    for pos in range(len(GOOD)):
        for bit in (0, 7):
            data = bytearray(GOOD)
            data[pos] ^= 1 << bit
            with pytest.raises(SnapshotFormatError):
                decode_state(bytes(data))


def test_payload_corruption_is_a_checksum_mismatch():
    data = bytearray(GOOD)
    data[HEADER_SIZE + 40] ^= 0x10
    with pytest.raises(ChecksumMismatch, match="stored .*, computed"):
        decode_state(bytes(data))


def test_truncation_at_every_byte_offset(tmp_path):
    small = encode_state({"a": [1, b"xy", "z"], "b": None})
    path = tmp_path / "cut.state"
    for cut in range(len(small)):
        path.write_bytes(small[:cut])
        with pytest.raises(SnapshotFormatError) as info:
            read_state(path)
        assert isinstance(info.value, (StateFileTruncated, BadMagic)), (cut, info.value)
        assert str(info.value).startswith(str(path))


def test_trailing_bytes_are_refused():
    with pytest.raises(BadHeader, match="trailing"):
        decode_state(GOOD + b"\0")


def test_reserved_flags_must_be_zero():
    data = bytearray(GOOD)
    data[12] = 1
    with pytest.raises(BadHeader, match="flags"):
        decode_state(bytes(data))


def test_size_limit_is_checked_before_reading(tmp_path):
    path = tmp_path / "big.state"
    with open(path, "wb") as f:
        f.truncate(1 << 40)  # a sparse terabyte: reading it would never finish
    with pytest.raises(StateFileTooLarge, match="1099511627776 bytes, limit 33554432"):
        read_state(path)
    write_state(path, SAMPLE)
    with pytest.raises(StateFileTooLarge):
        read_state(path, max_size=100)


def test_a_fifo_is_refused_without_blocking(tmp_path):
    path = tmp_path / "fifo.state"
    os.mkfifo(path)
    with pytest.raises(StateFileUnreadable, match="not a regular file"):
        read_state(path)


def test_directories_and_missing_files_are_unreadable(tmp_path):
    with pytest.raises(StateFileUnreadable, match="not a regular file"):
        read_state(tmp_path)
    with pytest.raises(StateFileUnreadable, match="No such file"):
        read_state(tmp_path / "absent.state")


def test_write_is_atomic_when_encoding_fails(tmp_path):
    path = tmp_path / "vm.state"
    write_state(path, {"v": 1})
    with pytest.raises(UnencodableValue):
        write_state(path, {"v": 1.5})
    assert read_state(path) == {"v": 1}
    assert os.listdir(tmp_path) == ["vm.state"]


# --- the decoder on hand-made payloads -------------------------------------


@pytest.mark.parametrize("payload,message", [
    (b"", "past the end"),
    (b"\x09", "unknown tag"),
    (b"\x03\x80", "past the end"),
    (b"\x03\x80\x00", "non-minimal varint"),
    (b"\x03" + b"\xff" * 9 + b"\x02", "exceeds 64 bits"),
    (b"\x03" + b"\xff" * 10 + b"\x01", "longer than 10 bytes"),
    (b"\x05\x05abc", "runs past the end"),
    (b"\x06\x02\xc3\x28", "invalid UTF-8"),
    (b"\x07\xff\xff\xff\xff\x0f", "longer than the payload"),
    (b"\x08\xff\xff\xff\xff\x0f", "longer than the payload"),
    (b"\x08\x02\x01b\x00\x01a\x00", "out of order"),
    (b"\x08\x02\x01a\x00\x01a\x00", "out of order"),
    (b"\x08\x01\x01\xff\x00", "invalid UTF-8"),
    (b"\x00\x00", "trailing"),
])
def test_malformed_payloads(payload, message):
    with pytest.raises(MalformedPayload, match=message):
        decode_value(payload)


def test_nesting_is_bounded_when_reading():
    with pytest.raises(NestingTooDeep):
        decode_value(b"\x07\x01" * 10_000 + b"\x00")


def test_decoded_state_is_rewrapped_with_its_path(tmp_path):
    path = tmp_path / "vm.state"
    payload = b"\x07\x01" * 100 + b"\x00"
    header = MAGIC + struct.pack("<HHIQ", 1, 0, 0, len(payload))
    import hashlib
    path.write_bytes(header + hashlib.sha256(header + payload).digest() + payload)
    with pytest.raises(NestingTooDeep) as info:
        read_state(path)
    assert str(info.value).startswith(f"{path}: State payload is nested too deeply")


# --- memory file layout ------------------------------------------------------


def test_contiguous_layout_places_regions_back_to_back():
    layout = MemoryFileLayout.contiguous([(4 << 30, 1 << 30), (0, 3 << 30)])
    assert layout.regions == (MemoryFileRegion(0, 3 << 30, 0), MemoryFileRegion(4 << 30, 1 << 30, 3 << 30))
    assert layout.file_size == layout.guest_size == 4 << 30
    assert layout.region_at_offset((3 << 30) + 5).guest_addr == 4 << 30
    assert layout.region_at_offset(4 << 30) is None
    assert MemoryFileLayout.from_tree(decode_value(encode_value(layout.to_tree()))) == layout
    assert repr(layout) == "<MemoryFileLayout 2 regions, 4096 MiB, file 4096 MiB, page 4096>"


@pytest.mark.parametrize("regions,page_size,message", [
    ((), 4096, "0 regions"),
    ((MemoryFileRegion(0, 0, 0),), 4096, "empty or not"),
    ((MemoryFileRegion(1, 4096, 0),), 4096, "aligned"),
    ((MemoryFileRegion(0, 4096, 0),), 2 << 20, "aligned"),
    ((MemoryFileRegion(0, 4096, 0),), 8192, "page size"),
    ((MemoryFileRegion(0, 8192, 0), MemoryFileRegion(4096, 4096, 8192)), 4096, "overlap in guest memory"),
    ((MemoryFileRegion(0, 8192, 0), MemoryFileRegion(1 << 20, 4096, 4096)), 4096, "overlap in the file"),
    ((MemoryFileRegion(2**64 - 4096, 8192, 0),), 4096, "wraps"),
    ((MemoryFileRegion(True, 4096, 0),), 4096, "not a u64"),
    ((MemoryFileRegion(-4096, 4096, 0),), 4096, "not a u64"),
])
def test_invalid_layouts(regions, page_size, message):
    with pytest.raises(InvalidMemoryLayout, match=message):
        MemoryFileLayout(regions, page_size)


@pytest.mark.parametrize("tree", [
    None, [], {"page_size": 4096}, {"page_size": 4096, "regions": {}},
    {"page_size": "4096", "regions": [{"guest_addr": 0, "size": 4096, "file_offset": 0}]},
    {"page_size": 4096, "regions": [{"guest_addr": 0, "size": 4096}]},
    {"page_size": 4096, "regions": [{"guest_addr": 0, "size": 4096, "file_offset": 0, "x": 1}]},
    {"page_size": 4096, "regions": [[0, 4096, 0]]},
    {"page_size": 4096, "regions": [{"guest_addr": 0, "size": 4096, "file_offset": 0}] * 1025},
])
def test_layout_trees_are_validated(tree):
    with pytest.raises(InvalidMemoryLayout):
        MemoryFileLayout.from_tree(tree)

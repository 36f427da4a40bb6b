"""The VM state file: a versioned, checksummed container for a tree of plain data.

The VMM hands over one tree — nested dicts, lists and tuples of ``int``,
``bytes``, ``str``, ``bool`` and ``None`` — describing every component
(vCPU registers, devices, the memory-file layout). This module turns it
into bytes and back. A state file is untrusted input when read: it may be
truncated, corrupted or written by another Ember version, and reading it
must end in the tree or in a `SnapshotFormatError`, never in another
exception, a hang or an allocation out of proportion to the file.

File layout (all integers little-endian)::

    offset  size  field
    0       8     magic            b"EMBERSNP"
    8       2     major            format version, independent of Ember's version
    10      2     minor
    12      4     flags            reserved, 0 in format 1.x
    16      8     payload_length   bytes after the header; the file ends there
    24      32    checksum         SHA-256 of bytes 0..24 followed by the payload
    56      ...   payload          one encoded value (below)

Compatibility: a reader of format M.n reads M.0 up to M.n. A minor bump
may add tree content old readers would misread, so a newer minor is
refused, as is any other major; the magic and the two version fields keep
their place in every major version so the refusal can say which version
the file has.

Checksum: SHA-256 rather than Firecracker's CRC64. Both catch accidental
corruption (neither authenticates the file: whoever can write it can
recompute either). SHA-256 is in `hashlib`, runs at ~1.7 GB/s on this host
(SHA-NI), where a table CRC64 in pure Python manages a few MB/s, and its
digest doubles as the state file's identity in the chunk store manifest.

Payload encoding: a tagged binary encoding, one tag byte per value::

    0x00 None   0x01 False   0x02 True
    0x03 uint   varint n                      (0 <= n < 2**64)
    0x04 nint   varint m, value is -1 - m     (-2**64 <= value < 0)
    0x05 bytes  varint length, bytes
    0x06 str    varint length, UTF-8 bytes
    0x07 list   varint count, count values
    0x08 dict   varint count, count (key, value) pairs; a key is
                varint length + UTF-8 (keys are always str, no tag)

Varints are unsigned LEB128, at most 10 bytes. The encoding is canonical
and so deterministic: minimal varints, dict keys sorted by their UTF-8
bytes with no duplicates; the decoder refuses anything else, so one tree
has exactly one encoding (and one checksum). Tuples encode as lists and
decode as lists. The decoder bounds nesting depth and checks every length
and count against the bytes that remain (each value takes at least one
byte), so work and memory are linear in the file size, itself capped by
``max_size`` before anything is read.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from ._errors import DocumentedError

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "MAX_DEPTH",
    "DEFAULT_MAX_STATE_SIZE",
    "PlainData",
    "SnapshotFormatError",
    "StateFileUnreadable",
    "StateFileTooLarge",
    "StateFileTruncated",
    "BadMagic",
    "UnsupportedFormatVersion",
    "BadHeader",
    "ChecksumMismatch",
    "MalformedPayload",
    "NestingTooDeep",
    "UnencodableValue",
    "InvalidMemoryLayout",
    "MAX_MEMORY_REGIONS",
    "encode_value",
    "decode_value",
    "encode_state",
    "decode_state",
    "write_state",
    "read_state",
    "atomic_write",
    "fsync_dir",
    "read_bounded",
    "MemoryFileRegion",
    "MemoryFileLayout",
]

MAGIC = b"EMBERSNP"
# (major, minor) of the format this code writes; it reads (major, 0..minor). A minor adds
# fields that older readers would refuse as unknown; a newer reader gives them defaults.
# 1.1: the vsock device's local_port_last.
FORMAT_VERSION = (1, 1)

_PREFIX = struct.Struct("<8sHH")  # magic, major, minor: stable across majors
_HEADER = struct.Struct("<8sHHIQ32s")
HEADER_SIZE = _HEADER.size  # 56
_CHECKED_HEADER = 24  # magic..payload_length, covered by the checksum

# Deepest nesting the decoder follows. A MicrovmState is a handful of levels
# deep (state -> devices -> virtio -> queues -> fields); 64 leaves room and
# keeps the recursive decoder far from Python's recursion limit.
MAX_DEPTH = 64
# Default cap on a state file. A microVM's state is tens of KiB; the cap is
# what keeps a hostile or mistaken path (a disk image, /dev/zero) harmless.
DEFAULT_MAX_STATE_SIZE = 32 << 20

PlainData: TypeAlias = "None | bool | int | bytes | str | list[PlainData] | dict[str, PlainData]"

_T_NONE, _T_FALSE, _T_TRUE, _T_UINT, _T_NINT, _T_BYTES, _T_STR, _T_LIST, _T_DICT = range(9)
_U64_LIMIT = 1 << 64
_MAX_VARINT_BYTES = 10


# --- errors ------------------------------------------------------------------


class SnapshotFormatError(DocumentedError):
    """Invalid snapshot state file."""


class StateFileUnreadable(SnapshotFormatError):
    """State file cannot be read."""


class StateFileTooLarge(SnapshotFormatError):
    """State file is larger than allowed."""


class StateFileTruncated(SnapshotFormatError):
    """State file is truncated."""


class BadMagic(SnapshotFormatError):
    """Not an Ember snapshot state file (bad magic)."""


class UnsupportedFormatVersion(SnapshotFormatError):
    """Snapshot format version not supported."""

    def __str__(self) -> str:
        # The detail is a whole sentence naming both versions.
        text = self.detail or self.summary
        return f"{self.path}: {text}" if self.path is not None else text


class BadHeader(SnapshotFormatError):
    """Malformed state file header."""


class ChecksumMismatch(SnapshotFormatError):
    """State file checksum mismatch (the file is corrupted)."""


class MalformedPayload(SnapshotFormatError):
    """Malformed state payload."""


class NestingTooDeep(MalformedPayload):
    """State payload is nested too deeply."""


class UnencodableValue(SnapshotFormatError):
    """Value cannot be stored in a snapshot state file."""


class InvalidMemoryLayout(SnapshotFormatError):
    """Invalid memory file layout."""


# --- value encoding ----------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_value(value: Any) -> bytes:
    """Encode one tree of plain data (canonical: equal trees, equal bytes)."""
    out = bytearray()
    _encode(value, out, 0)
    return bytes(out)


def _encode(value: Any, out: bytearray, depth: int) -> None:
    if depth >= MAX_DEPTH:
        raise UnencodableValue(f"nested deeper than {MAX_DEPTH} levels (or a cycle)")
    if value is None:
        out.append(_T_NONE)
    elif value is False:
        out.append(_T_FALSE)
    elif value is True:
        out.append(_T_TRUE)
    elif isinstance(value, int):
        if 0 <= value < _U64_LIMIT:
            out.append(_T_UINT)
            out += _varint(value)
        elif -_U64_LIMIT <= value < 0:
            out.append(_T_NINT)
            out += _varint(-1 - value)
        else:
            raise UnencodableValue(f"integer {value} is outside -2**64..2**64-1")
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        out.append(_T_BYTES)
        out += _varint(len(data))
        out += data
    elif isinstance(value, str):
        data = _utf8(value)
        out.append(_T_STR)
        out += _varint(len(data))
        out += data
    elif isinstance(value, (list, tuple)):
        out.append(_T_LIST)
        out += _varint(len(value))
        for item in value:
            _encode(item, out, depth + 1)
    elif isinstance(value, Mapping):
        items = []
        for key, item in value.items():
            if not isinstance(key, str):
                raise UnencodableValue(f"dict key {key!r} is not a str")
            items.append((_utf8(key), item))
        items.sort(key=lambda kv: kv[0])
        out.append(_T_DICT)
        out += _varint(len(items))
        for key_bytes, item in items:
            out += _varint(len(key_bytes))
            out += key_bytes
            _encode(item, out, depth + 1)
    else:
        raise UnencodableValue(f"{type(value).__name__} is not plain data")


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UnencodableValue(f"string is not valid Unicode: {exc.reason}") from exc


class _Decoder:
    """Reads one value from a buffer; every failure is a MalformedPayload."""

    def __init__(self, data: bytes | memoryview) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise MalformedPayload(f"value runs past the end at byte {self.pos}")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def varint(self) -> int:
        pos = self.pos
        if pos < len(self.data):
            b = self.data[pos]
            if b < 0x80:  # one byte: most counts, lengths and numbers in a state tree
                self.pos = pos + 1
                return b
        return self._long_varint()

    def _long_varint(self) -> int:
        start = self.pos
        value = 0
        for i in range(_MAX_VARINT_BYTES):
            b = self.byte()
            value |= (b & 0x7F) << (7 * i)
            if not b & 0x80:
                if b == 0 and i > 0:
                    raise MalformedPayload(f"non-minimal varint at byte {start}")
                if value >= _U64_LIMIT:
                    raise MalformedPayload(f"varint at byte {start} exceeds 64 bits")
                return value
        raise MalformedPayload(f"varint at byte {start} is longer than {_MAX_VARINT_BYTES} bytes")

    def take(self, n: int) -> memoryview:
        if n > self.remaining():
            raise MalformedPayload(f"length {n} at byte {self.pos} runs past the end ({self.remaining()} left)")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def text(self) -> str:
        raw = self.take(self.varint())
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedPayload(f"invalid UTF-8 in string before byte {self.pos}") from exc

    def value(self, depth: int) -> Any:
        if depth >= MAX_DEPTH:
            raise NestingTooDeep(f"more than {MAX_DEPTH} levels at byte {self.pos}")
        at = self.pos
        tag = self.byte()
        if tag == _T_NONE:
            return None
        if tag == _T_FALSE:
            return False
        if tag == _T_TRUE:
            return True
        if tag == _T_UINT:
            return self.varint()
        if tag == _T_NINT:
            return -1 - self.varint()
        if tag == _T_BYTES:
            return bytes(self.take(self.varint()))
        if tag == _T_STR:
            return self.text()
        if tag == _T_LIST:
            count = self.varint()
            # Each value takes at least its tag byte.
            if count > self.remaining():
                raise MalformedPayload(f"list of {count} items at byte {at} is longer than the payload")
            return [self.value(depth + 1) for _ in range(count)]
        if tag == _T_DICT:
            count = self.varint()
            # Each entry takes at least a key length byte and a value tag.
            if count * 2 > self.remaining():
                raise MalformedPayload(f"dict of {count} entries at byte {at} is longer than the payload")
            result: dict[str, Any] = {}
            previous: bytes | None = None
            for _ in range(count):
                key_at = self.pos
                raw = bytes(self.take(self.varint()))
                if previous is not None and raw <= previous:
                    raise MalformedPayload(f"dict key at byte {key_at} is out of order or repeated")
                previous = raw
                try:
                    key = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise MalformedPayload(f"invalid UTF-8 in dict key at byte {key_at}") from exc
                result[key] = self.value(depth + 1)
            return result
        raise MalformedPayload(f"unknown tag {tag:#04x} at byte {at}")


def decode_value(data: bytes | bytearray | memoryview) -> Any:
    """Decode one value that must fill `data` exactly."""
    decoder = _Decoder(data)
    value = decoder.value(0)
    if decoder.remaining():
        raise MalformedPayload(f"{decoder.remaining()} bytes of trailing data after the value")
    return value


# --- the file ----------------------------------------------------------------


def _version_error(major: int, minor: int, reader: tuple[int, int]) -> UnsupportedFormatVersion | None:
    r_major, r_minor = reader
    if major != r_major:
        return UnsupportedFormatVersion(
            f"snapshot format {major}.{minor} is not supported: this Ember reads {r_major}.x")
    if minor > r_minor:
        return UnsupportedFormatVersion(
            f"snapshot format {major}.{minor} is newer than this Ember supports: "
            f"this Ember reads {r_major}.0 to {r_major}.{r_minor}")
    return None


def encode_state(tree: Any, *, version: tuple[int, int] | None = None) -> bytes:
    """The whole state file for `tree` (header, checksum, payload)."""
    major, minor = version if version is not None else FORMAT_VERSION
    payload = encode_value(tree)
    checked = _PREFIX.pack(MAGIC, major, minor) + struct.pack("<IQ", 0, len(payload))
    digest = hashlib.sha256(checked)
    digest.update(payload)
    return checked + digest.digest() + payload


def decode_state(data: bytes | bytearray | memoryview, *, max_size: int = DEFAULT_MAX_STATE_SIZE) -> Any:
    """The tree in a state file's bytes, validated as untrusted input."""
    view = memoryview(data)
    if len(view) > max_size:
        raise StateFileTooLarge(f"{len(view)} bytes, limit {max_size}")
    _check_prefix(view)
    payload_length = _check_header(view[:HEADER_SIZE], len(view))
    _check_checksum(view, payload_length)
    return decode_value(view[HEADER_SIZE:])


def _check_prefix(view: memoryview) -> None:
    if len(view) < _PREFIX.size:
        if bytes(view[:len(MAGIC)]) != MAGIC[:len(view)]:
            raise BadMagic()
        raise StateFileTruncated(f"{len(view)} bytes, shorter than the {HEADER_SIZE}-byte header")
    magic, major, minor = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise BadMagic(f"found {bytes(magic)!r}")
    error = _version_error(major, minor, FORMAT_VERSION)
    if error is not None:
        raise error


def _check_header(header: memoryview, file_size: int) -> int:
    if len(header) < HEADER_SIZE:
        raise StateFileTruncated(f"{file_size} bytes, shorter than the {HEADER_SIZE}-byte header")
    _, _, _, flags, payload_length, _ = _HEADER.unpack_from(header)
    if flags != 0:
        raise BadHeader(f"reserved flags are {flags:#x}, expected 0")
    actual = file_size - HEADER_SIZE
    if payload_length > actual:
        raise StateFileTruncated(f"header promises {payload_length} payload bytes, file has {actual}")
    if payload_length < actual:
        raise BadHeader(f"{actual - payload_length} bytes of trailing data after the payload")
    return payload_length


def _check_checksum(view: memoryview, payload_length: int) -> None:
    stored = bytes(view[_CHECKED_HEADER:HEADER_SIZE])
    digest = hashlib.sha256(view[:_CHECKED_HEADER])
    digest.update(view[HEADER_SIZE:HEADER_SIZE + payload_length])
    computed = digest.digest()
    if computed != stored:
        raise ChecksumMismatch(f"stored {stored.hex()[:16]}.., computed {computed.hex()[:16]}..")


def atomic_write(path: str | os.PathLike[str], chunks: Iterator[bytes] | Sequence[bytes], *, mode: int = 0o644) -> None:
    """Write a file so that `path` holds either the old file or all of the new one.

    The data goes to a temporary file in the same directory, is fsynced,
    renamed over `path`, and the directory is fsynced so the rename itself
    survives a crash.
    """
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(directory)


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename or unlink inside `directory` durable."""
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def write_state(path: str | os.PathLike[str], tree: Any, *, version: tuple[int, int] | None = None) -> bytes:
    """Write `tree` as a state file, atomically; returns the checksum stored in its header."""
    data = encode_state(tree, version=version)
    atomic_write(path, [data])
    return data[_CHECKED_HEADER:HEADER_SIZE]


def read_state(path: str | os.PathLike[str], *, max_size: int = DEFAULT_MAX_STATE_SIZE) -> Any:
    """Read and validate a state file; every failure is a `SnapshotFormatError`.

    The size is checked with fstat before any byte is read; the file is
    opened non-blocking so a FIFO planted at `path` is refused rather than
    waited on.
    """
    try:
        return decode_state(read_bounded(path, max_size), max_size=max_size)
    except SnapshotFormatError as exc:
        if exc.path is None:
            exc.path = os.fspath(path)
        raise


def read_bounded(path: str | os.PathLike[str], max_size: int) -> bytes:
    """The whole of a regular file no larger than `max_size` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise StateFileUnreadable(exc.strerror or str(exc), path=path) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StateFileUnreadable("not a regular file", path=path)
        if st.st_size > max_size:
            raise StateFileTooLarge(f"{st.st_size} bytes, limit {max_size}", path=path)
        parts = []
        left = st.st_size
        while left:
            part = os.read(fd, left)
            if not part:
                break  # the file shrank under us; the header check reports it
            parts.append(part)
            left -= len(part)
        # One byte more than fstat said means the file grew: refuse, since a
        # file that keeps growing must not keep us reading.
        if os.read(fd, 1):
            raise StateFileUnreadable("file changed while being read", path=path)
        return b"".join(parts)
    except OSError as exc:
        raise StateFileUnreadable(exc.strerror or str(exc), path=path) from exc
    finally:
        os.close(fd)


# --- memory file layout ------------------------------------------------------

# Most regions one layout may describe: x86_64 microVMs have one or two
# (below and above the 32-bit MMIO hole); hotplug slots add a few more.
MAX_MEMORY_REGIONS = 1024
_PAGE_SIZES = (4096, 2 << 20, 1 << 30)


@dataclass(frozen=True)
class MemoryFileRegion:
    """One guest RAM region stored in the memory file at `file_offset`."""

    guest_addr: int
    size: int
    file_offset: int

    @property
    def file_end(self) -> int:
        return self.file_offset + self.size

    @property
    def guest_end(self) -> int:
        return self.guest_addr + self.size


@dataclass(frozen=True)
class MemoryFileLayout:
    """Which guest regions a memory file holds, and where.

    Validated on construction: page-aligned, non-empty regions that overlap
    neither in guest-physical space nor in the file. The memory file is
    `file_size` bytes; the bytes of a region are at
    ``file_offset .. file_offset + size``.
    """

    regions: tuple[MemoryFileRegion, ...]
    page_size: int = 4096

    def __post_init__(self) -> None:
        regions = tuple(self.regions)
        object.__setattr__(self, "regions", regions)
        if self.page_size not in _PAGE_SIZES:
            raise InvalidMemoryLayout(f"page size {self.page_size} is not one of {_PAGE_SIZES}")
        if not 1 <= len(regions) <= MAX_MEMORY_REGIONS:
            raise InvalidMemoryLayout(f"{len(regions)} regions, expected 1 to {MAX_MEMORY_REGIONS}")
        ps = self.page_size
        for i, r in enumerate(regions):
            for name in ("guest_addr", "size", "file_offset"):
                v = getattr(r, name)
                if type(v) is not int or not 0 <= v < _U64_LIMIT:
                    raise InvalidMemoryLayout(f"region {i}: {name} is not a u64")
            if r.size == 0 or r.size % ps or r.guest_addr % ps or r.file_offset % ps:
                raise InvalidMemoryLayout(f"region {i}: {r.guest_addr:#x}+{r.size:#x} at file offset "
                                          f"{r.file_offset:#x} is empty or not {ps}-byte aligned")
            if r.guest_end > _U64_LIMIT or r.file_end > _U64_LIMIT:
                raise InvalidMemoryLayout(f"region {i} wraps around 2**64")
        for space, start, end in (("guest memory", lambda r: r.guest_addr, lambda r: r.guest_end),
                                  ("the file", lambda r: r.file_offset, lambda r: r.file_end)):
            ordered = sorted(regions, key=start)
            for a, b in zip(ordered, ordered[1:]):
                if end(a) > start(b):
                    raise InvalidMemoryLayout(
                        f"regions at guest {a.guest_addr:#x} and {b.guest_addr:#x} overlap in {space}")

    @classmethod
    def contiguous(cls, ranges: Sequence[tuple[int, int]], *, page_size: int = 4096) -> "MemoryFileLayout":
        """Regions stored back to back in guest-address order (Firecracker's layout)."""
        regions = []
        offset = 0
        for gpa, size in sorted(ranges):
            regions.append(MemoryFileRegion(gpa, size, offset))
            offset += size
        return cls(tuple(regions), page_size)

    @property
    def file_size(self) -> int:
        """Bytes the memory file must have."""
        return max(r.file_end for r in self.regions)

    @property
    def guest_size(self) -> int:
        return sum(r.size for r in self.regions)

    def region_at_offset(self, offset: int) -> MemoryFileRegion | None:
        """The region holding file offset `offset`, if any."""
        for r in self.regions:
            if r.file_offset <= offset < r.file_end:
                return r
        return None

    def to_tree(self) -> dict[str, Any]:
        return {
            "page_size": self.page_size,
            "regions": [{"guest_addr": r.guest_addr, "size": r.size, "file_offset": r.file_offset}
                        for r in self.regions],
        }

    @classmethod
    def from_tree(cls, tree: Any) -> "MemoryFileLayout":
        """Rebuild from `to_tree` output read back from an untrusted file."""
        if not isinstance(tree, dict) or set(tree) != {"page_size", "regions"}:
            raise InvalidMemoryLayout("expected a dict with keys page_size and regions")
        raw = tree["regions"]
        if not isinstance(raw, list) or len(raw) > MAX_MEMORY_REGIONS:
            raise InvalidMemoryLayout(f"regions must be a list of at most {MAX_MEMORY_REGIONS}")
        regions = []
        for i, r in enumerate(raw):
            if not isinstance(r, dict) or set(r) != {"guest_addr", "size", "file_offset"}:
                raise InvalidMemoryLayout(f"region {i}: expected keys guest_addr, size, file_offset")
            regions.append(MemoryFileRegion(r["guest_addr"], r["size"], r["file_offset"]))
        page_size = tree["page_size"]
        if type(page_size) is not int:
            raise InvalidMemoryLayout("page_size is not an integer")
        return cls(tuple(regions), page_size)

    def __repr__(self) -> str:
        return (f"<MemoryFileLayout {len(self.regions)} regions, {self.guest_size >> 20} MiB, "
                f"file {self.file_size >> 20} MiB, page {self.page_size}>")

"""The pure half of the userfaultfd page server: handshake, fault resolution, working sets.

Primer. To restore a snapshot lazily, the VMM maps guest memory anonymous,
registers it with a userfaultfd ("uffd") in MISSING mode, and hands the
uffd (SCM_RIGHTS) plus a JSON description of the mappings to a page server
over a Unix socket (Firecracker's handshake)::

    [{"base_host_virt_addr": 140245, "size": 134217728, "offset": 0, "page_size": 4096}, ...]

Each entry says: host virtual addresses ``base .. base+size`` hold the
memory-file bytes ``offset .. offset+size``; ``page_size`` is the host page
backing them (4 KiB, or 2 MiB for huge pages). When the guest (or KVM on
its behalf) first touches a page, the kernel queues a fault message with
the host address; the server fills the page (UFFDIO_COPY with data, or
UFFDIO_ZEROPAGE) and the faulting thread resumes.

This module decides *what* to install; `uffd_server` performs it. The
install unit is the source's unit around the fault — one page of a raw
memory file, one chunk of the chunk store — widened to the mapping's page
size and clipped to the mapping, so a 64 KiB chunk is installed with one
ioctl and the 15 neighbouring pages never fault.

Working sets (REAP, "Benchmarking, Analysis, and Optimization of Serverless
Function Snapshots", ASPLOS '21): a first restore records the units it
faulted, in order; later restores install that set up front
(`prefetch_plan` merges it into sorted runs) before letting vCPUs run, and
leave only the rest to faults.

The handshake arrives from another process and is parsed as untrusted.
"""

from __future__ import annotations

import bisect
import json
import mmap
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ._errors import DocumentedError
from .chunkstore import SnapshotView
from .memfile import PAGE_SIZE, is_zero

__all__ = [
    "UffdError",
    "HandshakeError",
    "FaultOutsideMappings",
    "SourceMismatch",
    "MAX_HANDSHAKE_SIZE",
    "MAX_MAPPINGS",
    "UffdMapping",
    "parse_handshake",
    "encode_handshake",
    "Install",
    "Wake",
    "PageSource",
    "MemoryFileSource",
    "ChunkStoreSource",
    "RangeSet",
    "resolve_fault",
    "check_source",
    "FaultResolver",
    "WorkingSetRecorder",
    "prefetch_plan",
]

# The handshake is a few hundred bytes per region; 64 KiB bounds the read.
MAX_HANDSHAKE_SIZE = 64 << 10
MAX_MAPPINGS = 256
_PAGE_SIZES = (4096, 2 << 20, 1 << 30)
_U64_LIMIT = 1 << 64
_KEYS = {"base_host_virt_addr", "size", "offset", "page_size"}
# Firecracker before 1.7 sent the page size in KiB under this name.
_LEGACY_PAGE_KEY = "page_size_kib"


class UffdError(DocumentedError):
    """Page server error."""


class HandshakeError(UffdError):
    """Invalid uffd handshake."""


class FaultOutsideMappings(UffdError):
    """Fault address is outside every registered mapping."""


class SourceMismatch(UffdError):
    """Page source does not cover the mappings."""


# --- handshake ---------------------------------------------------------------


@dataclass(frozen=True)
class UffdMapping:
    """Host range ``base .. base+size`` shows memory-file bytes ``offset .. offset+size``."""

    base_host_virt_addr: int
    size: int
    offset: int
    page_size: int

    @property
    def end(self) -> int:
        return self.base_host_virt_addr + self.size

    @property
    def file_end(self) -> int:
        return self.offset + self.size

    def contains(self, addr: int) -> bool:
        return self.base_host_virt_addr <= addr < self.end

    def to_json(self) -> dict[str, int]:
        return {"base_host_virt_addr": self.base_host_virt_addr, "size": self.size,
                "offset": self.offset, "page_size": self.page_size}


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise HandshakeError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise HandshakeError(f"{name} is not a valid number")


def parse_handshake(data: bytes | bytearray | str, *, max_size: int = MAX_HANDSHAKE_SIZE) -> tuple[UffdMapping, ...]:
    """The mappings in a handshake message, validated; sorted by host address.

    Checks: size before parsing, UTF-8 JSON, a non-empty list of at most
    `MAX_MAPPINGS` objects with exactly the four keys (or the legacy
    ``page_size_kib`` instead of ``page_size``), integers in u64 range, a
    known page size, base/size/offset aligned to it, no wrap-around, and
    no overlap in host memory or in the file.
    """
    if len(data) > max_size:
        raise HandshakeError(f"{len(data)} bytes, limit {max_size}")
    try:
        text = data if isinstance(data, str) else bytes(data).decode("utf-8")
        raw = json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except HandshakeError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise HandshakeError(f"not JSON: {exc}") from exc
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_MAPPINGS:
        raise HandshakeError(f"expected a list of 1 to {MAX_MAPPINGS} mappings")
    mappings = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise HandshakeError(f"mapping {i} is not an object")
        keys = set(entry)
        legacy = keys == (_KEYS - {"page_size"}) | {_LEGACY_PAGE_KEY}
        if keys != _KEYS and not legacy:
            raise HandshakeError(f"mapping {i} has keys {sorted(keys)}, expected {sorted(_KEYS)}")
        values = {}
        for key in keys:
            v = entry[key]
            if type(v) is not int or not 0 <= v < _U64_LIMIT:
                raise HandshakeError(f"mapping {i}: {key} is not a u64")
            values[key] = v
        if legacy:
            values["page_size"] = values.pop(_LEGACY_PAGE_KEY) * 1024
        mappings.append(_checked_mapping(i, UffdMapping(**values)))
    for name, start, end in (("host memory", lambda m: m.base_host_virt_addr, lambda m: m.end),
                             ("the memory file", lambda m: m.offset, lambda m: m.file_end)):
        ordered = sorted(mappings, key=start)
        for a, b in zip(ordered, ordered[1:]):
            if end(a) > start(b):
                raise HandshakeError(f"mappings at {a.base_host_virt_addr:#x} and {b.base_host_virt_addr:#x} "
                                     f"overlap in {name}")
    return tuple(sorted(mappings, key=lambda m: m.base_host_virt_addr))


def _checked_mapping(i: int, m: UffdMapping) -> UffdMapping:
    ps = m.page_size
    if ps not in _PAGE_SIZES:
        raise HandshakeError(f"mapping {i}: page size {ps} is not one of {_PAGE_SIZES}")
    if m.size == 0 or m.size % ps or m.base_host_virt_addr % ps or m.offset % ps:
        raise HandshakeError(f"mapping {i}: base, size and offset must be non-zero multiples of {ps}")
    if m.end > _U64_LIMIT or m.file_end > _U64_LIMIT:
        raise HandshakeError(f"mapping {i} wraps around 2**64")
    return m


def encode_handshake(mappings: Iterable[UffdMapping]) -> bytes:
    """The handshake message for `mappings` (what a VMM sends)."""
    return json.dumps([m.to_json() for m in mappings]).encode()


# --- page sources ------------------------------------------------------------


class PageSource(Protocol):
    """Where guest memory bytes come from, by memory-file offset."""

    @property
    def size(self) -> int:
        """Bytes of memory file the source holds."""

    def unit(self, offset: int) -> tuple[int, int]:
        """(start, end) of the smallest range the source serves around `offset`."""

    def read(self, offset: int, length: int) -> bytes | None:
        """The bytes, or None when they are all zero."""


class MemoryFileSource:
    """A raw memory file, mapped read-only; the unit is one 4 KiB page."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._size = os.fstat(fd).st_size
            if self._size == 0:
                raise SourceMismatch("memory file is empty", path=self.path)
            # SAFETY: a private read-only mapping of the whole file (size from
            # fstat); it outlives the fd and is released by close().
            self._map = mmap.mmap(fd, self._size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
        finally:
            os.close(fd)

    @property
    def size(self) -> int:
        return self._size

    def unit(self, offset: int) -> tuple[int, int]:
        start = offset - offset % PAGE_SIZE
        return start, min(start + PAGE_SIZE, self._size)

    def read(self, offset: int, length: int) -> bytes | None:
        if offset < 0 or offset + length > self._size:
            raise SourceMismatch(f"range {offset:#x}+{length:#x} is outside the memory file", path=self.path)
        data = self._map[offset:offset + length]
        return None if is_zero(data) else data

    def close(self) -> None:
        self._map.close()

    def __repr__(self) -> str:
        return f"<MemoryFileSource {self.path} {self._size >> 20} MiB>"


class ChunkStoreSource:
    """A snapshot in the chunk store; the unit is one chunk."""

    def __init__(self, view: SnapshotView) -> None:
        self.view = view

    @property
    def size(self) -> int:
        return self.view.memory_size

    def unit(self, offset: int) -> tuple[int, int]:
        ref = self.view.locate(offset)
        return ref.offset, ref.end

    def read(self, offset: int, length: int) -> bytes | None:
        refs = []
        pos = offset
        while pos < offset + length:
            ref = self.view.locate(pos)
            refs.append(ref)
            pos = ref.end
        if all(ref.digest is None for ref in refs):
            return None
        if len(refs) == 1 and refs[0].offset == offset and refs[0].length == length:
            return self.view.read_chunk(refs[0])  # the common case: exactly one chunk, no copy
        buf = bytearray(length)
        self.view.read_into(offset, buf)
        return bytes(buf)

    def __repr__(self) -> str:
        return f"<ChunkStoreSource {self.view!r}>"


# --- ranges ------------------------------------------------------------------


class RangeSet:
    """Disjoint half-open integer ranges, merged on insertion."""

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for start, end in ranges:
            self.add(start, end)

    def add(self, start: int, end: int) -> None:
        if start >= end:
            return
        i = bisect.bisect_left(self._ends, start)  # first range ending at or after start
        j = bisect.bisect_right(self._starts, end)  # ranges starting at or before end touch us
        if i < j:
            start = min(start, self._starts[i])
            end = max(end, self._ends[j - 1])
        self._starts[i:j] = [start]
        self._ends[i:j] = [end]

    def remove(self, start: int, end: int) -> None:
        if start >= end:
            return
        i = bisect.bisect_right(self._ends, start)
        j = bisect.bisect_left(self._starts, end)
        keep: list[tuple[int, int]] = []
        if i < j:
            if self._starts[i] < start:
                keep.append((self._starts[i], start))
            if self._ends[j - 1] > end:
                keep.append((end, self._ends[j - 1]))
        self._starts[i:j] = [s for s, _ in keep]
        self._ends[i:j] = [e for _, e in keep]

    def covers(self, start: int, end: int) -> bool:
        """Whether [start, end) lies wholly inside one range."""
        i = bisect.bisect_right(self._starts, start) - 1
        return i >= 0 and self._ends[i] >= end

    def overlapping(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of the set inside [start, end)."""
        i = bisect.bisect_right(self._ends, start)
        out = []
        while i < len(self._starts) and self._starts[i] < end:
            out.append((max(start, self._starts[i]), min(end, self._ends[i])))
            i += 1
        return out

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(zip(self._starts, self._ends))

    def __len__(self) -> int:
        return len(self._starts)

    def total(self) -> int:
        return sum(e - s for s, e in zip(self._starts, self._ends))

    def __repr__(self) -> str:
        return f"<RangeSet {len(self._starts)} ranges, {self.total()} bytes>"


# --- fault resolution --------------------------------------------------------


@dataclass(frozen=True)
class Install:
    """Fill host range ``dest .. dest+length`` (memory-file ``offset``) with data, or zeros if None."""

    dest: int
    length: int
    offset: int
    data: bytes | None

    @property
    def zero(self) -> bool:
        return self.data is None

    def __repr__(self) -> str:
        kind = "zero" if self.data is None else "copy"
        return f"<Install {kind} {self.dest:#x}+{self.length:#x} from {self.offset:#x}>"


@dataclass(frozen=True)
class Wake:
    """Wake threads waiting on ``dest .. dest+length`` (already installed by an earlier fault)."""

    dest: int
    length: int


def _find_mapping(addr: int, mappings: Sequence[UffdMapping]) -> UffdMapping:
    for m in mappings:
        if m.contains(addr):
            return m
    raise FaultOutsideMappings(f"{addr:#x}")


def _install_range(addr: int, m: UffdMapping, source: PageSource) -> tuple[int, int]:
    """[lo, hi) in file offsets: the source unit around the fault, widened to the
    mapping's pages and clipped to the mapping."""
    ps = m.page_size
    page = m.offset + (addr - m.base_host_virt_addr) // ps * ps
    u_lo, u_hi = source.unit(page)
    lo = max(min(page, u_lo), m.offset)
    hi = min(max(page + ps, u_hi), m.file_end)
    # Re-align to the mapping's pages (relative to its start, which is aligned).
    lo = m.offset + (lo - m.offset) // ps * ps
    hi = m.offset + -(-(hi - m.offset) // ps) * ps
    return lo, hi


def resolve_fault(addr: int, mappings: Sequence[UffdMapping], source: PageSource) -> Install:
    """What to install for a fault at host address `addr`.

    The result covers the faulting page, is aligned to the mapping's page
    size, lies inside the mapping, and spans the source's unit (a chunk)
    where the mapping allows.
    """
    m = _find_mapping(addr, mappings)
    lo, hi = _install_range(addr, m, source)
    return Install(m.base_host_virt_addr + lo - m.offset, hi - lo, lo, source.read(lo, hi - lo))


def check_source(mappings: Sequence[UffdMapping], source: PageSource) -> None:
    """Every mapping must lie inside the source's memory file."""
    for m in mappings:
        if m.file_end > source.size:
            raise SourceMismatch(f"mapping at {m.base_host_virt_addr:#x} reads file bytes up to {m.file_end:#x}, "
                                 f"the source has {source.size:#x}")


class WorkingSetRecorder:
    """The memory-file ranges a restore installed, in first-install order."""

    def __init__(self) -> None:
        self._order: list[tuple[int, int]] = []
        self._seen = RangeSet()

    def record(self, offset: int, length: int) -> None:
        if length <= 0 or self._seen.covers(offset, offset + length):
            return
        self._order.append((offset, length))
        self._seen.add(offset, offset + length)

    @property
    def runs(self) -> list[tuple[int, int]]:
        """(offset, length) in the order first installed (store with ChunkStore.set_working_set)."""
        return list(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def __repr__(self) -> str:
        return f"<WorkingSetRecorder {len(self._order)} runs, {self._seen.total() >> 10} KiB>"


def prefetch_plan(working_set: Iterable[tuple[int, int]], *, max_gap: int = 0,
                  max_run: int | None = None) -> list[tuple[int, int]]:
    """Sorted (offset, length) runs covering the working set, merged.

    Ranges that overlap, touch, or are at most `max_gap` bytes apart join
    one run (reading a small gap costs less than another request); runs
    longer than `max_run` are split so one install never grows unbounded.
    """
    merged = RangeSet()
    for offset, length in working_set:
        if length > 0:
            merged.add(offset, offset + length)
    runs: list[tuple[int, int]] = []
    for start, end in merged:
        if runs and start - (runs[-1][0] + runs[-1][1]) <= max_gap:
            prev_start = runs[-1][0]
            runs[-1] = (prev_start, end - prev_start)
        else:
            runs.append((start, end - start))
    if max_run is None:
        return runs
    if max_run <= 0:
        raise ValueError("max_run must be positive")
    split = []
    for start, length in runs:
        for piece in range(start, start + length, max_run):
            split.append((piece, min(max_run, start + length - piece)))
    return split


class FaultResolver:
    """The page server's state machine: events in, installs out. No I/O but the source's reads.

    Tracks which host ranges are installed (a second fault on one — two
    vCPUs touching the same page — only needs a wake) and which the guest
    removed (balloon: MADV_DONTNEED delivers UFFD_EVENT_REMOVE; those pages
    must come back as zeros, not as snapshot data).
    """

    def __init__(self, mappings: Sequence[UffdMapping], source: PageSource,
                 recorder: WorkingSetRecorder | None = None) -> None:
        check_source(mappings, source)
        self.mappings = tuple(sorted(mappings, key=lambda m: m.base_host_virt_addr))
        self.source = source
        self.recorder = recorder
        self.installed = RangeSet()
        self.removed = RangeSet()
        self.faults = 0

    def on_fault(self, addr: int) -> list[Install | Wake]:
        """The operations that answer a page fault at host address `addr`.

        Nothing is marked installed until the server reports each install
        `done`; a failed or retried install leaves the state as it was.
        """
        self.faults += 1
        m = _find_mapping(addr, self.mappings)
        page = addr - (addr - m.base_host_virt_addr) % m.page_size
        if self.installed.covers(page, page + m.page_size):
            return [Wake(page, m.page_size)]
        lo, hi = _install_range(addr, m, self.source)
        return self._installs(m, lo, hi)

    def _installs(self, m: UffdMapping, lo: int, hi: int) -> list[Install]:
        """Installs for file range [lo, hi) of mapping m, skipping what is installed;
        removed parts are zero-filled rather than read."""
        base = m.base_host_virt_addr - m.offset
        ops: list[Install] = []
        pos = lo
        pieces = []
        for s, e in self.installed.overlapping(base + lo, base + hi):
            if s - base > pos:
                pieces.append((pos, s - base))
            pos = e - base
        if pos < hi:
            pieces.append((pos, hi))
        for p_lo, p_hi in pieces:
            removed = [(s - base, e - base) for s, e in self.removed.overlapping(base + p_lo, base + p_hi)]
            cursor = p_lo
            for r_lo, r_hi in removed + [(p_hi, p_hi)]:
                if r_lo > cursor:
                    ops.append(Install(base + cursor, r_lo - cursor, cursor, self.source.read(cursor, r_lo - cursor)))
                if r_hi > r_lo:
                    ops.append(Install(base + r_lo, r_hi - r_lo, r_lo, None))
                cursor = r_hi
        return ops

    def done(self, op: Install) -> None:
        """The server performed `op`: its range is now present (and part of the working set)."""
        self.installed.add(op.dest, op.dest + op.length)
        if self.recorder is not None:
            self.recorder.record(op.offset, op.length)

    def page_size_at(self, addr: int) -> int:
        """The host page size of the mapping holding `addr`."""
        return _find_mapping(addr, self.mappings).page_size

    def on_remove(self, start: int, end: int) -> None:
        """The guest dropped host range [start, end): its pages now read as zeros."""
        self.installed.remove(start, end)
        self.removed.add(start, end)

    def prefetch(self, runs: Iterable[tuple[int, int]]) -> list[Install]:
        """Installs for memory-file runs (a `prefetch_plan`), skipping what is installed."""
        return list(self.iter_prefetch(runs))

    def iter_prefetch(self, runs: Iterable[tuple[int, int]]) -> Iterator[Install]:
        """`prefetch` one unit at a time: each unit's data is read (and what is already
        installed skipped) only when the caller asks for it, so a page server can serve
        demand faults between prefetch installs."""
        for offset, length in runs:
            for m in self.mappings:
                lo = max(offset, m.offset)
                hi = min(offset + length, m.file_end)
                if lo >= hi:
                    continue
                # Widen to the source's units and the mapping's pages, as faults would.
                lo = _install_range(m.base_host_virt_addr + lo - m.offset, m, self.source)[0]
                hi = _install_range(m.base_host_virt_addr + hi - 1 - m.offset, m, self.source)[1]
                unit_lo = lo
                while unit_lo < hi:
                    unit_hi = _install_range(m.base_host_virt_addr + unit_lo - m.offset, m, self.source)[1]
                    yield from self._installs(m, unit_lo, min(unit_hi, hi))
                    unit_lo = unit_hi

    def __repr__(self) -> str:
        return (f"<FaultResolver {len(self.mappings)} mappings faults={self.faults} "
                f"installed={self.installed.total() >> 10} KiB removed={self.removed.total() >> 10} KiB>")

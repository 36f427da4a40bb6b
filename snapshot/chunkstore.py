"""Content-addressed chunk store for snapshots: zstd chunk files, an LMDB catalog.

A snapshot is a state file and a memory file. The memory file is cut, per
region, into page-aligned chunks of `chunk_size` bytes (the last chunk of
a region may be shorter). A chunk's id is the SHA-256 of its contents; an
all-zero chunk is not stored (its id in the manifest is 32 zero bytes), and
a chunk already stored, by this snapshot or any other, is stored once. The
state file is stored the same way, as one chunk.

On disk, under `root`::

    catalog/             LMDB environment
        meta             "settings" -> store_version, chunk_size, zstd_level
        snapshots        snapshot id -> manifest (format.encode_value tree)
        heads            snapshot id -> 16-byte token of the current manifest
        refs             chunk id -> refcount u64, stored size u64, raw size u64
        working_sets     snapshot id -> faulted (offset, length) runs, in order
    chunks/ab/cdef...    one zstd frame per chunk, named by its hex id
    gc.lock              shared by put_snapshot, exclusive for gc

Why chunk files and not LMDB values: compressing a 1 GiB guest takes
seconds, and LMDB has one writer at a time, so chunk values in LMDB would
serialize every concurrent put behind one long write transaction; chunk
files are written outside any transaction and the catalog transaction is
short. A store that shrinks on gc gives space back to the file system
(an LMDB file never shrinks, and 64 KiB values churned through its
overflow pages fragment its free list). The price is an open/read/close
per chunk on the page-fault path: ~10 us here, against ~65 us to
decompress the same 64 KiB chunk.

Crash consistency. Every catalog change (a manifest with all its refcount
increments; a removal with its decrements) is one LMDB transaction. Chunk
files are written first, each to a temporary name and renamed, then the
file system is synced (syncfs), then the transaction commits. A crash
before the commit leaves chunk files nothing references; `gc` deletes
them. A chunk file whose id is not in `refs` is never trusted: a later put
of the same content rewrites it. `gc` holds `gc.lock` exclusively and
every put holds it shared, so gc never deletes a chunk a put in flight
has written but not yet committed.

Chunk size (default 64 KiB). A uffd page server installs one chunk per
fault, so the chunk is the unit of fault latency and of read
amplification. Measured on this host (tests/unit/snapshot/test_measure.py,
guest-like content, two templates derived from one base with 2% of pages
rewritten in short runs):

    chunk     fault cost   zstd ratio   2nd template stores   store dedup
    64 KiB      ~75 us       1.91          4.7 MiB of 40         1.79
    2 MiB     ~2800 us       2.08         38.0 MiB of 40         1.03

A first touch costs ~35x more with 2 MiB chunks while mostly installing
pages the guest may never read, and dedup across templates all but
vanishes (any changed page spoils its 2 MiB chunk); 64 KiB chunks give up
~8% of compression ratio. Guests backed by 2 MiB huge pages need faults
served per 2 MiB anyway: give them a store with chunk_size=2 MiB.

zstd level (default 3). Measured on 64 KiB chunks of the same content:
level 1 compresses 1.4x faster for a 3% lower ratio; level 6 is 3x slower
for +3%, level 19 40x slower for +11%. Decompression speed (~750 MB/s
here) barely depends on the level, so the level only prices the put.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import fcntl
import hashlib
import os
import re
import struct
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lmdb
import zstandard

from ._errors import DocumentedError
from .format import (
    DEFAULT_MAX_STATE_SIZE,
    MemoryFileLayout,
    MemoryFileRegion,
    SnapshotFormatError,
    atomic_write,
    decode_state,
    decode_value,
    encode_value,
    fsync_dir,
    read_bounded,
)
from .memfile import PAGE_SIZE, data_extents, is_zero

__all__ = [
    "ChunkStoreError",
    "InvalidSnapshotId",
    "SnapshotExists",
    "SnapshotNotFound",
    "StoreConfigMismatch",
    "BadSnapshotInput",
    "ChunkMissing",
    "ChunkCorrupt",
    "CatalogCorrupt",
    "ZERO_CHUNK",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_ZSTD_LEVEL",
    "ChunkRef",
    "PutStats",
    "GcStats",
    "StoreStats",
    "VerifyReport",
    "SnapshotInfo",
    "SnapshotView",
    "ChunkStore",
]

DEFAULT_CHUNK_SIZE = 64 << 10
DEFAULT_ZSTD_LEVEL = 3
# Address space reserved for the catalog; LMDB maps it but the file only
# grows as used. Manifests take ~512 KiB per GiB of guest memory at 64 KiB
# chunks, a refcount ~100 bytes per chunk: 64 GiB covers ~100 TiB of chunks.
DEFAULT_MAP_SIZE = 64 << 30
STORE_VERSION = 1
MANIFEST_VERSION = 1
ZERO_CHUNK = bytes(32)
_DIGEST_SIZE = 32
_REF = struct.Struct("<QQQ")  # refcount, stored (compressed) size, raw size
_SNAPSHOT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+=-]{0,127}")
# Largest chunk a manifest may describe / a chunk file may decompress to.
_MAX_CHUNK = 1 << 30
# Snapshots whose chunk tables `get_chunk` keeps decoded (~512 KiB per GiB).
_MAX_CACHED_VIEWS = 64


# --- errors ------------------------------------------------------------------


class ChunkStoreError(DocumentedError):
    """Chunk store operation failed."""


class InvalidSnapshotId(ChunkStoreError):
    """Invalid snapshot id (expected 1-128 of A-Z a-z 0-9 . _ : @ + = -, starting alphanumeric)."""


class SnapshotExists(ChunkStoreError):
    """Snapshot already exists."""


class SnapshotNotFound(ChunkStoreError):
    """No such snapshot."""


class StoreConfigMismatch(ChunkStoreError):
    """Chunk store was created with other settings."""


class BadSnapshotInput(ChunkStoreError):
    """Snapshot files cannot be stored."""


class ChunkMissing(ChunkStoreError):
    """Chunk file is missing."""


class ChunkCorrupt(ChunkStoreError):
    """Chunk file is corrupt."""


class CatalogCorrupt(ChunkStoreError):
    """Chunk store catalog is corrupt."""


# --- results -----------------------------------------------------------------


@dataclass(frozen=True)
class ChunkRef:
    """Where a chunk lies in the memory file and what it holds (None: all zero)."""

    offset: int
    length: int
    digest: bytes | None

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class PutStats:
    """What storing one snapshot cost and saved."""

    snapshot_id: str
    logical_bytes: int        # memory file size
    zero_bytes: int           # in all-zero chunks, not stored
    unique_bytes: int         # distinct non-zero chunk contents in this snapshot
    new_raw_bytes: int        # of those, not in the store before
    new_stored_bytes: int     # compressed size of the new chunks (written to disk)
    chunks: int
    zero_chunks: int
    dedup_within: int         # chunks equal to an earlier chunk of this snapshot
    dedup_across: int         # distinct chunks already stored for other snapshots
    new_chunks: int
    state_bytes: int
    seconds: float

    @property
    def nonzero_bytes(self) -> int:
        return self.logical_bytes - self.zero_bytes

    @property
    def compression_ratio(self) -> float:
        """Raw over compressed, for the chunks this put wrote."""
        return self.new_raw_bytes / self.new_stored_bytes if self.new_stored_bytes else 1.0

    @property
    def dedup_ratio(self) -> float:
        """Non-zero bytes over the bytes this put had to store (dedup within and across)."""
        if self.new_raw_bytes:
            return self.nonzero_bytes / self.new_raw_bytes
        return float("inf") if self.nonzero_bytes else 1.0

    @property
    def space_ratio(self) -> float:
        """Logical bytes over bytes written: everything (zero, dedup, zstd) together."""
        return self.logical_bytes / self.new_stored_bytes if self.new_stored_bytes else float("inf")

    def to_tree(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("snapshot_id", "seconds")}

    def __repr__(self) -> str:
        return (f"<PutStats {self.snapshot_id} logical={self.logical_bytes >> 20} MiB zero={self.zero_bytes >> 20} MiB "
                f"new={self.new_raw_bytes >> 10}->{self.new_stored_bytes >> 10} KiB "
                f"dedup={self.dedup_within}+{self.dedup_across} {self.seconds:.2f}s>")


@dataclass(frozen=True)
class GcStats:
    chunks_deleted: int
    bytes_freed: int
    tmp_files_deleted: int
    chunks_kept: int

    def __repr__(self) -> str:
        return (f"<GcStats deleted={self.chunks_deleted} freed={self.bytes_freed >> 10} KiB "
                f"tmp={self.tmp_files_deleted} kept={self.chunks_kept}>")


@dataclass(frozen=True)
class StoreStats:
    snapshots: int
    chunks: int
    logical_bytes: int     # sum of the snapshots' memory sizes
    referenced_bytes: int  # non-zero bytes the snapshots reference (memory and state files)
    raw_bytes: int         # distinct chunk contents, uncompressed
    stored_bytes: int      # distinct chunk contents, compressed (disk use, without fs overhead)

    @property
    def compression_ratio(self) -> float:
        return self.raw_bytes / self.stored_bytes if self.stored_bytes else 1.0

    @property
    def dedup_ratio(self) -> float:
        return self.referenced_bytes / self.raw_bytes if self.raw_bytes else 1.0

    @property
    def space_ratio(self) -> float:
        return self.logical_bytes / self.stored_bytes if self.stored_bytes else float("inf")

    def __repr__(self) -> str:
        return (f"<StoreStats snapshots={self.snapshots} chunks={self.chunks} logical={self.logical_bytes >> 20} MiB "
                f"stored={self.stored_bytes >> 20} MiB>")


@dataclass
class VerifyReport:
    """What `verify` found; `ok` when nothing."""

    chunks_checked: int = 0
    snapshots_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __repr__(self) -> str:
        return f"<VerifyReport snapshots={self.snapshots_checked} chunks={self.chunks_checked} problems={len(self.problems)}>"


@dataclass(frozen=True)
class SnapshotInfo:
    """A snapshot's catalog entry, without its chunk table."""

    snapshot_id: str
    created_ns: int
    meta: dict[str, Any]
    memory_size: int
    chunk_size: int
    layout: MemoryFileLayout | None
    state_digest: bytes
    state_size: int
    chunks: int
    zero_chunks: int
    stats: dict[str, Any]
    has_working_set: bool = False

    def __repr__(self) -> str:
        return f"<SnapshotInfo {self.snapshot_id} {self.memory_size >> 20} MiB chunks={self.chunks}>"


# --- helpers -----------------------------------------------------------------

# SAFETY: loads the C library already mapped into the process; only
# syncfs(int) is called through it, with its argument types declared.
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_syncfs = getattr(_libc, "syncfs", None)
if _syncfs is not None:
    _syncfs.argtypes = [ctypes.c_int]
    _syncfs.restype = ctypes.c_int


def _sync_filesystem(directory: str) -> None:
    """Make every chunk file written so far durable, in one call."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _syncfs is None:
            os.sync()
        # SAFETY: syncfs takes a plain fd we own for the duration of the
        # call; no memory is passed.
        elif _syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


def _check_id(snapshot_id: str) -> bytes:
    if not isinstance(snapshot_id, str) or not _SNAPSHOT_ID.fullmatch(snapshot_id):
        raise InvalidSnapshotId(repr(snapshot_id))
    return snapshot_id.encode()


_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # zstd contexts are not thread-safe; one per thread and level.
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    c = cache.get(level)
    if c is None:
        # The frame's XXH64 checksum (checked by every decompression, ~20 us per 64 KiB) is what
        # stops a flipped byte from reaching a guest: most flips still decode (bench/chaos.py).
        c = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=True)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "decompressor", None)
    if d is None:
        d = _local.decompressor = zstandard.ZstdDecompressor()
    return d


# LMDB must not open one environment twice in a process (its locks are per
# process); stores on the same root share one, per process (a forked child
# opens its own).
_ENVS: dict[tuple[int, str], tuple[lmdb.Environment, int]] = {}
_ENVS_LOCK = threading.Lock()


def _acquire_env(path: str, map_size: int) -> lmdb.Environment:
    key = (os.getpid(), os.path.realpath(path))
    with _ENVS_LOCK:
        entry = _ENVS.get(key)
        if entry is not None:
            _ENVS[key] = (entry[0], entry[1] + 1)
            return entry[0]
        env = lmdb.open(path, map_size=map_size, max_dbs=8, subdir=True, create=True)
        _ENVS[key] = (env, 1)
        return env


def _release_env(path: str) -> None:
    key = (os.getpid(), os.path.realpath(path))
    with _ENVS_LOCK:
        entry = _ENVS.get(key)
        if entry is None:
            return
        env, count = entry
        if count > 1:
            _ENVS[key] = (env, count - 1)
        else:
            del _ENVS[key]
            env.close()


# --- reading one snapshot ----------------------------------------------------


class SnapshotView:
    """One snapshot's chunk table held in memory: the page-fault fast path.

    Immutable: a view keeps serving the manifest it was opened with. Each
    read opens the chunk file, reads it and decompresses it; nothing else
    (no catalog access) happens per chunk.
    """

    def __init__(self, store: "ChunkStore", snapshot_id: str, manifest: dict[str, Any]) -> None:
        self.store = store
        self.snapshot_id = snapshot_id
        self.token: bytes = manifest["token"]
        self.chunk_size: int = manifest["chunk_size"]
        self.memory_size: int = manifest["memory_size"]
        # (file_offset, size, table) per region, sorted by offset.
        self.regions: list[tuple[int, int, bytes]] = [
            (r["file_offset"], r["size"], r["chunks"]) for r in manifest["regions"]]
        self._starts = [r[0] for r in self.regions]

    def locate(self, offset: int) -> ChunkRef:
        """The chunk holding memory-file offset `offset`."""
        i = bisect.bisect_right(self._starts, offset) - 1
        if i >= 0:
            start, size, table = self.regions[i]
            if offset < start + size:
                index = (offset - start) // self.chunk_size
                chunk_start = start + index * self.chunk_size
                digest = table[index * _DIGEST_SIZE:(index + 1) * _DIGEST_SIZE]
                return ChunkRef(chunk_start, min(self.chunk_size, start + size - chunk_start),
                                None if digest == ZERO_CHUNK else digest)
        raise ChunkStoreError(f"offset {offset:#x} is outside snapshot {self.snapshot_id}'s memory")

    def chunks(self) -> Iterator[ChunkRef]:
        """Every chunk, in file order."""
        for start, size, table in self.regions:
            for index in range(len(table) // _DIGEST_SIZE):
                chunk_start = start + index * self.chunk_size
                digest = table[index * _DIGEST_SIZE:(index + 1) * _DIGEST_SIZE]
                yield ChunkRef(chunk_start, min(self.chunk_size, start + size - chunk_start),
                               None if digest == ZERO_CHUNK else digest)

    def read_chunk(self, ref: ChunkRef) -> bytes:
        """The chunk's bytes (zeros for a zero chunk)."""
        if ref.digest is None:
            return bytes(ref.length)
        # Not re-hashed here (this is the page-fault path): the zstd frame's
        # checksum catches a damaged file (ChunkCorrupt); `verify` checks ids.
        return self.store.load_chunk(ref.digest, ref.length)

    def get_chunk(self, offset: int) -> bytes:
        """The decompressed chunk holding `offset`."""
        return self.read_chunk(self.locate(offset))

    def read_into(self, offset: int, buf: Any) -> int:
        """Fill `buf` with memory-file bytes from `offset`; returns bytes filled."""
        out = memoryview(buf).cast("B")
        if offset < 0 or offset + len(out) > self.memory_size:
            raise ChunkStoreError(f"range {offset:#x}+{len(out):#x} is outside snapshot {self.snapshot_id}'s memory")
        done = 0
        while done < len(out):
            ref = self.locate(offset + done)
            skip = offset + done - ref.offset
            n = min(ref.length - skip, len(out) - done)
            if ref.digest is None:
                out[done:done + n] = bytes(n)
            else:
                out[done:done + n] = memoryview(self.read_chunk(ref))[skip:skip + n]
            done += n
        return done

    def __repr__(self) -> str:
        return (f"<SnapshotView {self.snapshot_id} {self.memory_size >> 20} MiB "
                f"chunk={self.chunk_size >> 10} KiB regions={len(self.regions)}>")


# --- the store ---------------------------------------------------------------


class ChunkStore:
    """A directory of snapshots sharing deduplicated, compressed chunks.

    Safe to share between threads; several processes may open the same
    root (LMDB serializes writers, gc.lock orders puts and gc). A store
    must not be used across fork(): a child opens its own.
    """

    def __init__(self, root: str | os.PathLike[str], *, chunk_size: int | None = None,
                 zstd_level: int | None = None, map_size: int = DEFAULT_MAP_SIZE) -> None:
        self.root = os.fspath(root)
        self.chunk_dir = os.path.join(self.root, "chunks")
        self.catalog_dir = os.path.join(self.root, "catalog")
        self.lock_path = os.path.join(self.root, "gc.lock")
        os.makedirs(self.chunk_dir, exist_ok=True)
        os.makedirs(self.catalog_dir, exist_ok=True)
        self.env = _acquire_env(self.catalog_dir, map_size)
        self._closed = False
        self.db_meta = self.env.open_db(b"meta")
        self.db_snapshots = self.env.open_db(b"snapshots")
        self.db_heads = self.env.open_db(b"heads")
        self.db_refs = self.env.open_db(b"refs")
        self.db_working_sets = self.env.open_db(b"working_sets")
        self.chunk_size, self.zstd_level = self._settings(chunk_size, zstd_level)
        self._views: dict[str, SnapshotView] = {}
        self._views_lock = threading.Lock()

    def _settings(self, chunk_size: int | None, zstd_level: int | None) -> tuple[int, int]:
        if chunk_size is not None and (chunk_size < PAGE_SIZE or chunk_size & (chunk_size - 1)
                                       or chunk_size > _MAX_CHUNK):
            raise StoreConfigMismatch(f"chunk size {chunk_size} is not a power of two from 4 KiB to 1 GiB")
        if zstd_level is not None and not 1 <= zstd_level <= 22:
            raise StoreConfigMismatch(f"zstd level {zstd_level} is not 1..22")
        with self.env.begin(write=True, db=self.db_meta) as txn:
            stored = txn.get(b"settings")
            if stored is None:
                settings = {"store_version": STORE_VERSION,
                            "chunk_size": chunk_size or DEFAULT_CHUNK_SIZE,
                            "zstd_level": zstd_level or DEFAULT_ZSTD_LEVEL}
                txn.put(b"settings", encode_value(settings))
            else:
                settings = self._decode(stored, "settings")
        if settings.get("store_version") != STORE_VERSION:
            raise StoreConfigMismatch(f"store version {settings.get('store_version')}, this Ember reads {STORE_VERSION}",
                                      path=self.root)
        if chunk_size is not None and chunk_size != settings["chunk_size"]:
            raise StoreConfigMismatch(f"chunk size {settings['chunk_size']}, asked for {chunk_size}", path=self.root)
        # The level only affects new chunks; a different one is allowed.
        return settings["chunk_size"], zstd_level or settings["zstd_level"]

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _release_env(self.catalog_dir)

    def __enter__(self) -> "ChunkStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        with self.env.begin() as txn:
            snapshots = txn.stat(self.db_snapshots)["entries"]
            chunks = txn.stat(self.db_refs)["entries"]
        return (f"<ChunkStore {self.root} snapshots={snapshots} chunks={chunks} "
                f"chunk={self.chunk_size >> 10} KiB zstd={self.zstd_level}>")

    # --- chunk files ---------------------------------------------------------

    def chunk_path(self, digest: bytes) -> str:
        hexid = digest.hex()
        return os.path.join(self.chunk_dir, hexid[:2], hexid[2:])

    def _write_chunk(self, digest: bytes, data: bytes) -> int:
        """Compress and write one chunk file (tmp + rename); returns its size."""
        blob = _compressor(self.zstd_level).compress(data)
        path = self.chunk_path(digest)
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".tmp-{os.getpid()}-{threading.get_ident()}-{digest.hex()[:16]}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(blob)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, path)
        return len(blob)

    def load_chunk(self, digest: bytes, length: int) -> bytes:
        """A stored chunk's bytes, which must be `length` long."""
        path = self.chunk_path(digest)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise ChunkMissing(digest.hex(), path=path) from exc
        try:
            # One read more than any frame of `length` bytes compresses to
            # tells us the file is not oversized; zstd's bound is tiny.
            blob = os.read(fd, length + (length >> 7) + 1024)
        finally:
            os.close(fd)
        try:
            data = _decompressor().decompress(blob, max_output_size=length)
        except zstandard.ZstdError as exc:
            raise ChunkCorrupt(str(exc), path=path) from exc
        if len(data) != length:
            raise ChunkCorrupt(f"{len(data)} bytes, expected {length}", path=path)
        return data

    # --- catalog helpers -----------------------------------------------------

    def _decode(self, raw: bytes | memoryview, what: str) -> Any:
        try:
            return decode_value(raw)
        except SnapshotFormatError as exc:
            raise CatalogCorrupt(f"{what}: {exc}", path=self.catalog_dir) from exc

    def _manifest(self, txn: lmdb.Transaction, key: bytes) -> dict[str, Any]:
        raw = txn.get(key, db=self.db_snapshots)
        if raw is None:
            raise SnapshotNotFound(key.decode())
        manifest = self._decode(raw, key.decode())
        problem = _manifest_problem(manifest)
        if problem:
            raise CatalogCorrupt(f"manifest of {key.decode()}: {problem}", path=self.catalog_dir)
        return manifest

    @staticmethod
    def _digests(manifest: dict[str, Any]) -> set[bytes]:
        """The distinct chunk ids a manifest references (state included, zero excluded)."""
        ids = {manifest["state"]["digest"]}
        for region in manifest["regions"]:
            table = region["chunks"]
            ids.update(table[i:i + _DIGEST_SIZE] for i in range(0, len(table), _DIGEST_SIZE))
        ids.discard(ZERO_CHUNK)
        return ids

    # --- put -----------------------------------------------------------------

    def put_snapshot(self, snapshot_id: str, state_path: str | os.PathLike[str],
                     memory_path: str | os.PathLike[str], meta: Mapping[str, Any] | None = None, *,
                     layout: MemoryFileLayout | None = None,
                     max_state_size: int = DEFAULT_MAX_STATE_SIZE) -> PutStats:
        """Store a snapshot: its state file and its memory file, deduplicated.

        `layout` says which regions the memory file holds (chunks never cross
        a region boundary); without it the file is one region. `meta` is
        plain data kept in the manifest (template name, kernel, ...). The
        state file is validated (header, version, checksum) before anything
        is stored.
        """
        began = time.perf_counter()
        key = _check_id(snapshot_id)
        meta = dict(meta or {})
        try:
            encode_value(meta)
        except SnapshotFormatError as exc:
            raise BadSnapshotInput(f"meta: {exc}") from exc
        with self.env.begin() as txn:
            if txn.get(key, db=self.db_heads) is not None:
                raise SnapshotExists(snapshot_id)
        try:
            state = read_bounded(state_path, max_state_size)
            decode_state(state, max_size=max_state_size)
        except SnapshotFormatError as exc:
            raise BadSnapshotInput(str(exc)) from exc
        lock_fd = self._lock(fcntl.LOCK_SH)
        try:
            return self._put_locked(snapshot_id, key, state, os.fspath(memory_path), meta, layout, began)
        finally:
            os.close(lock_fd)

    def _lock(self, mode: int) -> int:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, mode)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _put_locked(self, snapshot_id: str, key: bytes, state: bytes, memory_path: str,
                    meta: dict[str, Any], layout: MemoryFileLayout | None, began: float) -> PutStats:
        try:
            mfd = os.open(memory_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise BadSnapshotInput(exc.strerror or str(exc), path=memory_path) from exc
        try:
            size = os.fstat(mfd).st_size
            if layout is None:
                if size == 0 or size % PAGE_SIZE:
                    raise BadSnapshotInput(f"size {size} is not a non-zero multiple of {PAGE_SIZE}", path=memory_path)
                regions: Sequence[MemoryFileRegion] = (MemoryFileRegion(0, size, 0),)
            else:
                if size != layout.file_size:
                    raise BadSnapshotInput(f"{size} bytes, the layout describes {layout.file_size}", path=memory_path)
                regions = sorted(layout.regions, key=lambda r: r.file_offset)
            scan = _Scan(self)
            region_trees = []
            for region in regions:
                table = scan.region(mfd, region.file_offset, region.size)
                region_trees.append({"file_offset": region.file_offset, "size": region.size, "chunks": table})
        finally:
            os.close(mfd)
        state_digest = hashlib.sha256(state).digest()
        scan.add(state_digest, state, is_memory=False)
        _sync_filesystem(self.chunk_dir)
        stats = PutStats(
            snapshot_id=snapshot_id, logical_bytes=size, zero_bytes=scan.zero_bytes,
            unique_bytes=scan.unique_bytes, new_raw_bytes=scan.new_raw, new_stored_bytes=scan.new_stored,
            chunks=scan.chunks, zero_chunks=scan.zero_chunks, dedup_within=scan.dedup_within,
            dedup_across=scan.dedup_across, new_chunks=scan.new_chunks, state_bytes=len(state),
            seconds=time.perf_counter() - began)
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "snapshot_id": snapshot_id,
            "token": os.urandom(16),
            "created_ns": time.time_ns(),
            "meta": meta,
            "chunk_size": self.chunk_size,
            "memory_size": size,
            "layout": layout.to_tree() if layout is not None else None,
            "regions": region_trees,
            "state": {"digest": state_digest, "size": len(state)},
            "stats": stats.to_tree(),
        }
        self._commit_snapshot(key, manifest, scan.sizes, scan.lengths)
        return stats

    def _commit_snapshot(self, key: bytes, manifest: dict[str, Any], sizes: dict[bytes, tuple[int, int]],
                         lengths: dict[bytes, int]) -> None:
        """The one catalog transaction of a put: the manifest and its refcounts."""
        with self.env.begin(write=True) as txn:
            if txn.get(key, db=self.db_heads) is not None:
                raise SnapshotExists(key.decode())
            for digest in self._digests(manifest):
                raw = txn.get(digest, db=self.db_refs)
                if raw is None:
                    stored, raw_size = sizes[digest] if digest in sizes else self._sizes_on_disk(digest, lengths)
                    txn.put(digest, _REF.pack(1, stored, raw_size), db=self.db_refs)
                else:
                    count, stored, raw_size = _REF.unpack(raw)
                    txn.put(digest, _REF.pack(count + 1, stored, raw_size), db=self.db_refs)
            txn.put(key, encode_value(manifest), db=self.db_snapshots)
            txn.put(key, manifest["token"], db=self.db_heads)

    def _sizes_on_disk(self, digest: bytes, lengths: dict[bytes, int]) -> tuple[int, int]:
        """(stored, raw) size of a chunk this put found in the store but which was
        removed since: gc cannot have run (the put holds gc.lock), so the file is there."""
        try:
            return os.stat(self.chunk_path(digest)).st_size, lengths[digest]
        except FileNotFoundError as exc:
            raise ChunkMissing(digest.hex(), path=self.chunk_path(digest)) from exc

    # --- read ----------------------------------------------------------------

    def open(self, snapshot_id: str) -> SnapshotView:
        """A view of the snapshot's current manifest (see `SnapshotView`)."""
        key = _check_id(snapshot_id)
        with self.env.begin() as txn:
            manifest = self._manifest(txn, key)
        return SnapshotView(self, snapshot_id, manifest)

    def _view(self, snapshot_id: str) -> SnapshotView:
        """A cached view, re-read when the snapshot was replaced (remove + put)."""
        key = _check_id(snapshot_id)
        with self.env.begin() as txn:
            token = txn.get(key, db=self.db_heads)
            if token is None:
                raise SnapshotNotFound(snapshot_id)
            view = self._views.get(snapshot_id)
            if view is not None and view.token == token:
                return view
            view = SnapshotView(self, snapshot_id, self._manifest(txn, key))
        with self._views_lock:
            self._views[snapshot_id] = view
            while len(self._views) > _MAX_CACHED_VIEWS:
                self._views.pop(next(iter(self._views)))
        return view

    def get_chunk(self, snapshot_id: str, offset: int) -> bytes:
        """The decompressed chunk holding memory-file offset `offset`."""
        return self._view(snapshot_id).get_chunk(offset)

    def locate(self, snapshot_id: str, offset: int) -> ChunkRef:
        return self._view(snapshot_id).locate(offset)

    def read_into(self, snapshot_id: str, offset: int, buf: Any) -> int:
        """Fill `buf` with memory-file bytes starting at `offset`."""
        return self._view(snapshot_id).read_into(offset, buf)

    def read_state_bytes(self, snapshot_id: str) -> bytes:
        """The stored state file, byte for byte."""
        key = _check_id(snapshot_id)
        with self.env.begin() as txn:
            state = self._manifest(txn, key)["state"]
        data = self.load_chunk(state["digest"], state["size"])
        if hashlib.sha256(data).digest() != state["digest"]:
            raise ChunkCorrupt("state chunk does not match its digest", path=self.chunk_path(state["digest"]))
        return data

    def materialize(self, snapshot_id: str, out_memory_path: str | os.PathLike[str],
                    out_state_path: str | os.PathLike[str] | None = None) -> int:
        """Write the snapshot's memory file (sparse: zero chunks are holes), and its state file.

        Both are written to temporary files and renamed into place. Returns
        the bytes of memory data written.
        """
        view = self._view(snapshot_id)
        out = os.fspath(out_memory_path)
        directory = os.path.dirname(out) or "."
        tmp = os.path.join(directory, f".tmp-mem-{os.getpid()}-{threading.get_ident()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        written = 0
        try:
            os.ftruncate(fd, view.memory_size)
            for ref in view.chunks():
                if ref.digest is None:
                    continue
                data = memoryview(view.read_chunk(ref))
                offset = ref.offset
                while data:
                    n = os.pwrite(fd, data, offset)
                    data = data[n:]
                    offset += n
                written += ref.length
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        os.replace(tmp, out)
        fsync_dir(directory)
        if out_state_path is not None:
            atomic_write(out_state_path, [self.read_state_bytes(snapshot_id)])
        return written

    # --- catalog queries -----------------------------------------------------

    def _info(self, txn: lmdb.Transaction, key: bytes, manifest: dict[str, Any]) -> SnapshotInfo:
        chunks = zero = 0
        for region in manifest["regions"]:
            table = region["chunks"]
            for i in range(0, len(table), _DIGEST_SIZE):
                chunks += 1
                zero += table[i:i + _DIGEST_SIZE] == ZERO_CHUNK
        layout = manifest["layout"]
        return SnapshotInfo(
            snapshot_id=manifest["snapshot_id"], created_ns=manifest["created_ns"], meta=manifest["meta"],
            memory_size=manifest["memory_size"], chunk_size=manifest["chunk_size"],
            layout=MemoryFileLayout.from_tree(layout) if layout is not None else None,
            state_digest=manifest["state"]["digest"], state_size=manifest["state"]["size"],
            chunks=chunks, zero_chunks=zero, stats=manifest["stats"],
            has_working_set=txn.get(key, db=self.db_working_sets) is not None)

    def list(self) -> list[SnapshotInfo]:
        """Every snapshot, by id."""
        with self.env.begin() as txn:
            return [self._info(txn, bytes(key), self._decode(raw, bytes(key).decode()))
                    for key, raw in txn.cursor(db=self.db_snapshots)]

    def show(self, snapshot_id: str) -> SnapshotInfo:
        key = _check_id(snapshot_id)
        with self.env.begin() as txn:
            return self._info(txn, key, self._manifest(txn, key))

    def __contains__(self, snapshot_id: object) -> bool:
        if not isinstance(snapshot_id, str) or not _SNAPSHOT_ID.fullmatch(snapshot_id):
            return False
        with self.env.begin() as txn:
            return txn.get(snapshot_id.encode(), db=self.db_heads) is not None

    def stats(self) -> StoreStats:
        """Totals over the whole store."""
        with self.env.begin() as txn:
            snapshots = logical = referenced = 0
            for _, raw in txn.cursor(db=self.db_snapshots):
                manifest = self._decode(raw, "manifest")
                snapshots += 1
                logical += manifest["memory_size"]
                referenced += manifest["memory_size"] - manifest["stats"]["zero_bytes"] + manifest["state"]["size"]
            chunks = raw_bytes = stored = 0
            for _, value in txn.cursor(db=self.db_refs):
                _, s, r = _REF.unpack(value)
                chunks += 1
                stored += s
                raw_bytes += r
        return StoreStats(snapshots, chunks, logical, referenced, raw_bytes, stored)

    # --- working sets --------------------------------------------------------

    def set_working_set(self, snapshot_id: str, runs: Sequence[tuple[int, int]]) -> None:
        """Record the (offset, length) runs a restore faulted, in fault order."""
        key = _check_id(snapshot_id)
        flat = []
        with self.env.begin(write=True) as txn:
            size = self._manifest(txn, key)["memory_size"]
            for offset, length in runs:
                if not (isinstance(offset, int) and isinstance(length, int)
                        and 0 <= offset and 0 < length and offset + length <= size):
                    raise ChunkStoreError(f"working-set run {offset!r}+{length!r} is outside the memory file")
                flat.append([offset, length])
            txn.put(key, encode_value(flat), db=self.db_working_sets)

    def get_working_set(self, snapshot_id: str) -> list[tuple[int, int]] | None:
        key = _check_id(snapshot_id)
        with self.env.begin() as txn:
            self._manifest(txn, key)
            raw = txn.get(key, db=self.db_working_sets)
            if raw is None:
                return None
            tree = self._decode(raw, f"working set of {snapshot_id}")
        if not isinstance(tree, list) or not all(
                isinstance(r, list) and len(r) == 2 and all(type(v) is int for v in r) for r in tree):
            raise CatalogCorrupt(f"working set of {snapshot_id} is malformed", path=self.catalog_dir)
        return [(r[0], r[1]) for r in tree]

    # --- remove, gc, verify --------------------------------------------------

    def remove(self, snapshot_id: str) -> int:
        """Forget a snapshot and drop its chunk references; returns chunks now unreferenced.

        The chunk files stay until `gc`.
        """
        key = _check_id(snapshot_id)
        released = 0
        with self.env.begin(write=True) as txn:
            manifest = self._manifest(txn, key)
            for digest in self._digests(manifest):
                raw = txn.get(digest, db=self.db_refs)
                if raw is None:
                    raise CatalogCorrupt(f"{snapshot_id} references unknown chunk {digest.hex()}",
                                         path=self.catalog_dir)
                count, stored, raw_size = _REF.unpack(raw)
                if count <= 1:
                    txn.delete(digest, db=self.db_refs)
                    released += 1
                else:
                    txn.put(digest, _REF.pack(count - 1, stored, raw_size), db=self.db_refs)
            txn.delete(key, db=self.db_snapshots)
            txn.delete(key, db=self.db_heads)
            txn.delete(key, db=self.db_working_sets)
        with self._views_lock:
            self._views.pop(snapshot_id, None)
        return released

    def gc(self) -> GcStats:
        """Delete chunk files no snapshot references, and leftover temporary files.

        Waits for puts in flight (they hold gc.lock shared) and keeps new
        ones out until done.
        """
        lock_fd = self._lock(fcntl.LOCK_EX)
        try:
            deleted = freed = tmp_deleted = kept = 0
            with self.env.begin() as txn:
                for entry in _scandir(self.chunk_dir):
                    if not entry.is_dir(follow_symlinks=False):
                        continue
                    for item in _scandir(entry.path):
                        if item.name.startswith(".tmp-"):
                            # No put is in flight: any temporary file is a crash's leftover.
                            tmp_deleted += _unlink(item.path) is not None
                            continue
                        try:
                            digest = bytes.fromhex(entry.name + item.name)
                        except ValueError:
                            continue  # not ours; leave it
                        if len(digest) != _DIGEST_SIZE:
                            continue
                        if txn.get(digest, db=self.db_refs) is not None:
                            kept += 1
                            continue
                        size = _unlink(item.path)
                        if size is not None:
                            deleted += 1
                            freed += size
            _sync_filesystem(self.chunk_dir)
        finally:
            os.close(lock_fd)
        return GcStats(deleted, freed, tmp_deleted, kept)

    def verify(self, *, check_contents: bool = True) -> VerifyReport:
        """Check the catalog against itself and the chunk files.

        Every manifest decodes; refcounts equal the number of snapshots
        referencing each chunk; every referenced chunk file exists and (with
        `check_contents`) decompresses to its size and hashes to its id.
        """
        report = VerifyReport()
        with self.env.begin() as txn:
            expected: dict[bytes, int] = {}
            lengths: dict[bytes, int] = {}
            for key, raw in txn.cursor(db=self.db_snapshots):
                name = bytes(key).decode(errors="replace")
                try:
                    manifest = self._manifest(txn, bytes(key))
                    view = SnapshotView(self, name, manifest)
                    for ref in view.chunks():
                        if ref.digest is not None:
                            lengths[ref.digest] = ref.length
                    lengths[manifest["state"]["digest"]] = manifest["state"]["size"]
                    for digest in self._digests(manifest):
                        expected[digest] = expected.get(digest, 0) + 1
                    if txn.get(bytes(key), db=self.db_heads) != manifest["token"]:
                        report.problems.append(f"{name}: head token does not match the manifest")
                except ChunkStoreError as exc:
                    report.problems.append(f"{name}: unreadable manifest: {exc}")
                report.snapshots_checked += 1
            for key, value in txn.cursor(db=self.db_refs):
                digest = bytes(key)
                count, _, raw_size = _REF.unpack(value)
                want = expected.pop(digest, 0)
                if count != want:
                    report.problems.append(f"chunk {digest.hex()}: refcount {count}, referenced by {want}")
                self._verify_chunk(digest, lengths.get(digest, raw_size), check_contents, report)
            for digest in expected:
                report.problems.append(f"chunk {digest.hex()}: referenced but has no refcount")
        return report

    def _verify_chunk(self, digest: bytes, length: int, check_contents: bool, report: VerifyReport) -> None:
        report.chunks_checked += 1
        path = self.chunk_path(digest)
        if not check_contents:
            if not os.path.exists(path):
                report.problems.append(f"chunk {digest.hex()}: file missing")
            return
        try:
            data = self.load_chunk(digest, length)
        except ChunkMissing:
            report.problems.append(f"chunk {digest.hex()}: file missing")
            return
        except ChunkCorrupt as exc:
            report.problems.append(f"chunk {digest.hex()}: {exc.detail}")
            return
        if hashlib.sha256(data).digest() != digest:
            report.problems.append(f"chunk {digest.hex()}: contents do not match the id")


def _manifest_problem(m: Any) -> str | None:
    """Why a decoded manifest cannot be used, or None (catalog content is checked, not trusted)."""
    if not isinstance(m, dict) or m.get("manifest_version") != MANIFEST_VERSION:
        return "unknown manifest version"
    types = {"snapshot_id": str, "token": bytes, "created_ns": int, "meta": dict, "chunk_size": int,
             "memory_size": int, "regions": list, "state": dict, "stats": dict}
    for name, kind in types.items():
        if not isinstance(m.get(name), kind):
            return f"field {name} is missing or not a {kind.__name__}"
    cs = m["chunk_size"]
    if cs < PAGE_SIZE or cs & (cs - 1) or cs > _MAX_CHUNK:
        return f"bad chunk size {cs}"
    state = m["state"]
    if not (isinstance(state.get("digest"), bytes) and len(state["digest"]) == _DIGEST_SIZE
            and isinstance(state.get("size"), int) and 0 < state["size"] <= _MAX_CHUNK):
        return "bad state entry"
    end = 0
    for r in m["regions"]:
        if not (isinstance(r, dict) and isinstance(r.get("file_offset"), int) and isinstance(r.get("size"), int)
                and isinstance(r.get("chunks"), bytes)):
            return "bad region entry"
        if r["file_offset"] < end or r["size"] <= 0:
            return "regions overlap or are empty"
        end = r["file_offset"] + r["size"]
        if len(r["chunks"]) != -(-r["size"] // cs) * _DIGEST_SIZE:
            return "chunk table does not match the region size"
    if end > m["memory_size"]:
        return "regions run past the memory size"
    return None


def _scandir(path: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except FileNotFoundError:
        return []


def _unlink(path: str) -> int | None:
    """Delete a file; its size, or None if it was already gone."""
    try:
        size = os.stat(path).st_size
        os.unlink(path)
    except FileNotFoundError:
        return None
    return size


class _Scan:
    """Chunking, hashing and writing the chunks of one put."""

    def __init__(self, store: ChunkStore) -> None:
        self.store = store
        self.sizes: dict[bytes, tuple[int, int]] = {}  # new chunk id -> (stored, raw)
        self.lengths: dict[bytes, int] = {}  # every chunk id -> raw size
        self.seen: set[bytes] = set()
        self.chunks = self.zero_chunks = self.zero_bytes = 0
        self.unique_bytes = self.new_raw = self.new_stored = 0
        self.dedup_within = self.dedup_across = self.new_chunks = 0

    def region(self, fd: int, start: int, size: int) -> bytes:
        """Chunk one region; returns its chunk table (32 bytes per chunk)."""
        cs = self.store.chunk_size
        end = start + size
        extents = list(data_extents(fd, start, end))
        table = bytearray()
        ext = 0
        for chunk_start in range(start, end, cs):
            length = min(cs, end - chunk_start)
            chunk_end = chunk_start + length
            while ext < len(extents) and extents[ext][1] <= chunk_start:
                ext += 1
            self.chunks += 1
            if ext == len(extents) or extents[ext][0] >= chunk_end:
                # Wholly inside a hole: zero without reading.
                self._zero(table, length)
                continue
            data = _pread_exact(fd, length, chunk_start)
            if is_zero(data):
                self._zero(table, length)
                continue
            digest = hashlib.sha256(data).digest()
            table += digest
            self.add(digest, data, is_memory=True)
        return bytes(table)

    def _zero(self, table: bytearray, length: int) -> None:
        table += ZERO_CHUNK
        self.zero_chunks += 1
        self.zero_bytes += length

    def add(self, digest: bytes, data: bytes, *, is_memory: bool) -> None:
        if digest in self.seen:
            self.dedup_within += is_memory
            return
        self.seen.add(digest)
        self.lengths[digest] = len(data)
        if is_memory:
            self.unique_bytes += len(data)
        with self.store.env.begin() as txn:
            known = txn.get(digest, db=self.store.db_refs) is not None
        if known:
            self.dedup_across += is_memory
            return
        stored = self.store._write_chunk(digest, data)
        self.sizes[digest] = (stored, len(data))
        if is_memory:
            self.new_chunks += 1
            self.new_raw += len(data)
            self.new_stored += stored


def _pread_exact(fd: int, n: int, offset: int) -> bytes:
    data = os.pread(fd, n, offset)
    if len(data) == n:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        part = os.pread(fd, n - got, offset + got)
        if not part:
            raise BadSnapshotInput(f"memory file ended at {offset + got:#x} while reading")
        parts.append(part)
        got += len(part)
    return b"".join(parts)

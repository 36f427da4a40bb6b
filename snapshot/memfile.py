"""Guest memory files: full and diff, sparse, and the merge of a diff onto its base.

A memory file holds guest RAM as laid out by a `MemoryFileLayout`: the bytes
of each region at its file offset (Firecracker's layout: regions back to
back). Two kinds share that layout, so a diff can be merged onto a base:

* **full** — every page. All-zero pages are left as holes (the file is
  sized with ftruncate and only non-zero runs are written), so a 1 GiB guest
  that touched 50 MiB makes a file of 1 GiB apparent size and ~50 MiB on
  disk. Reading a hole gives zeros, so the file restores exactly.
* **diff** — only the pages marked in a dirty bitmap per region (KVM's
  dirty log: bit i of byte i // 8, least significant bit first, is 4 KiB
  page i of the region — the layout `KVM_GET_DIRTY_LOG` fills on
  little-endian hosts, also for huge-page-backed memory). Other pages are holes. A dirty page that is now all zero is a
  hole too: merging uses the bitmap, not the file, to know what changed.

Writes go to a temporary file in the target directory, are fsynced and
renamed into place. `merge_diff` works in place on the base; it is
idempotent (it only copies dirty pages from the diff), so after a crash
the same merge is simply run again.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import stat
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ._errors import DocumentedError
from .auth import MemoryDigest, MemoryMismatch, SnapshotKey, SnapshotSignature, zero_chunk_digest
from .format import MemoryFileLayout, fsync_dir

__all__ = [
    "MemoryFileError",
    "MemoryBufferMismatch",
    "BadDirtyBitmap",
    "MemoryFileUnusable",
    "MemoryFileStats",
    "write_memory_file",
    "write_diff_memory_file",
    "merge_diff",
    "data_extents",
    "dirty_runs",
    "is_zero",
    "PAGE_SIZE",
    "SCAN_BLOCK",
    "SEAL_XATTR",
    "memory_digest_of_file",
    "verify_memory_fd",
    "memory_file_sealed",
    "seal_memory_file",
]

# Bytes scanned per step when looking for zero pages: large enough that a
# whole-block compare (memcmp speed) skips unused memory quickly, small
# enough that the copy it costs stays in cache.
SCAN_BLOCK = 1 << 20

_ZERO_BLOCK = bytes(SCAN_BLOCK)

# Granule of holes and of dirty bitmaps. KVM's dirty log has one bit per
# 4 KiB guest page even when guest memory is backed by huge pages, and file
# systems punch holes in 4 KiB blocks; the layout's page_size (the host
# mapping's page) does not change either.
PAGE_SIZE = 4096


class MemoryFileError(DocumentedError):
    """Memory file operation failed."""


class MemoryBufferMismatch(MemoryFileError):
    """Region buffers do not match the memory file layout."""


class BadDirtyBitmap(MemoryFileError):
    """Dirty bitmap does not match its region."""


class MemoryFileUnusable(MemoryFileError):
    """Memory file cannot be used."""


@dataclass(frozen=True)
class MemoryFileStats:
    """What a write or merge did."""

    logical_bytes: int   # apparent size of the file
    data_bytes: int      # bytes written
    zero_bytes: int      # bytes in scope left as holes because they were zero
    allocated_bytes: int  # disk blocks the file uses afterwards

    def __repr__(self) -> str:
        return (f"<MemoryFileStats logical={self.logical_bytes >> 10} KiB data={self.data_bytes >> 10} KiB "
                f"zero={self.zero_bytes >> 10} KiB allocated={self.allocated_bytes >> 10} KiB>")


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """Whether every byte of `data` is zero (memcmp speed)."""
    view = memoryview(data).cast("B")
    for i in range(0, len(view), SCAN_BLOCK):
        # A bytes copy compares with memcmp; memoryview compares per element.
        block = view[i:i + SCAN_BLOCK].tobytes()
        if block != _ZERO_BLOCK[:len(block)]:
            return False
    return True


def _nonzero_runs(block: bytes, page_size: int) -> Iterator[tuple[int, int]]:
    """(start, end) byte runs of `block` made of pages that are not all zero."""
    zero_page = _ZERO_BLOCK[:page_size]
    run_start = -1
    for off in range(0, len(block), page_size):
        page = block[off:off + page_size]
        zero = page == (zero_page if len(page) == page_size else _ZERO_BLOCK[:len(page)])
        if not zero and run_start < 0:
            run_start = off
        elif zero and run_start >= 0:
            yield run_start, off
            run_start = -1
    if run_start >= 0:
        yield run_start, len(block)


def dirty_runs(bitmap: bytes | bytearray | memoryview, npages: int) -> Iterator[tuple[int, int]]:
    """(first_page, page_count) runs of set bits among the first `npages` bits.

    Raises `BadDirtyBitmap` if the bitmap is too short for `npages` or marks
    a page past `npages` (a bitmap meant for another region).
    """
    bits = bytes(bitmap)
    if len(bits) * 8 < npages:
        raise BadDirtyBitmap(f"{len(bits)} bytes cannot cover {npages} pages")
    full, rest = divmod(npages, 8)
    if rest and bits[full] >> rest:
        raise BadDirtyBitmap(f"bits set past page {npages}")
    if any(bits[full + (1 if rest else 0):]):
        raise BadDirtyBitmap(f"bits set past page {npages}")
    run_start = -1
    pos = 0
    nbytes = full + (1 if rest else 0)
    while pos < nbytes:
        b = bits[pos]
        if b == 0 or b == 0xFF:
            # Whole byte clean or dirty: no bit-by-bit work.
            if b == 0 and run_start >= 0:
                yield run_start, pos * 8 - run_start
                run_start = -1
            elif b == 0xFF and run_start < 0:
                run_start = pos * 8
            pos += 1
            continue
        for bit in range(8):
            page = pos * 8 + bit
            if page >= npages:
                break
            if b >> bit & 1:
                if run_start < 0:
                    run_start = page
            elif run_start >= 0:
                yield run_start, page - run_start
                run_start = -1
        pos += 1
    if run_start >= 0:
        yield run_start, min(nbytes * 8, npages) - run_start


def data_extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """(start, end) ranges of [start, end) that may hold data; holes are skipped.

    Uses SEEK_DATA/SEEK_HOLE; a file system without them reports the whole
    range as data, which is correct, only slower to scan.
    """
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return  # only a hole from pos to EOF
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield pos, end
                return
            raise
        if data >= end:
            return
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        yield data, min(hole, end)
        pos = hole


def _check_buffers(layout: MemoryFileLayout, buffers: Sequence[Any]) -> list[memoryview]:
    if len(buffers) != len(layout.regions):
        raise MemoryBufferMismatch(f"{len(buffers)} buffers for {len(layout.regions)} regions")
    views = []
    for i, (region, buf) in enumerate(zip(layout.regions, buffers)):
        view = memoryview(buf).cast("B")
        if len(view) != region.size:
            raise MemoryBufferMismatch(f"buffer {i} has {len(view)} bytes, region has {region.size}")
        views.append(view)
    return views


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


class _SparseFile:
    """A temporary file beside `path`, sized up front, renamed into place on commit."""

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        self.directory = os.path.dirname(path) or "."
        self.fd, self.tmp = tempfile.mkstemp(prefix=".tmp-mem-", dir=self.directory)
        os.ftruncate(self.fd, size)

    def commit(self) -> int:
        os.fsync(self.fd)
        allocated = os.fstat(self.fd).st_blocks * 512
        os.close(self.fd)
        self.fd = -1
        os.replace(self.tmp, self.path)
        fsync_dir(self.directory)
        return allocated

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


def _write_nonzero(fd: int, view: memoryview, file_offset: int) -> tuple[int, int]:
    """Write the non-zero pages of `view` at `file_offset`; returns (data, zero) bytes."""
    data = 0
    for block_off in range(0, len(view), SCAN_BLOCK):
        block = view[block_off:block_off + SCAN_BLOCK].tobytes()
        if block == _ZERO_BLOCK[:len(block)]:
            continue
        for run_start, run_end in _nonzero_runs(block, PAGE_SIZE):
            _pwrite_all(fd, memoryview(block)[run_start:run_end], file_offset + block_off + run_start)
            data += run_end - run_start
    return data, len(view) - data


def write_memory_file(path: str | os.PathLike[str], layout: MemoryFileLayout,
                      buffers: Sequence[Any]) -> MemoryFileStats:
    """Write a full memory file from one readable buffer per region, sparsely.

    `buffers` are anything exposing the buffer protocol (a `GuestRegion`'s
    mmap, bytes, a memoryview), each exactly its region's size. They are
    streamed in `SCAN_BLOCK` pieces; all-zero pages become holes.
    """
    views = _check_buffers(layout, buffers)
    out = _SparseFile(os.fspath(path), layout.file_size)
    try:
        data = zero = 0
        for region, view in zip(layout.regions, views):
            d, z = _write_nonzero(out.fd, view, region.file_offset)
            data += d
            zero += z
        allocated = out.commit()
    except BaseException:
        out.abort()
        raise
    return MemoryFileStats(layout.file_size, data, zero, allocated)


def write_diff_memory_file(path: str | os.PathLike[str], layout: MemoryFileLayout, buffers: Sequence[Any],
                           bitmaps: Sequence[bytes | bytearray | memoryview]) -> MemoryFileStats:
    """Write only the dirty pages of each region (same layout as a full file)."""
    views = _check_buffers(layout, buffers)
    if len(bitmaps) != len(layout.regions):
        raise BadDirtyBitmap(f"{len(bitmaps)} bitmaps for {len(layout.regions)} regions")
    ps = PAGE_SIZE
    runs = [list(dirty_runs(bm, r.size // ps)) for r, bm in zip(layout.regions, bitmaps)]
    out = _SparseFile(os.fspath(path), layout.file_size)
    try:
        data = zero = 0
        for region, view, region_runs in zip(layout.regions, views, runs):
            for first, count in region_runs:
                for piece in range(first * ps, (first + count) * ps, SCAN_BLOCK):
                    piece_end = min(piece + SCAN_BLOCK, (first + count) * ps)
                    d, z = _write_nonzero(out.fd, view[piece:piece_end], region.file_offset + piece)
                    data += d
                    zero += z
        allocated = out.commit()
    except BaseException:
        out.abort()
        raise
    return MemoryFileStats(layout.file_size, data, zero, allocated)


def merge_diff(base_path: str | os.PathLike[str], diff_path: str | os.PathLike[str],
               bitmaps: Sequence[bytes | bytearray | memoryview], layout: MemoryFileLayout) -> MemoryFileStats:
    """Copy the dirty pages of a diff memory file onto its base, in place.

    Both files must have `layout`'s size. Dirty pages that are zero in the
    diff are written as zeros (the base may hold data there). The base is
    fsynced before returning. Idempotent: rerunning after a crash finishes
    the merge.
    """
    if len(bitmaps) != len(layout.regions):
        raise BadDirtyBitmap(f"{len(bitmaps)} bitmaps for {len(layout.regions)} regions")
    ps = PAGE_SIZE
    runs = [list(dirty_runs(bm, r.size // ps)) for r, bm in zip(layout.regions, bitmaps)]
    try:
        base = os.open(base_path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise MemoryFileUnusable(exc.strerror or str(exc), path=base_path) from exc
    try:
        try:
            diff = os.open(diff_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise MemoryFileUnusable(exc.strerror or str(exc), path=diff_path) from exc
        try:
            for fd, p in ((base, base_path), (diff, diff_path)):
                size = os.fstat(fd).st_size
                if size != layout.file_size:
                    raise MemoryFileUnusable(f"{size} bytes, layout needs {layout.file_size}", path=p)
            data = 0
            for region, region_runs in zip(layout.regions, runs):
                for first, count in region_runs:
                    start = region.file_offset + first * ps
                    end = start + count * ps
                    for piece in range(start, end, SCAN_BLOCK):
                        n = min(SCAN_BLOCK, end - piece)
                        chunk = os.pread(diff, n, piece)
                        if len(chunk) != n:
                            raise MemoryFileUnusable(f"short read at {piece:#x}", path=diff_path)
                        _pwrite_all(base, chunk, piece)
                        data += n
            os.fsync(base)
            allocated = os.fstat(base).st_blocks * 512
        finally:
            os.close(diff)
    finally:
        os.close(base)
    return MemoryFileStats(layout.file_size, data, 0, allocated)


def diff_bitmaps_of(state_tree: Any) -> tuple[MemoryFileLayout, list[bytes]]:
    """The memory layout and dirty bitmaps recorded in a diff snapshot's state tree.

    `BadDirtyBitmap` if the state is not a diff snapshot's (a full snapshot
    has no bitmaps: its memory file is complete on its own).
    """
    memory = state_tree.get("memory") if isinstance(state_tree, dict) else None
    if not isinstance(memory, dict) or memory.get("kind") != "diff":
        raise BadDirtyBitmap("the state file is not a diff snapshot's")
    layout = MemoryFileLayout.from_tree(memory.get("layout"))
    bitmaps = memory.get("dirty_bitmaps")
    if not isinstance(bitmaps, list) or not all(isinstance(b, bytes) for b in bitmaps):
        raise BadDirtyBitmap("the diff snapshot's dirty bitmaps are missing or malformed")
    return layout, bitmaps


def merge_diff_snapshot(state_path: str | os.PathLike[str], base_path: str | os.PathLike[str],
                        diff_path: str | os.PathLike[str]) -> MemoryFileStats:
    """Merge a diff snapshot's memory file onto its base's, using the bitmaps in its state file.

    Afterwards `base_path` holds the guest memory at the diff snapshot, and
    the diff's state file loads with it.
    """
    from .format import read_state
    layout, bitmaps = diff_bitmaps_of(read_state(state_path))
    return merge_diff(base_path, diff_path, bitmaps, layout)


# --- authentication: checking a memory file against its signature --------------

#: Extended attribute a trusted verifier sets on a memory file it checked
#: (see `seal_memory_file`). A ``user.`` attribute can only be set by a
#: process allowed to write the file: on a root-owned file without write
#: bits, only root.
SEAL_XATTR = "user.ember.seal"


def _data_chunks(fd: int, memory_size: int, chunk_size: int) -> list[int]:
    """Indexes, ascending, of the chunks of the open file that hold data (not wholly in a hole)."""
    indexes: list[int] = []
    for start, end in data_extents(fd, 0, memory_size):
        first = start // chunk_size
        if indexes and indexes[-1] >= first:
            first = indexes[-1] + 1
        indexes.extend(range(first, (end - 1) // chunk_size + 1))
    return indexes


def _read_chunk(fd: int, start: int, length: int) -> bytes:
    data = os.pread(fd, length, start)
    if len(data) != length:
        raise MemoryMismatch(f"short read at {start:#x}: the file shrank")
    return data


def memory_digest_of_file(path: str | os.PathLike[str], *, chunk_size: int) -> MemoryDigest:
    """The memory digest of the file at `path` (what `ember snapshot sign` signs).

    Chunks wholly in holes are zeros: they get the cached zero digest
    without a read, so a sparse file costs what its data costs.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise MemoryFileUnusable(exc.strerror or str(exc), path=path) from exc
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise MemoryFileUnusable("empty", path=path)
        count = -(-size // chunk_size)
        table = bytearray(zero_chunk_digest(chunk_size) * count)
        last = count - 1
        table[last * 32:] = zero_chunk_digest(size - last * chunk_size)
        for index in _data_chunks(fd, size, chunk_size):
            start = index * chunk_size
            table[index * 32:(index + 1) * 32] = hashlib.sha256(
                _read_chunk(fd, start, min(chunk_size, size - start))).digest()
    finally:
        os.close(fd)
    return MemoryDigest(size, chunk_size, bytes(table))


def verify_memory_fd(fd: int, memory: MemoryDigest) -> None:
    """Raise `auth.MemoryMismatch` unless the open file holds exactly the signed memory.

    Chunks holding data are read and hashed; runs of chunks wholly in holes
    are checked at once (their signed digests must all be the zero digest),
    without reading. The caller maps the same fd afterwards, so the checked
    file is the mapped one; that it does not change afterwards is the
    caller's business (a sealed file, or one only trusted processes write).
    """
    size = os.fstat(fd).st_size
    if size != memory.size:
        raise MemoryMismatch(f"{size} bytes, the signature says {memory.size}")
    cs, count, table = memory.chunk_size, memory.count, memory.chunks
    zero = zero_chunk_digest(cs)

    def holes(first: int, end: int) -> None:
        """Chunks first..end-1 lie in holes: their digests must be the zero digest."""
        full_end = min(end, size // cs)  # the last chunk may be short: checked on its own
        if first < full_end and table[first * 32:full_end * 32] != zero * (full_end - first):
            bad = next(i for i in range(first, full_end) if memory.digest(i) != zero)
            raise MemoryMismatch(f"chunk {bad} at offset {bad * cs:#x}")
        for index in range(max(first, full_end), end):
            memory.check_chunk(index, None)

    previous = 0
    for index in _data_chunks(fd, size, cs):
        holes(previous, index)
        start = index * cs
        memory.check_chunk(index, _read_chunk(fd, start, min(cs, size - start)))
        previous = index + 1
    holes(previous, count)


def memory_file_sealed(fd: int, key: SnapshotKey, signature: SnapshotSignature) -> bool:
    """Whether the open file is sealed for `signature`: a trusted verifier checked it, and
    nobody but root can have changed it since.

    True only if the file is owned by root, has no write permission bits at
    all, is a regular file of the signed size, and carries `SEAL_XATTR` equal
    to ``key.seal(signature)`` (which binds the seal to this very signature:
    a sealed file of another snapshot does not pass).
    """
    st = os.fstat(fd)
    if (not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o222
            or st.st_size != signature.memory.size):
        return False
    try:
        value = os.getxattr(fd, SEAL_XATTR)
    except OSError:
        return False  # no seal, or a file system without user xattrs
    return hmac.compare_digest(value, key.seal(signature))


def seal_memory_file(path: str | os.PathLike[str], key: SnapshotKey, signature: SnapshotSignature) -> bool:
    """Make the memory file at `path` read-only and root-owned, verify it fully, and seal it.

    The order matters: permissions are dropped first, then the contents are
    checked, then the seal is written, so no unprivileged writer can slip a
    change in between (a writer that opened the file earlier must be gone:
    the caller kills the VMM that wrote it first). Returns False, leaving
    the file verified but unsealed, when the seal cannot be made (not root,
    or no user xattrs): VMMs then verify it on every load.
    Raises `auth.MemoryMismatch` if the contents do not match.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~0o222)
        sealable = True
        if st.st_uid != 0:
            try:
                os.fchown(fd, 0, 0)
            except PermissionError:
                sealable = False
        verify_memory_fd(fd, signature.memory)
        if not sealable:
            return False
        try:
            os.setxattr(fd, SEAL_XATTR, key.seal(signature))
        except OSError:
            return False
        return True
    finally:
        os.close(fd)

"""The host file behind a virtio block device: positioned, vectored I/O on one fd.

Data moves between the file and guest memory without an intermediate copy:
the device hands `read_at`/`write_at` memoryviews of guest memory and the
kernel fills or drains them (`preadv`/`pwritev`). Short transfers are
retried until done or until the file ends, so the caller sees one count.

Cache types (Firecracker's `cache_type`): with `Unsafe` a flush request is
acknowledged without syncing anything (and the device does not advertise
VIRTIO_BLK_F_FLUSH); with `Writeback` it is `fdatasync(2)`.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

from vmm.config.drive import CacheType

__all__ = [
    "SECTOR_SHIFT",
    "SECTOR_SIZE",
    "BlockBackendError",
    "BackingFileError",
    "BackendReadOnly",
    "FileBackend",
]

# virtio 1.1 §5.2.4: capacity and sector numbers count 512-byte sectors.
SECTOR_SHIFT = 9
SECTOR_SIZE = 1 << SECTOR_SHIFT

# How many iovecs one preadv/pwritev takes (POSIX IOV_MAX; Linux: 1024).
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


class BlockBackendError(Exception):
    """The block device's backing file could not be used."""


class BackingFileError(BlockBackendError):
    """The backing file could not be opened or sized."""


class BackendReadOnly(BlockBackendError):
    """A write was attempted on a read-only backing file."""


class FileBackend:
    """A backing file (regular file or block device) opened read-only or read-write."""

    def __init__(self, path: str, *, read_only: bool, cache_type: CacheType | str = CacheType.UNSAFE):
        self.read_only = read_only
        self.cache_type = CacheType(cache_type)
        self.path = path
        self.fd, self.size = self._open(path)

    def _open(self, path: str) -> tuple[int, int]:
        flags = (os.O_RDONLY if self.read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise BackingFileError(f"cannot open backing file {path!r}: {exc.strerror}") from exc
        try:
            # SEEK_END gives the size of block devices too (st_size is 0 for them).
            size = os.lseek(fd, 0, os.SEEK_END)
        except OSError as exc:
            os.close(fd)
            raise BackingFileError(f"cannot size backing file {path!r}: {exc.strerror}") from exc
        return fd, size

    @property
    def capacity(self) -> int:
        """Whole 512-byte sectors; a partial last sector is not visible to the guest."""
        return self.size >> SECTOR_SHIFT

    def read_at(self, offset: int, buffers: Sequence[memoryview]) -> int:
        """Fill `buffers` in order from file `offset`; returns the bytes read (less only at end of file)."""
        return _transfer(os.preadv, self.fd, buffers, offset)

    def write_at(self, offset: int, buffers: Sequence[memoryview]) -> int:
        """Write `buffers` in order at file `offset`; returns the bytes written."""
        if self.read_only:
            raise BackendReadOnly(f"backing file {self.path!r} is read-only")
        return _transfer(os.pwritev, self.fd, buffers, offset)

    def flush(self) -> None:
        """Make written data durable (Writeback) or do nothing (Unsafe)."""
        if self.cache_type is CacheType.WRITEBACK and not self.read_only:
            os.fdatasync(self.fd)

    def update_path(self, path: str) -> None:
        """Switch to another backing file (same mode); the old one stays if the new cannot be opened."""
        fd, size = self._open(path)
        old = self.fd
        self.fd, self.size, self.path = fd, size, path
        os.close(old)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        mode = "ro" if self.read_only else "rw"
        return f"<FileBackend {self.path!r} {mode} {self.cache_type.value} sectors={self.capacity}>"


def _transfer(op: Callable[[int, Sequence[memoryview], int], int], fd: int,
              buffers: Sequence[memoryview], offset: int) -> int:
    """Run a vectored positioned op until every buffer is done or it makes no progress."""
    pending = [b for b in buffers if len(b)]
    done = 0
    while pending:
        n = op(fd, pending[:_IOV_MAX], offset + done)
        if n <= 0:
            break
        done += n
        while n and pending:
            if n >= len(pending[0]):
                n -= len(pending.pop(0))
            else:
                pending[0] = pending[0][n:]
                n = 0
    return done

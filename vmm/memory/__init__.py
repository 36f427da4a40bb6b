"""Guest physical memory: regions backed by host mmaps, bounds-checked access.

A guest physical address (GPA) is translated by finding the region holding
it; every access checks that the whole range lies inside one region, so a
guest-supplied address can never reach host memory outside guest RAM.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from dataclasses import dataclass, field

__all__ = [
    "GuestMemoryError",
    "GuestAddressOutOfRange",
    "GuestRegion",
    "GuestMemory",
]


class GuestMemoryError(Exception):
    """Guest memory could not be set up or accessed."""


class GuestAddressOutOfRange(GuestMemoryError):
    """A guest physical range is not wholly inside one memory region."""


@dataclass(eq=False)
class GuestRegion:
    """One contiguous slot of guest RAM backed by a host mapping."""

    guest_addr: int
    size: int
    mapping: mmap.mmap
    # Where the mapping came from, for snapshots: None for anonymous memory.
    file_path: str | None = None
    file_offset: int = 0
    shared: bool = False
    host_addr: int = field(init=False)

    def __post_init__(self) -> None:
        if len(self.mapping) != self.size:
            raise GuestMemoryError("mapping size does not match region size")
        # SAFETY: from_buffer pins the mmap's buffer (the mmap cannot be closed
        # while this export lives); we only take its address, which stays valid
        # for as long as the region (and so the mapping) is alive.
        buf = (ctypes.c_char * 1).from_buffer(self.mapping)
        self.host_addr = ctypes.addressof(buf)
        del buf

    @property
    def end(self) -> int:
        return self.guest_addr + self.size

    def contains(self, gpa: int, length: int = 1) -> bool:
        return self.guest_addr <= gpa and gpa + length <= self.end and length >= 0

    def __repr__(self) -> str:
        return f"<GuestRegion {self.guest_addr:#x}..{self.end:#x} ({self.size >> 20} MiB)>"


class GuestMemory:
    """The guest's RAM: a sorted set of non-overlapping regions."""

    def __init__(self, regions: list[GuestRegion]):
        regions = sorted(regions, key=lambda r: r.guest_addr)
        for a, b in zip(regions, regions[1:]):
            if a.end > b.guest_addr:
                raise GuestMemoryError(f"regions overlap: {a!r} and {b!r}")
        self.regions = regions
        # Pages the VMM itself wrote (device DMA), one bitmap per region, when
        # tracking is on: KVM's dirty log only sees the guest's own writes.
        self._dirty: list[bytearray] | None = None

    # --- dirty pages written by the VMM ----------------------------------------

    def enable_dirty_tracking(self) -> None:
        """Record which pages `write()` and `view()` touch, for diff snapshots."""
        if self._dirty is None:
            self._dirty = [bytearray((r.size // mmap.PAGESIZE + 7) // 8) for r in self.regions]

    @property
    def tracks_dirty_pages(self) -> bool:
        return self._dirty is not None

    def _mark_dirty(self, r: GuestRegion, off: int, length: int) -> None:
        bitmap = self._dirty[self.regions.index(r)]  # type: ignore[index]
        first, last = off // mmap.PAGESIZE, (off + max(length, 1) - 1) // mmap.PAGESIZE
        for page in range(first, last + 1):
            bitmap[page >> 3] |= 1 << (page & 7)

    def take_dirty_bitmaps(self) -> list[bytes]:
        """Per region, the pages the VMM wrote since the last call (bit i = page i); clears them.

        All-zero bitmaps when tracking is off.
        """
        if self._dirty is None:
            return [bytes((r.size // mmap.PAGESIZE + 7) // 8) for r in self.regions]
        out = [bytes(b) for b in self._dirty]
        for b in self._dirty:
            b[:] = bytes(len(b))
        return out

    # --- construction -------------------------------------------------------

    @classmethod
    def anonymous(cls, ranges: list[tuple[int, int]]) -> "GuestMemory":
        """Private anonymous memory for each (guest_addr, size) range."""
        regions = []
        for gpa, size in ranges:
            if size <= 0 or size % mmap.PAGESIZE or gpa % mmap.PAGESIZE:
                raise GuestMemoryError(f"bad region {gpa:#x}+{size:#x}: not page aligned")
            # SAFETY: a fresh private anonymous mapping, owned by the region.
            m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0))
            regions.append(GuestRegion(gpa, size, m))
        return cls(regions)

    @classmethod
    def from_file(cls, path: str, ranges: list[tuple[int, int]], *, shared: bool = False) -> "GuestMemory":
        """Map a memory file: the ranges lie back to back in the file.

        With shared=False the mapping is MAP_PRIVATE: pages come from the page
        cache and are copied on the guest's first write (copy-on-write clones).
        """
        fd = os.open(path, os.O_RDWR if shared else os.O_RDONLY)
        try:
            return cls.from_fd(fd, ranges, shared=shared, path=path)
        finally:
            os.close(fd)

    @classmethod
    def from_fd(cls, fd: int, ranges: list[tuple[int, int]], *, shared: bool = False,
                path: str | None = None) -> "GuestMemory":
        """`from_file` on a file the caller has open (and checked): the very inode, no path lookup.

        `fd` stays the caller's (the mappings do not need it open); `path`
        names the file in errors and in each region's `file_path`.
        """
        total = sum(size for _, size in ranges)
        name = path if path is not None else f"fd {fd}"
        if os.fstat(fd).st_size < total:
            raise GuestMemoryError(f"memory file {name} is smaller than guest memory ({total} bytes)")
        regions = []
        offset = 0
        for gpa, size in ranges:
            flags = mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE
            # SAFETY: the file is at least offset+size long (checked above);
            # the mapping outlives the fd and is owned by the region.
            m = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
            regions.append(GuestRegion(gpa, size, m, file_path=name, file_offset=offset, shared=shared))
            offset += size
        return cls(regions)

    def close(self) -> None:
        for r in self.regions:
            try:
                r.mapping.close()
            except BufferError:
                # A view is still exported (e.g. a device holds one); the
                # mapping goes away with the process.
                pass

    # --- queries -------------------------------------------------------------

    @property
    def total_size(self) -> int:
        return sum(r.size for r in self.regions)

    @property
    def last_addr(self) -> int:
        return self.regions[-1].end - 1

    def find_region(self, gpa: int, length: int = 1) -> GuestRegion:
        for r in self.regions:
            if r.contains(gpa, length):
                return r
        raise GuestAddressOutOfRange(f"guest range {gpa:#x}+{length:#x} is outside guest memory")

    def check_range(self, gpa: int, length: int) -> bool:
        if gpa < 0 or length < 0:
            return False
        try:
            self.find_region(gpa, max(length, 1))
        except GuestAddressOutOfRange:
            return False
        return True

    def host_address(self, gpa: int, length: int = 1) -> int:
        r = self.find_region(gpa, length)
        return r.host_addr + (gpa - r.guest_addr)

    # --- access --------------------------------------------------------------

    def view(self, gpa: int, length: int) -> memoryview:
        """A zero-copy view of guest memory; the range must lie in one region."""
        if gpa < 0 or length < 0:
            raise GuestAddressOutOfRange(f"negative guest range {gpa:#x}+{length:#x}")
        r = self.find_region(gpa, max(length, 1))
        off = gpa - r.guest_addr
        if self._dirty is not None:
            self._mark_dirty(r, off, length)  # a view may be written through
        return memoryview(r.mapping)[off:off + length]

    def read(self, gpa: int, length: int) -> bytes:
        r = self.find_region(gpa, max(length, 1)) if length else None
        if r is None:
            return b""
        off = gpa - r.guest_addr
        return r.mapping[off:off + length]

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        length = len(data)
        if not length:
            return
        r = self.find_region(gpa, length)
        off = gpa - r.guest_addr
        r.mapping[off:off + length] = data
        if self._dirty is not None:
            self._mark_dirty(r, off, length)

    def read_u8(self, gpa: int) -> int:
        return self.read(gpa, 1)[0]

    def read_u16(self, gpa: int) -> int:
        return struct.unpack("<H", self.read(gpa, 2))[0]

    def read_u32(self, gpa: int) -> int:
        return struct.unpack("<I", self.read(gpa, 4))[0]

    def read_u64(self, gpa: int) -> int:
        return struct.unpack("<Q", self.read(gpa, 8))[0]

    def write_u8(self, gpa: int, v: int) -> None:
        self.write(gpa, struct.pack("<B", v))

    def write_u16(self, gpa: int, v: int) -> None:
        self.write(gpa, struct.pack("<H", v))

    def write_u32(self, gpa: int, v: int) -> None:
        self.write(gpa, struct.pack("<I", v))

    def write_u64(self, gpa: int, v: int) -> None:
        self.write(gpa, struct.pack("<Q", v))

    def __repr__(self) -> str:
        return f"<GuestMemory {len(self.regions)} regions, {self.total_size >> 20} MiB>"

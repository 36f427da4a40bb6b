"""What every loader shares: the error family base, the result type, and
bounds-checked reading of an untrusted image file into guest memory.

An image (kernel or initrd) is read through `open_image`, which accepts a
path or an already-open binary file object. Reads are checked against the
file size known up front, and bulk data goes straight from the file into a
view of guest memory (`ImageFile.copy_to_guest`), so a 60 MiB kernel never
exists as a Python bytes object.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO, Union

from vmm.memory import GuestMemory, GuestMemoryError

__all__ = [
    "HIMEM_START",
    "PAGE_SIZE",
    "ImageSource",
    "LoaderError",
    "ImageNotFound",
    "ImageUnreadable",
    "ImageEmpty",
    "ImageTruncated",
    "UnknownImageFormat",
    "GuestMemoryWriteFailed",
    "KernelLoadResult",
    "ImageFile",
    "open_image",
    "zero_guest",
    "align_up",
    "align_down",
]

# Documentation/x86/boot.rst, "Loading The Rest of The Kernel": a bzImage's
# protected-mode kernel is loaded at 0x100000; nothing of the kernel may sit
# below it (the real-mode area, BIOS data and the zero page live there).
HIMEM_START = 0x100000

PAGE_SIZE = 0x1000

# Largest piece handed to one read or one zeroing write.
_CHUNK = 16 << 20
_ZEROS = memoryview(bytes(1 << 20))

ImageSource = Union[str, "os.PathLike[str]", bytes, BinaryIO, "ImageFile"]


def align_up(value: int, alignment: int) -> int:
    """Round up to a multiple of `alignment` (a power of two)."""
    return (value + alignment - 1) & ~(alignment - 1)


def align_down(value: int, alignment: int) -> int:
    """Round down to a multiple of `alignment` (a power of two)."""
    return value & ~(alignment - 1)


class LoaderError(Exception):
    """The image could not be loaded."""

    def __init__(self, detail: str = "", *, path: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        # Filled in by `open_image` when the error passes through it, so code
        # deep in a parser need not know which file it is reading.
        self.path = path

    @property
    def summary(self) -> str:
        """The first line of the class docstring: what went wrong."""
        doc = type(self).__doc__ or type(self).__name__
        return doc.strip().splitlines()[0].rstrip(".")

    def __str__(self) -> str:
        text = self.summary
        if self.detail:
            text = f"{text}: {self.detail}"
        if self.path is not None:
            text = f"{self.path}: {text}"
        return " ".join(text.split("\n"))


class ImageNotFound(LoaderError):
    """File not found."""


class ImageUnreadable(LoaderError):
    """File cannot be read."""


class ImageEmpty(LoaderError):
    """File is empty."""


class ImageTruncated(LoaderError):
    """File is truncated."""


class UnknownImageFormat(LoaderError):
    """Not a kernel image (neither ELF nor bzImage)."""


class GuestMemoryWriteFailed(LoaderError):
    """Writing the image into guest memory failed."""


@dataclass(frozen=True, repr=False)
class KernelLoadResult:
    """Where a kernel landed in guest memory and how to enter it.

    kernel_load: lowest guest physical address written.
    kernel_end: first address past everything the kernel occupies while it
        boots (for a bzImage this includes the decompression area, init_size
        bytes at its runtime address); an initrd goes above it.
    entry_64: guest physical address of the 64-bit entry point (long mode,
        paging on, %rsi = boot_params).
    pvh_entry: guest physical address of the 32-bit PVH entry point (Xen
        ELF note PHYS32_ENTRY), or None if the kernel has none.
    setup_header: for a bzImage, the raw setup header (file bytes from 0x1f1
        up to its end), to be copied into boot_params at offset 0x1f1.
    """

    kernel_load: int
    kernel_end: int
    entry_64: int
    pvh_entry: int | None
    setup_header: bytes | None

    def __repr__(self) -> str:
        pvh = "none" if self.pvh_entry is None else f"{self.pvh_entry:#x}"
        hdr = "none" if self.setup_header is None else f"{len(self.setup_header)}B"
        return (
            f"<KernelLoadResult {self.kernel_load:#x}..{self.kernel_end:#x} "
            f"entry_64={self.entry_64:#x} pvh={pvh} setup_header={hdr}>"
        )


class ImageFile:
    """An open image of known size, read only at checked offsets."""

    def __init__(self, file: BinaryIO, name: str, size: int) -> None:
        self._file = file
        self.name = name
        self.size = size

    def read_at(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes at `offset`, or ImageTruncated."""
        self._check(offset, length)
        self._seek(offset)
        chunks = []
        remaining = length
        while remaining:
            data = self._file.read(remaining)
            if not data:
                raise ImageTruncated(f"file ended while reading {length} bytes at offset {offset:#x}")
            chunks.append(data)
            remaining -= len(data)
        return b"".join(chunks)

    def copy_to_guest(self, offset: int, length: int, mem: GuestMemory, gpa: int) -> None:
        """Copy file bytes [offset, offset+length) to guest memory at `gpa`.

        The caller has checked that the guest range lies in one region.
        """
        if not length:
            return
        self._check(offset, length)
        self._seek(offset)
        try:
            # SAFETY: GuestMemory.view bounds-checks [gpa, gpa+length) against
            # one region and returns a memoryview of exactly that many bytes of
            # its mmap; the export pins the mapping until the view is released.
            view = mem.view(gpa, length)
        except GuestMemoryError as exc:
            raise GuestMemoryWriteFailed(str(exc)) from exc
        # Releasing the view on the way out keeps the mapping closable.
        with view:
            done = 0
            while done < length:
                want = min(_CHUNK, length - done)
                # SAFETY: readinto writes at most len(slice) = want bytes, and
                # the slice lies inside the view (done + want <= length).
                got = self._file.readinto(view[done:done + want])
                if not got:
                    raise ImageTruncated(f"file ended while reading {length} bytes at offset {offset:#x}")
                done += got

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ImageTruncated(
                f"needs bytes {offset:#x}..{offset + length:#x} but the file is {self.size} bytes"
            )

    def _seek(self, offset: int) -> None:
        if self._file.seek(offset) != offset:
            raise ImageUnreadable(f"cannot seek to offset {offset:#x}")

    def __repr__(self) -> str:
        return f"<ImageFile {self.name} {self.size} bytes>"


def _display_name(source: ImageSource) -> str:
    if isinstance(source, (str, bytes, os.PathLike)):
        return os.fsdecode(source)
    name = getattr(source, "name", None)
    if isinstance(name, (str, bytes)):
        return os.fsdecode(name)
    return f"<{type(source).__name__}>"


@contextmanager
def open_image(source: ImageSource) -> Iterator[ImageFile]:
    """Open a path (or wrap a binary file object) as an ImageFile.

    An ImageFile passes through unchanged (its opener tags errors).

    Every LoaderError raised inside the block, and every OSError from
    reading, leaves tagged with the file's name.
    """
    if isinstance(source, ImageFile):
        # Already open (a caller sniffed the format first): reuse it.
        yield source
        return
    name = _display_name(source)
    try:
        if isinstance(source, (str, bytes, os.PathLike)):
            try:
                file = open(source, "rb", buffering=0)
            except FileNotFoundError as exc:
                raise ImageNotFound() from exc
            except OSError as exc:
                raise ImageUnreadable(exc.strerror or str(exc)) from exc
            with file:
                st = os.fstat(file.fileno())
                if not stat.S_ISREG(st.st_mode):
                    raise ImageUnreadable("not a regular file")
                yield ImageFile(file, name, st.st_size)
        else:
            if not (source.readable() and source.seekable()):
                raise ImageUnreadable("file object is not readable and seekable")
            size = source.seek(0, io.SEEK_END)
            yield ImageFile(source, name, size)
    except LoaderError as exc:
        if exc.path is None:
            exc.path = name
        raise
    except OSError as exc:
        raise ImageUnreadable(exc.strerror or str(exc), path=name) from exc


def zero_guest(mem: GuestMemory, gpa: int, length: int) -> None:
    """Zero guest memory [gpa, gpa+length) without a length-sized buffer."""
    if not length:
        return
    try:
        # SAFETY: a bounds-checked view of exactly `length` bytes of one
        # region's mmap (see ImageFile.copy_to_guest), released below.
        view = mem.view(gpa, length)
    except GuestMemoryError as exc:
        raise GuestMemoryWriteFailed(str(exc)) from exc
    with view:
        done = 0
        while done < length:
            n = min(len(_ZEROS), length - done)
            # SAFETY: slice assignment of equal lengths inside the view.
            view[done:done + n] = _ZEROS[:n]
            done += n

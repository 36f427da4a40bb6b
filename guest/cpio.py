"""A writer (and checking reader) for the "newc" cpio format of initramfs.

Primer. The Linux initramfs is a cpio archive in the SVR4 "newc" format
(Documentation/driver-api/early-userspace/buffer-format.rst). Each member
is a 110-byte ASCII header — the magic ``070701`` then thirteen 8-digit hex
fields (ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
rdevmajor, rdevminor, namesize, check) — followed by the NUL-terminated
path name, padded to a multiple of 4 bytes, then the file data (a symlink's
data is its target), padded to 4 again. A member named ``TRAILER!!!`` ends
the archive. Directories must precede their contents.

Ember's initramfs is written here, uncompressed, rather than with
``cpio``/``gen_init_cpio``: no root rights are needed for device nodes
(``dev/console``), the output is byte-for-byte reproducible (fixed inode
numbers, owners and mtimes), and the guest kernel needs no decompressor.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import GuestImageError

__all__ = [
    "CpioError",
    "CpioFormatError",
    "CpioNameError",
    "CpioEntry",
    "newc_archive",
    "parse_newc",
    "entries_from_tree",
]

# buffer-format.rst: "c_magic ... the string "070701"".
NEWC_MAGIC = b"070701"
# buffer-format.rst: 6-byte magic + 13 fields of 8 hex digits.
NEWC_HEADER_SIZE = 110
NEWC_FIELD_COUNT = 13
NEWC_ALIGN = 4
NEWC_TRAILER = "TRAILER!!!"
# Largest value an 8-hex-digit field can carry.
NEWC_FIELD_MAX = 0xFFFF_FFFF


class CpioError(GuestImageError):
    """A cpio archive could not be written or read."""


class CpioFormatError(CpioError):
    """Bytes are not a well-formed newc cpio archive."""


class CpioNameError(CpioError):
    """A cpio member name is empty, absolute, or climbs out with '..'."""


def _pad(length: int) -> int:
    return (-length) % NEWC_ALIGN


@dataclass(frozen=True)
class CpioEntry:
    """One archive member: a directory, regular file, symlink or device."""

    name: str
    mode: int
    data: bytes = b""
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    rdev_major: int = 0
    rdev_minor: int = 0

    def __post_init__(self) -> None:
        parts = self.name.split("/")
        if not self.name or self.name.startswith("/") or ".." in parts or "" in parts:
            raise CpioNameError(f"bad cpio member name {self.name!r}")
        kind = stat.S_IFMT(self.mode)
        if kind not in (stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK):
            raise CpioError(f"{self.name}: unsupported file type {oct(kind)}")
        if kind in (stat.S_IFDIR, stat.S_IFCHR, stat.S_IFBLK) and self.data:
            raise CpioError(f"{self.name}: only files and symlinks carry data")

    @classmethod
    def directory(cls, name: str, perm: int = 0o755) -> CpioEntry:
        return cls(name, stat.S_IFDIR | perm)

    @classmethod
    def file(cls, name: str, data: bytes, perm: int = 0o644) -> CpioEntry:
        return cls(name, stat.S_IFREG | perm, data)

    @classmethod
    def symlink(cls, name: str, target: str) -> CpioEntry:
        return cls(name, stat.S_IFLNK | 0o777, os.fsencode(target))

    @classmethod
    def char_device(cls, name: str, major: int, minor: int, perm: int = 0o600) -> CpioEntry:
        return cls(name, stat.S_IFCHR | perm, rdev_major=major, rdev_minor=minor)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


def _header(ino: int, entry: CpioEntry, name_size: int, nlink: int) -> bytes:
    fields = (
        ino, entry.mode, entry.uid, entry.gid, nlink, entry.mtime, len(entry.data),
        0, 0, entry.rdev_major, entry.rdev_minor, name_size, 0,
    )
    for value in fields:
        if not 0 <= value <= NEWC_FIELD_MAX:
            raise CpioError(f"{entry.name}: header field {value} does not fit in newc")
    return NEWC_MAGIC + b"".join(b"%08X" % value for value in fields)


def _member(ino: int, entry: CpioEntry, nlink: int) -> bytes:
    name = os.fsencode(entry.name) + b"\0"
    head = _header(ino, entry, len(name), nlink) + name
    head += b"\0" * _pad(len(head))
    return head + entry.data + b"\0" * _pad(len(entry.data))


def newc_archive(entries: Iterable[CpioEntry]) -> bytes:
    """Serialise entries, in the order given, into a newc archive with a trailer.

    Inode numbers are assigned 1, 2, 3, ... in order, so equal input gives
    equal bytes. Every parent directory must appear before its children.
    """
    out = bytearray()
    seen_dirs: set[str] = set()
    seen: set[str] = set()
    ino = 0
    for ino, entry in enumerate(entries, start=1):
        if entry.name in seen:
            raise CpioError(f"duplicate cpio member {entry.name!r}")
        parent = entry.name.rpartition("/")[0]
        if parent and parent not in seen_dirs:
            raise CpioError(f"{entry.name}: parent directory {parent!r} must come first")
        seen.add(entry.name)
        if entry.is_dir:
            seen_dirs.add(entry.name)
        out += _member(ino, entry, 2 if entry.is_dir else 1)
    out += _member(ino + 1, CpioEntry(NEWC_TRAILER, stat.S_IFREG), 1)
    return bytes(out)


def parse_newc(data: bytes) -> list[CpioEntry]:
    """Read a newc archive back into entries (the trailer is not returned).

    Every length is checked against the buffer: a truncated or corrupt
    archive raises CpioFormatError instead of reading past the end.
    """
    entries: list[CpioEntry] = []
    offset = 0
    while True:
        head = data[offset:offset + NEWC_HEADER_SIZE]
        if len(head) < NEWC_HEADER_SIZE:
            raise CpioFormatError(f"truncated header at offset {offset}")
        if head[:6] != NEWC_MAGIC:
            raise CpioFormatError(f"bad magic {head[:6]!r} at offset {offset}")
        try:
            fields = [int(head[6 + 8 * i:14 + 8 * i], 16) for i in range(NEWC_FIELD_COUNT)]
        except ValueError as exc:
            raise CpioFormatError(f"non-hex header field at offset {offset}") from exc
        _ino, mode, uid, gid, _nlink, mtime, file_size = fields[:7]
        rdev_major, rdev_minor, name_size = fields[9:12]
        name_start = offset + NEWC_HEADER_SIZE
        name_end = name_start + name_size
        if name_size == 0 or name_end > len(data) or data[name_end - 1] != 0:
            raise CpioFormatError(f"bad name field at offset {offset}")
        name = os.fsdecode(data[name_start:name_end - 1])
        data_start = name_end + _pad(name_end - offset)
        data_end = data_start + file_size
        if data_end > len(data):
            raise CpioFormatError(f"{name}: data runs past the end of the archive")
        if name == NEWC_TRAILER:
            return entries
        entries.append(CpioEntry(
            name, mode, data[data_start:data_end], uid=uid, gid=gid, mtime=mtime,
            rdev_major=rdev_major, rdev_minor=rdev_minor,
        ))
        offset = data_end + _pad(data_end - offset)


def entries_from_tree(root: Path) -> list[CpioEntry]:
    """Walk a staged directory tree into entries, parents first, names sorted.

    Owners become root and mtimes 0 (the archive is a build product, not a
    backup). Only directories, regular files and symlinks are taken; device
    nodes are added by the caller with ``CpioEntry.char_device``.
    """
    entries: list[CpioEntry] = []

    def walk(directory: Path, prefix: str) -> None:
        for child in sorted(directory.iterdir(), key=lambda p: p.name):
            name = f"{prefix}{child.name}"
            info = child.lstat()
            perm = stat.S_IMODE(info.st_mode)
            if stat.S_ISLNK(info.st_mode):
                entries.append(CpioEntry.symlink(name, os.readlink(child)))
            elif stat.S_ISDIR(info.st_mode):
                entries.append(CpioEntry.directory(name, perm))
                walk(child, name + "/")
            elif stat.S_ISREG(info.st_mode):
                entries.append(CpioEntry.file(name, child.read_bytes(), perm))
            else:
                raise CpioError(f"{child}: unsupported file type in staged tree")

    walk(root, "")
    return entries

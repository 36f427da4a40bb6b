"""virtio-blk requests: a validated descriptor chain becomes a `Request` (virtio 1.1 §5.2.6).

Primer. A request is one descriptor chain laid out as

    struct virtio_blk_req {
        le32 type;        // VIRTIO_BLK_T_IN / OUT / FLUSH / GET_ID ...
        le32 reserved;
        le64 sector;      // in 512-byte units, whatever blk_size says
        u8 data[];        // device-writable for IN and GET_ID, readable for OUT, absent for FLUSH
        u8 status;        // device-writable: VIRTIO_BLK_S_OK / IOERR / UNSUPP
    };

Ember takes the framing Linux (and every known driver) uses: the first
descriptor holds the 16-byte header (device-readable, at least 16 bytes),
the last one the status byte (device-writable, at least 1 byte, the status
goes in its first byte), and everything between is data. Parsing only
reads the header; it checks every rule before any I/O is done, so an
invalid request never touches the backing file:

* the data direction matches the type (readable data for OUT, writable for
  IN and GET_ID, none for FLUSH), which also keeps the spec's
  readable-before-writable order (§2.6.4.2);
* IN/OUT move a whole number of sectors (§5.2.6.1), at most `seg_max`
  segments of at most `size_max` bytes each (what the config space
  promised, §5.2.4), inside the disk: `sector + sectors <= capacity`;
* GET_ID offers room for the 20-byte ID.

`parse_request` raises a `RequestError` whose `status` is what the device
writes back (IOERR, or UNSUPP for a type it does not implement) at
`status_address(...)`, if the chain has a usable status descriptor at all.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Sequence

from vmm.devices.virtio.block.backend import SECTOR_SHIFT, SECTOR_SIZE
from vmm.devices.virtio.queue import Descriptor
from vmm.memory import GuestMemory, GuestMemoryError

__all__ = [
    "VIRTIO_BLK_T_IN",
    "VIRTIO_BLK_T_OUT",
    "VIRTIO_BLK_T_FLUSH",
    "VIRTIO_BLK_T_GET_ID",
    "VIRTIO_BLK_S_OK",
    "VIRTIO_BLK_S_IOERR",
    "VIRTIO_BLK_S_UNSUPP",
    "VIRTIO_BLK_ID_BYTES",
    "REQUEST_HEADER_SIZE",
    "RequestType",
    "Request",
    "RequestError",
    "ChainTooShort",
    "HeaderInvalid",
    "StatusInvalid",
    "DataDirectionInvalid",
    "DataLengthInvalid",
    "SegmentsInvalid",
    "SectorOutOfRange",
    "RequestTypeUnsupported",
    "status_address",
    "parse_request",
]

# virtio 1.1 §5.2.6 "Device Operation": request types.
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8

# virtio 1.1 §5.2.6: status values.
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

# virtio 1.1 §5.2.6: "The device ID string is a NUL-padded ASCII string up to 20 bytes long."
VIRTIO_BLK_ID_BYTES = 20

# le32 type + le32 reserved + le64 sector.
REQUEST_HEADER_SIZE = 16
_HEADER = struct.Struct("<IIQ")


class RequestType(enum.IntEnum):
    """The request types this device implements."""

    IN = VIRTIO_BLK_T_IN
    OUT = VIRTIO_BLK_T_OUT
    FLUSH = VIRTIO_BLK_T_FLUSH
    GET_ID = VIRTIO_BLK_T_GET_ID


class RequestError(Exception):
    """The guest sent a block request that cannot be executed."""

    status = VIRTIO_BLK_S_IOERR


class ChainTooShort(RequestError):
    """The chain lacks a header, a status or the data its type needs."""


class HeaderInvalid(RequestError):
    """The request header is device-writable or shorter than 16 bytes."""


class StatusInvalid(RequestError):
    """The status descriptor is not device-writable."""


class DataDirectionInvalid(RequestError):
    """A data descriptor's direction does not match the request type."""


class DataLengthInvalid(RequestError):
    """The data length is not a whole number of sectors, too short for the ID, or present on a flush."""


class SegmentsInvalid(RequestError):
    """The request has more data segments than seg_max or one larger than size_max."""


class SectorOutOfRange(RequestError):
    """The request reaches past the end of the disk."""


class RequestTypeUnsupported(RequestError):
    """The request type is not one this device implements."""

    status = VIRTIO_BLK_S_UNSUPP


@dataclass(frozen=True)
class Request:
    """A request whose every rule has been checked; `data` are its buffers in order."""

    type: RequestType
    sector: int
    data: tuple[Descriptor, ...]
    status_addr: int

    @property
    def data_len(self) -> int:
        return sum(d.length for d in self.data)

    @property
    def offset(self) -> int:
        """The byte offset in the disk."""
        return self.sector << SECTOR_SHIFT


def status_address(descriptors: Sequence[Descriptor]) -> int | None:
    """Where a status byte may be written for this chain: its last descriptor, if device-writable."""
    if len(descriptors) < 2:
        return None  # a lone descriptor would be the header: never write into it
    last = descriptors[-1]
    return last.addr if last.is_write_only and last.length >= 1 else None


def parse_request(descriptors: Sequence[Descriptor], mem: GuestMemory, capacity: int, *,
                  seg_max: int, size_max: int) -> Request:
    """Check a chain's descriptors (already validated by the queue) and read its header.

    `capacity` is the disk size in sectors. Raises a `RequestError`.
    """
    if len(descriptors) < 2:
        raise ChainTooShort(f"{len(descriptors)} descriptor(s): a request needs a header and a status")
    header, data, status = descriptors[0], tuple(descriptors[1:-1]), descriptors[-1]
    if header.is_write_only or header.length < REQUEST_HEADER_SIZE:
        raise HeaderInvalid(f"header descriptor {header.length} bytes, write_only={header.is_write_only}")
    if not status.is_write_only:
        raise StatusInvalid("the status descriptor is device-readable")
    try:
        type_, _reserved, sector = _HEADER.unpack(mem.read(header.addr, REQUEST_HEADER_SIZE))
    except GuestMemoryError as exc:  # the queue checked the range; only a changed memory map gets here
        raise HeaderInvalid(f"header at {header.addr:#x} is unreadable") from exc
    try:
        rtype = RequestType(type_)
    except ValueError:
        raise RequestTypeUnsupported(f"request type {type_}") from None

    if rtype is RequestType.FLUSH:
        if data:
            raise DataLengthInvalid("a flush request carries no data")
        return Request(rtype, sector, (), status.addr)

    if not data:
        raise ChainTooShort(f"{rtype.name} request without data")
    want_writable = rtype is not RequestType.OUT
    for d in data:
        if d.is_write_only != want_writable:
            raise DataDirectionInvalid(
                f"{rtype.name} data descriptor at {d.addr:#x} is {'writable' if d.is_write_only else 'readable'}")
    total = sum(d.length for d in data)

    if rtype is RequestType.GET_ID:
        if total < VIRTIO_BLK_ID_BYTES:
            raise DataLengthInvalid(f"GET_ID buffer of {total} bytes, the ID takes {VIRTIO_BLK_ID_BYTES}")
        return Request(rtype, sector, data, status.addr)

    if total % SECTOR_SIZE:
        raise DataLengthInvalid(f"{rtype.name} of {total} bytes is not a whole number of sectors")
    if len(data) > seg_max:
        raise SegmentsInvalid(f"{len(data)} data segments, seg_max is {seg_max}")
    if any(d.length > size_max for d in data):
        raise SegmentsInvalid(f"a data segment is larger than size_max {size_max}")
    if sector > capacity or (total >> SECTOR_SHIFT) > capacity - sector:
        raise SectorOutOfRange(f"sectors {sector}+{total >> SECTOR_SHIFT} past capacity {capacity}")
    return Request(rtype, sector, data, status.addr)

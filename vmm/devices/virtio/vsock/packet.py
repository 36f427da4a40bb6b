"""virtio-vsock packets: the 44-byte header, TX chains parsed, RX chains filled (virtio 1.1 §5.10.6).

Primer. Every vsock packet, in either direction, is one descriptor chain
holding a header and, for data packets (op RW), the payload right after it:

    struct virtio_vsock_hdr {          // little-endian, packed: 44 bytes
        le64 src_cid;  le64 dst_cid;
        le32 src_port; le32 dst_port;
        le32 len;                      // payload bytes after the header
        le16 type;                     // VIRTIO_VSOCK_TYPE_STREAM (1)
        le16 op;                       // REQUEST RESPONSE RST SHUTDOWN RW CREDIT_UPDATE CREDIT_REQUEST
        le32 flags;                    // SHUTDOWN: RCV (1) / SEND (2)
        le32 buf_alloc;                // the sender's receive buffer for this connection
        le32 fwd_cnt;                  // bytes the sender has taken out of that buffer (free-running)
    };

The driver lays the bytes out as it likes: Linux puts header and payload in
one descriptor (newer kernels) or in two (older ones, and many small
drivers). Both directions are therefore treated as one byte stream over the
chain's buffers, header first.

* A TX chain (driver → device) must be device-readable throughout; it must
  hold the whole header, `len` may not exceed `MAX_PKT_BUF_SIZE` (64 KiB, as
  Firecracker), and the chain must hold `len` payload bytes after the header
  (extra bytes are ignored). The payload is copied out (at most 64 KiB).
* An RX chain (device → driver) must be device-writable throughout and hold
  at least the header; the payload it can take is its length minus 44,
  capped at `MAX_PKT_BUF_SIZE`.

The queue has already checked that every buffer lies inside guest memory and
that the chain is bounded by the queue size; this module checks the rest and
raises a `PacketError` (never anything else) for a malformed chain, so the
device can drop it, count it and answer with RST where a connection is
known (`PacketError.header` is the header when it could be read).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from typing import Sequence

from vmm.devices.virtio.queue import Descriptor
from vmm.memory import GuestMemory, GuestMemoryError

__all__ = [
    "VIRTIO_VSOCK_TYPE_STREAM",
    "VIRTIO_VSOCK_OP_INVALID",
    "VIRTIO_VSOCK_OP_REQUEST",
    "VIRTIO_VSOCK_OP_RESPONSE",
    "VIRTIO_VSOCK_OP_RST",
    "VIRTIO_VSOCK_OP_SHUTDOWN",
    "VIRTIO_VSOCK_OP_RW",
    "VIRTIO_VSOCK_OP_CREDIT_UPDATE",
    "VIRTIO_VSOCK_OP_CREDIT_REQUEST",
    "VIRTIO_VSOCK_SHUTDOWN_RCV",
    "VIRTIO_VSOCK_SHUTDOWN_SEND",
    "VMADDR_CID_HOST",
    "VSOCK_PKT_HDR_SIZE",
    "MAX_PKT_BUF_SIZE",
    "OP_NAMES",
    "PacketError",
    "PacketUnreadable",
    "TxDescriptorWritable",
    "HeaderTooShort",
    "PacketTooLong",
    "PayloadTooShort",
    "RxDescriptorReadOnly",
    "RxBufferTooShort",
    "PacketHeader",
    "TxPacket",
    "RxBuffer",
    "parse_tx_packet",
    "parse_rx_buffer",
]

# virtio 1.1 §5.10.6 "Device Operation": the only socket type.
VIRTIO_VSOCK_TYPE_STREAM = 1

# virtio 1.1 §5.10.6: packet operations.
VIRTIO_VSOCK_OP_INVALID = 0
VIRTIO_VSOCK_OP_REQUEST = 1
VIRTIO_VSOCK_OP_RESPONSE = 2
VIRTIO_VSOCK_OP_RST = 3
VIRTIO_VSOCK_OP_SHUTDOWN = 4
VIRTIO_VSOCK_OP_RW = 5
VIRTIO_VSOCK_OP_CREDIT_UPDATE = 6
VIRTIO_VSOCK_OP_CREDIT_REQUEST = 7

# virtio 1.1 §5.10.6: SHUTDOWN flags ("the sender will receive / send no more data").
VIRTIO_VSOCK_SHUTDOWN_RCV = 1
VIRTIO_VSOCK_SHUTDOWN_SEND = 2

# linux/vm_sockets.h: the host's well-known CID.
VMADDR_CID_HOST = 2

# virtio 1.1 §5.10.6: struct virtio_vsock_hdr, packed.
_HDR = struct.Struct("<QQIIIHHIII")
VSOCK_PKT_HDR_SIZE = _HDR.size
assert VSOCK_PKT_HDR_SIZE == 44

# Firecracker's MAX_PKT_BUF_SIZE (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE): the largest payload either way.
MAX_PKT_BUF_SIZE = 64 * 1024

OP_NAMES = {
    VIRTIO_VSOCK_OP_INVALID: "INVALID",
    VIRTIO_VSOCK_OP_REQUEST: "REQUEST",
    VIRTIO_VSOCK_OP_RESPONSE: "RESPONSE",
    VIRTIO_VSOCK_OP_RST: "RST",
    VIRTIO_VSOCK_OP_SHUTDOWN: "SHUTDOWN",
    VIRTIO_VSOCK_OP_RW: "RW",
    VIRTIO_VSOCK_OP_CREDIT_UPDATE: "CREDIT_UPDATE",
    VIRTIO_VSOCK_OP_CREDIT_REQUEST: "CREDIT_REQUEST",
}


@dataclass(frozen=True, slots=True)
class PacketHeader:
    """A `struct virtio_vsock_hdr`; every field is an unsigned integer of its C width."""

    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int

    def pack(self) -> bytes:
        return _HDR.pack(self.src_cid, self.dst_cid, self.src_port, self.dst_port, self.len, self.type,
                         self.op, self.flags, self.buf_alloc, self.fwd_cnt)

    @classmethod
    def unpack(cls, raw: bytes) -> PacketHeader:
        """The header in the first 44 bytes of `raw` (which must hold at least that many)."""
        return cls(*_HDR.unpack_from(raw))

    def with_len(self, length: int) -> PacketHeader:
        return replace(self, len=length)

    @property
    def op_name(self) -> str:
        return OP_NAMES.get(self.op, f"op{self.op}")

    def __repr__(self) -> str:
        return (f"<PacketHeader {self.op_name} {self.src_cid}:{self.src_port}->{self.dst_cid}:{self.dst_port} "
                f"len={self.len} type={self.type} flags={self.flags:#x} buf_alloc={self.buf_alloc} "
                f"fwd_cnt={self.fwd_cnt}>")


class PacketError(Exception):
    """The guest gave a malformed vsock packet chain."""

    def __init__(self, message: str, header: PacketHeader | None = None):
        super().__init__(message)
        self.header = header


class PacketUnreadable(PacketError):
    """A packet buffer could not be accessed in guest memory."""


class TxDescriptorWritable(PacketError):
    """A TX packet chain contains a device-writable descriptor."""


class HeaderTooShort(PacketError):
    """A TX packet chain is shorter than the 44-byte header."""


class PacketTooLong(PacketError):
    """A TX packet header announces more payload than MAX_PKT_BUF_SIZE."""


class PayloadTooShort(PacketError):
    """A TX packet chain holds fewer payload bytes than its header announces."""


class RxDescriptorReadOnly(PacketError):
    """An RX buffer chain contains a device-readable descriptor."""


class RxBufferTooShort(PacketError):
    """An RX buffer chain cannot hold the 44-byte header."""


@dataclass(frozen=True, slots=True, repr=False)
class TxPacket:
    """A packet the driver sent: its header and exactly `header.len` payload bytes."""

    header: PacketHeader
    data: bytes

    def __repr__(self) -> str:
        return f"<TxPacket {self.header!r} data={len(self.data)} bytes>"


def _gather(mem: GuestMemory, descriptors: Sequence[Descriptor], start: int, count: int) -> bytes:
    """`count` bytes of the chain's byte stream from offset `start` (the chain holds them)."""
    out = bytearray()
    offset = 0
    for d in descriptors:
        if len(out) == count:
            break
        end = offset + d.length
        if end > start:
            skip = max(0, start - offset)
            take = min(d.length - skip, count - len(out))
            try:
                out += mem.read(d.addr + skip, take)
            except GuestMemoryError as exc:  # the queue checked the range; only a changed memory map gets here
                raise PacketUnreadable(f"packet buffer at {d.addr + skip:#x} is unreadable") from exc
        offset = end
    return bytes(out)


def parse_tx_packet(descriptors: Sequence[Descriptor], mem: GuestMemory) -> TxPacket:
    """Read a driver-to-device packet from a validated chain; raises a `PacketError`."""
    total = 0
    for d in descriptors:
        if d.is_write_only:
            raise TxDescriptorWritable(f"TX descriptor at {d.addr:#x} is device-writable")
        total += d.length
    if total < VSOCK_PKT_HDR_SIZE:
        raise HeaderTooShort(f"TX chain of {total} bytes cannot hold the {VSOCK_PKT_HDR_SIZE}-byte header")
    header = PacketHeader.unpack(_gather(mem, descriptors, 0, VSOCK_PKT_HDR_SIZE))
    if header.len > MAX_PKT_BUF_SIZE:
        raise PacketTooLong(f"TX packet announces {header.len} payload bytes, at most {MAX_PKT_BUF_SIZE}", header)
    if header.len > total - VSOCK_PKT_HDR_SIZE:
        raise PayloadTooShort(
            f"TX packet announces {header.len} payload bytes, the chain holds {total - VSOCK_PKT_HDR_SIZE}", header)
    data = _gather(mem, descriptors, VSOCK_PKT_HDR_SIZE, header.len) if header.len else b""
    return TxPacket(header, data)


@dataclass(frozen=True, slots=True)
class RxBuffer:
    """A driver-provided, device-writable chain that can take one packet of up to `capacity` payload bytes."""

    descriptors: tuple[Descriptor, ...]
    capacity: int

    def write(self, mem: GuestMemory, header: PacketHeader, data: bytes = b"") -> int:
        """Write `header` (its `len` set to `len(data)`) and `data`; returns the bytes written (the used length).

        `data` must fit `capacity` (the caller asked for at most that much).
        """
        if len(data) > self.capacity:
            raise ValueError(f"{len(data)} payload bytes for an RX buffer of {self.capacity}")
        payload = header.with_len(len(data)).pack() + data
        done = 0
        for d in self.descriptors:
            if done == len(payload):
                break
            chunk = payload[done:done + d.length]
            try:
                mem.write(d.addr, chunk)
            except GuestMemoryError as exc:  # the queue checked the range; only a changed memory map gets here
                raise PacketUnreadable(f"RX buffer at {d.addr:#x} is not writable memory") from exc
            done += len(chunk)
        return done


def parse_rx_buffer(descriptors: Sequence[Descriptor]) -> RxBuffer:
    """Check a device-to-driver buffer chain; raises a `PacketError`."""
    total = 0
    for d in descriptors:
        if not d.is_write_only:
            raise RxDescriptorReadOnly(f"RX descriptor at {d.addr:#x} is device-readable")
        total += d.length
    if total < VSOCK_PKT_HDR_SIZE:
        raise RxBufferTooShort(f"RX chain of {total} bytes cannot hold the {VSOCK_PKT_HDR_SIZE}-byte header")
    return RxBuffer(tuple(descriptors), min(total - VSOCK_PKT_HDR_SIZE, MAX_PKT_BUF_SIZE))

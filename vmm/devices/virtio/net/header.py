"""The virtio-net header (virtio 1.1 §5.1.6) and the offload rules applied to it.

Primer. Every packet on a virtio-net queue starts with a 12-byte header
(with VIRTIO_F_VERSION_1 the `num_buffers` field is always present):

    u8 flags;        NEEDS_CSUM: the L4 checksum is partial, finish it from csum_start
                     DATA_VALID: (device -> driver) the checksum was verified
    u8 gso_type;     NONE, TCPV4, UDP, TCPV6, optionally | ECN: a segmentation-offload super-packet
    le16 hdr_len;    length of the L2-L4 headers (a GSO hint)
    le16 gso_size;   segment size for GSO
    le16 csum_start; where the partial checksum's coverage begins
    le16 csum_offset; where, from csum_start, the checksum field lies
    le16 num_buffers; (device -> driver) how many buffers this packet spans (1 without MRG_RXBUF)

The Ethernet frame follows. The host TAP is opened with IFF_VNET_HDR and a
12-byte header size, so the kernel speaks the same header on the other side:
the device copies it through, after checking it against what was negotiated
(a driver may only ask for offloads the device offered and it accepted, and
the TAP only produces those it was told the guest takes, TUNSETOFFLOAD).

The checks here are pure: bytes in, bytes out or a `HeaderError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "VIRTIO_NET_HDR_F_NEEDS_CSUM",
    "VIRTIO_NET_HDR_F_DATA_VALID",
    "VIRTIO_NET_HDR_F_RSC_INFO",
    "VIRTIO_NET_HDR_GSO_NONE",
    "VIRTIO_NET_HDR_GSO_TCPV4",
    "VIRTIO_NET_HDR_GSO_UDP",
    "VIRTIO_NET_HDR_GSO_TCPV6",
    "VIRTIO_NET_HDR_GSO_ECN",
    "VNET_HDR_LEN",
    "ETH_HLEN",
    "MAX_BUFFER_SIZE",
    "MAX_FRAME_LEN",
    "HeaderError",
    "HeaderTooShort",
    "ChecksumNotNegotiated",
    "GsoNotNegotiated",
    "ChecksumOutOfRange",
    "NetHeader",
    "OffloadPolicy",
    "check_tx_header",
    "check_rx_header",
    "set_num_buffers",
    "finish_checksum",
]

# virtio 1.1 §5.1.6 "Device Operation": struct virtio_net_hdr flags and gso_type.
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_F_RSC_INFO = 4
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_ECN = 0x80

_HDR = struct.Struct("<BBHHHHH")
# virtio 1.1 §5.1.6: with VIRTIO_F_VERSION_1 the header always has num_buffers: 12 bytes.
VNET_HDR_LEN = _HDR.size
# IEEE 802.3 §3.1.1: destination, source, EtherType.
ETH_HLEN = 14
# Firecracker devices/virtio/net/mod.rs MAX_BUFFER_SIZE: the largest packet (header included)
# the device moves in either direction, a 64 KiB GSO super-packet plus its headers.
MAX_BUFFER_SIZE = 65562
MAX_FRAME_LEN = MAX_BUFFER_SIZE - VNET_HDR_LEN

_NUM_BUFFERS_OFFSET = 10


class HeaderError(Exception):
    """A virtio-net header is missing or asks for something that was not negotiated."""


class HeaderTooShort(HeaderError):
    """A packet is shorter than the virtio-net header plus an Ethernet header."""


class ChecksumNotNegotiated(HeaderError):
    """NEEDS_CSUM is set but checksum offload was not negotiated for this direction."""


class GsoNotNegotiated(HeaderError):
    """The header asks for a segmentation offload that was not negotiated for this direction."""


class ChecksumOutOfRange(HeaderError):
    """csum_start/csum_offset point outside the frame."""


@dataclass(frozen=True, slots=True)
class NetHeader:
    """struct virtio_net_hdr (virtio 1.1 §5.1.6), VERSION_1 layout."""

    flags: int = 0
    gso_type: int = VIRTIO_NET_HDR_GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> NetHeader:
        if len(data) < VNET_HDR_LEN:
            raise HeaderTooShort(f"{len(data)} bytes, the header has {VNET_HDR_LEN}")
        return cls(*_HDR.unpack_from(data))

    def pack(self) -> bytes:
        return _HDR.pack(self.flags, self.gso_type, self.hdr_len, self.gso_size, self.csum_start,
                         self.csum_offset, self.num_buffers)


@dataclass(frozen=True, slots=True)
class OffloadPolicy:
    """What one direction's headers may ask for: partial checksums and which GSO types.

    TX (driver -> device): from VIRTIO_NET_F_CSUM and HOST_TSO4/TSO6/UFO.
    RX (device -> driver): from VIRTIO_NET_F_GUEST_CSUM and GUEST_TSO4/TSO6/UFO.
    """

    csum: bool = False
    gso_types: frozenset[int] = frozenset()

    def allows_gso(self, gso_type: int) -> bool:
        return gso_type == VIRTIO_NET_HDR_GSO_NONE or gso_type in self.gso_types


def _check_offloads(header: NetHeader, policy: OffloadPolicy, frame_len: int) -> None:
    if header.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
        if not policy.csum:
            raise ChecksumNotNegotiated("NEEDS_CSUM without checksum offload")
        if header.csum_start + header.csum_offset + 2 > frame_len:
            raise ChecksumOutOfRange(f"checksum at {header.csum_start}+{header.csum_offset} "
                                     f"is outside a {frame_len}-byte frame")
    if not policy.allows_gso(header.gso_type):
        raise GsoNotNegotiated(f"gso_type {header.gso_type:#x} was not negotiated")


def check_tx_header(packet: bytes | bytearray | memoryview, policy: OffloadPolicy) -> bytes:
    """The header to hand the TAP for a packet the driver transmitted, or a `HeaderError`.

    `packet` is the whole buffer (header, then frame). NEEDS_CSUM and GSO
    are kept only if negotiated, otherwise the packet is refused (§5.1.6.2.1:
    the driver MUST NOT set them); DATA_VALID and RSC_INFO, which only the
    device may set, are cleared, and so is the reserved num_buffers.
    """
    if len(packet) < VNET_HDR_LEN + ETH_HLEN:
        raise HeaderTooShort(f"a {len(packet)}-byte packet has no room for the virtio-net and Ethernet headers")
    header = NetHeader.unpack(packet)
    _check_offloads(header, policy, len(packet) - VNET_HDR_LEN)
    if header.gso_type != VIRTIO_NET_HDR_GSO_NONE and not header.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
        # §5.1.6.2.1: a driver's GSO packet MUST also have NEEDS_CSUM. (A host packet may
        # instead carry DATA_VALID, e.g. one the host received already coalesced.)
        raise GsoNotNegotiated(f"gso_type {header.gso_type:#x} without NEEDS_CSUM")
    return NetHeader(header.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM, header.gso_type, header.hdr_len,
                     header.gso_size, header.csum_start, header.csum_offset, 0).pack()


def check_rx_header(packet: bytes | bytearray | memoryview, policy: OffloadPolicy, num_buffers: int) -> bytes:
    """The header to give the driver for a packet read from the TAP, or a `HeaderError`.

    A partial checksum or a GSO type the driver did not negotiate cannot be
    delivered (the TAP was told not to produce them, so this is a safety
    net); DATA_VALID is passed on only with GUEST_CSUM (§5.1.6.4.1).
    `num_buffers` is set as given (1 without MRG_RXBUF, §5.1.6.4.1): the
    kernel does not write that field.
    """
    if len(packet) < VNET_HDR_LEN + ETH_HLEN:
        raise HeaderTooShort(f"a {len(packet)}-byte packet has no room for the virtio-net and Ethernet headers")
    header = NetHeader.unpack(packet)
    _check_offloads(header, policy, len(packet) - VNET_HDR_LEN)
    keep = VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID if policy.csum else 0
    return NetHeader(header.flags & keep, header.gso_type, header.hdr_len, header.gso_size,
                     header.csum_start, header.csum_offset, num_buffers).pack()


def set_num_buffers(header: bytearray, num_buffers: int) -> None:
    """Store `num_buffers` in a packed header, in place."""
    struct.pack_into("<H", header, _NUM_BUFFERS_OFFSET, num_buffers)


def _ones_complement_sum(data: bytes | memoryview) -> int:
    """RFC 1071 sum of big-endian 16-bit words, folded to 16 bits.

    2**16 is 1 modulo 0xFFFF, so the words' sum is congruent to the whole
    buffer read as one big-endian integer: one C-level reduction instead of
    a Python loop. Ones'-complement arithmetic has two zeros; a non-empty
    sum that reduces to 0 is 0xFFFF.
    """
    if len(data) % 2:
        data = bytes(data) + b"\0"
    value = int.from_bytes(data, "big")
    if value == 0:
        return 0
    folded = value % 0xFFFF
    return folded or 0xFFFF


def finish_checksum(header: bytes | bytearray | memoryview, frame: bytes | bytearray | memoryview) -> bytes:
    """`frame` with a NEEDS_CSUM partial checksum completed, as a device without offload would.

    The driver left the pseudo-header sum in the checksum field; the device
    sums from csum_start to the end and stores the complement at
    csum_start + csum_offset (§5.1.6.2). Frames without NEEDS_CSUM come back
    unchanged. `header` must have passed `check_tx_header` (offsets in range).
    """
    hdr = NetHeader.unpack(header)
    if not hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
        return bytes(frame)
    out = bytearray(frame)
    field = hdr.csum_start + hdr.csum_offset
    if field + 2 > len(out):
        raise ChecksumOutOfRange(f"checksum field at {field} is outside a {len(out)}-byte frame")
    checksum = ~_ones_complement_sum(memoryview(out)[hdr.csum_start:]) & 0xFFFF
    struct.pack_into(">H", out, field, checksum)
    return bytes(out)

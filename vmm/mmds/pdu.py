"""Protocol data units the MMDS speaks: Ethernet II, ARP, IPv4 and TCP.

Primer. A guest frame on a virtio-net TX queue is an Ethernet II frame
(IEEE 802.3 §3.1.1): destination MAC (6), source MAC (6), EtherType (2),
payload. EtherType 0x0806 carries ARP (RFC 826): "who has IPv4 address
X?", answered by "X is at MAC M". EtherType 0x0800 carries IPv4 (RFC 791
§3.1): a 20-byte header (plus options when IHL > 5) with total length,
fragmentation fields, protocol, a ones'-complement header checksum and the
addresses. Protocol 6 is TCP (RFC 9293 §3.1): ports, sequence and
acknowledgement numbers, data offset, flags, window, a checksum over a
pseudo-header (addresses, protocol, length) plus the whole segment, and
options (only MSS matters here).

Parsers take untrusted bytes and either return a frozen view of the fields
or raise a `PduError`; they never index past the data. Builders compute
lengths and checksums. All multi-byte fields are big-endian (network order).
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass

__all__ = [
    "PduError",
    "TruncatedPdu",
    "UnsupportedPdu",
    "BadLength",
    "BadChecksum",
    "BadTcpOption",
    "MacAddr",
    "EthernetFrame",
    "ArpPacket",
    "Ipv4Packet",
    "TcpSegment",
    "TcpFlags",
    "internet_checksum",
    "build_ethernet",
    "build_ipv4",
    "build_tcp",
    "is_frame_to",
    "ETH_HLEN",
    "ETHERTYPE_ARP",
    "ETHERTYPE_IPV4",
    "ARP_ETH_IPV4_LEN",
    "ARP_OPER_REQUEST",
    "ARP_OPER_REPLY",
    "IPV4_MIN_HEADER_LEN",
    "IPPROTO_TCP",
    "TCP_MIN_HEADER_LEN",
    "TCP_OPTION_LEN_MSS",
]

# IEEE 802.3 §3.1.1: dst MAC, src MAC, EtherType. 802.1Q tags are not supported.
ETH_HLEN = 14
MAC_LEN = 6
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806

# RFC 826 (and RFC 5227 for the field names): IPv4 over Ethernet.
ARP_HTYPE_ETHERNET = 1
ARP_OPER_REQUEST = 1
ARP_OPER_REPLY = 2
ARP_ETH_IPV4_LEN = 28
ARP_TPA_OFFSET = 24

# RFC 791 §3.1.
IPV4_VERSION = 4
IPV4_MIN_HEADER_LEN = 20
IPV4_DST_OFFSET = 16
IPV4_FLAG_DF = 0x4000
IPV4_FLAG_MF = 0x2000
IPV4_FRAGMENT_OFFSET_MASK = 0x1FFF
IPPROTO_TCP = 6

# RFC 9293 §3.1 and §3.2 (options).
TCP_MIN_HEADER_LEN = 20
TCP_OPTION_EOL = 0
TCP_OPTION_NOP = 1
TCP_OPTION_MSS = 2
TCP_OPTION_LEN_MSS = 4

_ETH = struct.Struct("!6s6sH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_TCP = struct.Struct("!HHIIBBHHH")
_PSEUDO = struct.Struct("!4s4sBBH")


class PduError(Exception):
    """The bytes are not a valid protocol data unit."""


class TruncatedPdu(PduError):
    """The bytes are shorter than the header they must hold."""


class UnsupportedPdu(PduError):
    """The header names a protocol variant that is not handled."""


class BadLength(PduError):
    """A length field disagrees with the bytes present."""


class BadChecksum(PduError):
    """The checksum does not verify."""


class BadTcpOption(PduError):
    """A TCP option is malformed."""


class MacAddr(bytes):
    """A 6-byte Ethernet address that prints as ``06:01:23:45:67:01``."""

    def __new__(cls, value: bytes | str) -> MacAddr:
        raw = bytes.fromhex(value.replace(":", "")) if isinstance(value, str) else bytes(value)
        if len(raw) != MAC_LEN:
            raise ValueError(f"a MAC address has {MAC_LEN} bytes, got {len(raw)}")
        return super().__new__(cls, raw)

    def __str__(self) -> str:
        return ":".join(f"{b:02x}" for b in self)

    def __repr__(self) -> str:
        return f"MacAddr('{self}')"


def internet_checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """RFC 1071 ones'-complement sum of 16-bit words, complemented.

    Over data that already contains a correct checksum the result is 0.
    `initial` is a partial (uncomplemented) sum, e.g. of a pseudo-header.
    """
    view = bytes(data)
    if len(view) % 2:
        view += b"\0"
    total = initial + sum(struct.unpack(f"!{len(view) // 2}H", view))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _pseudo_header_sum(src: ipaddress.IPv4Address, dst: ipaddress.IPv4Address, protocol: int, length: int) -> int:
    """RFC 9293 §3.1: the TCP checksum also covers src, dst, zero, protocol, TCP length."""
    return sum(struct.unpack("!6H", _PSEUDO.pack(src.packed, dst.packed, 0, protocol, length)))


def is_frame_to(frame: bytes | bytearray | memoryview, ipv4: ipaddress.IPv4Address) -> bool:
    """Does `frame` look addressed to `ipv4`: ARP with that target, or IPv4 with that destination?

    Firecracker's speculative test: looks only at fixed offsets, no other
    validation, so a malformed frame for that address still answers True.
    """
    if len(frame) < ETH_HLEN:
        return False
    ethertype = int.from_bytes(frame[12:14], "big")
    if ethertype == ETHERTYPE_ARP:
        offset = ETH_HLEN + ARP_TPA_OFFSET
        return len(frame) >= ETH_HLEN + ARP_ETH_IPV4_LEN and bytes(frame[offset : offset + 4]) == ipv4.packed
    if ethertype == ETHERTYPE_IPV4:
        offset = ETH_HLEN + IPV4_DST_OFFSET
        return len(frame) >= ETH_HLEN + IPV4_MIN_HEADER_LEN and bytes(frame[offset : offset + 4]) == ipv4.packed
    return False


# --- Ethernet ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EthernetFrame:
    dst: MacAddr
    src: MacAddr
    ethertype: int
    payload: bytes

    @classmethod
    def parse(cls, frame: bytes | bytearray | memoryview) -> EthernetFrame:
        if len(frame) < ETH_HLEN:
            raise TruncatedPdu("Ethernet frame shorter than its header")
        dst, src, ethertype = _ETH.unpack_from(frame)
        return cls(MacAddr(dst), MacAddr(src), ethertype, bytes(frame[ETH_HLEN:]))


def build_ethernet(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return _ETH.pack(dst, src, ethertype) + payload


# --- ARP -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ArpPacket:
    """An ARP packet for IPv4 over Ethernet."""

    oper: int
    sha: MacAddr
    spa: ipaddress.IPv4Address
    tha: MacAddr
    tpa: ipaddress.IPv4Address

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> ArpPacket:
        """Trailing bytes (Ethernet padding to 60 bytes) are ignored."""
        if len(data) < ARP_ETH_IPV4_LEN:
            raise TruncatedPdu("ARP packet shorter than 28 bytes")
        htype, ptype, hlen, plen, oper, sha, spa, tha, tpa = _ARP.unpack_from(data)
        if (htype, ptype, hlen, plen) != (ARP_HTYPE_ETHERNET, ETHERTYPE_IPV4, MAC_LEN, 4):
            raise UnsupportedPdu("ARP packet is not IPv4 over Ethernet")
        return cls(oper, MacAddr(sha), ipaddress.IPv4Address(spa), MacAddr(tha), ipaddress.IPv4Address(tpa))

    def to_bytes(self) -> bytes:
        return _ARP.pack(
            ARP_HTYPE_ETHERNET,
            ETHERTYPE_IPV4,
            MAC_LEN,
            4,
            self.oper,
            self.sha,
            self.spa.packed,
            self.tha,
            self.tpa.packed,
        )


# --- IPv4 ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ipv4Packet:
    header_len: int
    total_len: int
    ident: int
    flags_fragment: int
    ttl: int
    protocol: int
    src: ipaddress.IPv4Address
    dst: ipaddress.IPv4Address
    payload: bytes

    @property
    def has_options(self) -> bool:
        return self.header_len > IPV4_MIN_HEADER_LEN

    @property
    def is_fragment(self) -> bool:
        """More fragments follow, or this is not the first one."""
        return bool(self.flags_fragment & (IPV4_FLAG_MF | IPV4_FRAGMENT_OFFSET_MASK))

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> Ipv4Packet:
        """Validates version, lengths and the header checksum.

        Bytes past ``total length`` (Ethernet padding) are dropped; fewer
        bytes than ``total length`` is an error.
        """
        if len(data) < IPV4_MIN_HEADER_LEN:
            raise TruncatedPdu("IPv4 packet shorter than its header")
        vihl, _tos, total_len, ident, flags_fragment, ttl, protocol, _csum, src, dst = _IPV4.unpack_from(data)
        if vihl >> 4 != IPV4_VERSION:
            raise UnsupportedPdu("IP version is not 4")
        header_len = (vihl & 0x0F) * 4
        if header_len < IPV4_MIN_HEADER_LEN:
            raise BadLength("IPv4 header length below 20 bytes")
        if total_len < header_len or total_len > len(data):
            raise BadLength("IPv4 total length disagrees with the packet")
        if internet_checksum(data[:header_len]) != 0:
            raise BadChecksum("IPv4 header checksum")
        return cls(
            header_len,
            total_len,
            ident,
            flags_fragment,
            ttl,
            protocol,
            ipaddress.IPv4Address(src),
            ipaddress.IPv4Address(dst),
            bytes(data[header_len:total_len]),
        )


def build_ipv4(
    src: ipaddress.IPv4Address,
    dst: ipaddress.IPv4Address,
    protocol: int,
    payload: bytes,
    *,
    ttl: int,
    ident: int = 0,
) -> bytes:
    """An option-less IPv4 packet with Don't Fragment set and its checksum filled in."""
    total_len = IPV4_MIN_HEADER_LEN + len(payload)
    if total_len > 0xFFFF:
        raise ValueError("IPv4 packet larger than 65535 bytes")
    header = bytearray(
        _IPV4.pack(
            (IPV4_VERSION << 4) | (IPV4_MIN_HEADER_LEN // 4),
            0,
            total_len,
            ident,
            IPV4_FLAG_DF,
            ttl,
            protocol,
            0,
            src.packed,
            dst.packed,
        )
    )
    struct.pack_into("!H", header, 10, internet_checksum(header))
    return bytes(header) + payload


# --- TCP -----------------------------------------------------------------------------


class TcpFlags(enum.IntFlag):
    """RFC 9293 §3.1 control bits (the byte after the data offset)."""

    FIN = 0x01
    SYN = 0x02
    RST = 0x04
    PSH = 0x08
    ACK = 0x10
    URG = 0x20
    ECE = 0x40
    CWR = 0x80


@dataclass(frozen=True, slots=True)
class TcpSegment:
    src_port: int
    dst_port: int
    seq: int
    ack: int
    flags: TcpFlags
    window: int
    options: bytes
    payload: bytes

    @property
    def seg_len(self) -> int:
        """RFC 9293 §3.4 SEG.LEN: payload octets, plus one each for SYN and FIN."""
        return len(self.payload) + bool(self.flags & TcpFlags.SYN) + bool(self.flags & TcpFlags.FIN)

    @classmethod
    def parse(
        cls,
        data: bytes | bytearray | memoryview,
        src: ipaddress.IPv4Address,
        dst: ipaddress.IPv4Address,
        *,
        verify_checksum: bool = True,
    ) -> TcpSegment:
        if len(data) < TCP_MIN_HEADER_LEN:
            raise TruncatedPdu("TCP segment shorter than its header")
        src_port, dst_port, seq, ack, offset, flags, window, _csum, _urg = _TCP.unpack_from(data)
        header_len = (offset >> 4) * 4
        if header_len < TCP_MIN_HEADER_LEN or header_len > len(data):
            raise BadLength("TCP data offset disagrees with the segment")
        if verify_checksum:
            pseudo = _pseudo_header_sum(src, dst, IPPROTO_TCP, len(data))
            if internet_checksum(data, pseudo) != 0:
                raise BadChecksum("TCP checksum")
        return cls(
            src_port,
            dst_port,
            seq,
            ack,
            TcpFlags(flags),
            window,
            bytes(data[TCP_MIN_HEADER_LEN:header_len]),
            bytes(data[header_len:]),
        )

    def mss_option(self) -> int | None:
        """The MSS option value, or None if absent; `BadTcpOption` if malformed."""
        opts = self.options
        i = 0
        while i < len(opts):
            kind = opts[i]
            if kind == TCP_OPTION_EOL:
                return None
            if kind == TCP_OPTION_NOP:
                i += 1
                continue
            if i + 1 >= len(opts):
                raise BadTcpOption("TCP option without a length")
            length = opts[i + 1]
            if length < 2 or i + length > len(opts):
                raise BadTcpOption("TCP option length out of bounds")
            if kind == TCP_OPTION_MSS:
                if length != TCP_OPTION_LEN_MSS:
                    raise BadTcpOption("TCP MSS option length is not 4")
                return int.from_bytes(opts[i + 2 : i + 4], "big")
            i += length
        return None


def build_tcp(
    src: ipaddress.IPv4Address,
    dst: ipaddress.IPv4Address,
    src_port: int,
    dst_port: int,
    seq: int,
    ack: int,
    flags: TcpFlags,
    window: int,
    payload: bytes = b"",
    *,
    mss: int | None = None,
) -> bytes:
    """A TCP segment with the checksum filled in; `mss` adds the MSS option."""
    options = struct.pack("!BBH", TCP_OPTION_MSS, TCP_OPTION_LEN_MSS, mss) if mss is not None else b""
    header_len = TCP_MIN_HEADER_LEN + len(options)
    segment = bytearray(
        _TCP.pack(src_port, dst_port, seq, ack, (header_len // 4) << 4, int(flags), window, 0, 0)
    )
    segment += options
    segment += payload
    pseudo = _pseudo_header_sum(src, dst, IPPROTO_TCP, len(segment))
    struct.pack_into("!H", segment, 16, internet_checksum(segment, pseudo))
    return bytes(segment)

"""Frame parsing and building, checked against the independent builder in `packets`."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from vmm.mmds.pdu import (
    ArpPacket,
    BadChecksum,
    BadLength,
    BadTcpOption,
    EthernetFrame,
    Ipv4Packet,
    MacAddr,
    TcpFlags,
    TcpSegment,
    TruncatedPdu,
    UnsupportedPdu,
    build_ipv4,
    build_tcp,
    internet_checksum,
    is_frame_to,
)

from . import packets as p

GUEST = ipaddress.IPv4Address(p.GUEST_IP)
MMDS = ipaddress.IPv4Address(p.MMDS_IP)


def test_internet_checksum_rfc1071_example() -> None:
    # RFC 1071 §3: the sum of 0001 f203 f4f5 f6f7 is ddf2 (before complement).
    assert internet_checksum(bytes.fromhex("0001f203f4f5f6f7")) == ~0xDDF2 & 0xFFFF
    assert internet_checksum(b"\x01") == p.csum(b"\x01")
    assert internet_checksum(b"") == 0xFFFF


def test_mac_addr() -> None:
    mac = MacAddr("06:01:23:45:67:01")
    assert mac == bytes.fromhex("060123456701") and str(mac) == "06:01:23:45:67:01"
    assert MacAddr(bytes(mac)) == mac
    with pytest.raises(ValueError):
        MacAddr(b"\x00" * 5)


def test_ethernet_parse() -> None:
    frame = p.eth(b"payload", ethertype=0x86DD)
    eth = EthernetFrame.parse(frame)
    assert (eth.dst, eth.src, eth.ethertype, eth.payload) == (p.MMDS_MAC, p.GUEST_MAC, 0x86DD, b"payload")
    with pytest.raises(TruncatedPdu):
        EthernetFrame.parse(frame[:13])


def test_arp_parse_and_build_round_trip() -> None:
    raw = p.arp(1, p.GUEST_MAC, p.GUEST_IP, b"\0" * 6, p.MMDS_IP)
    packet = ArpPacket.parse(raw + b"\0" * 18)  # Ethernet padding is ignored
    assert (packet.oper, packet.sha, packet.spa, packet.tpa) == (1, p.GUEST_MAC, GUEST, MMDS)
    assert packet.to_bytes() == raw
    with pytest.raises(TruncatedPdu):
        ArpPacket.parse(raw[:27])
    with pytest.raises(UnsupportedPdu):
        ArpPacket.parse(struct.pack("!H", 6) + raw[2:])


def test_ipv4_parse() -> None:
    raw = p.ipv4(b"x" * 10, proto=17)
    packet = Ipv4Packet.parse(raw + b"\0" * 6)  # trailing padding dropped
    assert (packet.src, packet.dst, packet.protocol, packet.payload) == (GUEST, MMDS, 17, b"x" * 10)
    assert not packet.has_options and not packet.is_fragment
    assert Ipv4Packet.parse(p.ipv4(b"", options=b"\x01" * 4)).has_options
    assert Ipv4Packet.parse(p.ipv4(b"", flags_frag=0x2000)).is_fragment
    assert Ipv4Packet.parse(p.ipv4(b"", flags_frag=0x0001)).is_fragment
    assert not Ipv4Packet.parse(p.ipv4(b"", flags_frag=0x4000)).is_fragment


@pytest.mark.parametrize(
    "raw,error",
    [
        (p.ipv4(b"abc")[:19], TruncatedPdu),
        (b"\x65" + p.ipv4(b"abc")[1:], UnsupportedPdu),
        (p.ipv4(b"abc", total_len=100), BadLength),
        (p.ipv4(b"abc", total_len=10), BadLength),
        (p.ipv4(b"abc")[:10] + b"\0\0" + p.ipv4(b"abc")[12:], BadChecksum),
    ],
)
def test_ipv4_rejects(raw: bytes, error: type) -> None:
    with pytest.raises(error):
        Ipv4Packet.parse(raw)


def test_ipv4_header_length_below_20_is_rejected() -> None:
    raw = bytearray(p.ipv4(b"abc"))
    raw[0] = 0x44
    raw[10:12] = b"\0\0"
    raw[10:12] = struct.pack("!H", p.csum(bytes(raw[:16])))
    with pytest.raises(BadLength):
        Ipv4Packet.parse(bytes(raw))


def test_build_ipv4_is_valid() -> None:
    raw = build_ipv4(MMDS, GUEST, 6, b"data", ttl=1)
    assert p.csum(raw[:20]) == 0 and len(raw) == 24 and raw[8] == 1
    assert Ipv4Packet.parse(raw).payload == b"data"


def test_tcp_parse_and_checksum() -> None:
    raw = p.tcp(1234, 80, 7, 9, p.ACK | p.PSH, b"hello", window=100, options=p.mss_option(1400))
    seg = TcpSegment.parse(raw, GUEST, MMDS)
    assert (seg.src_port, seg.dst_port, seg.seq, seg.ack, seg.window, seg.payload) == (1234, 80, 7, 9, 100, b"hello")
    assert seg.flags == TcpFlags.ACK | TcpFlags.PSH and seg.mss_option() == 1400 and seg.seg_len == 5
    with pytest.raises(BadChecksum):
        TcpSegment.parse(raw, GUEST, ipaddress.IPv4Address("169.254.169.253"))
    corrupt = raw[:-1] + bytes([raw[-1] ^ 1])
    with pytest.raises(BadChecksum):
        TcpSegment.parse(corrupt, GUEST, MMDS)
    assert TcpSegment.parse(corrupt, GUEST, MMDS, verify_checksum=False).payload == b"helln"


@pytest.mark.parametrize("offset_words", [4, 15])
def test_tcp_bad_data_offset(offset_words: int) -> None:
    raw = bytearray(p.tcp(1, 80, 0, 0, p.SYN))
    raw[12] = offset_words << 4
    with pytest.raises(BadLength):
        TcpSegment.parse(bytes(raw), GUEST, MMDS, verify_checksum=False)


@pytest.mark.parametrize(
    "options,mss",
    [
        (b"", None),
        (p.mss_option(536), 536),
        (b"\x01\x01" + p.mss_option(1000) + b"\x00\x00", 1000),
        (b"\x04\x02" + p.mss_option(900) + b"\x00\x00", 900),  # SACK-permitted first
        (b"\x00" + b"\x00" * 3, None),  # EOL stops the scan
    ],
)
def test_mss_option(options: bytes, mss: int | None) -> None:
    seg = TcpSegment.parse(p.tcp(1, 80, 0, 0, p.SYN, options=options), GUEST, MMDS)
    assert seg.mss_option() == mss


@pytest.mark.parametrize("options", [b"\x02\x04\x05", b"\x08\x01\x00\x00", b"\x02\x03\x05\x00", b"\x08\x0a\x00\x00"])
def test_malformed_tcp_options(options: bytes) -> None:
    seg = TcpSegment(1, 80, 0, 0, TcpFlags.SYN, 0, options, b"")
    with pytest.raises(BadTcpOption):
        seg.mss_option()


def test_build_tcp_matches_the_independent_builder() -> None:
    ours = build_tcp(GUEST, MMDS, 1234, 80, 7, 9, TcpFlags.ACK | TcpFlags.PSH, 100, b"hello")
    assert ours == p.tcp(1234, 80, 7, 9, p.ACK | p.PSH, b"hello", window=100)
    with_mss = build_tcp(GUEST, MMDS, 1, 80, 0, 0, TcpFlags.SYN, 0, mss=1460)
    assert with_mss == p.tcp(1, 80, 0, 0, p.SYN, window=0, options=p.mss_option(1460))


def test_is_frame_to() -> None:
    assert is_frame_to(p.arp_request_frame(), MMDS)
    assert not is_frame_to(p.arp_request_frame(tpa=bytes([10, 0, 0, 1])), MMDS)
    assert not is_frame_to(p.arp_request_frame()[:41], MMDS)
    assert is_frame_to(p.tcp_frame(1, 0, 0, p.SYN), MMDS)
    assert is_frame_to(p.eth(p.ipv4(b"", proto=17)), MMDS)
    assert not is_frame_to(p.eth(p.ipv4(b"", dst=bytes([10, 0, 0, 1]))), MMDS)
    assert not is_frame_to(p.eth(p.ipv4(b"")[:19]), MMDS)
    assert not is_frame_to(p.eth(p.ipv4(b""), ethertype=0x8100), MMDS)
    assert not is_frame_to(b"", MMDS)

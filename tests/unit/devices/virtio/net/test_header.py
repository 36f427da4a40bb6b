"""The virtio-net header: layout, the offload checks both ways, checksum completion."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmm.devices.virtio.net.header import (
    ETH_HLEN,
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_F_RSC_INFO,
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_UDP,
    VNET_HDR_LEN,
    ChecksumNotNegotiated,
    ChecksumOutOfRange,
    GsoNotNegotiated,
    HeaderTooShort,
    NetHeader,
    OffloadPolicy,
    check_rx_header,
    check_tx_header,
    finish_checksum,
    set_num_buffers,
)

FRAME = bytes(60)
ALL = OffloadPolicy(csum=True, gso_types=frozenset({VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_UDP}))
NONE = OffloadPolicy()


def test_layout_is_the_version_1_header():
    assert VNET_HDR_LEN == 12
    hdr = NetHeader(1, 2, 0x0304, 0x0506, 0x0708, 0x090A, 0x0B0C)
    assert hdr.pack() == bytes([1, 2, 4, 3, 6, 5, 8, 7, 0x0A, 9, 0x0C, 0x0B])
    assert NetHeader.unpack(hdr.pack() + b"tail") == hdr
    with pytest.raises(HeaderTooShort):
        NetHeader.unpack(bytes(11))


def test_set_num_buffers_in_place():
    raw = bytearray(NetHeader(flags=1).pack())
    set_num_buffers(raw, 3)
    assert NetHeader.unpack(raw) == NetHeader(flags=1, num_buffers=3)


def test_tx_needs_room_for_both_headers():
    with pytest.raises(HeaderTooShort):
        check_tx_header(bytes(VNET_HDR_LEN + ETH_HLEN - 1), ALL)
    assert check_tx_header(bytes(VNET_HDR_LEN + ETH_HLEN), NONE) == bytes(12)


def test_tx_clears_device_only_fields():
    hdr = NetHeader(flags=VIRTIO_NET_HDR_F_DATA_VALID | VIRTIO_NET_HDR_F_RSC_INFO | 0x80, num_buffers=9)
    assert check_tx_header(hdr.pack() + FRAME, NONE) == bytes(12)


def test_tx_partial_checksum_rules():
    hdr = NetHeader(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=16)
    with pytest.raises(ChecksumNotNegotiated):
        check_tx_header(hdr.pack() + FRAME, NONE)
    assert check_tx_header(hdr.pack() + FRAME, ALL) == hdr.pack()
    with pytest.raises(ChecksumOutOfRange):
        check_tx_header(NetHeader(flags=1, csum_start=50, csum_offset=9).pack() + FRAME, ALL)


def test_tx_gso_rules():
    tso = NetHeader(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type=VIRTIO_NET_HDR_GSO_TCPV4, gso_size=1448,
                    csum_start=34, csum_offset=16)
    assert check_tx_header(tso.pack() + FRAME, ALL) == tso.pack()
    with pytest.raises(GsoNotNegotiated):
        check_tx_header(tso.pack() + FRAME, OffloadPolicy(csum=True))
    with pytest.raises(GsoNotNegotiated, match="without NEEDS_CSUM"):
        check_tx_header(NetHeader(gso_type=VIRTIO_NET_HDR_GSO_TCPV4).pack() + FRAME, ALL)
    ecn = NetHeader(flags=1, gso_type=VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN, csum_start=34)
    with pytest.raises(GsoNotNegotiated):
        check_tx_header(ecn.pack() + FRAME, ALL)


def test_rx_header_rules():
    valid = NetHeader(flags=VIRTIO_NET_HDR_F_DATA_VALID, num_buffers=0xBEEF)
    assert check_rx_header(valid.pack() + FRAME, NONE, 1) == NetHeader(num_buffers=1).pack()
    assert check_rx_header(valid.pack() + FRAME, ALL, 2) == NetHeader(flags=2, num_buffers=2).pack()
    partial = NetHeader(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=6)
    with pytest.raises(ChecksumNotNegotiated):
        check_rx_header(partial.pack() + FRAME, NONE, 1)
    # A coalesced host packet may be GSO with DATA_VALID instead of NEEDS_CSUM.
    gro = NetHeader(flags=VIRTIO_NET_HDR_F_DATA_VALID, gso_type=VIRTIO_NET_HDR_GSO_TCPV4, gso_size=1448)
    assert NetHeader.unpack(check_rx_header(gro.pack() + FRAME, ALL, 1)).gso_type == VIRTIO_NET_HDR_GSO_TCPV4
    with pytest.raises(GsoNotNegotiated):
        check_rx_header(gro.pack() + FRAME, OffloadPolicy(csum=True), 1)


def _reference_checksum(data: bytes) -> int:
    """RFC 1071 with a plain loop."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f">{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@given(st.binary(min_size=2, max_size=3000), st.integers(0, 0xFFFF), st.integers(0, 40))
def test_finish_checksum_matches_rfc1071(body, pseudo, start):
    frame = bytearray(bytes(start) + body)
    offset = len(frame) - start - 2
    offset -= offset % 2
    struct.pack_into(">H", frame, start + offset, pseudo)
    hdr = NetHeader(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=start, csum_offset=offset).pack()
    out = finish_checksum(hdr, bytes(frame))
    expected = bytearray(frame)
    struct.pack_into(">H", expected, start + offset, _reference_checksum(bytes(frame[start:])))
    assert out == bytes(expected)
    # A receiver adds the pseudo-header back: everything then sums to 0xFFFF (checksum 0).
    assert _reference_checksum(struct.pack(">H", pseudo) + out[start:]) == 0


def test_finish_checksum_leaves_complete_frames_alone():
    assert finish_checksum(bytes(12), FRAME) == FRAME

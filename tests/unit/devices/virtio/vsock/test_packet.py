"""Vsock packet headers, TX chain parsing (valid and every malformed case), RX buffer filling."""

from __future__ import annotations

import pytest

from tests.unit.devices.virtio.vsock.conftest import hdr
from vmm.devices.virtio.queue import VIRTQ_DESC_F_WRITE, Descriptor
from vmm.devices.virtio.vsock import (
    MAX_PKT_BUF_SIZE,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RW,
    VSOCK_PKT_HDR_SIZE,
    PacketError,
    PacketHeader,
    parse_rx_buffer,
    parse_tx_packet,
)
from vmm.devices.virtio.vsock.packet import (
    HeaderTooShort,
    PacketTooLong,
    PacketUnreadable,
    PayloadTooShort,
    RxBufferTooShort,
    RxDescriptorReadOnly,
    TxDescriptorWritable,
)
from vmm.memory import GuestMemory

BASE = 0x10_0000


@pytest.fixture
def mem():
    m = GuestMemory.anonymous([(0, 4 << 20)])
    yield m
    m.close()


def ro(addr: int, length: int) -> Descriptor:
    return Descriptor(addr, length, 0)


def rw(addr: int, length: int) -> Descriptor:
    return Descriptor(addr, length, VIRTQ_DESC_F_WRITE)


def put(mem: GuestMemory, header: PacketHeader, data: bytes = b"", addr: int = BASE) -> bytes:
    raw = header.pack() + data
    mem.write(addr, raw)
    return raw


def test_header_layout_is_the_specs_44_bytes():
    h = PacketHeader(src_cid=0x0102030405060708, dst_cid=2, src_port=0xAABBCCDD, dst_port=7, len=5, type=1,
                     op=5, flags=3, buf_alloc=0x10000, fwd_cnt=0xFFFFFFFF)
    raw = h.pack()
    assert VSOCK_PKT_HDR_SIZE == len(raw) == 44
    assert raw[:8] == bytes.fromhex("0807060504030201")  # little-endian src_cid first
    assert raw[24:28] == b"\x05\x00\x00\x00"  # len
    assert raw[28:30] == b"\x01\x00" and raw[30:32] == b"\x05\x00"  # type then op
    assert PacketHeader.unpack(raw) == h
    assert "RW" in repr(h) and "\n" not in repr(h)


# --- TX: valid ---------------------------------------------------------------------------------


def test_one_descriptor_header_and_payload(mem):
    put(mem, hdr(VIRTIO_VSOCK_OP_RW, src_port=1, dst_port=2, length=5), b"hello")
    pkt = parse_tx_packet([ro(BASE, 49)], mem)
    assert pkt.header.op == VIRTIO_VSOCK_OP_RW and pkt.header.len == 5 and pkt.data == b"hello"


def test_header_and_payload_split_anywhere(mem):
    raw = put(mem, hdr(VIRTIO_VSOCK_OP_RW, src_port=1, dst_port=2, length=10), b"0123456789")
    # 20 + 30 + 4 bytes: the header straddles two descriptors, the payload two.
    mem.write(0x20_0000, raw[:20])
    mem.write(0x30_0000, raw[20:50])
    mem.write(0x38_0000, raw[50:])
    pkt = parse_tx_packet([ro(0x20_0000, 20), ro(0x30_0000, 30), ro(0x38_0000, 4)], mem)
    assert pkt.header.len == 10 and pkt.data == b"0123456789"


def test_control_packet_and_extra_bytes_ignored(mem):
    put(mem, hdr(VIRTIO_VSOCK_OP_REQUEST, src_port=1, dst_port=2), b"trailing junk")
    pkt = parse_tx_packet([ro(BASE, 44 + 13)], mem)
    assert pkt.header.op == VIRTIO_VSOCK_OP_REQUEST and pkt.data == b""


def test_maximal_payload(mem):
    data = bytes(range(256)) * (MAX_PKT_BUF_SIZE // 256)
    put(mem, hdr(VIRTIO_VSOCK_OP_RW, src_port=1, dst_port=2, length=MAX_PKT_BUF_SIZE), data)
    assert parse_tx_packet([ro(BASE, 44 + MAX_PKT_BUF_SIZE)], mem).data == data


# --- TX: malformed -----------------------------------------------------------------------------


def test_writable_descriptor_in_tx_chain(mem):
    put(mem, hdr(VIRTIO_VSOCK_OP_RW, src_port=1, dst_port=2, length=4), b"data")
    with pytest.raises(TxDescriptorWritable):
        parse_tx_packet([ro(BASE, 44), rw(BASE + 44, 4)], mem)
    with pytest.raises(TxDescriptorWritable):
        parse_tx_packet([rw(BASE, 48)], mem)


@pytest.mark.parametrize("lengths", [[43], [20, 23], [1]])
def test_chain_shorter_than_the_header(mem, lengths):
    put(mem, hdr(VIRTIO_VSOCK_OP_REQUEST, src_port=1, dst_port=2))
    descs, addr = [], BASE
    for n in lengths:
        descs.append(ro(addr, n))
        addr += n
    with pytest.raises(HeaderTooShort) as info:
        parse_tx_packet(descs, mem)
    assert info.value.header is None


def test_empty_chain_has_no_header(mem):
    with pytest.raises(HeaderTooShort):
        parse_tx_packet([], mem)


def test_len_beyond_the_maximum(mem):
    put(mem, hdr(VIRTIO_VSOCK_OP_RW, src_port=1, dst_port=2, length=MAX_PKT_BUF_SIZE + 1))
    with pytest.raises(PacketTooLong) as info:
        parse_tx_packet([ro(BASE, 44 + MAX_PKT_BUF_SIZE + 1)], mem)
    assert info.value.header is not None and info.value.header.src_port == 1  # the device can reset the stream


def test_len_beyond_the_chain(mem):
    put(mem, hdr(VIRTIO_VSOCK_OP_RW, src_port=1, dst_port=2, length=100), b"x" * 99)
    with pytest.raises(PayloadTooShort) as info:
        parse_tx_packet([ro(BASE, 44 + 99)], mem)
    assert info.value.header.len == 100


def test_len_u32_max(mem):
    put(mem, hdr(VIRTIO_VSOCK_OP_RW, src_port=1, dst_port=2, length=0xFFFF_FFFF))
    with pytest.raises(PacketTooLong):
        parse_tx_packet([ro(BASE, 44)], mem)


def test_unreadable_memory_is_a_packet_error():
    """Only a memory map that changed under a checked chain gets here; it must still not escape."""
    m = GuestMemory.anonymous([(0, 1 << 20)])
    try:
        with pytest.raises(PacketUnreadable):
            parse_tx_packet([ro((1 << 20) - 10, 44)], m)
        assert issubclass(PacketUnreadable, PacketError)
    finally:
        m.close()


# --- RX --------------------------------------------------------------------------------------------


def test_rx_buffer_capacity():
    assert parse_rx_buffer([rw(BASE, 44)]).capacity == 0
    assert parse_rx_buffer([rw(BASE, 44), rw(0x20_0000, 4096)]).capacity == 4096
    assert parse_rx_buffer([rw(BASE, 4096)]).capacity == 4096 - 44
    assert parse_rx_buffer([rw(BASE, 1 << 20)]).capacity == MAX_PKT_BUF_SIZE


def test_rx_read_only_descriptor():
    with pytest.raises(RxDescriptorReadOnly):
        parse_rx_buffer([rw(BASE, 44), ro(0x20_0000, 4096)])


@pytest.mark.parametrize("lengths", [[43], [20, 23], []])
def test_rx_too_short(lengths):
    with pytest.raises(RxBufferTooShort):
        parse_rx_buffer([rw(BASE + 0x1000 * i, n) for i, n in enumerate(lengths)])


def test_rx_write_two_descriptors(mem):
    mem.write(0x20_0000, b"\xee" * 4096)
    buf = parse_rx_buffer([rw(BASE, 44), rw(0x20_0000, 4096)])
    h = hdr(VIRTIO_VSOCK_OP_RW, src_port=9, dst_port=8, length=999)  # len is rewritten from the data
    assert buf.write(mem, h, b"abc") == 47
    assert PacketHeader.unpack(mem.read(BASE, 44)) == h.with_len(3)
    assert mem.read(0x20_0000, 4) == b"abc\xee"


def test_rx_write_straddling(mem):
    buf = parse_rx_buffer([rw(BASE, 30), rw(0x20_0000, 30), rw(0x30_0000, 30)])
    data = bytes(range(40))
    assert buf.write(mem, hdr(VIRTIO_VSOCK_OP_RW, src_port=1, dst_port=2), data) == 84
    raw = mem.read(BASE, 30) + mem.read(0x20_0000, 30) + mem.read(0x30_0000, 24)
    assert PacketHeader.unpack(raw).len == 40 and raw[44:] == data


def test_rx_write_refuses_oversized_data(mem):
    buf = parse_rx_buffer([rw(BASE, 50)])
    with pytest.raises(ValueError):
        buf.write(mem, hdr(VIRTIO_VSOCK_OP_RW, src_port=1, dst_port=2), b"x" * 7)

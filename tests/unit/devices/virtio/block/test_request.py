"""The virtio-blk request parser on its own: every rule, and a property test over random chains."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmm.devices.virtio.block import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    RequestError,
    RequestType,
    parse_request,
    status_address,
)
from vmm.devices.virtio.block.request import (
    ChainTooShort,
    DataDirectionInvalid,
    DataLengthInvalid,
    HeaderInvalid,
    RequestTypeUnsupported,
    SectorOutOfRange,
    SegmentsInvalid,
    StatusInvalid,
)
from vmm.devices.virtio.queue import VIRTQ_DESC_F_WRITE, Descriptor
from vmm.memory import GuestMemory

HDR = 0x100
CAPACITY = 100
SEG_MAX = 4
SIZE_MAX = 4096


@pytest.fixture(scope="module")
def mem():
    m = GuestMemory.anonymous([(0, 0x10000)])
    yield m
    m.close()


def R(addr: int, length: int) -> Descriptor:
    return Descriptor(addr, length, 0)


def W(addr: int, length: int) -> Descriptor:
    return Descriptor(addr, length, VIRTQ_DESC_F_WRITE)


def parse(mem, rtype: int, sector: int, descs: list[Descriptor]):
    mem.write(descs[0].addr if descs else HDR, struct.pack("<IIQ", rtype, 0, sector))
    return parse_request(descs, mem, CAPACITY, seg_max=SEG_MAX, size_max=SIZE_MAX)


def test_in_request(mem):
    req = parse(mem, VIRTIO_BLK_T_IN, 5, [R(HDR, 16), W(0x1000, 512), W(0x2000, 1024), W(0x3000, 1)])
    assert req.type is RequestType.IN and req.sector == 5 and req.offset == 5 * 512
    assert req.data == (W(0x1000, 512), W(0x2000, 1024)) and req.data_len == 1536 and req.status_addr == 0x3000


def test_out_request_with_a_long_header_and_status(mem):
    req = parse(mem, VIRTIO_BLK_T_OUT, 0, [R(HDR, 64), R(0x1000, 512), W(0x3000, 8)])
    assert req.type is RequestType.OUT and req.status_addr == 0x3000


def test_flush_and_get_id(mem):
    assert parse(mem, VIRTIO_BLK_T_FLUSH, 12345, [R(HDR, 16), W(0x3000, 1)]).data == ()
    assert parse(mem, VIRTIO_BLK_T_GET_ID, 0, [R(HDR, 16), W(0x1000, 20), W(0x3000, 1)]).type is RequestType.GET_ID


def test_a_request_reaching_exactly_the_end_is_fine(mem):
    assert parse(mem, VIRTIO_BLK_T_IN, CAPACITY - 2, [R(HDR, 16), W(0x1000, 1024), W(0x3000, 1)])


@pytest.mark.parametrize("rtype,sector,descs,error", [
    (VIRTIO_BLK_T_IN, 0, [R(HDR, 16)], ChainTooShort),
    (VIRTIO_BLK_T_IN, 0, [R(HDR, 16), W(0x3000, 1)], ChainTooShort),
    (VIRTIO_BLK_T_IN, 0, [W(HDR, 16), W(0x1000, 512), W(0x3000, 1)], HeaderInvalid),
    (VIRTIO_BLK_T_IN, 0, [R(HDR, 15), W(0x1000, 512), W(0x3000, 1)], HeaderInvalid),
    (VIRTIO_BLK_T_IN, 0, [R(HDR, 16), W(0x1000, 512), R(0x3000, 1)], StatusInvalid),
    (VIRTIO_BLK_T_IN, 0, [R(HDR, 16), R(0x1000, 512), W(0x3000, 1)], DataDirectionInvalid),
    (VIRTIO_BLK_T_OUT, 0, [R(HDR, 16), W(0x1000, 512), W(0x3000, 1)], DataDirectionInvalid),
    (VIRTIO_BLK_T_GET_ID, 0, [R(HDR, 16), R(0x1000, 20), W(0x3000, 1)], DataDirectionInvalid),
    (VIRTIO_BLK_T_GET_ID, 0, [R(HDR, 16), W(0x1000, 10), W(0x1100, 9), W(0x3000, 1)], DataLengthInvalid),
    (VIRTIO_BLK_T_IN, 0, [R(HDR, 16), W(0x1000, 500), W(0x3000, 1)], DataLengthInvalid),
    (VIRTIO_BLK_T_FLUSH, 0, [R(HDR, 16), R(0x1000, 512), W(0x3000, 1)], DataLengthInvalid),
    (VIRTIO_BLK_T_IN, 0, [R(HDR, 16), *[W(0x1000, 512)] * 5, W(0x3000, 1)], SegmentsInvalid),
    (VIRTIO_BLK_T_IN, 0, [R(HDR, 16), W(0x1000, 8192), W(0x3000, 1)], SegmentsInvalid),
    (VIRTIO_BLK_T_IN, CAPACITY, [R(HDR, 16), W(0x1000, 512), W(0x3000, 1)], SectorOutOfRange),
    (VIRTIO_BLK_T_OUT, CAPACITY - 1, [R(HDR, 16), R(0x1000, 1024), W(0x3000, 1)], SectorOutOfRange),
    (VIRTIO_BLK_T_OUT, (1 << 64) - 1, [R(HDR, 16), R(0x1000, 512), W(0x3000, 1)], SectorOutOfRange),
    (3, 0, [R(HDR, 16), W(0x3000, 1)], RequestTypeUnsupported),
])
def test_invalid_requests(mem, rtype, sector, descs, error):
    with pytest.raises(error) as info:
        parse(mem, rtype, sector, descs)
    expected = VIRTIO_BLK_S_UNSUPP if error is RequestTypeUnsupported else VIRTIO_BLK_S_IOERR
    assert info.value.status == expected


@pytest.mark.parametrize("descs,expected", [
    ([], None),
    ([W(0x3000, 1)], None),  # a lone descriptor is the header
    ([R(HDR, 16), R(0x3000, 1)], None),
    ([R(HDR, 16), W(0x3000, 1)], 0x3000),
    ([R(HDR, 16), W(0x1000, 512), W(0x3000, 4)], 0x3000),
])
def test_status_address(descs, expected):
    assert status_address(descs) == expected


descriptor = st.builds(
    Descriptor,
    addr=st.sampled_from([0x1000, 0x2000, 0x3000, HDR]),
    length=st.sampled_from([1, 15, 16, 19, 20, 511, 512, 1024, 4096, 8192]),
    flags=st.sampled_from([0, VIRTQ_DESC_F_WRITE]),
)


@settings(max_examples=400, deadline=None)
@given(
    rtype=st.one_of(st.sampled_from([0, 1, 4, 8]), st.integers(0, 0xFFFF_FFFF)),
    sector=st.one_of(st.integers(0, CAPACITY + 2), st.integers(0, (1 << 64) - 1)),
    descs=st.lists(descriptor, max_size=8),
)
def test_parse_never_returns_an_invalid_request(mem, rtype, sector, descs):
    try:
        req = parse(mem, rtype, sector, descs)
    except RequestError as exc:
        assert exc.status in (VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP)
        return
    assert req.type == rtype and req.sector == sector
    assert not descs[0].is_write_only and descs[0].length >= 16
    assert descs[-1].is_write_only and req.status_addr == descs[-1].addr == status_address(descs)
    assert req.data == tuple(descs[1:-1])
    if req.type is RequestType.FLUSH:
        assert req.data == ()
    elif req.type is RequestType.GET_ID:
        assert req.data_len >= 20 and all(d.is_write_only for d in req.data)
    else:
        assert all(d.is_write_only == (req.type is RequestType.IN) for d in req.data)
        assert req.data_len > 0 and req.data_len % 512 == 0
        assert len(req.data) <= SEG_MAX and all(d.length <= SIZE_MAX for d in req.data)
        assert req.sector + req.data_len // 512 <= CAPACITY

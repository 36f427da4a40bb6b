"""Property tests of the TX and RX chain handling: hostile rings never hurt the host, good ones are exact."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.devices.virtio.mock import Buf
from tests.unit.devices.virtio.net.conftest import (
    BASIC,
    RXQ_BASE,
    TXQ_BASE,
    FakeTap,
    NetDriver,
    eth_frame,
    packet,
)
from vmm.devices.virtio import feature
from vmm.devices.virtio.net import MAX_BUFFER_SIZE, VIRTIO_NET_F_MRG_RXBUF, VNET_HDR_LEN, Net, NetHeader
from vmm.devices.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from vmm.memory import GuestMemory
from vmm.rate_limiter import ManualTimer, RateLimiter

MEM_SIZE = 1 << 20
QUEUE_SIZE = 8
ARENA = 0x2_0000
MRG = BASIC | feature(VIRTIO_NET_F_MRG_RXBUF)

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

addresses = st.one_of(
    st.integers(ARENA, MEM_SIZE - 1),  # ordinary guest RAM (maybe running off the end)
    st.sampled_from([0, RXQ_BASE, TXQ_BASE, MEM_SIZE - 16, MEM_SIZE, 1 << 40, (1 << 64) - 8]),
)
lengths = st.one_of(st.sampled_from([0, 1, 11, 12, 25, 26, 1526, 2048, MAX_BUFFER_SIZE, MAX_BUFFER_SIZE + 1,
                                     0xFFFF_FFFF]), st.integers(0, 70_000))
descriptors = st.tuples(addresses, lengths, st.sampled_from([0, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
                                                             VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE]),
                        st.integers(0, QUEUE_SIZE + 2))
tables = st.lists(descriptors, min_size=QUEUE_SIZE, max_size=QUEUE_SIZE)
heads = st.lists(st.integers(0, QUEUE_SIZE + 1), max_size=QUEUE_SIZE)
frames = st.lists(st.binary(min_size=0, max_size=3000), max_size=4)


def _limiter() -> RateLimiter:
    return RateLimiter(timer=ManualTimer())


def _write_ring(d: NetDriver, vq, table, ring, avail_idx_extra: int) -> None:
    for i, (addr, length, flags, nxt) in enumerate(table):
        vq.write_desc(i, addr, length & 0xFFFF_FFFF, flags, nxt)
    for slot, head in enumerate(ring):
        vq.set_avail_slot(slot, head)
    vq.set_avail_idx(len(ring) + avail_idx_extra)


def _allowed_writes(d: NetDriver, rx_table) -> list[tuple[int, int]]:
    """Where the device may write: the used rings, and the RX table's device-writable buffers."""
    allowed = [(vq.used_ring, vq.end) for vq in (d.rxq, d.txq)]
    allowed += [(addr, addr + length) for addr, length, flags, _ in rx_table if flags & VIRTQ_DESC_F_WRITE]
    return allowed


def _changed_outside(before: bytes, after: bytes, allowed: list[tuple[int, int]]) -> list[int]:
    """Offsets (the first ten) where `after` differs from `before` outside the `allowed` ranges."""
    expected = bytearray(before)
    for start, end in allowed:
        start, end = max(start, 0), min(end, len(before))
        if start < end:
            expected[start:end] = after[start:end]
    if expected == after:
        return []
    return [i for i in range(len(after)) if expected[i] != after[i]][:10]


@FUZZ
@given(tx_table=tables, tx_ring=heads, rx_table=tables, rx_ring=heads, extra=st.sampled_from([0, 0, 0, 1, 40000]),
       features=st.sampled_from([BASIC, MRG]), host_frames=frames)
def test_hostile_rings_never_raise_nor_touch_the_host(tx_table, tx_ring, rx_table, rx_ring, extra, features,
                                                      host_frames):
    mem = GuestMemory.anonymous([(0, MEM_SIZE)])
    tap = FakeTap()
    net = Net("fuzz", tap, rx_rate_limiter=_limiter(), tx_rate_limiter=_limiter(), queue_size=QUEUE_SIZE)
    try:
        d = NetDriver(net, mem, features=features, queue_size=QUEUE_SIZE)
        mem.write(ARENA, bytes(range(256)) * ((MEM_SIZE - ARENA) // 256))
        _write_ring(d, d.txq, tx_table, tx_ring, extra)
        _write_ring(d, d.rxq, rx_table, rx_ring, 0)
        for f in host_frames:
            tap.inject(packet(eth_frame(f)))
        before = mem.read(0, MEM_SIZE)

        d.mmio.notify(1)
        d.mmio.notify(0)
        net.on_tap_readable()

        after = mem.read(0, MEM_SIZE)
        # The device wrote nothing but its used rings and guest-writable RX buffers.
        assert _changed_outside(before, after, _allowed_writes(d, rx_table)) == []
        # Every frame the host got was of a legal size, and every one is accounted for.
        sent = tap.sent()
        assert all(VNET_HDR_LEN + 14 <= len(s) <= MAX_BUFFER_SIZE for s in sent)
        assert len(sent) == net.metrics.tx_packets_count
        for head, length in d.txq.take_used():
            assert head < QUEUE_SIZE and length == 0
        for head, length in d.rxq.take_used():
            assert head < QUEUE_SIZE and length <= MAX_BUFFER_SIZE
    finally:
        net.close()
        tap.close_all()
        mem.close()


splits = st.lists(st.integers(1, 3000), max_size=5)


@FUZZ
@given(payloads=st.lists(st.tuples(st.binary(min_size=0, max_size=3000), splits), min_size=1, max_size=6))
def test_well_formed_tx_chains_reach_the_tap_exactly(payloads):
    mem = GuestMemory.anonymous([(0, 4 << 20)])
    tap = FakeTap()
    net = Net("fuzz", tap, rx_rate_limiter=_limiter(), tx_rate_limiter=_limiter())
    try:
        d = NetDriver(net, mem, features=BASIC)
        packets = [packet(eth_frame(p)) for p, _ in payloads]
        for pkt, (_, cut) in zip(packets, payloads):
            d.send(pkt, cut, notify=False)
        d.mmio.notify(1)
        assert tap.sent() == packets
        assert [n for _, n in d.txq.take_used()] == [0] * len(packets)
    finally:
        net.close()
        tap.close_all()
        mem.close()


# Buffers of at least 400 bytes: sixteen of them hold the largest frame drawn, so none is dropped.
chain_shapes = st.lists(st.tuples(st.integers(400, 3000), st.integers(1, 3)), min_size=1, max_size=12)


@FUZZ
@given(host=st.lists(st.binary(min_size=0, max_size=6000), min_size=1, max_size=5), shapes=chain_shapes,
       more=chain_shapes)
def test_rx_frames_reassemble_exactly_with_mergeable_buffers(host, shapes, more):
    size = 16
    mem = GuestMemory.anonymous([(0, 4 << 20)])
    tap = FakeTap()
    net = Net("fuzz", tap, rx_rate_limiter=_limiter(), tx_rate_limiter=_limiter(), queue_size=size)
    try:
        d = NetDriver(net, mem, features=MRG, queue_size=size)
        outstanding: dict[int, list[Buf]] = {}  # head -> buffers the device has not returned
        segments: list[bytes] = []

        def post(shape):
            # The mock hands out descriptors round-robin and the device returns chains in
            # order, so keeping at most `size` descriptors outstanding never reuses a live one.
            for length, parts in shape:
                if sum(map(len, outstanding.values())) + parts > size:
                    break
                bufs = d.rx_buf(length, parts)
                outstanding[d.rxq.add_chain(bufs)] = bufs
            d.mmio.notify(0)

        def collect():
            for head, n in d.rxq.take_used():
                segments.append(d.read_chain(outstanding.pop(head), n))

        post(shapes)
        frames = [eth_frame(p) for p in host]
        for f in frames:
            tap.inject(packet(f))
        net.on_tap_readable()
        for _ in range(4 * len(frames)):
            collect()
            if net.metrics.rx_packets_count == len(frames):
                break
            post(more)
        collect()
        received, i = [], 0
        while i < len(segments):
            count = NetHeader.unpack(segments[i]).num_buffers
            assert count >= 1
            received.append(b"".join(segments[i:i + count])[VNET_HDR_LEN:])
            i += count
        assert net.metrics.rx_dropped == 0 and net.metrics.rx_fails == 0
        assert received == frames
    finally:
        net.close()
        tap.close_all()
        mem.close()

"""virtio-net through the MMIO transport with driver-side queues and a fake TAP."""

from __future__ import annotations

import dataclasses
import errno
import select
import struct

import pytest

from tests.unit.devices.virtio.mock import Buf, MmioDriver, VirtQueue, new_interrupt
from tests.unit.devices.virtio.net.conftest import (
    BASIC,
    RXQ_BASE,
    TXQ_BASE,
    GUEST_MAC,
    HOST_MAC,
    FakeMmds,
    FakeTap,
    NetDriver,
    Poller,
    eth_frame,
    manual_limiter,
    packet,
)
from vmm.config.net import MacAddr, NetworkInterfaceConfig
from vmm.config.rate_limiter import RateLimiterConfig, TokenBucketConfig
from vmm.devices.virtio import (
    VIRTIO_F_VERSION_1,
    VIRTIO_MMIO_INT_VRING,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    feature,
)
from vmm.devices.virtio.net import (
    CONFIG_SPACE_SIZE,
    MAX_BUFFER_SIZE,
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_UFO,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VNET_HDR_LEN,
    Net,
    NetError,
    NetHeader,
    NetState,
    NetStateInvalid,
    TapNotFound,
    tap_offload_flags,
)
from vmm.devices.virtio.queue import VIRTQ_DESC_F_NEXT
from vmm.devices.virtio.transport import CONFIG_SPACE, MmioTransport
from vmm.devices.virtio.transport import mmio
from vmm.rate_limiter import ManualTimer, RateLimiter, TimerFd

OFFLOADS = (VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO)
BASE_FEATURES = (feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_RING_F_EVENT_IDX) | feature(VIRTIO_RING_F_INDIRECT_DESC)
                 | feature(VIRTIO_NET_F_MRG_RXBUF) | feature(VIRTIO_NET_F_STATUS) | sum(feature(b) for b in OFFLOADS))
MRG = BASIC | feature(VIRTIO_NET_F_MRG_RXBUF)
CSUM = BASIC | feature(VIRTIO_NET_F_CSUM) | feature(VIRTIO_NET_F_GUEST_CSUM)
FRAME = eth_frame(b"EMBER-VNET-PING 1".ljust(46, b"\0"))


@pytest.fixture
def d(net, mem):
    """A driver that negotiated only VERSION_1 (no MRG_RXBUF, no offloads)."""
    return NetDriver(net, mem, features=BASIC)


def rx_used(d: NetDriver) -> list[tuple[int, int]]:
    return d.rxq.take_used()


# --- features and config space ---------------------------------------------------------------------------


def test_features_offered(tap):
    assert Net("a", tap).avail_features == BASE_FEATURES
    assert Net("a", tap, MacAddr(GUEST_MAC)).avail_features == BASE_FEATURES | feature(VIRTIO_NET_F_MAC)
    assert Net("a", tap, mtu=1400).avail_features == BASE_FEATURES | feature(VIRTIO_NET_F_MTU)


def test_config_space(tap, mem):
    net = Net("a", tap, MacAddr(GUEST_MAC), mtu=9000)
    d = NetDriver(net, mem, features=BASIC | feature(VIRTIO_NET_F_MAC) | feature(VIRTIO_NET_F_MTU))
    config = d.transport.read(CONFIG_SPACE, 4) + d.transport.read(CONFIG_SPACE + 4, 4) \
        + d.transport.read(CONFIG_SPACE + 8, 4)
    assert CONFIG_SPACE_SIZE == 12
    assert config == GUEST_MAC + struct.pack("<HHH", 1, 0, 9000)
    d.transport.write(CONFIG_SPACE, b"\x00")
    assert d.transport.read(CONFIG_SPACE, 1) == GUEST_MAC[:1]
    assert net.metrics.cfg_fails == 1


def test_config_without_mac_is_zero(tap):
    assert Net("a", tap).config_bytes() == bytes(6) + struct.pack("<HHH", 1, 0, 0)


def test_bad_mtu_refused(tap):
    with pytest.raises(NetError, match="MTU 67"):
        Net("a", tap, mtu=67)


@pytest.mark.parametrize("features,ok", [
    (BASIC | feature(VIRTIO_NET_F_GUEST_TSO4), False),
    (BASIC | feature(VIRTIO_NET_F_GUEST_CSUM) | feature(VIRTIO_NET_F_GUEST_TSO4), True),
    (BASIC | feature(VIRTIO_NET_F_HOST_UFO), False),
    (BASIC | feature(VIRTIO_NET_F_CSUM) | feature(VIRTIO_NET_F_HOST_UFO), True),
    (BASE_FEATURES, True),
])
def test_offload_dependencies_checked_at_features_ok(net, mem, features, ok):
    driver = MmioDriver(MmioTransport(net, mem))
    driver.negotiate(features)
    assert bool(driver.status & mmio.DEVICE_STATUS_FEATURES_OK) is ok


def test_activation_sets_tap_offloads_from_guest_features(tap, mem):
    NetDriver(Net("a", tap), mem, features=BASE_FEATURES)
    assert tap.offload_calls == [TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_UFO]
    assert tap_offload_flags(BASIC) == 0
    assert tap_offload_flags(CSUM) == TUN_F_CSUM


def test_activation_fails_if_offloads_cannot_be_set(tap, mem):
    tap.offload_error = OSError(errno.EINVAL, "Invalid argument")
    net = Net("a", tap)
    d = NetDriver(net, mem, features=BASIC)
    assert not net.is_activated
    assert d.mmio.status & mmio.DEVICE_STATUS_NEEDS_RESET
    assert net.metrics.activate_fails == 1


def test_from_config_opens_the_tap_by_name(tap):
    opened = []

    def open_tap(name):
        opened.append(name)
        return tap
    cfg = NetworkInterfaceConfig("eth0", "tap7", MacAddr(GUEST_MAC), mtu=1500,
                                 tx_rate_limiter=RateLimiterConfig(ops=TokenBucketConfig(10, 100)))
    net = Net.from_config(cfg, open_tap=open_tap)
    assert opened == ["tap7"] and net.iface_id == "eth0" and net.mtu == 1500 and net.guest_mac == cfg.guest_mac
    assert net.tx_rate_limiter.ops.capacity == 10 and net.rx_rate_limiter.ops is None
    net.close()


def test_from_config_reports_a_missing_tap():
    def open_tap(name):
        raise TapNotFound(f"cannot open TAP {name}: no such network interface")
    with pytest.raises(NetError, match="cannot open TAP tap9"):
        Net.from_config(NetworkInterfaceConfig("eth0", "tap9"), open_tap=open_tap)


# --- TX ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", [(), (VNET_HDR_LEN,), (5, 12, 13, 40)])
def test_tx_frame_reaches_the_tap(d, tap, net, split):
    events = net.metrics.tx_queue_event_count
    head = d.send(packet(FRAME), split)
    assert tap.sent() == [packet(FRAME)]
    assert d.txq.take_used() == [(head, 0)]
    assert d.irq.status & VIRTIO_MMIO_INT_VRING
    m = net.metrics
    assert (m.tx_packets_count, m.tx_count, m.tx_bytes_count) == (1, 1, VNET_HDR_LEN + len(FRAME))
    assert m.tx_queue_event_count == events + 1 and m.tx_dropped == 0


def test_tx_batch_in_order_one_interrupt(d, tap):
    frames = [eth_frame(bytes([i]) * 50) for i in range(5)]
    heads = [d.send(packet(f), notify=False) for f in frames]
    edges = d.edges.count
    d.mmio.notify(1)
    assert tap.sent() == [packet(f) for f in frames]
    assert d.txq.take_used() == [(h, 0) for h in heads]
    assert d.edges.count == edges + 1


def test_tx_header_fields_the_device_owns_are_cleared(d, tap):
    hdr = NetHeader(flags=VIRTIO_NET_HDR_F_DATA_VALID, num_buffers=7)
    d.send(packet(FRAME, hdr))
    assert tap.sent() == [packet(FRAME)]


def test_tx_checksum_offload_needs_negotiation(tap, mem):
    hdr = NetHeader(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=6)
    net = Net("a", tap)
    d = NetDriver(net, mem, features=BASIC)
    d.send(packet(FRAME, hdr))
    assert tap.sent() == [] and net.metrics.tx_malformed_frames == 1 and net.metrics.tx_dropped == 1
    assert d.txq.take_used()[0][1] == 0

    net2 = Net("b", tap)
    d2 = NetDriver(net2, mem, features=CSUM)
    d2.send(packet(FRAME, hdr))
    assert tap.sent() == [packet(FRAME, hdr)]


def test_tx_gso_needs_negotiation_and_needs_csum(tap, mem):
    gso = NetHeader(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type=VIRTIO_NET_HDR_GSO_TCPV4, hdr_len=54,
                    gso_size=1448, csum_start=34, csum_offset=16)
    net = Net("a", tap)
    d = NetDriver(net, mem, features=CSUM)
    d.send(packet(FRAME, gso))
    assert tap.sent() == [] and net.metrics.tx_malformed_frames == 1

    net2 = Net("b", tap)
    d2 = NetDriver(net2, mem, features=CSUM | feature(VIRTIO_NET_F_HOST_TSO4))
    d2.send(packet(FRAME, gso))
    assert tap.sent() == [packet(FRAME, gso)]
    d2.send(packet(FRAME, dataclasses.replace(gso, flags=0)))
    assert tap.sent() == [] and net2.metrics.tx_malformed_frames == 1


def test_tx_largest_frame_passes_one_more_byte_is_dropped(d, tap, net):
    big = packet(eth_frame(b"\x5a" * (MAX_BUFFER_SIZE - VNET_HDR_LEN - 14)))
    assert len(big) == MAX_BUFFER_SIZE
    d.send(big, (VNET_HDR_LEN, 30000))
    assert tap.sent() == [big]
    d.send(big + b"\0", (VNET_HDR_LEN, 30000))
    assert tap.sent() == []
    assert net.metrics.tx_malformed_frames == 1


def malformed_tx_chains(d: NetDriver) -> dict[str, int]:
    """Each builds one bad chain in the TX ring (not notified); returns name -> head."""
    vq, arena, mem = d.txq, d.arena, d.mem
    good = arena.alloc(100)
    mem.write(good, packet(FRAME)[:100])
    heads = {}
    heads["writable"] = vq.add_chain([Buf(good, 12), Buf(arena.alloc(64), 64, writable=True)])
    heads["header only"] = vq.add_chain([Buf(good, 12)])
    heads["too short"] = vq.add_chain([Buf(good, 25)])
    heads["huge length"] = vq.add_chain([Buf(good, 12), Buf(good, 0xFFFF_FFF0)])
    heads["too big"] = vq.add_chain([Buf(good, 12), Buf(arena.alloc(MAX_BUFFER_SIZE), MAX_BUFFER_SIZE)])
    heads["outside memory"] = vq.add_chain([Buf(good, 12), Buf(1 << 40, 64)])
    heads["zero length"] = vq.add_chain([Buf(good, 12), Buf(good, 0)])
    # A loop: a two-descriptor chain whose second descriptor points back at the first.
    loop_head = vq.build_chain([Buf(good, 12), Buf(good + 12, 50)])
    first, _, flags, _ = vq.read_desc(loop_head)
    second = (loop_head + 1) % vq.size
    vq.write_desc(second, good + 12, 50, VIRTQ_DESC_F_NEXT, loop_head)
    vq.publish(loop_head)
    heads["loop"] = loop_head
    # `next` out of range.
    bad_next = vq.build_chain([Buf(good, 12)])
    vq.write_desc(bad_next, good, 12, VIRTQ_DESC_F_NEXT, 999)
    vq.publish(bad_next)
    heads["next out of range"] = bad_next
    return heads


def test_malformed_tx_chains_are_dropped_and_counted_host_untouched(tap, mem):
    net = Net("a", tap)
    d = NetDriver(net, mem, features=BASIC, queue_size=32)
    heads = malformed_tx_chains(d)
    good = d.send(packet(FRAME), notify=False)
    d.mmio.notify(1)
    assert tap.sent() == [packet(FRAME)]
    used = d.txq.take_used()
    assert used == [(h, 0) for h in [*heads.values(), good]]
    m = net.metrics
    assert m.tx_dropped == len(heads)
    # Descriptor errors: writable, huge length, outside memory, zero length, loop, next out of range.
    assert m.tx_fails == 6
    assert m.tx_malformed_frames == len(heads) - m.tx_fails
    assert m.tx_packets_count == 1


def test_tap_write_failure_is_counted_and_the_chain_completed(d, tap, net):
    tap.write_error = OSError(errno.EIO, "Input/output error")
    head = d.send(packet(FRAME))
    assert d.txq.take_used() == [(head, 0)]
    assert net.metrics.tap_write_fails == 1 and net.metrics.tx_dropped == 1 and net.metrics.tx_packets_count == 0
    tap.write_error = None
    d.send(packet(FRAME))
    assert tap.sent() == [packet(FRAME)]


def test_spoofed_source_mac_is_counted_but_sent(d, tap, net):
    d.send(packet(eth_frame(b"x" * 46, src=HOST_MAC)))
    assert len(tap.sent()) == 1 and net.metrics.tx_spoofed_mac_count == 1
    d.send(packet(FRAME))
    assert net.metrics.tx_spoofed_mac_count == 1


def test_empty_tx_notification_is_counted(d, net):
    before = net.metrics.no_tx_avail_buffer
    d.mmio.notify(1)
    assert net.metrics.no_tx_avail_buffer == before + 1


# --- RX ---------------------------------------------------------------------------------------------------


def test_rx_frame_lands_in_guest_memory(d, tap, net):
    (chain,) = d.post_rx(2048)
    tap.inject(packet(FRAME))
    net.on_tap_readable()
    ((head, length),) = rx_used(d)
    assert length == VNET_HDR_LEN + len(FRAME)
    data = d.read_chain(chain, length)
    assert NetHeader.unpack(data) == NetHeader(num_buffers=1)
    assert data[VNET_HDR_LEN:] == FRAME
    assert d.mem.read(chain[0].addr + length, 4) == b"\xee" * 4  # nothing past the frame
    assert d.irq.status & VIRTIO_MMIO_INT_VRING
    m = net.metrics
    assert (m.rx_packets_count, m.rx_count, m.rx_bytes_count) == (1, 1, length)


def test_rx_frame_scattered_over_descriptors(d, tap, net):
    (chain,) = d.post_rx(1600, parts=4)
    frame = eth_frame(bytes(range(256)) * 5)
    tap.inject(packet(frame))
    net.on_tap_readable()
    ((_, length),) = rx_used(d)
    assert d.read_chain(chain, length)[VNET_HDR_LEN:] == frame


def test_no_rx_buffer_holds_one_frame_and_stops_polling(d, tap, net):
    poller = Poller()
    net.connect_poller(poller)
    assert poller.calls == [(tap.fileno(), True)]
    frames = [eth_frame(bytes([i]) * 60) for i in range(3)]
    for f in frames:
        tap.inject(packet(f))
    reads = tap.reads
    net.on_tap_readable()
    assert tap.reads == reads + 1  # one frame taken and held, the rest left in the TAP
    assert poller.enabled is False
    assert net.metrics.no_rx_avail_buffer == 1 and rx_used(d) == []

    chains = d.post_rx(2048, count=1)  # the driver adds a buffer and notifies
    (used,) = rx_used(d)
    assert d.read_chain(chains[0], used[1])[VNET_HDR_LEN:] == frames[0]
    assert poller.enabled is False  # the next frame is held now

    chains = d.post_rx(2048, count=4)
    used = rx_used(d)
    assert [d.read_chain(c, n)[VNET_HDR_LEN:] for c, (_, n) in zip(chains, used)] == frames[1:]
    assert poller.enabled is True  # drained: poll again
    assert net.metrics.rx_packets_count == 3


def test_inactive_device_does_not_read_the_tap(tap, net):
    poller = Poller()
    net.connect_poller(poller)
    assert poller.enabled is False
    tap.inject(packet(FRAME))
    net.on_tap_readable()
    assert tap.reads == 0 and net.metrics.rx_tap_event_count == 1


def test_rx_chain_too_small_is_returned_unused(d, tap, net):
    small = d.post_rx(1000, notify=False)
    good = d.post_rx(1526)
    tap.inject(packet(FRAME))
    net.on_tap_readable()
    used = rx_used(d)
    assert used[0][1] == 0 and used[1][1] == VNET_HDR_LEN + len(FRAME)
    assert d.mem.read(small[0][0].addr, 4) == b"\xee" * 4
    assert d.read_chain(good[0], used[1][1])[VNET_HDR_LEN:] == FRAME
    assert net.metrics.rx_fails == 1


def test_rx_chain_with_a_readable_descriptor_is_returned_unused(d, tap, net):
    bad = [Buf(d.arena.alloc(2048, fill=b"\xee"), 2048, False)]
    d.rxq.add_chain(bad)
    (good,) = d.post_rx(2048)
    tap.inject(packet(FRAME))
    net.on_tap_readable()
    used = rx_used(d)
    assert used[0][1] == 0 and d.mem.read(bad[0].addr, 2048) == b"\xee" * 2048
    assert d.read_chain(good, used[1][1])[VNET_HDR_LEN:] == FRAME
    assert net.metrics.rx_fails == 1


def test_rx_frame_too_big_for_the_buffers_is_dropped_buffer_kept(d, tap, net):
    (chain,) = d.post_rx(1526)
    tap.inject(packet(eth_frame(b"j" * 4000)))
    tap.inject(packet(FRAME))
    net.on_tap_readable()
    ((head, length),) = rx_used(d)
    assert d.read_chain(chain, length)[VNET_HDR_LEN:] == FRAME
    assert net.metrics.rx_dropped == 1


def test_rx_short_tap_frame_is_dropped(d, tap, net):
    d.post_rx(2048)
    tap.inject(b"\0" * 20)
    tap.inject(packet(FRAME))
    net.on_tap_readable()
    assert [n for _, n in rx_used(d)] == [VNET_HDR_LEN + len(FRAME)]
    assert net.metrics.rx_dropped == 1


def test_rx_mergeable_buffers_spread_a_frame(tap, mem):
    net = Net("a", tap)
    d = NetDriver(net, mem, features=MRG)
    chains = d.post_rx(2048, count=4)
    frame = eth_frame(bytes(range(256)) * 20)  # 5134 bytes: three buffers
    tap.inject(packet(frame))
    net.on_tap_readable()
    used = rx_used(d)
    total = VNET_HDR_LEN + len(frame)
    assert [n for _, n in used] == [2048, 2048, total - 4096]
    data = b"".join(d.read_chain(c, n) for c, (_, n) in zip(chains, used))
    assert NetHeader.unpack(data).num_buffers == 3
    assert data[VNET_HDR_LEN:] == frame


def test_rx_mergeable_waits_for_enough_buffers(tap, mem):
    net = Net("a", tap)
    d = NetDriver(net, mem, features=MRG)
    poller = Poller()
    net.connect_poller(poller)
    d.post_rx(1024, count=2)
    frame = eth_frame(b"m" * 3000)
    tap.inject(packet(frame))
    net.on_tap_readable()
    assert rx_used(d) == [] and poller.enabled is False
    assert net.queues[0].next_avail == 0  # both chains given back
    d.post_rx(1024, count=2)
    used = rx_used(d)
    assert [n for _, n in used] == [1024, 1024, VNET_HDR_LEN + len(frame) - 2048]
    assert poller.enabled is True


def test_rx_mergeable_broken_chain_mid_frame(tap, mem):
    net = Net("a", tap)
    d = NetDriver(net, mem, features=MRG)
    (first,) = d.post_rx(1024, notify=False)
    d.rxq.add_chain([Buf(d.arena.alloc(64), 64, False)])  # readable: broken
    frame = eth_frame(b"q" * 3000)
    tap.inject(packet(frame))
    net.on_tap_readable()
    # The broken chain is completed, and the one taken before it cannot be rewound past it.
    assert sorted(n for _, n in rx_used(d)) == [0, 0]
    assert net.metrics.rx_fails == 2
    chains = d.post_rx(2048, count=2)
    used = rx_used(d)
    data = b"".join(d.read_chain(c, n) for c, (_, n) in zip(chains, used))
    assert data[VNET_HDR_LEN:] == frame


def test_rx_frame_larger_than_the_whole_ring_is_dropped(tap, mem):
    net = Net("a", tap)
    d = NetDriver(net, mem, features=MRG, queue_size=4)
    d.post_rx(64, count=4)
    tap.inject(packet(eth_frame(b"z" * 1000)))
    tap.inject(packet(eth_frame(b"s" * 30)))
    net.on_tap_readable()
    assert net.metrics.rx_dropped == 1
    assert [n for _, n in rx_used(d)] == [56]


def test_rx_offload_header_rules(tap, mem):
    csum_hdr = NetHeader(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=6)
    valid_hdr = NetHeader(flags=VIRTIO_NET_HDR_F_DATA_VALID)
    net = Net("a", tap)
    d = NetDriver(net, mem, features=BASIC)
    chains = d.post_rx(2048, count=2)
    tap.inject(packet(FRAME, csum_hdr))  # the guest cannot take a partial checksum
    tap.inject(packet(FRAME, valid_hdr))  # DATA_VALID is only for GUEST_CSUM guests
    net.on_tap_readable()
    ((_, n),) = rx_used(d)
    assert NetHeader.unpack(d.read_chain(chains[0], n)) == NetHeader(num_buffers=1)
    assert net.metrics.rx_dropped == 1

    net2 = Net("b", tap)
    d2 = NetDriver(net2, mem, features=CSUM)
    chains = d2.post_rx(2048, count=2)
    tap.inject(packet(FRAME, csum_hdr))
    tap.inject(packet(FRAME, valid_hdr))
    net2.on_tap_readable()
    got = [NetHeader.unpack(d2.read_chain(c, n)) for c, (_, n) in zip(chains, rx_used(d2))]
    assert got == [dataclasses.replace(csum_hdr, num_buffers=1), dataclasses.replace(valid_hdr, num_buffers=1)]


def test_rx_needs_full_size_buffers_with_guest_tso_and_no_mrg(tap, mem):
    net = Net("a", tap)
    d = NetDriver(net, mem, features=CSUM | feature(VIRTIO_NET_F_GUEST_TSO4))
    d.post_rx(2048)
    (big,) = d.post_rx(MAX_BUFFER_SIZE)
    tap.inject(packet(FRAME))
    net.on_tap_readable()
    used = rx_used(d)
    assert used[0][1] == 0 and used[1][1] == VNET_HDR_LEN + len(FRAME)
    assert net.metrics.rx_fails == 1


def test_tap_read_error_stops_polling_until_a_read_succeeds(d, tap, net):
    poller = Poller()
    net.connect_poller(poller)
    tap.read_error = OSError(errno.EBADFD, "File descriptor in bad state")
    tap.inject(packet(FRAME))
    net.on_tap_readable()
    assert net.metrics.tap_read_fails == 1 and poller.enabled is False
    tap.read_error = None
    d.post_rx(2048)  # a guest kick tries the TAP again
    assert [n for _, n in rx_used(d)] == [VNET_HDR_LEN + len(FRAME)]
    assert poller.enabled is True


def test_reset_drops_the_pending_frame_and_stops_polling(d, tap, net):
    poller = Poller()
    net.connect_poller(poller)
    tap.inject(packet(FRAME))
    net.on_tap_readable()
    assert not net.wants_tap_polling
    d.mmio.write32(mmio.STATUS, 0)
    assert not net.is_activated and poller.enabled is False
    d.rxq, d.txq = VirtQueue(d.mem, RXQ_BASE, 16), VirtQueue(d.mem, TXQ_BASE, 16)
    d.mmio.init({0: d.rxq, 1: d.txq}, BASIC)
    assert poller.enabled is True
    d.post_rx(2048)
    assert rx_used(d) == []  # the frame held before the reset is gone


# --- MMDS ---------------------------------------------------------------------------------------------------


def test_mmds_detour_both_directions(d, tap, net):
    reply = eth_frame(b"mmds says hi".ljust(46, b"\0"), src=HOST_MAC, dst=GUEST_MAC)
    stack = FakeMmds(ethertype=0x0806, reply=reply)
    net.set_mmds(stack)
    (chain,) = d.post_rx(2048)
    request = eth_frame(b"who has 169.254.169.254".ljust(46, b"\0"), ethertype=0x0806)
    head = d.send(packet(request))
    assert stack.detoured == [request]
    assert tap.sent() == []  # consumed: never reaches the TAP
    assert d.txq.take_used() == [(head, 0)]
    ((_, n),) = rx_used(d)  # the reply went out in the same TX pass
    data = d.read_chain(chain, n)
    assert NetHeader.unpack(data) == NetHeader(num_buffers=1) and data[VNET_HDR_LEN:] == reply
    m = net.metrics
    assert (m.mmds_rx_accepted, m.mmds_tx_frames, m.mmds_tx_bytes) == (1, 1, len(reply))
    assert m.tx_packets_count == 0 and m.rx_packets_count == 1

    d.send(packet(FRAME))  # not for the MMDS: to the TAP
    assert tap.sent() == [packet(FRAME)] and stack.offered[-1] == FRAME


def test_mmds_frames_go_before_tap_frames(d, tap, net):
    stack = FakeMmds()
    mmds_frame = eth_frame(b"from mmds".ljust(46, b"\0"), src=HOST_MAC)
    stack.outbox.append(mmds_frame)
    net.set_mmds(stack)  # no buffer yet: the MMDS frame is held
    tap.inject(packet(FRAME))
    chains = d.post_rx(2048, count=2)
    used = rx_used(d)
    assert [d.read_chain(c, n)[VNET_HDR_LEN:] for c, (_, n) in zip(chains, used)] == [mmds_frame, FRAME]


def test_mmds_gets_completed_checksums(tap, mem):
    net = Net("a", tap)
    d = NetDriver(net, mem, features=CSUM)
    stack = FakeMmds(ethertype=0x0800)
    net.set_mmds(stack)
    # IPv4 + UDP with the pseudo-header sum in the checksum field (CHECKSUM_PARTIAL).
    src, dst, payload = bytes([10, 0, 0, 2]), bytes([169, 254, 169, 254]), b"GET /latest\r\n"
    udp_len = 8 + len(payload)
    pseudo = _fold(_sum16(src + dst + struct.pack(">BBH", 0, 17, udp_len)))
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 0, 0, 64, 17, 0, src, dst)
    udp = struct.pack(">HHHH", 40000, 80, udp_len, pseudo) + payload
    frame = eth_frame(ip + udp, ethertype=0x0800)
    hdr = NetHeader(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=6)
    d.send(packet(frame, hdr))
    (got,) = stack.detoured
    full = _fold(_sum16(src + dst + struct.pack(">BBH", 0, 17, udp_len)) + _sum16(got[34:]))
    assert full == 0xFFFF  # the checksum verifies
    assert got[:40] == frame[:40] and got[42:] == frame[42:]


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    return sum(struct.unpack(f">{len(data) // 2}H", data))


def _fold(value: int) -> int:
    while value >> 16:
        value = (value & 0xFFFF) + (value >> 16)
    return value


def test_mmds_traffic_is_not_rate_limited(tap, mem, clock):
    net = Net("a", tap, tx_rate_limiter=manual_limiter(clock, ops=1))
    d = NetDriver(net, mem, features=BASIC)
    net.set_mmds(FakeMmds(ethertype=0x0806))
    arp = eth_frame(b"a" * 46, ethertype=0x0806)
    for _ in range(3):
        d.send(packet(arp))
    assert net.metrics.mmds_rx_accepted == 3 and net.metrics.tx_rate_limiter_throttled == 0


def test_detached_mmds_sees_nothing(d, tap, net):
    stack = FakeMmds(ethertype=0x0806)
    net.set_mmds(stack)
    net.set_mmds(None)
    d.send(packet(eth_frame(b"a" * 46, ethertype=0x0806)))
    assert stack.offered == [] and len(tap.sent()) == 1


# --- rate limiting ---------------------------------------------------------------------------------------


def test_tx_rate_limiter_throttles_then_resumes(tap, mem, clock):
    net = Net("a", tap, tx_rate_limiter=manual_limiter(clock, ops=1))
    d = NetDriver(net, mem, features=BASIC)
    heads = [d.send(packet(eth_frame(bytes([i]) * 50)), notify=False) for i in range(2)]
    d.mmio.notify(1)
    assert len(tap.sent()) == 1 and d.txq.take_used() == [(heads[0], 0)]
    assert net.metrics.tx_rate_limiter_throttled == 1
    d.mmio.notify(1)  # still blocked: nothing moves
    assert tap.sent() == [] and net.metrics.tx_rate_limiter_throttled == 2
    clock.advance_ms(100)
    net.on_tx_rate_limiter_event()
    assert len(tap.sent()) == 1 and d.txq.take_used() == [(heads[1], 0)]
    assert net.metrics.tx_rate_limiter_event_count == 1


def test_rx_rate_limiter_throttles_then_resumes(tap, mem, clock):
    frame_len = VNET_HDR_LEN + len(FRAME)
    net = Net("a", tap, rx_rate_limiter=manual_limiter(clock, bandwidth=frame_len))
    d = NetDriver(net, mem, features=BASIC)
    poller = Poller()
    net.connect_poller(poller)
    d.post_rx(2048, count=4)
    for _ in range(3):
        tap.inject(packet(FRAME))
    net.on_tap_readable()
    assert len(rx_used(d)) == 1 and poller.enabled is False
    assert net.metrics.rx_rate_limiter_throttled == 1
    net.on_tap_readable()  # spurious wake while blocked: still held
    assert rx_used(d) == []
    clock.advance_ms(100)
    net.on_rx_rate_limiter_event()  # the second frame goes; the third is held for the next refill
    assert len(rx_used(d)) == 1 and poller.enabled is False
    clock.advance_ms(100)
    net.on_rx_rate_limiter_event()
    assert len(rx_used(d)) == 1
    assert poller.enabled is True and net.metrics.rx_packets_count == 3


def test_spurious_rate_limiter_event_is_counted(net):
    net.on_rx_rate_limiter_event()
    net.on_tx_rate_limiter_event()
    assert net.metrics.event_fails == 2


def test_update_rate_limiters_in_place(tap, mem, clock):
    rx, tx = manual_limiter(clock), manual_limiter(clock)
    net = Net("a", tap, rx_rate_limiter=rx, tx_rate_limiter=tx)
    d = NetDriver(net, mem, features=BASIC)
    net.update_rate_limiters(tx=RateLimiterConfig(ops=TokenBucketConfig(size=1, refill_time=100)))
    assert net.tx_rate_limiter is tx and tx.ops.capacity == 1 and rx.ops is None
    for _ in range(2):
        d.send(packet(FRAME), notify=False)
    d.mmio.notify(1)
    assert len(tap.sent()) == 1
    net.update_rate_limiters(rx=RateLimiterConfig(bandwidth=TokenBucketConfig(size=10, refill_time=10)))
    assert rx.bandwidth.capacity == 10 and tx.ops.capacity == 1


# --- event-loop wiring -----------------------------------------------------------------------------------


def test_fds_lists_the_tap_and_the_limiter_timers(tap):
    net = Net("a", tap)
    try:
        sources = {s.name: s for s in net.fds()}
        assert set(sources) == {"tap", "rx_rate_limiter", "tx_rate_limiter"}
        assert sources["tap"].fd == tap.fileno() and sources["tap"].on_readable == net.on_tap_readable
        assert sources["rx_rate_limiter"].fd == net.rx_rate_limiter.fd
        assert sources["tx_rate_limiter"].on_readable == net.on_tx_rate_limiter_event
    finally:
        net.close()


def test_fds_skips_limiters_without_a_timer_fd(net, tap):
    assert [s.name for s in net.fds()] == ["tap"]


def test_real_timer_fd_drives_the_tx_limiter(tap, mem):
    limiter = RateLimiter.from_config(RateLimiterConfig(ops=TokenBucketConfig(size=1, refill_time=10)),
                                      timer=TimerFd())
    net = Net("a", tap, tx_rate_limiter=limiter)
    try:
        d = NetDriver(net, mem, features=BASIC)
        for _ in range(2):
            d.send(packet(FRAME), notify=False)
        d.mmio.notify(1)
        assert len(tap.sent()) == 1
        (timer,) = [s for s in net.fds() if s.name == "tx_rate_limiter"]
        ready, _, _ = select.select([timer.fd], [], [], 2.0)
        assert ready == [timer.fd]  # 100 ms later: the 10 ms bucket is full again
        timer.on_readable()
        assert len(tap.sent()) == 1
    finally:
        net.close()


# --- persistence -------------------------------------------------------------------------------------------


def test_save_restore_round_trip(tap, mem, clock):
    net = Net("eth0", tap, MacAddr(GUEST_MAC), manual_limiter(clock, ops=100), manual_limiter(clock), mtu=1500)
    d = NetDriver(net, mem, features=MRG | feature(VIRTIO_NET_F_MAC))
    net.set_mmds(FakeMmds())
    d.send(packet(FRAME))
    tap.sent()
    tap.inject(packet(FRAME))
    net.on_tap_readable()  # no buffer: the frame is pending across the save
    state = net.state()
    assert state.pending_rx_frame == packet(FRAME) and state.mmds_attached and state.host_dev_name == "tap0"

    new_tap = FakeTap("tap0")
    opened = []

    def open_tap(name):
        opened.append(name)
        return new_tap
    restored = Net.from_state(state, mem, d.irq, open_tap=open_tap,
                              restore_limiter=lambda s: RateLimiter.from_state(s, clock=clock))
    try:
        assert opened == ["tap0"]
        assert restored.state() == dataclasses.replace(state, mmds_attached=False)
        assert restored.is_activated and restored.guest_mac == MacAddr(GUEST_MAC) and restored.mtu == 1500
        assert not restored.wants_tap_polling
        assert restored.rx_rate_limiter.ops.capacity == 100
        assert new_tap.offload_calls == [0]
        # The restored device serves the same rings: the pending frame, then TX.
        d.net = restored
        d.transport = MmioTransport.from_state(d.transport.state(), restored, mem, interrupt=d.irq)
        d.mmio = MmioDriver(d.transport)
        (chain,) = d.post_rx(2048)
        ((_, n),) = rx_used(d)
        assert d.read_chain(chain, n)[VNET_HDR_LEN:] == FRAME
        assert restored.wants_tap_polling
        d.send(packet(FRAME))
        assert new_tap.sent() == [packet(FRAME)]
    finally:
        restored.close()
        new_tap.close_all()


def test_state_of_an_inactive_device_restores_inactive(net, mem, tap):
    state = net.state()
    restored = Net.from_state(state, mem, d_irq(), open_tap=lambda name: FakeTap(name),
                              restore_limiter=lambda s: RateLimiter.from_state(s, timer=_manual()))
    assert not restored.is_activated and restored.state() == state
    restored.close()


def d_irq():
    return new_interrupt()[0]


def _manual():
    return ManualTimer()


def _bad_states(state: NetState) -> list[NetState]:
    r = dataclasses.replace
    return [
        r(state, iface_id=""),
        r(state, host_dev_name="a/b"),
        r(state, host_dev_name="x" * 16),
        r(state, guest_mac="zz:zz"),
        r(state, mtu=10),
        r(state, queue_size=3),
        r(state, queue_size=1 << 16),
        r(state, rx_rate_limiter=None),
        r(state, mmds_attached=1),
        r(state, pending_rx_frame=b"short"),
        r(state, pending_rx_frame=bytes(MAX_BUFFER_SIZE + 1)),
        r(state, virtio=None),
        r(state, virtio=r(state.virtio, device_type=2)),
        r(state, virtio=r(state.virtio, acked_features=state.virtio.acked_features | (1 << 40))),
    ]


def test_invalid_states_are_refused(net, mem, tap, clock):
    NetDriver(net, mem, features=BASIC)
    state = net.state()
    for bad in _bad_states(state):
        with pytest.raises(NetStateInvalid):
            Net.from_state(bad, mem, d_irq(), open_tap=lambda name: FakeTap(name),
                           restore_limiter=lambda s: RateLimiter.from_state(s, timer=_manual()))


def test_pending_frame_must_fit_the_negotiated_features(net, mem):
    NetDriver(net, mem, features=BASIC)
    hdr = NetHeader(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=6)
    state = dataclasses.replace(net.state(), pending_rx_frame=packet(FRAME, hdr))
    with pytest.raises(NetStateInvalid, match="pending RX frame"):
        Net.from_state(state, mem, d_irq(), open_tap=lambda name: FakeTap(name),
                       restore_limiter=lambda s: RateLimiter.from_state(s, timer=_manual()))


def test_restore_reports_a_missing_tap(net, mem):
    def open_tap(name):
        raise TapNotFound(f"cannot open TAP {name}: no such network interface")
    with pytest.raises(NetError, match="cannot open TAP tap0"):
        Net.from_state(net.state(), mem, d_irq(), open_tap=open_tap,
                       restore_limiter=lambda s: RateLimiter.from_state(s, timer=_manual()))


def test_repr(net, mem):
    assert repr(net) == f"<Net eth0 tap=tap0 mac={MacAddr(GUEST_MAC)}>"
    NetDriver(net, mem, features=BASIC)
    assert "active" in repr(net)

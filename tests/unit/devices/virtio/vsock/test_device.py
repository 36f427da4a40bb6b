"""The vsock device through the MMIO transport with a driver-side virtqueue, host side on real sockets."""

from __future__ import annotations

import dataclasses
import hashlib
import random
import select
import selectors
import socket
import struct

import pytest

from tests.unit.devices.virtio.mock import Arena, Buf, MmioDriver, VirtQueue, new_interrupt
from tests.unit.devices.virtio.vsock.conftest import GUEST_CID, hdr
from vmm.config.vsock import VsockConfig
from vmm.devices.virtio import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, feature
from vmm.devices.virtio.queue import VIRTQ_DESC_F_NEXT
from vmm.devices.virtio.transport import CONFIG_SPACE, MmioTransport
from vmm.devices.virtio.transport import mmio
from vmm.devices.virtio.vsock import (
    EVQ_INDEX,
    MAX_PKT_BUF_SIZE,
    RXQ_INDEX,
    TXQ_INDEX,
    VIRTIO_VSOCK_OP_CREDIT_REQUEST,
    VIRTIO_VSOCK_OP_CREDIT_UPDATE,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_OP_SHUTDOWN,
    VIRTIO_VSOCK_SHUTDOWN_RCV,
    VIRTIO_VSOCK_SHUTDOWN_SEND,
    PacketHeader,
    Vsock,
    VsockError,
    VsockStateInvalid,
)
from vmm.devices.virtio.vsock.muxer import LOCAL_PORT_FIRST, LOCAL_PORT_LIMIT

RX_DATA = 4096
BOTH = VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND


class VsockDriver:
    """The guest's virtio-vsock driver, as far as the tests need one: three queues, raw packets."""

    def __init__(self, vsock: Vsock, mem, *, features: int | None = None, queue_size: int = 16):
        self.vsock, self.mem = vsock, mem
        self.irq, self.edges = new_interrupt()
        self.transport = MmioTransport(vsock, mem, interrupt=self.irq)
        self.mmio = MmioDriver(self.transport)
        self.rxq = VirtQueue(mem, 0x1000, queue_size)
        self.txq = VirtQueue(mem, self.rxq.end, queue_size)
        self.evq = VirtQueue(mem, self.txq.end, queue_size)
        self.arena = Arena(mem, 0x10_0000, mem.total_size)
        self.rx_bufs: dict[int, tuple[int, int]] = {}
        self.ev_bufs: dict[int, int] = {}
        self.mmio.init({RXQ_INDEX: self.rxq, TXQ_INDEX: self.txq, EVQ_INDEX: self.evq}, features)

    def post_rx(self, n: int = 1, *, notify: bool = True) -> None:
        for _ in range(n):
            h, d = self.arena.alloc(44), self.arena.alloc(RX_DATA)
            head = self.rxq.add_chain([Buf(h, 44, True), Buf(d, RX_DATA, True)])
            self.rx_bufs[head] = (h, d)
        if notify:
            self.mmio.notify(RXQ_INDEX)

    def post_event(self, *, notify: bool = True) -> int:
        e = self.arena.alloc(4, fill=b"\xff")
        head = self.evq.add_chain([Buf(e, 4, True)])
        self.ev_bufs[head] = e
        if notify:
            self.mmio.notify(EVQ_INDEX)
        return e

    def send_raw(self, bufs: list[Buf]) -> list[tuple[int, int]]:
        self.txq.add_chain(bufs)
        self.mmio.notify(TXQ_INDEX)
        return self.txq.take_used()

    def packet_buf(self, header: PacketHeader, data: bytes = b"") -> Buf:
        raw = header.with_len(len(data)).pack() + data
        addr = self.arena.alloc(len(raw))
        self.mem.write(addr, raw)
        return Buf(addr, len(raw))

    def send(self, header: PacketHeader, data: bytes = b"") -> None:
        assert self.send_raw([self.packet_buf(header, data)])[0][1] == 0

    def received(self) -> list[tuple[PacketHeader, bytes]]:
        out = []
        for head, length in self.rxq.take_used():
            h, d = self.rx_bufs.pop(head)
            if length == 0:
                out.append((None, b""))
                continue
            header = PacketHeader.unpack(self.mem.read(h, 44))
            assert length == 44 + header.len
            out.append((header, self.mem.read(d, header.len)))
        return out


@pytest.fixture
def uds(sockdir) -> str:
    return str(sockdir / "v.sock")


@pytest.fixture
def vsock(uds, clock):
    v = Vsock(GUEST_CID, uds, clock=clock)
    yield v
    v.close()


@pytest.fixture
def drv(vsock, mem) -> VsockDriver:
    return VsockDriver(vsock, mem)


def listener(path: str) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(4)
    server.settimeout(2)
    return server


def connect_from_guest(drv: VsockDriver, uds: str, port: int = 1234, guest_port: int = 5000) -> socket.socket:
    server = listener(f"{uds}_{port}")
    drv.post_rx(4)
    drv.send(hdr(VIRTIO_VSOCK_OP_REQUEST, src_port=guest_port, dst_port=port))
    (response,) = drv.received()
    assert response[0].op == VIRTIO_VSOCK_OP_RESPONSE
    peer, _ = server.accept()
    peer.settimeout(2)
    server.close()
    return peer


def wait_and_serve(vsock: Vsock, timeout: float = 2.0) -> None:
    ((fd, handler),) = vsock.fds()
    if select.select([fd], [], [], timeout)[0]:
        handler()


# --- device basics ----------------------------------------------------------------------------------


def test_features_queues_and_config(vsock, drv):
    assert vsock.avail_features == feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_RING_F_EVENT_IDX)
    assert vsock.device_type == 19 and len(vsock.queues) == 3
    assert drv.transport.read(CONFIG_SPACE, 8) == struct.pack("<Q", GUEST_CID)
    assert drv.transport.read(CONFIG_SPACE, 4) == struct.pack("<I", GUEST_CID)
    drv.transport.write(CONFIG_SPACE, struct.pack("<Q", 99))
    assert vsock.config_bytes() == struct.pack("<Q", GUEST_CID) and vsock.metrics.cfg_fails == 1
    assert repr(vsock).startswith("<Vsock cid=3") and "active" in repr(vsock)


@pytest.mark.parametrize("cid", [0, 1, 2, 0xFFFF_FFFF, -5, "3"])
def test_reserved_cids_are_refused(uds, cid):
    with pytest.raises(VsockError):
        Vsock(cid, uds)


def test_existing_socket_path_is_refused(uds):
    open(uds, "w").close()
    with pytest.raises(VsockError, match="already exists"):
        Vsock(GUEST_CID, uds)


def test_from_config(uds):
    v = Vsock.from_config(VsockConfig(guest_cid=7, uds_path=uds))
    assert v.guest_cid == 7 and v.uds_path == uds
    v.close()


# --- connections through the device ------------------------------------------------------------------


def test_guest_initiated_connection_and_data(vsock, drv, uds):
    edges = drv.edges.count
    peer = connect_from_guest(drv, uds)
    assert drv.edges.count > edges
    drv.send(hdr(VIRTIO_VSOCK_OP_RW, src_port=5000, dst_port=1234), b"hello host")
    assert peer.recv(100) == b"hello host"
    peer.sendall(b"hello guest")
    wait_and_serve(vsock)
    ((header, data),) = drv.received()
    assert (header.op, header.src_port, header.dst_port, data) == (VIRTIO_VSOCK_OP_RW, 1234, 5000, b"hello guest")
    assert vsock.metrics.rx_bytes_count == 11 and vsock.metrics.tx_bytes_count == 10


def test_host_initiated_connection(vsock, drv, uds):
    drv.post_rx(2)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(uds)
    client.settimeout(2)
    client.sendall(b"CONNECT 52\n")
    for _ in range(5):  # accept, then read the line
        wait_and_serve(vsock, timeout=0.5)
        if drv.rxq.used_idx:
            break
    ((request, _),) = drv.received()
    assert (request.op, request.dst_port, request.dst_cid) == (VIRTIO_VSOCK_OP_REQUEST, 52, GUEST_CID)
    drv.send(hdr(VIRTIO_VSOCK_OP_RESPONSE, src_port=52, dst_port=request.src_port))
    assert client.recv(100) == b"OK %d\n" % request.src_port


def test_rx_waits_for_buffers(vsock, drv, uds):
    server = listener(f"{uds}_1234")
    drv.send(hdr(VIRTIO_VSOCK_OP_REQUEST, src_port=5000, dst_port=1234))
    assert drv.received() == [] and vsock.muxer.has_pending_rx
    drv.post_rx(1)  # the RX notification delivers what waited
    assert drv.received()[0][0].op == VIRTIO_VSOCK_OP_RESPONSE
    server.close()


def test_guest_connect_refused_gets_rst(drv):
    drv.post_rx(1)
    drv.send(hdr(VIRTIO_VSOCK_OP_REQUEST, src_port=5000, dst_port=4321))
    ((header, _),) = drv.received()
    assert (header.op, header.src_port, header.dst_port) == (VIRTIO_VSOCK_OP_RST, 4321, 5000)


def test_one_mib_each_way_with_event_idx(vsock, mem, uds):
    drv = VsockDriver(vsock, mem, queue_size=64)
    assert vsock.has_feature(VIRTIO_RING_F_EVENT_IDX)
    peer = connect_from_guest(drv, uds)
    peer.setblocking(False)
    size = 1 << 20
    rng = random.Random(5)
    down, up = rng.randbytes(size), rng.randbytes(size)
    got_guest, got_host = bytearray(), bytearray()
    sent_host = sent_guest = 0
    peer_buf_alloc, peer_fwd_cnt = 0, 0  # the device's credit, as the guest last heard it
    drv.post_rx(24)  # 27 chains of two descriptors outstanding: the mock hands out descriptors in a ring
    for _ in range(100_000):
        if len(got_guest) == size and len(got_host) == size:
            break
        if sent_host < size:
            try:
                sent_host += peer.send(down[sent_host:sent_host + 65536])
            except BlockingIOError:
                pass
        vsock.on_host_events()
        packets = drv.received()
        for header, data in packets:
            assert header.op in (VIRTIO_VSOCK_OP_RW, VIRTIO_VSOCK_OP_CREDIT_REQUEST, VIRTIO_VSOCK_OP_CREDIT_UPDATE)
            assert len(data) <= RX_DATA
            peer_buf_alloc, peer_fwd_cnt = header.buf_alloc, header.fwd_cnt
            got_guest += data
        if packets:
            drv.post_rx(len(packets))
            # The guest's buf_alloc is 64 KiB; it consumes at once and tells the device.
            drv.send(hdr(VIRTIO_VSOCK_OP_CREDIT_UPDATE, src_port=5000, dst_port=1234, fwd_cnt=len(got_guest)))
        credit = peer_buf_alloc - (sent_guest - peer_fwd_cnt)
        if sent_guest < size and credit > 0:
            n = min(4000, size - sent_guest, credit)
            drv.send(hdr(VIRTIO_VSOCK_OP_RW, src_port=5000, dst_port=1234, fwd_cnt=len(got_guest)),
                     up[sent_guest:sent_guest + n])
            sent_guest += n
        try:
            got_host += peer.recv(1 << 20)
        except BlockingIOError:
            pass
    assert hashlib.sha256(got_guest).digest() == hashlib.sha256(down).digest()
    assert hashlib.sha256(got_host).digest() == hashlib.sha256(up).digest()
    assert vsock.metrics.conns_killed == 0


# --- malformed guest input ---------------------------------------------------------------------------


def test_malformed_tx_chains_are_dropped_and_counted(vsock, drv, mem):
    drv.post_rx(4)
    good = drv.packet_buf(hdr(VIRTIO_VSOCK_OP_RW, src_port=1, dst_port=2), b"x" * 10)
    short = Buf(good.addr, 20)
    too_long = drv.packet_buf(hdr(VIRTIO_VSOCK_OP_RW, src_port=1, dst_port=2, length=MAX_PKT_BUF_SIZE + 1))
    mem.write(too_long.addr + 24, struct.pack("<I", MAX_PKT_BUF_SIZE + 1))
    truncated = Buf(good.addr, 44 + 5)  # header says 10 payload bytes
    for bufs in ([short], [Buf(too_long.addr, 44)], [truncated], [Buf(good.addr, good.length, writable=True)]):
        ((_, used_len),) = drv.send_raw(bufs)
        assert used_len == 0
    # A descriptor loop: the queue's chain walk rejects it.
    index = drv.txq.next_desc
    drv.txq.write_desc(index, good.addr, good.length, VIRTQ_DESC_F_NEXT, index)
    drv.txq.next_desc += 1
    drv.txq.publish(index)
    drv.mmio.notify(TXQ_INDEX)
    assert [length for _, length in drv.txq.take_used()] == [0]
    assert vsock.metrics.tx_malformed_packets == 5
    assert not drv.mmio.status & mmio.DEVICE_STATUS_NEEDS_RESET
    # None of them reached the muxer, so no RST either: the headers named no connection.
    assert drv.received() == [] and vsock.metrics.tx_packets_count == 0


def test_malformed_packet_resets_its_connection(vsock, drv, uds):
    peer = connect_from_guest(drv, uds)
    good = drv.packet_buf(hdr(VIRTIO_VSOCK_OP_RW, src_port=5000, dst_port=1234), b"x" * 10)
    drv.send_raw([Buf(good.addr, 44 + 3)])  # 10 announced, 3 present
    ((header, _),) = drv.received()
    assert header.op == VIRTIO_VSOCK_OP_RST and header.dst_port == 5000
    assert peer.recv(10) == b""
    assert vsock.metrics.conns_killed == 1 and vsock.muxer.connection_count == 0


def test_malformed_rx_buffer_is_returned_unused(vsock, drv, uds):
    bad = drv.arena.alloc(4096)
    head = drv.rxq.add_chain([Buf(bad, 4096, writable=False)])
    drv.rx_bufs[head] = (bad, bad)
    drv.post_rx(1)
    drv.send(hdr(VIRTIO_VSOCK_OP_REQUEST, src_port=5000, dst_port=4321))  # answered with RST
    out = drv.received()
    assert out[0] == (None, b"") and out[1][0].op == VIRTIO_VSOCK_OP_RST
    assert vsock.metrics.rx_malformed_buffers == 1


# --- transport reset, persistence, reset ------------------------------------------------------------------


def test_transport_reset_event_and_rx_gate(vsock, mem, uds):
    drv = VsockDriver(vsock, mem)
    e = drv.post_event()
    peer = connect_from_guest(drv, uds)
    assert vsock.send_transport_reset()
    assert drv.evq.take_used() == [(0, 4)] and mem.read(e, 4) == b"\0\0\0\0"
    assert drv.evq.avail_event == drv.evq.avail_idx  # the refill will be kicked (EVENT_IDX)
    assert peer.recv(10) == b"" and vsock.muxer.connection_count == 0
    assert vsock.pending_event_ack and vsock.metrics.transport_resets == 1
    # Until the guest acknowledges, nothing reaches RX (a REQUEST would be lost in the guest's reset).
    drv.send(hdr(VIRTIO_VSOCK_OP_REQUEST, src_port=5000, dst_port=4321))
    assert drv.received() == []
    drv.post_event()  # re-post + kick: the acknowledgement
    assert not vsock.pending_event_ack
    assert drv.received()[0][0].op == VIRTIO_VSOCK_OP_RST


def test_transport_reset_without_event_buffer(vsock, drv, uds):
    peer = connect_from_guest(drv, uds)
    assert not vsock.send_transport_reset()
    assert vsock.metrics.ev_queue_event_fails == 1 and not vsock.pending_event_ack
    assert peer.recv(10) == b""  # connections are dropped all the same


def test_state_round_trip_and_restore_resets_the_transport(vsock, mem, uds, sockdir, clock):
    drv = VsockDriver(vsock, mem)
    drv.post_event()
    peer = connect_from_guest(drv, uds)
    state = vsock.state()
    assert state.guest_cid == GUEST_CID and state.uds_path == uds and state.virtio.activated
    vsock.close()
    assert peer.recv(10) == b""
    irq, edges = new_interrupt()
    restored = Vsock.from_state(state, mem, irq, uds_path=str(sockdir / "w.sock"), clock=clock)
    try:
        assert restored.is_activated and restored.transport_reset_due
        restored.kick()
        assert drv.evq.take_used() == [(0, 4)] and restored.pending_event_ack and edges.count >= 1
        # The restored device listens at the override path.
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(sockdir / "w.sock"))
        client.close()
    finally:
        restored.close()


def _host_request_port(vsock, drv, path: str) -> tuple[socket.socket, int]:
    """A host client's CONNECT 52 through `path`; the src_port of the REQUEST the guest gets."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)
    client.settimeout(2)
    client.sendall(b"CONNECT 52\n")
    got: list = []
    for _ in range(5):  # accept, then read the line
        wait_and_serve(vsock, timeout=0.5)
        if got := drv.received():
            break
    ((request, _),) = got
    assert request.op == VIRTIO_VSOCK_OP_REQUEST
    return client, request.src_port


def test_a_restored_device_takes_host_ports_after_the_snapshots(vsock, mem, uds, sockdir, clock):
    # The guest may still hold a socket of a connection made before the snapshot: a REQUEST
    # from the same host port would match it and be answered with RST (every Linux clone's
    # first agent connection was refused that way).
    drv = VsockDriver(vsock, mem)
    drv.post_event()
    drv.post_rx(4)
    first, port = _host_request_port(vsock, drv, uds)
    assert port == LOCAL_PORT_FIRST
    state = vsock.state()
    assert state.local_port_last == port
    vsock.close()
    first.close()
    irq, _ = new_interrupt()
    restored = Vsock.from_state(state, mem, irq, uds_path=str(sockdir / "w.sock"), clock=clock)
    try:
        restored.kick()  # the TRANSPORT_RESET
        assert restored.pending_event_ack
        drv.post_event(notify=False)  # the guest acknowledges it (the restored device has no transport here)
        restored.process_queue(EVQ_INDEX)
        assert not restored.pending_event_ack
        client, new_port = _host_request_port(restored, drv, str(sockdir / "w.sock"))
        assert new_port == port + 1
        client.close()
    finally:
        restored.close()


def test_a_snapshot_without_the_last_port_restores_to_a_random_one(vsock, mem, sockdir):
    state = dataclasses.replace(vsock.state(), local_port_last=None)  # a format 1.0 state file
    irq, _ = new_interrupt()
    lasts = []
    for name in ("a.sock", "b.sock"):
        restored = Vsock.from_state(state, mem, irq, uds_path=str(sockdir / name))
        lasts.append(restored.muxer.local_port_last)
        restored.close()
    assert all(LOCAL_PORT_FIRST - 1 <= last < LOCAL_PORT_LIMIT for last in lasts)
    assert lasts[0] != lasts[1]  # 2^30 choices


def test_restore_of_an_inactive_device_sends_nothing(uds, sockdir, mem):
    v = Vsock(GUEST_CID, uds)
    state = v.state()
    v.close()
    irq, _ = new_interrupt()
    restored = Vsock.from_state(state, mem, irq)
    assert not restored.is_activated and not restored.transport_reset_due
    restored.close()


@pytest.mark.parametrize("change", [
    {"guest_cid": 2}, {"guest_cid": 1 << 32}, {"uds_path": ""}, {"uds_path": "a\0b"}, {"uds_path": "x" * 200},
    {"queue_size": 3}, {"queue_size": 0}, {"virtio": None},
    {"local_port_last": 0}, {"local_port_last": LOCAL_PORT_FIRST - 2}, {"local_port_last": LOCAL_PORT_LIMIT},
    {"local_port_last": True}, {"local_port_last": "1073741824"},
])
def test_invalid_states_are_refused(vsock, mem, change):
    state = dataclasses.replace(vsock.state(), **change)
    irq, _ = new_interrupt()
    with pytest.raises(VsockStateInvalid):
        Vsock.from_state(state, mem, irq)
    with pytest.raises(VsockStateInvalid):
        Vsock.from_state("not a state", mem, irq)  # type: ignore[arg-type]


def test_state_with_foreign_features_is_refused(vsock, mem, sockdir):
    state = vsock.state()
    bad = dataclasses.replace(state, uds_path=str(sockdir / "x.sock"),
                              virtio=dataclasses.replace(state.virtio, avail_features=feature(VIRTIO_F_VERSION_1)))
    irq, _ = new_interrupt()
    with pytest.raises(VsockStateInvalid):
        Vsock.from_state(bad, mem, irq)
    assert not (sockdir / "x.sock").exists()  # the half-built device released its socket


def test_driver_reset_drops_connections_and_stops_listening(vsock, drv, uds):
    peer = connect_from_guest(drv, uds)
    drv.mmio.write32(mmio.STATUS, 0)
    assert not vsock.is_activated and vsock.muxer.connection_count == 0
    assert peer.recv(10) == b""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(uds)  # the backlog takes it; nobody serves it until the driver is back
    client.sendall(b"CONNECT 52\n")
    vsock.on_host_events()
    assert vsock.muxer.handshake_count == 0
    client.close()


def test_fds_plug_into_a_selector_loop(vsock, drv, uds):
    drv.post_rx(2)
    sel = selectors.DefaultSelector()
    for fd, handler in vsock.fds():
        sel.register(fd, selectors.EVENT_READ, handler)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(uds)
    client.sendall(b"CONNECT 52\n")
    for _ in range(5):
        for key, _ in sel.select(timeout=0.2):
            key.data()
        if drv.rxq.used_idx:
            break
    assert drv.received()[0][0].op == VIRTIO_VSOCK_OP_REQUEST
    assert not sel.select(timeout=0)  # served: the loop does not spin
    sel.close()
    client.close()


def test_guest_closes_cleanly(vsock, drv, uds):
    peer = connect_from_guest(drv, uds)
    drv.send(hdr(VIRTIO_VSOCK_OP_SHUTDOWN, src_port=5000, dst_port=1234, flags=BOTH))
    ((header, _),) = drv.received()
    assert header.op == VIRTIO_VSOCK_OP_RST and peer.recv(10) == b""
    assert vsock.muxer.connection_count == 0 and vsock.metrics.conns_killed == 0

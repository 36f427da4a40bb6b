"""Property tests: random TX chains and random event sequences never raise, respect credit, stay bounded."""

from __future__ import annotations

import shutil
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.devices.virtio.vsock.conftest import GUEST_CID, FakeClock, hdr
from vmm.devices.virtio.queue import VIRTQ_DESC_F_WRITE, Descriptor
from vmm.devices.virtio.vsock import (
    MAX_PKT_BUF_SIZE,
    VIRTIO_VSOCK_OP_RW,
    VSOCK_PKT_HDR_SIZE,
    Connection,
    ConnState,
    Muxer,
    PacketError,
    PacketHeader,
    parse_tx_packet,
)
from vmm.devices.virtio.vsock.muxer import MUXER_RSTQ_SIZE
from vmm.memory import GuestMemory

MEM_SIZE = 0x40000
U32 = 0xFFFF_FFFF

# --- TX packet parsing ---------------------------------------------------------------------------------

lens = st.one_of(st.integers(0, 64), st.integers(0, 0x30000), st.sampled_from([MAX_PKT_BUF_SIZE, MAX_PKT_BUF_SIZE + 1,
                                                                               U32]))
headers = st.builds(PacketHeader, src_cid=st.integers(0, 2**64 - 1), dst_cid=st.integers(0, 2**64 - 1),
                    src_port=st.integers(0, U32), dst_port=st.integers(0, U32), len=lens,
                    type=st.integers(0, 0xFFFF), op=st.integers(0, 0xFFFF), flags=st.integers(0, U32),
                    buf_alloc=st.integers(0, U32), fwd_cnt=st.integers(0, U32))
# A chain cut out of one contiguous byte stream at random points, sometimes with a writable piece.
chains = st.tuples(st.lists(st.integers(1, 0x12000), min_size=0, max_size=6),
                   st.lists(st.booleans(), min_size=6, max_size=6))


@settings(max_examples=300, deadline=None)
@given(header=headers, payload=st.binary(max_size=256), chain=chains)
def test_tx_parsing_never_raises_anything_but_packet_errors(header, payload, chain):
    mem = GuestMemory.anonymous([(0, MEM_SIZE)])
    try:
        raw = header.pack() + payload
        mem.write(0x1000, raw)
        sizes, writable = chain
        descs, addr = [], 0x1000
        for i, size in enumerate(sizes):
            size = min(size, MEM_SIZE - addr)
            if size <= 0:
                break
            descs.append(Descriptor(addr, size, VIRTQ_DESC_F_WRITE if writable[i] and i % 3 == 2 else 0))
            addr += size
        try:
            packet = parse_tx_packet(descs, mem)
        except PacketError:
            return
        assert packet.header == header
        assert len(packet.data) == header.len <= MAX_PKT_BUF_SIZE
        # The payload is the chain's bytes after the header (memory past `raw` is zero).
        assert packet.data == (raw + bytes(header.len))[VSOCK_PKT_HDR_SIZE:VSOCK_PKT_HDR_SIZE + header.len]
    finally:
        mem.close()


# --- the connection state machine ------------------------------------------------------------------------

guest_ops = st.one_of(st.integers(1, 7), st.integers(1, 7), st.integers(0, 20))
events = st.one_of(
    st.tuples(st.just("guest"), guest_ops, st.integers(0, 3), st.integers(0, 3000),
              st.one_of(st.integers(0, 4000), st.integers(0, U32)), st.integers(0, 6000)),
    st.tuples(st.just("host_data"), st.integers(0, 5000)),
    st.tuples(st.just("host_eof"), st.booleans()),
    st.tuples(st.just("host_write"), st.integers(0, 5000)),
    st.tuples(st.just("host_write_shut")),
    st.tuples(st.just("host_failed")),
    st.tuples(st.just("pull"), st.one_of(st.integers(0, 64), st.integers(0, 8192))),
    st.tuples(st.just("tick"), st.floats(0, 3)),
    st.tuples(st.just("kill")),
)


class GuestModel:
    """What the guest knows: how much it may still receive (its own buf_alloc and consumption)."""

    def __init__(self, buf_alloc: int, fwd_cnt: int):
        self.buf_alloc, self.fwd_cnt, self.received = buf_alloc, fwd_cnt, 0


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(local=st.booleans(), peer_buf_alloc=st.integers(0, 5000), seq=st.lists(events, max_size=60))
def test_state_machine_never_raises_and_respects_credit(local, peer_buf_alloc, seq):
    kw = dict(peer_cid=GUEST_CID, local_port=1 << 30, peer_port=52, buf_alloc=4096, pending_rx_max=2048)
    conn = (Connection.local_init(**kw) if local
            else Connection.peer_init(peer_buf_alloc=peer_buf_alloc, **kw))
    now = 0.0
    for event in seq:
        kind = event[0]
        if kind == "guest":
            _, op, flags, buf_alloc, fwd_cnt, n = event
            data = bytes(n) if op == VIRTIO_VSOCK_OP_RW else b""
            header = hdr(op, src_port=52, dst_port=1 << 30, length=len(data), flags=flags, buf_alloc=buf_alloc,
                         fwd_cnt=fwd_cnt)
            conn.recv_packet(header, data, now=now)
        elif kind == "host_data":
            budget = conn.host_read_budget
            conn.host_data(bytes(min(event[1], budget)))
        elif kind == "host_eof":
            conn.host_eof(gone=event[1])
        elif kind == "host_write":
            out = conn.host_outgoing()
            conn.host_wrote(min(event[1], len(out)))
        elif kind == "host_write_shut":
            if conn.host_write_shutdown_due:
                conn.host_write_shut()
        elif kind == "host_failed":
            conn.host_failed("fuzz")
        elif kind == "pull":
            credit = conn.peer_credit
            packet = conn.next_packet(event[1], now=now)
            if packet is not None:
                header, data = packet
                assert header.len == len(data) <= min(event[1], MAX_PKT_BUF_SIZE)
                if header.op == VIRTIO_VSOCK_OP_RW:
                    # The peer never gets more than its credit.
                    assert 0 < len(data) <= credit
                    assert ((conn.rx_cnt - conn.peer_fwd_cnt) & U32) <= conn.peer_buf_alloc
                assert header.fwd_cnt == conn.fwd_cnt and header.buf_alloc == conn.buf_alloc
        elif kind == "tick":
            now += event[1]
            conn.tick(now)
        else:
            conn.kill("fuzz")
        # Bounded buffers, consistent state.
        assert conn.to_host_len <= conn.buf_alloc + len(f"OK {conn.local_port}\n")
        assert conn.to_guest_len <= conn.pending_rx_max
        assert conn.host_read_budget >= 0 and isinstance(conn.state, ConnState)
        if conn.closed:
            assert conn.next_packet(4096, now=now) is None and not conn.has_pending_rx
        assert not (conn.has_pending_rx and conn.state is ConnState.LOCAL_INIT and conn.request_sent)
    # Whatever happened, pulling terminates.
    for _ in range(10):
        if conn.next_packet(4096, now=now) is None:
            break
    else:
        assert conn.state is ConnState.ESTABLISHED  # only a data stream can go on


# --- the muxer with real sockets ------------------------------------------------------------------------

muxer_events = st.one_of(
    st.tuples(st.just("tx"), st.integers(0, 9), st.sampled_from([1, 1, 1, 2]), st.sampled_from([5000, 5001, 7]),
              st.sampled_from([1, 1, 2, 1 << 30]), st.sampled_from([2, 2, 2, 9]),
              st.integers(0, 3), st.integers(0, 70_000), st.integers(0, 300)),
    st.tuples(st.just("pull"), st.integers(0, 5000)),
    st.tuples(st.just("events")),
    st.tuples(st.just("time"), st.floats(0, 3)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seq=st.lists(muxer_events, max_size=80))
def test_muxer_survives_random_guest_traffic(seq):
    import socket

    tmp = tempfile.mkdtemp(prefix="vsf", dir="/tmp")
    clock = FakeClock()
    muxer = Muxer(GUEST_CID, f"{tmp}/v.sock", clock=clock, max_connections=4)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(f"{tmp}/v.sock_1")
    server.listen(16)
    server.setblocking(False)
    accepted = []
    try:
        muxer.activate()
        for event in seq:
            kind = event[0]
            if kind == "tx":
                _, op, type_, src_port, dst_port, dst_cid, flags, buf_alloc, n = event
                data = bytes(n) if op == VIRTIO_VSOCK_OP_RW else b""
                muxer.send_packet(hdr(op, src_port=src_port, dst_port=dst_port, length=len(data), flags=flags,
                                      buf_alloc=buf_alloc, dst_cid=dst_cid, type_=type_), data)
            elif kind == "pull":
                packet = muxer.next_packet(event[1])
                if packet is not None:
                    assert packet[0].len == len(packet[1]) <= event[1]
            elif kind == "events":
                try:
                    sock, _ = server.accept()
                    sock.setblocking(False)
                    sock.send(b"host data")
                    accepted.append(sock)
                except BlockingIOError:
                    pass
                muxer.process_events()
            else:
                clock.advance(event[1])
                muxer.process_events()
            assert muxer.connection_count <= 4
            assert len(muxer._rst_queue) <= MUXER_RSTQ_SIZE
            for conn in muxer.connections():
                assert conn.to_host_len <= conn.buf_alloc + 32 and conn.to_guest_len <= conn.pending_rx_max
        for _ in range(MUXER_RSTQ_SIZE + 100):  # draining terminates
            if muxer.next_packet(4096) is None:
                break
    finally:
        for sock in accepted:
            sock.close()
        server.close()
        muxer.close()
        shutil.rmtree(tmp, ignore_errors=True)

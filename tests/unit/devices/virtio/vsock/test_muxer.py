"""The Unix-socket host side with real sockets, driven step by step by a simulated guest."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import select
import socket
import time

import pytest

from tests.unit.devices.virtio.vsock.conftest import GUEST_CID, GuestDriver, hdr
from vmm.devices.virtio.vsock import (
    CONN_REQUEST_TIMEOUT_S,
    MAX_CONNECT_LINE,
    VIRTIO_VSOCK_OP_CREDIT_REQUEST,
    VIRTIO_VSOCK_OP_CREDIT_UPDATE,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_OP_SHUTDOWN,
    VIRTIO_VSOCK_SHUTDOWN_RCV,
    VIRTIO_VSOCK_SHUTDOWN_SEND,
    Muxer,
    UdsBindFailed,
    UdsPathInUse,
    VsockMetrics,
    parse_connect_command,
)
from vmm.devices.virtio.vsock import connection as connection_module
from vmm.devices.virtio.vsock.muxer import MUXER_RSTQ_SIZE

BOTH = VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND


@pytest.fixture
def uds(sockdir) -> str:
    return str(sockdir / "v.sock")


@pytest.fixture
def muxer(uds, clock):
    m = Muxer(GUEST_CID, uds, clock=clock)
    m.activate()
    yield m
    m.close()


@pytest.fixture
def guest(muxer) -> GuestDriver:
    return GuestDriver(muxer)


def pump(muxer: Muxer, rounds: int = 4) -> None:
    for _ in range(rounds):
        muxer.process_events()


def readable(fd: int, timeout: float = 0.0) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def host_connect(uds: str, line: bytes | None = None) -> socket.socket:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(uds)
    client.settimeout(2)
    if line is not None:
        client.sendall(line)
    return client


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, f"EOF after {len(out)} of {n} bytes"
        out += chunk
    return out


def is_closed(sock: socket.socket) -> bool:
    sock.settimeout(1)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def host_initiated(muxer: Muxer, guest: GuestDriver, uds: str, port: int = 52, extra: bytes = b""):
    client = host_connect(uds, b"CONNECT %d\n" % port + extra)
    pump(muxer)
    guest.poll()
    (request,) = guest.requests
    conn = guest.accept(request)
    assert recv_exactly(client, len(b"OK 1073741824\n")) == b"OK %d\n" % request.src_port
    return client, conn


def guest_initiated(muxer: Muxer, guest: GuestDriver, uds: str, port: int = 1234, guest_port: int = 5000):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(f"{uds}_{port}")
    server.listen(4)
    conn = guest.connect(port, guest_port)
    guest.poll()
    assert conn.state == "established" and conn.ops == [VIRTIO_VSOCK_OP_RESPONSE]
    peer, _ = server.accept()
    peer.settimeout(2)
    server.close()
    return peer, conn


# --- the socket file ---------------------------------------------------------------------------------


def test_existing_path_is_refused_as_firecracker_does(uds):
    with open(uds, "w") as f:
        f.write("not a socket")
    with pytest.raises(UdsPathInUse):
        Muxer(GUEST_CID, uds)


def test_stale_socket_file_is_refused_and_close_removes_ours(uds):
    m = Muxer(GUEST_CID, uds)
    assert os.path.exists(uds)
    with pytest.raises(UdsPathInUse):
        Muxer(GUEST_CID, uds)  # our own socket, still there
    m.close()
    m.close()  # idempotent
    assert not os.path.exists(uds)


def test_close_leaves_a_replaced_path_alone(uds):
    m = Muxer(GUEST_CID, uds)
    os.unlink(uds)
    with open(uds, "w") as f:
        f.write("someone else's")
    m.close()
    assert os.path.exists(uds)


# --- host-initiated connections -----------------------------------------------------------------------


@pytest.mark.parametrize("line,port", [
    (b"CONNECT 52\n", 52), (b"connect 52\n", 52), (b"Connect\t7 extra\n", 7), (b"CONNECT 4294967295\n", 0xFFFF_FFFF),
    (b"CONNECT 4294967296\n", None), (b"CONNECT -1\n", None), (b"CONNECT x\n", None), (b"HELLO 52\n", None),
    (b"CONNECT\n", None), (b"CONNECT \xff\n", None), (b"CONNECT \xd9\xa3\n", None), (b"\n", None),
])
def test_parse_connect_command(line, port):
    assert parse_connect_command(line) == port


def test_connect_request_response_ok(muxer, guest, uds):
    client = host_connect(uds, b"CONNECT 52\n")
    assert readable(muxer.fd)
    pump(muxer)
    assert muxer.connection_count == 1 and muxer.has_pending_rx
    header, data = muxer.next_packet(4096)
    assert (header.op, header.src_port, header.dst_port, header.dst_cid) == (
        VIRTIO_VSOCK_OP_REQUEST, 1 << 30, 52, GUEST_CID)
    assert not muxer.has_pending_rx
    guest.requests.append(header)
    conn = guest.accept(header)
    assert recv_exactly(client, 14) == b"OK 1073741824\n"
    # The stream now flows both ways.
    client.sendall(b"ping")
    pump(muxer)
    guest.poll()
    assert guest.consume(conn) == b"ping"
    guest.send(conn, VIRTIO_VSOCK_OP_RW, b"pong")
    assert recv_exactly(client, 4) == b"pong"
    assert muxer.metrics.conns_added == 1


def test_local_ports_are_assigned_round_robin(muxer, guest, uds):
    c1, g1 = host_initiated(muxer, guest, uds, 52)
    c2, g2 = host_initiated(muxer, guest, uds, 52)
    assert (g1.peer_port, g2.peer_port) == (1 << 30, (1 << 30) + 1)


def test_connect_line_in_pieces_and_data_behind_it(muxer, guest, uds):
    client = host_connect(uds, b"CONN")
    pump(muxer)
    assert muxer.handshake_count == 1 and not muxer.has_pending_rx
    client.sendall(b"ECT 52\nearly bytes")
    pump(muxer)
    guest.poll()
    conn = guest.accept(guest.requests[0])
    assert recv_exactly(client, 14) == b"OK 1073741824\n"
    pump(muxer)
    guest.poll()
    assert guest.consume(conn) == b"early bytes"  # what followed the line is stream data


@pytest.mark.parametrize("line", [b"HELLO 52\n", b"CONNECT x\n", b"CONNECT 99999999999\n",
                                  b"C" * MAX_CONNECT_LINE, b"CONNECT 52"])
def test_bad_connect_lines_close_the_socket(muxer, uds, line):
    client = host_connect(uds, line)
    if line == b"CONNECT 52":
        client.shutdown(socket.SHUT_WR)  # EOF before the newline
    pump(muxer)
    assert is_closed(client)
    assert muxer.connection_count == 0 and muxer.handshake_count == 0
    assert muxer.metrics.host_requests_invalid == 1


def test_guest_refuses_with_rst(muxer, guest, uds):
    client = host_connect(uds, b"CONNECT 52\n")
    pump(muxer)
    guest.poll()
    request = guest.requests[0]
    muxer.send_packet(hdr(VIRTIO_VSOCK_OP_RST, src_port=request.dst_port, dst_port=request.src_port))
    assert is_closed(client)
    assert muxer.connection_count == 0


def test_guest_silence_times_out(muxer, guest, uds, clock):
    client = host_connect(uds, b"CONNECT 52\n")
    pump(muxer)
    guest.poll()
    assert muxer.next_deadline == clock.now + CONN_REQUEST_TIMEOUT_S
    clock.advance(CONN_REQUEST_TIMEOUT_S)
    muxer.process_events()
    assert is_closed(client)
    header, _ = muxer.next_packet(4096)
    assert header.op == VIRTIO_VSOCK_OP_RST and header.dst_port == 52
    assert muxer.connection_count == 0 and muxer.metrics.conns_killed == 1


def test_timer_fd_wakes_the_event_loop(uds, monkeypatch):
    """With the real clock, the muxer fd turns readable when a deadline passes."""
    monkeypatch.setattr(connection_module, "CONN_REQUEST_TIMEOUT_S", 0.05)
    m = Muxer(GUEST_CID, uds)
    try:
        m.activate()
        client = host_connect(uds, b"CONNECT 52\n")
        for _ in range(3):
            m.process_events()
        assert m.next_packet(4096)[0].op == VIRTIO_VSOCK_OP_REQUEST
        assert not readable(m.fd)
        assert readable(m.fd, timeout=2.0)
        m.process_events()
        assert m.next_packet(4096)[0].op == VIRTIO_VSOCK_OP_RST
        assert is_closed(client)
        assert not readable(m.fd)  # the timer was drained and not re-armed
    finally:
        m.close()


def test_host_hangs_up_before_the_guest_answers(muxer, guest, uds):
    client = host_connect(uds, b"CONNECT 52\n")
    pump(muxer)
    guest.poll()
    client.close()
    conn = guest.accept(guest.requests[0])  # the OK line cannot be written
    guest.poll()
    assert conn.state == "closed" and muxer.connection_count == 0


# --- guest-initiated connections ----------------------------------------------------------------------


def test_guest_connects_to_a_listening_host_port(muxer, guest, uds):
    peer, conn = guest_initiated(muxer, guest, uds)
    guest.send(conn, VIRTIO_VSOCK_OP_RW, b"from guest")
    assert recv_exactly(peer, 10) == b"from guest"
    peer.sendall(b"from host")
    pump(muxer)
    guest.poll()
    assert guest.consume(conn) == b"from host"


@pytest.mark.parametrize("stale_file", [False, True])
def test_guest_connect_without_a_listener_gets_rst(muxer, guest, uds, stale_file):
    if stale_file:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(f"{uds}_77")
        s.close()  # the file stays, nobody listens
    conn = guest.connect(77, 6000)
    guest.poll()
    assert conn.state == "closed" and conn.ops == [VIRTIO_VSOCK_OP_RST]
    assert muxer.connection_count == 0 and muxer.metrics.host_connects_refused == 1


def test_packets_for_no_connection(muxer, guest):
    muxer.send_packet(hdr(VIRTIO_VSOCK_OP_RW, src_port=1, dst_port=2, length=1), b"x")
    muxer.send_packet(hdr(VIRTIO_VSOCK_OP_RST, src_port=3, dst_port=4))  # not answered
    muxer.send_packet(hdr(VIRTIO_VSOCK_OP_REQUEST, src_port=5, dst_port=6, type_=2))  # not a stream
    muxer.send_packet(hdr(VIRTIO_VSOCK_OP_REQUEST, src_port=7, dst_port=8, dst_cid=9))  # not for the host
    muxer.send_packet(hdr(VIRTIO_VSOCK_OP_REQUEST, src_port=7, dst_port=8, src_cid=4))  # not from the guest
    guest.poll()
    assert [(h.op, h.src_port, h.dst_port) for h in guest.orphans] == [
        (VIRTIO_VSOCK_OP_RST, 2, 1), (VIRTIO_VSOCK_OP_RST, 6, 5)]
    assert muxer.metrics.tx_dropped_packets == 2


def test_rst_queue_is_bounded(muxer, guest):
    for port in range(MUXER_RSTQ_SIZE + 44):
        muxer.send_packet(hdr(VIRTIO_VSOCK_OP_CREDIT_UPDATE, src_port=port, dst_port=9))
    assert guest.poll() == MUXER_RSTQ_SIZE
    assert muxer.metrics.rst_queue_full == 44


def test_connection_limit(uds, clock, sockdir):
    m = Muxer(GUEST_CID, uds, clock=clock, max_connections=2)
    m.activate()
    try:
        guest = GuestDriver(m)
        peer, _ = guest_initiated(m, guest, uds)
        held = host_connect(uds, b"CONN")  # a pending handshake counts too
        pump(m)
        refused = host_connect(uds)
        pump(m)
        assert is_closed(refused)
        conn = guest.connect(1234, 5001)
        guest.poll()
        assert conn.state == "closed" and m.metrics.conns_refused_limit == 2
        held.close()
        pump(m)
        assert m.handshake_count == 0
    finally:
        m.close()


# --- data, backpressure, shutdown ---------------------------------------------------------------------


def test_no_read_without_guest_credit_and_no_spinning(uds, clock):
    m = Muxer(GUEST_CID, uds, clock=clock)
    m.activate()
    try:
        guest = GuestDriver(m, buf_alloc=100)
        peer, conn = guest_initiated(m, guest, uds)
        peer.sendall(b"x" * 1000)
        pump(m)
        guest.poll()
        assert conn.rx_cnt == 100 and conn.ops[-2:] == [VIRTIO_VSOCK_OP_RW, VIRTIO_VSOCK_OP_CREDIT_REQUEST]
        # The test guest answered the CREDIT_REQUEST with "still full": nothing moves, nothing spins.
        pump(m)
        assert not readable(m.fd) and not m.has_pending_rx
        guest.consume(conn, 100)  # half the buffer freed: the guest sends CREDIT_UPDATE
        assert readable(m.fd)
        pump(m)
        guest.poll()
        assert conn.rx_cnt == 200
    finally:
        m.close()


def test_guest_to_host_backpressure(muxer, guest, uds):
    peer, conn = guest_initiated(muxer, guest, uds)
    peer.setblocking(False)
    budget = conn.peer_credit
    assert budget == 256 * 1024
    blob = random.Random(7).randbytes(budget)
    for i in range(0, budget, 4096):
        guest.send(conn, VIRTIO_VSOCK_OP_RW, blob[i:i + 4096])
    assert conn.peer_credit == 0
    (mconn,) = muxer.connections()
    assert mconn.to_host_len > 0  # the host did not read: what its socket could not take waits here
    # A guest that ignores its credit may fill what is really free (the host socket took some, as
    # Linux and Firecracker count it); one byte more than our buffer holds is a protocol violation.
    room = mconn.buf_alloc - mconn.to_host_len
    conn.peer_buf_alloc += room + 1
    for i in range(0, room, 4096):
        guest.send(conn, VIRTIO_VSOCK_OP_RW, b"c" * min(4096, room - i))
    assert mconn.to_host_len == mconn.buf_alloc and conn.state == "established"
    guest.send(conn, VIRTIO_VSOCK_OP_RW, b"!")
    guest.poll()
    assert conn.state == "closed" and muxer.metrics.conns_killed == 1


def test_host_reading_releases_credit(muxer, guest, uds):
    peer, conn = guest_initiated(muxer, guest, uds)
    blob = random.Random(8).randbytes(256 * 1024)
    for i in range(0, len(blob), 4096):
        guest.send(conn, VIRTIO_VSOCK_OP_RW, blob[i:i + 4096])
    got = b""
    while len(got) < len(blob):
        got += peer.recv(1 << 16)
        pump(muxer)
    assert got == blob
    guest.poll()
    assert VIRTIO_VSOCK_OP_CREDIT_UPDATE in conn.ops and conn.peer_credit == 256 * 1024


def test_host_half_close_and_guest_reply(muxer, guest, uds):
    peer, conn = guest_initiated(muxer, guest, uds)
    peer.sendall(b"request")
    peer.shutdown(socket.SHUT_WR)
    pump(muxer)
    guest.poll()
    assert guest.consume(conn) == b"request"
    assert conn.peer_shutdown == VIRTIO_VSOCK_SHUTDOWN_SEND
    guest.send(conn, VIRTIO_VSOCK_OP_RW, b"response")
    guest.send(conn, VIRTIO_VSOCK_OP_SHUTDOWN, flags=BOTH)
    assert recv_exactly(peer, 8) == b"response"
    guest.poll()
    assert conn.state == "closed" and is_closed(peer) and muxer.connection_count == 0


def test_host_close_sends_shutdown_both(muxer, guest, uds):
    peer, conn = guest_initiated(muxer, guest, uds)
    peer.close()
    pump(muxer)
    guest.poll()
    assert conn.ops[-1] == VIRTIO_VSOCK_OP_SHUTDOWN and conn.peer_shutdown == BOTH
    guest.send(conn, VIRTIO_VSOCK_OP_RST)
    assert muxer.connection_count == 0 and muxer.metrics.conns_killed == 0


def test_guest_shutdown_send_gives_the_host_eof(muxer, guest, uds):
    peer, conn = guest_initiated(muxer, guest, uds)
    guest.send(conn, VIRTIO_VSOCK_OP_RW, b"bye")
    guest.send(conn, VIRTIO_VSOCK_OP_SHUTDOWN, flags=VIRTIO_VSOCK_SHUTDOWN_SEND)
    assert recv_exactly(peer, 3) == b"bye" and peer.recv(1) == b""
    peer.sendall(b"still open")
    pump(muxer)
    guest.poll()
    assert guest.consume(conn) == b"still open"


def test_close_connections_forgets_everything(muxer, guest, uds):
    peer, _ = guest_initiated(muxer, guest, uds)
    client, _ = host_initiated(muxer, guest, uds)
    muxer.close_connections()
    assert is_closed(peer) and is_closed(client)
    assert muxer.connection_count == 0 and not muxer.has_pending_rx


def test_deactivate_stops_accepting(muxer, uds):
    muxer.deactivate()
    client = host_connect(uds, b"CONNECT 52\n")  # sits in the backlog
    pump(muxer)
    assert muxer.handshake_count == 0 and not readable(muxer.fd)
    muxer.activate()
    pump(muxer)
    assert muxer.connection_count == 1
    client.close()


def test_repr(muxer):
    assert repr(muxer).startswith("<Muxer cid=3") and "\n" not in repr(muxer)


# --- bulk transfer ---------------------------------------------------------------------------------------


def test_16_mib_both_ways_with_small_guest_credit(uds, clock):
    """16 MiB each way through real sockets; the guest grants 16 KiB and takes 4 KiB buffers."""
    m = Muxer(GUEST_CID, uds, clock=clock, metrics=VsockMetrics())
    m.activate()
    size = 16 << 20
    rng = random.Random(2024)
    to_guest, to_host = rng.randbytes(size), rng.randbytes(size)
    try:
        guest = GuestDriver(m, buf_alloc=16 * 1024, rx_buf=4096)
        peer, conn = guest_initiated(m, guest, uds)
        peer.setblocking(False)
        sent_by_host = sent_by_guest = 0
        got_by_host = bytearray()
        got_by_guest = hashlib.sha256()
        received_by_guest = 0
        deadline = time.monotonic() + 120
        while received_by_guest < size or len(got_by_host) < size:
            assert time.monotonic() < deadline, "transfer stalled"
            if sent_by_host < size:
                try:
                    sent_by_host += peer.send(to_guest[sent_by_host:sent_by_host + (1 << 16)])
                except BlockingIOError:
                    pass
            m.process_events()
            guest.poll()
            chunk = guest.consume(conn)
            got_by_guest.update(chunk)
            received_by_guest += len(chunk)
            while sent_by_guest < size and conn.peer_credit:
                n = min(4096, conn.peer_credit, size - sent_by_guest)
                guest.send(conn, VIRTIO_VSOCK_OP_RW, to_host[sent_by_guest:sent_by_guest + n])
                sent_by_guest += n
            try:
                got_by_host += peer.recv(1 << 20)
            except BlockingIOError:
                pass
            m.process_events()
        assert got_by_guest.digest() == hashlib.sha256(to_guest).digest()
        assert hashlib.sha256(got_by_host).digest() == hashlib.sha256(to_host).digest()
        assert m.metrics.rx_bytes_count == m.metrics.tx_bytes_count == size
        assert conn.buf_alloc == 16 * 1024  # every RW was checked against it (CreditViolation)
    finally:
        m.close()


# --- setup failures and fd exhaustion -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["x" * 120, "nul\0byte"])
def test_unbindable_paths(sockdir, name):
    with pytest.raises(UdsBindFailed):
        Muxer(GUEST_CID, str(sockdir / name))


class _ExhaustedListener:
    """The real listener, except that accept() fails as it does when the process is out of fds."""

    def __init__(self, real: socket.socket):
        self.real, self.failing = real, True

    def fileno(self) -> int:
        return self.real.fileno()

    def accept(self):
        if self.failing:
            raise OSError(errno.EMFILE, "Too many open files")
        return self.real.accept()

    def close(self) -> None:
        self.real.close()


def test_out_of_fds_pauses_the_listener_instead_of_spinning(muxer, guest, uds):
    peer, conn = guest_initiated(muxer, guest, uds)
    muxer._listener = listener = _ExhaustedListener(muxer._listener)
    waiting = host_connect(uds, b"CONNECT 52\n")
    muxer.process_events()
    assert muxer.metrics.muxer_event_fails == 1
    assert not readable(muxer.fd)  # the pending connection no longer wakes the loop
    listener.failing = False
    guest.send(conn, VIRTIO_VSOCK_OP_RST)  # a connection goes away: an fd is free again
    assert readable(muxer.fd)
    pump(muxer)
    guest.poll()
    assert len(guest.requests) == 1
    waiting.close()

"""The pure connection state machine: handshakes, credit both ways, shutdown, RST, timeouts."""

from __future__ import annotations

import pytest

from tests.unit.devices.virtio.vsock.conftest import GUEST_CID, hdr
from vmm.devices.virtio.vsock import (
    CONN_REQUEST_TIMEOUT_S,
    CONN_SHUTDOWN_TIMEOUT_S,
    VIRTIO_VSOCK_OP_CREDIT_REQUEST,
    VIRTIO_VSOCK_OP_CREDIT_UPDATE,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_OP_SHUTDOWN,
    VIRTIO_VSOCK_SHUTDOWN_RCV,
    VIRTIO_VSOCK_SHUTDOWN_SEND,
    VMADDR_CID_HOST,
    Connection,
    ConnState,
    ReadBudgetExceeded,
    WriteCountInvalid,
)

LOCAL, PEER = 1 << 30, 52
BOTH = VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND
T0 = 100.0


def from_guest(op: int, data: bytes = b"", **kw) -> tuple:
    kw.setdefault("buf_alloc", 64 * 1024)
    return hdr(op, src_port=PEER, dst_port=LOCAL, length=len(data), **kw), data


def feed(conn: Connection, op: int, data: bytes = b"", now: float = T0, **kw) -> bool:
    header, data = from_guest(op, data, **kw)
    return conn.recv_packet(header, data, now=now)


def ops_out(conn: Connection, max_data: int = 4096, now: float = T0) -> list[int]:
    out = []
    while (p := conn.next_packet(max_data, now=now)) is not None:
        out.append(p[0].op)
    return out


def established(peer_buf_alloc: int = 64 * 1024, **kw) -> Connection:
    conn = Connection.peer_init(peer_cid=GUEST_CID, local_port=LOCAL, peer_port=PEER,
                                peer_buf_alloc=peer_buf_alloc, **kw)
    assert conn.next_packet(4096, now=T0)[0].op == VIRTIO_VSOCK_OP_RESPONSE
    assert conn.state is ConnState.ESTABLISHED
    return conn


def write_all_to_host(conn: Connection) -> bytes:
    out = b""
    while chunk := conn.host_outgoing():
        conn.host_wrote(len(chunk))
        out += chunk
    return out


# --- handshakes ------------------------------------------------------------------------------


def test_host_initiated_handshake():
    conn = Connection.local_init(peer_cid=GUEST_CID, local_port=LOCAL, peer_port=PEER)
    assert conn.has_pending_rx and conn.deadline is None
    header, data = conn.next_packet(4096, now=T0)
    assert (header.op, header.src_cid, header.dst_cid, header.src_port, header.dst_port, data) == (
        VIRTIO_VSOCK_OP_REQUEST, VMADDR_CID_HOST, GUEST_CID, LOCAL, PEER, b"")
    assert header.buf_alloc == conn.buf_alloc == 256 * 1024 and header.fwd_cnt == 0 and header.type == 1
    assert conn.deadline == T0 + CONN_REQUEST_TIMEOUT_S
    assert not conn.has_pending_rx and conn.next_packet(4096, now=T0) is None
    assert conn.host_read_budget == 0  # nothing is read from the host before the guest accepted
    assert feed(conn, VIRTIO_VSOCK_OP_RESPONSE, buf_alloc=8192)
    assert conn.state is ConnState.ESTABLISHED and conn.deadline is None
    assert conn.peer_buf_alloc == 8192 and conn.host_read_budget == 8192
    assert write_all_to_host(conn) == b"OK 1073741824\n"
    assert conn.fwd_cnt == 0  # the OK line is not guest data


def test_ok_line_goes_out_before_guest_data():
    conn = Connection.local_init(peer_cid=GUEST_CID, local_port=LOCAL, peer_port=PEER)
    conn.next_packet(4096, now=T0)
    feed(conn, VIRTIO_VSOCK_OP_RESPONSE)
    feed(conn, VIRTIO_VSOCK_OP_RW, b"data")
    assert conn.host_outgoing() == b"OK 1073741824\n"
    conn.host_wrote(3)
    assert conn.host_outgoing() == b"1073741824\n"
    assert write_all_to_host(conn) == b"1073741824\ndata"
    assert conn.fwd_cnt == 4


def test_response_before_the_request_went_out_is_dropped():
    conn = Connection.local_init(peer_cid=GUEST_CID, local_port=LOCAL, peer_port=PEER)
    assert not feed(conn, VIRTIO_VSOCK_OP_RESPONSE)
    assert conn.state is ConnState.LOCAL_INIT


def test_guest_refuses_host_connection():
    conn = Connection.local_init(peer_cid=GUEST_CID, local_port=LOCAL, peer_port=PEER)
    conn.next_packet(4096, now=T0)
    assert feed(conn, VIRTIO_VSOCK_OP_RST)
    assert conn.closed and conn.next_packet(4096, now=T0) is None  # no RST answers an RST


def test_setup_timeout():
    conn = Connection.local_init(peer_cid=GUEST_CID, local_port=LOCAL, peer_port=PEER)
    assert not conn.tick(T0 + 10)  # no deadline before the REQUEST went out
    conn.next_packet(4096, now=T0)
    assert not conn.tick(T0 + CONN_REQUEST_TIMEOUT_S - 0.001)
    assert conn.tick(T0 + CONN_REQUEST_TIMEOUT_S)
    assert conn.state is ConnState.KILLED and conn.was_killed
    assert ops_out(conn) == [VIRTIO_VSOCK_OP_RST]
    assert conn.closed


def test_kill_before_the_guest_heard_of_it_sends_nothing():
    conn = Connection.local_init(peer_cid=GUEST_CID, local_port=LOCAL, peer_port=PEER)
    conn.kill("host gave up")
    assert conn.closed and ops_out(conn) == []


def test_guest_initiated_handshake():
    conn = Connection.peer_init(peer_cid=GUEST_CID, local_port=1234, peer_port=5000, peer_buf_alloc=1000,
                                peer_fwd_cnt=0)
    assert conn.host_read_budget == 0  # RESPONSE first
    header, _ = conn.next_packet(0, now=T0)
    assert (header.op, header.src_port, header.dst_port) == (VIRTIO_VSOCK_OP_RESPONSE, 1234, 5000)
    assert conn.state is ConnState.ESTABLISHED and conn.host_read_budget == 1000


def test_peer_init_drops_data_before_response_but_answers_credit_requests():
    conn = Connection.peer_init(peer_cid=GUEST_CID, local_port=LOCAL, peer_port=PEER, peer_buf_alloc=1000)
    assert not feed(conn, VIRTIO_VSOCK_OP_RW, b"early")
    assert feed(conn, VIRTIO_VSOCK_OP_CREDIT_REQUEST)
    assert ops_out(conn) == [VIRTIO_VSOCK_OP_RESPONSE]  # the RESPONSE carries the credit too


def test_invalid_packets_on_an_established_connection_are_dropped():
    conn = established()
    assert not feed(conn, VIRTIO_VSOCK_OP_REQUEST)
    assert not feed(conn, VIRTIO_VSOCK_OP_RESPONSE)
    assert not feed(conn, 99)
    assert not feed(conn, VIRTIO_VSOCK_OP_RW, b"")  # empty data packet
    assert conn.state is ConnState.ESTABLISHED and ops_out(conn) == []


# --- guest → host, our credit ------------------------------------------------------------------


def test_guest_data_reaches_the_host_and_advances_fwd_cnt():
    conn = established()
    assert feed(conn, VIRTIO_VSOCK_OP_RW, b"hello ")
    assert feed(conn, VIRTIO_VSOCK_OP_RW, b"world")
    assert conn.to_host_len == 11 and conn.recv_cnt == 11 and conn.fwd_cnt == 0
    assert conn.host_outgoing(limit=4) == b"hell"
    conn.host_wrote(4)
    assert write_all_to_host(conn) == b"o world"
    assert conn.fwd_cnt == 11


def test_guest_exceeding_our_credit_is_reset():
    conn = established(buf_alloc=100)
    assert feed(conn, VIRTIO_VSOCK_OP_RW, b"x" * 100)
    assert not feed(conn, VIRTIO_VSOCK_OP_RW, b"y")
    assert conn.state is ConnState.KILLED and conn.to_host_len == 0
    assert ops_out(conn) == [VIRTIO_VSOCK_OP_RST]


def test_credit_update_when_the_guests_view_runs_low():
    conn = established(buf_alloc=1000)  # threshold 250
    feed(conn, VIRTIO_VSOCK_OP_RW, b"a" * 800)  # the guest thinks 200 bytes are free
    assert ops_out(conn) == []  # and it is right: nothing was forwarded yet
    conn.host_wrote(len(conn.host_outgoing(limit=49)))  # 249 free now: not enough to be worth a packet
    assert ops_out(conn) == []
    conn.host_wrote(len(conn.host_outgoing(limit=1)))  # 250 free
    assert conn.has_pending_rx
    header, _ = conn.next_packet(4096, now=T0)
    assert header.op == VIRTIO_VSOCK_OP_CREDIT_UPDATE and header.fwd_cnt == 50 and header.buf_alloc == 1000
    assert ops_out(conn) == []


def test_no_credit_update_while_the_guests_view_is_roomy():
    conn = established(buf_alloc=1000)
    feed(conn, VIRTIO_VSOCK_OP_RW, b"a" * 700)
    write_all_to_host(conn)
    assert ops_out(conn) == []  # the guest still sees 300 >= 250 free
    feed(conn, VIRTIO_VSOCK_OP_RW, b"b" * 100, fwd_cnt=0)  # its view: 200 free
    assert ops_out(conn) == [VIRTIO_VSOCK_OP_CREDIT_UPDATE]


def test_any_packet_carries_the_credit_update():
    conn = established(buf_alloc=1000)
    feed(conn, VIRTIO_VSOCK_OP_RW, b"a" * 900)
    write_all_to_host(conn)
    conn.host_data(b"reply")
    header, data = conn.next_packet(4096, now=T0)
    assert header.op == VIRTIO_VSOCK_OP_RW and data == b"reply" and header.fwd_cnt == 900
    assert ops_out(conn) == []


def test_credit_request_is_answered():
    conn = established()
    assert feed(conn, VIRTIO_VSOCK_OP_CREDIT_REQUEST)
    header, _ = conn.next_packet(4096, now=T0)
    assert header.op == VIRTIO_VSOCK_OP_CREDIT_UPDATE and header.buf_alloc == conn.buf_alloc


# --- host → guest, the guest's credit -------------------------------------------------------------


def test_host_data_respects_the_guests_credit_and_buffer():
    conn = established(peer_buf_alloc=1000)
    assert conn.host_read_budget == 1000
    conn.host_data(b"z" * 1000)
    assert conn.host_read_budget == 0 and not conn.wants_host_read
    with pytest.raises(ReadBudgetExceeded):
        conn.host_data(b"!")
    header, data = conn.next_packet(300, now=T0)  # the RX buffer holds 300
    assert header.op == VIRTIO_VSOCK_OP_RW and header.len == len(data) == 300
    assert conn.peer_credit == 700 and conn.host_read_budget == 0  # 700 still waiting in our buffer
    header, data = conn.next_packet(4096, now=T0)
    assert header.op == VIRTIO_VSOCK_OP_RW and len(data) == 700
    assert conn.peer_credit == 0 and conn.rx_cnt == 1000


def test_exhausted_credit_asks_once():
    conn = established(peer_buf_alloc=100)
    conn.host_data(b"q" * 100)
    assert ops_out(conn) == [VIRTIO_VSOCK_OP_RW, VIRTIO_VSOCK_OP_CREDIT_REQUEST]
    feed(conn, VIRTIO_VSOCK_OP_CREDIT_UPDATE, buf_alloc=100, fwd_cnt=0)  # "still full"
    assert ops_out(conn) == []  # not asked again in a loop
    feed(conn, VIRTIO_VSOCK_OP_CREDIT_UPDATE, buf_alloc=100, fwd_cnt=60)
    assert conn.peer_credit == 60 and conn.host_read_budget == 60
    conn.host_data(b"r" * 60)
    assert ops_out(conn) == [VIRTIO_VSOCK_OP_RW, VIRTIO_VSOCK_OP_CREDIT_REQUEST]  # a new exhaustion


def test_pending_buffer_is_bounded():
    conn = established(peer_buf_alloc=1 << 20, pending_rx_max=1000)
    assert conn.host_read_budget == 1000
    conn.host_data(b"p" * 1000)
    assert conn.host_read_budget == 0
    conn.next_packet(400, now=T0)
    assert conn.host_read_budget == 400


def test_counters_wrap_modulo_2_32():
    conn = established(peer_buf_alloc=100)
    conn.rx_cnt = conn.peer_fwd_cnt = 0xFFFF_FFF0
    conn.host_data(b"w" * 40)
    conn.next_packet(4096, now=T0)
    assert conn.rx_cnt == 0x18 and conn.peer_credit == 60
    feed(conn, VIRTIO_VSOCK_OP_CREDIT_UPDATE, buf_alloc=100, fwd_cnt=0x18)
    assert conn.peer_credit == 100


def test_a_guest_lying_about_fwd_cnt_gets_no_credit():
    conn = established(peer_buf_alloc=100)
    feed(conn, VIRTIO_VSOCK_OP_CREDIT_UPDATE, buf_alloc=100, fwd_cnt=500)  # more than we ever sent
    assert conn.peer_credit == 0 and conn.host_read_budget == 0


def test_zero_sized_rx_buffer_takes_control_packets_only():
    conn = established(peer_buf_alloc=100)
    conn.host_data(b"d")
    assert conn.next_packet(0, now=T0) is None and conn.has_pending_rx
    feed(conn, VIRTIO_VSOCK_OP_CREDIT_REQUEST)
    assert conn.next_packet(0, now=T0)[0].op == VIRTIO_VSOCK_OP_CREDIT_UPDATE


# --- shutdown and reset ---------------------------------------------------------------------------


def test_guest_shutdown_send_shuts_the_host_write_side_after_flushing():
    conn = established()
    feed(conn, VIRTIO_VSOCK_OP_RW, b"last words")
    feed(conn, VIRTIO_VSOCK_OP_SHUTDOWN, flags=VIRTIO_VSOCK_SHUTDOWN_SEND)
    assert not conn.host_write_shutdown_due
    assert write_all_to_host(conn) == b"last words"
    assert conn.host_write_shutdown_due
    conn.host_write_shut()
    assert not conn.host_write_shutdown_due
    assert not feed(conn, VIRTIO_VSOCK_OP_RW, b"more")  # it promised
    conn.host_data(b"the host still talks")
    assert conn.next_packet(4096, now=T0)[1] == b"the host still talks"


def test_guest_shutdown_both_is_answered_with_rst():
    conn = established()
    feed(conn, VIRTIO_VSOCK_OP_SHUTDOWN, flags=BOTH)
    assert ops_out(conn) == [VIRTIO_VSOCK_OP_RST]
    assert conn.closed and not conn.was_killed


def test_guest_shutdown_both_waits_for_the_flush():
    conn = established()
    feed(conn, VIRTIO_VSOCK_OP_RW, b"pending")
    feed(conn, VIRTIO_VSOCK_OP_SHUTDOWN, flags=VIRTIO_VSOCK_SHUTDOWN_SEND)
    feed(conn, VIRTIO_VSOCK_OP_SHUTDOWN, flags=VIRTIO_VSOCK_SHUTDOWN_RCV)  # flags accumulate
    assert conn.peer_shutdown == BOTH and conn.deadline == T0 + CONN_SHUTDOWN_TIMEOUT_S
    assert ops_out(conn) == []
    write_all_to_host(conn)
    assert ops_out(conn) == [VIRTIO_VSOCK_OP_RST]


def test_guest_shutdown_both_times_out_if_the_host_does_not_read():
    conn = established()
    feed(conn, VIRTIO_VSOCK_OP_RW, b"stuck")
    feed(conn, VIRTIO_VSOCK_OP_SHUTDOWN, flags=BOTH)
    assert conn.tick(T0 + CONN_SHUTDOWN_TIMEOUT_S)
    assert conn.was_killed and ops_out(conn) == [VIRTIO_VSOCK_OP_RST]


def test_guest_shutdown_rcv_drops_pending_host_data():
    conn = established()
    conn.host_data(b"unwanted")
    feed(conn, VIRTIO_VSOCK_OP_SHUTDOWN, flags=VIRTIO_VSOCK_SHUTDOWN_RCV)
    assert conn.to_guest_len == 0 and conn.host_read_budget == 0
    assert ops_out(conn) == []
    assert feed(conn, VIRTIO_VSOCK_OP_RW, b"but it still sends")


def test_host_half_close_sends_shutdown_send_after_its_data():
    conn = established()
    conn.host_data(b"tail")
    conn.host_eof(gone=False)
    assert conn.host_read_budget == 0
    packets = list(iter(lambda: conn.next_packet(4096, now=T0), None))
    assert [(h.op, h.flags, d) for h, d in packets] == [
        (VIRTIO_VSOCK_OP_RW, 0, b"tail"), (VIRTIO_VSOCK_OP_SHUTDOWN, VIRTIO_VSOCK_SHUTDOWN_SEND, b"")]
    assert conn.deadline is None
    assert feed(conn, VIRTIO_VSOCK_OP_RW, b"the guest answers")  # the host may still read
    assert write_all_to_host(conn) == b"the guest answers"
    feed(conn, VIRTIO_VSOCK_OP_SHUTDOWN, flags=BOTH)
    assert ops_out(conn) == [VIRTIO_VSOCK_OP_RST]


def test_host_gone_sends_shutdown_both_then_resets_without_the_guests_rst():
    conn = established()
    feed(conn, VIRTIO_VSOCK_OP_RW, b"undeliverable")
    conn.host_eof(gone=True)
    assert conn.to_host_len == 0
    header, _ = conn.next_packet(4096, now=T0)
    assert header.op == VIRTIO_VSOCK_OP_SHUTDOWN and header.flags == BOTH
    assert conn.deadline == T0 + CONN_SHUTDOWN_TIMEOUT_S
    assert not feed(conn, VIRTIO_VSOCK_OP_RW, b"in flight")
    assert conn.tick(T0 + CONN_SHUTDOWN_TIMEOUT_S)
    assert ops_out(conn) == [VIRTIO_VSOCK_OP_RST]


def test_host_gone_then_guest_rst():
    conn = established()
    conn.host_eof(gone=True)
    ops_out(conn)
    assert feed(conn, VIRTIO_VSOCK_OP_RST)
    assert conn.closed and not conn.was_killed


def test_host_error_resets():
    conn = established()
    feed(conn, VIRTIO_VSOCK_OP_RW, b"x")
    conn.host_failed("EPIPE")
    assert conn.was_killed and "EPIPE" in conn.reset_reason
    assert ops_out(conn) == [VIRTIO_VSOCK_OP_RST]


def test_host_eof_before_established_resets():
    conn = Connection.local_init(peer_cid=GUEST_CID, local_port=LOCAL, peer_port=PEER)
    conn.next_packet(4096, now=T0)
    conn.host_eof(gone=True)
    assert ops_out(conn) == [VIRTIO_VSOCK_OP_RST]


def test_rst_from_the_guest_in_every_live_state():
    for conn in (Connection.local_init(peer_cid=GUEST_CID, local_port=LOCAL, peer_port=PEER),
                 Connection.peer_init(peer_cid=GUEST_CID, local_port=LOCAL, peer_port=PEER, peer_buf_alloc=1),
                 established()):
        assert feed(conn, VIRTIO_VSOCK_OP_RST)
        assert conn.closed and ops_out(conn) == []
        assert not feed(conn, VIRTIO_VSOCK_OP_RW, b"late")


def test_killed_connection_ignores_everything_but_sends_its_rst():
    conn = established()
    conn.kill("test")
    assert not feed(conn, VIRTIO_VSOCK_OP_CREDIT_REQUEST)
    with pytest.raises(ReadBudgetExceeded):
        conn.host_data(b"x")
    assert ops_out(conn) == [VIRTIO_VSOCK_OP_RST]


def test_host_wrote_more_than_outgoing_is_a_caller_bug():
    conn = established()
    feed(conn, VIRTIO_VSOCK_OP_RW, b"abc")
    with pytest.raises(WriteCountInvalid):
        conn.host_wrote(4)
    with pytest.raises(WriteCountInvalid):
        conn.host_wrote(-1)


def test_repr_is_one_line():
    r = repr(established())
    assert r.startswith("<Connection") and "\n" not in r and "established" in r

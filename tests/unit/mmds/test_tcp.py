"""TcpConnection alone: handshake, in-order receive, flow control, retransmission, close, reset."""

from __future__ import annotations

import pytest

from vmm.mmds.pdu import TcpFlags, TcpSegment
from vmm.mmds.tcp import (
    LOCAL_MSS,
    MSS_DEFAULT,
    RCV_BUF_MAX_SIZE,
    RTO_COUNT_MAX,
    RTO_PERIOD,
    InvalidMss,
    InvalidSyn,
    OutSegment,
    RecvStatus,
    TcpConnection,
    seq_add,
    seq_le,
    seq_lt,
)

from . import packets as p

F = TcpFlags
IRS = 5000
ISS = 0xFFFF_FFF0  # wraps around 2^32 during the tests


def seg(
    flags: TcpFlags, seq: int, ack: int = 0, payload: bytes = b"", window: int = 65535, options: bytes = b""
) -> TcpSegment:
    return TcpSegment(1234, 80, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, flags, window, options, payload)


def syn(**kw) -> TcpSegment:
    return seg(F.SYN, IRS, options=kw.pop("options", p.mss_option(1000)), **kw)


def established(now: float = 0.0, window: int = 65535) -> TcpConnection:
    conn = TcpConnection(syn(), iss=ISS, now=now)
    synack = conn.next_segment(now, 1500)
    assert synack is not None
    conn.receive(seg(F.ACK, IRS + 1, seq_add(ISS, 1), window=window), now)
    assert conn.is_established
    return conn


def test_sequence_arithmetic() -> None:
    assert seq_lt(0xFFFFFFFF, 0) and not seq_lt(0, 0xFFFFFFFF)
    assert seq_le(5, 5) and not seq_lt(5, 5)
    assert seq_add(0xFFFFFFFF, 2) == 1


@pytest.mark.parametrize(
    "segment",
    [
        seg(F.SYN | F.ACK, IRS),
        seg(F.SYN | F.RST, IRS),
        seg(F.SYN | F.FIN, IRS),
        seg(F.ACK, IRS),
        seg(F.SYN, IRS, payload=b"data"),
    ],
)
def test_invalid_syn(segment: TcpSegment) -> None:
    with pytest.raises(InvalidSyn):
        TcpConnection(segment, iss=ISS, now=0)


@pytest.mark.parametrize("options", [p.mss_option(99), b"\x02\x04\x05", b"\x02\x03\x05\x00"])
def test_invalid_mss(options: bytes) -> None:
    with pytest.raises(InvalidMss):
        TcpConnection(seg(F.SYN, IRS, options=options), iss=ISS, now=0)


def test_handshake() -> None:
    conn = TcpConnection(seg(F.SYN | F.ECE | F.CWR, IRS), iss=ISS, now=0)  # ECN setup is ignored
    assert conn.mss == MSS_DEFAULT
    out = conn.next_segment(0, 1500)
    assert out == OutSegment(ISS, IRS + 1, F.SYN | F.ACK, RCV_BUF_MAX_SIZE, mss=LOCAL_MSS)
    assert conn.next_segment(0, 1500) is None
    assert not conn.is_established
    conn.receive(seg(F.ACK, IRS + 1, seq_add(ISS, 1)), 0)
    assert conn.is_established


def test_synack_needs_room_for_its_option() -> None:
    conn = TcpConnection(syn(), iss=ISS, now=0)
    assert conn.next_segment(0, 23) is None
    assert conn.next_segment(0, 24) is not None


def test_synack_retransmitted_on_duplicate_syn_and_timeout() -> None:
    conn = TcpConnection(syn(), iss=ISS, now=0)
    assert conn.next_segment(0, 1500) is not None
    assert conn.receive(syn(), 0) == RecvStatus(0)
    assert conn.next_segment(0, 1500).flags == F.SYN | F.ACK
    assert conn.next_timeout() == pytest.approx(RTO_PERIOD)
    assert conn.next_segment(RTO_PERIOD / 2, 1500) is None
    assert conn.next_segment(RTO_PERIOD, 1500).flags == F.SYN | F.ACK


def test_bad_ack_in_syn_received_resets() -> None:
    conn = TcpConnection(syn(), iss=ISS, now=0)
    conn.next_segment(0, 1500)
    status = conn.receive(seg(F.ACK, IRS + 1, ISS + 77), 0)
    assert status & RecvStatus.CONN_RESETTING
    rst = conn.next_segment(0, 1500)
    assert rst.flags == F.RST | F.ACK and rst.seq == seq_add(ISS, 1) and rst.ack == IRS + 1
    assert conn.is_done and conn.next_segment(0, 1500) is None


def test_in_order_data_and_window() -> None:
    conn = established()
    conn.receive(seg(F.ACK, IRS + 1, seq_add(ISS, 1), b"hello"), 0)
    assert bytes(conn.rx) == b"hello" and conn.rcv_window == RCV_BUF_MAX_SIZE - 5
    ack = conn.next_segment(0, 1500)
    assert (ack.flags, ack.ack, ack.window) == (F.ACK, IRS + 6, RCV_BUF_MAX_SIZE - 5)
    conn.consume(5)
    assert conn.rcv_window == RCV_BUF_MAX_SIZE


def test_out_of_order_segment_dropped_and_reacked() -> None:
    conn = established()
    status = conn.receive(seg(F.ACK, IRS + 10, seq_add(ISS, 1), b"later"), 0)
    assert status == RecvStatus.UNEXPECTED_SEQ and not conn.rx
    assert conn.next_segment(0, 1500).ack == IRS + 1


def test_overlapping_retransmission_is_trimmed() -> None:
    conn = established()
    conn.receive(seg(F.ACK, IRS + 1, seq_add(ISS, 1), b"abc"), 0)
    conn.receive(seg(F.ACK, IRS + 1, seq_add(ISS, 1), b"abcdef"), 0)
    assert bytes(conn.rx) == b"abcdef"
    assert conn.receive(seg(F.ACK, IRS + 1, seq_add(ISS, 1), b"abc"), 0) == RecvStatus.UNEXPECTED_SEQ
    assert bytes(conn.rx) == b"abcdef"


def test_receive_buffer_is_a_hard_bound() -> None:
    conn = established()
    big = b"x" * (RCV_BUF_MAX_SIZE + 100)
    status = conn.receive(seg(F.ACK | F.FIN, IRS + 1, seq_add(ISS, 1), big), 0)
    assert status == RecvStatus.SEGMENT_BEYOND_RWND
    assert len(conn.rx) == RCV_BUF_MAX_SIZE and not conn.fin_received  # the FIN was past the window
    assert conn.next_segment(0, 1500).window == 0
    conn.consume(100)
    assert conn.next_segment(0, 1500).window == 100  # window update after it reopened


def test_sends_within_mss_and_remote_window() -> None:
    conn = established(window=1500)
    conn.send(b"r" * 2500)
    first = conn.next_segment(0, 1500)
    assert first.payload == b"r" * 1000 and first.flags == F.ACK  # MSS 1000 from the SYN
    second = conn.next_segment(0, 1500)
    assert len(second.payload) == 500  # remote window exhausted
    assert conn.next_segment(0, 1500) is None
    conn.receive(seg(F.ACK, IRS + 1, seq_add(ISS, 1 + 1500), window=1500), 0.01)
    third = conn.next_segment(0.01, 1500)
    assert len(third.payload) == 1000 and third.seq == seq_add(ISS, 1501)
    assert third.flags == F.ACK | F.PSH  # the last bytes queued
    assert conn.next_segment(0.01, 1500) is None


def test_max_len_limits_payload() -> None:
    conn = established()
    conn.send(b"z" * 900)
    out = conn.next_segment(0, 120)
    assert len(out.payload) == 100


def test_retransmission_after_timeout_then_reset() -> None:
    conn = established(now=0)
    conn.send(b"data")
    assert conn.next_segment(0, 1500).payload == b"data"
    assert conn.next_segment(0.1, 1500) is None
    now = 0.0
    step = RTO_PERIOD  # exactly at each deadline
    for _ in range(RTO_COUNT_MAX - 1):
        assert conn.next_segment(now + step / 2, 1500) is None
        now += step
        again = conn.next_segment(now, 1500)
        assert again.payload == b"data" and again.seq == seq_add(ISS, 1)
    now += step
    rst = conn.next_segment(now, 1500)
    assert rst.flags & F.RST and conn.is_done


def test_duplicate_ack_triggers_retransmission() -> None:
    conn = established()
    conn.send(b"a" * 2000)
    conn.next_segment(0, 1500)
    conn.next_segment(0, 1500)
    assert conn.receive(seg(F.ACK, IRS + 1, seq_add(ISS, 1)), 0) == RecvStatus.DUP_ACK
    again = conn.next_segment(0, 1500)
    assert again.seq == seq_add(ISS, 1) and len(again.payload) == 1000


def test_ack_for_unsent_data_is_dropped() -> None:
    conn = established()
    status = conn.receive(seg(F.ACK, IRS + 1, seq_add(ISS, 100), b"ignored"), 0)
    assert status == RecvStatus.INVALID_ACK and not conn.rx
    assert conn.next_segment(0, 1500).ack == IRS + 1


def test_segment_without_ack_is_dropped() -> None:
    conn = established()
    assert conn.receive(seg(TcpFlags(0), IRS + 1, 0, b"x"), 0) == RecvStatus.NO_ACK
    assert not conn.rx


def test_syn_on_established_connection_resets() -> None:
    conn = established()
    assert conn.receive(syn(), 0) & RecvStatus.CONN_RESETTING
    assert conn.next_segment(0, 1500).flags & F.RST


def test_rst_in_window_kills_out_of_window_ignored() -> None:
    conn = established()
    assert conn.receive(seg(F.RST, IRS + 100000), 0) == RecvStatus.INVALID_RST
    assert not conn.is_done
    assert conn.receive(seg(F.RST, IRS + 1), 0) == RecvStatus.RESET_RECEIVED
    assert conn.is_done and conn.next_segment(0, 1500) is None


def test_close_after_guest_fin() -> None:
    conn = established()
    conn.receive(seg(F.ACK | F.FIN, IRS + 1, seq_add(ISS, 1)), 0)
    assert conn.fin_received
    conn.close()
    fin = conn.next_segment(0, 1500)
    assert fin.flags == F.ACK | F.FIN and fin.ack == IRS + 2 and fin.seq == seq_add(ISS, 1)
    assert not conn.is_done
    conn.receive(seg(F.ACK, IRS + 2, seq_add(ISS, 2)), 0)
    assert conn.is_done


def test_close_first_with_data_then_guest_fin() -> None:
    conn = established()
    conn.send(b"bye")
    conn.close()
    out = conn.next_segment(0, 1500)
    assert out.payload == b"bye" and out.flags == F.ACK | F.PSH | F.FIN
    conn.receive(seg(F.ACK, IRS + 1, seq_add(ISS, 5)), 0)
    assert conn.fin_acked and not conn.tx
    conn.receive(seg(F.ACK | F.FIN, IRS + 1, seq_add(ISS, 5)), 0)
    assert not conn.is_done  # our ACK of the guest's FIN is still owed
    last = conn.next_segment(0, 1500)
    assert last.flags == F.ACK and last.ack == IRS + 2
    assert conn.is_done


def test_lost_fin_is_retransmitted() -> None:
    conn = established()
    conn.close()
    assert conn.next_segment(0, 1500).flags & F.FIN
    again = conn.next_segment(RTO_PERIOD, 1500)
    assert again.flags & F.FIN and again.seq == seq_add(ISS, 1)


def test_send_after_close_is_a_bug() -> None:
    conn = established()
    conn.close()
    with pytest.raises(RuntimeError):
        conn.send(b"late")


def test_repr_is_one_line() -> None:
    assert "\n" not in repr(established()) and "established" in repr(established())

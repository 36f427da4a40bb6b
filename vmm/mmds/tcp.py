"""A minimal TCP connection for the MMDS: passive open, in-order data, no congestion control.

Primer (RFC 9293). A connection starts when the guest sends SYN(seq=IRS);
we answer SYN-ACK(seq=ISS, ack=IRS+1) and the guest's ACK(ack=ISS+1)
establishes it. Every byte and each of SYN and FIN take one sequence number;
an ACK names the next byte expected, and the window says how many bytes past
it the receiver can take. Closing is one FIN per direction, each ACKed. A
RST aborts.

Like Firecracker's dumbo (see `docs/mmds/mmds-design.md`), this is the
simplest TCP that works on a point-to-point link that seldom loses and
never reorders packets, and never leaves the host:

* passive open only; the MSS option of the SYN is the only option used
  (the SYN-ACK advertises ours); ECN and other options are ignored;
* data is accepted in order only: an out-of-order segment is dropped and
  re-ACKed; a retransmission overlapping new data is trimmed;
* the receive buffer is fixed (``rcv_buf_size``) and the advertised window
  is its free space, so the guest cannot make it grow; bytes past it are
  dropped;
* the send buffer holds one HTTP response (the endpoint sends the next one
  only once this one is acknowledged);
* retransmission: go-back-N from the oldest unacknowledged byte, on the
  first duplicate ACK or when the retransmission timer (a fixed period, no
  RTT estimation, no backoff) expires; after ``rto_count_max`` timeouts in a
  row the connection resets itself;
* a SYN on an established connection, or an invalid ACK before it is
  established, resets it; an in-window RST kills it;
* no TIME-WAIT: the connection is done once both FINs are exchanged and
  ACKed (or on reset).

`TcpConnection` is pure: the caller passes segments in and the current time
(`now`, seconds on a monotonic clock), and pulls segments out as
`OutSegment` records; ports and addresses are the caller's business.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .pdu import BadTcpOption, TcpFlags, TcpSegment

__all__ = [
    "TcpConnection",
    "OutSegment",
    "RecvStatus",
    "PassiveOpenError",
    "InvalidSyn",
    "InvalidMss",
    "seq_add",
    "seq_diff",
    "seq_lt",
    "seq_le",
    "MSS_DEFAULT",
    "MSS_MIN",
    "MSS_MAX",
    "LOCAL_MSS",
    "RCV_BUF_MAX_SIZE",
    "RTO_PERIOD",
    "RTO_COUNT_MAX",
]

SEQ_MASK = 0xFFFF_FFFF
SEQ_HALF = 1 << 31

# RFC 9293 §3.7.1: the send MSS when the SYN carries no MSS option.
MSS_DEFAULT = 536
# Smaller MSS values are refused: a 50 KiB response would take too many frames.
MSS_MIN = 100
# A segment must fit a 65535-byte IPv4 packet with minimal headers.
MSS_MAX = 0xFFFF - 40
# What we advertise on the SYN-ACK: an Ethernet-MTU segment.
LOCAL_MSS = 1460

# Firecracker dumbo endpoint: one plus the largest HTTP request accepted.
RCV_BUF_MAX_SIZE = 2500
# Retransmission timeout and how many expire in a row before giving up
# (dumbo: ~300 ms and 15).
RTO_PERIOD = 0.3
RTO_COUNT_MAX = 15

WINDOW_MAX = 0xFFFF  # no window scaling

_CONTROL = TcpFlags.SYN | TcpFlags.ACK | TcpFlags.RST | TcpFlags.FIN


def seq_add(a: int, n: int) -> int:
    return (a + n) & SEQ_MASK


def seq_diff(a: int, b: int) -> int:
    """How far `a` is past `b`, modulo 2^32."""
    return (a - b) & SEQ_MASK


def seq_lt(a: int, b: int) -> bool:
    """`a` comes before `b` (RFC 1982 serial number arithmetic)."""
    return 0 < seq_diff(b, a) < SEQ_HALF


def seq_le(a: int, b: int) -> bool:
    return a == b or seq_lt(a, b)


class PassiveOpenError(Exception):
    """The segment cannot open a connection."""


class InvalidSyn(PassiveOpenError):
    """The segment is not a valid SYN."""


class InvalidMss(PassiveOpenError):
    """The SYN carries an invalid MSS option."""


class RecvStatus(enum.Flag):
    """Unusual conditions met while receiving a segment (none: `RecvStatus(0)`)."""

    INVALID_ACK = enum.auto()
    DUP_ACK = enum.auto()
    UNEXPECTED_SEQ = enum.auto()
    SEGMENT_BEYOND_RWND = enum.auto()
    DATA_BEYOND_FIN = enum.auto()
    INVALID_FIN = enum.auto()
    RESET_RECEIVED = enum.auto()
    INVALID_RST = enum.auto()
    INVALID_SEGMENT = enum.auto()
    CONN_RESETTING = enum.auto()
    CONN_RESET = enum.auto()
    NO_ACK = enum.auto()


@dataclass(frozen=True, slots=True)
class OutSegment:
    """A segment to send; the caller adds ports, addresses and the checksum."""

    seq: int
    ack: int
    flags: TcpFlags
    window: int
    payload: bytes = b""
    mss: int | None = None

    @property
    def header_len(self) -> int:
        return 24 if self.mss is not None else 20


class _State(enum.Enum):
    SYN_RECEIVED = "syn-received"
    ESTABLISHED = "established"
    RESET = "reset"


class TcpConnection:
    """One connection, opened by the guest's SYN (`InvalidSyn`/`InvalidMss` if it cannot)."""

    def __init__(
        self,
        syn: TcpSegment,
        *,
        iss: int,
        now: float,
        rcv_buf_size: int = RCV_BUF_MAX_SIZE,
        rto_period: float = RTO_PERIOD,
        rto_count_max: int = RTO_COUNT_MAX,
    ) -> None:
        if syn.flags & _CONTROL != TcpFlags.SYN or syn.payload:
            raise InvalidSyn()
        try:
            mss = syn.mss_option()
        except BadTcpOption as exc:
            raise InvalidMss() from exc
        if mss is None:
            mss = MSS_DEFAULT
        if not MSS_MIN <= mss <= MSS_MAX:
            raise InvalidMss()
        self.mss = mss
        self.rcv_buf_size = rcv_buf_size
        self.rto_period = rto_period
        self.rto_count_max = rto_count_max

        self._state = _State.SYN_RECEIVED
        self._irs = syn.seq
        self._iss = iss & SEQ_MASK
        self.rcv_nxt = seq_add(syn.seq, 1)
        self.snd_una = self._iss
        self.snd_nxt = self._iss
        self.snd_max = self._iss
        self.snd_wnd_edge = seq_add(self._iss, 1 + syn.window)

        self.rx = bytearray()
        """In-order bytes received and not yet consumed (at most `rcv_buf_size`)."""
        self.tx = bytearray()
        """Bytes to send, from `snd_una` on (sent but unacknowledged, then unsent)."""

        self._synack_sent = False
        self._pending_ack = False
        self._dup_ack = False
        self._rst_pending = False
        self._fin_received = False
        self._fin_seq: int | None = None
        self._rto_start = now
        self._rto_count = 0
        self.last_recv = now

    def __repr__(self) -> str:
        return (
            f"<TcpConnection {self._state.value} snd_una={self.snd_una} snd_nxt={self.snd_nxt} "
            f"rcv_nxt={self.rcv_nxt} rx={len(self.rx)} tx={len(self.tx)}"
            f"{' fin-rcvd' if self._fin_received else ''}{' closing' if self._fin_seq is not None else ''}>"
        )

    # --- status ----------------------------------------------------------------------

    @property
    def is_established(self) -> bool:
        return self._state is _State.ESTABLISHED and not self._rst_pending

    @property
    def is_reset(self) -> bool:
        """Reset (sent or received), or about to send a RST."""
        return self._state is _State.RESET or self._rst_pending

    @property
    def fin_received(self) -> bool:
        return self._fin_received

    @property
    def close_requested(self) -> bool:
        return self._fin_seq is not None

    @property
    def fin_acked(self) -> bool:
        return self._fin_seq is not None and self.snd_una == seq_add(self._fin_seq, 1)

    @property
    def is_done(self) -> bool:
        """Nothing more to exchange: reset, or both FINs ACKed and our last ACK sent."""
        if self._state is _State.RESET:
            return True
        return self._fin_received and self.fin_acked and not self._pending_ack

    @property
    def rcv_window(self) -> int:
        return min(self.rcv_buf_size - len(self.rx), WINDOW_MAX)

    def next_timeout(self) -> float | None:
        """When the retransmission timer fires, if it runs."""
        if self.is_reset:
            return None
        if self._state is _State.SYN_RECEIVED:
            return self._rto_start + self.rto_period if self._synack_sent else None
        if self.snd_una != self.snd_max:
            return self._rto_start + self.rto_period
        return None

    # --- application side ------------------------------------------------------------

    def consume(self, n: int) -> None:
        """The application used the first `n` received bytes; the window opens."""
        was_closed = self.rcv_window == 0
        del self.rx[:n]
        if was_closed and self.rcv_window > 0:
            self._pending_ack = True  # tell the guest the window reopened

    def send(self, data: bytes) -> None:
        """Queue `data` for sending; nothing may be queued after `close`."""
        if self._fin_seq is not None:
            raise RuntimeError("send after close")
        self.tx += data

    def close(self) -> None:
        """Send a FIN after the queued data (once)."""
        if self._fin_seq is None and not self.is_reset:
            base = self.snd_una if self._state is _State.ESTABLISHED else seq_add(self._iss, 1)
            self._fin_seq = seq_add(base, len(self.tx))

    def reset(self) -> None:
        """Abort: the next segment out is a RST, then the connection is done."""
        if self._state is not _State.RESET:
            self._rst_pending = True

    def rst_numbers(self) -> tuple[int, int]:
        """(seq, ack) for a RST|ACK the guest will accept."""
        seq = self.snd_una if self._state is _State.ESTABLISHED else seq_add(self._iss, 1)
        return seq, self.rcv_nxt

    # --- receive ---------------------------------------------------------------------

    def receive(self, seg: TcpSegment, now: float) -> RecvStatus:
        if self.is_reset:
            return RecvStatus.CONN_RESET
        self.last_recv = now
        flags = seg.flags
        if flags & TcpFlags.RST:
            # RFC 9293 §3.10.7.4 first check: a RST is valid if its seq is in the window.
            if seq_le(self.rcv_nxt, seg.seq) and seq_lt(seg.seq, seq_add(self.rcv_nxt, max(self.rcv_window, 1))):
                self._state = _State.RESET
                return RecvStatus.RESET_RECEIVED
            return RecvStatus.INVALID_RST

        status = RecvStatus(0)
        if self._state is _State.SYN_RECEIVED:
            if flags & TcpFlags.SYN:
                if self._is_same_syn(seg):
                    self._synack_sent = False  # our SYN-ACK was lost: send it again
                    return status
                return self._reset_because(RecvStatus.INVALID_SEGMENT)
            if not flags & TcpFlags.ACK:
                return RecvStatus.NO_ACK
            if not self._synack_sent or seg.ack != seq_add(self._iss, 1):
                return self._reset_because(RecvStatus.INVALID_ACK)
            self._state = _State.ESTABLISHED
            self.snd_una = seg.ack
            self.snd_wnd_edge = seq_add(seg.ack, seg.window)
            self._rto_count = 0
            self._rto_start = now
        else:
            if flags & TcpFlags.SYN:
                return self._reset_because(RecvStatus.INVALID_SEGMENT)
            if not flags & TcpFlags.ACK:
                # RFC 9293 §3.10.7.4 fifth check: drop segments without ACK.
                return RecvStatus.NO_ACK
            status |= self._receive_ack(seg, now)
            if status & RecvStatus.INVALID_ACK:
                return status
        return status | self._receive_data(seg)

    def _is_same_syn(self, seg: TcpSegment) -> bool:
        if seg.flags & _CONTROL != TcpFlags.SYN or seg.payload or seg.seq != self._irs:
            return False
        try:
            return (seg.mss_option() or MSS_DEFAULT) == self.mss
        except BadTcpOption:
            return False

    def _reset_because(self, why: RecvStatus) -> RecvStatus:
        self.reset()
        return why | RecvStatus.CONN_RESETTING

    def _receive_ack(self, seg: TcpSegment, now: float) -> RecvStatus:
        ack = seg.ack
        if not (seq_le(self.snd_una, ack) and seq_le(ack, self.snd_max)):
            # RFC 9293 §3.10.7.4: an ACK for something not yet sent is answered and dropped.
            self._pending_ack = True
            return RecvStatus.INVALID_ACK
        status = RecvStatus(0)
        edge = seq_add(ack, seg.window)
        if ack == self.snd_una:
            # RFC 5681 §2: a duplicate ACK carries no data and does not move the window.
            pure_ack = not seg.payload and not seg.flags & TcpFlags.FIN and edge == self.snd_wnd_edge
            if self.snd_una != self.snd_max and pure_ack:
                self._dup_ack = True
                status |= RecvStatus.DUP_ACK
        else:
            acked = seq_diff(ack, self.snd_una)
            del self.tx[: min(acked, len(self.tx))]
            self.snd_una = ack
            if seq_lt(self.snd_nxt, ack):
                self.snd_nxt = ack
            self._rto_count = 0
            self._rto_start = now
            self._dup_ack = False
        if seq_lt(self.snd_wnd_edge, edge):
            self.snd_wnd_edge = edge
        return status

    def _receive_data(self, seg: TcpSegment) -> RecvStatus:
        payload = seg.payload
        fin = bool(seg.flags & TcpFlags.FIN)
        if not payload and not fin:
            return RecvStatus(0)
        if self._fin_received:
            self._pending_ack = True
            return RecvStatus.DATA_BEYOND_FIN if payload else RecvStatus(0)
        status = RecvStatus(0)
        self._pending_ack = True
        already = seq_diff(self.rcv_nxt, seg.seq)  # bytes of this segment we already have
        if already >= SEQ_HALF:
            return RecvStatus.UNEXPECTED_SEQ  # starts past rcv_nxt: a gap, drop it
        new = payload[already:] if already < len(payload) else b""
        if new:
            room = self.rcv_buf_size - len(self.rx)
            taken = new[:room]
            self.rx += taken
            self.rcv_nxt = seq_add(self.rcv_nxt, len(taken))
            if len(taken) < len(new):
                return RecvStatus.SEGMENT_BEYOND_RWND
        elif payload and not fin:
            return RecvStatus.UNEXPECTED_SEQ  # an old retransmission: re-ACK only
        if fin:
            if seq_add(seg.seq, len(payload)) == self.rcv_nxt:
                self._fin_received = True
                self.rcv_nxt = seq_add(self.rcv_nxt, 1)
            else:
                status |= RecvStatus.INVALID_FIN
        return status

    # --- send ------------------------------------------------------------------------

    def next_segment(self, now: float, max_len: int) -> OutSegment | None:
        """The next segment to send, if any, no longer than `max_len` bytes of TCP."""
        if self._state is _State.RESET or max_len < 20:
            return None
        if self._rst_pending:
            self._rst_pending = False
            self._state = _State.RESET
            seq, ack = self.rst_numbers()
            return OutSegment(seq, ack, TcpFlags.RST | TcpFlags.ACK, 0)

        if self._state is _State.SYN_RECEIVED:
            if self._synack_sent:
                if not self._rto_expired(now):
                    return None
                self._rto_count += 1
                if self._rto_count >= self.rto_count_max:
                    self.reset()
                    return self.next_segment(now, max_len)
            if max_len < 24:
                return None
            self._synack_sent = True
            self._rto_start = now
            self.snd_nxt = self.snd_max = seq_add(self._iss, 1)
            return OutSegment(self._iss, self.rcv_nxt, TcpFlags.SYN | TcpFlags.ACK, self.rcv_window, mss=LOCAL_MSS)

        if self.snd_una != self.snd_max and self._rto_expired(now):
            self._rto_count += 1
            if self._rto_count >= self.rto_count_max:
                self.reset()
                return self.next_segment(now, max_len)
            self.snd_nxt = self.snd_una  # go back N
            self._rto_start = now
        elif self._dup_ack:
            self.snd_nxt = self.snd_una
            self._dup_ack = False

        in_flight = seq_diff(self.snd_nxt, self.snd_una)
        unsent = max(len(self.tx) - in_flight, 0)
        room = seq_diff(self.snd_wnd_edge, self.snd_nxt) if seq_le(self.snd_nxt, self.snd_wnd_edge) else 0
        n = max(min(unsent, room, self.mss, max_len - 20), 0)
        fin = self._fin_seq is not None and seq_add(self.snd_nxt, n) == self._fin_seq
        if not (n or fin or self._pending_ack):
            return None

        flags = TcpFlags.ACK
        if n and n == unsent:
            flags |= TcpFlags.PSH
        if fin:
            flags |= TcpFlags.FIN
        seq = self.snd_nxt
        if (n or fin) and self.snd_una == self.snd_max:
            self._rto_start = now  # the timer runs from the first unacknowledged byte
        self.snd_nxt = seq_add(seq, n + fin)
        if seq_lt(self.snd_max, self.snd_nxt):
            self.snd_max = self.snd_nxt
        self._pending_ack = False
        payload = bytes(self.tx[in_flight : in_flight + n])
        return OutSegment(seq, self.rcv_nxt, flags, self.rcv_window, payload)

    def _rto_expired(self, now: float) -> bool:
        # Compare with the deadline itself, the value `next_timeout` reports, so a
        # timer armed for that instant always finds the timeout expired.
        return now >= self._rto_start + self.rto_period

"""The MMDS TCP listener: HTTP endpoints over `TcpConnection`s, demultiplexed by peer.

A `TcpHandler` acts as if bound to the MMDS address and port. Incoming
segments go to the connection of their (remote address, remote port); a SYN
from a new peer opens one; anything else from an unknown peer is answered
with a RST (except a RST). Resources are bounded for a hostile guest:

* at most ``max_connections`` connections (Firecracker: 30). When full, a new
  SYN evicts a connection idle for more than ``eviction_threshold`` seconds
  (it gets a RST), or is itself refused with a RST;
* at most ``max_pending_resets`` RSTs waiting to be sent (Firecracker: 100);
  beyond that they are not sent;
* each connection: a receive buffer of `RCV_BUF_MAX_SIZE` bytes and one
  response (bounded by the store's size limit) in its send buffer.

An `MmdsEndpoint` is the HTTP side of one connection: it frames requests out
of the received bytes with `MmdsHttp`, answers one at a time (the next
request is read once the previous answer is acknowledged), resets the
connection if a request does not fit the receive buffer, and closes after
the guest's FIN or when HTTP says so.
"""

from __future__ import annotations

import enum
import ipaddress
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from .http import MmdsHttp
from .pdu import TcpFlags, TcpSegment, build_tcp
from .tcp import OutSegment, PassiveOpenError, RecvStatus, TcpConnection, seq_add

__all__ = [
    "TcpHandler",
    "MmdsEndpoint",
    "RecvEvent",
    "MAX_CONNECTIONS",
    "MAX_PENDING_RESETS",
    "EVICTION_THRESHOLD",
]

MAX_CONNECTIONS = 30
MAX_PENDING_RESETS = 100
# Seconds without a segment from the guest after which a connection may be evicted
# (dumbo: 40e9 TSC cycles, about 10 s).
EVICTION_THRESHOLD = 10.0


class RecvEvent(enum.Enum):
    """What a received segment did to the handler."""

    NOTHING = "nothing"
    UNUSUAL = "unusual"
    NEW_CONNECTION = "new-connection"
    NEW_CONNECTION_REPLACING = "new-connection-replacing"
    NEW_CONNECTION_DROPPED = "new-connection-dropped"
    FAILED_NEW_CONNECTION = "failed-new-connection"
    ENDPOINT_DONE = "endpoint-done"
    UNEXPECTED_SEGMENT = "unexpected-segment"
    INVALID_PORT = "invalid-port"


class MmdsEndpoint:
    """One guest HTTP connection to the MMDS."""

    def __init__(self, conn: TcpConnection, http: MmdsHttp) -> None:
        self.conn = conn
        self._http = http

    def __repr__(self) -> str:
        return f"<MmdsEndpoint {self.conn!r}>"

    def receive(self, seg: TcpSegment, now: float) -> RecvStatus:
        status = self.conn.receive(seg, now)
        self._serve()
        return status

    def next_segment(self, now: float, max_len: int) -> OutSegment | None:
        return self.conn.next_segment(now, max_len)

    def _serve(self) -> None:
        conn = self.conn
        if not conn.is_established or conn.tx:
            return  # not ready, or the previous answer is not acknowledged yet
        if not conn.close_requested and conn.rx:
            exchange = self._http.next_exchange(conn.rx)
            if exchange is not None:
                conn.consume(exchange.consumed)
                conn.send(exchange.response)
                if exchange.close:
                    conn.close()
                return
            if len(conn.rx) >= conn.rcv_buf_size:
                conn.reset()  # the request is larger than we accept
                return
        if conn.fin_received:
            conn.close()


@dataclass(frozen=True, slots=True)
class _Rst:
    addr: ipaddress.IPv4Address
    port: int
    seq: int
    ack: int
    flags: TcpFlags


class TcpHandler:
    """TCP/IPv4 listener on (`local_addr`, `local_port`) serving `http`."""

    def __init__(
        self,
        local_addr: ipaddress.IPv4Address,
        local_port: int,
        http: MmdsHttp,
        *,
        max_connections: int = MAX_CONNECTIONS,
        max_pending_resets: int = MAX_PENDING_RESETS,
        eviction_threshold: float = EVICTION_THRESHOLD,
        isn: Callable[[], int] = lambda: secrets.randbits(32),
    ) -> None:
        if max_connections < 1 or max_pending_resets < 1:
            raise ValueError("max_connections and max_pending_resets must be >= 1")
        self.local_addr = local_addr
        self.local_port = local_port
        self.max_connections = max_connections
        self.max_pending_resets = max_pending_resets
        self.eviction_threshold = eviction_threshold
        self._http = http
        self._isn = isn
        self._endpoints: OrderedDict[tuple[ipaddress.IPv4Address, int], MmdsEndpoint] = OrderedDict()
        self._rsts: list[_Rst] = []

    def __repr__(self) -> str:
        return (
            f"<TcpHandler {self.local_addr}:{self.local_port} connections={len(self._endpoints)}"
            f"/{self.max_connections} pending_resets={len(self._rsts)}>"
        )

    @property
    def connection_count(self) -> int:
        return len(self._endpoints)

    @property
    def pending_resets(self) -> int:
        return len(self._rsts)

    def endpoints(self) -> list[MmdsEndpoint]:
        return list(self._endpoints.values())

    def receive(self, src: ipaddress.IPv4Address, seg: TcpSegment, now: float) -> RecvEvent:
        if seg.dst_port != self.local_port or seg.src_port == 0:
            return RecvEvent.INVALID_PORT
        key = (src, seg.src_port)
        endpoint = self._endpoints.get(key)
        if endpoint is not None:
            status = endpoint.receive(seg, now)
            if endpoint.conn.is_done:
                del self._endpoints[key]
                return RecvEvent.ENDPOINT_DONE
            return RecvEvent.UNUSUAL if status else RecvEvent.NOTHING

        if seg.flags & (TcpFlags.SYN | TcpFlags.ACK | TcpFlags.RST | TcpFlags.FIN) == TcpFlags.SYN:
            try:
                conn = TcpConnection(seg, iss=self._isn(), now=now)
            except PassiveOpenError:
                self._rst_for(src, seg)
                return RecvEvent.FAILED_NEW_CONNECTION
            event = RecvEvent.NEW_CONNECTION
            if len(self._endpoints) >= self.max_connections:
                victim = self._evictable(now)
                if victim is None:
                    self._rst_for(src, seg)
                    return RecvEvent.NEW_CONNECTION_DROPPED
                old = self._endpoints.pop(victim).conn
                seq, ack = old.rst_numbers()
                self._enqueue_rst(_Rst(victim[0], victim[1], seq, ack, TcpFlags.RST | TcpFlags.ACK))
                event = RecvEvent.NEW_CONNECTION_REPLACING
            self._endpoints[key] = MmdsEndpoint(conn, self._http)
            return event

        if not seg.flags & TcpFlags.RST:
            self._rst_for(src, seg)
        return RecvEvent.UNEXPECTED_SEGMENT

    def next_segment(self, now: float, max_len: int) -> tuple[ipaddress.IPv4Address, bytes, bool] | None:
        """The next segment to send as (destination, TCP bytes, an endpoint finished), or None.

        Pending RSTs go first, then the connections take turns.
        """
        if max_len < 20:
            return None
        if self._rsts:
            rst = self._rsts.pop(0)
            segment = build_tcp(
                self.local_addr, rst.addr, self.local_port, rst.port, rst.seq, rst.ack, rst.flags, 0
            )
            return rst.addr, segment, False
        for key in list(self._endpoints):
            endpoint = self._endpoints[key]
            out = endpoint.next_segment(now, max_len)
            if out is None:
                if endpoint.conn.is_done:
                    del self._endpoints[key]
                continue
            done = endpoint.conn.is_done
            if done:
                del self._endpoints[key]
            else:
                self._endpoints.move_to_end(key)  # round robin
            segment = build_tcp(
                self.local_addr,
                key[0],
                self.local_port,
                key[1],
                out.seq,
                out.ack,
                out.flags,
                out.window,
                out.payload,
                mss=out.mss,
            )
            return key[0], segment, done
        return None

    def next_timeout(self) -> float | None:
        """The earliest retransmission deadline among the connections."""
        deadlines = [t for ep in self._endpoints.values() if (t := ep.conn.next_timeout()) is not None]
        return min(deadlines, default=None)

    def _evictable(self, now: float) -> tuple[ipaddress.IPv4Address, int] | None:
        for key, endpoint in self._endpoints.items():
            if now - endpoint.conn.last_recv > self.eviction_threshold:
                return key
        return None

    def _rst_for(self, addr: ipaddress.IPv4Address, seg: TcpSegment) -> None:
        """RFC 9293 §3.10.7.1: the RST a closed port answers `seg` with."""
        if seg.flags & TcpFlags.ACK:
            rst = _Rst(addr, seg.src_port, seg.ack, 0, TcpFlags.RST)
        else:
            rst = _Rst(addr, seg.src_port, 0, seq_add(seg.seq, seg.seg_len), TcpFlags.RST | TcpFlags.ACK)
        self._enqueue_rst(rst)

    def _enqueue_rst(self, rst: _Rst) -> None:
        if len(self._rsts) < self.max_pending_resets:
            self._rsts.append(rst)

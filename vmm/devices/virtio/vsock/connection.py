"""One vsock stream connection as a pure state machine: events in, packets and host bytes out.

Primer (virtio 1.1 §5.10.6; the `connection.rs` of Firecracker's vsock is the
model). A connection joins a guest AF_VSOCK socket (the *peer*) to a host
Unix stream socket (the *host*). This module never touches a socket: the
muxer feeds it events and carries out what it asks for.

Handshake. The initiator sends REQUEST, the listener answers RESPONSE (or
RST). A host-initiated connection starts in LOCAL_INIT and owes the guest a
REQUEST; once the guest answers RESPONSE it is ESTABLISHED and the host
socket gets the line ``OK <local_port>\\n``. A guest-initiated connection
starts in PEER_INIT (the muxer already connected the host socket) and owes
the guest a RESPONSE. If the guest does not answer a REQUEST within
`CONN_REQUEST_TIMEOUT_S` (Firecracker: 2 s, counted from when the REQUEST
actually went out) the connection is reset.

Flow control (§5.10.6.3). Each side tells the other, in every packet, its
receive buffer size (`buf_alloc`) and how many bytes it has taken out of it
(`fwd_cnt`, free-running modulo 2**32). A sender may have at most
``peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`` bytes outstanding:

* guest → host: the guest's RW payload goes into `to_host` (at most our
  `buf_alloc`, 256 KiB); the muxer writes it to the host socket and reports
  `host_wrote(n)`, which advances our `fwd_cnt`. A guest that sends beyond
  its credit breaks the protocol and the connection is reset. When the
  guest's view of our free space (``buf_alloc - (received -
  fwd_cnt_last_told)``) drops below `credit_update_threshold` and telling it
  our real `fwd_cnt` would give it at least that much, we owe it a
  CREDIT_UPDATE (any packet we send carries the same news, so an RW or
  SHUTDOWN settles it too). A CREDIT_REQUEST is always answered.
* host → guest: the muxer reads from the host socket at most
  `host_read_budget` bytes, which is what the guest's credit and our bounded
  `to_guest` buffer (`pending_rx_max`, 64 KiB) still allow; the bytes leave
  as RW packets no larger than the guest's RX buffer. Using up the guest's
  credit sends one CREDIT_REQUEST (once per exhaustion, so a guest that
  answers "still full" is not asked in a loop).

Shutdown (§5.10.6.5). SHUTDOWN flags RCV/SEND say "the sender will
receive/send no more"; they only accumulate. Guest SEND: once `to_host` is
flushed the muxer shuts the host socket's write side (the host reads EOF).
Guest RCV: pending host data is dropped and the host is no longer read.
Both: once `to_host` is flushed we answer RST, or reset after
`CONN_SHUTDOWN_TIMEOUT_S`. Host EOF: after the buffered host data reached
the guest we send SHUTDOWN(SEND) if the host only half-closed (it may still
read), SHUTDOWN(RCV|SEND) if it is gone, and then reset if the guest has not
sent its RST within `CONN_SHUTDOWN_TIMEOUT_S`. An RST from the guest ends
the connection at once; host I/O errors and protocol violations reset it.

Every counter is modulo 2**32 as on the wire. Buffers are bounded:
`to_host` by `buf_alloc` (enforced against the guest), `to_guest` by
`pending_rx_max` (enforced against the muxer, `ReadBudgetExceeded`).
"""

from __future__ import annotations

import enum

from vmm.devices.virtio.vsock.packet import (
    MAX_PKT_BUF_SIZE,
    VIRTIO_VSOCK_OP_CREDIT_REQUEST,
    VIRTIO_VSOCK_OP_CREDIT_UPDATE,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_OP_SHUTDOWN,
    VIRTIO_VSOCK_SHUTDOWN_RCV,
    VIRTIO_VSOCK_SHUTDOWN_SEND,
    VIRTIO_VSOCK_TYPE_STREAM,
    VMADDR_CID_HOST,
    PacketHeader,
)

__all__ = [
    "CONN_BUF_ALLOC",
    "CONN_PENDING_RX_MAX",
    "CONN_REQUEST_TIMEOUT_S",
    "CONN_SHUTDOWN_TIMEOUT_S",
    "HOST_WRITE_CHUNK",
    "SHUTDOWN_BOTH",
    "ConnState",
    "ConnectionUsageError",
    "ReadBudgetExceeded",
    "WriteCountInvalid",
    "Connection",
]

# Our receive buffer per connection (buf_alloc): guest data not yet written to the host.
CONN_BUF_ALLOC = 256 * 1024
# Host data read but not yet sent to the guest: one maximal RX packet.
CONN_PENDING_RX_MAX = MAX_PKT_BUF_SIZE
# Firecracker csm/mod.rs: CONN_REQUEST_TIMEOUT_MS, CONN_SHUTDOWN_TIMEOUT_MS.
CONN_REQUEST_TIMEOUT_S = 2.0
CONN_SHUTDOWN_TIMEOUT_S = 2.0
# The most bytes `host_outgoing` hands out at once.
HOST_WRITE_CHUNK = 64 * 1024

SHUTDOWN_BOTH = VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND
_U32 = 0xFFFF_FFFF


class ConnState(enum.Enum):
    """Where a connection is in its life."""

    LOCAL_INIT = "local_init"  # host-initiated: REQUEST owed or sent, waiting for RESPONSE
    PEER_INIT = "peer_init"  # guest-initiated: host socket connected, RESPONSE owed
    ESTABLISHED = "established"  # data flows (shutdown flags may restrict a direction)
    KILLED = "killed"  # RST owed to the guest; nothing else happens
    CLOSED = "closed"  # over: the muxer drops it and closes the host socket


class ConnectionUsageError(Exception):
    """A vsock connection was driven against its contract (a bug in the caller, never the guest's doing)."""


class ReadBudgetExceeded(ConnectionUsageError):
    """More host bytes were fed to a connection than its host_read_budget allowed."""


class WriteCountInvalid(ConnectionUsageError):
    """host_wrote() reported more bytes than host_outgoing() handed out."""


class Connection:
    """A vsock stream between a guest port and a host socket; see the module docstring.

    Build one with `local_init` or `peer_init`. Inputs: `recv_packet` (from
    the guest), `host_data` / `host_eof` / `host_wrote` / `host_write_shut` /
    `host_failed` (from the host socket), `tick` (time), `kill`. Outputs:
    `next_packet` (for the guest, pulled when an RX buffer is available),
    `host_outgoing` (bytes for the host socket), `host_write_shutdown_due`,
    `wants_host_read` / `host_read_budget`, `deadline`, `closed`.
    """

    def __init__(self, state: ConnState, *, peer_cid: int, local_port: int, peer_port: int,
                 local_cid: int = VMADDR_CID_HOST, peer_buf_alloc: int = 0, peer_fwd_cnt: int = 0,
                 buf_alloc: int = CONN_BUF_ALLOC, pending_rx_max: int = CONN_PENDING_RX_MAX,
                 credit_update_threshold: int | None = None):
        if state not in (ConnState.LOCAL_INIT, ConnState.PEER_INIT):
            raise ValueError(f"a connection starts in LOCAL_INIT or PEER_INIT, not {state}")
        if not 0 < buf_alloc <= _U32 or pending_rx_max <= 0:
            raise ValueError("buf_alloc must be in 1..2**32-1 and pending_rx_max positive")
        self.state = state
        self.local_cid, self.peer_cid = local_cid, peer_cid
        self.local_port, self.peer_port = local_port, peer_port
        self.buf_alloc = buf_alloc
        self.pending_rx_max = pending_rx_max
        self.credit_update_threshold = (buf_alloc // 4 if credit_update_threshold is None
                                        else credit_update_threshold)
        # Credit, both ways (all modulo 2**32).
        self.fwd_cnt = 0  # guest bytes written to the host socket
        self.rx_cnt = 0  # payload bytes sent to the guest
        self.last_fwd_cnt_sent = 0  # our fwd_cnt as the guest last heard it
        self.peer_buf_alloc = peer_buf_alloc & _U32
        self.peer_fwd_cnt = peer_fwd_cnt & _U32
        # Buffers.
        self._to_host = bytearray()
        self._host_ctrl = bytearray()  # the "OK <port>\n" line: goes out before data, not flow-controlled
        self._to_guest = bytearray()
        # Shutdown bookkeeping.
        self.peer_shutdown = 0  # flags the guest sent
        self.shutdown_sent = 0  # flags we sent
        self._shutdown_owed = 0  # flags we still have to send
        self.host_read_done = False  # the host will send no more (we read EOF)
        self.host_gone = False  # the host socket is fully closed: nothing can be written to it
        self.host_write_done = False  # we shut the host socket's write side
        # Control packets owed to the guest.
        self.request_sent = False
        self._credit_update_owed = False
        self._credit_request_owed = False
        self._credit_requested = False  # a CREDIT_REQUEST went out during this exhaustion of credit
        self.deadline: float | None = None
        self.reset_reason: str | None = None
        self.was_killed = False  # reset by us (timeout, error, violation), not ended by the protocol

    @classmethod
    def local_init(cls, *, peer_cid: int, local_port: int, peer_port: int, **kwargs: int) -> Connection:
        """A host-initiated connection to guest port `peer_port`, known to the host as `local_port`."""
        return cls(ConnState.LOCAL_INIT, peer_cid=peer_cid, local_port=local_port, peer_port=peer_port, **kwargs)

    @classmethod
    def peer_init(cls, *, peer_cid: int, local_port: int, peer_port: int, peer_buf_alloc: int,
                  peer_fwd_cnt: int = 0, **kwargs: int) -> Connection:
        """A guest-initiated connection (the guest's REQUEST carried its credit), host socket connected."""
        return cls(ConnState.PEER_INIT, peer_cid=peer_cid, local_port=local_port, peer_port=peer_port,
                   peer_buf_alloc=peer_buf_alloc, peer_fwd_cnt=peer_fwd_cnt, **kwargs)

    # --- derived state ------------------------------------------------------------------------

    @property
    def key(self) -> tuple[int, int]:
        """(local_port, peer_port): what identifies the connection on the device."""
        return self.local_port, self.peer_port

    @property
    def closed(self) -> bool:
        return self.state is ConnState.CLOSED

    @property
    def peer_credit(self) -> int:
        """Payload bytes the guest can still take (0 if its counters make no sense)."""
        in_flight = (self.rx_cnt - self.peer_fwd_cnt) & _U32
        return self.peer_buf_alloc - in_flight if in_flight <= self.peer_buf_alloc else 0

    @property
    def recv_cnt(self) -> int:
        """Payload bytes received from the guest (modulo 2**32)."""
        return (self.fwd_cnt + len(self._to_host)) & _U32

    @property
    def to_host_len(self) -> int:
        return len(self._to_host) + len(self._host_ctrl)

    @property
    def to_guest_len(self) -> int:
        return len(self._to_guest)

    @property
    def host_read_budget(self) -> int:
        """How many bytes the muxer may read from the host socket now (0: leave them in the socket)."""
        if (self.state is not ConnState.ESTABLISHED or self.host_read_done
                or self.peer_shutdown & VIRTIO_VSOCK_SHUTDOWN_RCV):
            return 0
        return max(0, min(self.pending_rx_max, self.peer_credit) - len(self._to_guest))

    @property
    def wants_host_read(self) -> bool:
        return self.host_read_budget > 0

    @property
    def host_write_shutdown_due(self) -> bool:
        """The guest will send no more and everything it sent is written: shut the host socket's write side."""
        return (self.state is ConnState.ESTABLISHED and bool(self.peer_shutdown & VIRTIO_VSOCK_SHUTDOWN_SEND)
                and not self.host_write_done and not self.host_gone and not self.to_host_len)

    def _peer_needs_credit_update(self) -> bool:
        if (self.state is not ConnState.ESTABLISHED or self.peer_shutdown & VIRTIO_VSOCK_SHUTDOWN_SEND
                or self.host_gone or self.fwd_cnt == self.last_fwd_cnt_sent):
            return False
        seen_used = (self.recv_cnt - self.last_fwd_cnt_sent) & _U32
        peer_view_free = self.buf_alloc - seen_used
        actual_free = self.buf_alloc - len(self._to_host)
        return peer_view_free < self.credit_update_threshold <= actual_free

    @property
    def has_pending_rx(self) -> bool:
        """Whether `next_packet` would produce a packet given a large enough RX buffer."""
        state = self.state
        if state is ConnState.CLOSED:
            return False
        if state is ConnState.KILLED or state is ConnState.PEER_INIT:
            return True
        if state is ConnState.LOCAL_INIT:
            return not self.request_sent
        return bool((self._to_guest and self.peer_credit > 0)
                    or (self._shutdown_owed and not self._to_guest)
                    or self._credit_update_owed or self._credit_request_owed
                    or self._peer_needs_credit_update())

    # --- events from the guest ---------------------------------------------------------------

    def recv_packet(self, header: PacketHeader, data: bytes = b"", *, now: float) -> bool:
        """A packet the guest sent on this connection; False if it was dropped as invalid here.

        The muxer routes by (dst_port, src_port) and has checked type and CIDs.
        """
        if self.state is ConnState.CLOSED:
            return False
        op = header.op
        if op == VIRTIO_VSOCK_OP_RST:
            self._close("reset by the guest")
            return True
        if self.state is ConnState.KILLED:
            return False
        self.peer_buf_alloc = header.buf_alloc & _U32
        self.peer_fwd_cnt = header.fwd_cnt & _U32
        if self.peer_credit > 0:
            self._credit_requested = False
            self._credit_request_owed = False
        if self.state is ConnState.LOCAL_INIT:
            if op == VIRTIO_VSOCK_OP_RESPONSE and self.request_sent:
                self.state = ConnState.ESTABLISHED
                self.deadline = None
                self._host_ctrl += f"OK {self.local_port}\n".encode()
                return True
            return False
        if op == VIRTIO_VSOCK_OP_CREDIT_REQUEST:
            self._credit_update_owed = True
            return True
        if op == VIRTIO_VSOCK_OP_CREDIT_UPDATE:
            return True
        if self.state is ConnState.PEER_INIT:
            return False  # nothing else is valid before our RESPONSE
        if op == VIRTIO_VSOCK_OP_RW:
            return self._recv_data(data)
        if op == VIRTIO_VSOCK_OP_SHUTDOWN:
            self._recv_shutdown(header.flags, now)
            return True
        return False  # REQUEST/RESPONSE on an established connection, unknown ops (Linux drops these too)

    def _recv_data(self, data: bytes) -> bool:
        if not data or self.peer_shutdown & VIRTIO_VSOCK_SHUTDOWN_SEND or self.host_gone:
            return False
        if len(self._to_host) + len(data) > self.buf_alloc:
            self.kill(f"the guest sent {len(data)} bytes with {self.buf_alloc - len(self._to_host)} bytes of credit")
            return False
        self._to_host += data
        return True

    def _recv_shutdown(self, flags: int, now: float) -> None:
        flags &= SHUTDOWN_BOTH
        new = flags & ~self.peer_shutdown
        self.peer_shutdown |= flags
        if new & VIRTIO_VSOCK_SHUTDOWN_RCV:
            self._to_guest.clear()
            self._credit_request_owed = False
        if self.peer_shutdown == SHUTDOWN_BOTH:
            if not self.to_host_len:
                self._finish("shut down by the guest")
            elif self.deadline is None:
                self.deadline = now + CONN_SHUTDOWN_TIMEOUT_S

    # --- events from the host socket -----------------------------------------------------------

    def host_data(self, data: bytes) -> None:
        """Bytes read from the host socket; at most `host_read_budget` of them."""
        if len(data) > self.host_read_budget:
            raise ReadBudgetExceeded(f"{len(data)} bytes fed, budget {self.host_read_budget}")
        self._to_guest += data

    def host_eof(self, *, gone: bool) -> None:
        """The host socket read EOF; `gone` if it is fully closed (not just shut for writing)."""
        if self.state in (ConnState.KILLED, ConnState.CLOSED):
            return
        if self.state is not ConnState.ESTABLISHED:
            self.kill("the host closed before the connection was established")
            return
        self.host_read_done = True
        flags = VIRTIO_VSOCK_SHUTDOWN_SEND
        if gone:
            self.host_gone = True
            self._to_host.clear()
            self._host_ctrl.clear()
            flags |= VIRTIO_VSOCK_SHUTDOWN_RCV
        self._shutdown_owed |= flags & ~self.shutdown_sent
        if self.peer_shutdown == SHUTDOWN_BOTH and not self.to_host_len:
            self._finish("both sides are done")

    def host_outgoing(self, limit: int = HOST_WRITE_CHUNK) -> bytes:
        """The next bytes to write to the host socket (empty: nothing to write)."""
        if self._host_ctrl:
            return bytes(self._host_ctrl[:limit])
        return bytes(self._to_host[:limit])

    def host_wrote(self, n: int) -> None:
        """`n` bytes of what `host_outgoing` returned were written to the host socket."""
        if n < 0 or n > (len(self._host_ctrl) or len(self._to_host)):
            raise WriteCountInvalid(f"{n} bytes written of {len(self._host_ctrl) or len(self._to_host)} outgoing")
        if self._host_ctrl:
            del self._host_ctrl[:n]
            return
        del self._to_host[:n]
        self.fwd_cnt = (self.fwd_cnt + n) & _U32
        if self.state is ConnState.ESTABLISHED and self.peer_shutdown == SHUTDOWN_BOTH and not self.to_host_len:
            self._finish("shut down by the guest, data flushed")

    def host_write_shut(self) -> None:
        """The muxer shut the host socket's write side (after `host_write_shutdown_due`)."""
        self.host_write_done = True

    def host_failed(self, reason: str) -> None:
        """Reading or writing the host socket failed: reset the connection."""
        self.host_gone = True
        self.kill(f"host socket error: {reason}")

    # --- time and termination ----------------------------------------------------------------

    def tick(self, now: float) -> bool:
        """Reset the connection if its deadline passed; True if it did."""
        if self.deadline is None or now < self.deadline:
            return False
        what = "no RESPONSE to our REQUEST" if self.state is ConnState.LOCAL_INIT else "shutdown did not complete"
        self.kill(f"timed out: {what}")
        return True

    def kill(self, reason: str = "killed") -> None:
        """Reset the connection: RST owed to the guest (if it knows the connection), buffers dropped."""
        if self.state in (ConnState.KILLED, ConnState.CLOSED):
            return
        guest_knows = not (self.state is ConnState.LOCAL_INIT and not self.request_sent)
        self._drop_buffers()
        self.reset_reason = reason
        self.was_killed = True
        self.state = ConnState.KILLED if guest_knows else ConnState.CLOSED

    def _finish(self, reason: str) -> None:
        """A clean end: RST to the guest, as the protocol closes a connection."""
        self._drop_buffers()
        self.reset_reason = reason
        self.state = ConnState.KILLED

    def _close(self, reason: str) -> None:
        self._drop_buffers()
        self.reset_reason = reason
        self.state = ConnState.CLOSED

    def _drop_buffers(self) -> None:
        self._to_host.clear()
        self._host_ctrl.clear()
        self._to_guest.clear()
        self._shutdown_owed = 0
        self._credit_update_owed = self._credit_request_owed = False
        self.deadline = None

    # --- packets for the guest ---------------------------------------------------------------

    def next_packet(self, max_data: int, *, now: float) -> tuple[PacketHeader, bytes] | None:
        """The next packet for the guest, with at most `max_data` payload bytes; None if nothing is due."""
        state = self.state
        if state is ConnState.CLOSED:
            return None
        if state is ConnState.KILLED:
            self.state = ConnState.CLOSED
            return self._packet(VIRTIO_VSOCK_OP_RST)
        if state is ConnState.LOCAL_INIT:
            if self.request_sent:
                return None
            self.request_sent = True
            self.deadline = now + CONN_REQUEST_TIMEOUT_S
            return self._packet(VIRTIO_VSOCK_OP_REQUEST)
        if state is ConnState.PEER_INIT:
            self.state = ConnState.ESTABLISHED
            return self._packet(VIRTIO_VSOCK_OP_RESPONSE)
        credit = self.peer_credit
        if self._to_guest and credit > 0 and max_data > 0:
            n = min(len(self._to_guest), credit, max_data, MAX_PKT_BUF_SIZE)
            data = bytes(self._to_guest[:n])
            del self._to_guest[:n]
            self.rx_cnt = (self.rx_cnt + n) & _U32
            if self.peer_credit == 0 and not self._credit_requested:
                self._credit_request_owed = True
            return self._packet(VIRTIO_VSOCK_OP_RW, data)
        if self._shutdown_owed and not self._to_guest:
            flags, self._shutdown_owed = self._shutdown_owed, 0
            self.shutdown_sent |= flags
            if self.shutdown_sent == SHUTDOWN_BOTH and self.deadline is None:
                self.deadline = now + CONN_SHUTDOWN_TIMEOUT_S
            return self._packet(VIRTIO_VSOCK_OP_SHUTDOWN, flags=flags)
        if self._credit_update_owed or self._peer_needs_credit_update():
            return self._packet(VIRTIO_VSOCK_OP_CREDIT_UPDATE)
        if self._credit_request_owed:
            self._credit_request_owed = False
            self._credit_requested = True
            return self._packet(VIRTIO_VSOCK_OP_CREDIT_REQUEST)
        return None

    def _packet(self, op: int, data: bytes = b"", *, flags: int = 0) -> tuple[PacketHeader, bytes]:
        # Every packet carries our credit, so it settles any credit update we owed.
        self.last_fwd_cnt_sent = self.fwd_cnt
        self._credit_update_owed = False
        header = PacketHeader(
            src_cid=self.local_cid, dst_cid=self.peer_cid, src_port=self.local_port, dst_port=self.peer_port,
            len=len(data), type=VIRTIO_VSOCK_TYPE_STREAM, op=op, flags=flags, buf_alloc=self.buf_alloc,
            fwd_cnt=self.fwd_cnt,
        )
        return header, data

    def __repr__(self) -> str:
        return (f"<Connection {self.local_port}<->{self.peer_cid}:{self.peer_port} {self.state.value} "
                f"to_host={self.to_host_len} to_guest={len(self._to_guest)} credit={self.peer_credit} "
                f"fwd_cnt={self.fwd_cnt} rx_cnt={self.rx_cnt} shut={self.peer_shutdown}/{self.shutdown_sent}>")

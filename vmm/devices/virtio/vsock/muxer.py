"""The hybrid vsock host side: guest vsock streams ⇄ host Unix sockets (Firecracker's `VsockMuxer`).

Primer (Firecracker docs/vsock.md). The device listens on a Unix stream
socket at `uds_path`.

* Host-initiated: a host program connects to `uds_path` and writes
  ``CONNECT <port>\\n`` (case-insensitive, decimal, at most
  `MAX_CONNECT_LINE` bytes). The muxer assigns a local port (round-robin in
  [2**30, 2**31), as Firecracker), sends the guest a REQUEST to `<port>`, and
  when the guest answers RESPONSE writes ``OK <local_port>\\n`` to the host
  socket; from then on the socket carries the stream. If the guest answers
  RST, or not at all within 2 s of the REQUEST, the host socket is closed.
* Guest-initiated: a REQUEST to host CID 2, port P, makes the muxer connect
  to the Unix socket ``<uds_path>_P``; if nobody listens there the guest gets
  an RST, else RESPONSE and the stream flows.

Like Firecracker, `uds_path` must not exist when the device is built (a
left-over socket file is refused, `UdsPathInUse`); `close()` removes the
socket file again if it is still the one this muxer bound.

Event-loop contract. Every host fd the muxer uses (the listener, each
connection's socket, sockets waiting for their CONNECT line, and a timerfd
for connection deadlines) lives in the muxer's own epoll set, as in
Firecracker; the VMM loop watches only `fd` (the epoll fd, readable when
anything inside is ready) and calls `process_events()`. Connections come and
go without the VMM loop knowing. Interest is level-triggered and exact: a
socket is watched for reading only while its connection has read budget
(guest credit and room in the pending buffer), for writing only while guest
data waits to be written, and not at all otherwise — so the loop never
spins on a socket it cannot serve, and backpressure reaches the host
program through its socket buffer.

The device side: `send_packet(header, data)` for each packet from the
guest (TX), `has_pending_rx` / `next_packet(max_data)` to fill RX buffers.
Packets that match no connection get an RST (queued, at most
`MUXER_RSTQ_SIZE`), except RSTs themselves. The muxer is not thread-safe:
the device calls it under its lock.

Bounds: at most `max_connections` (Firecracker: 1023) connections and
pending CONNECT handshakes together; every connection's buffers are bounded
by its state machine (`connection.py`); each `process_events()` handles at
most `EPOLL_BATCH` ready fds and accepts at most `ACCEPT_BATCH` sockets.
"""

from __future__ import annotations

import collections
import errno
import heapq
import itertools
import os
import secrets
import select
import socket
import stat
import time
from dataclasses import dataclass, field
from typing import Callable

import structlog

from vmm.devices.virtio.vsock.connection import CONN_BUF_ALLOC, ConnState, Connection
from vmm.devices.virtio.vsock.metrics import VsockMetrics
from vmm.devices.virtio.vsock.packet import (
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_TYPE_STREAM,
    VMADDR_CID_HOST,
    PacketHeader,
)
from vmm.rate_limiter import TimerFd, TimerFdError

__all__ = [
    "MAX_CONNECTIONS",
    "MAX_CONNECT_LINE",
    "MUXER_RSTQ_SIZE",
    "LOCAL_PORT_FIRST",
    "LOCAL_PORT_LIMIT",
    "EPOLL_BATCH",
    "ACCEPT_BATCH",
    "MuxerError",
    "UdsPathInUse",
    "UdsBindFailed",
    "Muxer",
    "parse_connect_command",
]

log = structlog.get_logger("vmm.devices.virtio.vsock.muxer")

# Firecracker unix/mod.rs: MAX_CONNECTIONS.
MAX_CONNECTIONS = 1023
# Firecracker reads the CONNECT line into a 32-byte buffer.
MAX_CONNECT_LINE = 32
# Firecracker unix/mod.rs: MUXER_RXQ_SIZE (here only RSTs for unknown connections are queued).
MUXER_RSTQ_SIZE = 256
# Firecracker muxer.rs: host-side ports of host-initiated connections come from [1 << 30, 1 << 31).
LOCAL_PORT_FIRST = 1 << 30
LOCAL_PORT_LIMIT = 1 << 31
EPOLL_BATCH = 64
ACCEPT_BATCH = 32
LISTEN_BACKLOG = 128

_IN, _OUT = select.EPOLLIN, select.EPOLLOUT
_ERR_HUP = select.EPOLLERR | select.EPOLLHUP


class MuxerError(Exception):
    """The vsock Unix-socket backend could not be set up."""


class UdsPathInUse(MuxerError):
    """The vsock Unix socket path already exists."""


class UdsBindFailed(MuxerError):
    """The vsock Unix socket could not be created, bound or listened on."""


def parse_connect_command(line: bytes) -> int | None:
    """The port of a host's ``CONNECT <port>\\n`` line, or None if the line is not one.

    As Firecracker: words split on whitespace, the first is "connect" in any
    case, the second a decimal u32; further words are ignored.
    """
    try:
        words = line.decode("ascii").split()
    except UnicodeDecodeError:
        return None
    if len(words) < 2 or words[0].lower() != "connect":
        return None
    port = words[1]
    if not (port.isascii() and port.isdigit()) or len(port) > 10 or int(port) > 0xFFFF_FFFF:
        return None
    return int(port)


@dataclass(eq=False)
class _Handshake:
    """A host socket accepted on `uds_path`, still sending its CONNECT line."""

    sock: socket.socket
    line: bytearray = field(default_factory=bytearray)


@dataclass(eq=False)
class _Entry:
    """A connection, its host socket, and what the muxer registered for it."""

    conn: Connection
    sock: socket.socket | None
    local_port_allocated: bool
    interest: int = 0  # epoll mask registered (0: not in the epoll set)
    deadline_pushed: float | None = None


class Muxer:
    """The Unix-socket backend of one vsock device (guest `guest_cid`, host socket `uds_path`).

    Binds and listens at once (`UdsPathInUse`, `UdsBindFailed`); accepts
    host connections only between `activate()` and `deactivate()`.
    `clock` gives monotonic seconds (connection deadlines).
    """

    def __init__(self, guest_cid: int, uds_path: str, *, metrics: VsockMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic, max_connections: int = MAX_CONNECTIONS,
                 conn_buf_alloc: int = CONN_BUF_ALLOC):
        self.guest_cid = guest_cid
        self.uds_path = uds_path
        self.metrics = metrics if metrics is not None else VsockMetrics()
        self.clock = clock
        self.max_connections = max_connections
        self.conn_buf_alloc = conn_buf_alloc
        self._listener, self._listener_id = self._bind(uds_path)
        try:
            self._epoll = select.epoll()
            self._timer = TimerFd()
            self._epoll.register(self._timer.fileno(), _IN)
        except (OSError, TimerFdError) as exc:
            self._listener.close()
            self._unlink_socket_file()
            raise UdsBindFailed(f"cannot set up the vsock event set: {exc}") from exc
        self._timer_at: float | None = None
        self._timer_dirty = False
        self._conns: dict[tuple[int, int], _Entry] = {}
        self._handshakes: dict[int, _Handshake] = {}
        self._by_fd: dict[int, _Entry | _Handshake] = {}
        self._rx_ready: dict[tuple[int, int], None] = {}  # insertion-ordered set: round robin
        self._rst_queue: collections.deque[tuple[int, int]] = collections.deque()
        self._deadlines: list[tuple[float, int, tuple[int, int]]] = []
        self._seq = itertools.count()
        self._local_ports: set[int] = set()
        self._local_port_last = LOCAL_PORT_FIRST - 1
        self._listening = False
        self._listener_paused = False
        self.closed = False

    # --- setup -----------------------------------------------------------------------------

    @staticmethod
    def _bind(path: str) -> tuple[socket.socket, tuple[int, int]]:
        if os.path.lexists(path):
            raise UdsPathInUse(f"the vsock Unix socket path {path!r} already exists")
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        except OSError as exc:
            raise UdsBindFailed(f"cannot create the vsock Unix socket: {exc.strerror}") from exc
        try:
            sock.bind(path)
            sock.listen(LISTEN_BACKLOG)
            st = os.stat(path)
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
            sock.close()
            if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:  # created after the check
                raise UdsPathInUse(f"the vsock Unix socket path {path!r} already exists") from exc
            raise UdsBindFailed(f"cannot listen on the vsock Unix socket {path!r}: {exc}") from exc
        return sock, (st.st_dev, st.st_ino)

    def _unlink_socket_file(self) -> None:
        """Remove `uds_path` if it is still the socket this muxer bound."""
        try:
            st = os.lstat(self.uds_path)
            if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == self._listener_id:
                os.unlink(self.uds_path)
        except OSError:
            pass

    @property
    def fd(self) -> int:
        """The fd the VMM event loop watches for readability; then call `process_events()`."""
        return self._epoll.fileno()

    @property
    def host_sock_path(self) -> str:
        return self.uds_path

    def activate(self) -> None:
        """Start accepting host connections on `uds_path` (the device was activated)."""
        if not self._listening:
            self._epoll.register(self._listener.fileno(), _IN)
            self._listening = True
            self._listener_paused = False

    @property
    def local_port_last(self) -> int:
        """The local port of the last host-initiated connection (LOCAL_PORT_FIRST - 1: none yet); snapshots save it."""
        return self._local_port_last

    def resume_local_ports(self, last: int | None) -> None:
        """Allocate local ports after `last`, a snapshot's validated `local_port_last`; None: after a random port.

        A restored guest can still hold sockets of the snapshot's connections
        (the TRANSPORT_RESET marks them reset; they leave the guest's tables
        only when its programs close them). A REQUEST from a port one of them
        used matches that stale socket, and the guest answers RST: every
        clone's first agent connection was refused that way. Continuing after
        the snapshot's last port avoids all of them (Firecracker does the
        same); a snapshot that did not record it gets a random start, which
        avoids them but for a 1 in 2^30 chance.
        """
        if last is None:
            last = LOCAL_PORT_FIRST - 1 + secrets.randbelow(LOCAL_PORT_LIMIT - LOCAL_PORT_FIRST)
        self._local_port_last = last

    def deactivate(self) -> None:
        """Drop every connection and pending handshake, stop accepting (the device was reset)."""
        self.close_connections()
        for handshake in list(self._handshakes.values()):
            self._drop_handshake(handshake)
        if self._listening:
            if not self._listener_paused:
                self._epoll.unregister(self._listener.fileno())
            self._listening = False
            self._listener_paused = False

    def close_connections(self) -> None:
        """Forget every connection without telling the guest (TRANSPORT_RESET tells it instead)."""
        for entry in list(self._conns.values()):
            self._remove(entry)
        self._rx_ready.clear()
        self._rst_queue.clear()
        self._deadlines.clear()
        self._timer_dirty = True
        self._rearm_timer()

    def close(self) -> None:
        """Release every fd and remove the socket file. Idempotent."""
        if self.closed:
            return
        self.deactivate()
        self._listener.close()
        self._unlink_socket_file()
        self._timer.close()
        self._epoll.close()
        self.closed = True

    # --- counters and views --------------------------------------------------------------------

    @property
    def connection_count(self) -> int:
        return len(self._conns)

    @property
    def handshake_count(self) -> int:
        return len(self._handshakes)

    def connections(self) -> list[Connection]:
        return [entry.conn for entry in self._conns.values()]

    def connection(self, local_port: int, peer_port: int) -> Connection | None:
        entry = self._conns.get((local_port, peer_port))
        return entry.conn if entry is not None else None

    @property
    def has_pending_rx(self) -> bool:
        """Whether `next_packet` may have something for the guest."""
        return bool(self._rst_queue or self._rx_ready)

    @property
    def next_deadline(self) -> float | None:
        return self._deadlines[0][0] if self._deadlines else None

    # --- guest → host ----------------------------------------------------------------------------

    def send_packet(self, header: PacketHeader, data: bytes = b"") -> None:
        """A well-formed packet from the guest (TX). Never raises for anything the guest did."""
        self.metrics.tx_packets_count += 1
        if header.type != VIRTIO_VSOCK_TYPE_STREAM:
            if header.op != VIRTIO_VSOCK_OP_RST:
                self._enqueue_rst(header.dst_port, header.src_port)
            return
        if header.dst_cid != VMADDR_CID_HOST or header.src_cid != self.guest_cid:
            self.metrics.tx_dropped_packets += 1
            log.debug("vsock: dropping a guest packet not from the guest's CID to the host", header=repr(header))
            return
        key = (header.dst_port, header.src_port)
        entry = self._conns.get(key)
        if entry is None:
            if header.op == VIRTIO_VSOCK_OP_REQUEST:
                self._peer_request(header)
            elif header.op != VIRTIO_VSOCK_OP_RST:
                self._enqueue_rst(header.dst_port, header.src_port)
            self._rearm_timer()
            return
        if not entry.conn.recv_packet(header, data, now=self.clock()):
            self.metrics.tx_dropped_packets += 1
        if entry.conn.to_host_len or entry.conn.host_write_shutdown_due:
            self._flush(entry)
        self._sync(entry)
        self._rearm_timer()

    def reset_connection(self, header: PacketHeader) -> None:
        """The guest sent a malformed packet on the connection `header` names: reset it (data was lost)."""
        if header.dst_cid != VMADDR_CID_HOST or header.src_cid != self.guest_cid:
            return
        entry = self._conns.get((header.dst_port, header.src_port))
        if entry is not None:
            entry.conn.kill("malformed packet from the guest")
            self._sync(entry)

    def _peer_request(self, header: PacketHeader) -> None:
        if len(self._conns) + len(self._handshakes) >= self.max_connections:
            self.metrics.conns_refused_limit += 1
            log.info("vsock: connection limit reached; refusing a guest connection", limit=self.max_connections)
            self._enqueue_rst(header.dst_port, header.src_port)
            return
        path = f"{self.uds_path}_{header.dst_port}"
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        except OSError as exc:  # out of fds
            self.metrics.host_connects_refused += 1
            log.warning("vsock: cannot create a socket for a guest connection", error=exc.strerror)
            self._enqueue_rst(header.dst_port, header.src_port)
            return
        try:
            # A Unix stream connect completes at once (or fails with EAGAIN when the backlog is full).
            sock.connect(path)
        except OSError as exc:
            sock.close()
            self.metrics.host_connects_refused += 1
            log.debug("vsock: nobody listens for a guest connection", path=path, error=exc.strerror)
            self._enqueue_rst(header.dst_port, header.src_port)
            return
        conn = Connection.peer_init(peer_cid=self.guest_cid, local_port=header.dst_port, peer_port=header.src_port,
                                    peer_buf_alloc=header.buf_alloc, peer_fwd_cnt=header.fwd_cnt,
                                    buf_alloc=self.conn_buf_alloc)
        self._add(_Entry(conn, sock, local_port_allocated=False))

    def _enqueue_rst(self, local_port: int, peer_port: int) -> None:
        if len(self._rst_queue) >= MUXER_RSTQ_SIZE:
            self.metrics.rst_queue_full += 1
            log.warning("vsock: RST queue full; dropping an RST", local_port=local_port, peer_port=peer_port)
            return
        self.metrics.rst_sent_unknown += 1
        self._rst_queue.append((local_port, peer_port))

    # --- host → guest ----------------------------------------------------------------------------

    def next_packet(self, max_data: int) -> tuple[PacketHeader, bytes] | None:
        """The next packet for the guest, payload at most `max_data` bytes; None if nothing can go now."""
        if self._rst_queue:
            local_port, peer_port = self._rst_queue.popleft()
            self.metrics.rx_packets_count += 1
            return PacketHeader(src_cid=VMADDR_CID_HOST, dst_cid=self.guest_cid, src_port=local_port,
                                dst_port=peer_port, len=0, type=VIRTIO_VSOCK_TYPE_STREAM, op=VIRTIO_VSOCK_OP_RST,
                                flags=0, buf_alloc=0, fwd_cnt=0), b""
        now = self.clock()
        # Each ready connection is asked once at most: one that cannot fill this buffer (a data
        # packet for a 0-byte payload area) goes back to the end of the line.
        for _ in range(len(self._rx_ready)):
            key = next(iter(self._rx_ready))
            del self._rx_ready[key]
            entry = self._conns.get(key)
            if entry is None:
                continue
            packet = entry.conn.next_packet(max_data, now=now)
            self._sync(entry)
            if packet is not None:
                self.metrics.rx_packets_count += 1
                self.metrics.rx_bytes_count += len(packet[1])
                self._rearm_timer()
                return packet
        self._rearm_timer()
        return None

    # --- host events -----------------------------------------------------------------------------

    def process_events(self) -> None:
        """Serve what is ready in the epoll set (at most `EPOLL_BATCH` fds), then expire deadlines."""
        if self.closed:
            return
        try:
            events = self._epoll.poll(0, EPOLL_BATCH)
        except OSError as exc:
            self.metrics.muxer_event_fails += 1
            log.warning("vsock: polling the muxer's epoll set failed", error=str(exc))
            events = []
        for fd, mask in events:
            if fd == self._timer.fileno():
                self._timer.read()
                self._timer_at = None
                self._timer_dirty = True
            elif fd == self._listener.fileno():
                self._accept()
            else:
                target = self._by_fd.get(fd)
                if isinstance(target, _Handshake):
                    self._read_connect_line(target)
                elif isinstance(target, _Entry):
                    self._socket_event(target, mask)
        self._expire(self.clock())
        self._rearm_timer()

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # Out of fds, most likely: stop watching the listener (it would stay readable)
                # until a connection goes away.
                self.metrics.muxer_event_fails += 1
                log.warning("vsock: accepting a host connection failed; pausing the listener", error=exc.strerror)
                self._pause_listener()
                return
            if len(self._conns) + len(self._handshakes) >= self.max_connections:
                self.metrics.conns_refused_limit += 1
                log.warning("vsock: connection limit reached; refusing a host connection", limit=self.max_connections)
                sock.close()
                continue
            sock.setblocking(False)
            handshake = _Handshake(sock)
            try:
                self._epoll.register(sock.fileno(), _IN)
            except OSError as exc:
                self.metrics.conn_event_fails += 1
                log.warning("vsock: cannot watch a host connection", error=exc.strerror)
                sock.close()
                continue
            self._handshakes[sock.fileno()] = handshake
            self._by_fd[sock.fileno()] = handshake

    def _pause_listener(self) -> None:
        if self._listening and not self._listener_paused:
            self._epoll.unregister(self._listener.fileno())
            self._listener_paused = True

    def _resume_listener(self) -> None:
        if self._listening and self._listener_paused:
            self._epoll.register(self._listener.fileno(), _IN)
            self._listener_paused = False

    def _read_connect_line(self, handshake: _Handshake) -> None:
        sock = handshake.sock
        # Peek, then take only up to the newline: bytes after it are stream data for the guest
        # and stay in the socket until the connection is established.
        try:
            peeked = sock.recv(MAX_CONNECT_LINE - len(handshake.line), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop_handshake(handshake, invalid=True)
            return
        if not peeked:
            self._drop_handshake(handshake, invalid=True)
            return
        newline = peeked.find(b"\n")
        take = newline + 1 if newline >= 0 else len(peeked)
        try:
            handshake.line += sock.recv(take)
        except OSError:
            self._drop_handshake(handshake, invalid=True)
            return
        if not handshake.line.endswith(b"\n"):
            if len(handshake.line) >= MAX_CONNECT_LINE:
                self._drop_handshake(handshake, invalid=True)
            return
        port = parse_connect_command(bytes(handshake.line))
        if port is None:
            log.info("vsock: invalid CONNECT line from a host connection", line=bytes(handshake.line))
            self._drop_handshake(handshake, invalid=True)
            return
        self._forget_handshake(handshake)
        local_port = self._allocate_local_port(port)
        conn = Connection.local_init(peer_cid=self.guest_cid, local_port=local_port, peer_port=port,
                                     buf_alloc=self.conn_buf_alloc)
        self._add(_Entry(conn, sock, local_port_allocated=True))

    def _forget_handshake(self, handshake: _Handshake) -> None:
        fd = handshake.sock.fileno()
        self._handshakes.pop(fd, None)
        self._by_fd.pop(fd, None)
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass

    def _drop_handshake(self, handshake: _Handshake, *, invalid: bool = False) -> None:
        if invalid:
            self.metrics.host_requests_invalid += 1
        self._forget_handshake(handshake)
        handshake.sock.close()
        self._resume_listener()

    def _allocate_local_port(self, peer_port: int) -> int:
        # At most max_connections ports are taken, so this ends within max_connections + 1 steps.
        while True:
            self._local_port_last = ((self._local_port_last + 1) & ~LOCAL_PORT_LIMIT) | LOCAL_PORT_FIRST
            port = self._local_port_last
            if port not in self._local_ports and (port, peer_port) not in self._conns:
                self._local_ports.add(port)
                return port

    def _socket_event(self, entry: _Entry, mask: int) -> None:
        conn = entry.conn
        if entry.sock is None:
            return
        if mask & (_OUT | _ERR_HUP) and conn.to_host_len:
            self._flush(entry)
        if mask & (_IN | _ERR_HUP) and conn.wants_host_read:
            self._read(entry)
        self._sync(entry)

    def _read(self, entry: _Entry) -> None:
        conn, sock = entry.conn, entry.sock
        assert sock is not None
        try:
            data = sock.recv(conn.host_read_budget)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.metrics.rx_read_fails += 1
            conn.host_failed(exc.strerror or str(exc))
            return
        if data:
            conn.host_data(data)
        else:
            conn.host_eof(gone=_hung_up(sock))

    def _flush(self, entry: _Entry) -> None:
        conn, sock = entry.conn, entry.sock
        if sock is None:
            return
        before = conn.fwd_cnt
        while out := conn.host_outgoing():
            try:
                n = sock.send(out, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self.metrics.tx_flush_fails += 1
                conn.host_failed(exc.strerror or str(exc))
                return
            conn.host_wrote(n)
            if n < len(out):
                break
        self.metrics.tx_bytes_count += (conn.fwd_cnt - before) & 0xFFFF_FFFF
        if conn.host_write_shutdown_due:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                self.metrics.tx_write_fails += 1
                conn.host_failed(exc.strerror or str(exc))
                return
            conn.host_write_shut()

    # --- connection bookkeeping ------------------------------------------------------------------

    def _add(self, entry: _Entry) -> None:
        assert entry.sock is not None
        self._conns[entry.conn.key] = entry
        self._by_fd[entry.sock.fileno()] = entry
        self.metrics.conns_added += 1
        self._sync(entry)
        self._rearm_timer()

    def _sync(self, entry: _Entry) -> None:
        """Bring the muxer's view of a connection up to date after anything happened to it."""
        conn = entry.conn
        if conn.closed:
            self._remove(entry)
            return
        if conn.state is ConnState.KILLED and entry.sock is not None:
            self._release_socket(entry)  # the host side is over; only the RST to the guest remains
        if conn.has_pending_rx:
            self._rx_ready.setdefault(conn.key, None)
        if conn.deadline is not None and conn.deadline != entry.deadline_pushed:
            heapq.heappush(self._deadlines, (conn.deadline, next(self._seq), conn.key))
            self._timer_dirty = True
        entry.deadline_pushed = conn.deadline
        if entry.sock is None:
            return
        interest = (_IN if conn.wants_host_read else 0) | (_OUT if conn.to_host_len else 0)
        if interest == entry.interest:
            return
        fd = entry.sock.fileno()
        try:
            if entry.interest == 0:
                self._epoll.register(fd, interest)
            elif interest == 0:
                self._epoll.unregister(fd)
            else:
                self._epoll.modify(fd, interest)
        except OSError as exc:
            self.metrics.conn_event_fails += 1
            log.error("vsock: cannot update a connection's epoll interest; resetting it", error=exc.strerror,
                      conn=repr(conn))
            conn.kill("epoll registration failed")
            self._release_socket(entry)
            return
        entry.interest = interest

    def _release_socket(self, entry: _Entry) -> None:
        sock = entry.sock
        if sock is None:
            return
        fd = sock.fileno()
        if entry.interest:
            try:
                self._epoll.unregister(fd)
            except OSError:
                pass
            entry.interest = 0
        self._by_fd.pop(fd, None)
        sock.close()
        entry.sock = None
        self._resume_listener()

    def _remove(self, entry: _Entry) -> None:
        conn = entry.conn
        self._release_socket(entry)
        if self._conns.get(conn.key) is entry:
            del self._conns[conn.key]
        self._rx_ready.pop(conn.key, None)
        if entry.local_port_allocated:
            self._local_ports.discard(conn.local_port)
        self.metrics.conns_removed += 1
        if conn.was_killed:
            self.metrics.conns_killed += 1
        log.debug("vsock: connection removed", conn=repr(conn), reason=conn.reset_reason)

    def _expire(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, key = heapq.heappop(self._deadlines)
            entry = self._conns.get(key)
            if entry is not None and entry.conn.tick(now):
                log.info("vsock: connection timed out", conn=repr(entry.conn), reason=entry.conn.reset_reason)
                self._sync(entry)
        if len(self._deadlines) > 2 * len(self._conns) + 64:
            # Superseded deadlines pile up only as fast as connections change state; drop them now and then.
            self._deadlines = [(e.conn.deadline, next(self._seq), k) for k, e in self._conns.items()
                               if e.conn.deadline is not None]
            heapq.heapify(self._deadlines)
        self._timer_dirty = True

    def _rearm_timer(self) -> None:
        if not self._timer_dirty or self.closed:
            return
        self._timer_dirty = False
        earliest = self._deadlines[0][0] if self._deadlines else None
        if earliest == self._timer_at:
            return
        try:
            if earliest is None:
                self._timer.disarm()
            else:
                self._timer.arm(max(1, int((earliest - self.clock()) * 1e9)))
        except TimerFdError as exc:
            self.metrics.muxer_event_fails += 1
            log.error("vsock: cannot arm the connection timer", error=str(exc))
            return
        self._timer_at = earliest

    def __repr__(self) -> str:
        return (f"<Muxer cid={self.guest_cid} {self.uds_path!r} conns={len(self._conns)} "
                f"handshakes={len(self._handshakes)} rx_ready={len(self._rx_ready)} rsts={len(self._rst_queue)}"
                f"{' listening' if self._listening else ''}>")


def _hung_up(sock: socket.socket) -> bool:
    """After a read of EOF: is the peer fully gone (POLLHUP), not just done writing?"""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return any(mask & (select.POLLHUP | select.POLLERR) for _, mask in poller.poll(0))

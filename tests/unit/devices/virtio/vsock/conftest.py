"""Vsock test tools: packet headers, a fake clock, short socket paths, and a simulated guest driver."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vmm.devices.virtio.vsock import (
    VIRTIO_VSOCK_OP_CREDIT_REQUEST,
    VIRTIO_VSOCK_OP_CREDIT_UPDATE,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_OP_SHUTDOWN,
    VIRTIO_VSOCK_TYPE_STREAM,
    VMADDR_CID_HOST,
    Muxer,
    PacketHeader,
)

GUEST_CID = 3
U32 = 0xFFFF_FFFF


def hdr(op: int, *, src_port: int, dst_port: int, length: int = 0, flags: int = 0, buf_alloc: int = 64 * 1024,
        fwd_cnt: int = 0, src_cid: int = GUEST_CID, dst_cid: int = VMADDR_CID_HOST,
        type_: int = VIRTIO_VSOCK_TYPE_STREAM) -> PacketHeader:
    """A header as the guest would send it (guest → host by default)."""
    return PacketHeader(src_cid=src_cid, dst_cid=dst_cid, src_port=src_port, dst_port=dst_port, len=length,
                        type=type_, op=op, flags=flags, buf_alloc=buf_alloc, fwd_cnt=fwd_cnt)


class FakeClock:
    """Monotonic seconds that only move when told."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sockdir():
    """A short temporary directory: Unix socket paths must fit 107 bytes."""
    path = tempfile.mkdtemp(prefix="vsk", dir="/tmp")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class GuestConn:
    """The guest's end of one stream, with its own credit accounting (the device's peer)."""

    local_port: int  # the guest's port
    peer_port: int  # the host's port
    buf_alloc: int
    state: str = "connecting"
    rx_cnt: int = 0  # payload bytes received
    fwd_cnt: int = 0  # payload bytes consumed by the guest application
    fwd_sent: int = 0  # fwd_cnt as last told to the device
    tx_cnt: int = 0  # payload bytes sent
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    peer_shutdown: int = 0
    received: bytearray = field(default_factory=bytearray)  # not yet consumed
    ops: list[int] = field(default_factory=list)  # every op received, in order

    @property
    def peer_credit(self) -> int:
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & U32
        return self.peer_buf_alloc - in_flight if in_flight <= self.peer_buf_alloc else 0


class CreditViolation(AssertionError):
    """The device sent the guest more than its credit."""


class GuestDriver:
    """Plays the guest's vsock driver against a `Muxer`: sends packets, pulls them into `rx_buf`-sized buffers.

    Every data packet the device sends is checked against the credit this
    guest granted (`CreditViolation`).
    """

    def __init__(self, muxer: Muxer, *, buf_alloc: int = 64 * 1024, rx_buf: int = 4096):
        self.muxer, self.buf_alloc, self.rx_buf = muxer, buf_alloc, rx_buf
        self.conns: dict[tuple[int, int], GuestConn] = {}
        self.orphans: list[PacketHeader] = []  # packets for no known connection (e.g. RSTs)
        self.requests: list[PacketHeader] = []  # host-initiated REQUESTs not yet answered

    def send(self, conn: GuestConn, op: int, data: bytes = b"", flags: int = 0) -> None:
        if op == VIRTIO_VSOCK_OP_RW:
            assert len(data) <= conn.peer_credit, "the test guest itself broke the credit rule"
            conn.tx_cnt = (conn.tx_cnt + len(data)) & U32
        conn.fwd_sent = conn.fwd_cnt
        self.muxer.send_packet(hdr(op, src_port=conn.local_port, dst_port=conn.peer_port, length=len(data),
                                   flags=flags, buf_alloc=conn.buf_alloc, fwd_cnt=conn.fwd_cnt), data)

    def connect(self, host_port: int, guest_port: int) -> GuestConn:
        conn = GuestConn(guest_port, host_port, self.buf_alloc)
        self.conns[(guest_port, host_port)] = conn
        self.send(conn, VIRTIO_VSOCK_OP_REQUEST)
        return conn

    def accept(self, request: PacketHeader) -> GuestConn:
        """Answer a host-initiated REQUEST with RESPONSE."""
        conn = GuestConn(request.dst_port, request.src_port, self.buf_alloc, state="established",
                         peer_buf_alloc=request.buf_alloc, peer_fwd_cnt=request.fwd_cnt)
        self.conns[(conn.local_port, conn.peer_port)] = conn
        self.requests.remove(request)
        self.send(conn, VIRTIO_VSOCK_OP_RESPONSE)
        return conn

    def poll(self, limit: int = 10_000) -> int:
        """Take packets from the device until it has none; returns how many."""
        n = 0
        while n < limit and self.muxer.has_pending_rx:
            packet = self.muxer.next_packet(self.rx_buf)
            if packet is None:
                break
            self.handle(*packet)
            n += 1
        return n

    def handle(self, header: PacketHeader, data: bytes) -> None:
        assert header.src_cid == VMADDR_CID_HOST and header.dst_cid == GUEST_CID
        assert header.type == VIRTIO_VSOCK_TYPE_STREAM and header.len == len(data) <= self.rx_buf
        conn = self.conns.get((header.dst_port, header.src_port))
        if conn is None or conn.state == "closed":
            if header.op == VIRTIO_VSOCK_OP_REQUEST:
                self.requests.append(header)
            else:
                self.orphans.append(header)
            return
        conn.ops.append(header.op)
        conn.peer_buf_alloc, conn.peer_fwd_cnt = header.buf_alloc, header.fwd_cnt
        if header.op == VIRTIO_VSOCK_OP_RESPONSE and conn.state == "connecting":
            conn.state = "established"
        elif header.op == VIRTIO_VSOCK_OP_RW:
            room = conn.buf_alloc - ((conn.rx_cnt - conn.fwd_cnt) & U32)
            if len(data) > room:
                raise CreditViolation(f"{len(data)} bytes sent with {room} bytes of credit")
            conn.rx_cnt = (conn.rx_cnt + len(data)) & U32
            conn.received += data
        elif header.op == VIRTIO_VSOCK_OP_RST:
            conn.state = "closed"
        elif header.op == VIRTIO_VSOCK_OP_SHUTDOWN:
            conn.peer_shutdown |= header.flags
        elif header.op == VIRTIO_VSOCK_OP_CREDIT_REQUEST:
            self.send(conn, VIRTIO_VSOCK_OP_CREDIT_UPDATE)

    def consume(self, conn: GuestConn, n: int | None = None) -> bytes:
        """The guest application reads `n` (all) bytes; tells the device once half the buffer was freed."""
        n = len(conn.received) if n is None else n
        data = bytes(conn.received[:n])
        del conn.received[:n]
        conn.fwd_cnt = (conn.fwd_cnt + n) & U32
        if conn.state == "established" and (conn.fwd_cnt - conn.fwd_sent) & U32 >= conn.buf_alloc // 2:
            self.send(conn, VIRTIO_VSOCK_OP_CREDIT_UPDATE)
        return data

"""virtio-net test tools: a fake TAP on a socketpair, a fake MMDS stack, a driver with both queues.

`FakeTap` implements `TapBackend` over one end of an AF_UNIX SOCK_SEQPACKET
socketpair (message boundaries kept, a too-small read truncates, as a TAP
does); the test holds the other end: `inject(packet)` is a frame the host
sends to the guest, `sent()` the frames the device wrote.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Sequence

import pytest

from tests.unit.devices.virtio.mock import Arena, Buf, MmioDriver, VirtQueue, new_interrupt
from vmm.devices.virtio import VIRTIO_F_VERSION_1, feature
from vmm.devices.virtio.net import VNET_HDR_LEN, Net, NetHeader
from vmm.devices.virtio.transport import MmioTransport
from vmm.memory import GuestMemory
from vmm.rate_limiter import ManualTimer, RateLimiter, TokenBucket

GUEST_MAC = bytes.fromhex("02aabbccdd01")
HOST_MAC = bytes.fromhex("02aabbccdd02")
ETHERTYPE_TEST = 0x88B5
RXQ_BASE = 0x1000
TXQ_BASE = 0x8000
ARENA_BASE = 0x10_0000
BASIC = feature(VIRTIO_F_VERSION_1)


def eth_frame(payload: bytes, *, src: bytes = GUEST_MAC, dst: bytes = b"\xff" * 6,
              ethertype: int = ETHERTYPE_TEST) -> bytes:
    return dst + src + struct.pack(">H", ethertype) + payload


def packet(frame: bytes, header: NetHeader | None = None) -> bytes:
    """A vnet header (all zero by default) followed by `frame`."""
    return (header or NetHeader()).pack() + frame


class FakeTap:
    """A `TapBackend` on a socketpair; records offload flags; can be told to fail."""

    def __init__(self, name: str = "tap0"):
        self._name = name
        self.device_end, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.device_end.setblocking(False)
        self.peer.setblocking(False)
        for s in (self.device_end, self.peer):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.offload_calls: list[int] = []
        self.read_error: OSError | None = None
        self.write_error: OSError | None = None
        self.offload_error: OSError | None = None
        self.reads = 0

    @property
    def name(self) -> str:
        return self._name

    def fileno(self) -> int:
        return self.device_end.fileno()

    def read_frame(self, buf: bytearray | memoryview) -> int:
        self.reads += 1
        if self.read_error is not None:
            raise self.read_error
        return os.readv(self.fileno(), [buf])

    def write_frame(self, parts: Sequence[bytes | bytearray | memoryview]) -> int:
        if self.write_error is not None:
            raise self.write_error
        return os.writev(self.fileno(), parts)

    def set_offload(self, flags: int) -> None:
        if self.offload_error is not None:
            raise self.offload_error
        self.offload_calls.append(flags)

    def close(self) -> None:
        self.device_end.close()

    # --- the host's side ---

    def inject(self, data: bytes) -> None:
        self.peer.send(data)

    def sent(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.peer.recv(1 << 17))
            except BlockingIOError:
                return out

    def close_all(self) -> None:
        self.device_end.close()
        self.peer.close()


class FakeMmds:
    """An MMDS stand-in: takes frames of `ethertype`, answers each with `reply(frame)`."""

    def __init__(self, ethertype: int = 0x0806, reply: bytes | None = None):
        self.ethertype = ethertype
        self.reply = reply
        self.detoured: list[bytes] = []
        self.outbox: list[bytes] = []
        self.offered: list[bytes] = []
        self.max_lens: list[int] = []

    def detour_frame(self, frame: bytes) -> bool:
        self.offered.append(frame)
        if struct.unpack(">H", frame[12:14])[0] != self.ethertype:
            return False
        self.detoured.append(frame)
        if self.reply is not None:
            self.outbox.append(self.reply)
        return True

    def write_next_frame(self, max_len: int) -> bytes | None:
        self.max_lens.append(max_len)
        return self.outbox.pop(0) if self.outbox else None


class Poller:
    """Records what the device asks of the event loop."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, bool]] = []

    def __call__(self, fd: int, enabled: bool) -> None:
        self.calls.append((fd, enabled))

    @property
    def enabled(self) -> bool | None:
        return self.calls[-1][1] if self.calls else None


class Clock:
    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now

    def advance_ms(self, ms: int) -> None:
        self.now += ms * 1_000_000


def manual_limiter(clock: Clock, *, bandwidth: int | None = None, ops: int | None = None,
                   refill_time_ms: int = 100) -> RateLimiter:
    """A limiter on `clock` with a pure timer (no fd)."""
    def bucket(size: int | None) -> TokenBucket | None:
        return None if size is None else TokenBucket(size, refill_time_ms=refill_time_ms, clock=clock)
    return RateLimiter(bucket(bandwidth), bucket(ops), clock=clock, timer=ManualTimer(clock))


class NetDriver:
    """Plays the guest's virtio-net driver through the MMIO transport."""

    def __init__(self, net: Net, mem: GuestMemory, *, features: int | None = None, queue_size: int = 16):
        self.net, self.mem = net, mem
        self.irq, self.edges = new_interrupt()
        self.transport = MmioTransport(net, mem, interrupt=self.irq)
        self.mmio = MmioDriver(self.transport)
        self.rxq = VirtQueue(mem, RXQ_BASE, queue_size)
        self.txq = VirtQueue(mem, TXQ_BASE, queue_size)
        self.arena = Arena(mem, ARENA_BASE, mem.total_size)
        self.mmio.init({0: self.rxq, 1: self.txq}, features)

    # --- TX ---

    def tx_bufs(self, data: bytes, split: Sequence[int] = ()) -> list[Buf]:
        """`data` in readable buffers cut at the offsets in `split`."""
        cuts = [0, *sorted(set(c for c in split if 0 < c < len(data))), len(data)]
        bufs = []
        for start, end in zip(cuts, cuts[1:]):
            addr = self.arena.alloc(end - start)
            self.mem.write(addr, data[start:end])
            bufs.append(Buf(addr, end - start))
        return bufs

    def send(self, data: bytes, split: Sequence[int] = (VNET_HDR_LEN,), *, notify: bool = True) -> int:
        head = self.txq.add_chain(self.tx_bufs(data, split))
        if notify:
            self.mmio.notify(1)
        return head

    # --- RX ---

    def rx_buf(self, size: int, parts: int = 1) -> list[Buf]:
        """A writable chain of `size` bytes in `parts` descriptors, pre-filled with 0xEE."""
        cut = [size * i // parts for i in range(parts + 1)]
        return [Buf(self.arena.alloc(b - a, fill=b"\xee"), b - a, True) for a, b in zip(cut, cut[1:])]

    def post_rx(self, size: int = 2048, count: int = 1, *, parts: int = 1, notify: bool = True) -> list[list[Buf]]:
        chains = []
        for _ in range(count):
            bufs = self.rx_buf(size, parts)
            self.rxq.add_chain(bufs)
            chains.append(bufs)
        if notify:
            self.mmio.notify(0)
        return chains

    def read_chain(self, bufs: list[Buf], length: int) -> bytes:
        out = b""
        for b in bufs:
            if len(out) >= length:
                break
            out += self.mem.read(b.addr, min(b.length, length - len(out)))
        return out


@pytest.fixture
def tap():
    t = FakeTap()
    yield t
    t.close_all()


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def net(tap, clock):
    from vmm.config.net import MacAddr
    n = Net("eth0", tap, MacAddr(GUEST_MAC), manual_limiter(clock), manual_limiter(clock))
    yield n
    n.close()

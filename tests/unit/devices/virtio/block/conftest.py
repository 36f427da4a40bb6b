"""Block test tools: a disk image with a known pattern and a driver that sends virtio-blk requests."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from tests.unit.devices.virtio.mock import Arena, Buf, MmioDriver, VirtQueue, new_interrupt
from vmm.devices.virtio.block import Block
from vmm.devices.virtio.transport import MmioTransport
from vmm.memory import GuestMemory

DISK_SECTORS = 64
STATUS_UNTOUCHED = 0xEE


def pattern(sectors: int, seed: int = 0) -> bytes:
    """Each sector filled with its own byte, so misplaced data shows."""
    return b"".join(bytes([(i + seed) & 0xFF]) * 512 for i in range(sectors))


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(pattern(DISK_SECTORS))
    return path


class BlkDriver:
    """Builds virtio-blk requests in guest memory and submits them through the transport."""

    def __init__(self, block: Block, mem: GuestMemory, *, features: int | None = None, queue_size: int = 16):
        self.block, self.mem = block, mem
        self.irq, self.edges = new_interrupt()
        self.transport = MmioTransport(block, mem, interrupt=self.irq)
        self.mmio = MmioDriver(self.transport)
        self.vq = VirtQueue(mem, 0x1000, queue_size)
        self.arena = Arena(mem, 0x10_0000, mem.total_size)
        self.mmio.init({0: self.vq}, features)

    def header(self, rtype: int, sector: int, *, length: int = 16, writable: bool = False) -> Buf:
        addr = self.arena.alloc(max(length, 16))
        self.mem.write(addr, struct.pack("<IIQ", rtype, 0, sector))
        return Buf(addr, length, writable)

    def status(self, *, length: int = 1, writable: bool = True) -> Buf:
        addr = self.arena.alloc(length)
        self.mem.write(addr, bytes([STATUS_UNTOUCHED]) * length)
        return Buf(addr, length, writable)

    def data(self, length: int, *, writable: bool, fill: bytes = b"\xcc") -> Buf:
        return Buf(self.arena.alloc(length, align=512, fill=fill), length, writable)

    def submit(self, bufs: list[Buf]) -> tuple[int, int]:
        """Add one chain, notify, return (used len, head)."""
        head = self.vq.add_chain(bufs)
        self.mmio.notify(0)
        used = self.vq.take_used()
        assert len(used) == 1 and used[0][0] == head, used
        return used[0][1], head

    def status_of(self, buf: Buf) -> int:
        return self.mem.read_u8(buf.addr)

    def read_buf(self, buf: Buf) -> bytes:
        return self.mem.read(buf.addr, buf.length)

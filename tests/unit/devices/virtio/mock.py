"""Driver-side test tools: a split virtqueue laid out in guest memory, an MMIO driver, a dummy device.

`VirtQueue` plays the guest driver: it owns a descriptor table, an available
ring and a used ring at fixed guest addresses, adds chains the way Linux's
virtio_ring does (descriptors linked with NEXT, head published in the
available ring, `avail.idx` bumped) and reads completions back from the used
ring. Raw setters (`write_desc`, `set_avail_idx`, ...) let a test build any
malformed layout. `MmioDriver` speaks the virtio-mmio register protocol the
way Linux's virtio_mmio driver does. `Arena` hands out guest buffers.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vmm.devices.virtio import ActivateError, VirtioDevice, VirtioInterrupt, feature
from vmm.devices.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Queue,
)
from vmm.devices.virtio.transport import mmio
from vmm.memory import GuestMemory

__all__ = ["Arena", "Buf", "VirtQueue", "MmioDriver", "DummyDevice", "InterruptCounter", "new_interrupt"]

_DESC = struct.Struct("<QIHH")


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


class Arena:
    """A bump allocator of guest buffers in `[base, limit)`."""

    def __init__(self, mem: GuestMemory, base: int, limit: int):
        self.mem, self.next, self.limit = mem, base, limit

    def alloc(self, size: int, *, align: int = 16, fill: bytes | None = None) -> int:
        addr = _align(self.next, align)
        if addr + size > self.limit:
            raise MemoryError("test arena exhausted")
        self.next = addr + size
        if fill is not None:
            self.mem.write(addr, (fill * (size // max(len(fill), 1) + 1))[:size])
        return addr


@dataclass(frozen=True)
class Buf:
    """One buffer of a chain as the driver describes it."""

    addr: int
    length: int
    writable: bool = False

    @property
    def flags(self) -> int:
        return VIRTQ_DESC_F_WRITE if self.writable else 0


class VirtQueue:
    """A driver-side split virtqueue of `size` entries starting at guest address `base`."""

    def __init__(self, mem: GuestMemory, base: int, size: int):
        self.mem, self.size = mem, size
        self.desc_table = _align(base, 16)
        self.avail_ring = self.desc_table + 16 * size
        self.used_ring = _align(self.avail_ring + 6 + 2 * size, 4)
        self.end = self.used_ring + 6 + 8 * size
        mem.write(self.desc_table, bytes(self.end - self.desc_table))
        self.next_desc = 0  # next free descriptor index (wraps)
        self.avail_idx = 0  # the driver's copy of avail.idx
        self.last_used = 0  # how far the driver has consumed the used ring

    # --- raw layout ---------------------------------------------------------------------

    def write_desc(self, index: int, addr: int, length: int, flags: int = 0, next_: int = 0) -> None:
        self.mem.write(self.desc_table + 16 * index, _DESC.pack(addr, length, flags, next_))

    def read_desc(self, index: int) -> tuple[int, int, int, int]:
        return _DESC.unpack(self.mem.read(self.desc_table + 16 * index, 16))

    def set_avail_idx(self, value: int) -> None:
        self.avail_idx = value & 0xFFFF
        self.mem.write_u16(self.avail_ring + 2, self.avail_idx)

    def set_avail_slot(self, slot: int, head: int) -> None:
        self.mem.write_u16(self.avail_ring + 4 + 2 * slot, head)

    def set_avail_flags(self, flags: int) -> None:
        self.mem.write_u16(self.avail_ring, flags)

    def set_used_event(self, value: int) -> None:
        self.mem.write_u16(self.avail_ring + 4 + 2 * self.size, value & 0xFFFF)

    @property
    def avail_event(self) -> int:
        return self.mem.read_u16(self.used_ring + 4 + 8 * self.size)

    @property
    def used_idx(self) -> int:
        return self.mem.read_u16(self.used_ring + 2)

    def used_elem(self, slot: int) -> tuple[int, int]:
        return struct.unpack("<II", self.mem.read(self.used_ring + 4 + 8 * (slot % self.size), 8))

    # --- the driver's operations ------------------------------------------------------------

    def _take_descs(self, n: int) -> list[int]:
        indexes = [(self.next_desc + i) % self.size for i in range(n)]
        self.next_desc = (self.next_desc + n) % self.size
        return indexes

    def build_chain(self, bufs: list[Buf]) -> int:
        """Write `bufs` as linked descriptors; returns the head index (not yet published)."""
        indexes = self._take_descs(len(bufs))
        for i, (index, buf) in enumerate(zip(indexes, bufs)):
            last = i == len(bufs) - 1
            self.write_desc(index, buf.addr, buf.length, buf.flags | (0 if last else VIRTQ_DESC_F_NEXT),
                            0 if last else indexes[i + 1])
        return indexes[0]

    def build_indirect(self, table_addr: int, bufs: list[Buf], *, prefix: tuple[Buf, ...] = ()) -> int:
        """Write `bufs` as an indirect table at `table_addr`, referenced after direct `prefix` buffers."""
        for i, buf in enumerate(bufs):
            last = i == len(bufs) - 1
            self.mem.write(table_addr + 16 * i, _DESC.pack(
                buf.addr, buf.length, buf.flags | (0 if last else VIRTQ_DESC_F_NEXT), 0 if last else i + 1))
        indexes = self._take_descs(len(prefix) + 1)
        for i, buf in enumerate(prefix):
            self.write_desc(indexes[i], buf.addr, buf.length, buf.flags | VIRTQ_DESC_F_NEXT, indexes[i + 1])
        self.write_desc(indexes[-1], table_addr, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT)
        return indexes[0]

    def publish(self, head: int) -> None:
        """Make chain `head` available: ring slot, then avail.idx (as a driver must order them)."""
        self.set_avail_slot(self.avail_idx % self.size, head)
        self.set_avail_idx(self.avail_idx + 1)

    def add_chain(self, bufs: list[Buf]) -> int:
        head = self.build_chain(bufs)
        self.publish(head)
        return head

    def take_used(self) -> list[tuple[int, int]]:
        """The (head, len) entries the device added since the last call."""
        out = []
        while self.last_used != self.used_idx:
            out.append(self.used_elem(self.last_used))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    # --- device side, for queue-level tests ------------------------------------------------

    def device_queue(self, max_size: int | None = None, *, event_idx: bool = False,
                     indirect: bool = False) -> Queue:
        q = Queue(max_size or self.size)
        q.size, q.ready = self.size, True
        q.desc_table, q.avail_ring, q.used_ring = self.desc_table, self.avail_ring, self.used_ring
        q.event_idx, q.indirect = event_idx, indirect
        return q


class InterruptCounter:
    """An edge trigger that counts."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


class MmioDriver:
    """Talks to a `MmioTransport` the way Linux's virtio_mmio driver does (32-bit accesses)."""

    def __init__(self, transport: mmio.MmioTransport):
        self.t = transport

    def read32(self, offset: int) -> int:
        return struct.unpack("<I", self.t.read(offset, 4))[0]

    def write32(self, offset: int, value: int) -> None:
        self.t.write(offset, struct.pack("<I", value & 0xFFFF_FFFF))

    @property
    def status(self) -> int:
        return self.read32(mmio.STATUS)

    def add_status(self, bits: int) -> None:
        self.write32(mmio.STATUS, self.status | bits)

    def device_features(self) -> int:
        self.write32(mmio.DEVICE_FEATURES_SEL, 1)
        high = self.read32(mmio.DEVICE_FEATURES)
        self.write32(mmio.DEVICE_FEATURES_SEL, 0)
        return high << 32 | self.read32(mmio.DEVICE_FEATURES)

    def write_driver_features(self, features: int) -> None:
        self.write32(mmio.DRIVER_FEATURES_SEL, 1)
        self.write32(mmio.DRIVER_FEATURES, features >> 32)
        self.write32(mmio.DRIVER_FEATURES_SEL, 0)
        self.write32(mmio.DRIVER_FEATURES, features & 0xFFFF_FFFF)

    def setup_queue(self, index: int, vq: VirtQueue) -> None:
        self.write32(mmio.QUEUE_SEL, index)
        assert self.read32(mmio.QUEUE_READY) == 0
        assert self.read32(mmio.QUEUE_NUM_MAX) >= vq.size
        self.write32(mmio.QUEUE_NUM, vq.size)
        for low, addr in ((mmio.QUEUE_DESC_LOW, vq.desc_table), (mmio.QUEUE_DRIVER_LOW, vq.avail_ring),
                          (mmio.QUEUE_DEVICE_LOW, vq.used_ring)):
            self.write32(low, addr & 0xFFFF_FFFF)
            self.write32(low + 4, addr >> 32)
        self.write32(mmio.QUEUE_READY, 1)

    def negotiate(self, features: int | None = None) -> int:
        """Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK; returns the accepted features."""
        self.write32(mmio.STATUS, 0)
        self.add_status(mmio.DEVICE_STATUS_ACKNOWLEDGE)
        self.add_status(mmio.DEVICE_STATUS_DRIVER)
        offered = self.device_features()
        wanted = offered if features is None else features
        self.write_driver_features(wanted)
        self.add_status(mmio.DEVICE_STATUS_FEATURES_OK)
        return wanted

    def init(self, queues: dict[int, VirtQueue], features: int | None = None) -> None:
        """The whole §3.1.1 sequence; asserts FEATURES_OK stuck."""
        self.negotiate(features)
        assert self.status & mmio.DEVICE_STATUS_FEATURES_OK, "device refused the features"
        for index, vq in queues.items():
            self.setup_queue(index, vq)
        self.add_status(mmio.DEVICE_STATUS_DRIVER_OK)

    def notify(self, index: int) -> None:
        self.write32(mmio.QUEUE_NOTIFY, index)

    def ack_interrupt(self) -> int:
        status = self.read32(mmio.INTERRUPT_STATUS)
        self.write32(mmio.INTERRUPT_ACK, status)
        return status


class DummyDevice(VirtioDevice):
    """A device with two queues (16 and 32 entries) and 8 bytes of writable config.

    `process_queue` completes every chain with length 0 and records the
    index; `fail_activation` makes the next activation fail.
    """

    device_type = 42

    def __init__(self, avail_features: int = feature(32) | feature(3)):
        super().__init__(queue_sizes=[16, 32], avail_features=avail_features)
        self.config = bytearray(b"\x01\x02\x03\x04\x05\x06\x07\x08")
        self.processed: list[int] = []
        self.fail_activation = False
        self.resets = 0

    def config_bytes(self) -> bytes:
        return bytes(self.config)

    def write_config(self, offset: int, data: bytes) -> None:
        if 0 <= offset and offset + len(data) <= len(self.config):
            self.config[offset:offset + len(data)] = data

    def _on_activate(self) -> None:
        if self.fail_activation:
            raise ActivateError("asked to fail")

    def _on_reset(self) -> None:
        self.resets += 1

    def process_queue(self, index: int) -> None:
        self.processed.append(index)
        queue, mem = self.queues[index], self.mem
        assert mem is not None
        added = False
        while (chain := queue.pop(mem)) is not None:
            queue.add_used(mem, chain.head_index, 0)
            added = True
        if added:
            self.signal_used(queue)


def new_interrupt() -> tuple[VirtioInterrupt, InterruptCounter]:
    counter = InterruptCounter()
    return VirtioInterrupt(counter), counter

"""A hostile guest built from fuzz bytes: guest memory, virtqueues and a virtio-mmio driver.

An input for a virtqueue-based target is a 12-byte control block followed
by a guest memory image::

    0   8   driver feature mask (le64): the driver acks offered & mask (VERSION_1 always)
    8   1   queue size: low 5 bits n -> 1 << (n % 5) (1..16); bit 7 set -> the raw
            low 7 bits instead (0, odd sizes: refused by the transport or the queue)
    9   1   flags (target-specific: device variant, extra rounds, ...)
    10  1   host-side length (target-specific: a frame the host sends, ...)
    11  1   reserved
    12  ..  the image, copied to guest address 0 (the rest of memory is zero)

Guest memory is two regions with a hole between them, so buffers that
straddle a region boundary or fall in the hole are possible::

    [0x0000, 0x4000)  RAM        [0x8000, 0xC000)  RAM

Queue i has its descriptor table at ``0x200 * i``, its available ring at
``0x200 * i + 0x100`` and its used ring at ``0x200 * i + 0x140`` (room for 16
entries each, alignments as §2.6 requires); buffers go from 0x600 up. The
seeds are well-formed requests laid out this way; mutation makes them
hostile (addresses, lengths, flags, `next` links, ring indexes).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vmm.devices.virtio import VIRTIO_F_VERSION_1, VirtioDevice, VirtioInterrupt, feature
from vmm.devices.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, Queue
from vmm.devices.virtio.transport import mmio
from vmm.memory import GuestMemory

__all__ = ["REGIONS", "CONTROL_SIZE", "MAX_QUEUE", "BUFFER_BASE", "Control", "FuzzGuest", "ImageBuilder",
           "queue_layout"]

REGIONS = [(0x0000, 0x4000), (0x8000, 0x4000)]
CONTROL_SIZE = 12
MAX_QUEUE = 16
QUEUE_AREA = 0x200
BUFFER_BASE = 0x600
_CONTROL = struct.Struct("<QBBBB")
_DESC = struct.Struct("<QIHH")


def queue_layout(index: int) -> tuple[int, int, int]:
    """(descriptor table, available ring, used ring) of queue `index`."""
    base = QUEUE_AREA * index
    return base, base + 0x100, base + 0x140


@dataclass(frozen=True)
class Control:
    """The decoded control block."""

    feature_mask: int
    queue_size: int
    flags: int
    host_len: int

    @classmethod
    def parse(cls, data: bytes) -> Control:
        mask, size_byte, flags, host_len, _ = _CONTROL.unpack(data[:CONTROL_SIZE].ljust(CONTROL_SIZE, b"\0"))
        size = size_byte & 0x7F if size_byte & 0x80 else 1 << ((size_byte & 0x1F) % 5)
        return cls(mask, size, flags, host_len)


class FuzzGuest:
    """Guest memory plus a driver that brings a device up through its virtio-mmio registers."""

    def __init__(self) -> None:
        self.mem = GuestMemory.anonymous(REGIONS)
        self._zero = [bytes(size) for _, size in REGIONS]

    def load(self, image: bytes) -> None:
        """Zero guest memory, then copy `image` from address 0 (what does not fit region 0 goes to region 1)."""
        for (base, _), zero in zip(REGIONS, self._zero):
            self.mem.write(base, zero)
        first = REGIONS[0][1]
        self.mem.write(0, image[:first])
        if len(image) > first:
            self.mem.write(REGIONS[1][0], image[first:first + REGIONS[1][1]])

    def raw_queue(self, index: int, control: Control, *, event_idx: bool, indirect: bool) -> Queue:
        """A device-side `Queue` over queue `index`'s rings, set up as the transport would."""
        q = Queue(MAX_QUEUE)
        q.size = control.queue_size
        q.desc_table, q.avail_ring, q.used_ring = queue_layout(index)
        q.ready = True
        q.event_idx, q.indirect = event_idx, indirect
        return q

    def bring_up(self, transport: mmio.MmioTransport, queues: int, control: Control) -> bool:
        """Reset, negotiate (offered & mask), set up `queues` queues, DRIVER_OK; True if the device is live."""
        w = lambda off, v: transport.write(off, struct.pack("<I", v & 0xFFFF_FFFF))  # noqa: E731
        r = lambda off: struct.unpack("<I", transport.read(off, 4))[0]  # noqa: E731
        w(mmio.STATUS, 0)
        w(mmio.STATUS, mmio.DEVICE_STATUS_ACKNOWLEDGE)
        w(mmio.STATUS, mmio.DEVICE_STATUS_ACKNOWLEDGE | mmio.DEVICE_STATUS_DRIVER)
        w(mmio.DEVICE_FEATURES_SEL, 1)
        offered = r(mmio.DEVICE_FEATURES) << 32
        w(mmio.DEVICE_FEATURES_SEL, 0)
        offered |= r(mmio.DEVICE_FEATURES)
        acked = offered & (control.feature_mask | feature(VIRTIO_F_VERSION_1))
        w(mmio.DRIVER_FEATURES_SEL, 1)
        w(mmio.DRIVER_FEATURES, acked >> 32)
        w(mmio.DRIVER_FEATURES_SEL, 0)
        w(mmio.DRIVER_FEATURES, acked)
        status = mmio.DEVICE_STATUS_ACKNOWLEDGE | mmio.DEVICE_STATUS_DRIVER | mmio.DEVICE_STATUS_FEATURES_OK
        w(mmio.STATUS, status)
        if not r(mmio.STATUS) & mmio.DEVICE_STATUS_FEATURES_OK:
            return False
        for index in range(queues):
            desc, avail, used = queue_layout(index)
            w(mmio.QUEUE_SEL, index)
            w(mmio.QUEUE_NUM, control.queue_size)
            for low, addr in ((mmio.QUEUE_DESC_LOW, desc), (mmio.QUEUE_DRIVER_LOW, avail),
                              (mmio.QUEUE_DEVICE_LOW, used)):
                w(low, addr)
                w(low + 4, addr >> 32)
            w(mmio.QUEUE_READY, 1)
        w(mmio.STATUS, status | mmio.DEVICE_STATUS_DRIVER_OK)
        return bool(r(mmio.STATUS) & mmio.DEVICE_STATUS_DRIVER_OK) and transport.device.is_activated

    @staticmethod
    def notify(transport: mmio.MmioTransport, index: int) -> None:
        transport.write(mmio.QUEUE_NOTIFY, struct.pack("<I", index))

    def close(self) -> None:
        self.mem.close()

    def __repr__(self) -> str:
        return f"<FuzzGuest {self.mem!r}>"


def new_transport(device: VirtioDevice, guest: FuzzGuest) -> mmio.MmioTransport:
    return mmio.MmioTransport(device, guest.mem, interrupt=VirtioInterrupt(lambda: None))


class ImageBuilder:
    """Lays out well-formed chains for seeds: `chain(queue, bufs)` then `build()`."""

    def __init__(self, *, queue_size: int = 16, feature_mask: int = (1 << 64) - 1, flags: int = 0,
                 host: bytes = b"") -> None:
        self.image = bytearray(BUFFER_BASE)
        self.queue_size = queue_size
        self.control = _CONTROL.pack(feature_mask, {1: 0, 2: 1, 4: 2, 8: 3, 16: 4}[queue_size], flags,
                                     len(host), 0)
        self.host = host
        self._next_desc: dict[int, int] = {}
        self._avail: dict[int, int] = {}

    def buffer(self, data: bytes, *, align: int = 16) -> int:
        addr = -(-len(self.image) // align) * align
        self.image += bytes(addr - len(self.image)) + data
        return addr

    def chain(self, queue: int, bufs: list[tuple[int, int, bool]]) -> None:
        """Add a chain of (addr, length, device-writable) buffers to `queue` and publish it."""
        desc_table, avail, _ = queue_layout(queue)
        first = self._next_desc.get(queue, 0)
        for i, (addr, length, writable) in enumerate(bufs):
            index = (first + i) % self.queue_size
            last = i == len(bufs) - 1
            flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
            off = desc_table + 16 * index
            self.image[off:off + 16] = _DESC.pack(addr, length, flags, (index + 1) % self.queue_size)
        self._next_desc[queue] = (first + len(bufs)) % self.queue_size
        n = self._avail.get(queue, 0)
        struct.pack_into("<H", self.image, avail + 4 + 2 * (n % self.queue_size), first % self.queue_size)
        struct.pack_into("<H", self.image, avail + 2, n + 1)
        self._avail[queue] = n + 1

    def build(self) -> bytes:
        data = self.control + bytes(self.image)
        if self.host:
            data += self.host
        return data

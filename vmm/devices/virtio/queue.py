"""The split virtqueue, device side (virtio 1.1 §2.6).

Primer. A split virtqueue is three structures in guest memory, each written
by one side only:

    Descriptor Table  16 * size bytes, 16-aligned   (driver writes)
        struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; }
    Available Ring    6 + 2 * size bytes, 2-aligned  (driver writes)
        le16 flags; le16 idx; le16 ring[size]; le16 used_event;
    Used Ring         6 + 8 * size bytes, 4-aligned  (device writes)
        le16 flags; le16 idx; struct { le32 id; le32 len; } ring[size]; le16 avail_event;

The driver chains descriptors (flag NEXT, field `next`) into a buffer, puts
the index of the chain's head in `avail.ring[avail.idx % size]` and bumps
`avail.idx`. The device takes heads in order (`next_avail` counts what it
took), reads/writes the buffers, then puts `(head, bytes written)` in
`used.ring[used.idx % size]` and bumps `used.idx`. Both indexes are
free-running 16-bit counters. With VIRTIO_RING_F_EVENT_IDX (§2.6.7, §2.6.10)
each side publishes the index at which it next wants to be notified:
`used_event` (driver → "interrupt me when used.idx passes this") and
`avail_event` (device → "kick me when avail.idx passes this").

The guest is hostile. Everything read from guest memory is checked before it
is used:

* the ring addresses, alignments and size are validated once (`is_valid`),
  before activation, so ring accesses cannot leave guest memory;
* `avail.idx` may not run more than `size` entries ahead of `next_avail`
  (a driver cannot have more buffers outstanding than ring slots): if it
  does, the queue is marked broken, logged once and never processed again
  until reset; `pop` returns None, it never raises;
* a head index >= size in the available ring is skipped (counted, logged);
* walking a chain is bounded: at most `size` descriptors in all (§2.6.5.3.1:
  a chain, indirect tables included, is never longer than the queue size),
  every `next` < size (or < the indirect table's length), every buffer
  non-empty and wholly inside one guest memory region, no address overflow
  past 2**64, the chain's total length at most 2**32 (§2.6.5);
* indirect descriptors (§2.6.5.3) are honoured only if
  VIRTIO_RING_F_INDIRECT_DESC was negotiated; a table's length must be a
  non-zero multiple of 16 with at most `size` entries, an indirect
  descriptor may not also have NEXT, and a table may not point at another.

A malformed chain raises a `DescriptorChainError` while it is walked. The
device catches it and completes (or drops) the request: nothing raised here
leaves a device.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields
from typing import Iterator

import structlog

from vmm.memory import GuestMemory, GuestMemoryError

__all__ = [
    "VIRTQ_DESC_F_NEXT",
    "VIRTQ_DESC_F_WRITE",
    "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_AVAIL_F_NO_INTERRUPT",
    "VIRTQ_USED_F_NO_NOTIFY",
    "MAX_QUEUE_SIZE",
    "DESCRIPTOR_SIZE",
    "MAX_CHAIN_BYTES",
    "QueueError",
    "DescriptorChainError",
    "DescriptorIndexOutOfRange",
    "DescriptorChainTooLong",
    "DescriptorOutOfMemory",
    "DescriptorZeroLength",
    "DescriptorChainTooLarge",
    "IndirectNotNegotiated",
    "IndirectWithNext",
    "IndirectNested",
    "IndirectTableInvalid",
    "IndirectTableTooLong",
    "UsedElementInvalid",
    "QueueStateInvalid",
    "Descriptor",
    "DescriptorChain",
    "QueueState",
    "Queue",
    "desc_table_size",
    "avail_ring_size",
    "used_ring_size",
]

log = structlog.get_logger("vmm.devices.virtio.queue")

# virtio 1.1 §2.6.5 "The Virtqueue Descriptor Table": descriptor flags.
VIRTQ_DESC_F_NEXT = 0x1
VIRTQ_DESC_F_WRITE = 0x2
VIRTQ_DESC_F_INDIRECT = 0x4

# virtio 1.1 §2.6.6 "The Virtqueue Available Ring" / §2.6.8 "The Virtqueue Used Ring".
VIRTQ_AVAIL_F_NO_INTERRUPT = 0x1
VIRTQ_USED_F_NO_NOTIFY = 0x1

# virtio 1.1 §2.6: "The maximum Queue Size value is 32768."
MAX_QUEUE_SIZE = 32768

# virtio 1.1 §2.6 table "Virtqueue Part / Alignment / Size".
DESCRIPTOR_SIZE = 16
DESC_TABLE_ALIGN = 16
AVAIL_RING_ALIGN = 2
USED_RING_ALIGN = 4
USED_ELEMENT_SIZE = 8

# virtio 1.1 §2.6.5: "Drivers MUST NOT add a descriptor chain longer than 2^32 bytes in total".
MAX_CHAIN_BYTES = 1 << 32

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")
_U16 = struct.Struct("<H")
_U16_MASK = 0xFFFF
_U32_MASK = 0xFFFF_FFFF
_U64_LIMIT = 1 << 64


def desc_table_size(size: int) -> int:
    """Bytes of a descriptor table for `size` entries (§2.6)."""
    return DESCRIPTOR_SIZE * size


def avail_ring_size(size: int) -> int:
    """Bytes of an available ring for `size` entries, used_event included (§2.6)."""
    return 6 + 2 * size


def used_ring_size(size: int) -> int:
    """Bytes of a used ring for `size` entries, avail_event included (§2.6)."""
    return 6 + USED_ELEMENT_SIZE * size


class QueueError(Exception):
    """A virtqueue operation failed."""


class DescriptorChainError(QueueError):
    """The guest gave a malformed descriptor chain."""


class DescriptorIndexOutOfRange(DescriptorChainError):
    """A descriptor's `next` index is outside its descriptor table."""


class DescriptorChainTooLong(DescriptorChainError):
    """A descriptor chain has more descriptors than the queue size (a loop, or an oversized chain)."""


class DescriptorOutOfMemory(DescriptorChainError):
    """A descriptor's buffer is not wholly inside one guest memory region."""


class DescriptorZeroLength(DescriptorChainError):
    """A descriptor has a zero-length buffer."""


class DescriptorChainTooLarge(DescriptorChainError):
    """A descriptor chain's buffers add up to more than 2**32 bytes."""


class IndirectNotNegotiated(DescriptorChainError):
    """An indirect descriptor was used without VIRTIO_RING_F_INDIRECT_DESC."""


class IndirectWithNext(DescriptorChainError):
    """An indirect descriptor also has the NEXT flag."""


class IndirectNested(DescriptorChainError):
    """An indirect table contains another indirect descriptor."""


class IndirectTableInvalid(DescriptorChainError):
    """An indirect table's length is zero or not a multiple of 16."""


class IndirectTableTooLong(DescriptorChainError):
    """An indirect table has more entries than the queue size."""


class UsedElementInvalid(QueueError):
    """A used-ring element names no descriptor of the queue or has a length beyond 32 bits."""


class QueueStateInvalid(QueueError):
    """A saved queue state is out of range or inconsistent."""


@dataclass(frozen=True, slots=True)
class Descriptor:
    """One validated buffer of a chain: `[addr, addr + length)` lies in guest memory."""

    addr: int
    length: int
    flags: int

    @property
    def is_write_only(self) -> bool:
        """True for a device-writable buffer (VIRTQ_DESC_F_WRITE)."""
        return bool(self.flags & VIRTQ_DESC_F_WRITE)

    @property
    def end(self) -> int:
        return self.addr + self.length


class DescriptorChain:
    """The chain starting at `head_index`, walked lazily and validated as it goes.

    Iterating yields `Descriptor`s, the contents of an indirect table in place
    of the descriptor that points at it, and raises a `DescriptorChainError`
    at the first malformed descriptor (so a caller that wants all-or-nothing
    calls `descriptors()` before acting). The walk re-reads the guest's
    table, so two walks of a chain the guest is rewriting may differ: take
    the list once and use it.
    """

    __slots__ = ("mem", "desc_table", "queue_size", "head_index", "indirect_allowed")

    def __init__(self, mem: GuestMemory, desc_table: int, queue_size: int, head_index: int,
                 *, indirect_allowed: bool):
        self.mem = mem
        self.desc_table = desc_table
        self.queue_size = queue_size
        self.head_index = head_index
        self.indirect_allowed = indirect_allowed

    def _read(self, table: int, index: int) -> tuple[int, int, int, int]:
        try:
            return _DESC.unpack(self.mem.read(table + DESCRIPTOR_SIZE * index, DESCRIPTOR_SIZE))
        except GuestMemoryError as exc:  # the table was validated; only a shrinking memory map gets here
            raise DescriptorOutOfMemory(f"descriptor {index} of table {table:#x} is unreadable") from exc

    def _check_buffer(self, addr: int, length: int) -> None:
        if length == 0:
            raise DescriptorZeroLength(f"zero-length buffer at {addr:#x}")
        if addr + length > _U64_LIMIT:
            raise DescriptorOutOfMemory(f"buffer {addr:#x}+{length:#x} wraps past 2**64")
        if not self.mem.check_range(addr, length):
            raise DescriptorOutOfMemory(f"buffer {addr:#x}+{length:#x} is outside guest memory")

    def __iter__(self) -> Iterator[Descriptor]:
        budget = self.queue_size  # descriptors this chain may still yield (§2.6.5.3.1)
        total = 0
        table, table_len, index = self.desc_table, self.queue_size, self.head_index
        in_indirect = False
        if index >= table_len:
            raise DescriptorIndexOutOfRange(f"head index {index} >= queue size {table_len}")
        while True:
            addr, length, flags, nxt = self._read(table, index)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if in_indirect:
                    raise IndirectNested(f"indirect descriptor {index} inside an indirect table")
                if not self.indirect_allowed:
                    raise IndirectNotNegotiated(f"descriptor {index} is indirect")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise IndirectWithNext(f"indirect descriptor {index} has NEXT")
                if length == 0 or length % DESCRIPTOR_SIZE:
                    raise IndirectTableInvalid(f"indirect table length {length} is not a non-zero multiple of 16")
                entries = length // DESCRIPTOR_SIZE
                if entries > self.queue_size:
                    raise IndirectTableTooLong(f"indirect table has {entries} entries, queue size is {self.queue_size}")
                self._check_buffer(addr, length)
                # The indirect descriptor's WRITE flag is ignored (§2.6.5.3.2); walk the table from entry 0.
                table, table_len, index = addr, entries, 0
                in_indirect = True
                continue
            if budget == 0:
                raise DescriptorChainTooLong(f"chain from head {self.head_index} exceeds {self.queue_size} descriptors")
            budget -= 1
            self._check_buffer(addr, length)
            total += length
            if total > MAX_CHAIN_BYTES:
                raise DescriptorChainTooLarge(f"chain from head {self.head_index} exceeds 2**32 bytes")
            yield Descriptor(addr, length, flags & (VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE))
            if not flags & VIRTQ_DESC_F_NEXT:
                return
            if nxt >= table_len:
                raise DescriptorIndexOutOfRange(f"next index {nxt} >= table length {table_len}")
            index = nxt

    def descriptors(self) -> list[Descriptor]:
        """The whole chain, validated; raises `DescriptorChainError` if any part is malformed."""
        return list(self)

    def __repr__(self) -> str:
        return f"<DescriptorChain head={self.head_index} table={self.desc_table:#x} size={self.queue_size}>"


@dataclass(frozen=True)
class QueueState:
    """A queue's registers and ring positions as plain data (untrusted on restore).

    `num_added` is the number of used entries published since the last
    interrupt decision; `broken` records that the guest ran `avail.idx` past
    the ring (the queue stays stopped until reset).
    """

    max_size: int
    size: int
    ready: bool
    desc_table: int
    avail_ring: int
    used_ring: int
    next_avail: int
    next_used: int
    num_added: int = 0
    broken: bool = False


class Queue:
    """One split virtqueue as the device sees it. Not thread-safe: its device's lock guards it.

    The transport writes `size`, `ready` and the three ring addresses while
    the driver sets the queue up; the device sets `event_idx` and `indirect`
    from the negotiated features when it is activated. All ring access goes
    through `mem`, after `is_valid(mem)` held.
    """

    def __init__(self, max_size: int):
        if not _is_pow2(max_size) or max_size > MAX_QUEUE_SIZE:
            raise ValueError(f"queue max size {max_size} is not a power of two <= {MAX_QUEUE_SIZE}")
        self.max_size = max_size
        self.event_idx = False
        self.indirect = False
        self.reset()

    def reset(self) -> None:
        """Back to the state after a device reset (§2.1.1, §4.2.3.1)."""
        self.size = self.max_size
        self.ready = False
        self.desc_table = 0
        self.avail_ring = 0
        self.used_ring = 0
        self.next_avail = 0
        self.next_used = 0
        self.num_added = 0
        self.broken = False
        self.event_idx = False
        self.indirect = False
        self.invalid_heads = 0

    # --- validation ---------------------------------------------------------------------

    def is_valid(self, mem: GuestMemory) -> bool:
        """Size a power of two <= max_size; rings aligned (§2.6) and wholly inside guest memory."""
        size = self.size
        if not (0 < size <= self.max_size and _is_pow2(size)):
            return False
        parts = (
            (self.desc_table, DESC_TABLE_ALIGN, desc_table_size(size)),
            (self.avail_ring, AVAIL_RING_ALIGN, avail_ring_size(size)),
            (self.used_ring, USED_RING_ALIGN, used_ring_size(size)),
        )
        return all(addr % align == 0 and addr + length <= _U64_LIMIT and mem.check_range(addr, length)
                   for addr, align, length in parts)

    # --- available ring -----------------------------------------------------------------

    def avail_idx(self, mem: GuestMemory) -> int:
        return mem.read_u16(self.avail_ring + 2)

    def pending(self, mem: GuestMemory) -> int:
        """How many heads the driver has made available that the device has not taken."""
        return (self.avail_idx(mem) - self.next_avail) & _U16_MASK

    def _checked_pending(self, mem: GuestMemory) -> int | None:
        pending = self.pending(mem)
        if pending > self.size:
            # The driver cannot have more buffers outstanding than ring slots: a buggy or
            # malicious driver (Firecracker calls it a DoS attempt). Stop this queue until reset.
            self.broken = True
            log.error("virtqueue available index runs past the ring; queue stopped until reset",
                      avail_idx=self.avail_idx(mem), next_avail=self.next_avail, size=self.size)
            return None
        return pending

    def pop(self, mem: GuestMemory) -> DescriptorChain | None:
        """The next available chain, or None (empty, broken, or not ready). Never raises for guest input.

        With EVENT_IDX, finding the ring empty publishes `avail_event =
        next_avail` and looks again, so a buffer added in between is not
        left without a notification (§2.6.10).
        """
        if self.broken or not self.ready or not 0 < self.size <= self.max_size:
            return None
        try:
            while True:
                pending = self._checked_pending(mem)
                if pending is None:
                    return None
                if pending == 0 and self.event_idx:
                    self.set_avail_event(mem, self.next_avail)
                    pending = self._checked_pending(mem)
                    if pending is None:
                        return None
                if pending == 0:
                    return None
                slot = self.next_avail % self.size
                head = mem.read_u16(self.avail_ring + 4 + 2 * slot)
                self.next_avail = (self.next_avail + 1) & _U16_MASK
                if head < self.size:
                    return DescriptorChain(mem, self.desc_table, self.size, head, indirect_allowed=self.indirect)
                # No chain to return and no valid id to complete: skip the slot (bounded by `pending`).
                self.invalid_heads += 1
                if self.invalid_heads == 1:
                    log.warning("virtqueue head index out of range; skipped (further ones are counted)",
                                head=head, size=self.size)
        except GuestMemoryError:
            # The rings were validated at activation; only a caller that skipped is_valid() gets here.
            self.broken = True
            log.error("virtqueue rings are outside guest memory; queue stopped until reset")
            return None

    def undo_pop(self) -> None:
        """Give back the chain the last `pop` returned (e.g. the device is rate limited)."""
        self.next_avail = (self.next_avail - 1) & _U16_MASK

    def set_avail_event(self, mem: GuestMemory, value: int) -> None:
        """Publish `avail_event` (EVENT_IDX): the driver kicks when avail.idx moves past `value`."""
        mem.write(self.used_ring + 4 + USED_ELEMENT_SIZE * self.size, _U16.pack(value & _U16_MASK))

    def used_event(self, mem: GuestMemory) -> int:
        return mem.read_u16(self.avail_ring + 4 + 2 * self.size)

    # --- used ring ------------------------------------------------------------------------

    def add_used(self, mem: GuestMemory, head_index: int, length: int) -> None:
        """Return chain `head_index` to the driver, `length` bytes written into it (§2.6.8).

        The element is written before `used.idx` is published (x86 keeps
        stores in program order; CPython issues each as its own memcpy).
        """
        if not 0 <= head_index < self.size:
            raise UsedElementInvalid(f"head index {head_index} >= queue size {self.size}")
        if not 0 <= length <= _U32_MASK:
            raise UsedElementInvalid(f"used length {length} does not fit 32 bits")
        slot = self.next_used % self.size
        mem.write(self.used_ring + 4 + USED_ELEMENT_SIZE * slot, _USED_ELEM.pack(head_index, length))
        self.next_used = (self.next_used + 1) & _U16_MASK
        mem.write(self.used_ring + 2, _U16.pack(self.next_used))
        # Saturates: past 2**16 entries the notification window covers every index anyway.
        self.num_added = min(self.num_added + 1, _U16_MASK + 1)

    def needs_notification(self, mem: GuestMemory) -> bool:
        """Whether the driver wants an interrupt for the entries added since the last call.

        With EVENT_IDX (§2.6.7.2): notify iff `used_event` lies in the
        window of indexes just published, i.e. Linux's
        `vring_need_event(used_event, new, old)`. Without it: unless the
        driver set VIRTQ_AVAIL_F_NO_INTERRUPT (§2.6.7.1). Nothing added: no.
        """
        added, self.num_added = self.num_added, 0
        if added == 0:
            return False
        if not self.event_idx:
            return not mem.read_u16(self.avail_ring) & VIRTQ_AVAIL_F_NO_INTERRUPT
        if added > _U16_MASK:
            return True  # the window covers every index
        new = self.next_used
        old = (new - added) & _U16_MASK
        event = self.used_event(mem)
        return ((new - event - 1) & _U16_MASK) < ((new - old) & _U16_MASK)

    # --- persistence ----------------------------------------------------------------------

    def state(self) -> QueueState:
        return QueueState(
            max_size=self.max_size, size=self.size, ready=self.ready, desc_table=self.desc_table,
            avail_ring=self.avail_ring, used_ring=self.used_ring, next_avail=self.next_avail,
            next_used=self.next_used, num_added=self.num_added, broken=self.broken,
        )

    @classmethod
    def from_state(cls, state: QueueState) -> Queue:
        """Rebuild from untrusted state; `QueueStateInvalid` unless every field is in range.

        Ring placement is not checked here (the device checks `is_valid`
        against guest memory when it re-activates).
        """
        _validate_queue_state(state)
        queue = cls(state.max_size)
        queue.size = state.size
        queue.ready = state.ready
        queue.desc_table = state.desc_table
        queue.avail_ring = state.avail_ring
        queue.used_ring = state.used_ring
        queue.next_avail = state.next_avail
        queue.next_used = state.next_used
        queue.num_added = state.num_added
        queue.broken = state.broken
        return queue

    def __repr__(self) -> str:
        flags = "".join(f" {name}" for name, on in (("ready", self.ready), ("broken", self.broken),
                                                     ("event_idx", self.event_idx), ("indirect", self.indirect)) if on)
        return (f"<Queue size={self.size}/{self.max_size} desc={self.desc_table:#x} avail={self.avail_ring:#x} "
                f"used={self.used_ring:#x} next_avail={self.next_avail} next_used={self.next_used}{flags}>")


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _validate_queue_state(state: QueueState) -> None:
    if not isinstance(state, QueueState):
        raise QueueStateInvalid(f"expected QueueState, got {type(state).__name__}")
    for f in fields(QueueState):
        value = getattr(state, f.name)
        if f.name in ("ready", "broken"):
            if not isinstance(value, bool):
                raise QueueStateInvalid(f"{f.name} must be a bool, got {value!r}")
        elif type(value) is not int or value < 0:
            raise QueueStateInvalid(f"{f.name} must be a non-negative int, got {value!r}")
    if not _is_pow2(state.max_size) or state.max_size > MAX_QUEUE_SIZE:
        raise QueueStateInvalid(f"max_size {state.max_size} is not a power of two <= {MAX_QUEUE_SIZE}")
    if state.size > _U32_MASK:
        raise QueueStateInvalid(f"size {state.size} does not fit the QueueNum register")
    for name in ("desc_table", "avail_ring", "used_ring"):
        if getattr(state, name) >= _U64_LIMIT:
            raise QueueStateInvalid(f"{name} {getattr(state, name):#x} is not a 64-bit address")
    for name in ("next_avail", "next_used"):
        if getattr(state, name) > _U16_MASK:
            raise QueueStateInvalid(f"{name} {getattr(state, name)} is not a 16-bit ring index")
    if state.num_added > _U16_MASK + 1:
        raise QueueStateInvalid(f"num_added {state.num_added} exceeds 2**16")

"""Property tests: random guest-controlled rings and chains never make the device raise or stray.

The guest owns the descriptor table, the available ring and every buffer,
so hypothesis writes them freely (addresses near and far, flags, `next`
links, indirect tables, ring indexes). The properties:

* processing never raises and always terminates;
* the device writes guest memory only inside buffers the guest declared
  device-writable (any descriptor with VIRTQ_DESC_F_WRITE, in the table or
  in a table an indirect descriptor points at) and in the used ring;
* every chain it takes is returned exactly once;
* for the block device: a read-only disk is never modified, and a writable
  one never changes size.
"""

from __future__ import annotations

import os
import struct
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.devices.virtio.mock import MmioDriver, VirtQueue, new_interrupt
from vmm.devices.virtio import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, feature
from vmm.devices.virtio.block import Block
from vmm.devices.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_WRITE,
    DescriptorChainError,
    used_ring_size,
)
from vmm.devices.virtio.transport import MmioTransport
from vmm.memory import GuestMemory

# Two regions with a hole between them, so "inside memory" has edges to hit.
REGIONS = [(0, 0x10000), (0x11000, 0x1000)]
MEM_END = 0x12000
QSIZE = 8
QUEUE_BASE = 0x0
TABLE_BASE = 0x800  # where indirect tables tend to live
DATA_BASE = 0x4000

_DESC = struct.Struct("<QIHH")

# Mostly plausible values (so chains get walked deep), sometimes anything at all.
plausible_addresses = st.integers(DATA_BASE, DATA_BASE + 0x2000)
wild_addresses = st.one_of(
    st.integers(0, MEM_END + 0x100),
    st.sampled_from([0xFFF0, 0x10FF8, 0x11000, MEM_END - 1, (1 << 64) - 8, (1 << 64) - 1]),
    st.integers(0, (1 << 64) - 1),
)
addresses = st.one_of(*[plausible_addresses] * 6, wild_addresses)
lengths = st.one_of(*[st.integers(1, 0x400)] * 8, st.sampled_from([0, 16, 20, 512, 0x1000]),
                    st.integers(0, 0xFFFF_FFFF))
# NEXT-heavy, so chains run long and loop.
flags = st.one_of(st.sampled_from([1, 1, 3, 3, 0, 2]), st.sampled_from([1, 3]), st.integers(0, 7))
nexts = st.one_of(st.integers(0, QSIZE - 1), st.integers(0, QSIZE - 1), st.integers(0, 2 * QSIZE))
raw_descriptors = st.tuples(addresses, lengths, flags, nexts)
indirect_descriptors = st.tuples(
    st.sampled_from([TABLE_BASE, TABLE_BASE + 0x20, 0xFFF8, (1 << 64) - 16]),
    st.sampled_from([0, 8, 16, 32, 48, 64, 16 * QSIZE, 16 * (QSIZE + 1)]),
    st.sampled_from([VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_INDIRECT | 1, VIRTQ_DESC_F_INDIRECT | 2]),
    st.integers(0, QSIZE),
)
table_entries = st.lists(st.one_of(*[raw_descriptors] * 5, indirect_descriptors),
                         min_size=QSIZE, max_size=QSIZE)
tables = st.lists(st.one_of(raw_descriptors, raw_descriptors, indirect_descriptors),
                  min_size=2 * (QSIZE + 1), max_size=2 * (QSIZE + 1))
ring_state = st.fixed_dictionaries({
    "pending": st.one_of(st.integers(0, QSIZE), st.integers(0, QSIZE), st.integers(0, 0xFFFF)),
    "next_avail": st.one_of(st.just(0), st.integers(0, 0xFFFF)),
    "heads": st.lists(st.one_of(st.integers(0, QSIZE - 1), st.integers(0, QSIZE - 1), st.integers(0, 0xFFFF)),
                      min_size=QSIZE, max_size=QSIZE),
    "used_event": st.integers(0, 0xFFFF),
})


def lay_out(mem: GuestMemory, vq: VirtQueue, entries, table, ring) -> None:
    for i, entry in enumerate(entries):
        vq.write_desc(i, *entry)
    for i, entry in enumerate(table):
        mem.write(TABLE_BASE + 16 * i, _DESC.pack(*entry))
    for slot, head in enumerate(ring["heads"]):
        vq.set_avail_slot(slot, head)
    vq.set_avail_idx(ring["next_avail"] + ring["pending"])
    vq.set_used_event(ring["used_event"])


def declared_writable(mem: GuestMemory, vq: VirtQueue) -> list[tuple[int, int]]:
    """Every range the guest marked device-writable, found by scanning, not by walking chains."""
    ranges = [(vq.used_ring, vq.used_ring + used_ring_size(vq.size))]
    for i in range(vq.size):
        addr, length, flags, _ = vq.read_desc(i)
        if flags & VIRTQ_DESC_F_INDIRECT:
            for j in range(min(length // 16, 64)):
                if not mem.check_range(addr + 16 * j, 16):
                    break
                a, n, f, _ = _DESC.unpack(mem.read(addr + 16 * j, 16))
                if f & VIRTQ_DESC_F_WRITE:
                    ranges.append((a, a + n))
        elif flags & VIRTQ_DESC_F_WRITE:
            ranges.append((addr, addr + length))
    return ranges


def snapshot(mem: GuestMemory) -> bytes:
    return b"".join(mem.read(gpa, size) for gpa, size in REGIONS)


def strays(mem: GuestMemory, before: bytes, allowed: list[tuple[int, int]]) -> list[int]:
    """Addresses whose byte changed outside every allowed range."""
    after = snapshot(mem)
    bad = []
    offset = 0
    for gpa, size in REGIONS:
        old, new = before[offset:offset + size], after[offset:offset + size]
        offset += size
        if old == new:
            continue
        mask = bytearray(size)
        for lo, hi in allowed:
            lo, hi = max(lo - gpa, 0), min(hi - gpa, size)
            if lo < hi:
                mask[lo:hi] = b"\1" * (hi - lo)
        for block in range(0, size, 256):
            if old[block:block + 256] != new[block:block + 256]:
                bad += [gpa + i for i in range(block, min(block + 256, size)) if old[i] != new[i] and not mask[i]]
    return bad


def fresh_memory() -> tuple[GuestMemory, VirtQueue]:
    mem = GuestMemory.anonymous(REGIONS)
    return mem, VirtQueue(mem, QUEUE_BASE, QSIZE)


# Only well-placed buffers, random links: explores chain shapes (long chains, loops, links out of range).
graph_descriptors = st.tuples(plausible_addresses, st.integers(1, 0x100), st.sampled_from([1, 1, 1, 3, 0, 2]),
                              st.integers(0, QSIZE))
graph_entries = st.lists(st.one_of(*[graph_descriptors] * 7, indirect_descriptors), min_size=QSIZE, max_size=QSIZE)
graph_tables = st.lists(graph_descriptors, min_size=2 * (QSIZE + 1), max_size=2 * (QSIZE + 1))


@settings(max_examples=200, deadline=None)
@given(entries=table_entries, table=tables, ring=ring_state, event_idx=st.booleans(), indirect=st.booleans())
def test_queue_walks_never_escape(entries, table, ring, event_idx, indirect):
    run_queue_probe(entries, table, ring, event_idx, indirect)


@settings(max_examples=200, deadline=None)
@given(entries=graph_entries, table=graph_tables, ring=ring_state, event_idx=st.booleans(), indirect=st.booleans())
def test_queue_walks_of_random_chain_graphs_never_escape(entries, table, ring, event_idx, indirect):
    run_queue_probe(entries, table, ring, event_idx, indirect)


def run_queue_probe(entries, table, ring, event_idx: bool, indirect: bool) -> None:
    """Lay out the rings, pop and walk every chain (writing into its writable buffers), check the properties."""
    mem, vq = fresh_memory()
    lay_out(mem, vq, entries, table, ring)
    q = vq.device_queue(event_idx=event_idx, indirect=indirect)
    q.next_avail = ring["next_avail"]
    vq.last_used = 0
    allowed = declared_writable(mem, vq)
    before = snapshot(mem)

    popped = []
    # Set if the guest had us write over its own rings: then the ring contents are garbage by its choice.
    clobbered = False
    rings_lo, rings_hi = vq.desc_table, vq.end
    for _ in range(4 * QSIZE):  # far more than a queue can ever yield in one go
        chain = q.pop(mem)
        if chain is None:
            break
        assert 0 <= chain.head_index < QSIZE
        written = 0
        try:
            descs = chain.descriptors()
        except DescriptorChainError:
            descs = None
        if descs is not None:
            assert len(descs) <= QSIZE
            for d in descs:
                assert mem.check_range(d.addr, d.length) and d.length > 0
                if d.is_write_only:
                    n = min(d.length, 64)
                    mem.write(d.addr, b"\xa5" * n)
                    written += n
                    clobbered |= d.addr < rings_hi and rings_lo < d.addr + n
        q.add_used(mem, chain.head_index, written)
        popped.append((chain.head_index, written))
    else:
        raise AssertionError("pop did not run dry")

    assert q.next_used == len(popped)
    if not clobbered:
        assert len(popped) <= QSIZE
        assert vq.take_used() == popped
    q.needs_notification(mem)
    assert strays(mem, before, allowed) == []
    mem.close()


_DISK_SECTORS = 16


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    entries=table_entries,
    table=tables,
    ring=ring_state,
    headers=st.lists(
        st.tuples(st.one_of(st.sampled_from([0, 1, 4, 8]), st.integers(0, 0xFFFF_FFFF)),
                  st.one_of(st.integers(0, _DISK_SECTORS + 1), st.integers(0, (1 << 64) - 1))),
        min_size=4, max_size=4),
    read_only=st.booleans(),
    features=st.sampled_from([0, feature(VIRTIO_RING_F_EVENT_IDX), feature(VIRTIO_RING_F_INDIRECT_DESC),
                              feature(VIRTIO_RING_F_EVENT_IDX) | feature(VIRTIO_RING_F_INDIRECT_DESC)]),
)
def test_block_device_never_raises_or_strays(entries, table, ring, headers, read_only, features):
    mem, vq = fresh_memory()
    # Plausible request headers at a few addresses the random descriptors often hit.
    for i, (rtype, sector) in enumerate(headers):
        mem.write(DATA_BASE + 0x200 * i, struct.pack("<IIQ", rtype, 0, sector))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "disk.img")
        original = bytes(range(256)) * 2 * _DISK_SECTORS
        with open(path, "wb") as f:
            f.write(original)
        block = Block("fuzz", path, read_only=read_only, queue_size=QSIZE)
        irq, _ = new_interrupt()
        transport = MmioTransport(block, mem, interrupt=irq)
        MmioDriver(transport).init({0: vq}, feature(VIRTIO_F_VERSION_1) | features)
        lay_out(mem, vq, entries, table, ring)
        block.queues[0].next_avail = ring["next_avail"]
        allowed = declared_writable(mem, vq)
        before = snapshot(mem)

        MmioDriver(transport).notify(0)
        transport.notify(0)

        assert strays(mem, before, allowed) == []
        with open(path, "rb") as f:
            disk = f.read()
        if read_only:
            assert disk == original
        assert len(disk) == len(original)
        used = vq.take_used()
        assert len(used) <= 2 * QSIZE and all(0 <= head < QSIZE for head, _ in used)
        block.close()
    mem.close()

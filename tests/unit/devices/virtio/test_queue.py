"""The split virtqueue, device side: valid chains, every malformed case, notifications, state."""

from __future__ import annotations

import dataclasses
import struct

import pytest

from tests.unit.devices.virtio.conftest import MEM_SIZE
from tests.unit.devices.virtio.mock import Buf, VirtQueue
from vmm.devices.virtio.queue import (
    MAX_CHAIN_BYTES,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    DescriptorChainTooLarge,
    DescriptorChainTooLong,
    DescriptorIndexOutOfRange,
    DescriptorOutOfMemory,
    DescriptorZeroLength,
    IndirectNested,
    IndirectNotNegotiated,
    IndirectTableInvalid,
    IndirectTableTooLong,
    IndirectWithNext,
    Queue,
    QueueState,
    QueueStateInvalid,
    UsedElementInvalid,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)
from vmm.memory import GuestMemory

DATA = 0x10_0000


def walk(q: Queue, mem):
    chain = q.pop(mem)
    assert chain is not None
    return chain, chain.descriptors()


# --- layout and validation -------------------------------------------------------------------


def test_ring_sizes_follow_the_spec_table():
    assert (desc_table_size(256), avail_ring_size(256), used_ring_size(256)) == (4096, 518, 2054)


def test_a_fresh_queue_is_not_ready_and_sized_to_max():
    q = Queue(256)
    assert (q.size, q.ready, q.next_avail, q.next_used) == (256, False, 0, 0)
    assert "size=256/256" in repr(q)


@pytest.mark.parametrize("max_size", [0, 3, 100, 65536])
def test_max_size_must_be_a_power_of_two_up_to_32768(max_size):
    with pytest.raises(ValueError):
        Queue(max_size)


def test_a_well_placed_queue_is_valid(mem, vq):
    assert vq.device_queue().is_valid(mem)


@pytest.mark.parametrize("size", [0, 3, 12, 32])
def test_size_zero_not_power_of_two_or_above_max_is_invalid(mem, vq, size):
    q = vq.device_queue()
    q.size = size
    assert not q.is_valid(mem)


@pytest.mark.parametrize("ring,offset", [("desc_table", 8), ("avail_ring", 1), ("used_ring", 2)])
def test_misaligned_rings_are_invalid(mem, vq, ring, offset):
    q = vq.device_queue()
    setattr(q, ring, getattr(q, ring) + offset)
    assert not q.is_valid(mem)


@pytest.mark.parametrize("ring", ["desc_table", "avail_ring", "used_ring"])
@pytest.mark.parametrize("addr", [MEM_SIZE, MEM_SIZE - 16, (1 << 64) - 16, 1 << 40])
def test_rings_outside_or_straddling_guest_memory_are_invalid(mem, vq, ring, addr):
    q = vq.device_queue()
    setattr(q, ring, addr)
    assert not q.is_valid(mem)


def test_a_ring_across_a_memory_hole_is_invalid():
    mem = GuestMemory.anonymous([(0, 0x1000), (0x2000, 0x1000)])
    vq = VirtQueue(mem, 0, 16)  # desc 0..0x100, avail, used: all in the first page
    q = vq.device_queue()
    assert q.is_valid(mem)
    q.used_ring = 0xFF8  # 6 + 8*16 bytes run into the hole
    assert not q.is_valid(mem)


# --- valid chains ----------------------------------------------------------------------------


def test_empty_queue_pops_nothing(mem, vq):
    q = vq.device_queue()
    assert q.pop(mem) is None
    assert q.pending(mem) == 0


def test_a_not_ready_queue_pops_nothing(mem, vq):
    vq.add_chain([Buf(DATA, 16)])
    q = vq.device_queue()
    q.ready = False
    assert q.pop(mem) is None


@pytest.mark.parametrize("size", [0, 32])
def test_a_queue_with_an_impossible_size_pops_nothing(mem, vq, size):
    vq.add_chain([Buf(DATA, 16)])
    q = vq.device_queue()
    q.size = size
    assert q.pop(mem) is None


def test_pop_walks_a_chain_in_order_with_directions(mem, vq):
    head = vq.add_chain([Buf(DATA, 16), Buf(DATA + 0x100, 512, writable=True), Buf(DATA + 0x400, 1, True)])
    q = vq.device_queue()
    chain, descs = walk(q, mem)
    assert chain.head_index == head
    assert [(d.addr, d.length, d.is_write_only) for d in descs] == [
        (DATA, 16, False), (DATA + 0x100, 512, True), (DATA + 0x400, 1, True)]
    assert descs[1].end == DATA + 0x100 + 512
    assert q.next_avail == 1 and q.pop(mem) is None


def test_chains_are_popped_in_ring_order_across_index_wrap(mem, vq):
    q = vq.device_queue()
    vq.set_avail_idx(0xFFFE)
    q.next_avail = 0xFFFE
    heads = [vq.add_chain([Buf(DATA + 0x100 * i, 8)]) for i in range(4)]
    got = []
    while (chain := q.pop(mem)) is not None:
        got.append(chain.head_index)
    assert got == heads and q.next_avail == 2


def test_add_used_publishes_element_then_index(mem, vq):
    vq.add_chain([Buf(DATA, 8, writable=True)])
    q = vq.device_queue()
    chain = q.pop(mem)
    q.add_used(mem, chain.head_index, 8)
    assert vq.take_used() == [(chain.head_index, 8)]
    assert q.next_used == 1


def test_add_used_wraps_the_ring_and_the_index(mem, vq):
    q = vq.device_queue()
    q.next_used = 0xFFFF
    vq.last_used = 0xFFFF
    q.add_used(mem, 3, 7)
    q.add_used(mem, 4, 9)
    assert vq.used_idx == 1
    assert vq.take_used() == [(3, 7), (4, 9)]


@pytest.mark.parametrize("head,length", [(16, 0), (-1, 0), (0, 1 << 32), (0, -1)])
def test_add_used_refuses_bad_heads_and_lengths(mem, vq, head, length):
    q = vq.device_queue()
    with pytest.raises(UsedElementInvalid):
        q.add_used(mem, head, length)
    assert vq.used_idx == 0


def test_undo_pop_gives_the_chain_back(mem, vq):
    head = vq.add_chain([Buf(DATA, 8)])
    q = vq.device_queue()
    assert q.pop(mem).head_index == head
    q.undo_pop()
    assert q.pop(mem).head_index == head


def test_a_chain_of_exactly_queue_size_descriptors_is_fine(mem, vq):
    vq.add_chain([Buf(DATA + 0x10 * i, 8) for i in range(16)])
    _, descs = walk(vq.device_queue(), mem)
    assert len(descs) == 16


def test_a_chain_walk_is_lazy_and_stops_at_the_first_error(mem, vq):
    vq.add_chain([Buf(DATA, 8), Buf(MEM_SIZE, 8)])
    chain = vq.device_queue().pop(mem)
    it = iter(chain)
    assert next(it).addr == DATA
    with pytest.raises(DescriptorOutOfMemory):
        next(it)


# --- hostile available ring ------------------------------------------------------------------


@pytest.mark.parametrize("avail_idx", [17, 0x8000, 0xFFFF])
def test_avail_index_beyond_the_ring_stops_the_queue(mem, vq, avail_idx, caplog):
    q = vq.device_queue()
    vq.set_avail_idx(avail_idx)
    assert q.pop(mem) is None
    assert q.broken
    # Even once the index looks sane again, the queue stays stopped until reset.
    vq.set_avail_idx(1)
    assert q.pop(mem) is None
    q.reset()
    assert not q.broken


def test_avail_index_exactly_size_ahead_is_allowed(mem, vq):
    for i in range(16):
        vq.write_desc(i, DATA, 8)
        vq.publish(i)
    q = vq.device_queue()
    heads = []
    while (chain := q.pop(mem)) is not None:
        heads.append(chain.head_index)
    assert heads == list(range(16)) and not q.broken


def test_head_index_out_of_range_is_skipped(mem, vq):
    vq.write_desc(2, DATA, 8)
    vq.publish(16)
    vq.publish(0xFFFF)
    vq.publish(2)
    q = vq.device_queue()
    chain = q.pop(mem)
    assert chain.head_index == 2
    assert q.invalid_heads == 2 and q.pop(mem) is None and not q.broken


# --- malformed chains ------------------------------------------------------------------------


@pytest.mark.parametrize("addr,length", [
    (MEM_SIZE, 1),  # just past the end
    (MEM_SIZE - 8, 16),  # straddles the end
    (1 << 40, 4096),  # far away
    ((1 << 64) - 8, 16),  # wraps past 2**64
    ((1 << 64) - 1, 0xFFFF_FFFF),  # wraps, huge
    (0, 0xFFFF_FFFF),  # huge length from a valid address
])
def test_buffers_outside_guest_memory_are_refused(mem, vq, addr, length):
    vq.add_chain([Buf(DATA, 16), Buf(addr, length, writable=True)])
    chain = vq.device_queue().pop(mem)
    with pytest.raises(DescriptorOutOfMemory):
        chain.descriptors()


def test_a_buffer_across_a_memory_hole_is_refused():
    mem = GuestMemory.anonymous([(0, 0x10000), (0x10000 + 0x1000, 0x1000)])
    vq = VirtQueue(mem, 0, 16)
    vq.add_chain([Buf(0xF000, 0x1000), Buf(0xFF00, 0x200)])
    with pytest.raises(DescriptorOutOfMemory):
        vq.device_queue().pop(mem).descriptors()


def test_zero_length_descriptors_are_refused(mem, vq):
    vq.add_chain([Buf(DATA, 16), Buf(DATA + 0x100, 0, writable=True)])
    with pytest.raises(DescriptorZeroLength):
        vq.device_queue().pop(mem).descriptors()


def test_next_index_beyond_the_table_is_refused(mem, vq):
    vq.write_desc(0, DATA, 8, VIRTQ_DESC_F_NEXT, 16)
    vq.publish(0)
    with pytest.raises(DescriptorIndexOutOfRange):
        vq.device_queue().pop(mem).descriptors()


@pytest.mark.parametrize("links", [[0], [1, 0], [1, 2, 3, 1]])
def test_descriptor_loops_are_detected(mem, vq, links):
    for i, nxt in enumerate(links):
        vq.write_desc(i, DATA, 8, VIRTQ_DESC_F_NEXT, nxt)
    vq.publish(0)
    with pytest.raises(DescriptorChainTooLong):
        vq.device_queue().pop(mem).descriptors()


def test_the_loop_bound_is_the_queue_size_not_the_max(mem):
    vq = VirtQueue(mem, 0x1000, 8)
    for i in range(8):
        vq.write_desc(i, DATA, 8, VIRTQ_DESC_F_NEXT, (i + 1) % 8)
    vq.publish(0)
    q = vq.device_queue(max_size=256)
    chain = q.pop(mem)
    seen = 0
    with pytest.raises(DescriptorChainTooLong):
        for _ in chain:
            seen += 1
    assert seen == 8


def test_a_chain_over_four_gib_in_total_is_refused(mem):
    vq = VirtQueue(mem, 0x1000, 512)
    # 257 descriptors each covering the whole 16 MiB: 257 * 2**24 > 2**32.
    vq.add_chain([Buf(0, MEM_SIZE, writable=True) for _ in range(257)])
    seen = 0
    with pytest.raises(DescriptorChainTooLarge):
        for d in vq.device_queue().pop(mem):
            seen += d.length
    assert seen == MAX_CHAIN_BYTES


def test_the_device_can_complete_a_malformed_chain(mem, vq):
    vq.write_desc(0, DATA, 8, VIRTQ_DESC_F_NEXT, 0)
    vq.publish(0)
    q = vq.device_queue()
    chain = q.pop(mem)
    with pytest.raises(DescriptorChainTooLong):
        chain.descriptors()
    q.add_used(mem, chain.head_index, 0)
    assert vq.take_used() == [(0, 0)]


# --- indirect descriptors --------------------------------------------------------------------

TABLE = 0x20_0000


def test_indirect_table_is_walked_in_place_of_its_descriptor(mem, vq):
    bufs = [Buf(DATA, 16), Buf(DATA + 0x1000, 4096, True), Buf(DATA + 0x3000, 1, True)]
    head = vq.build_indirect(TABLE, bufs)
    vq.publish(head)
    chain, descs = walk(vq.device_queue(indirect=True), mem)
    assert chain.head_index == head
    assert [(d.addr, d.length, d.is_write_only) for d in descs] == [(b.addr, b.length, b.writable) for b in bufs]


def test_direct_descriptors_may_precede_an_indirect_one(mem, vq):
    head = vq.build_indirect(TABLE, [Buf(DATA + 0x100, 8, True)], prefix=(Buf(DATA, 16),))
    vq.publish(head)
    _, descs = walk(vq.device_queue(indirect=True), mem)
    assert [d.addr for d in descs] == [DATA, DATA + 0x100]


def test_the_write_flag_of_the_indirect_descriptor_is_ignored(mem, vq):
    vq.mem.write(TABLE, bytes(16))
    vq.build_indirect(TABLE, [Buf(DATA, 16)])
    vq.write_desc(0, TABLE, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE)
    vq.publish(0)
    _, descs = walk(vq.device_queue(indirect=True), mem)
    assert [d.is_write_only for d in descs] == [False]


def test_indirect_without_the_feature_is_refused(mem, vq):
    vq.publish(vq.build_indirect(TABLE, [Buf(DATA, 16)]))
    with pytest.raises(IndirectNotNegotiated):
        vq.device_queue(indirect=False).pop(mem).descriptors()


def test_indirect_with_next_is_refused(mem, vq):
    vq.build_indirect(TABLE, [Buf(DATA, 16)])
    vq.write_desc(0, TABLE, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1)
    vq.write_desc(1, DATA, 8)
    vq.publish(0)
    with pytest.raises(IndirectWithNext):
        vq.device_queue(indirect=True).pop(mem).descriptors()


def test_nested_indirect_tables_are_refused(mem, vq):
    vq.build_indirect(TABLE + 0x100, [Buf(DATA, 16)])
    vq.mem.write(TABLE, struct_desc(TABLE + 0x100, 16, VIRTQ_DESC_F_INDIRECT, 0))
    vq.write_desc(0, TABLE, 16, VIRTQ_DESC_F_INDIRECT)
    vq.publish(0)
    with pytest.raises(IndirectNested):
        vq.device_queue(indirect=True).pop(mem).descriptors()


@pytest.mark.parametrize("length", [0, 8, 17, 40])
def test_indirect_table_length_must_be_a_nonzero_multiple_of_16(mem, vq, length):
    vq.write_desc(0, TABLE, length, VIRTQ_DESC_F_INDIRECT)
    vq.publish(0)
    with pytest.raises(IndirectTableInvalid):
        vq.device_queue(indirect=True).pop(mem).descriptors()


def test_indirect_table_longer_than_the_queue_is_refused(mem, vq):
    vq.build_indirect(TABLE, [Buf(DATA, 8)] * 17)
    vq.publish(0)
    with pytest.raises(IndirectTableTooLong):
        vq.device_queue(indirect=True).pop(mem).descriptors()


def test_indirect_table_of_exactly_queue_size_is_fine(mem, vq):
    vq.publish(vq.build_indirect(TABLE, [Buf(DATA, 8)] * 16))
    _, descs = walk(vq.device_queue(indirect=True), mem)
    assert len(descs) == 16


def test_direct_prefix_plus_table_may_not_exceed_the_queue_size(mem, vq):
    vq.publish(vq.build_indirect(TABLE, [Buf(DATA, 8)] * 16, prefix=(Buf(DATA, 16),)))
    with pytest.raises(DescriptorChainTooLong):
        vq.device_queue(indirect=True).pop(mem).descriptors()


def test_indirect_table_outside_memory_is_refused(mem, vq):
    vq.write_desc(0, MEM_SIZE - 16, 32, VIRTQ_DESC_F_INDIRECT)
    vq.publish(0)
    with pytest.raises(DescriptorOutOfMemory):
        vq.device_queue(indirect=True).pop(mem).descriptors()


def test_next_inside_an_indirect_table_is_bounded_by_its_length(mem, vq):
    mem.write(TABLE, struct_desc(DATA, 8, VIRTQ_DESC_F_NEXT, 2) + struct_desc(DATA, 8, 0, 0))
    vq.write_desc(0, TABLE, 32, VIRTQ_DESC_F_INDIRECT)
    vq.publish(0)
    with pytest.raises(DescriptorIndexOutOfRange):
        vq.device_queue(indirect=True).pop(mem).descriptors()


def test_a_loop_inside_an_indirect_table_is_detected(mem, vq):
    mem.write(TABLE, struct_desc(DATA, 8, VIRTQ_DESC_F_NEXT, 1) + struct_desc(DATA, 8, VIRTQ_DESC_F_NEXT, 0))
    vq.write_desc(0, TABLE, 32, VIRTQ_DESC_F_INDIRECT)
    vq.publish(0)
    with pytest.raises(DescriptorChainTooLong):
        vq.device_queue(indirect=True).pop(mem).descriptors()


def struct_desc(addr: int, length: int, flags: int, next_: int) -> bytes:
    return struct.pack("<QIHH", addr, length, flags, next_)


# --- notification suppression ----------------------------------------------------------------


def test_nothing_added_needs_no_notification(mem, vq):
    assert not vq.device_queue().needs_notification(mem)


def test_without_event_idx_the_no_interrupt_flag_is_honoured(mem, vq):
    q = vq.device_queue()
    q.add_used(mem, 0, 0)
    assert q.needs_notification(mem)
    vq.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    q.add_used(mem, 0, 0)
    assert not q.needs_notification(mem)


@pytest.mark.parametrize("start,added,used_event,expected", [
    (0, 1, 0, True),  # the driver wants to hear about entry 0
    (0, 1, 1, False),  # ... about entry 1, not published yet
    (0, 3, 1, True),  # inside the window [0, 3)
    (5, 2, 4, False),  # behind the window: already notified
    (0xFFFE, 4, 0xFFFF, True),  # window wraps
    (0xFFFE, 4, 1, True),
    (0xFFFE, 4, 2, False),
])
def test_event_idx_notifies_iff_used_event_is_in_the_published_window(mem, vq, start, added, used_event, expected):
    q = vq.device_queue(event_idx=True)
    q.next_used = start
    vq.set_used_event(used_event)
    for _ in range(added):
        q.add_used(mem, 0, 0)
    assert q.needs_notification(mem) is expected
    assert q.num_added == 0


def test_event_idx_publishes_avail_event_when_the_ring_runs_dry(mem, vq):
    q = vq.device_queue(event_idx=True)
    vq.add_chain([Buf(DATA, 8)])
    vq.add_chain([Buf(DATA, 8)])
    assert q.pop(mem) is not None and q.pop(mem) is not None
    assert q.pop(mem) is None
    assert vq.avail_event == 2


def test_without_event_idx_avail_event_is_left_alone(mem, vq):
    q = vq.device_queue()
    vq.add_chain([Buf(DATA, 8)])
    q.pop(mem)
    assert q.pop(mem) is None
    assert vq.avail_event == 0


# --- state -----------------------------------------------------------------------------------


def test_state_round_trip(mem, vq):
    q = vq.device_queue()
    vq.add_chain([Buf(DATA, 8)])
    q.add_used(mem, q.pop(mem).head_index, 4)
    state = q.state()
    again = Queue.from_state(state)
    assert again.state() == state
    assert again.is_valid(mem) and again.next_avail == 1 and again.next_used == 1 and again.num_added == 1


@pytest.mark.parametrize("change", [
    {"max_size": 3}, {"max_size": 65536}, {"size": 1 << 32}, {"size": -1}, {"ready": 1},
    {"desc_table": 1 << 64}, {"next_avail": 0x10000}, {"next_used": -1}, {"num_added": 0x10001},
    {"broken": "no"}, {"used_ring": 1.5},
])
def test_bad_states_are_refused(vq, change):
    state = dataclasses.replace(vq.device_queue().state(), **change)
    with pytest.raises(QueueStateInvalid):
        Queue.from_state(state)


def test_from_state_refuses_other_types():
    with pytest.raises(QueueStateInvalid):
        Queue.from_state({"max_size": 16})  # type: ignore[arg-type]


def test_a_broken_queue_stays_broken_across_restore(mem, vq):
    q = vq.device_queue()
    vq.set_avail_idx(100)
    q.pop(mem)
    assert Queue.from_state(q.state()).broken


def test_queue_state_is_frozen(vq):
    with pytest.raises(dataclasses.FrozenInstanceError):
        vq.device_queue().state().size = 1  # type: ignore[misc]


def test_queue_state_fields():
    assert [f.name for f in dataclasses.fields(QueueState)] == [
        "max_size", "size", "ready", "desc_table", "avail_ring", "used_ring", "next_avail", "next_used",
        "num_added", "broken"]

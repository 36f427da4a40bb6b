"""virtio-blk through the MMIO transport with a driver-side queue: I/O, validation, limits, swap, state."""

from __future__ import annotations

import dataclasses
import os
import struct

import pytest

from tests.unit.devices.virtio.block.conftest import DISK_SECTORS, STATUS_UNTOUCHED, BlkDriver, pattern
from tests.unit.devices.virtio.mock import Buf, MmioDriver, new_interrupt
from vmm.devices.virtio import (
    VIRTIO_F_VERSION_1,
    VIRTIO_MMIO_INT_CONFIG,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    feature,
)
from vmm.devices.virtio.block import (
    BLOCK_SIZE_MAX,
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    Block,
    BlockError,
    BlockState,
    BlockStateInvalid,
)
from vmm.devices.virtio.queue import VIRTQ_DESC_F_NEXT
from vmm.devices.virtio.transport import CONFIG_SPACE, MmioTransport
from vmm.devices.virtio.transport import mmio

BASE_FEATURES = (feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_RING_F_EVENT_IDX)
                 | feature(VIRTIO_RING_F_INDIRECT_DESC) | feature(VIRTIO_BLK_F_SIZE_MAX)
                 | feature(VIRTIO_BLK_F_SEG_MAX) | feature(VIRTIO_BLK_F_BLK_SIZE))


@pytest.fixture
def block(disk):
    b = Block("rootfs", str(disk), is_root=True)
    yield b
    b.close()


@pytest.fixture
def d(block, mem):
    return BlkDriver(block, mem)


def read_req(d: BlkDriver, sector: int, lengths: list[int]):
    data = [d.data(n, writable=True) for n in lengths]
    status = d.status()
    used, _ = d.submit([d.header(VIRTIO_BLK_T_IN, sector), *data, status])
    return used, data, status


def write_req(d: BlkDriver, sector: int, payload: bytes):
    data = d.data(len(payload), writable=False)
    d.mem.write(data.addr, payload)
    status = d.status()
    used, _ = d.submit([d.header(VIRTIO_BLK_T_OUT, sector), data, status])
    return used, status


# --- features and config space ---------------------------------------------------------------


def test_features_offered(disk):
    assert Block("a", str(disk)).avail_features == BASE_FEATURES
    assert Block("a", str(disk), read_only=True).avail_features == BASE_FEATURES | feature(VIRTIO_BLK_F_RO)
    assert Block("a", str(disk), cache_type="Writeback").avail_features == BASE_FEATURES | feature(VIRTIO_BLK_F_FLUSH)


def test_config_space_through_the_transport(block, mem):
    t = MmioTransport(block, mem)
    assert struct.unpack("<Q", t.read(CONFIG_SPACE, 8))[0] == DISK_SECTORS
    assert struct.unpack("<I", t.read(CONFIG_SPACE + 4, 4))[0] == 0  # high half of capacity
    assert struct.unpack("<I", t.read(CONFIG_SPACE + 8, 4))[0] == BLOCK_SIZE_MAX  # size_max
    assert struct.unpack("<I", t.read(CONFIG_SPACE + 12, 4))[0] == 254  # seg_max
    assert struct.unpack("<I", t.read(CONFIG_SPACE + 20, 4))[0] == 512  # blk_size
    assert MmioDriver(t).read32(mmio.DEVICE_ID) == 2


def test_the_config_space_is_read_only(d):
    before = d.transport.read(CONFIG_SPACE, 8)
    d.transport.write(CONFIG_SPACE, b"\xff" * 8)
    d.transport.write(CONFIG_SPACE + 12, b"\x01\x00\x00\x00")
    assert d.transport.read(CONFIG_SPACE, 8) == before and d.block.config_writes_ignored == 2


def test_a_partial_last_sector_is_not_visible(tmp_path):
    path = tmp_path / "odd.img"
    path.write_bytes(bytes(512 * 3 + 100))
    assert Block("odd", str(path)).capacity == 3


def test_a_missing_backing_file_is_a_block_error(tmp_path):
    with pytest.raises(BlockError):
        Block("x", str(tmp_path / "nope.img"))


def test_repr_is_one_line(block):
    assert repr(block).startswith("<Block rootfs") and "root" in repr(block) and "\n" not in repr(block)


# --- I/O ------------------------------------------------------------------------------------


def test_read(d):
    used, (data,), status = read_req(d, 3, [1024])
    assert d.read_buf(data) == pattern(DISK_SECTORS)[3 * 512:5 * 512]
    assert d.status_of(status) == VIRTIO_BLK_S_OK and used == 1024 + 1
    assert d.block.metrics.read_count == 1 and d.block.metrics.read_bytes == 1024
    assert d.edges.count == 1


def test_a_read_scattered_over_uneven_segments(d):
    used, data, status = read_req(d, 10, [100, 412, 1024])
    assert b"".join(d.read_buf(b) for b in data) == pattern(DISK_SECTORS)[10 * 512:13 * 512]
    assert d.status_of(status) == VIRTIO_BLK_S_OK and used == 1537


def test_read_of_the_last_sector(d):
    used, (data,), status = read_req(d, DISK_SECTORS - 1, [512])
    assert d.status_of(status) == VIRTIO_BLK_S_OK and d.read_buf(data) == bytes([DISK_SECTORS - 1]) * 512


def test_write(d, disk):
    payload = bytes(range(256)) * 4
    used, status = write_req(d, 7, payload)
    assert d.status_of(status) == VIRTIO_BLK_S_OK and used == 1
    expected = bytearray(pattern(DISK_SECTORS))
    expected[7 * 512:9 * 512] = payload
    assert disk.read_bytes() == bytes(expected)
    assert d.block.metrics.write_count == 1 and d.block.metrics.write_bytes == 1024


def test_write_then_read_back_with_indirect_descriptors(d):
    write_req(d, 1, b"\x5a" * 512)
    table = d.arena.alloc(64)
    data = d.data(512, writable=True)
    status = d.status()
    head = d.vq.build_indirect(table, [d.header(VIRTIO_BLK_T_IN, 1), data, status])
    d.vq.publish(head)
    d.mmio.notify(0)
    assert d.vq.take_used() == [(head, 513)]
    assert d.read_buf(data) == b"\x5a" * 512 and d.status_of(status) == VIRTIO_BLK_S_OK


@pytest.mark.parametrize("cache_type,syncs", [("Unsafe", 0), ("Writeback", 1)])
def test_flush_syncs_only_for_writeback(disk, mem, monkeypatch, cache_type, syncs):
    calls = []
    monkeypatch.setattr(os, "fdatasync", lambda fd: calls.append(fd))
    d = BlkDriver(Block("a", str(disk), cache_type=cache_type), mem)
    status = d.status()
    used, _ = d.submit([d.header(VIRTIO_BLK_T_FLUSH, 0), status])
    assert d.status_of(status) == VIRTIO_BLK_S_OK and used == 1
    assert len(calls) == syncs and d.block.metrics.flush_count == 1


@pytest.mark.parametrize("drive_id,expected", [
    ("rootfs", b"rootfs" + bytes(14)),
    ("a" * 20, b"a" * 20),
    ("b" * 30, b"b" * 20),
])
def test_get_id_returns_the_drive_id(disk, mem, drive_id, expected):
    d = BlkDriver(Block(drive_id, str(disk)), mem)
    data = d.data(20, writable=True)
    status = d.status()
    used, _ = d.submit([d.header(VIRTIO_BLK_T_GET_ID, 0), data, status])
    assert d.read_buf(data) == expected and d.status_of(status) == VIRTIO_BLK_S_OK and used == 21


def test_get_id_into_split_buffers(d):
    first, second = d.data(8, writable=True), d.data(512, writable=True, fill=b"\x11")
    status = d.status()
    used, _ = d.submit([d.header(VIRTIO_BLK_T_GET_ID, 0), first, second, status])
    assert d.read_buf(first) + d.read_buf(second)[:12] == b"rootfs" + bytes(14)
    assert d.read_buf(second)[12:] == b"\x11" * 500 and used == 21


def test_several_requests_one_interrupt(d):
    heads = []
    for sector in range(3):
        heads.append(d.vq.add_chain([d.header(VIRTIO_BLK_T_IN, sector), d.data(512, writable=True), d.status()]))
    d.mmio.notify(0)
    assert [h for h, _ in d.vq.take_used()] == heads and d.edges.count == 1


def test_event_idx_suppresses_interrupts_the_driver_did_not_ask_for(d):
    d.vq.set_used_event(5)
    read_req(d, 0, [512])
    assert d.edges.count == 0
    d.vq.set_used_event(1)
    read_req(d, 0, [512])
    assert d.edges.count == 1


def test_without_event_idx(disk, mem):
    d = BlkDriver(Block("a", str(disk)), mem, features=feature(VIRTIO_F_VERSION_1))
    assert not d.block.queues[0].event_idx
    used, _, status = read_req(d, 0, [512])
    assert d.status_of(status) == VIRTIO_BLK_S_OK and d.edges.count == 1


# --- refusals -------------------------------------------------------------------------------------


def test_read_only_drives_refuse_writes(disk, mem):
    d = BlkDriver(Block("ro", str(disk), read_only=True), mem)
    used, status = write_req(d, 0, b"\xff" * 512)
    assert d.status_of(status) == VIRTIO_BLK_S_IOERR and used == 1
    assert disk.read_bytes() == pattern(DISK_SECTORS)
    used, (data,), status = read_req(d, 2, [512])
    assert d.status_of(status) == VIRTIO_BLK_S_OK and d.read_buf(data) == bytes([2]) * 512


@pytest.mark.parametrize("sector,length", [
    (DISK_SECTORS, 512), (DISK_SECTORS - 1, 1024), ((1 << 64) - 1, 512), ((1 << 64) - 2, 1024),
])
def test_out_of_range_sectors_fail_and_touch_nothing(d, disk, sector, length):
    used, status = write_req(d, sector, b"\xff" * length)
    assert d.status_of(status) == VIRTIO_BLK_S_IOERR and used == 1
    used, (data,), status = read_req(d, sector, [length])
    assert d.status_of(status) == VIRTIO_BLK_S_IOERR and d.read_buf(data) == b"\xcc" * length
    assert disk.read_bytes() == pattern(DISK_SECTORS)
    assert d.block.metrics.invalid_reqs == 2


def test_unknown_request_types_are_unsupported(d):
    for rtype in (2, 11, 13, 0xFFFF_FFFF):
        status = d.status()
        used, _ = d.submit([d.header(rtype, 0), d.data(512, writable=True), status])
        assert d.status_of(status) == VIRTIO_BLK_S_UNSUPP and used == 1


def bad_chains(d: BlkDriver):
    """(name, buffers, whether a status byte is written) for chains the parser must refuse."""
    H = d.header
    return [
        ("header only", [H(VIRTIO_BLK_T_IN, 0)], False),
        ("writable header", [H(VIRTIO_BLK_T_OUT, 0, writable=True), d.data(512, writable=False), d.status()], True),
        ("short header", [H(VIRTIO_BLK_T_OUT, 0, length=15), d.data(512, writable=False), d.status()], True),
        ("readable status", [H(VIRTIO_BLK_T_IN, 0), d.data(512, writable=True), d.status(writable=False)], False),
        ("IN into readable data", [H(VIRTIO_BLK_T_IN, 0), d.data(512, writable=False), d.status()], True),
        ("OUT from writable data", [H(VIRTIO_BLK_T_OUT, 0), d.data(512, writable=True), d.status()], True),
        ("OUT mixed", [H(VIRTIO_BLK_T_OUT, 0), d.data(512, writable=False), d.data(512, writable=True),
                       d.status()], True),
        ("IN without data", [H(VIRTIO_BLK_T_IN, 0), d.status()], True),
        ("OUT of 511 bytes", [H(VIRTIO_BLK_T_OUT, 0), d.data(511, writable=False), d.status()], True),
        ("IN of 513 bytes", [H(VIRTIO_BLK_T_IN, 0), d.data(513, writable=True), d.status()], True),
        ("flush with data", [H(VIRTIO_BLK_T_FLUSH, 0), d.data(512, writable=False), d.status()], True),
        ("short GET_ID", [H(VIRTIO_BLK_T_GET_ID, 0), d.data(19, writable=True), d.status()], True),
        ("readable GET_ID", [H(VIRTIO_BLK_T_GET_ID, 0), d.data(20, writable=False), d.status()], True),
        ("oversized segment", [H(VIRTIO_BLK_T_OUT, 0), Buf(0x20_0000, BLOCK_SIZE_MAX + 512), d.status()], True),
    ]


def test_malformed_requests_fail_with_ioerr_or_are_dropped_and_touch_nothing(d, disk):
    for name, bufs, has_status in bad_chains(d):
        before = {b.addr: d.read_buf(b) for b in bufs if b.length < (1 << 20)}
        used, _ = d.submit(bufs)
        status = bufs[-1]
        if has_status:
            assert (used, d.status_of(status)) == (1, VIRTIO_BLK_S_IOERR), name
        else:
            assert used == 0, name
        for b in bufs[:-1]:
            if b.addr in before:
                assert d.read_buf(b) == before[b.addr], name
        if not has_status:
            assert d.read_buf(status) == before[status.addr], name
    assert disk.read_bytes() == pattern(DISK_SECTORS)
    assert d.block.metrics.invalid_reqs == len(bad_chains(d))


def test_seg_max_fills_the_queue_and_longer_chains_are_dropped(disk, mem):
    """seg_max + header + status == queue size: a chain with more segments is longer than the queue."""
    d = BlkDriver(Block("a", str(disk), queue_size=4), mem, queue_size=4)
    assert d.block.seg_max == 2
    used, _, status = read_req(d, 0, [512, 512])
    assert d.status_of(status) == VIRTIO_BLK_S_OK
    bufs = [d.header(VIRTIO_BLK_T_OUT, 0), *(d.data(512, writable=False) for _ in range(3))]
    table = d.arena.alloc(16 * 5)
    status = d.status()
    head = d.vq.build_indirect(table, [*bufs, status])
    d.vq.publish(head)
    d.mmio.notify(0)
    assert d.vq.take_used() == [(head, 0)] and d.status_of(status) == STATUS_UNTOUCHED
    assert disk.read_bytes() == pattern(DISK_SECTORS)


def test_a_looping_chain_is_returned_with_length_zero(d, disk):
    header, data, status = d.header(VIRTIO_BLK_T_OUT, 0), d.data(512, writable=False), d.status()
    d.vq.write_desc(0, header.addr, 16, VIRTQ_DESC_F_NEXT, 1)
    d.vq.write_desc(1, data.addr, 512, VIRTQ_DESC_F_NEXT, 0)
    d.vq.publish(0)
    d.mmio.notify(0)
    assert d.vq.take_used() == [(0, 0)]
    assert d.status_of(status) == STATUS_UNTOUCHED and disk.read_bytes() == pattern(DISK_SECTORS)
    # The queue keeps working.
    used, (buf,), status = read_req(d, 5, [512])
    assert d.status_of(status) == VIRTIO_BLK_S_OK


def test_backend_errors_complete_with_ioerr(d, monkeypatch):
    def fail(*args):
        raise OSError(5, "EIO")

    monkeypatch.setattr(d.block.backend, "read_at", fail)
    used, _, status = read_req(d, 0, [512])
    assert d.status_of(status) == VIRTIO_BLK_S_IOERR and used == 1 and d.block.metrics.io_errors == 1


def test_a_short_read_after_the_file_shrank_is_an_ioerr(d, disk):
    os.truncate(disk, 512 * 10)
    used, (data,), status = read_req(d, 9, [1024])
    assert d.status_of(status) == VIRTIO_BLK_S_IOERR and used == 512 + 1
    assert d.read_buf(data)[:512] == bytes([9]) * 512


# --- rate limiting ---------------------------------------------------------------------------


class Limiter:
    def __init__(self, ops: int, bytes_: int):
        self.tokens = {"ops": ops, "bytes": bytes_}
        self.replenished: list[tuple[int, str]] = []

    def consume(self, tokens: int, kind: str) -> bool:
        if self.tokens[kind] < tokens:
            return False
        self.tokens[kind] -= tokens
        return True

    def manual_replenish(self, tokens: int, kind: str) -> None:
        self.replenished.append((tokens, kind))
        self.tokens[kind] += tokens


def test_rate_limiter_throttles_and_resumes(disk, mem):
    limiter = Limiter(ops=1, bytes_=10_000)
    d = BlkDriver(Block("a", str(disk), rate_limiter=limiter), mem)
    statuses = []
    for sector in range(3):
        statuses.append(d.status())
        d.vq.add_chain([d.header(VIRTIO_BLK_T_IN, sector), d.data(512, writable=True), statuses[-1]])
    d.mmio.notify(0)
    assert len(d.vq.take_used()) == 1 and d.block.throttled
    assert d.block.metrics.rate_limiter_throttled == 1
    assert [d.status_of(s) for s in statuses] == [0, STATUS_UNTOUCHED, STATUS_UNTOUCHED]
    limiter.tokens["ops"] = 5
    d.block.on_rate_limiter_ready()
    assert len(d.vq.take_used()) == 2 and not d.block.throttled
    assert [d.status_of(s) for s in statuses] == [0, 0, 0]


def test_a_refused_byte_budget_gives_the_op_token_back(disk, mem):
    limiter = Limiter(ops=10, bytes_=100)
    d = BlkDriver(Block("a", str(disk), rate_limiter=limiter), mem)
    d.vq.add_chain([d.header(VIRTIO_BLK_T_IN, 0), d.data(512, writable=True), d.status()])
    d.mmio.notify(0)
    assert d.vq.take_used() == [] and limiter.replenished == [(1, "ops")] and limiter.tokens["ops"] == 10
    # Flushes and GET_ID cost an op, no bytes.
    d.block.update_rate_limiter(Limiter(ops=1, bytes_=0))
    d.block.on_rate_limiter_ready()
    assert d.vq.take_used() == []
    d.block.update_rate_limiter(None)
    d.block.on_rate_limiter_ready()
    assert len(d.vq.take_used()) == 1


def test_a_consume_only_limiter_works(disk, mem):
    class ConsumeOnly:
        def consume(self, tokens, kind):
            return kind == "ops"

    d = BlkDriver(Block("a", str(disk), rate_limiter=ConsumeOnly()), mem)
    d.vq.add_chain([d.header(VIRTIO_BLK_T_IN, 0), d.data(512, writable=True), d.status()])
    d.mmio.notify(0)
    assert d.block.throttled and d.vq.take_used() == []
    d.block.update_rate_limiter(None)
    d.block.on_rate_limiter_ready()
    assert len(d.vq.take_used()) == 1 and not d.block.throttled


def test_on_rate_limiter_ready_before_activation_is_harmless(block):
    block.on_rate_limiter_ready()
    assert not block.is_activated


# --- backing file swap ---------------------------------------------------------------------------


def test_update_path_swaps_the_file_and_signals_a_config_change(d, tmp_path):
    new = tmp_path / "new.img"
    new.write_bytes(pattern(128, seed=100))
    generation = d.mmio.read32(mmio.CONFIG_GENERATION)
    d.block.update_path(str(new))
    assert d.block.path == str(new) and d.block.capacity == 128
    assert struct.unpack("<Q", d.transport.read(CONFIG_SPACE, 8))[0] == 128
    assert d.mmio.read32(mmio.CONFIG_GENERATION) == generation + 1
    assert d.mmio.read32(mmio.INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG
    used, (data,), status = read_req(d, 100, [512])
    assert d.status_of(status) == VIRTIO_BLK_S_OK and d.read_buf(data) == bytes([200]) * 512


def test_update_path_to_a_missing_file_keeps_the_old_one(d, tmp_path, disk):
    with pytest.raises(BlockError):
        d.block.update_path(str(tmp_path / "missing.img"))
    assert d.block.path == str(disk)
    used, (data,), status = read_req(d, 1, [512])
    assert d.read_buf(data) == bytes([1]) * 512


# --- reset and persistence ------------------------------------------------------------------------


def test_driver_reset_and_reinit(d, mem):
    read_req(d, 0, [512])
    d.mmio.write32(mmio.STATUS, 0)
    assert not d.block.is_activated
    d2 = d.vq.__class__(mem, 0x1000, 16)
    d.vq = d2
    d.mmio.init({0: d2})
    used, (data,), status = read_req(d, 4, [512])
    assert d.read_buf(data) == bytes([4]) * 512


def test_save_restore_round_trip(d, mem, disk):
    write_req(d, 2, b"\x77" * 512)
    bstate, tstate = d.block.state(), d.transport.state()
    assert isinstance(bstate, BlockState) and bstate.drive_id == "rootfs" and bstate.is_root
    irq, edges = new_interrupt()
    block2 = Block.from_state(bstate, mem, irq)
    transport2 = MmioTransport.from_state(tstate, block2, mem, interrupt=irq)
    assert block2.state() == bstate and transport2.state() == tstate
    # The restored pair serves the same queue from where it stopped.
    d.block, d.transport, d.mmio = block2, transport2, MmioDriver(transport2)
    d.irq, d.edges = irq, edges
    used, (data,), status = read_req(d, 2, [512])
    assert d.read_buf(data) == b"\x77" * 512 and d.status_of(status) == VIRTIO_BLK_S_OK


def test_restore_picks_up_requests_queued_before_the_snapshot(d, mem):
    limiter = Limiter(ops=0, bytes_=0)
    d.block.update_rate_limiter(limiter)
    data, status = d.data(512, writable=True), d.status()
    d.vq.add_chain([d.header(VIRTIO_BLK_T_IN, 6), data, status])
    d.mmio.notify(0)
    assert d.vq.take_used() == []
    irq, _ = new_interrupt()
    block2 = Block.from_state(d.block.state(), mem, irq)
    block2.kick()
    assert len(d.vq.take_used()) == 1 and d.read_buf(data) == bytes([6]) * 512


@pytest.mark.parametrize("change", [
    {"drive_id": ""}, {"path": 3}, {"path": "a\0b"}, {"read_only": "yes"}, {"is_root": None},
    {"cache_type": "Sometimes"}, {"partuuid": 5}, {"queue_size": 3}, {"queue_size": 1 << 16},
    {"virtio": None},
])
def test_bad_block_states_are_refused(block, mem, change):
    state = dataclasses.replace(block.state(), **change)
    with pytest.raises(BlockStateInvalid):
        Block.from_state(state, mem, new_interrupt()[0])


def test_a_state_whose_features_do_not_match_the_drive_is_refused(block, mem):
    state = dataclasses.replace(block.state(), read_only=True)  # RO would be offered now
    with pytest.raises(BlockStateInvalid):
        Block.from_state(state, mem, new_interrupt()[0])


def test_a_state_naming_a_missing_file_is_a_block_error(block, mem, tmp_path):
    state = dataclasses.replace(block.state(), path=str(tmp_path / "gone.img"))
    with pytest.raises(BlockError):
        Block.from_state(state, mem, new_interrupt()[0])

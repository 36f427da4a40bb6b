"""Differential property test of virtio-blk: random request batches against a reference model.

Hypothesis builds batches of requests shaped like a driver's (header, data
segments, status) with random types, sectors, lengths, directions, indirect
tables and occasional corruption (a `next` out of range, a loop, a buffer
outside memory). A small model, written from §5.2.6 independently of the
parser, says what each request must do: its status byte (or none, for a
chain the queue refuses), its used length, the bytes an IN must return and
the disk after the OUTs. The device must agree exactly, touch no guest byte
outside the writable buffers and the used ring, and never raise.
"""

from __future__ import annotations

import os
import struct
import tempfile
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.devices.virtio.mock import Arena, Buf, MmioDriver, VirtQueue, new_interrupt
from vmm.devices.virtio import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, feature
from vmm.devices.virtio.block import Block
from vmm.devices.virtio.queue import VIRTQ_DESC_F_NEXT, used_ring_size
from vmm.devices.virtio.transport import MmioTransport
from vmm.memory import GuestMemory

MEM_SIZE = 0x40000
QSIZE = 32
DISK_SECTORS = 16
UNTOUCHED = 0xEE
IN, OUT, FLUSH, GET_ID = 0, 1, 4, 8
OK, IOERR, UNSUPP = 0, 1, 2

_DESC = struct.Struct("<QIHH")


@dataclass(frozen=True)
class Req:
    rtype: int
    sector: int
    header_len: int
    header_writable: bool
    segments: tuple[tuple[int, bool], ...]  # (length, device-writable)
    status_len: int
    status_writable: bool
    indirect: bool
    corrupt: str | None


PERTURBATIONS = [
    "header_short", "header_writable", "status_readable", "status_empty", "status_wide", "flip_direction",
    "odd_length", "add_segment", "drop_segments", "sector_wild", "next_oob", "loop", "addr_oob", "addr_wrap",
]


@st.composite
def requests(draw) -> Req:
    """A well-formed request of a random type, then zero to two perturbations."""
    rtype = draw(st.one_of(st.sampled_from([IN, OUT, FLUSH, GET_ID]), st.sampled_from([IN, OUT]),
                           st.integers(0, 0xFFFF_FFFF)))
    if rtype == FLUSH:
        segments: list[tuple[int, bool]] = []
    elif rtype == GET_ID:
        segments = [(draw(st.sampled_from([20, 64, 512])), True)]
    else:
        lengths = draw(st.lists(st.sampled_from([512, 1024, 2048]), min_size=1, max_size=3))
        segments = [(n, rtype != OUT) for n in lengths]
    sectors = sum(n for n, _ in segments) // 512
    in_range = st.integers(0, max(DISK_SECTORS - sectors, 0))
    # One sector too far, or starting at the end: the off-by-one a bounds check gets wrong.
    sector = draw(st.one_of(in_range, in_range, st.sampled_from([DISK_SECTORS - sectors + 1, DISK_SECTORS])))
    req = dict(rtype=rtype, sector=sector, header_len=16, header_writable=False, segments=segments,
               status_len=1, status_writable=True, indirect=draw(st.booleans()), corrupt=None)
    for kind in draw(st.lists(st.sampled_from(PERTURBATIONS), max_size=2)):
        if kind == "header_short":
            req["header_len"] = draw(st.integers(1, 15))
        elif kind == "header_writable":
            req["header_writable"] = True
        elif kind == "status_readable":
            req["status_writable"] = False
        elif kind == "status_empty":
            req["status_len"] = 0
        elif kind == "status_wide":
            req["status_len"] = 4
        elif kind == "flip_direction" and segments:
            i = draw(st.integers(0, len(segments) - 1))
            segments[i] = (segments[i][0], not segments[i][1])
        elif kind == "odd_length" and segments:
            i = draw(st.integers(0, len(segments) - 1))
            segments[i] = (draw(st.sampled_from([1, 19, 100, 412, 511, 513])), segments[i][1])
        elif kind == "add_segment":
            segments.append((draw(st.sampled_from([19, 20, 512])), draw(st.booleans())))
        elif kind == "drop_segments":
            segments.clear()
        elif kind == "sector_wild":
            just_past = DISK_SECTORS - sectors + 1
            req["sector"] = draw(st.one_of(st.sampled_from([just_past, DISK_SECTORS, (1 << 64) - 1]),
                                           st.integers(0, (1 << 64) - 1)))
        elif kind in ("next_oob", "loop", "addr_oob", "addr_wrap"):
            req["corrupt"] = kind
    req["segments"] = tuple(segments)
    return Req(**req)


def model(req: Req, disk: bytearray, read_only: bool, indirect_ok: bool) -> tuple[int | None, int, bytes | None]:
    """(status byte or None, used length, bytes an IN returns); applies an OUT to `disk`."""
    if req.corrupt or req.status_len == 0 or (req.indirect and not indirect_ok):
        return None, 0, None  # the queue refuses the chain: returned with length 0
    status_usable = req.status_writable
    if req.header_writable or req.header_len < 16:
        return (IOERR, 1, None) if status_usable else (None, 0, None)
    if not status_usable:
        return None, 0, None
    if req.rtype not in (IN, OUT, FLUSH, GET_ID):
        return UNSUPP, 1, None
    total = sum(n for n, _ in req.segments)
    if req.rtype == FLUSH:
        return (IOERR, 1, None) if req.segments else (OK, 1, None)
    if not req.segments:
        return IOERR, 1, None
    want_writable = req.rtype != OUT
    if any(w != want_writable for _, w in req.segments):
        return IOERR, 1, None
    if req.rtype == GET_ID:
        return (OK, 21, None) if total >= 20 else (IOERR, 1, None)
    if total % 512 or req.sector + total // 512 > DISK_SECTORS:
        return IOERR, 1, None
    start, end = req.sector * 512, req.sector * 512 + total
    if req.rtype == IN:
        return OK, total + 1, bytes(disk[start:end])
    if read_only:
        return IOERR, 1, None
    return OK, 1, None


def build(vq: VirtQueue, arena: Arena, mem: GuestMemory, req: Req, payload_seed: int):
    """Lay the request out; returns (head, header, data bufs, status buf, payload of an OUT)."""
    header = Buf(arena.alloc(max(req.header_len, 16)), req.header_len, req.header_writable)
    mem.write(header.addr, struct.pack("<IIQ", req.rtype, 0, req.sector))
    data = []
    payload = b""
    for i, (length, writable) in enumerate(req.segments):
        addr = arena.alloc(length, align=8)
        chunk = bytes([(payload_seed + i) & 0xFF]) * length
        mem.write(addr, chunk)
        payload += chunk
        data.append(Buf(addr, length, writable))
    status = Buf(arena.alloc(max(req.status_len, 1)), req.status_len, req.status_writable)
    mem.write(status.addr, bytes([UNTOUCHED]) * max(req.status_len, 1))
    bufs = [header, *data, status]
    if req.corrupt == "addr_oob":
        bufs[0] = Buf(MEM_SIZE - 8, 16)
    elif req.corrupt == "addr_wrap":
        bufs[0] = Buf((1 << 64) - 8, 16)
    if req.indirect:
        table = arena.alloc(16 * len(bufs))
        head = vq.build_indirect(table, bufs)
        last_entry, first_index = table + 16 * (len(bufs) - 1), 0
        oob = len(bufs) + 1
    else:
        head = vq.build_chain(bufs)
        last_entry = vq.desc_table + 16 * ((head + len(bufs) - 1) % vq.size)
        first_index, oob = head, vq.size + 1
    if req.corrupt in ("next_oob", "loop"):
        addr, length, flags, _ = _DESC.unpack(mem.read(last_entry, 16))
        mem.write(last_entry, _DESC.pack(addr, length, flags | VIRTQ_DESC_F_NEXT,
                                         oob if req.corrupt == "next_oob" else first_index))
    vq.publish(head)
    return head, data, status, payload


def writable_ranges(vq: VirtQueue, built) -> list[tuple[int, int]]:
    ranges = [(vq.used_ring, vq.used_ring + used_ring_size(vq.size))]
    for _, data, status, _ in built:
        ranges += [(b.addr, b.addr + b.length) for b in (*data, status) if b.writable]
    return ranges


def guest_diff(before: bytes, after: bytes, allowed: list[tuple[int, int]]) -> list[int]:
    bad = []
    for block in range(0, len(before), 512):
        if before[block:block + 512] == after[block:block + 512]:
            continue
        for addr in range(block, min(block + 512, len(before))):
            if before[addr] != after[addr] and not any(lo <= addr < hi for lo, hi in allowed):
                bad.append(addr)
    return bad


@settings(max_examples=300, deadline=None)
@given(
    batch=st.lists(requests(), min_size=1, max_size=4),
    read_only=st.booleans(),
    event_idx=st.booleans(),
    indirect_ok=st.booleans(),
)
def test_block_matches_the_reference_model(batch, read_only, event_idx, indirect_ok):
    mem = GuestMemory.anonymous([(0, MEM_SIZE)])
    features = feature(VIRTIO_F_VERSION_1)
    features |= feature(VIRTIO_RING_F_EVENT_IDX) if event_idx else 0
    features |= feature(VIRTIO_RING_F_INDIRECT_DESC) if indirect_ok else 0
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "disk.img")
        disk = bytearray(b"".join(bytes([0x80 + i]) * 512 for i in range(DISK_SECTORS)))
        with open(path, "wb") as f:
            f.write(disk)
        block = Block("fuzzdisk", path, read_only=read_only, queue_size=QSIZE)
        irq, _ = new_interrupt()
        driver = MmioDriver(MmioTransport(block, mem, interrupt=irq))
        vq = VirtQueue(mem, 0x1000, QSIZE)
        driver.init({0: vq}, features)
        arena = Arena(mem, 0x4000, MEM_SIZE)

        built = [build(vq, arena, mem, req, 0x10 * (i + 1)) for i, req in enumerate(batch)]
        before = mem.read(0, MEM_SIZE)
        driver.notify(0)
        after = mem.read(0, MEM_SIZE)

        used = vq.take_used()
        assert [head for head, _ in used] == [b[0] for b in built]
        for req, (head, data, status, payload), (_, used_len) in zip(batch, built, used):
            want_status, want_len, want_in = model(req, disk, read_only, indirect_ok)
            if want_status is None:
                assert after[status.addr] == UNTOUCHED, req
            else:
                assert after[status.addr] == want_status, req
            assert used_len == want_len, req
            if want_in is not None:
                assert b"".join(after[b.addr:b.addr + b.length] for b in data) == want_in, req
            if req.rtype == GET_ID and want_status == OK:
                got = b"".join(after[b.addr:b.addr + b.length] for b in data)[:20]
                assert got == b"fuzzdisk" + bytes(12)
            if req.rtype == OUT and want_status == OK:
                disk[req.sector * 512:req.sector * 512 + len(payload)] = payload
        assert guest_diff(before, after, writable_ranges(vq, built)) == []
        with open(path, "rb") as f:
            assert f.read() == bytes(disk)
        block.close()
    mem.close()

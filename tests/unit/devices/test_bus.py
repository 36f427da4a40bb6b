"""The bus: range registry, routing, unhandled and failing accesses, concurrency."""

from __future__ import annotations

import threading

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from vmm.devices import (
    Bus,
    BusAccessInvalid,
    BusDevice,
    BusRangeInvalid,
    BusRangeNotFound,
    BusRangeOverlap,
    ByteRegisterAdapter,
)


class Recorder:
    """A device that remembers its accesses and answers reads with its offset bytes."""

    def __init__(self, tag: int = 0):
        self.tag = tag
        self.reads: list[tuple[int, int]] = []
        self.writes: list[tuple[int, bytes]] = []

    def read(self, offset: int, size: int) -> bytes:
        self.reads.append((offset, size))
        return bytes((self.tag + offset + i) & 0xFF for i in range(size))

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, data))


class Exploding:
    def __init__(self):
        self.calls = 0

    def read(self, offset: int, size: int) -> bytes:
        self.calls += 1
        raise RuntimeError("device bug")

    def write(self, offset: int, data: bytes) -> None:
        self.calls += 1
        raise ValueError("device bug")


class ShortReader:
    def read(self, offset: int, size: int) -> bytes:
        return b"\x00"

    def write(self, offset: int, data: bytes) -> None:
        pass


def test_routes_with_offset_relative_to_base():
    bus = Bus.pio()
    a, b = Recorder(0x10), Recorder(0x80)
    bus.insert(a, 0x3F8, 8)
    bus.insert(b, 0x60, 5)
    assert bus.read(0x3FA, 1) == bytes([0x12])
    assert bus.write(0x64, b"\xfe") is True
    assert bus.read(0x3F8, 4) == bytes([0x10, 0x11, 0x12, 0x13])
    assert a.reads == [(2, 1), (0, 4)]
    assert b.writes == [(4, b"\xfe")]
    assert bus.unhandled_reads == bus.unhandled_writes == bus.device_errors == 0


def test_first_and_last_byte_of_a_range_are_inside_it():
    bus = Bus.mmio()
    dev = Recorder()
    bus.insert(dev, 0x1000, 0x100)
    assert bus.write(0x1000, b"\x01")
    assert bus.write(0x10FF, b"\x02")
    assert not bus.write(0x0FFF, b"\x03")
    assert not bus.write(0x1100, b"\x04")
    assert dev.writes == [(0, b"\x01"), (0xFF, b"\x02")]


@pytest.mark.parametrize("base,length", [
    (0x100, 0x10),   # identical
    (0x0F8, 0x10),   # runs into it from below
    (0x108, 0x10),   # starts inside it
    (0x0F0, 0x40),   # contains it
    (0x104, 0x04),   # contained
    (0x10F, 0x01),   # its last byte
])
def test_overlaps_are_rejected(base, length):
    bus = Bus.pio()
    bus.insert(Recorder(), 0x100, 0x10)
    with pytest.raises(BusRangeOverlap):
        bus.insert(Recorder(), base, length)
    assert bus.range_count == 1


def test_adjacent_ranges_are_fine():
    bus = Bus.pio()
    bus.insert(Recorder(1), 0x100, 0x10)
    bus.insert(Recorder(2), 0x0F0, 0x10)
    bus.insert(Recorder(3), 0x110, 0x10)
    assert [base for base, _, _ in bus.ranges()] == [0xF0, 0x100, 0x110]


@pytest.mark.parametrize("base,length", [(0x100, 0), (0x100, -4), (-1, 4), (0xFFFF, 2), (0x10000, 1)])
def test_invalid_ranges_are_rejected(base, length):
    bus = Bus.pio()
    with pytest.raises(BusRangeInvalid):
        bus.insert(Recorder(), base, length)
    assert bus.range_count == 0


def test_last_port_is_usable():
    bus = Bus.pio()
    bus.insert(Recorder(7), 0xFFFF, 1)
    assert bus.read(0xFFFF, 1) == b"\x07"


def test_remove_returns_the_device_and_frees_the_range():
    bus = Bus.pio()
    dev = Recorder()
    bus.insert(dev, 0x3F8, 8)
    with pytest.raises(BusRangeNotFound):
        bus.remove(0x3F9)  # not a base
    assert bus.remove(0x3F8) is dev
    assert bus.read(0x3F8, 1) == b"\xff"
    with pytest.raises(BusRangeNotFound):
        bus.remove(0x3F8)
    bus.insert(Recorder(), 0x3F8, 8)


def test_unhandled_accesses_read_all_ones_drop_writes_and_are_counted():
    bus = Bus.pio()
    bus.insert(Recorder(), 0x60, 5)
    assert bus.read(0x80, 1) == b"\xff"
    assert bus.read(0x10, 4) == b"\xff\xff\xff\xff"
    assert bus.write(0x80, b"\x00") is False
    assert (bus.unhandled_reads, bus.unhandled_writes) == (2, 1)
    assert bus.device_errors == 0


def test_access_straddling_a_range_end_goes_nowhere():
    bus = Bus.mmio()
    low, high = Recorder(), Recorder()
    bus.insert(low, 0x1000, 0x10)
    bus.insert(high, 0x1010, 0x10)
    assert bus.read(0x100E, 4) == b"\xff" * 4       # into the neighbour
    assert bus.write(0x101E, b"\x01\x02\x03\x04") is False  # off the end into nothing
    assert bus.read(0x0FFE, 4) == b"\xff" * 4       # from nothing into the range
    assert low.reads == low.writes == high.reads == high.writes == []
    assert (bus.unhandled_reads, bus.unhandled_writes) == (2, 1)


def test_empty_access_is_a_caller_bug():
    bus = Bus.pio()
    with pytest.raises(BusAccessInvalid):
        bus.read(0x60, 0)
    with pytest.raises(BusAccessInvalid):
        bus.write(0x60, b"")


def test_a_raising_device_is_contained_counted_and_logged_once():
    bus = Bus.mmio()
    bad, good = Exploding(), Recorder(5)
    bus.insert(bad, 0xD000_0000, 0x1000)
    bus.insert(good, 0xD000_1000, 0x1000)
    with structlog.testing.capture_logs() as logs:
        assert bus.read(0xD000_0000, 4) == b"\xff" * 4
        assert bus.write(0xD000_0010, b"\x01") is False
        assert bus.read(0xD000_0020, 1) == b"\xff"
        assert bus.read(0xD000_1000, 1) == b"\x05"  # the neighbour is unaffected
    assert bad.calls == 3
    assert bus.device_errors == 3
    assert bus.unhandled_reads == bus.unhandled_writes == 0
    errors = [e for e in logs if e["log_level"] == "error"]
    assert len(errors) == 1
    assert errors[0]["op"] == "read" and errors[0]["bus"] == "mmio"


def test_each_failing_device_is_logged_once():
    bus = Bus.pio()
    bus.insert(Exploding(), 0x10, 1)
    bus.insert(Exploding(), 0x20, 1)
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            bus.read(0x10, 1)
            bus.write(0x20, b"\x00")
    assert len([e for e in logs if e["log_level"] == "error"]) == 2
    assert bus.device_errors == 6


def test_a_read_of_the_wrong_length_is_a_device_error():
    bus = Bus.pio()
    bus.insert(ShortReader(), 0x10, 4)
    with structlog.testing.capture_logs():
        assert bus.read(0x10, 2) == b"\xff\xff"
    assert bus.device_errors == 1


def test_devices_satisfy_the_protocol_and_repr_is_one_line():
    bus = Bus.pio()
    assert isinstance(Recorder(), BusDevice)
    bus.insert(Recorder(), 0x60, 5)
    bus.read(0x70, 1)
    text = repr(bus)
    assert "\n" not in text and "pio" in text and "ranges=1" in text and "unhandled_reads=1" in text


def test_byte_register_adapter_splits_wide_accesses_lowest_address_first():
    class Regs:
        def __init__(self):
            self.log: list[tuple[str, int, int]] = []

        def read(self, offset: int) -> int:
            self.log.append(("r", offset, 0))
            return 0x100 + offset  # wider than a byte: the adapter keeps the low byte

        def write(self, offset: int, value: int) -> None:
            self.log.append(("w", offset, value))

    regs = Regs()
    bus = Bus.pio()
    bus.insert(ByteRegisterAdapter(regs), 0x3F8, 8)
    assert bus.read(0x3F9, 2) == bytes([1, 2])
    bus.write(0x3FC, b"\xaa\xbb\xcc")
    assert regs.log == [("r", 1, 0), ("r", 2, 0), ("w", 4, 0xAA), ("w", 5, 0xBB), ("w", 6, 0xCC)]


ranges_strategy = st.lists(
    st.tuples(st.integers(0, 0x1000), st.integers(-2, 0x80)), min_size=1, max_size=40)


@settings(max_examples=150, deadline=None)
@given(ranges=ranges_strategy, probes=st.lists(st.tuples(st.integers(0, 0x1100), st.integers(1, 8)), max_size=40))
def test_routing_matches_a_brute_force_model(ranges, probes):
    """Whatever is inserted, the bus agrees with a linear scan, and rejects exactly the overlaps."""
    bus = Bus.pio()
    accepted: list[tuple[int, int, Recorder]] = []
    for i, (base, length) in enumerate(ranges):
        dev = Recorder(i)
        overlaps = any(base < b + n and b < base + length for b, n, _ in accepted)
        if length <= 0:
            with pytest.raises(BusRangeInvalid):
                bus.insert(dev, base, length)
        elif overlaps:
            with pytest.raises(BusRangeOverlap):
                bus.insert(dev, base, length)
        else:
            bus.insert(dev, base, length)
            accepted.append((base, length, dev))
    assert bus.ranges() == sorted(accepted, key=lambda r: r[0])
    unhandled = 0
    for addr, size in probes:
        owner = [(b, n, d) for b, n, d in accepted if b <= addr and addr + size <= b + n]
        got = bus.read(addr, size)
        if owner:
            b, _, d = owner[0]
            assert got == d.read(addr - b, size)
        else:
            unhandled += 1
            assert got == b"\xff" * size
    assert bus.unhandled_reads == unhandled


def test_concurrent_accesses_while_ranges_change():
    """vCPU threads keep hitting a stable device while another thread churns the table."""
    bus = Bus.mmio()
    stable = Recorder(0x40)
    bus.insert(stable, 0x10_0000, 0x1000)
    stop = threading.Event()
    failures: list[BaseException] = []

    def vcpu() -> None:
        try:
            while not stop.is_set():
                assert bus.read(0x10_0004, 2) == bytes([0x44, 0x45])
                assert bus.write(0x10_0008, b"\x01") is True
                bus.read(0x20_0000, 1)  # churned region: device or all-ones, never an exception
        except BaseException as exc:  # noqa: BLE001
            failures.append(exc)

    def churn() -> None:
        try:
            for i in range(2000):
                bus.insert(Recorder(i), 0x20_0000, 0x10)
                bus.insert(Recorder(i), 0x30_0000 + 0x100 * (i % 16), 0x10)
                bus.remove(0x20_0000)
                bus.remove(0x30_0000 + 0x100 * (i % 16))
        except BaseException as exc:  # noqa: BLE001
            failures.append(exc)

    threads = [threading.Thread(target=vcpu) for _ in range(4)]
    for t in threads:
        t.start()
    churner = threading.Thread(target=churn)
    churner.start()
    churner.join()
    stop.set()
    for t in threads:
        t.join()
    assert failures == []
    assert bus.range_count == 1
    assert bus.device_errors == 0


def test_concurrent_unhandled_counts_are_exact():
    bus = Bus.pio()

    def hammer() -> None:
        for _ in range(5000):
            bus.read(0x500, 1)
            bus.write(0x500, b"\x00")

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bus.unhandled_reads == bus.unhandled_writes == 20000

"""The boot-timer pseudo device: Firecracker's magic write, log line and once-only signal."""

from __future__ import annotations

import threading

import pytest

from vmm.devices import Bus
from vmm.devices.pseudo import (
    BOOT_TIMER_MMIO_BASE,
    BOOT_TIMER_MMIO_SIZE,
    MAGIC_VALUE_SIGNAL_GUEST_BOOT_COMPLETE,
    BootTimer,
    format_boot_time,
)


class Clock:
    def __init__(self, now: int):
        self.now = now

    def __call__(self) -> int:
        return self.now


def make(wall_now: int, cpu_now: int, start_wall: int = 1_000_000_000, start_cpu: int = 5_000_000):
    lines: list[str] = []
    boots: list[tuple[int, int]] = []
    timer = BootTimer(start_wall, start_cpu, lines.append,
                      on_boot=lambda w, c: boots.append((w, c)),
                      wall_clock_ns=Clock(wall_now), cpu_clock_ns=Clock(cpu_now))
    return timer, lines, boots


def test_constants():
    assert BOOT_TIMER_MMIO_BASE == 0xD000_0000
    assert BOOT_TIMER_MMIO_SIZE == 0x1000
    assert MAGIC_VALUE_SIGNAL_GUEST_BOOT_COMPLETE == 123


@pytest.mark.parametrize("wall_us,cpu_us,line", [
    (1_234_567, 89_012, "Guest-boot-time = 1234567 us 1234 ms,  89012 CPU us 89 CPU ms"),
    (42, 7, "Guest-boot-time =     42 us 0 ms,      7 CPU us 0 CPU ms"),
    (123_456, 999_999, "Guest-boot-time = 123456 us 123 ms, 999999 CPU us 999 CPU ms"),
    (0, 0, "Guest-boot-time =      0 us 0 ms,      0 CPU us 0 CPU ms"),
])
def test_log_line_matches_firecracker(wall_us, cpu_us, line):
    assert format_boot_time(wall_us, cpu_us) == line


def test_magic_write_reports_elapsed_time_once():
    timer, lines, boots = make(wall_now=1_000_000_000 + 152_345_678, cpu_now=5_000_000 + 34_567_891)
    timer.write(0, bytes([123]))
    assert boots == [(152_345, 34_567)]
    assert lines == ["Guest-boot-time = 152345 us 152 ms,  34567 CPU us 34 CPU ms"]
    assert timer.boot_time_us == (152_345, 34_567)
    timer.write(0, bytes([123]))
    assert len(lines) == 1 and len(boots) == 1
    assert repr(timer) == "<BootTimer booted wall_us=152345 cpu_us=34567>"


@pytest.mark.parametrize("offset,data", [
    (0, bytes([122])),
    (1, bytes([123])),
    (0, bytes([123, 0])),  # Firecracker takes single-byte writes only
    (0, bytes([123, 0, 0, 0])),
    (8, bytes([123])),
])
def test_other_writes_are_ignored(offset, data):
    timer, lines, boots = make(2_000_000_000, 6_000_000)
    timer.write(offset, data)
    assert lines == [] and boots == [] and timer.boot_time_us is None
    assert repr(timer) == "<BootTimer waiting>"


def test_reads_return_zeros():
    timer, _, _ = make(0, 0)
    assert timer.read(0, 1) == b"\x00"
    assert timer.read(0x10, 4) == b"\x00" * 4
    assert timer.read(0xFF8, 8) == b"\x00" * 8


def test_clock_going_backwards_reports_zero_not_negative():
    timer, lines, boots = make(wall_now=10, cpu_now=10)
    timer.write(0, b"\x7b")
    assert boots == [(0, 0)]


def test_default_clocks_measure_since_given_start():
    import time

    lines: list[str] = []
    timer = BootTimer(time.monotonic_ns(), time.process_time_ns(), lines.append)
    sum(range(100_000))  # burn a little CPU
    timer.write(0, b"\x7b")
    wall_us, cpu_us = timer.boot_time_us
    assert 0 <= cpu_us and 0 <= wall_us < 60_000_000
    assert lines[0].startswith("Guest-boot-time = ")


def test_on_the_mmio_bus_and_once_under_concurrency():
    timer, lines, boots = make(1_000_000_000 + 5_000_000, 5_000_000 + 1_000_000)
    bus = Bus.mmio()
    bus.insert(timer, BOOT_TIMER_MMIO_BASE, BOOT_TIMER_MMIO_SIZE)
    assert bus.read(BOOT_TIMER_MMIO_BASE, 4) == b"\x00" * 4
    barrier = threading.Barrier(8)

    def vcpu() -> None:
        barrier.wait()
        for _ in range(50):
            bus.write(BOOT_TIMER_MMIO_BASE, b"\x7b")

    threads = [threading.Thread(target=vcpu) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert lines == ["Guest-boot-time =   5000 us 5 ms,   1000 CPU us 1 CPU ms"]
    assert boots == [(5000, 1000)]
    assert bus.device_errors == 0

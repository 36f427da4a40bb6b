"""`vmm.metrics`: Firecracker's metrics lines, registered sources, and a destination that never blocks."""

from __future__ import annotations

import json
import os
import threading

import pytest

from vmm.config import MetricsConfig
from vmm.devices.bus import Bus, BusRangeNotFound
from vmm.metrics import (
    FIRECRACKER_SECTIONS,
    CountingDevice,
    Metrics,
    MetricsAlreadyConfigured,
    MetricsPathError,
    PeriodicFlush,
    count_bus_device,
)


def lines(path) -> list[dict]:
    return [json.loads(line) for line in open(path).read().splitlines()]


@pytest.fixture
def metrics(tmp_path):
    m = Metrics("vm-7", clock_ms=lambda: 1_700_000_000_000)
    yield m
    m.close()


def test_a_line_has_firecrackers_layout(metrics: Metrics, tmp_path) -> None:
    path = tmp_path / "m.json"
    metrics.configure(MetricsConfig(str(path)))
    assert metrics.flush()
    [line] = lines(path)
    assert line["utc_timestamp_ms"] == 1_700_000_000_000
    assert "id" not in line and "properties" not in line
    for section, (_, names) in FIRECRACKER_SECTIONS.items():
        assert set(names) <= set(line[section]), section
    assert line["put_api_requests"]["actions_count"] == 0
    assert line["logger"]["missed_metrics_count"] == 0


def test_emit_id_and_properties(metrics: Metrics, tmp_path) -> None:
    path = tmp_path / "m.json"
    metrics.configure(MetricsConfig(str(path), emit_id=True, properties={"b": "2", "a": "1"}))
    metrics.flush()
    line = lines(path)[0]
    assert list(line)[:3] == ["utc_timestamp_ms", "id", "properties"]
    assert line["id"] == "vm-7" and line["properties"] == {"a": "1", "b": "2"}


def test_counters_are_written_as_increases_gauges_as_values(metrics: Metrics, tmp_path) -> None:
    path = tmp_path / "m.json"
    metrics.configure(MetricsConfig(str(path)))
    count = metrics.counter("put_api_requests", "actions_count")
    exits = {"exit_io_out": 0}
    metrics.register_counters("vcpu", lambda: exits)
    metrics.register_gauges("vmm", lambda: {"uptime_s": 12})
    count.inc(3)
    exits["exit_io_out"] = 10
    metrics.gauge("latencies_us", "pause_vm").set(250)
    metrics.flush()
    count.inc()
    exits["exit_io_out"] = 15
    metrics.flush()
    first, second = lines(path)
    assert (first["put_api_requests"]["actions_count"], second["put_api_requests"]["actions_count"]) == (3, 1)
    assert (first["vcpu"]["exit_io_out"], second["vcpu"]["exit_io_out"]) == (10, 5)
    assert first["latencies_us"]["pause_vm"] == second["latencies_us"]["pause_vm"] == 250
    assert first["vmm"] == {"panic_count": 0, "uptime_s": 12}
    # snapshot() is cumulative and changes nothing.
    assert metrics.snapshot()["vcpu"]["exit_io_out"] == 15
    assert metrics.snapshot()["put_api_requests"]["actions_count"] == 4


def test_sources_of_one_section_add_up(metrics: Metrics) -> None:
    metrics.register_counters("block", lambda: {"read_count": 2, "write_count": 1})
    metrics.register_counters("block", lambda: {"read_count": 3})
    assert metrics.snapshot()["block"] == {"read_count": 5, "write_count": 1}


def test_a_failing_source_is_skipped(metrics: Metrics) -> None:
    metrics.register_counters("broken", lambda: 1 / 0)
    metrics.register_counters("fine", lambda: {"n": 1})
    snap = metrics.snapshot()
    assert "broken" not in snap and snap["fine"] == {"n": 1}


def test_flush_without_a_destination_writes_nothing(metrics: Metrics) -> None:
    assert not metrics.configured and not metrics.flush()


def test_configure_only_once(metrics: Metrics, tmp_path) -> None:
    metrics.configure(MetricsConfig(str(tmp_path / "a")))
    with pytest.raises(MetricsAlreadyConfigured, match="Reinitialization of metrics not allowed."):
        metrics.configure(MetricsConfig(str(tmp_path / "b")))


def test_a_bad_path_is_refused(metrics: Metrics, tmp_path) -> None:
    with pytest.raises(MetricsPathError, match="No such file or directory"):
        metrics.configure(MetricsConfig(str(tmp_path / "no" / "m")))
    assert not metrics.configured


def test_a_full_fifo_drops_lines_counts_them_and_loses_no_counts(metrics: Metrics, tmp_path) -> None:
    fifo = tmp_path / "metrics.fifo"
    os.mkfifo(fifo)
    metrics.configure(MetricsConfig(str(fifo)))  # nobody reads yet: the open must not block
    counter = metrics.counter("put_api_requests", "actions_count")
    written = 0
    while metrics.flush():  # fills the pipe (64 KiB), then the first refusal returns at once
        counter.inc()
        written += 1
    assert written > 0
    counter.inc(5)
    assert not metrics.flush()
    assert metrics.snapshot()["logger"]["missed_metrics_count"] == 2
    # A reader drains the pipe; the next line carries every increase not yet reported.
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        data = b""
        while True:
            try:
                chunk = os.read(reader, 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                break
            data += chunk
        assert metrics.flush()
        tail = os.read(reader, 1 << 16)
    finally:
        os.close(reader)
    got = [json.loads(x) for x in (data + tail).decode().splitlines()]
    assert len(got) == written + 1
    assert got[-1]["put_api_requests"]["actions_count"] == 5 + 1  # the increases of both dropped lines
    assert got[-1]["logger"]["missed_metrics_count"] == 2
    assert sum(line["put_api_requests"]["actions_count"] for line in got) == counter.value


def test_counting_device_counts_and_passes_accesses_on() -> None:
    seen = []

    class Dev:
        def read(self, offset, size):
            return bytes([offset]) * size

        def write(self, offset, data):
            seen.append((offset, data))

    bus = Bus.pio()
    bus.insert(Dev(), 0x3F8, 8)
    counting = count_bus_device(bus, 0x3F8)
    assert bus.read(0x3F9, 2) == b"\x01\x01"
    bus.write(0x3F8, b"A")
    bus.write(0x3FA, b"B")
    assert seen == [(0, b"A"), (2, b"B")]
    assert counting.counts() == {"read_count": 1, "write_count": 2}
    assert isinstance(bus.lookup(0x3F8)[2], CountingDevice)
    with pytest.raises(BusRangeNotFound):
        count_bus_device(bus, 0x60)


def test_counters_are_thread_safe(metrics: Metrics) -> None:
    c = metrics.counter("x", "n")
    threads = [threading.Thread(target=lambda: [c.inc() for _ in range(10_000)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.value == 40_000


def test_periodic_flush_submits_until_the_submitter_refuses() -> None:
    submitted = []
    done = threading.Event()

    def submit(fn):
        submitted.append(fn)
        if len(submitted) == 3:
            done.set()
            raise RuntimeError("loop gone")

    flusher = PeriodicFlush(lambda: None, submit, period=0.01)
    flusher.start()
    assert done.wait(5)
    flusher.stop()
    assert flusher.ticks == 2 and len(submitted) == 3
    assert "stopped" in repr(flusher)


def test_repr(metrics: Metrics) -> None:
    assert repr(metrics).startswith("<Metrics vm-7 -> unconfigured")

"""Ember's metrics: Firecracker's JSON metrics lines, from values any component registers.

Primer (Firecracker src/vmm/src/logger/metrics.rs): once a metrics
destination is configured (``--metrics-path``, ``metrics`` in the config
file, PUT /metrics), the VMM writes one JSON object per line to it, every
60 seconds and on the FlushMetrics action. The object starts with
``utc_timestamp_ms`` (then ``id`` with `emit_id`, then ``properties``) and
has one member per section (``api_server``, ``put_api_requests``,
``vcpu``, ``uart``, ``block``, ...), each a flat map of numbers. A
*counter* is written as its increase since the previous line (Firecracker's
`SharedIncMetric`), a *gauge* as its current value (`SharedStoreMetric`).

The registry here holds:

* `Counter` objects it creates (``metrics.counter("put_api_requests",
  "actions_count").inc()``), for values the VMM counts itself;
* sources: functions returning a section's cumulative values, registered
  with `register_counters` / `register_gauges` — how devices and vCPUs
  report what they already count (``Vcpu.exit_counts``, a bus device's
  accesses). Several sources of one section add up, so each block device
  can add to ``block``.

`snapshot()` reads every current (cumulative) value without side effects;
`flush()` writes one line of increases. The destination is opened like the
log file (`vmm.logger.LineWriter`: non-blocking, a FIFO or a file): a line
that does not fit in a full pipe is dropped and counted in
``logger.missed_metrics_count``, and the increases it carried are reported
in the next line that gets through, so a slow reader loses no counts.
"""

from __future__ import annotations

import enum
import json
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from vmm import seccomp
from vmm.config import MetricsConfig
from vmm.logger import LOGGER, LineWriter

__all__ = [
    "MetricsError",
    "MetricsAlreadyConfigured",
    "MetricsPathError",
    "WRITE_METRICS_PERIOD_S",
    "Kind",
    "Counter",
    "Gauge",
    "Metrics",
    "CountingDevice",
    "count_bus_device",
    "PeriodicFlush",
    "FIRECRACKER_SECTIONS",
]

log = structlog.get_logger("vmm.metrics")

# Firecracker src/firecracker/src/metrics.rs: WRITE_METRICS_PERIOD_MS = 60000.
WRITE_METRICS_PERIOD_S = 60.0

Number = int | float
Source = Callable[[], Mapping[str, Number]]


class MetricsError(Exception):
    """The metrics system could not be configured."""

    def __init__(self, message: str | None = None) -> None:
        # The docstring is the message when none is given.
        super().__init__(message if message is not None else " ".join((type(self).__doc__ or "").split()))


class MetricsAlreadyConfigured(MetricsError):
    """Reinitialization of metrics not allowed."""


class MetricsPathError(MetricsError):
    """The metrics file or named pipe cannot be opened."""


class Kind(enum.Enum):
    COUNTER = "counter"  # written as the increase since the previous line
    GAUGE = "gauge"      # written as is


class Counter:
    """A thread-safe count that only goes up."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self._value = 0
        self._lock = threading.Lock()

    def inc(self, n: int = 1) -> None:
        with self._lock:
            self._value += n

    @property
    def value(self) -> int:
        return self._value

    def __repr__(self) -> str:
        return f"<Counter {self.name}={self._value}>"


class Gauge:
    """A value that is set, not added to (a latency, a start-up time)."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.value: Number = 0

    def set(self, value: Number) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"<Gauge {self.name}={self.value}>"


# Firecracker's sections whose members the VMM itself counts, with their
# members in Firecracker's order (logger/metrics.rs). Sections that devices
# fill (vcpu, uart, i8042, block, net, vsock, mmds, ...) are registered by
# whoever owns the counts.
FIRECRACKER_SECTIONS: dict[str, tuple[Kind, tuple[str, ...]]] = {
    "api_server": (Kind.GAUGE, ("process_startup_time_us", "process_startup_time_cpu_us")),
    "deprecated_api": (Kind.COUNTER, ("deprecated_http_api_calls",)),
    "get_api_requests": (Kind.COUNTER, ("instance_info_count", "machine_cfg_count", "mmds_count",
                                        "vmm_version_count", "hotplug_memory_count")),
    "latencies_us": (Kind.GAUGE, ("full_create_snapshot", "diff_create_snapshot", "load_snapshot", "pause_vm",
                                  "resume_vm", "vmm_full_create_snapshot", "vmm_diff_create_snapshot",
                                  "vmm_load_snapshot", "vmm_pause_vm", "vmm_resume_vm")),
    "logger": (Kind.COUNTER, ("missed_metrics_count", "metrics_fails", "missed_log_count",
                              "rate_limited_log_count")),
    "patch_api_requests": (Kind.COUNTER, tuple(f"{n}_{s}" for n in ("drive", "network", "machine_cfg", "mmds",
                                                                      "hotplug_memory", "pmem")
                                               for s in ("count", "fails"))),
    "put_api_requests": (Kind.COUNTER, tuple(f"{n}_{s}" for n in ("actions", "boot_source", "drive", "logger",
                                                                    "machine_cfg", "cpu_cfg", "metrics",
                                                                    "network", "mmds", "vsock", "pmem", "serial",
                                                                    "hotplug_memory")
                                             for s in ("count", "fails"))),
    "vmm": (Kind.GAUGE, ("panic_count",)),
}


class Metrics:
    """The registry of one VMM's metrics, and its destination."""

    def __init__(self, instance_id: str = "anonymous-instance", *,
                 clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000) -> None:
        self.instance_id = instance_id
        self._clock_ms = clock_ms
        self._lock = threading.RLock()
        self._counters: dict[tuple[str, str], Counter] = {}
        self._gauges: dict[tuple[str, str], Gauge] = {}
        self._sources: list[tuple[str, Kind, Source]] = []
        # Cumulative counter values carried by the last line written.
        self._reported: dict[tuple[str, str], Number] = {}
        self._writer: LineWriter | None = None
        self._config: MetricsConfig | None = None
        for section, (kind, names) in FIRECRACKER_SECTIONS.items():
            for name in names:
                if kind is Kind.COUNTER:
                    self.counter(section, name)
                else:
                    self.gauge(section, name)
        self.register_counters("logger", self._logger_counts)

    # --- registry -----------------------------------------------------------------------

    def counter(self, section: str, name: str) -> Counter:
        """The counter ``section.name`` (created at zero on first use)."""
        with self._lock:
            c = self._counters.get((section, name))
            if c is None:
                c = self._counters[(section, name)] = Counter(f"{section}.{name}")
            return c

    def gauge(self, section: str, name: str) -> Gauge:
        """The gauge ``section.name`` (created at zero on first use)."""
        with self._lock:
            g = self._gauges.get((section, name))
            if g is None:
                g = self._gauges[(section, name)] = Gauge(f"{section}.{name}")
            return g

    def register_counters(self, section: str, source: Source) -> None:
        """Add `source`'s cumulative counts to `section` in every line (as increases)."""
        with self._lock:
            self._sources.append((section, Kind.COUNTER, source))

    def register_gauges(self, section: str, source: Source) -> None:
        """Add `source`'s current values to `section` in every line."""
        with self._lock:
            self._sources.append((section, Kind.GAUGE, source))

    # --- reading --------------------------------------------------------------------------

    def _values(self) -> dict[tuple[str, str], tuple[Kind, Number]]:
        values: dict[tuple[str, str], tuple[Kind, Number]] = {}
        for key, c in self._counters.items():
            values[key] = (Kind.COUNTER, c.value)
        for key, g in self._gauges.items():
            values[key] = (Kind.GAUGE, g.value)
        for section, kind, source in self._sources:
            try:
                read = dict(source())
            except Exception as exc:  # a broken source must not take the metrics down
                log.warning("metrics source failed", section=section, error=repr(exc))
                continue
            for name, value in read.items():
                key = (section, name)
                previous = values.get(key)
                values[key] = (kind, value + (previous[1] if previous else 0))
        return values

    def snapshot(self) -> dict[str, dict[str, Number]]:
        """Every section's current values (counters cumulative); no side effects."""
        with self._lock:
            out: dict[str, dict[str, Number]] = {}
            for (section, name), (_, value) in sorted(self._values().items()):
                out.setdefault(section, {})[name] = value
            return out

    def _line(self) -> tuple[dict[str, Any], dict[tuple[str, str], Number]]:
        values = self._values()
        line: dict[str, Any] = {"utc_timestamp_ms": self._clock_ms()}
        cfg = self._config
        if cfg is not None and cfg.emit_id:
            line["id"] = self.instance_id
        if cfg is not None and cfg.properties:
            line["properties"] = dict(cfg.properties)
        cumulative: dict[tuple[str, str], Number] = {}
        for (section, name), (kind, value) in sorted(values.items()):
            if kind is Kind.COUNTER:
                cumulative[(section, name)] = value
                value = value - self._reported.get((section, name), 0)
            line.setdefault(section, {})[name] = value
        return line, cumulative

    # --- destination ------------------------------------------------------------------------

    @property
    def configured(self) -> bool:
        return self._writer is not None

    @property
    def config(self) -> MetricsConfig | None:
        return self._config

    def configure(self, config: MetricsConfig) -> None:
        """Open the destination; only once per process, as in Firecracker.

        Raises `MetricsAlreadyConfigured` or `MetricsPathError`.
        """
        with self._lock:
            if self._writer is not None:
                raise MetricsAlreadyConfigured()
            try:
                self._writer = LineWriter.open(config.metrics_path)
            except (OSError, ValueError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise MetricsPathError(f"{reason} ({config.metrics_path})") from exc
            self._config = config

    def flush(self) -> bool:
        """Write one line now; False if no destination is configured or the line was dropped."""
        with self._lock:
            writer = self._writer
            if writer is None:
                return False
            line, cumulative = self._line()
            if not writer.write_line(json.dumps(line, separators=(",", ":"))):
                # Counted (writer.dropped) and reported as logger.missed_metrics_count;
                # the increases stay unreported and go into the next line.
                return False
            self._reported.update(cumulative)
            return True

    def close(self) -> None:
        with self._lock:
            if self._writer is not None:
                self._writer.close()

    def _logger_counts(self) -> dict[str, int]:
        writer = self._writer
        return {"missed_log_count": LOGGER.missed_log_count,
                "missed_metrics_count": writer.dropped if writer is not None else 0}

    def __repr__(self) -> str:
        dest = self._config.metrics_path if self._config else "unconfigured"
        dropped = self._writer.dropped if self._writer else 0
        return (f"<Metrics {self.instance_id} -> {dest} counters={len(self._counters)} "
                f"sources={len(self._sources)} dropped={dropped}>")


class CountingDevice:
    """A bus device that counts the accesses it passes on (Firecracker's per-device
    ``read_count`` / ``write_count``), for devices that do not count them themselves."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.reads = Counter("read_count")
        self.writes = Counter("write_count")

    def read(self, offset: int, size: int) -> bytes:
        self.reads.inc()
        return self.device.read(offset, size)

    def write(self, offset: int, data: bytes) -> None:
        self.writes.inc()
        self.device.write(offset, data)

    def counts(self) -> dict[str, int]:
        return {"read_count": self.reads.value, "write_count": self.writes.value}

    def __repr__(self) -> str:
        return f"<CountingDevice reads={self.reads.value} writes={self.writes.value} {self.device!r}>"


def count_bus_device(bus: Any, base: int) -> CountingDevice:
    """Put a `CountingDevice` in front of the device whose range starts at `base`.

    Call it before the vCPUs run: the range is removed and inserted again.
    Raises the bus's `BusRangeNotFound` when nothing starts at `base`.
    """
    found = bus.lookup(base)
    if found is None or found[0] != base:
        bus.remove(base)  # raises BusRangeNotFound with the bus's own message
    _, length, device = found
    counting = CountingDevice(device)
    bus.remove(base)
    bus.insert(counting, base, length)
    return counting


class PeriodicFlush:
    """Asks for a metrics flush every `period` seconds, from a timer thread.

    `submit(fn)` hands `fn` to the thread that owns the metrics (the VMM
    event loop: ``EventLoopChannel.post``); a `submit` that raises ends the
    timer (the loop is gone).
    """

    def __init__(self, flush: Callable[[], object], submit: Callable[[Callable[[], object]], None],
                 period: float = WRITE_METRICS_PERIOD_S) -> None:
        self.period = period
        self.ticks = 0
        self._flush = flush
        self._submit = submit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fc_metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        try:
            seccomp.enter_thread(seccomp.Role.VMM, "fc_metrics")
        except seccomp.SeccompError as exc:  # never run unfiltered: no periodic flushes then
            log.error("the metrics thread cannot install its seccomp filter; no periodic flushes",
                      error=str(exc))
            return
        while not self._stop.wait(self.period):
            try:
                self._submit(self._flush)
            except Exception as exc:
                log.debug("periodic metrics flush ends", reason=repr(exc))
                return
            self.ticks += 1

    def __repr__(self) -> str:
        state = "running" if self._thread.is_alive() else "stopped"
        return f"<PeriodicFlush every {self.period:g}s {state} ticks={self.ticks}>"

"""The pool service's metrics: launch rates for `ember status`, Prometheus for scrapers.

Two parts:

* `RateMeter` — pure: fed a monotonically growing counter with the time of
  each sample, it answers the counter's rate over a sliding window. The
  runtime keeps one per pool (restores per second: `launch_rate` in
  `GetPoolStatus` / `ember status`).
* `ServiceMetrics` — the Prometheus side, on `prometheus_client` with a
  registry of its own (several services may live in one test process):
  histograms of Acquire hand-out and restore latency, counters of restores,
  restore failures, releases, VMM deaths by cause and retried connections
  to a clone's agent, and, read at scrape
  time from the runtime (a collector, so a gauge is never stale), each
  pool's warm/leased/restoring counts, its launch rate and committed guest
  memory, and the host budget's usage. `serve(addr)` exposes
  ``GET /metrics`` in the text exposition format (`ember serve
  --metrics-listen`).

Metric names follow Prometheus conventions: ``ember_`` prefix, base units
(seconds, bytes), ``_total`` on counters.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .api_types import PoolStatusInfo

__all__ = ["MetricsError", "RateMeter", "ServiceMetrics", "parse_listen"]

#: Window of the launch rate shown by `ember status`.
RATE_WINDOW_S = 60.0
#: Latency buckets (seconds): a warm hand-out is ~1 ms, an on-demand restore tens of ms,
#: a Linux on-demand Acquire a few hundred ms.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class MetricsError(Exception):
    """The metrics endpoint cannot be served."""


class RateMeter:
    """The rate of a growing counter over the last `window` seconds (pure; not thread-safe).

    ``observe(now, total)`` records a sample; ``rate(now)`` is the counter's
    increase per second between the oldest sample still inside the window
    and the newest. Fewer than two samples, or none spanning time: 0.0.
    """

    def __init__(self, window: float = RATE_WINDOW_S, max_samples: int = 4096) -> None:
        if window <= 0:
            raise ValueError("window must be positive")
        self.window = window
        self._samples: deque[tuple[float, int]] = deque(maxlen=max_samples)

    def __repr__(self) -> str:
        return f"<RateMeter window={self.window}s samples={len(self._samples)}>"

    def observe(self, now: float, total: int) -> None:
        if self._samples and total < self._samples[-1][1]:
            self._samples.clear()  # the counter was reset (the pool was removed and re-made)
        if self._samples and now <= self._samples[-1][0]:
            self._samples[-1] = (self._samples[-1][0], total)
        else:
            self._samples.append((now, total))
        self._expire(now)

    def rate(self, now: float) -> float:
        self._expire(now)
        if len(self._samples) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    def _expire(self, now: float) -> None:
        # Keep one sample at or before the window's start, so the rate spans the whole window.
        while len(self._samples) >= 2 and self._samples[1][0] <= now - self.window:
            self._samples.popleft()


def parse_listen(addr: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) for the metrics endpoint; MetricsError if malformed."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise MetricsError(f"metrics address {addr!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


class _PoolCollector(Collector):
    """Pool gauges read from the runtime when Prometheus scrapes."""

    def __init__(self, statuses: Callable[[], Sequence[PoolStatusInfo]],
                 usage: Callable[[], Any] | None) -> None:
        self._statuses = statuses
        self._usage = usage

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = GaugeMetricFamily("ember_pool_sandboxes", "Sandboxes of a pool by state", labels=["template", "state"])
        rate = GaugeMetricFamily("ember_pool_launch_rate", "Restores per second over the last minute",
                                 labels=["template"])
        mem = GaugeMetricFamily("ember_pool_guest_memory_bytes", "Guest memory committed to a pool's sandboxes",
                                labels=["template"])
        bounds = GaugeMetricFamily("ember_pool_warm_bounds", "A pool's min_warm and max_warm",
                                   labels=["template", "bound"])
        for st in self._statuses():
            for state, n in (("warm", st.warm), ("leased", st.leased), ("restoring", st.restoring)):
                counts.add_metric([st.template, state], n)
            rate.add_metric([st.template], st.launch_rate)
            mem.add_metric([st.template], st.mem_mib * 1024 * 1024)
            bounds.add_metric([st.template, "min"], st.min_warm)
            bounds.add_metric([st.template, "max"], st.max_warm)
        yield from (counts, rate, mem, bounds)
        if self._usage is not None:
            u = self._usage()
            host = GaugeMetricFamily("ember_host_usage", "What the host holds against its budget",
                                     labels=["resource"])
            host.add_metric(["vms"], u.vms)
            host.add_metric(["guest_memory_bytes"], u.mem_mib * 1024 * 1024)
            host.add_metric(["vcpus"], u.vcpus)
            limit = GaugeMetricFamily("ember_host_limit", "The host budget (with oversubscription)",
                                      labels=["resource"])
            limit.add_metric(["vms"], u.budget.max_vms)
            limit.add_metric(["guest_memory_bytes"], u.budget.mem_limit_mib * 1024 * 1024)
            yield host
            yield limit


class ServiceMetrics:
    """The service's Prometheus metrics, in a registry of their own. Thread-safe."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.handout_seconds = Histogram(
            "ember_pool_handout_seconds", "Acquire: from request to a resumed sandbox, by template and source",
            ["template", "source"], buckets=LATENCY_BUCKETS, registry=r)
        self.restore_seconds = Histogram(
            "ember_restore_seconds", "Restoring a paused microVM from a template's snapshot",
            ["template"], buckets=LATENCY_BUCKETS, registry=r)
        self.restores = Counter("ember_restores", "Restores by outcome", ["template", "outcome"], registry=r)
        self.releases = Counter("ember_releases", "Sandboxes released", ["template"], registry=r)
        self.vmm_deaths = Counter("ember_vmm_deaths", "VMM processes found dead, by cause", ["template", "cause"],
                                  registry=r)
        self.agent_retries = Counter(
            "ember_agent_retries", "Acquire: connections to a clone's agent tried again after the first failed",
            ["template"], registry=r)
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.address: tuple[str, int] | None = None

    def __repr__(self) -> str:
        where = f"{self.address[0]}:{self.address[1]}" if self.address else "not served"
        return f"<ServiceMetrics {where}>"

    def watch(self, statuses: Callable[[], Sequence[PoolStatusInfo]], usage: Callable[[], Any] | None = None) -> None:
        """Report `statuses()` (and `usage()`) as gauges at every scrape."""
        self.registry.register(_PoolCollector(statuses, usage))

    # -- events (called by the runtime) -------------------------------------------------------

    def restored(self, template: str, seconds: float, ok: bool) -> None:
        self.restores.labels(template, "ok" if ok else "failed").inc()
        if ok:
            self.restore_seconds.labels(template).observe(seconds)

    def handed_out(self, template: str, seconds: float, source: str) -> None:
        """An Acquire got a sandbox `seconds` after it asked; `source` is ``warm`` or ``on_demand``."""
        self.handout_seconds.labels(template, source).observe(seconds)

    def released(self, template: str) -> None:
        self.releases.labels(template).inc()

    def died(self, template: str, cause: str) -> None:
        self.vmm_deaths.labels(template, cause).inc()

    def agent_retried(self, template: str) -> None:
        """An Acquire's connection to its clone's agent failed and is tried again (the service calls it)."""
        self.agent_retries.labels(template).inc()

    # -- the endpoint ---------------------------------------------------------------------------

    def serve(self, addr: str) -> tuple[str, int]:
        """Serve ``GET /metrics`` on `addr` (``host:port``; port 0 picks one) in a daemon thread."""
        host, port = parse_listen(addr)
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise MetricsError(f"cannot serve metrics on {addr}: {exc}") from exc
        self.address = (host, self._server.server_port)
        return self.address

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def text(metrics: ServiceMetrics) -> str:
    """The registry in the text exposition format (what ``GET /metrics`` answers)."""
    from prometheus_client import generate_latest
    return generate_latest(metrics.registry).decode()


def sample_values(metrics: ServiceMetrics, name: str) -> Iterable[tuple[dict[str, str], float]]:
    """Every sample called `name` as (labels, value): for tests and `ember status`."""
    for family in metrics.registry.collect():
        for s in family.samples:
            if s.name == name:
                yield dict(s.labels), s.value

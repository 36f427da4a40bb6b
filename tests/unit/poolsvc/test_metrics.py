"""poolsvc.metrics: the launch-rate meter and the Prometheus endpoint."""

from __future__ import annotations

import urllib.request
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from poolsvc.api_types import PoolStatusInfo
from poolsvc.metrics import MetricsError, RateMeter, ServiceMetrics, parse_listen, sample_values, text
from poolsvc.pool import HostBudget, HostUsage


def test_rate_is_the_counters_increase_per_second_over_the_window() -> None:
    m = RateMeter(window=10.0)
    assert m.rate(0.0) == 0.0
    for t in range(0, 21):
        m.observe(float(t), 3 * t)  # 3 launches a second
    assert m.rate(20.0) == pytest.approx(3.0)
    # Nothing new for 30 s: the window holds only the last sample, the rate drops to 0.
    m.observe(50.0, 60)
    assert m.rate(50.0) == 0.0


def test_a_reset_counter_starts_over() -> None:
    m = RateMeter(window=60.0)
    m.observe(0.0, 100)
    m.observe(1.0, 110)
    m.observe(2.0, 0)  # the pool was removed and re-created
    m.observe(4.0, 8)
    assert m.rate(4.0) == pytest.approx(4.0)


@given(st.lists(st.tuples(st.floats(0.01, 5.0), st.integers(0, 50)), min_size=2, max_size=60))
def test_rate_stays_within_the_samples_bounds(steps: list[tuple[float, int]]) -> None:
    m = RateMeter(window=30.0)
    t, total = 0.0, 0
    for dt, dn in steps:
        t += dt
        total += dn
        m.observe(t, total)
        r = m.rate(t)
        assert r >= 0.0
        assert r <= max(dn / dt for dt, dn in steps) + 1e-6  # never above the fastest step


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_listen(":0") == ("0.0.0.0", 0)
    assert parse_listen("[::1]:80") == ("::1", 80)
    for bad in ("9464", "host:", "host:http", "h:70000"):
        with pytest.raises(MetricsError):
            parse_listen(bad)


def _statuses() -> list[PoolStatusInfo]:
    return [PoolStatusInfo(template="py", min_warm=2, max_warm=8, warm=3, leased=1, restoring=1,
                           launches_total=40, failures_total=2, launch_rate=1.5, mem_mib=640)]


def test_the_registry_reports_events_and_the_pools_at_scrape_time() -> None:
    m = ServiceMetrics()
    budget = HostBudget(mem_mib=1000, max_vms=10, oversubscription=2.0)
    m.watch(_statuses, lambda: HostUsage(vms=5, mem_mib=640, vcpus=5, budget=budget))
    m.restored("py", 0.012, True)
    m.restored("py", 0.5, False)
    m.handed_out("py", 0.0008, "warm")
    m.released("py")
    m.died("py", "killed by SIGSYS (seccomp violation)")
    samples = {(name, tuple(sorted(labels.items()))): v
               for name in ("ember_restores_total", "ember_pool_sandboxes", "ember_pool_launch_rate",
                            "ember_host_usage", "ember_host_limit", "ember_vmm_deaths_total",
                            "ember_pool_handout_seconds_count", "ember_restore_seconds_count")
               for labels, v in sample_values(m, name)}
    assert samples[("ember_restores_total", (("outcome", "ok"), ("template", "py")))] == 1
    assert samples[("ember_restores_total", (("outcome", "failed"), ("template", "py")))] == 1
    assert samples[("ember_restore_seconds_count", (("template", "py"),))] == 1  # failures not timed
    assert samples[("ember_pool_sandboxes", (("state", "warm"), ("template", "py")))] == 3
    assert samples[("ember_pool_launch_rate", (("template", "py"),))] == 1.5
    assert samples[("ember_host_limit", (("resource", "guest_memory_bytes"),))] == 2000 * 1024 * 1024
    assert samples[("ember_pool_handout_seconds_count", (("source", "warm"), ("template", "py")))] == 1
    assert samples[("ember_vmm_deaths_total",
                    (("cause", "killed by SIGSYS (seccomp violation)"), ("template", "py")))] == 1
    assert "# TYPE ember_pool_handout_seconds histogram" in text(m)


def test_the_endpoint_serves_the_text_format() -> None:
    m = ServiceMetrics()
    m.watch(_statuses)
    host, port = m.serve("127.0.0.1:0")
    try:
        assert port > 0
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as resp:
            body = resp.read().decode()
        assert resp.status == 200
        assert 'ember_pool_sandboxes{state="leased",template="py"} 1.0' in body
    finally:
        m.close()


def test_a_taken_port_is_a_metrics_error() -> None:
    a = ServiceMetrics()
    _, port = a.serve("127.0.0.1:0")
    try:
        with pytest.raises(MetricsError, match="cannot serve metrics"):
            ServiceMetrics().serve(f"127.0.0.1:{port}")
    finally:
        a.close()


def test_two_services_in_one_process_keep_separate_registries() -> None:
    a, b = ServiceMetrics(), ServiceMetrics()
    a.released("t")
    assert list(sample_values(b, "ember_releases_total")) == []
    assert SimpleNamespace(a=a).a is a

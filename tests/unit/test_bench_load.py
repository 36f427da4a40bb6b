"""bench/load.py's maths, pacing and /proc readers, bench/plot_png.py's PNG, and the harness
end to end against an in-process PoolService (tests/unit/poolsvc/_grpc_fake.py)."""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import struct
import threading
import zlib
from pathlib import Path

import pytest

from bench.load import (
    MIB,
    CpuTimes,
    Launch,
    LoadConfig,
    LoadError,
    Pacer,
    VmmOverhead,
    VmmSample,
    find_vmms,
    host_mem_used,
    percentile,
    rate_series,
    report,
    run,
    summarize,
)
from bench.plot_png import PNG_SIGNATURE, Canvas, encode_png, histogram, load_plot, nice_ticks
from poolsvc.api_types import ResourceExhausted, TemplateSpec
from tests.unit.poolsvc._grpc_fake import FakeBackend, backend, server  # noqa: F401

# ---- statistics ---------------------------------------------------------------------------


def test_percentile_matches_linear_interpolation_between_ranks() -> None:
    rng = random.Random(7)
    data = [rng.lognormvariate(0, 1) for _ in range(1001)]
    cuts = statistics.quantiles(data, n=100, method="inclusive")  # the same definition as numpy's
    for q in (1, 10, 50, 90, 99):
        assert percentile(data, q) == pytest.approx(cuts[q - 1], rel=1e-12)
    assert percentile(data, 0) == min(data) and percentile(data, 100) == max(data)


def test_percentile_small_and_edge_cases() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([4.0, 1.0, 3.0, 2.0], 90) == pytest.approx(3.7)
    assert percentile([5.0], 99) == 5.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summarize() -> None:
    s = summarize([float(i) for i in range(1, 101)])
    assert s["n"] == 100 and s["mean"] == 50.5 and s["min"] == 1.0 and s["max"] == 100.0
    assert s["p50"] == 50.5 and s["p90"] == pytest.approx(90.1) and s["p99"] == pytest.approx(99.01)
    empty = summarize([])
    assert empty["n"] == 0 and math.isnan(empty["p50"])


def test_rate_series_counts_whole_buckets_in_the_window() -> None:
    ends = [10.1, 10.2, 10.9, 11.0, 11.5, 12.4, 9.9, 13.0]  # 9.9 before, 13.0 at the end: out
    assert rate_series(ends, 10.0, 13.0, 1.0) == [(0.0, 3.0), (1.0, 2.0), (2.0, 1.0)]
    assert rate_series(ends, 10.0, 13.0, 0.5) == [(0.0, 4.0), (0.5, 2.0), (1.0, 2.0), (1.5, 2.0),
                                                  (2.0, 2.0), (2.5, 0.0)]
    with pytest.raises(ValueError):
        rate_series(ends, 0, 1, 0)


# ---- pacing -------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


def test_pacer_spaces_starts_one_over_rate_apart() -> None:
    clock = FakeClock()
    pacer = Pacer(10.0, clock=clock, sleep=clock.sleep)
    starts = [pacer.wait() for _ in range(5)]
    assert starts == pytest.approx([100.0, 100.1, 100.2, 100.3, 100.4])
    assert clock.slept == pytest.approx([0.1] * 4)


def test_pacer_late_client_goes_at_once_but_makes_up_at_most_the_backlog() -> None:
    clock = FakeClock()
    pacer = Pacer(10.0, clock=clock, sleep=clock.sleep, max_backlog=1.0)
    pacer.wait()
    clock.now += 5.0  # a 5 s stall: 50 slots missed
    burst = 0
    while pacer.reserve(clock.now) <= clock.now:
        burst += 1
    # The slot at now - 1 s and the ten after it, up to now: 11 immediate starts, not 50.
    assert burst == 11


def test_pacer_without_rate_never_sleeps_and_rejects_bad_rates() -> None:
    clock = FakeClock()
    pacer = Pacer(None, clock=clock, sleep=clock.sleep)
    assert [pacer.wait() for _ in range(3)] == [100.0] * 3 and clock.slept == []
    with pytest.raises(ValueError):
        Pacer(0.0)


def test_pacer_hands_each_thread_a_different_slot() -> None:
    pacer = Pacer(1000.0, clock=lambda: 0.0, sleep=lambda s: None)
    slots: list[float] = []
    lock = threading.Lock()

    def take() -> None:
        for _ in range(100):
            s = pacer.reserve(0.0)
            with lock:
                slots.append(s)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(round(s * 1000) for s in slots) == list(range(400))


# ---- the report ---------------------------------------------------------------------------


def _launch(start: float, acquire_ms: float, error: str | None = None, measured: bool = True) -> Launch:
    rec = Launch(client=0, start=start, end=start + 0.01, acquire_s=acquire_ms / 1000,
                 ready_s=None if error else 0.005, release_s=0.001, error=error, measured=measured,
                 ping_attempts=0 if error else 1)
    return rec


def _ovh(rss_mib: float, pss_mib: float, guest: str) -> VmmOverhead:
    return VmmOverhead(pid=1, rss=int((rss_mib + 64) * MIB), pss=int((pss_mib + 10) * MIB),
                       guest_rss=64 * MIB, guest_pss=10 * MIB, guest=guest)


def test_report_sums_up_a_run() -> None:
    cfg = LoadConfig(addr="x", template="t", duration=2.0, bucket=1.0)
    launches = [_launch(10.0 + i * 0.1, acquire_ms=float(i + 1)) for i in range(19)]  # 1..19 ms
    launches += [_launch(10.5, 50.0, error="acquire/RESOURCE_EXHAUSTED"),
                 _launch(10.6, 50.0, error="acquire/RESOURCE_EXHAUSTED"),
                 _launch(10.7, 5.0, error="ping/AgentNotReady"),
                 _launch(9.0, 999.0, measured=False)]  # warm-up: ends before the window
    samples = [VmmSample(10.5, 6, 1000 * MIB, [_ovh(3.0, 1.0, "/t/vm.mem"), _ovh(99.0, 99.0, "anonymous"),
                                                _ovh(77.0, 77.0, "none")]),
               VmmSample(11.5, 10, 1100 * MIB, [_ovh(5.0, 2.0, "/t/vm.mem")])]
    baseline = VmmSample(9.0, 2, 900 * MIB)
    r = report(cfg, launches, (10.0, 12.0), samples, baseline, {"host_cpu_percent": 50.0}, ["hold/UNAVAILABLE"])
    assert r["launches"] == 19 and r["launches_per_s"] == 9.5
    assert r["rate_series"] == [(0.0, 10.0), (1.0, 9.0)]
    assert r["acquire_ms"]["n"] == 22  # every measured Acquire that returned (failed pings included)
    assert r["acquire_p50_ms"] == percentile([float(i + 1) for i in range(19)] + [50.0, 50.0, 5.0], 50)
    assert r["ready_p50_ms"] == pytest.approx(5.0) and r["ping_attempts_max"] == 1
    assert r["failures"] == 4
    assert r["failures_by_code"] == {"acquire/RESOURCE_EXHAUSTED": 2, "hold/UNAVAILABLE": 1,
                                     "ping/AgentNotReady": 1}
    # Only the clones that map vm.mem count when there are some.
    assert r["overhead_rss_mib"] == pytest.approx(4.0) and r["overhead_pss_mib"] == pytest.approx(1.5)
    assert r["overhead_rss_mib_max"] == pytest.approx(5.0)
    assert r["overhead_guest_mapping"] == {"vm.mem": 2, "anonymous": 1, "none": 1}
    assert r["host_mem_per_vmm_mib"] == pytest.approx(200 / 8)
    assert r["host_cpu_percent"] == 50.0


def test_report_falls_back_to_anonymous_guests_and_no_growth_means_no_per_vmm_figure() -> None:
    cfg = LoadConfig(addr="x", template="t", duration=1.0)
    samples = [VmmSample(0.5, 2, 100 * MIB, [_ovh(8.0, 4.0, "anonymous"), _ovh(50.0, 50.0, "none")])]
    r = report(cfg, [], (0.0, 1.0), samples, VmmSample(0.0, 2, 90 * MIB))
    assert r["overhead_rss_mib"] == pytest.approx(8.0) and r["overhead_samples"] == 1
    assert r["host_mem_per_vmm_mib"] is None
    assert r["launches_per_s"] == 0 and math.isnan(r["acquire_p50_ms"]) and r["failures"] == 0


def test_config_is_checked() -> None:
    with pytest.raises(LoadError):
        LoadConfig(addr="x", template="t", duration=0)
    with pytest.raises(LoadError):
        LoadConfig(addr="x", template="t", duration=1, channel="carrier-pigeon")


# ---- /proc readers ------------------------------------------------------------------------


def _fake_proc(tmp: Path, pid: int, comm: str, cmdline: list[str], cwd: Path) -> None:
    d = tmp / "proc" / str(pid)
    d.mkdir(parents=True)
    (d / "comm").write_text(comm + "\n")
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in cmdline) + b"\0")
    os.symlink(cwd, d / "cwd")


def test_find_vmms_by_comm_or_command_line_and_root(tmp_path: Path) -> None:
    root = tmp_path / "run" / "default"
    (root / "sb-1").mkdir(parents=True)
    other = tmp_path / "elsewhere"
    other.mkdir()
    _fake_proc(tmp_path, 10, "ember-vmm", ["python", "-m", "vmm.zygote", "--socket", "/x"], root / "sb-1")
    _fake_proc(tmp_path, 11, "python", ["python", "-m", "vmm.main", "--api-sock", "a"], other)
    _fake_proc(tmp_path, 12, "python", ["python", "-m", "vmm.zygote", "--socket", str(root / ".z")], root)
    _fake_proc(tmp_path, 13, "ember-vmm", ["python"], tmp_path / "run" / "defaultx")
    (tmp_path / "proc" / "self").mkdir()
    proc = str(tmp_path / "proc")
    assert sorted(find_vmms(None, proc)) == [10, 11, 13]
    assert find_vmms(root, proc) == [10]  # the zygote (12) is no VMM; 13's cwd only shares a prefix


def test_host_mem_used_and_cpu_times(tmp_path: Path) -> None:
    mi = tmp_path / "meminfo"
    mi.write_text("MemTotal:       4000 kB\nMemFree:         100 kB\nMemAvailable:   3000 kB\n")
    assert host_mem_used(str(mi)) == 1000 * 1024
    st = tmp_path / "stat"
    st.write_text("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4\n")
    before = CpuTimes.read(str(st))
    assert before == CpuTimes(busy=150, total=1000)
    st.write_text("cpu  200 0 100 1100 100 0 0 0 0 0\n")
    assert CpuTimes.read(str(st)).percent_since(before) == pytest.approx(100 * 150 / 500)


def test_host_readers_work_on_this_host() -> None:
    assert host_mem_used() > 0
    assert CpuTimes.read().total > 0


# ---- PNG ----------------------------------------------------------------------------------


def _chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    assert png[:8] == PNG_SIGNATURE
    out, i = [], 8
    while i < len(png):
        (n,) = struct.unpack(">I", png[i:i + 4])
        kind, data = png[i + 4:i + 8], png[i + 8:i + 8 + n]
        (crc,) = struct.unpack(">I", png[i + 8 + n:i + 12 + n])
        assert crc == zlib.crc32(kind + data), kind
        out.append((kind, data))
        i += 12 + n
    return out


def _decode(png: bytes) -> tuple[int, int, bytes]:
    chunks = _chunks(png)
    assert [k for k, _ in chunks][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    w, h, depth, colour, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour, comp, filt, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(d for k, d in chunks if k == b"IDAT"))
    assert len(raw) == h * (1 + 3 * w)
    rows = [raw[y * (1 + 3 * w):(y + 1) * (1 + 3 * w)] for y in range(h)]
    assert all(r[0] == 0 for r in rows)
    return w, h, b"".join(r[1:] for r in rows)


def test_png_round_trip_of_drawn_pixels() -> None:
    c = Canvas(7, 5, background=(1, 2, 3))
    c.rect(2, 1, 4, 3, (200, 100, 50))
    c.line(0, 4, 6, 4, (9, 9, 9))
    w, h, pixels = _decode(c.png())
    assert (w, h) == (7, 5)

    def px(x: int, y: int) -> tuple[int, ...]:
        i = (y * w + x) * 3
        return tuple(pixels[i:i + 3])

    assert px(0, 0) == (1, 2, 3) and px(2, 1) == (200, 100, 50) and px(3, 2) == (200, 100, 50)
    assert px(4, 1) == (1, 2, 3) and all(px(x, 4) == (9, 9, 9) for x in range(7))


def test_png_rejects_wrong_sizes() -> None:
    with pytest.raises(ValueError):
        encode_png(2, 2, b"\0" * 11)
    with pytest.raises(ValueError):
        encode_png(0, 2, b"")


def test_load_plot_is_a_valid_png_with_bars_and_a_line() -> None:
    lat = [1.0 + (i % 10) * 0.1 for i in range(500)]
    png = load_plot(lat, [(0.0, 10.0), (1.0, 20.0), (2.0, 15.0)], title="T", width=400, height=300,
                    markers=[("P50", 1.4), ("P99", 1.9)])
    w, h, pixels = _decode(png)
    assert (w, h) == (400, 300)
    colours = {pixels[i:i + 3] for i in range(0, len(pixels), 3)}
    assert bytes((52, 101, 164)) in colours and bytes((230, 120, 20)) in colours  # bars, rate line
    assert _decode(load_plot([], []))[:2] == (900, 720)  # an empty run still plots


def test_histogram_and_ticks() -> None:
    assert histogram([0.0, 0.49, 0.5, 0.99, 1.0, 5.0, -1.0], 2, 0.0, 1.0) == [3, 4]  # [0, .5) [.5, 1], ends clamp
    assert nice_ticks(0, 1) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(0, 57) == [0, 10, 20, 30, 40, 50]


# ---- end to end against the in-process service --------------------------------------------


@pytest.fixture
def template(backend: FakeBackend) -> str:
    backend.create_template(TemplateSpec(name="tg", kernel="/k", rootfs=None, initrd=None, boot_args="mode=agent",
                                         vcpus=1, mem_mib=64), deadline=None, cancelled=threading.Event())
    return "tg"


@pytest.mark.parametrize("channel", ["per-client", "shared"])
def test_run_drives_acquire_ping_release(server: str, backend: FakeBackend, template: str, tmp_path: Path,
                                         channel: str) -> None:
    pinged: list[tuple[str, int]] = []

    def ping(uds: str, port: int, deadline: float) -> int:
        pinged.append((uds, port))
        return 1

    cfg = LoadConfig(addr=server, template=template, duration=0.6, clients=2, warmup=0.1, hold=2,
                     channel=channel, root=str(tmp_path), sample_interval=0.1, bucket=0.2)
    r, launches = run(cfg, ping=ping)
    assert r["launches"] > 0 and r["launches_per_s"] == r["launches"] / r["duration_s"]
    assert r["failures"] == 0 and r["acquire_ms"]["n"] > 0 and r["acquire_p50_ms"] > 0
    assert not backend.sandboxes  # every sandbox, held ones too, was released
    assert len(backend.released) == len(launches) + 2
    assert len(pinged) == len(launches) + 2 and all(port == 52 for _, port in pinged)
    ttls = sorted(c.args["lease_ttl"] for c in backend.calls if c.method == "acquire")
    # The launches' leases are --lease-ttl; the 2 held ones outlive the run (warm-up + window + 300 s).
    assert ttls[:-2] == [pytest.approx(60.0)] * (len(ttls) - 2)
    assert ttls[-2:] == [pytest.approx(300.7)] * 2
    assert r["vmms_before"] == 0 and math.isnan(r["overhead_rss_mib"])  # no VMM under tmp_path


def test_run_counts_failures_by_stage_and_code(server: str, backend: FakeBackend, template: str,
                                               tmp_path: Path) -> None:
    backend.fail["acquire"] = ResourceExhausted("the host is full")
    cfg = LoadConfig(addr=server, template=template, duration=0.3, clients=1, warmup=0, rate=20.0,
                     root=str(tmp_path), sample_interval=0.1)
    r, launches = run(cfg, ping=lambda *a: 1)
    assert r["launches"] == 0 and r["failures"] > 0
    assert set(r["failures_by_code"]) == {"acquire/RESOURCE_EXHAUSTED"}
    assert 3 <= len(launches) <= 9  # paced at 20/s for 0.3 s


def test_run_counts_agent_failures_and_still_releases(server: str, backend: FakeBackend, template: str,
                                                      tmp_path: Path) -> None:
    cfg = LoadConfig(addr=server, template=template, duration=0.3, clients=1, warmup=0, rate=20.0,
                     root=str(tmp_path), ready_timeout=0.05, sample_interval=0.1)
    r, _ = run(cfg)  # the real agent_ping: the fake's vsock paths do not exist
    assert r["failures"] > 0 and set(r["failures_by_code"]) == {"ping/AgentNotReady"}
    assert not backend.sandboxes


def test_run_without_a_service_is_a_load_error() -> None:
    with pytest.raises(LoadError, match="no pool service"):
        run(LoadConfig(addr="127.0.0.1:1", template="t", duration=1, rpc_timeout=0.3))


def test_ember_bench_load_json(server: str, backend: FakeBackend, template: str, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    from poolsvc.cli import main

    rc = main(["bench", "load", "--addr", server, "--template", template, "--duration", "0.5", "--warmup", "0",
               "--no-ping", "--root", str(tmp_path), "--json", "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    doc = json.loads(out)
    for key in ("launches_per_s", "acquire_p50_ms", "acquire_p99_ms", "overhead_rss_mib", "overhead_pss_mib",
                "failures"):
        assert key in doc
    assert doc["launches_per_s"] > 0 and doc["failures"] == 0 and doc["ping"] is False
    files = sorted(p.suffix for p in (tmp_path / "out").iterdir())
    assert files == [".json", ".png"]
    saved = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert len(saved["launch_records"]) >= doc["launches"]
    _decode(next((tmp_path / "out").glob("*.png")).read_bytes())

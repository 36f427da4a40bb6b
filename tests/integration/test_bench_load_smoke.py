"""Smoke test of `python -m bench.load` against a real `ember serve` (test-guest agent template).

Not a performance test: 5 s on a shared 2-core host say little about rates.
It checks that the service, the template of the freestanding test guest in
`agent` mode, the warm pool, the harness's Acquire -> PING -> Release loop
and its smaps sampling fit together; that the JSON report has its keys; and
that SIGTERM to the service leaves no ember-vmm of its run directory behind.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.integration.conftest import REPO_ROOT, load_guest_build

pytestmark = pytest.mark.kvm

KEYS = ("launches_per_s", "acquire_p50_ms", "acquire_p99_ms", "overhead_rss_mib", "overhead_pss_mib", "failures")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: str) -> dict[str, str]:
    return {**os.environ, "EMBER_HOME": home,
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}


def _vmms_under(root: str) -> list[int]:
    from bench.load import find_vmms

    return find_vmms(root)


def _wait_gone(root: str, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := _vmms_under(root)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.fixture(scope="module")
def service() -> Iterator[tuple[str, str, subprocess.Popen[bytes]]]:
    """`ember serve` on a free port with a fresh EMBER_HOME: (addr, run dir, process)."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the test guest")
    try:
        from poolsvc import service as _  # noqa: F401
    except ImportError:
        pytest.skip("poolsvc.service (ember serve) is not there yet")
    home = tempfile.mkdtemp(prefix="ebl-")  # short: socket paths live under it
    addr = f"127.0.0.1:{_free_port()}"
    log = open(Path(home) / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "poolsvc.cli", "serve", "--listen", addr,
                             "--metrics-listen", "127.0.0.1:0"],
                            cwd=REPO_ROOT, env=_env(home), stdout=subprocess.PIPE, stderr=log)
    run_dir = str(Path(home) / "run" / "default")
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # {"event": "listening", ...} once it serves
        if not line:
            proc.wait(10)
            pytest.fail(f"ember serve exited {proc.returncode}:\n{(Path(home) / 'serve.log').read_text()}")
        run_dir = json.loads(line).get("run_dir", run_dir)
        yield addr, run_dir, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def load_report(service: tuple[str, str, subprocess.Popen[bytes]]) -> dict:
    import grpc

    from poolsvc import proto

    addr, run_dir, _ = service
    elf = load_guest_build().build_testguest()
    pb2, pb2_grpc = proto.load()
    with grpc.insecure_channel(addr) as ch:
        stub = pb2_grpc.PoolServiceStub(ch)
        stub.CreateTemplate(pb2.CreateTemplateRequest(name="tg-agent", kernel=str(elf), boot_args="mode=agent",
                                                      vcpus=1, mem_mib=64), timeout=120)
        stub.SetPool(pb2.SetPoolRequest(template="tg-agent", min_warm=2, max_warm=4), timeout=30)
    proc = subprocess.run([sys.executable, "-m", "bench.load", "--addr", addr, "--template", "tg-agent",
                           "--duration", "5", "--warmup", "1", "--clients", "2", "--root", run_dir,
                           "--sample-interval", "0.5", "--json"],
                          cwd=REPO_ROOT, env=_env(str(Path(run_dir).parents[1])), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_report_has_its_keys_and_the_launches_succeeded(load_report: dict) -> None:
    for key in KEYS:
        assert key in load_report, key
    assert load_report["launches_per_s"] > 0
    assert load_report["failures"] == 0, load_report["failures_by_code"]
    assert 0 < load_report["acquire_p50_ms"] <= load_report["acquire_p99_ms"]
    assert load_report["ready_p50_ms"] >= load_report["acquire_ms"]["min"]


def test_vmm_overhead_was_sampled_from_restored_clones(load_report: dict) -> None:
    assert load_report["overhead_guest_mapping"].get("vm.mem", 0) > 0, load_report["overhead_guest_mapping"]
    rss, pss = load_report["overhead_rss_mib"], load_report["overhead_pss_mib"]
    assert math.isfinite(rss) and math.isfinite(pss) and 0 < pss <= rss
    assert load_report["vmms_before"] >= 2  # the warm pool


def test_sigterm_leaves_no_vmm_of_the_service(service: tuple[str, str, subprocess.Popen[bytes]],
                                              load_report: dict) -> None:
    _, run_dir, proc = service
    assert _vmms_under(run_dir), "the warm pool should be running before the shutdown"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert _wait_gone(run_dir, 5.0) == []


def test_launch_cost_reports_cpu_per_launch_thread_phases_and_memory() -> None:
    """`python -m bench.launch_cost` end to end, briefly (its numbers are for an idle host, not for CI)."""
    out = subprocess.run([sys.executable, "-m", "bench.launch_cost", "--duration", "3", "--warm", "3", "--json"],
                         cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["load"]["launches"] > 0 and r["load"]["failures"] == 0, r["load"]
    cpu = r["cpu_per_launch_ms"]
    assert cpu["vmm_user"] + cpu["vmm_sys"] > 0 and cpu["host_busy"] > 0, cpu
    threads = r["thread_cpu_ms"]
    assert threads["ember-vmm"]["restore"] > 0, threads  # the restore runs on the main thread
    assert threads["fc_vcpu 0"]["acquire"] > 0, threads  # the resumed guest answering the PING
    mem = r["memory_per_vmm_total_kib"]
    assert r["vmms_measured"] >= 3 and mem["Rss"] >= mem["Pss"] >= mem["Private_Dirty"] > 0, mem


def test_bench_report_runs_a_scenario_end_to_end() -> None:
    """`python -m bench.report --only tg`: its own service and template, one short run, a median line."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the test guest")
    proc = subprocess.run([sys.executable, "-m", "bench.report", "--only", "tg", "--runs", "1", "--duration", "3",
                           "--json"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert list(summary) == ["tg"] and len(summary["tg"]["runs"]) == 1
    med = summary["tg"]["medians"]
    assert med["launches_per_s"] > 0 and med["failures"] == 0 and med["overhead_rss_mib"] > 0
    assert "tg run 1:" in proc.stderr

"""Smoke test of `python -m bench.virtio`: every benchmark path runs with tiny sizes and emits sane JSON.

Not a performance test: the sizes are too small for the figures to mean
anything. It checks that the guest's `vbench` mode, the host helpers (TAP
in a network namespace, the vsock Unix socket) and the report fit together:
every rate is positive and finite, nothing was lost, the CPU samples and
Firecracker's published reference figures are in the output.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from tests.integration.conftest import REPO_ROOT


def _only() -> str:
    # The net benchmark needs root and iproute2 (a TAP in a network namespace).
    return "blk,net,vsock" if os.geteuid() == 0 and shutil.which("ip") else "blk,vsock"


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def quick_report() -> dict:
    if shutil.which("gcc") is None or shutil.which("dd") is None:
        pytest.skip("gcc (test guest) and dd (block ceiling) are needed")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH"))
                                                        if p)}
    proc = subprocess.run([sys.executable, "-m", "bench.virtio", "--quick", "--json", "--only", _only()],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"bench.virtio failed:\n{proc.stderr}"
    return json.loads(proc.stdout)


@pytest.mark.kvm
def test_quick_run_reports_block_rates_ceilings_and_cpu(quick_report):
    blk = quick_report["blk"]
    for backing in ("tmpfs", "disk"):
        section = blk[backing]
        assert section["tsc"]["source"] in ("pit", "cpuid-0x40000010") and section["tsc"]["hz"] > 10**7
        for op in ("read", "write"):
            r = section[op]
            assert r["runs"] == 1
            assert _positive(r["MBps"]) and _positive(r["usec_per_req"]), r
            assert r["kicks"] >= 1, r
            assert r["vmm_cpu_s"] >= 0 and r["vmm_cores"] >= 0, r
            assert _positive(section["host"][f"python_{op}"]["MBps"]) and _positive(section["host"][f"dd_{op}"]["MBps"])
            assert _positive(section["ratios"][f"guest_vs_python_{op}"])
    (row,) = blk["sweep_tmpfs"]
    assert row["req_kib"] == 4 and _positive(row["read"]["MBps"]) and _positive(row["write"]["MBps"])


@pytest.mark.kvm
def test_quick_run_reports_vsock_latency_and_throughput(quick_report):
    vs = quick_report["vsock"]
    rtt = vs["rtt"]
    assert 0 < rtt["p50_us"] <= rtt["p90_us"] <= rtt["p99_us"], rtt
    for direction in ("host_to_guest", "guest_to_host"):
        assert _positive(vs[direction]["MBps"]) and _positive(vs[direction]["guest_MBps"]), vs[direction]


@pytest.mark.kvm
def test_quick_run_reports_net_both_ways_without_loss(quick_report):
    if "net" not in _only():
        pytest.skip("the net benchmark needs root and iproute2")
    net = quick_report["net"]
    for direction in ("tx", "rx"):
        r = net[direction]
        assert _positive(r["Mbps"]) and _positive(r["fps"]), r
        assert r["lost"] == 0, r
    assert _positive(net["tx"]["host_Mbps"])


@pytest.mark.kvm
def test_report_labels_firecracker_figures_as_published_and_carries_the_command(quick_report):
    fc = quick_report["firecracker_published"]
    assert "NOT measured" in fc["note"] and "SPECIFICATION.md" in fc["source"], fc
    assert fc["block_MBps_per_core"] == pytest.approx(fc["block_MBps"] / fc["block_core_fraction"])
    assert quick_report["command"].startswith("python -m bench.virtio")
    assert quick_report["vs_firecracker_published"]


@pytest.mark.kvm
def test_vbench_mode_rejects_an_unknown_device(testguest, run_vmm):
    result = run_vmm(testguest, "mode=vbench vbench.dev=floppy", timeout=60)
    assert "TESTGUEST vbench FAIL vbench.dev=floppy: blk, net or vsock" in result.lines, result.describe()

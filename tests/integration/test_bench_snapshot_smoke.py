"""Smoke test of `python -m bench.snapshot`: two restores per backend, sane JSON.

Not a performance test: two runs say nothing about latency. It checks that
the template boot, the snapshot, the four restore paths (File, Uffd from the
memory file, Uffd from the chunk store with and without the recorded working
set), the page servers' reports, the smaps reading and the chunk store's
ratios fit together, and that no VMM or page server outlives the run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from tests.integration.conftest import REPO_ROOT

pytestmark = pytest.mark.kvm

BACKENDS = ("file", "uffd_mem", "uffd_store", "uffd_store_prefetch")


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def report() -> dict:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the test guest")
    tmp = tempfile.mkdtemp(prefix="ebs-")  # the bench's work dir goes in here (TMPDIR): short socket paths
    env = {**os.environ, "TMPDIR": tmp,
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}
    try:
        proc = subprocess.Popen([sys.executable, "-m", "bench.snapshot", "--runs", "2", "--json", "--quiet"],
                                cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, f"bench.snapshot failed:\n{err}"
        # The VMMs and page servers ran in their own sessions (sockets under `tmp`): none may be left behind.
        ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
        leftover = [line for line in ps.splitlines() if tmp in line]
        assert not leftover, leftover
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return json.loads(out)


def test_snapshot_create_is_timed_and_full(report):
    c = report["snapshot_create"]
    assert c["snapshot_type"] == "Full"
    assert _positive(c["create_ms"]) and c["mem_bytes"] == report["mem_mib"] << 20 and c["state_bytes"] > 0
    assert report["command"].startswith("python -m bench.snapshot")


def test_every_backend_reports_load_and_first_echo_percentiles(report):
    assert set(report["restore"]) == set(BACKENDS)
    for backend, entry in report["restore"].items():
        for key in ("load_ms", "first_echo_ms"):
            s = entry[key]
            assert s["n"] == 2 and 0 < s["p50"] <= s["p90"], (backend, s)
        # The echo is answered after the load returned: it includes it.
        assert entry["first_echo_ms"]["min"] >= entry["load_ms"]["min"], (backend, entry)
        m = entry["memory"]
        assert m["guest_mappings_found"] == 1, (backend, m)
        assert 0 < m["rss_minus_guest_mib"] < m["rss_mib"] and _positive(m["pss_minus_guest_mib"]), (backend, m)


def test_page_server_figures_per_backend(report):
    r = report["restore"]
    assert r["file"]["faults"] is None
    assert r["uffd_mem"]["faults"]["p50"] > 0 and r["uffd_store"]["faults"]["p50"] > 0
    assert r["uffd_store"]["prefetched_bytes"]["max"] == 0
    assert r["uffd_store_prefetch"]["prefetched_bytes"]["min"] > 0
    assert r["uffd_store_prefetch"]["working_set_runs"] > 0
    ratios = report["ratios"]
    assert _positive(ratios["uffd_store_prefetch_vs_file_load_p50"])
    assert ratios["uffd_store_prefetch_vs_file_first_echo_p50"] == pytest.approx(
        r["uffd_store_prefetch"]["first_echo_ms"]["p50"] / r["file"]["first_echo_ms"]["p50"])


def test_chunk_store_ratios_for_two_templates(report):
    cs = report["chunk_store"]
    assert [p["id"] for p in cs["puts"]] == ["echo", "snap"]
    for p in cs["puts"]:
        assert _positive(p["compression_ratio"]) and _positive(p["dedup_ratio"]), p
    store = cs["store"]
    assert store["snapshots"] == 2 and store["chunks"] > 0
    assert _positive(store["compression_ratio"]) and store["dedup_ratio"] >= 1.0

"""The pytest-benchmark suites in bench/micro still run (once each, timing disabled)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_micro_benchmarks_run() -> None:
    r = subprocess.run([sys.executable, "-m", "pytest", "bench/micro", "-q", "-p", "no:cacheprovider",
                        "--benchmark-disable"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "6 passed" in r.stdout, r.stdout[-2000:]

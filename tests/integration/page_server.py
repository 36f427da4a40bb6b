"""Test helper: `ember page-server` in a subprocess, with its per-VM reports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


class PageServer:
    """`python -m poolsvc.cli page-server --socket SOCK <source...>`; `stop()` returns its `vm-done` reports."""

    def __init__(self, sock: Path, *source: str, start_timeout: float = 60.0):
        self.sock = sock
        self.stdout = self.stderr = ""
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "poolsvc.cli", "page-server", "--socket", str(sock),
                                      *source], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + start_timeout
        while not sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"page server did not start: {self.stderr}")
            time.sleep(0.02)

    def stop(self) -> list[dict]:
        """SIGTERM (SIGKILL if it lingers); the per-VM reports (`vm-done`), in order."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            out, err = self.proc.communicate()
        self.stdout, self.stderr = out.decode(errors="replace"), err.decode(errors="replace")
        events = [json.loads(line) for line in self.stdout.splitlines() if line.startswith("{")]
        return [e for e in events if e.get("event") == "vm-done"]

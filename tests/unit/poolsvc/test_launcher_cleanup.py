"""Regressions found by bench/chaos.py in the launcher's process cleanup (no KVM needed).

* Crash recovery killed each stale VMM and then waited until *its parent*
  reaped it: on a host whose init reaps lazily (this one: ~2 s) that was
  seconds per VMM, during which the restarted service did not answer.
* A stopped zygote left its ``.zygote.pid`` (and an empty log) in the run root.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from poolsvc.launcher import ZygoteClient, _kill_and_wait, process_start_time

# A parent that forks a child, prints its pid and never reaps it.
_NEGLECTFUL_PARENT = """
import os, sys, time
pid = os.fork()
if pid == 0:
    time.sleep(300)
    os._exit(0)
print(pid, flush=True)
time.sleep(300)
"""


def test_a_killed_process_whose_parent_does_not_reap_it_is_not_waited_for() -> None:
    parent = subprocess.Popen([sys.executable, "-c", _NEGLECTFUL_PARENT], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())
        start_time = process_start_time(pid)
        assert start_time is not None
        t0 = time.monotonic()
        _kill_and_wait(pid, start_time, timeout=5.0)
        took = time.monotonic() - t0
        with open(f"/proc/{pid}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] == "Z"  # dead, and nobody reaped it
        assert took < 1.0, f"waited {took:.2f} s for another process to reap a dead child"
    finally:
        parent.kill()
        parent.wait()


def test_a_stopped_zygote_leaves_no_pid_file_and_no_empty_log(tmp_path: Path) -> None:
    sock, log = tmp_path / ".zygote.sock", tmp_path / "zygote.log"
    zygote = ZygoteClient(sock, log)
    # Stand-in for the zygote process: stop() only signals and reaps it.
    zygote.proc = subprocess.Popen(["sleep", "300"])
    (tmp_path / ".zygote.pid").write_text(json.dumps({"pid": zygote.proc.pid, "start_time": 1}))
    log.write_bytes(b"")
    zygote.stop()
    assert sorted(os.listdir(tmp_path)) == []
    # A log with something in it is evidence: it stays.
    zygote.proc = subprocess.Popen(["sleep", "300"])
    log.write_bytes(b"zygote: something went wrong\n")
    zygote.stop()
    assert sorted(os.listdir(tmp_path)) == ["zygote.log"]
    assert zygote.proc is None and not zygote.running


def test_kill_and_wait_kills_and_reaps_a_live_child() -> None:
    proc = subprocess.Popen(["sleep", "300"])
    pid = proc.pid
    start_time = process_start_time(pid)
    assert start_time is not None
    _kill_and_wait(pid, start_time, timeout=5.0)  # our child: killed and reaped here
    assert process_start_time(pid) != start_time
    proc.returncode = -signal.SIGKILL  # reaped behind Popen's back


def test_crash_recovery_kills_a_vmm_forked_before_its_pid_file_was_written(tmp_path: Path) -> None:
    """A service SIGKILLed between the zygote's fork and the ``vmm.pid`` write left a VMM that no
    restart ever killed (and its jail cgroup, which it kept busy)."""
    from poolsvc.launcher import cleanup_stale

    vm_id = f"sb-{os.urandom(3).hex()}-000007"
    (tmp_path / vm_id).mkdir()
    (tmp_path / vm_id / "vmm.log").write_text("")
    # Looks like a VMM to the launcher: "vmm.main" in its command line, and its --id.
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "vmm.main", "--id", vm_id])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "vmm.main", "--id",
                              vm_id + "0"])  # another sandbox's VMM: not touched
    try:
        time.sleep(0.2)
        found = cleanup_stale(tmp_path)
        assert [(s.vm_id, s.killed) for s in found] == [(vm_id, True)]
        assert orphan.wait(5) == -signal.SIGKILL or orphan.returncode is not None
        assert other.poll() is None
        assert os.listdir(tmp_path) == []
    finally:
        for p in (orphan, other):
            if p.poll() is None:
                p.kill()
            try:
                p.wait(5)
            except (ChildProcessError, subprocess.TimeoutExpired):
                pass

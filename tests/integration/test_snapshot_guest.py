"""Snapshot and restore with the test guest: real KVM, real `ember-vmm` processes.

A guest is booted through the API, paused, snapshotted (`PUT
/snapshot/create`), and its VMM killed; a new `ember-vmm` loads the snapshot
(`PUT /snapshot/load`) with each memory backend — the memory file mapped
MAP_PRIVATE, and userfaultfd served by `ember page-server` from the raw file
or from the chunk store, with and without a recorded working set — and the
guest must continue exactly where it stopped: the `echo` guest keeps its
line count and answers on the serial console; the `snap` guest keeps its
register counter, memory checksum, armed LAPIC timer and virtio-blk queue.
Bad snapshot files are refused before any VM runs.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.integration.conftest import load_apiclient

pytestmark = pytest.mark.kvm

REPO_ROOT = Path(__file__).resolve().parents[2]


apiclient = load_apiclient()
from tests.integration.page_server import PageServer  # noqa: E402


@pytest.fixture
def work():
    with tempfile.TemporaryDirectory(prefix="ember-snap-") as d:  # short: sun_path is 108 bytes
        yield Path(d)


@pytest.fixture
def vmm(work):
    procs = []

    def start(name: str = "api.sock"):
        p = apiclient.VmmApiProcess(work, ("--id", name.split(".")[0]), sock_name=name)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.close()


def _snapshot(proc, work: Path, tag: str = "snap") -> tuple[Path, Path]:
    assert proc.api.patch("/vm", {"state": "Paused"}).status == 204
    state, mem = work / f"{tag}.state", work / f"{tag}.mem"
    resp = proc.api.put("/snapshot/create", {"snapshot_path": str(state), "mem_file_path": str(mem)})
    assert resp.status == 204, f"{resp}\n{proc.describe()}"
    return state, mem


def _restore(proc, state: Path, backend: str, path: Path, **extra) -> None:
    body = {"snapshot_path": str(state), "mem_backend": {"backend_type": backend, "backend_path": str(path)},
            "resume_vm": True, **extra}
    resp = proc.api.put("/snapshot/load", body)
    assert resp.status == 204, f"{resp}\n{proc.describe()}"


def _boot_echo(proc, testguest: Path) -> None:
    assert proc.api.put("/boot-source", {"kernel_image_path": str(testguest), "boot_args": "mode=echo"}).status == 204
    assert proc.api.put("/machine-config", {"vcpu_count": 1, "mem_size_mib": 64}).status == 204
    resp = proc.api.put("/actions", {"action_type": "InstanceStart"})
    assert resp.status == 204, f"{resp}\n{proc.describe()}"
    proc.wait_for_output("ECHO READY")


@pytest.fixture
def echo_snapshot(vmm, work, testguest):
    """An echo guest that has echoed one line, paused and snapshotted; its VMM killed."""
    a = vmm("a.sock")
    _boot_echo(a, testguest)
    a.send_console(b"before\n")
    a.wait_for_output("ECHO:before")
    state, mem = _snapshot(a, work)
    a.close()
    return state, mem


def _finish_echo(proc, lines_expected: int = 2) -> None:
    proc.send_console(b"after\n")
    proc.wait_for_output("ECHO:after")
    proc.send_console(b"quit\n")
    assert proc.wait() == 0, proc.describe()
    assert "TESTGUEST echo PASS" in proc.stdout, proc.describe()
    # The guest's own count spans the snapshot: the line typed before it counts.
    m = re.search(r"ECHO lines=(\d+)", proc.stdout)
    assert m and int(m.group(1)) >= lines_expected, proc.describe()
    assert "ECHO READY" not in proc.stdout  # it did not boot again


def test_echo_guest_restored_from_the_memory_file_continues(vmm, echo_snapshot) -> None:
    state, mem = echo_snapshot
    b = vmm("b.sock")
    _restore(b, state, "File", mem)
    assert b.api.get("/").json()["state"] == "Running"
    assert b.api.get("/vm/config").json()["boot-source"]["boot_args"] == "mode=echo"
    _finish_echo(b)


def test_restore_paused_then_resume(vmm, echo_snapshot) -> None:
    state, mem = echo_snapshot
    b = vmm("b.sock")
    resp = b.api.put("/snapshot/load", {"snapshot_path": str(state), "mem_file_path": str(mem)})
    assert resp.status == 204, f"{resp}\n{b.describe()}"
    assert b.api.get("/").json()["state"] == "Paused"
    assert b.api.patch("/vm", {"state": "Resumed"}).status == 204
    _finish_echo(b)


def test_one_snapshot_restores_many_times_and_clones_run_side_by_side(vmm, echo_snapshot) -> None:
    state, mem = echo_snapshot
    clones = [vmm(f"c{i}.sock") for i in range(3)]
    for c in clones:
        _restore(c, state, "File", mem)
    for i, c in enumerate(clones):
        c.send_console(f"clone{i}\n".encode())
    for i, c in enumerate(clones):
        c.wait_for_output(f"ECHO:clone{i}")
        assert f"ECHO:clone{(i + 1) % 3}" not in c.stdout  # they diverge: each its own console
    for c in clones:
        _finish_echo(c, lines_expected=3)


def test_echo_guest_restored_through_the_page_server(vmm, work, echo_snapshot) -> None:
    state, mem = echo_snapshot
    server = PageServer(work / "ps.sock", "--mem", str(mem))
    try:
        b = vmm("b.sock")
        _restore(b, state, "Uffd", work / "ps.sock")
        _finish_echo(b)
    finally:
        events = server.stop()
    assert events and events[0]["faults"] > 0, (server.stdout, server.stderr)


def test_page_server_from_the_chunk_store_with_working_set_prefetch(vmm, work, echo_snapshot) -> None:
    state, mem = echo_snapshot
    store = work / "store"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    put = subprocess.run([sys.executable, "-m", "poolsvc.cli", "snapshot", "put", "echo", "--store", str(store),
                          "--state", str(state), "--mem", str(mem)], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert put.returncode == 0, put.stderr
    prefetched = []
    for run in range(2):  # the first restore records the working set, the second prefetches it
        server = PageServer(work / f"ps{run}.sock", "--snapshot", "echo", "--store", str(store))
        try:
            b = vmm(f"b{run}.sock")
            _restore(b, state, "Uffd", work / f"ps{run}.sock")
            _finish_echo(b)
        finally:
            events = server.stop()
        assert events, (server.stdout, server.stderr)
        prefetched.append(events[0].get("prefetched_bytes", 0))
    assert prefetched[0] == 0 and prefetched[1] > 0, prefetched


def test_killing_the_page_server_fails_the_vm_cleanly(vmm, work, echo_snapshot) -> None:
    state, mem = echo_snapshot
    server = PageServer(work / "ps.sock", "--mem", str(mem))
    b = vmm("b.sock")
    _restore(b, state, "Uffd", work / "ps.sock")
    b.send_console(b"after\n")
    b.wait_for_output("ECHO:after")
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait()
    rc = b.wait(timeout=30)
    assert rc != 0, b.describe()
    assert "page server" in b.stderr, b.describe()


# --- refusals -------------------------------------------------------------------------------


def _refused(vmm, state: Path, mem: Path, needle: str, name: str = "b.sock") -> None:
    b = vmm(name)
    resp = b.api.put("/snapshot/load", {"snapshot_path": str(state), "mem_backend": {
        "backend_type": "File", "backend_path": str(mem)}, "resume_vm": True})
    assert resp.status == 400, f"{resp}\n{b.describe()}"
    assert needle in resp.fault, resp.fault
    info = b.api.get("/").json()
    assert info["state"] == "Not started"  # no VM runs, the VMM still serves


def test_corrupted_truncated_and_wrong_version_state_files_are_refused(vmm, work, echo_snapshot) -> None:
    state, mem = echo_snapshot
    data = state.read_bytes()
    corrupt = work / "corrupt.state"
    corrupt.write_bytes(data[:-10] + bytes(b ^ 0xFF for b in data[-10:]))
    _refused(vmm, corrupt, mem, "checksum", "b1.sock")
    truncated = work / "truncated.state"
    truncated.write_bytes(data[: len(data) // 2])
    _refused(vmm, truncated, mem, "truncated", "b2.sock")
    newer = work / "newer.state"
    newer.write_bytes(data[:8] + (99).to_bytes(2, "little") + data[10:])
    _refused(vmm, newer, mem, "99", "b3.sock")
    short_mem = work / "short.mem"
    short_mem.write_bytes(b"\0" * 4096)
    _refused(vmm, state, short_mem, "memory file", "b4.sock")


def test_load_is_refused_after_configuring_and_create_needs_a_paused_vm(vmm, work, testguest, echo_snapshot) -> None:
    state, mem = echo_snapshot
    b = vmm("b.sock")
    assert b.api.put("/machine-config", {"vcpu_count": 1, "mem_size_mib": 64}).status == 204
    resp = b.api.put("/snapshot/load", {"snapshot_path": str(state), "mem_file_path": str(mem)})
    assert resp.status == 400 and "not allowed after configuring" in resp.fault
    c = vmm("c.sock")
    _boot_echo(c, testguest)
    resp = c.api.put("/snapshot/create", {"snapshot_path": str(work / "x"), "mem_file_path": str(work / "y")})
    assert resp.status == 400 and "paused" in resp.fault


# --- the snap guest: registers, memory, armed timer, virtio-blk queue ---------------------------

ROUND_RE = re.compile(r"SNAP round=(\d+) ticks=(\d+) mem=(\w+) blk=(\w+)")


def _rounds(text: str) -> list[tuple[int, int, str, str]]:
    return [(int(m[1]), int(m[2]), m[3], m[4]) for m in ROUND_RE.finditer(text)]


@pytest.fixture
def snap_snapshot(vmm, work, testguest):
    """A snap guest (spinning ring-3 loop, virtio-blk drive) paused after round 6 and snapshotted."""
    disk = work / "disk.img"
    disk.write_bytes(os.urandom(1 << 20))
    a = vmm("a.sock")
    assert a.api.put("/boot-source", {"kernel_image_path": str(testguest), "boot_args":
                                      "mode=snap snap.rounds=30 snap.round_ms=40 snap.idle=spin"}).status == 204
    assert a.api.put("/machine-config", {"vcpu_count": 1, "mem_size_mib": 64}).status == 204
    assert a.api.put("/drives/disk", {"drive_id": "disk", "path_on_host": str(disk), "is_root_device": False,
                                      "is_read_only": True}).status == 204
    assert a.api.put("/actions", {"action_type": "InstanceStart"}).status == 204
    a.wait_for_output("SNAP round=6 ", timeout=60)
    state, mem = _snapshot(a, work)
    time.sleep(0.3)  # nothing more may be printed while paused
    before = a.stdout
    assert len(_rounds(before)) >= 5, before
    a.close()
    return state, mem, before


def _check_continues(proc, before: str) -> None:
    """The console before the snapshot and after the restore read as one uninterrupted run.

    The pause may fall in the middle of a line: the restored guest finishes it.
    """
    assert proc.wait(timeout=60) == 0, proc.describe()
    assert "TESTGUEST snap PASS" in proc.stdout, proc.describe()
    assert "START" not in proc.stdout  # continued, not rebooted
    rounds = _rounds(before + proc.stdout)
    assert [r[0] for r in rounds] == list(range(1, 31)), before + proc.describe()
    assert all(r[2] == "ok" and r[3] == "ok" for r in rounds), before + proc.describe()
    ticks = [r[1] for r in rounds]
    assert all(b > a for a, b in zip(ticks, ticks[1:])), ticks  # the armed timer kept ticking


@pytest.mark.parametrize("backend", ["File", "Uffd"])
def test_snap_guest_continues_exactly_where_it_stopped(vmm, work, snap_snapshot, backend) -> None:
    state, mem, last = snap_snapshot
    server = PageServer(work / "ps.sock", "--mem", str(mem)) if backend == "Uffd" else None
    try:
        b = vmm("b.sock")
        _restore(b, state, backend, work / "ps.sock" if server else mem)
        _check_continues(b, last)
    finally:
        if server is not None:
            server.stop()


def test_snap_guest_diff_snapshot_round_trips(vmm, work, testguest, snap_snapshot) -> None:
    """Full snapshot, restore with dirty tracking, run, diff snapshot, merge onto the base, restore again."""
    state, mem, last = snap_snapshot
    b = vmm("b.sock")
    _restore(b, state, "File", mem, track_dirty_pages=True)
    last_round = _rounds(last)[-1][0]
    b.wait_for_output(f"SNAP round={last_round + 4} ", timeout=60)
    assert b.api.patch("/vm", {"state": "Paused"}).status == 204
    full_state, full_mem = work / "full.state", work / "full.mem"
    resp = b.api.put("/snapshot/create", {"snapshot_path": str(full_state), "mem_file_path": str(full_mem)})
    assert resp.status == 204, resp
    assert b.api.patch("/vm", {"state": "Resumed"}).status == 204
    b.wait_for_output(f"SNAP round={last_round + 8} ", timeout=60)
    assert b.api.patch("/vm", {"state": "Paused"}).status == 204
    diff_state, diff_mem = work / "diff.state", work / "diff.mem"
    resp = b.api.put("/snapshot/create", {"snapshot_path": str(diff_state), "mem_file_path": str(diff_mem),
                                          "snapshot_type": "Diff"})
    assert resp.status == 204, resp
    time.sleep(0.2)
    before_diff = last + b.stdout
    b.close()
    # The diff file holds only the dirtied pages: far less data than the full one.
    assert os.stat(diff_mem).st_blocks < os.stat(full_mem).st_blocks
    from snapshot.memfile import merge_diff_snapshot
    merged = work / "merged.mem"
    shutil.copyfile(full_mem, merged)
    merge_diff_snapshot(diff_state, merged, diff_mem)
    c = vmm("c.sock")
    _restore(c, diff_state, "File", merged)
    _check_continues(c, before_diff)

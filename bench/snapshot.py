"""Snapshot benchmarks: create, restore latency per memory backend, VMM memory, chunk store ratios.

    python -m bench.snapshot [--runs 30] [--json] [--guest testguest]

The template: the test guest in `echo` mode (64 MiB, 1 vCPU) is booted
through the API of one `ember-vmm --api-sock`, echoes one line, is paused
and snapshotted (`PUT /snapshot/create`, Full; the request is timed:
"snapshot create time"), and that VMM is killed.

Restores. Each restore goes into a freshly started `ember-vmm --api-sock`
that already listens (and has answered one `GET /`, so the keep-alive API
connection is open) before the clock starts: the helper-free path, process
start-up not included. Per restore:
  - load_ms: `PUT /snapshot/load` (resume_vm=true) sent -> 204 received;
  - vmm_load_ms: the same load as the VMM measures it (its metrics'
    `latencies_us.load_snapshot`, read after the echo with FlushMetrics):
    load_ms minus the HTTP round trip and request parsing;
  - first_echo_ms: the same request sent -> the guest's answer `ECHO:x` to the
    line `x` written on its console right after the 204;
  - faults / bytes / prefetched_bytes: from the page server's `vm-done` line
    for that VMM (it is emitted when the VMM is killed, so it also covers the
    short time between the echo and the kill; File: not applicable).
Backends, interleaved run by run so that drift of the (noisy) host hits them
alike:
  - file: the memory file, mapped MAP_PRIVATE by the VMM;
  - uffd_mem: `ember page-server --mem FILE`;
  - uffd_store: `ember page-server --snapshot echo --store DIR --no-prefetch`;
  - uffd_store_prefetch: `ember page-server --snapshot echo --store DIR`,
    prefetching the working set that an unmeasured first restore recorded.
Each backend gets one unmeasured warm-up restore (for the store with prefetch
it is the one that records the working set). Reported: p50 and p90 of each
series, and the ratio of uffd_store_prefetch's p50 to file's p50.

Memory: on the first measured restore of each backend, after the echo, the
VMM's RSS minus the guest memory mappings (Firecracker's CI method) and its
PSS minus theirs, from /proc/PID/smaps (bench.vmm_core's parser).

Chunk store: two templates put into one fresh store (`ember snapshot put`):
the echo snapshot and a snapshot of the test guest in `snap` mode (timer-paced
rounds over an 8 MiB pseudo-random array); per put the compression and dedup
ratios, then the whole store's (`ChunkStore.stats()`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from bench.vmm_core import _smaps

REPO_ROOT = Path(__file__).resolve().parents[1]
MEM_MIB = 64
ECHO_BOOT_ARGS = "mode=echo"
# The second template: timer-paced rounds that checksum and rewrite an 8 MiB
# pseudo-random array; enough rounds that it is still running when paused.
SNAP_BOOT_ARGS = "mode=snap snap.rounds=100000 snap.round_ms=50"
SNAP_PAUSE_AFTER_ROUND = 3
EVENT_TIMEOUT_S = 15.0
MEMORY_SETTLE_S = 0.5

BACKENDS = ("file", "uffd_mem", "uffd_store", "uffd_store_prefetch")
LABELS = {
    "file": "File (memory file, MAP_PRIVATE)",
    "uffd_mem": "Uffd, raw memory file",
    "uffd_store": "Uffd, chunk store, no prefetch",
    "uffd_store_prefetch": "Uffd, chunk store + working-set prefetch",
}


class BenchError(RuntimeError):
    """The snapshot benchmark could not complete a step."""


def _load_by_path(name: str, path: Path):
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module


def _apiclient():
    """tests/conformance/apiclient.py: `VmmApiProcess` (a running `ember-vmm --api-sock`)."""
    return _load_by_path("ember_tests_apiclient", REPO_ROOT / "tests" / "conformance" / "apiclient.py")


def build_guest(name: str) -> Path:
    if name != "testguest":
        raise BenchError(f"unknown guest {name!r} (only testguest)")
    build = _load_by_path("ember_tests_guest_build", REPO_ROOT / "tests" / "guests" / "build.py")
    return build.build_testguest()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _check(resp, what: str, proc) -> None:
    if resp.status != 204:
        raise BenchError(f"{what}: {resp}\n{proc.describe()}")


# --- statistics ------------------------------------------------------------------------------


def _quantile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _series(values: list[float]) -> dict[str, Any]:
    return {"p50": statistics.median(values), "p90": _quantile(values, 0.9), "min": min(values),
            "max": max(values), "n": len(values), "samples": [round(v, 3) for v in values]}


# --- the page server ---------------------------------------------------------------------------


class PageServerProcess:
    """`ember page-server` in its own process group; its `vm-done` lines collected by VMM pid."""

    def __init__(self, sock: Path, *source: str) -> None:
        self.sock = sock
        self.args = source
        self.proc = subprocess.Popen([sys.executable, "-m", "poolsvc.cli", "page-server", "--socket", str(sock),
                                      *source], cwd=REPO_ROOT, env=_env(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.events: dict[int, dict] = {}
        self.stderr: list[str] = []
        self._cond = threading.Condition()
        self._threads = [threading.Thread(target=self._read_events, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for t in self._threads:
            t.start()
        deadline = time.monotonic() + 30
        while not sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise BenchError(f"page server {' '.join(source)} did not start: {''.join(self.stderr)}")
            time.sleep(0.02)

    def _read_events(self) -> None:
        for line in self.proc.stdout:
            if not line.startswith("{"):
                continue
            event = json.loads(line)
            if event.get("event") in ("vm-done", "vm-refused"):
                with self._cond:
                    self.events[event.get("pid")] = event
                    self._cond.notify_all()

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)

    def wait_event(self, pid: int, timeout: float = EVENT_TIMEOUT_S) -> dict:
        """The report for the VMM `pid` (emitted once its connection ends)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while pid not in self.events:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(f"page server: no vm-done for pid {pid}\n{''.join(self.stderr[-20:])}")
                self._cond.wait(left)
            event = self.events[pid]
        if event.get("event") != "vm-done" or event.get("end") == "error":
            raise BenchError(f"page server: {event}")
        return event

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        for t in self._threads:
            t.join(5)

    def __repr__(self) -> str:
        return f"<PageServerProcess pid={self.proc.pid} {' '.join(self.args)} served={len(self.events)}>"


# --- the VMM -----------------------------------------------------------------------------------


def _vmm_memory(pid: int, mem_mib: int, mem_file: Path) -> dict[str, Any]:
    """RSS and PSS of the VMM without the guest memory mappings (as bench.vmm_core.bench_memory).

    Guest memory is the one mapping of `mem_mib` MiB that is anonymous (Uffd)
    or maps the memory file (File, MAP_PRIVATE).
    """
    maps = _smaps(pid)
    guest = [m for m in maps if m["size"] == mem_mib << 20 and m["name"] in ("", str(mem_file))]
    total_rss = sum(m.get("Rss", 0) for m in maps)
    total_pss = sum(m.get("Pss", 0) for m in maps)
    guest_rss = sum(m.get("Rss", 0) for m in guest)
    guest_pss = sum(m.get("Pss", 0) for m in guest)
    return {
        "guest_mappings_found": len(guest),
        "rss_mib": total_rss / 1024,
        "rss_minus_guest_mib": (total_rss - guest_rss) / 1024,
        "pss_minus_guest_mib": (total_pss - guest_pss) / 1024,
        "guest_rss_mib": guest_rss / 1024,
    }


def _vmm_load_ms(proc) -> float:
    """The VMM's own measure of the load (metrics `latencies_us.load_snapshot`), after a FlushMetrics."""
    _check(proc.api.put("/actions", {"action_type": "FlushMetrics"}), "FlushMetrics", proc)
    lines = [line for line in proc.metrics_path.read_text().splitlines() if line.startswith("{")]
    if not lines:
        raise BenchError(f"no metrics line in {proc.metrics_path}\n{proc.describe()}")
    return json.loads(lines[-1])["latencies_us"]["load_snapshot"] / 1000


class Bench:
    """One work directory: the VMM processes started in it are killed by `close`, at the latest."""

    def __init__(self, work: Path, guest: Path) -> None:
        self.work = work
        self.guest = guest
        self.api = _apiclient()
        self._live: list = []
        self._n = 0

    def start_vmm(self):
        """A fresh `ember-vmm --api-sock`, listening, keep-alive API connection open.

        Its metrics go to `proc.metrics_path` (written only on FlushMetrics here: the
        periodic flush is every 60 s)."""
        self._n += 1
        tag = f"v{self._n}"
        metrics = self.work / f"{tag}.metrics"
        proc = self.api.VmmApiProcess(self.work, ("--id", tag, "--metrics-path", str(metrics)),
                                      sock_name=f"{tag}.sock")
        proc.metrics_path = metrics
        self._live.append(proc)
        resp = proc.api.get("/")
        if resp.status != 200:
            raise BenchError(f"GET /: {resp}\n{proc.describe()}")
        return proc

    def kill(self, proc) -> None:
        proc.close()  # SIGKILL to its process group
        if proc in self._live:
            self._live.remove(proc)

    def close(self) -> None:
        for proc in list(self._live):
            self.kill(proc)

    def boot_and_snapshot(self, boot_args: str, ready: str, tag: str,
                          before_pause: Callable[[Any], None] | None = None) -> dict[str, Any]:
        proc = self.start_vmm()
        try:
            _check(proc.api.put("/boot-source", {"kernel_image_path": str(self.guest), "boot_args": boot_args}),
                   "boot-source", proc)
            _check(proc.api.put("/machine-config", {"vcpu_count": 1, "mem_size_mib": MEM_MIB}), "machine-config",
                   proc)
            _check(proc.api.put("/actions", {"action_type": "InstanceStart"}), "InstanceStart", proc)
            proc.wait_for_output(ready, timeout=60)
            if before_pause is not None:
                before_pause(proc)
            t0 = time.perf_counter()
            _check(proc.api.patch("/vm", {"state": "Paused"}), "pause", proc)
            t1 = time.perf_counter()
            state, mem = self.work / f"{tag}.state", self.work / f"{tag}.mem"
            _check(proc.api.put("/snapshot/create", {"snapshot_path": str(state), "mem_file_path": str(mem),
                                                     "snapshot_type": "Full"}), "snapshot/create", proc)
            t2 = time.perf_counter()
        finally:
            self.kill(proc)
        return {"state": state, "mem": mem, "pause_ms": (t1 - t0) * 1000, "create_ms": (t2 - t1) * 1000,
                "state_bytes": state.stat().st_size, "mem_bytes": mem.stat().st_size,
                "mem_allocated_bytes": mem.stat().st_blocks * 512}

    def restore_once(self, state: Path, backend_type: str, backend_path: Path, *,
                     memory_of: Path | None = None) -> dict[str, Any]:
        """One restore into a fresh VMM; timed from the load request. The VMM is killed before returning."""
        proc = self.start_vmm()
        try:
            body = {"snapshot_path": str(state),
                    "mem_backend": {"backend_type": backend_type, "backend_path": str(backend_path)},
                    "resume_vm": True}
            t0 = time.perf_counter()
            resp = proc.api.put("/snapshot/load", body)
            t1 = time.perf_counter()
            _check(resp, "snapshot/load", proc)
            proc.send_console(b"x\n")
            proc.wait_for_output("ECHO:x")
            t2 = time.perf_counter()
            sample = {"pid": proc.proc.pid, "load_ms": (t1 - t0) * 1000, "first_echo_ms": (t2 - t0) * 1000,
                      "vmm_load_ms": _vmm_load_ms(proc)}
            if memory_of is not None:
                time.sleep(MEMORY_SETTLE_S)
                sample["memory"] = _vmm_memory(proc.proc.pid, MEM_MIB, memory_of)
            return sample
        finally:
            self.kill(proc)


# --- the chunk store -----------------------------------------------------------------------------


def _put(store: Path, snapshot_id: str, state: Path, mem: Path) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "poolsvc.cli", "snapshot", "put", snapshot_id, "--store", str(store),
                          "--state", str(state), "--mem", str(mem), "--json"], cwd=REPO_ROOT, env=_env(),
                         capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise BenchError(f"snapshot put {snapshot_id}: {out.stderr}")
    return json.loads(out.stdout)


def _store_stats(store: Path) -> dict[str, Any]:
    from snapshot import ChunkStore
    with ChunkStore(store) as cs:
        s = cs.stats()
    return {"snapshots": s.snapshots, "chunks": s.chunks, "logical_bytes": s.logical_bytes,
            "referenced_bytes": s.referenced_bytes, "raw_bytes": s.raw_bytes, "stored_bytes": s.stored_bytes,
            "compression_ratio": s.compression_ratio, "dedup_ratio": s.dedup_ratio,
            "space_ratio": s.space_ratio if s.stored_bytes else None}


# --- the benchmark -------------------------------------------------------------------------------


def run(runs: int, guest_name: str = "testguest", log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    guest = build_guest(guest_name)
    work = Path(tempfile.mkdtemp(prefix="ember-bsnap-"))  # short: sun_path is 108 bytes
    bench = Bench(work, guest)
    servers: dict[str, PageServerProcess] = {}
    try:
        log("booting the echo template")

        def echo_before(proc) -> None:
            proc.send_console(b"before\n")
            proc.wait_for_output("ECHO:before")

        echo = bench.boot_and_snapshot(ECHO_BOOT_ARGS, "ECHO READY", "echo", echo_before)
        log("booting the snap template")
        snap = bench.boot_and_snapshot(SNAP_BOOT_ARGS, f"SNAP round={SNAP_PAUSE_AFTER_ROUND} ", "snap")

        store = work / "store"
        log("putting both templates into the chunk store")
        puts = [_put(store, "echo", echo["state"], echo["mem"]), _put(store, "snap", snap["state"], snap["mem"])]

        state, mem = echo["state"], echo["mem"]
        servers["uffd_mem"] = PageServerProcess(work / "ps-mem.sock", "--mem", str(mem))
        servers["uffd_store_prefetch"] = PageServerProcess(work / "ps-ws.sock", "--snapshot", "echo",
                                                           "--store", str(store))
        servers["uffd_store"] = PageServerProcess(work / "ps-nows.sock", "--snapshot", "echo", "--store", str(store),
                                                  "--no-prefetch")
        targets = {"file": ("File", mem), "uffd_mem": ("Uffd", servers["uffd_mem"].sock),
                   "uffd_store": ("Uffd", servers["uffd_store"].sock),
                   "uffd_store_prefetch": ("Uffd", servers["uffd_store_prefetch"].sock)}

        def restore(backend: str, measure_memory: bool) -> dict[str, Any]:
            backend_type, path = targets[backend]
            sample = bench.restore_once(state, backend_type, path, memory_of=mem if measure_memory else None)
            server = servers.get(backend)
            if server is not None:
                sample["page_server"] = server.wait_event(sample["pid"])
            return sample

        # Warm-up: the prefetch server's first restore records the working set
        # (it must come before any --no-prefetch connection, which would record too).
        log("warm-up restores (recording the working set)")
        warmup = {b: restore(b, False) for b in ("uffd_store_prefetch", "file", "uffd_mem", "uffd_store")}
        recorded = warmup["uffd_store_prefetch"]["page_server"]
        if recorded.get("working_set") != "recorded":
            raise BenchError(f"the warm-up restore did not record a working set: {recorded}")

        samples: dict[str, list[dict]] = {b: [] for b in BACKENDS}
        for i in range(runs):
            log(f"run {i + 1}/{runs}")
            for backend in BACKENDS:
                samples[backend].append(restore(backend, i == 0))
        for s in samples["uffd_store_prefetch"]:
            if not s["page_server"]["prefetched_bytes"]:
                raise BenchError(f"a prefetch restore prefetched nothing: {s['page_server']}")
        for s in samples["uffd_store"]:
            if s["page_server"]["prefetched_bytes"]:
                raise BenchError(f"a --no-prefetch restore prefetched: {s['page_server']}")
    finally:
        bench.close()
        for server in servers.values():
            server.stop()
    try:
        store_stats = _store_stats(store)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    restore_report: dict[str, Any] = {}
    for backend in BACKENDS:
        rows = samples[backend]
        entry: dict[str, Any] = {
            "label": LABELS[backend],
            "load_ms": _series([r["load_ms"] for r in rows]),
            "vmm_load_ms": _series([r["vmm_load_ms"] for r in rows]),
            "first_echo_ms": _series([r["first_echo_ms"] for r in rows]),
            "memory": rows[0]["memory"],
        }
        if backend in servers:
            events = [r["page_server"] for r in rows]
            for key in ("faults", "bytes", "prefetched_bytes", "zero_pages"):
                entry[key] = _series([float(e[key]) for e in events])
        else:
            entry.update({"faults": None, "bytes": None, "prefetched_bytes": None, "zero_pages": None})
        restore_report[backend] = entry
    if "working_set_runs" in recorded:
        restore_report["uffd_store_prefetch"]["working_set_runs"] = recorded["working_set_runs"]
        restore_report["uffd_store_prefetch"]["recording_restore_bytes"] = recorded["bytes"]

    def ratio(backend: str, key: str) -> float:
        return restore_report[backend][key]["p50"] / restore_report["file"][key]["p50"]

    return {
        "command": f"python -m bench.snapshot --runs {runs} --guest {guest_name}",
        "guest": guest_name, "boot_args": ECHO_BOOT_ARGS, "mem_mib": MEM_MIB, "vcpus": 1, "runs": runs,
        "snapshot_create": {k: echo[k] for k in ("create_ms", "pause_ms", "state_bytes", "mem_bytes",
                                                 "mem_allocated_bytes")} | {"snapshot_type": "Full"},
        "restore": restore_report,
        "ratios": {
            "uffd_store_prefetch_vs_file_load_p50": ratio("uffd_store_prefetch", "load_ms"),
            "uffd_store_prefetch_vs_file_first_echo_p50": ratio("uffd_store_prefetch", "first_echo_ms"),
            "uffd_mem_vs_file_first_echo_p50": ratio("uffd_mem", "first_echo_ms"),
            "uffd_store_vs_file_first_echo_p50": ratio("uffd_store", "first_echo_ms"),
        },
        "chunk_store": {
            "templates": [{"id": "echo", "boot_args": ECHO_BOOT_ARGS},
                          {"id": "snap", "boot_args": SNAP_BOOT_ARGS,
                           "paused_after_round": SNAP_PAUSE_AFTER_ROUND, "create_ms": snap["create_ms"]}],
            "puts": [{k: p.get(k) for k in ("id", "logical_bytes", "zero_bytes", "unique_bytes", "new_raw_bytes",
                                            "new_stored_bytes", "dedup_within", "dedup_across", "new_chunks",
                                            "chunks", "seconds", "compression_ratio", "dedup_ratio",
                                            "space_ratio")} for p in puts],
            "store": store_stats,
        },
    }


# --- output --------------------------------------------------------------------------------------


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.2f}"


def print_table(r: dict[str, Any]) -> None:
    c = r["snapshot_create"]
    print(f"{r['command']}   ({r['guest']} {r['boot_args']}, {r['mem_mib']} MiB, {r['vcpus']} vCPU)")
    print(f"snapshot create (Full): {c['create_ms']:.1f} ms   pause: {c['pause_ms']:.1f} ms   "
          f"memory file {_mib(c['mem_bytes'])} MiB ({_mib(c['mem_allocated_bytes'])} MiB allocated), "
          f"state {c['state_bytes']} B")
    print()
    print(f"restore, {r['runs']} runs each   load = PUT /snapshot/load -> 204;  echo = same request -> ECHO:x")
    head = (f"{'backend':42} {'load p50':>9} {'p90':>8} {'in-VMM':>7} {'echo p50':>9} {'p90':>8} {'faults':>7} "
            f"{'MiB read':>9} {'prefetch':>9} {'RSS-g':>6} {'PSS-g':>6}")
    print(head)
    print("-" * len(head))
    for key, e in r["restore"].items():
        faults = f"{e['faults']['p50']:.0f}" if e["faults"] else "n/a"
        read = _mib(e["bytes"]["p50"]) if e["bytes"] else "n/a"
        pre = _mib(e["prefetched_bytes"]["p50"]) if e["prefetched_bytes"] else "n/a"
        m = e["memory"]
        print(f"{e['label']:42} {e['load_ms']['p50']:9.1f} {e['load_ms']['p90']:8.1f} {e['vmm_load_ms']['p50']:7.1f} "
              f"{e['first_echo_ms']['p50']:9.1f} {e['first_echo_ms']['p90']:8.1f} {faults:>7} {read:>9} {pre:>9} "
              f"{m['rss_minus_guest_mib']:6.1f} {m['pss_minus_guest_mib']:6.1f}")
    print("(ms. in-VMM: p50 of the VMM's own load_snapshot latency. faults, MiB read on demand, prefetch:\n"
          " p50 per restore, from the page server. RSS-g / PSS-g: the VMM's RSS / PSS minus guest memory, MiB)")
    print()
    for k, v in r["ratios"].items():
        print(f"{k:46} {v:6.2f}x")
    print()
    print("chunk store (zstd + LMDB, one store, two templates)")
    for p in r["chunk_store"]["puts"]:
        print(f"  put {p['id']:5} {_mib(p['logical_bytes'])} MiB ({_mib(p['zero_bytes'])} zero): "
              f"{_mib(p['new_raw_bytes'])} MiB new -> {_mib(p['new_stored_bytes'])} MiB stored; "
              f"compression {p['compression_ratio']}, dedup {p['dedup_ratio']} "
              f"({p['dedup_within']} within, {p['dedup_across']} across), space {p['space_ratio']}")
    s = r["chunk_store"]["store"]
    print(f"  store: {s['snapshots']} snapshots, {s['chunks']} chunks, {_mib(s['referenced_bytes'])} MiB referenced, "
          f"{_mib(s['raw_bytes'])} MiB distinct -> {_mib(s['stored_bytes'])} MiB stored; "
          f"compression {s['compression_ratio']:.2f}, dedup {s['dedup_ratio']:.2f}, space {s['space_ratio']:.2f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--guest", default="testguest", choices=("testguest",))
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    log = (lambda s: None) if args.quiet else (lambda s: print(f"bench.snapshot: {s}", file=sys.stderr, flush=True))
    try:
        result = run(args.runs, args.guest, log)
    except BenchError as exc:
        print(f"bench.snapshot: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

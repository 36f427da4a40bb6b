"""Where a launch's CPU and a microVM's memory go: `python -m bench.launch_cost`.

    python -m bench.launch_cost [--duration 20] [--clients 4] [--warm 12] [--no-jail] [--json]

It starts ``ember serve`` in a temporary EMBER_HOME with a test-guest
template (the freestanding guest in ``mode=agent``: it isolates Ember's own
cost from a guest kernel) and measures three things:

1. **CPU per launch** over a flat-out `bench.load` run of ``--duration``
   seconds: the service's own CPU, the zygote's, and the VMMs' (which the
   zygote reaps, so they add up in its ``cutime``/``cstime``, guest time
   included in user time as Linux accounts it), and the whole host's busy
   time, each divided by the launches.
2. **CPU per VMM thread**, by phase, from ``/proc/PID/task/TID/schedstat``
   (nanoseconds on CPU): a pool is filled to ``--warm`` restored, paused
   VMMs (the *restore* phase: fork, KVM VM creation, state parse), then
   some are acquired (the *acquire* phase: resume, the guest handling the
   vsock reset and answering the agent's PING).
3. **Memory per VMM**, from ``/proc/PID/smaps`` of the warm VMMs: RSS, PSS
   and private dirty memory by mapping (anonymous, heap, libraries, guest
   memory).

Every figure is a mean over the VMMs or launches measured, from one run on
this host; run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from .chaos import REPO_ROOT, ServiceProcess, _Rpc, _testguest, service_vmms

HZ = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str]:
    """Fields 3.. of /proc/PID/stat (after the command name)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_cpu_ms(pid: int) -> dict[str, float]:
    """utime, stime, cutime, cstime, guest_time, cguest_time of `pid`, in ms."""
    f = _stat(pid)
    names = ("utime", "stime", "cutime", "cstime")
    out = {n: int(f[11 + i]) * 1000 / HZ for i, n in enumerate(names)}
    out["guest"], out["cguest"] = int(f[40]) * 1000 / HZ, int(f[41]) * 1000 / HZ
    return out


def host_busy_ms() -> float:
    """CPU time the host spent not idle (all CPUs), in ms."""
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) * 1000 / HZ


def thread_cpu_ms(pid: int) -> dict[str, float]:
    """On-CPU time per thread name of `pid` (schedstat, ns precision), in ms."""
    out: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            ns = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        except (OSError, ValueError, IndexError):
            continue
        out[comm] = out.get(comm, 0.0) + ns / 1e6
    return out


_MAP_RE = re.compile(r"^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*)$")
_SMAPS_KEYS = ("Rss", "Pss", "Private_Dirty")


def smaps_by_mapping(pid: int, guest_mem_names: tuple[str, ...] = ("vm.mem",)) -> Counter:
    """(category, key) -> KiB for one process; categories: guest-memory, [anon], [heap], [stack], lib:NAME."""
    out: Counter = Counter()
    cat = "[anon]"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        m = _MAP_RE.match(line)
        if m:
            name = m.group(1) or "[anon]"
            base = os.path.basename(name.split(" (deleted)")[0])
            if base in guest_mem_names or "memfd:" in name:
                cat = "guest-memory"
            elif name.startswith("/"):
                cat = f"lib:{base}"
            else:
                cat = name
            continue
        key, _, value = line.partition(":")
        if key in _SMAPS_KEYS:
            out[(cat, key)] += int(value.split()[0])
    return out


def _zygote_of(service_pid: int) -> int:
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if _stat(int(d))[1] == str(service_pid) and b"vmm.zygote" in Path(f"/proc/{d}/cmdline").read_bytes():
                    return int(d)
            except (OSError, IndexError):
                continue
    raise RuntimeError(f"no zygote under the service (pid {service_pid})")


def _vmm_pids(run_dir: Path) -> dict[str, int]:
    """sandbox id -> pid of the service's VMMs."""
    return {vm_id: pid for pid, vm_id in service_vmms(run_dir).items()}


def _wait_warm(rpc: _Rpc, template: str, n: int, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while rpc.stub.GetPoolStatus(rpc.pb2.GetPoolStatusRequest(template=template)).warm < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the pool did not reach {n} warm VMMs")
        time.sleep(0.1)


def measure(duration: float, clients: int, warm: int, extra: list[str]) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="elc-", dir="/tmp"))  # short: socket paths must fit sun_path
    svc = ServiceProcess(home, f"lc{os.getpid()}", ["--max-vms", str(max(64, 4 * warm)), *extra])
    result: dict[str, Any] = {"duration_s": duration, "clients": clients, "warm": warm, "serve_flags": extra}
    try:
        svc.start()
        assert svc.proc is not None
        rpc = _Rpc(svc.addr)
        pb2 = rpc.pb2
        rpc.stub.CreateTemplate(pb2.CreateTemplateRequest(name="tg", kernel=str(_testguest()), boot_args="mode=agent",
                                                          vcpus=1, mem_mib=64), timeout=300)
        # Phases: restore (fill the pool), memory of the warm VMMs, acquire.
        rpc.stub.SetPool(pb2.SetPoolRequest(template="tg", min_warm=warm, max_warm=warm))
        _wait_warm(rpc, "tg", warm)
        time.sleep(1.0)
        pids = _vmm_pids(svc.run_dir)
        restored = {vm: thread_cpu_ms(pid) for vm, pid in pids.items()}
        mem: Counter = Counter()
        for pid in pids.values():
            mem.update(smaps_by_mapping(pid))
        n = max(len(pids), 1)
        cats = sorted({c for c, _ in mem}, key=lambda c: -mem[(c, "Private_Dirty")])
        result["memory_per_vmm_kib"] = {c: {k: round(mem[(c, k)] / n) for k in _SMAPS_KEYS} for c in cats[:12]}
        result["memory_per_vmm_total_kib"] = {
            k: round(sum(v for (c, kk), v in mem.items() if kk == k and c != "guest-memory") / n) for k in _SMAPS_KEYS}
        result["vmms_measured"] = len(pids)
        rpc.stub.SetPool(pb2.SetPoolRequest(template="tg", min_warm=0, max_warm=warm))
        acquired: dict[str, list[float]] = {}
        for _ in range(min(warm, 8)):
            sb = rpc.stub.Acquire(pb2.AcquireRequest(template="tg"), timeout=60)
            pid = _vmm_pids(svc.run_dir).get(sb.id)
            if pid is not None and sb.id in restored:
                after = thread_cpu_ms(pid)
                for name, ms in after.items():
                    acquired.setdefault(name, []).append(ms - restored[sb.id].get(name, 0.0))
            rpc.stub.Release(pb2.ReleaseRequest(id=sb.id))
        threads = sorted({t for cpu in restored.values() for t in cpu})
        result["thread_cpu_ms"] = {
            t: {"restore": round(statistics.mean(c.get(t, 0.0) for c in restored.values()), 2),
                "acquire": round(statistics.mean(acquired[t]), 2) if acquired.get(t) else None}
            for t in threads}
        # CPU per launch over a flat-out load run.
        rpc.stub.SetPool(pb2.SetPoolRequest(template="tg", min_warm=4, max_warm=8))
        _wait_warm(rpc, "tg", 4)
        zygote = _zygote_of(svc.proc.pid)
        s0, z0, h0 = process_cpu_ms(svc.proc.pid), process_cpu_ms(zygote), host_busy_ms()
        load = subprocess.run([sys.executable, "-m", "bench.load", "--addr", svc.addr, "--template", "tg",
                               "--duration", str(duration), "--clients", str(clients), "--root", str(svc.run_dir),
                               "--json"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=duration + 300)
        s1, z1, h1 = process_cpu_ms(svc.proc.pid), process_cpu_ms(zygote), host_busy_ms()
        if load.returncode != 0:
            raise RuntimeError(f"bench.load failed: {load.stderr[-2000:]}")
        report = json.loads(load.stdout.strip().splitlines()[-1])
        launches = max(int(report.get("launches") or 0), 1)
        per = lambda a, b, k: round((b[k] - a[k]) / launches, 2)  # noqa: E731
        result["load"] = {k: report.get(k) for k in ("launches", "launches_per_s", "acquire_p50_ms", "failures")}
        result["cpu_per_launch_ms"] = {
            "service": per(s0, s1, "utime") + per(s0, s1, "stime"),
            "zygote": per(z0, z1, "utime") + per(z0, z1, "stime"),
            "vmm_user": per(z0, z1, "cutime"), "vmm_sys": per(z0, z1, "cstime"),
            "vmm_guest_in_user": per(z0, z1, "cguest"),
            "host_busy": round((h1 - h0) / launches, 2),
        }
        return result
    finally:
        svc.terminate()
        shutil.rmtree(home, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.launch_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=20.0, help="seconds of flat-out load for CPU per launch")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--warm", type=int, default=12, help="warm VMMs measured for restore CPU and memory")
    p.add_argument("--no-jail", action="store_true", help="serve with --no-jail")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    r = measure(args.duration, args.clients, args.warm, ["--no-jail"] if args.no_jail else [])
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"load: {r['load']}")
    print("CPU per launch (ms):", r["cpu_per_launch_ms"])
    print("CPU per VMM thread (ms, mean): restore | acquire")
    for t, v in r["thread_cpu_ms"].items():
        print(f"  {t:14} {v['restore']:8.2f} | {v['acquire'] if v['acquire'] is not None else '-'}")
    print(f"memory per VMM, guest memory excluded (KiB, {r['vmms_measured']} VMMs):", r["memory_per_vmm_total_kib"])
    for c, v in r["memory_per_vmm_kib"].items():
        print(f"  {c[:40]:40} Rss {v['Rss']:7} Pss {v['Pss']:7} Private_Dirty {v['Private_Dirty']:7}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

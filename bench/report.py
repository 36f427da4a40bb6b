"""The pool service's load figures, every scenario in one command: `python -m bench.report`.

    python -m bench.report [--only tg,tg-warm,tg-hold,lx,lx-warm] [--runs 3] [--duration 60]
                           [--out DIR] [--json]

Each scenario starts its own ``ember serve`` with the defaults (every VMM
jailed, seccomp on, snapshots signed) in a temporary EMBER_HOME, creates
its template through the gRPC API, sets the pool, waits until it is warm,
and runs ``python -m bench.load`` against it; the service is stopped (a
graceful drain) and its home removed afterwards.

========  ==========================================================  =======
scenario  what                                                        runs
========  ==========================================================  =======
tg        test guest (``mode=agent``, 64 MiB), 4 clients flat out,      --runs
          pool 4/8: sustained launches/s with the pool refilling
tg-warm   test guest at 5 launches/s, 2 clients, pool 8/8: Acquire      --runs
          from a warm pool
tg-hold   test guest, 4 clients flat out holding 50 sandboxes, pool     1
          4/60: VMM overhead per microVM at 50 concurrent sandboxes
lx        the built Linux guest (``ember images build``), 4 clients     --runs
          flat out, pool 4/8, network slots on (``--net-cidr``)
lx-warm   the Linux guest at 1 launch/s, 1 client, pool 8/8             1
========  ==========================================================  =======

The test guest (a freestanding program, no kernel) isolates Ember's own
cost from this host's emulated guest kernel. Every run prints one line; the
end prints, per scenario, the median of each figure over its runs (each
run's own figures are medians / p99 of its launches). ``--out DIR`` keeps
each run's JSON report and the last run's PNG plot of each scenario. Run it
on an otherwise idle host: the figures are the host's CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .chaos import REPO_ROOT, ServiceProcess, _Rpc, _testguest
from .launch_cost import _wait_warm

#: The figures a run reports, in the order the summary prints them.
FIGURES = ("launches_per_s", "acquire_p50_ms", "acquire_p90_ms", "acquire_p99_ms", "ready_p50_ms", "failures",
           "overhead_rss_mib", "overhead_pss_mib", "host_mem_per_vmm_mib", "host_cpu_percent", "vmms_peak")


@dataclass(frozen=True)
class Scenario:
    name: str
    guest: str  # "tg" (the test guest) or "lx" (the built Linux guest images)
    min_warm: int
    max_warm: int
    clients: int
    load_args: tuple[str, ...] = ()
    runs: int | None = None  # None: --runs
    serve_args: tuple[str, ...] = ()


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("tg", "tg", 4, 8, 4),
    Scenario("tg-warm", "tg", 8, 8, 2, ("--rate", "5")),
    Scenario("tg-hold", "tg", 4, 60, 4, ("--hold", "50"), runs=1),
    Scenario("lx", "lx", 4, 8, 4, ("--ready-timeout", "60"), serve_args=("--net-cidr", "10.213.0.0/24")),
    Scenario("lx-warm", "lx", 8, 8, 1, ("--rate", "1", "--ready-timeout", "60"), runs=1,
             serve_args=("--net-cidr", "10.213.0.0/24")),
)}


def parse_only(text: str) -> list[Scenario]:
    """The scenarios named in a comma-separated list, in the list's order; ValueError for an unknown one."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        raise ValueError(f"unknown scenario(s) {unknown or text!r}; known: {', '.join(SCENARIOS)}")
    return [SCENARIOS[n] for n in names]


def medians(runs: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """Each figure's median over the runs that report it (None when none does)."""
    out: dict[str, float | None] = {}
    for key in FIGURES:
        values = [float(r[key]) for r in runs if isinstance(r.get(key), (int, float))]
        out[key] = statistics.median(values) if values else None
    return out


def _template_request(pb2: Any, guest: str) -> Any:
    if guest == "tg":
        return pb2.CreateTemplateRequest(name="tg", kernel=str(_testguest()), boot_args="mode=agent", vcpus=1,
                                         mem_mib=64)
    from types import SimpleNamespace

    from poolsvc.client_cli import _template_defaults  # what `ember template create lx` sends

    fields = _template_defaults(SimpleNamespace(kernel=None, rootfs=None, initrd=None, boot_args=None))
    return pb2.CreateTemplateRequest(name="lx", vcpus=1, **fields)


def run_scenario(sc: Scenario, runs: int, duration: float, out: Path | None) -> list[dict[str, Any]]:
    """`runs` bench.load reports of scenario `sc`, each from a run of `duration` seconds."""
    home = Path(tempfile.mkdtemp(prefix="erp-", dir="/tmp"))  # short: socket paths must fit sun_path
    svc = ServiceProcess(home, f"rp{os.getpid()}", ["--max-vms", str(sc.max_warm + 16), *sc.serve_args])
    reports: list[dict[str, Any]] = []
    try:
        svc.start()
        rpc = _Rpc(svc.addr)
        pb2 = rpc.pb2
        rpc.stub.CreateTemplate(_template_request(pb2, sc.guest), timeout=600)
        rpc.stub.SetPool(pb2.SetPoolRequest(template=sc.guest, min_warm=sc.min_warm, max_warm=sc.max_warm))
        _wait_warm(rpc, sc.guest, sc.min_warm, 600.0)
        time.sleep(2.0)  # the refill's last restores settle
        for i in range(runs):
            argv = [sys.executable, "-m", "bench.load", "--addr", svc.addr, "--template", sc.guest, "--duration",
                    str(duration), "--clients", str(sc.clients), "--root", str(svc.run_dir), "--json",
                    *sc.load_args]
            if out is not None and i == runs - 1:
                argv += ["--out", str(out / f"plot-{sc.name}")]
            proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO_ROOT, timeout=duration + 600)
            if proc.returncode != 0:
                raise RuntimeError(f"bench.load ({sc.name}, run {i + 1}) failed: {proc.stderr[-2000:]}")
            report = json.loads(proc.stdout.strip().splitlines()[-1])
            reports.append(report)
            if out is not None:
                (out / f"{sc.name}-{i + 1}.json").write_text(json.dumps(report, indent=1) + "\n")
            print(f"{sc.name} run {i + 1}: " + ", ".join(f"{k}={_fmt(report.get(k))}" for k in FIGURES),
                  file=sys.stderr, flush=True)
            if sc.max_warm > sc.min_warm or "--rate" in sc.load_args:
                _wait_warm(rpc, sc.guest, sc.min_warm, 600.0)  # the next run starts from a full pool
        rpc.close()
        return reports
    finally:
        svc.terminate(timeout=300)
        shutil.rmtree(home, ignore_errors=True)


def _fmt(v: Any) -> str:
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="tg,tg-warm,tg-hold,lx,lx-warm", help="comma-separated scenarios")
    p.add_argument("--runs", type=int, default=3, help="runs of the scenarios that are repeated")
    p.add_argument("--duration", type=float, default=60.0, help="seconds per run")
    p.add_argument("--out", type=Path, help="keep each run's JSON and each scenario's last PNG here")
    p.add_argument("--json", action="store_true", help="print {scenario: {runs, medians}} as JSON")
    args = p.parse_args(argv)
    try:
        scenarios = parse_only(args.only)
    except ValueError as exc:
        p.error(str(exc))
    if args.runs < 1 or args.duration <= 0:
        p.error("--runs must be >= 1 and --duration > 0")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {}
    for sc in scenarios:
        reports = run_scenario(sc, sc.runs or args.runs, args.duration, args.out)
        summary[sc.name] = {"runs": [{k: r.get(k) for k in FIGURES} for r in reports], "medians": medians(reports)}
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"{'scenario':9} " + " ".join(f"{k:>12.12}" for k in FIGURES))
    for name, s in summary.items():
        print(f"{name:9} " + " ".join(f"{_fmt(v):>12}" for v in (s["medians"][k] for k in FIGURES)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

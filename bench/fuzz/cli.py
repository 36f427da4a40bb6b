"""``python -m bench.fuzz``: run fuzz targets one after another and report inputs/s, crashes, hangs.

    python -m bench.fuzz --list
    python -m bench.fuzz --target virtqueue --inputs 1000000
    python -m bench.fuzz --target devices --inputs 400000      # a family: each of its targets
    python -m bench.fuzz --target all --inputs 2000 --engine random

Engines: ``atheris`` (libFuzzer with Python coverage, in a child process
watched by this one: a worker that stops writing its heartbeat is killed,
counted as a hang and restarted for the inputs still due; one that dies is
counted as a crash) and ``random`` (in-process seed mutation, no
dependency). ``auto`` picks atheris when it is installed.

Exit status: 0 if no target crashed or hung, 1 otherwise. ``--json`` writes
every target's `FuzzStats`; reproducers go to ``<--out>/crashes/``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .engine import CrashRecord, FuzzStats, Runner, run_random
from .targets import FAMILIES, TARGETS, make

__all__ = ["main", "run_target", "resolve_targets"]

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "out" / "fuzz"
MAX_RESTARTS = 5


def resolve_targets(spec: str) -> list[str]:
    """Target names for a target, a family, a comma list of either, or ``all``."""
    if spec == "all":
        return list(TARGETS)
    names: list[str] = []
    for part in spec.split(","):
        part = part.strip()
        if part in FAMILIES:
            names += FAMILIES[part]
        elif part in TARGETS:
            names.append(part)
        else:
            raise SystemExit(f"unknown target or family {part!r}; targets: {', '.join(TARGETS)}; "
                             f"families: {', '.join(FAMILIES)}")
    return list(dict.fromkeys(names))


def _progress(stats: FuzzStats) -> None:
    elapsed = stats.seconds or 1e-9
    print(f"[fuzz] {stats.target}: {stats.inputs} inputs, {stats.inputs / elapsed:.0f}/s, "
          f"crashes={stats.crashes} hangs={stats.hangs}", file=sys.stderr, flush=True)


def run_random_target(name: str, inputs: int, *, timeout: float, seed: int, max_len: int, out: Path) -> FuzzStats:
    harness = make(name)
    try:
        runner = Runner(harness, engine="random", timeout=timeout, crash_dir=out / "crashes")
        t0 = time.monotonic()

        def progress(stats: FuzzStats) -> None:
            stats.seconds = time.monotonic() - t0
            _progress(stats)

        return run_random(runner, inputs, seed=seed, max_len=max_len, progress=progress)
    finally:
        harness.close()


def _watch(proc: subprocess.Popen, stats_path: Path, started: float, stale_after: float) -> str | None:
    """Wait for the worker; kill it if its heartbeat stops. Returns why it was killed, or None."""
    last_beat = last_print = started
    last_mtime = 0.0
    while proc.poll() is None:
        time.sleep(0.5)
        try:
            mtime = stats_path.stat().st_mtime
        except FileNotFoundError:
            mtime = 0.0
        now = time.monotonic()
        if mtime != last_mtime:
            last_mtime, last_beat = mtime, now
        if now - last_beat > stale_after and now - started > stale_after:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return f"worker made no progress for {stale_after:g} s (killed)"
        if now - last_print > 10 and mtime:
            last_print = now
            try:
                _progress(FuzzStats.from_json(json.loads(stats_path.read_text())["stats"]))
            except (ValueError, KeyError, OSError):
                pass
    return None


def run_atheris_target(name: str, inputs: int, *, timeout: float, seed: int, max_len: int, out: Path) -> FuzzStats:
    total = FuzzStats(target=name, engine="atheris")
    remaining = inputs
    stale_after = max(30.0, 20 * timeout)
    for attempt in range(MAX_RESTARTS + 1):
        if remaining <= 0:
            break
        stats_path = out / f"{name}.worker.json"
        stats_path.unlink(missing_ok=True)
        log_path = out / f"{name}.worker.log"
        cmd = [sys.executable, "-m", "bench.fuzz.atheris_worker", "--target", name, "--inputs", str(remaining),
               "--stats", str(stats_path), "--work", str(out), "--timeout", str(timeout),
               "--seed", str(seed + attempt), "--max-len", str(max_len)]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=Path(__file__).resolve().parents[2],
                                    start_new_session=True)
        started = time.monotonic()
        verdict: str | None = None
        try:
            verdict = _watch(proc, stats_path, started, stale_after)
        finally:
            if proc.poll() is None:  # interrupted: never leave a worker behind
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        done = False
        try:
            report = json.loads(stats_path.read_text())
            part = FuzzStats.from_json(report["stats"])
            done = report["done"]
        except (FileNotFoundError, ValueError, KeyError):
            part = FuzzStats(target=name, engine="atheris")
        if not done and verdict is None:
            verdict = f"worker exited with status {proc.returncode} before finishing"
        if verdict is not None:
            tail = log_path.read_bytes()[-3000:].decode("utf-8", "replace")
            kind = "hang" if "no progress" in verdict else "crash"
            if kind == "hang":
                part.hangs += 1
            else:
                part.crashes += 1
            part.unique.append(CrashRecord(f"worker: {verdict}", kind, verdict, 1, str(log_path), tail))
            print(f"[fuzz] {name}: {verdict}; see {log_path}", file=sys.stderr, flush=True)
        total.merge(part)
        remaining = inputs - total.inputs
        if done:
            break
    return total


def run_target(name: str, inputs: int, *, engine: str = "auto", timeout: float = 1.0, seed: int = 0,
               max_len: int = 8192, out: Path = DEFAULT_OUT) -> FuzzStats:
    """Fuzz one target with `inputs` inputs; returns its books."""
    if engine == "auto":
        engine = "atheris" if importlib.util.find_spec("atheris") else "random"
    out.mkdir(parents=True, exist_ok=True)
    run = run_atheris_target if engine == "atheris" else run_random_target
    return run(name, inputs, timeout=timeout, seed=seed, max_len=max_len, out=out)


def _table(results: list[FuzzStats]) -> str:
    family_of = {t: f for f, ts in FAMILIES.items() for t in ts}
    lines = [f"{'target':<10} {'family':<10} {'engine':<8} {'inputs':>10} {'seconds':>8} {'inputs/s':>9} "
             f"{'doc.err':>9} {'crashes':>7} {'hangs':>5} {'slowest':>8}"]
    for s in results:
        lines.append(f"{s.target:<10} {family_of.get(s.target, '?'):<10} {s.engine:<8} {s.inputs:>10} "
                     f"{s.seconds:>8.1f} {s.rate:>9.0f} {s.documented_errors:>9} {s.crashes:>7} {s.hangs:>5} "
                     f"{s.slowest_input_s * 1000:>6.1f}ms")
    for s in results:
        for c in s.unique:
            lines.append(f"  {s.target}: {c.kind} x{c.count}: {c.signature}: {c.message[:160]} "
                         f"(reproducer: {c.reproducer})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="all", help="a target, a family, a comma list, or 'all'")
    p.add_argument("--inputs", type=int, default=10000, help="inputs per target")
    p.add_argument("--engine", choices=("auto", "atheris", "random"), default="auto")
    p.add_argument("--timeout", type=float, default=1.0, help="per-input time bound, seconds (hang above)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-len", type=int, default=8192)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="corpus, crashes and worker logs")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--list", action="store_true", help="list targets and families")
    args = p.parse_args(argv)
    if args.list:
        for family, names in FAMILIES.items():
            print(f"{family}: {', '.join(names)}")
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanups (worker kill) on SIGTERM
    results = []
    for name in resolve_targets(args.target):  # one after another: the host has two shared cores
        print(f"[fuzz] {name}: {args.inputs} inputs", file=sys.stderr, flush=True)
        results.append(run_target(name, args.inputs, engine=args.engine, timeout=args.timeout, seed=args.seed,
                                  max_len=args.max_len, out=args.out))
        _progress(results[-1])
    print(_table(results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([s.to_json() for s in results], indent=1))
    return 1 if any(s.crashes or s.hangs for s in results) else 0

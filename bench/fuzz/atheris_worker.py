"""One atheris (libFuzzer) fuzzing process for one target; `bench.fuzz.cli` starts and watches it.

The code under test is imported inside `atheris.instrument_imports`, so
libFuzzer sees Python branch coverage of ``vmm``, ``snapshot`` and ``h11``
and keeps inputs that reach new code in the corpus directory (seeded with
the harness's seeds). Every input goes through a `Runner` (time bound,
documented errors, crash records); nothing reaches libFuzzer as a crash,
so one run counts every crash and hang instead of stopping at the first.

The worker writes its `FuzzStats` as JSON to ``--stats`` about once a
second (the parent's heartbeat) and once more when ``--inputs`` inputs have
run, then exits 0 at once (libFuzzer's own exit path is not taken).

    python -m bench.fuzz.atheris_worker --target T --inputs N --stats F --work DIR [--timeout S] [--seed K]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import atheris

from .engine import Runner
from .targets import make

INSTRUMENTED = ["vmm", "snapshot", "h11"]


def _write(path: Path, runner: Runner, done: bool) -> None:
    stats = runner.stats
    stats.seconds = time.monotonic() - (runner._started or time.monotonic())
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"done": done, "stats": stats.to_json()}))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fuzz.atheris_worker")
    p.add_argument("--target", required=True)
    p.add_argument("--inputs", type=int, required=True)
    p.add_argument("--stats", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True, help="corpus/ and crashes/ go here")
    p.add_argument("--timeout", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-len", type=int, default=8192)
    args = p.parse_args(argv)

    with atheris.instrument_imports(include=INSTRUMENTED):
        harness = make(args.target)
    corpus = args.work / "corpus" / args.target
    corpus.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(harness.seeds()):
        (corpus / f"seed-{i:03d}").write_bytes(seed)
    crash_dir = args.work / "crashes"
    runner = Runner(harness, engine="atheris", timeout=args.timeout, crash_dir=crash_dir)
    last = [0.0]

    def one_input(data: bytes) -> None:
        runner.run_one(data)
        now = time.monotonic()
        if runner.stats.inputs >= args.inputs:
            _write(args.stats, runner, True)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)  # libFuzzer would otherwise go on; nothing else needs tearing down
        if now - last[0] > 1.0:
            last[0] = now
            _write(args.stats, runner, False)

    crash_dir.mkdir(parents=True, exist_ok=True)
    atheris.Setup([sys.argv[0], str(corpus), "-timeout=0", f"-max_len={args.max_len}", f"-seed={args.seed}",
                   "-rss_limit_mb=4096", f"-artifact_prefix={crash_dir}/", "-print_final_stats=0",
                   "-reload=0", "-len_control=100"], one_input)
    atheris.Fuzz()
    return 0  # not reached: one_input exits


if __name__ == "__main__":
    raise SystemExit(main())

"""The fuzz harness keeps working: every target runs ~2000 inputs clean, and the runner sees bugs.

CI-sized (a few seconds): the in-process engine, fixed seeds. The big runs
are `python -m bench.fuzz` and `python -m bench.fuzz.api` (docs/fuzzing.md).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bench.fuzz import FAMILIES, TARGETS, RandomEngine, Runner, make, run_random
from bench.fuzz.cli import resolve_targets

SMOKE_INPUTS = 2000


@pytest.mark.parametrize("name", list(TARGETS))
def test_target_runs_clean(name: str, tmp_path: Path) -> None:
    harness = make(name)
    try:
        runner = Runner(harness, engine="random", timeout=2.0, crash_dir=tmp_path)
        stats = run_random(runner, SMOKE_INPUTS, seed=1)
    finally:
        harness.close()
    assert stats.inputs == SMOKE_INPUTS
    assert (stats.crashes, stats.hangs) == (0, 0), [(c.signature, c.message, c.traceback) for c in stats.unique]
    assert stats.features >= 3, "the mutations should reach more than a couple of behaviours"


@pytest.mark.parametrize("name", ["block", "net", "vsock"])
def test_device_seeds_bring_the_device_up(name: str) -> None:
    """A seed is a well-formed driver: the device goes live and the parsers accept its requests."""
    harness = make(name)
    try:
        outcomes = [harness.one_input(seed) for seed in harness.seeds()]
    finally:
        harness.close()
    assert all("live" in o for o in outcomes), outcomes


class _Buggy:
    """A harness with a bug on one input, a hang on another and a documented error on a third."""

    name = "buggy"
    allowed = (ValueError,)

    def seeds(self) -> list[bytes]:
        return [b"ok", b"boom", b"slow", b"bad"]

    def one_input(self, data: bytes) -> str:
        if data == b"boom":
            return {}["missing"]  # KeyError: not documented
        if data == b"slow":
            while True:
                time.sleep(0.01)
        if data == b"bad":
            raise ValueError("documented")
        return "ok"

    def close(self) -> None:
        pass


def test_runner_tells_crashes_hangs_and_documented_errors_apart(tmp_path: Path) -> None:
    runner = Runner(_Buggy(), engine="random", timeout=0.2, crash_dir=tmp_path)
    for data in (b"ok", b"boom", b"boom", b"slow", b"bad"):
        runner.run_one(data)
    stats = runner.finish()
    assert (stats.inputs, stats.crashes, stats.hangs, stats.documented_errors) == (5, 2, 1, 1)
    kinds = sorted((c.kind, c.count) for c in stats.unique)
    assert kinds == [("crash", 2), ("hang", 1)]
    crash = next(c for c in stats.unique if c.kind == "crash")
    assert crash.signature.startswith("KeyError at tests/unit/test_fuzz_smoke.py:")
    assert Path(crash.reproducer).read_bytes() == b"boom"


def test_random_engine_is_deterministic_and_bounded() -> None:
    a = RandomEngine([b"hello world" * 10], seed=7, max_len=64)
    b = RandomEngine([b"hello world" * 10], seed=7, max_len=64)
    xs = [a.next() for _ in range(200)]
    assert xs == [b.next() for _ in range(200)]
    assert all(len(x) <= 64 for x in xs) and len(set(xs)) > 150


def test_families_cover_every_target_once() -> None:
    listed = [t for names in FAMILIES.values() for t in names]
    assert sorted(listed) == sorted(TARGETS)
    assert resolve_targets("devices") == ["block", "net", "vsock"]
    assert resolve_targets("all") == list(TARGETS)

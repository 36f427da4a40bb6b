"""The fuzzing engine: run one input under a time bound, classify what happened, count it.

A `Harness` is a parser or device under test behind one function,
``one_input(data: bytes)``. It may raise only the exception types it
declares in `allowed` (the module's documented error families); anything
else is a crash, and an input that runs past the per-input time bound is a
hang. A `Runner` wraps a harness and keeps the books (`FuzzStats`): inputs,
documented errors, unique crashes (by exception type and innermost frame of
Ember's code) with a reproducer saved for each, hangs, the slowest input.

Two ways to produce inputs:

* `RandomEngine` (in-process, no dependency): mutates the harness's seeds
  (bit flips, interesting integers, inserts, deletes, splices) and keeps an
  input that produced a new outcome (a new error type, or a new value the
  harness returns as its "feature") as a further seed;
* atheris (libFuzzer, coverage-guided) in a child process: see
  `bench.fuzz.atheris_worker`.

The time bound is a SIGALRM timer armed around every input; the handler
raises `InputTimeout`, a `BaseException` so that no ``except Exception`` in
the code under test swallows it.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import struct
import sys
import time
import traceback
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

__all__ = ["Harness", "InputTimeout", "CrashRecord", "FuzzStats", "Runner", "RandomEngine", "REPO_ROOT"]

REPO_ROOT = Path(__file__).resolve().parents[2]
# Frames in these top-level directories are "ours" when naming a crash.
_OWN_DIRS = tuple(str(REPO_ROOT / d) + os.sep for d in ("vmm", "snapshot", "poolsvc", "bench"))


class Harness(Protocol):
    """One fuzz target: `one_input` may raise only `allowed` exception types."""

    name: str
    allowed: tuple[type[BaseException], ...]

    def seeds(self) -> list[bytes]: ...

    def one_input(self, data: bytes) -> Hashable | None: ...

    def close(self) -> None: ...


class InputTimeout(BaseException):
    """An input ran past the per-input time bound (a hang)."""


@dataclass
class CrashRecord:
    """One unique crash: where it was raised, how often, and the first input that did it."""

    signature: str
    kind: str  # "crash" or "hang"
    message: str
    count: int
    reproducer: str | None
    traceback: str


@dataclass
class FuzzStats:
    """A run's books (plain data, written as JSON by the CLI)."""

    target: str
    engine: str
    inputs: int = 0
    documented_errors: int = 0
    crashes: int = 0
    hangs: int = 0
    seconds: float = 0.0
    slowest_input_s: float = 0.0
    features: int = 0
    unique: list[CrashRecord] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.inputs / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict:
        d = asdict(self)
        d["inputs_per_s"] = round(self.rate, 1)
        return d

    def merge(self, other: FuzzStats) -> None:
        """Add `other`'s counts (another worker of the same target) into this one."""
        self.inputs += other.inputs
        self.documented_errors += other.documented_errors
        self.crashes += other.crashes
        self.hangs += other.hangs
        self.seconds += other.seconds
        self.slowest_input_s = max(self.slowest_input_s, other.slowest_input_s)
        self.features = max(self.features, other.features)
        known = {c.signature: c for c in self.unique}
        for c in other.unique:
            if c.signature in known:
                known[c.signature].count += c.count
            else:
                self.unique.append(c)
                known[c.signature] = c

    @classmethod
    def from_json(cls, d: dict) -> FuzzStats:
        d = dict(d)
        d.pop("inputs_per_s", None)
        unique = [CrashRecord(**c) for c in d.pop("unique", [])]
        return cls(**d, unique=unique)

    def __repr__(self) -> str:
        return (f"<FuzzStats {self.target} {self.engine} inputs={self.inputs} crashes={self.crashes} "
                f"hangs={self.hangs} rate={self.rate:.0f}/s>")


def _signature(exc: BaseException) -> str:
    """Exception type and the innermost frame in Ember's code (else the innermost frame).

    An exception may name itself with a ``fuzz_signature`` attribute (e.g. a
    harness reporting an HTTP 500 by its message rather than its frame).
    """
    named = getattr(exc, "fuzz_signature", None)
    if isinstance(named, str):
        return named
    frames = traceback.extract_tb(exc.__traceback__)
    own = [f for f in frames if f.filename.startswith(_OWN_DIRS)
           and not f.filename.endswith(("bench/fuzz/engine.py",))]
    frame = (own or frames or [None])[-1]
    where = "?" if frame is None else f"{os.path.relpath(frame.filename, REPO_ROOT)}:{frame.lineno}"
    return f"{type(exc).__name__} at {where}"


class Runner:
    """Runs inputs through a harness under a time bound and keeps a `FuzzStats`.

    Not thread-safe; uses SIGALRM, so it must run on the main thread.
    """

    def __init__(self, harness: Harness, *, engine: str, timeout: float = 1.0,
                 crash_dir: Path | None = None) -> None:
        self.harness = harness
        self.timeout = timeout
        self.crash_dir = crash_dir
        self.stats = FuzzStats(target=harness.name, engine=engine)
        self._by_sig: dict[str, CrashRecord] = {}
        self._features: set[Hashable] = set()
        self._started: float | None = None
        signal.signal(signal.SIGALRM, self._on_alarm)

    @staticmethod
    def _on_alarm(signum: int, frame: object) -> None:
        raise InputTimeout()

    def run_one(self, data: bytes) -> bool:
        """Run one input; True if it showed a behaviour (feature) not seen before."""
        if self._started is None:
            self._started = time.monotonic()
        t0 = time.perf_counter()
        feature: Hashable | None = None
        try:
            signal.setitimer(signal.ITIMER_REAL, self.timeout)
            try:
                feature = self.harness.one_input(data)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except InputTimeout as exc:
            self.stats.hangs += 1
            self._record(exc, data, "hang", f"no result after {self.timeout:g} s")
            feature = "hang"
        except self.harness.allowed as exc:
            self.stats.documented_errors += 1
            feature = type(exc).__name__
        except Exception as exc:  # noqa: BLE001 - anything undocumented is what we are looking for
            self.stats.crashes += 1
            self._record(exc, data, "crash", f"{type(exc).__name__}: {exc}"[:500])
            feature = "crash:" + _signature(exc)
        elapsed = time.perf_counter() - t0
        self.stats.inputs += 1
        if elapsed > self.stats.slowest_input_s:
            self.stats.slowest_input_s = elapsed
        if feature is None or feature in self._features:
            return False
        self._features.add(feature)
        self.stats.features = len(self._features)
        return True

    def _record(self, exc: BaseException, data: bytes, kind: str, message: str) -> None:
        sig = _signature(exc) if kind == "crash" else f"hang at {_signature(exc).split(' at ', 1)[1]}"
        record = self._by_sig.get(sig)
        if record is not None:
            record.count += 1
            return
        path = None
        if self.crash_dir is not None:
            self.crash_dir.mkdir(parents=True, exist_ok=True)
            name = f"{kind}-{self.harness.name}-{hashlib.sha1(data).hexdigest()[:16]}"
            (self.crash_dir / name).write_bytes(data)
            path = str(self.crash_dir / name)
        tb = "".join(traceback.format_exception(exc))[-4000:]
        record = CrashRecord(sig, kind, message, 1, path, tb)
        self._by_sig[sig] = record
        self.stats.unique.append(record)
        print(f"[fuzz] new {kind} in {self.harness.name}: {sig}: {message[:200]}", file=sys.stderr, flush=True)

    def __repr__(self) -> str:
        return f"<Runner {self.harness.name} inputs={self.stats.inputs} timeout={self.timeout:g}s>"

    def finish(self) -> FuzzStats:
        if self._started is not None:
            self.stats.seconds = time.monotonic() - self._started
        return self.stats


# --- the in-process mutation engine ---------------------------------------------------------

_INTERESTING = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFF_FFFF,
                0x8000_0000, 0xFFFF_FFFF, 1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, 16, 512, 4096)


class RandomEngine:
    """Seed mutation with outcome feedback: deterministic for a given `seed`."""

    def __init__(self, seeds: Sequence[bytes], *, seed: int = 0, max_len: int = 8192) -> None:
        self.rng = random.Random(seed)
        self.corpus: list[bytes] = [bytes(s) for s in seeds] or [b""]
        self.max_len = max_len

    def add(self, data: bytes) -> None:
        if len(self.corpus) < 4096:
            self.corpus.append(data)

    def next(self) -> bytes:
        rng = self.rng
        buf = bytearray(rng.choice(self.corpus))
        for _ in range(rng.choice((1, 1, 2, 2, 3, 4, 8))):
            self._mutate(buf)
        return bytes(buf[: self.max_len])

    def _mutate(self, buf: bytearray) -> None:
        rng = self.rng
        op = rng.randrange(9)
        n = len(buf)
        if op == 0 and n:  # flip a bit
            i = rng.randrange(n)
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:  # a random byte
            buf[rng.randrange(n)] = rng.randrange(256)
        elif op == 2 and n:  # an interesting integer, little-endian, 1/2/4/8 bytes
            width = rng.choice((1, 2, 4, 8))
            value = rng.choice(_INTERESTING) & ((1 << (8 * width)) - 1)
            i = rng.randrange(n)
            buf[i:i + width] = value.to_bytes(width, "little")[: max(0, n - i)]
        elif op == 3 and n:  # add or subtract a small amount to a 16/32-bit field
            width = rng.choice((2, 4))
            i = rng.randrange(max(1, n - width + 1))
            if i + width <= n:
                fmt = "<H" if width == 2 else "<I"
                (v,) = struct.unpack_from(fmt, buf, i)
                struct.pack_into(fmt, buf, i, (v + rng.randint(-16, 16)) & ((1 << (8 * width)) - 1))
        elif op == 4:  # insert random bytes
            i = rng.randrange(n + 1)
            buf[i:i] = rng.randbytes(rng.choice((1, 2, 4, 16, 64)))
        elif op == 5 and n:  # delete a range
            i = rng.randrange(n)
            del buf[i:i + rng.choice((1, 2, 4, 16, 64))]
        elif op == 6 and n:  # duplicate a range
            i = rng.randrange(n)
            j = rng.randrange(n + 1)
            buf[j:j] = buf[i:i + rng.choice((1, 4, 16, 64))]
        elif op == 7 and len(self.corpus) > 1:  # splice with another corpus entry
            other = rng.choice(self.corpus)
            cut = rng.randrange(min(n, len(other)) + 1)
            buf[cut:] = other[cut:]
        elif op == 8 and n:  # truncate
            del buf[rng.randrange(n):]

    def __repr__(self) -> str:
        return f"<RandomEngine corpus={len(self.corpus)}>"


def run_random(runner: Runner, inputs: int, *, seed: int = 0, max_len: int = 8192,
               progress: Callable[[FuzzStats], None] | None = None) -> FuzzStats:
    """Run `inputs` inputs from a `RandomEngine` (seeds first) through `runner`."""
    engine = RandomEngine(runner.harness.seeds(), seed=seed, max_len=max_len)
    pending = list(engine.corpus)
    last = time.monotonic()
    for _ in range(inputs):
        data = pending.pop() if pending else engine.next()
        if runner.run_one(data):
            engine.add(data)
        if progress is not None and time.monotonic() - last > 5:
            last = time.monotonic()
            progress(runner.stats)
    return runner.finish()

"""The load harness of the pool service: Acquire -> agent ping -> Release, as fast as it goes.

    python -m bench.load --addr ADDR --template NAME --duration S [--clients N]
                         [--rate R] [--warmup S] [--hold N] [--channel shared|per-client]
                         [--root DIR] [--no-ping] [--json] [--out DIR]
    ember bench load ...   (the same flags)

What one *launch* is. A client thread sends Acquire(template) (lease TTL
`--lease-ttl`, so a crashed harness's sandboxes are reaped), then pings the
guest agent through the returned vsock UDS (`poolsvc.agent.AgentClient`,
one connection per ping; connection errors are retried every millisecond
until `--ready-timeout`: a resumed guest may take a moment to accept), then
sends Release. A launch counts when all three succeeded.

Phases. `--warmup` seconds of launches that are not recorded; then, with
`--hold N`, N sandboxes are acquired and kept until the end (the density
measurement: "overhead at N concurrent sandboxes"); then the measurement
window of `--duration` seconds. Clients stop starting launches at its end;
launches that *started* in the window give the latency figures, launches
that *completed* in it give the rate.

Pacing. Flat out by default: each of `--clients` threads starts its next
launch as soon as the last one ended (closed loop). With `--rate R` the
clients share one schedule of start times R per second apart (`Pacer`); a
client that is late starts at once, but at most one second of missed slots
is made up (no unbounded burst after a stall). Latencies are measured from
the moment the request is sent, not from the scheduled slot.

Reported (JSON keys in parentheses):
  - launches/s (launches_per_s), and per time bucket (rate_series);
  - Acquire latency p50/p90/p99 (acquire_p50_ms ...), time to agent ready
    (Acquire sent -> first PONG; ready_p50_ms, ready_p99_ms) and how many
    PINGs that took (ping_attempts_p50/max: more than one means the agent
    refused connections for a while after Acquire returned), Release
    latency (release_p50_ms);
  - failures: the count (failures) and by stage and code (failures_by_code:
    "acquire/UNAVAILABLE", "ping/AgentTimeout", "release/NOT_FOUND"...);
  - VMM overhead per microVM, sampled every `--sample-interval` seconds from
    /proc/PID/smaps of the host's ember-vmm processes (comm ``ember-vmm``,
    or a ``vmm.main`` command line; with `--root`, only those whose working
    directory is under it): RSS minus the guest memory mappings
    (Firecracker's CI method; overhead_rss_mib) and PSS minus theirs
    (overhead_pss_mib), medians over every process sample of the window. The
    guest memory is the mapping of the template's ``vm.mem`` (clones map it
    MAP_PRIVATE: `poolsvc.launcher.vmm_memory` does the sums); a VMM without
    one (a fresh boot, a Uffd restore) has its largest anonymous mapping taken
    as guest memory instead, but only when no sampled VMM maps a vm.mem (a VMM
    caught before its snapshot is loaded is not a microVM yet; the kinds seen
    are in overhead_guest_mapping). At most `--sample-max` processes are read per
    sample (reading smaps costs the service CPU on a small host);
  - host memory per sandbox: MemTotal - MemAvailable (/proc/meminfo) at the
    sample with the most VMMs minus before the run, over the difference in
    VMM count (host_mem_per_vmm_mib; null if the count did not grow: use
    `--hold`);
  - CPU: the host's busy share over the window from /proc/stat
    (host_cpu_percent, of all cores), and this harness's own CPU time
    (harness_cpu_percent, of one core).

With `--out DIR`: ``load-<template>-<time>.json`` (the report plus every
launch's raw times) and a PNG of the same name (`bench.plot_png`).

bench/ imports poolsvc/ (the client side), never vmm/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "LoadConfig",
    "LoadError",
    "Launch",
    "Pacer",
    "VmmSample",
    "VmmSampler",
    "CpuTimes",
    "agent_ping",
    "find_vmms",
    "host_mem_used",
    "percentile",
    "summarize",
    "rate_series",
    "report",
    "run",
    "print_summary",
    "main",
]

MIB = 1 << 20
#: A guest memory region smaller than this is never taken for the anonymous guest mapping.
_MIN_GUEST_MAPPING = 16 * MIB
_VMM_COMM = "ember-vmm"


class LoadError(Exception):
    """The load run could not be set up."""


# ---- statistics ---------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0..100) of `values`, linearly interpolated between closest ranks
    (numpy's default). NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    if not values:
        return math.nan
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(values: Sequence[float]) -> dict[str, float | int]:
    """n, mean, min, p50, p90, p99, max of `values` (NaN when empty, n = 0)."""
    if not values:
        nan = math.nan
        return {"n": 0, "mean": nan, "min": nan, "p50": nan, "p90": nan, "p99": nan, "max": nan}
    return {"n": len(values), "mean": sum(values) / len(values), "min": min(values),
            "p50": percentile(values, 50), "p90": percentile(values, 90), "p99": percentile(values, 99),
            "max": max(values)}


def rate_series(ends: Sequence[float], start: float, stop: float, bucket: float) -> list[tuple[float, float]]:
    """(bucket start - `start`, completions per second) for each whole bucket of [start, stop)."""
    if bucket <= 0:
        raise ValueError(f"bucket must be positive, got {bucket}")
    n = int((stop - start) / bucket + 1e-9)
    counts = [0] * n
    for t in ends:
        i = math.floor((t - start) / bucket)
        if 0 <= i < n:
            counts[i] += 1
    return [(i * bucket, c / bucket) for i, c in enumerate(counts)]


# ---- pacing ------------------------------------------------------------------------------


class Pacer:
    """Start times `1/rate` apart shared by every client; `rate` None: no pacing.

    A slot taken late is used at once; at most `max_backlog` seconds of missed
    slots are made up, so a stall is not followed by an unbounded burst.
    """

    def __init__(self, rate: float | None, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, max_backlog: float = 1.0) -> None:
        if rate is not None and rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        self.rate = rate
        self.clock, self.sleep = clock, sleep
        self.max_backlog = max_backlog
        self._next: float | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Pacer rate={self.rate}>"

    def reserve(self, now: float) -> float:
        """Take the next start time (at `now` or later, or in the past by a made-up slot)."""
        if self.rate is None:
            return now
        with self._lock:
            if self._next is None:
                self._next = now
            elif self._next < now - self.max_backlog:
                self._next = now - self.max_backlog
            slot = self._next
            self._next = slot + 1.0 / self.rate
            return slot

    def wait(self) -> float:
        """Sleep until the next start time; return it."""
        slot = self.reserve(self.clock())
        delay = slot - self.clock()
        if delay > 0:
            self.sleep(delay)
        return slot


# ---- the launch loop -----------------------------------------------------------------------


@dataclass
class Launch:
    """One Acquire -> ping -> Release; times are monotonic seconds, durations seconds (None: not reached)."""

    client: int
    start: float
    end: float = math.nan
    acquire_s: float | None = None
    ready_s: float | None = None
    release_s: float | None = None
    ping_attempts: int = 0
    error: str | None = None  # "<stage>/<code>"
    measured: bool = False  # started inside the measurement window

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class LoadConfig:
    addr: str
    template: str
    duration: float
    clients: int = 2
    rate: float | None = None
    warmup: float = 2.0
    hold: int = 0
    channel: str = "per-client"  # or "shared"
    root: str | None = None
    ping: bool = True
    lease_ttl: float = 60.0
    rpc_timeout: float = 30.0
    ready_timeout: float = 10.0
    sample_interval: float = 1.0
    sample_max: int = 8
    bucket: float = 1.0
    #: TLS: the CA of the service's certificate (None: plaintext); a bearer token for every call.
    tls_ca: str | None = None
    token: str | None = None

    def __post_init__(self) -> None:
        if self.duration <= 0 or self.clients <= 0 or self.warmup < 0 or self.hold < 0:
            raise LoadError(f"bad load configuration: {self}")
        if self.channel not in ("shared", "per-client"):
            raise LoadError(f"--channel must be shared or per-client, got {self.channel!r}")


class AgentNotReady(Exception):
    """The agent did not answer a PING before the deadline."""


def agent_ping(uds_path: str, port: int, deadline: float) -> int:
    """PING the agent until it answers or `deadline` (monotonic) passes; connection errors are
    retried. Returns the number of attempts."""
    from poolsvc.agent import AgentClient, AgentConnectionError, AgentTimeout

    last: Exception | None = None
    attempts = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AgentNotReady(f"no PONG from {uds_path} port {port} after {attempts} attempts: {last}")
        attempts += 1
        try:
            AgentClient(uds_path, port, timeout=left).ping()
            return attempts
        except (AgentConnectionError, AgentTimeout) as exc:
            last = exc
            time.sleep(0.001)


def _code(exc: BaseException) -> str:
    import grpc

    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        code = exc.code()
        return code.name if code is not None else "UNKNOWN"
    return type(exc).__name__


class _Clients:
    """The client threads, their channels and the sandboxes held for `--hold`."""

    def __init__(self, cfg: LoadConfig, ping: Callable[[str, int, float], int | None]) -> None:
        import grpc

        from poolsvc import proto
        from poolsvc.auth import client_channel

        self.cfg = cfg
        self.ping = ping
        self.pb2, pb2_grpc = proto.load()
        # A channel of its own per client needs its own subchannel pool: by default gRPC shares
        # one connection between channels to the same target.
        options = [("grpc.use_local_subchannel_pool", 1)] if cfg.channel == "per-client" else []
        n = cfg.clients if cfg.channel == "per-client" else 1
        self.channels = [client_channel(cfg.addr, tls_ca=cfg.tls_ca, token=cfg.token, options=options)
                         for _ in range(n)]
        for ch in self.channels:
            try:
                grpc.channel_ready_future(ch).result(timeout=cfg.rpc_timeout)
            except grpc.FutureTimeoutError as exc:
                self.close()
                raise LoadError(f"no pool service at {cfg.addr}") from exc
        self.stubs = [pb2_grpc.PoolServiceStub(ch) for ch in self.channels]
        self.launches: list[Launch] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.window: tuple[float, float] | None = None
        self.pacer = Pacer(cfg.rate)
        self.threads: list[threading.Thread] = []
        self.held: list[str] = []

    def stub(self, client: int) -> Any:
        return self.stubs[client % len(self.stubs)]

    def acquire(self, stub: Any, lease_ttl: float | None = None) -> Any:
        req = self.pb2.AcquireRequest(template=self.cfg.template)
        req.lease_ttl.FromNanoseconds(int((self.cfg.lease_ttl if lease_ttl is None else lease_ttl) * 1e9))
        return stub.Acquire(req, timeout=self.cfg.rpc_timeout)

    def release(self, stub: Any, sandbox_id: str) -> None:
        stub.Release(self.pb2.ReleaseRequest(id=sandbox_id), timeout=self.cfg.rpc_timeout)

    def one(self, client: int) -> Launch:
        stub = self.stub(client)
        t0 = time.monotonic()
        rec = Launch(client=client, start=t0)
        window = self.window
        rec.measured = window is not None and window[0] <= t0 < window[1]
        stage, sandbox = "acquire", None
        try:
            sandbox = self.acquire(stub)
            rec.acquire_s = time.monotonic() - t0
            if self.cfg.ping:
                stage = "ping"
                rec.ping_attempts = self.ping(sandbox.agent.vsock_uds_path, sandbox.agent.port,
                                              t0 + self.cfg.ready_timeout) or 1
                rec.ready_s = time.monotonic() - t0
        except Exception as exc:  # noqa: BLE001 - every failure is counted by its code
            rec.error = f"{stage}/{_code(exc)}"
        if sandbox is not None:
            t1 = time.monotonic()
            try:
                self.release(stub, sandbox.id)
                rec.release_s = time.monotonic() - t1
            except Exception as exc:  # noqa: BLE001
                rec.error = rec.error or f"release/{_code(exc)}"
        rec.end = time.monotonic()
        return rec

    def loop(self, client: int) -> None:
        while not self.stop.is_set():
            self.pacer.wait()
            if self.stop.is_set():
                return
            rec = self.one(client)
            with self.lock:
                self.launches.append(rec)

    def start(self) -> None:
        for i in range(self.cfg.clients):
            t = threading.Thread(target=self.loop, args=(i,), name=f"ember-load-{i}", daemon=True)
            t.start()
            self.threads.append(t)

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(self.cfg.rpc_timeout * 2 + self.cfg.ready_timeout)

    def hold(self, n: int) -> None:
        """Acquire `n` sandboxes and keep them (released by `release_held`).

        Their lease outlives the whole run (a reaped one would make its release NOT_FOUND).
        """
        lease = max(self.cfg.lease_ttl, self.cfg.warmup + self.cfg.duration + 300.0)
        for _ in range(n):
            sandbox = self.acquire(self.stubs[0], lease)
            self.held.append(sandbox.id)
            if self.cfg.ping:
                self.ping(sandbox.agent.vsock_uds_path, sandbox.agent.port,
                          time.monotonic() + self.cfg.ready_timeout)

    def release_held(self) -> list[str]:
        """Release what `hold` kept; the errors, as codes."""
        errors = []
        for sid in self.held:
            try:
                self.release(self.stubs[0], sid)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"release-held/{_code(exc)}")
        self.held.clear()
        return errors

    def pools(self) -> list[dict[str, Any]]:
        from poolsvc.client_cli import pool_dict

        try:
            resp = self.stubs[0].ListPools(self.pb2.ListPoolsRequest(), timeout=self.cfg.rpc_timeout)
        except Exception:  # noqa: BLE001 - informational only
            return []
        return [pool_dict(p) for p in resp.pools]

    def close(self) -> None:
        for ch in self.channels:
            ch.close()


# ---- the host: VMM processes, memory, CPU ---------------------------------------------------


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _pid_file_pids(root: str) -> set[int]:
    """Pids named by the pool launcher's pid files, ``<root>/<vm id>/vmm.pid``."""
    pids = set()
    try:
        names = os.listdir(root)
    except OSError:
        return pids
    for vm_dir in names:
        doc = _read(os.path.join(root, vm_dir, "vmm.pid"))
        try:
            pid = json.loads(doc)["pid"] if doc else None
        except (ValueError, KeyError, TypeError):
            pid = None
        if isinstance(pid, int) and pid > 0:
            pids.add(pid)
    return pids


def find_vmms(root: str | Path | None = None, proc: str = "/proc") -> list[int]:
    """Pids of ember-vmm processes (comm ``ember-vmm``, or ``vmm.main`` in the command line); with
    `root`, only those whose working directory (or command line) is under it, or that a pid
    file under it names (a jailed VMM's working directory is its chroot's ``/``)."""
    want = os.path.realpath(root) if root is not None else None
    listed = _pid_file_pids(want) if want is not None else set()
    pids = []
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        comm = _read(f"{proc}/{name}/comm")
        if comm is None:
            continue
        cmdline = _read(f"{proc}/{name}/cmdline") or b""
        args = cmdline.split(b"\0")
        if comm.strip() != _VMM_COMM.encode() and b"vmm.main" not in args:
            continue
        if want is not None:
            try:
                cwd = os.readlink(f"{proc}/{name}/cwd")
            except OSError:
                cwd = ""
            if not (cwd == want or cwd.startswith(want + "/")) and want.encode() not in cmdline \
                    and int(name) not in listed:
                continue
        pids.append(int(name))
    return pids


@dataclass(frozen=True)
class VmmOverhead:
    """One VMM process's memory (bytes) and how its guest memory was found."""

    pid: int
    rss: int
    pss: int
    guest_rss: int
    guest_pss: int
    guest: str  # "vm.mem" path, "anonymous", or "none"

    @property
    def overhead_rss(self) -> int:
        return self.rss - self.guest_rss

    @property
    def overhead_pss(self) -> int:
        return self.pss - self.guest_pss


def _maps_paths(pid: int) -> list[str]:
    data = _read(f"/proc/{pid}/maps")
    if data is None:
        return []
    out = []
    for line in data.decode(errors="replace").splitlines():
        parts = line.split(None, 5)
        if len(parts) > 5:
            out.append(parts[5].strip())
    return out


def _anonymous_guest(pid: int) -> VmmOverhead | None:
    """Totals of `pid` with its largest anonymous mapping (>= 16 MiB) counted as guest memory."""
    data = _read(f"/proc/{pid}/smaps")
    if data is None:
        return None
    maps: list[dict[str, int]] = []
    for line in data.decode(errors="replace").splitlines():
        head = line.split(None, 1)[0] if line else ""
        if "-" in head and not head.endswith(":"):
            parts = line.split(None, 5)
            start, end = (int(x, 16) for x in parts[0].split("-"))
            maps.append({"size": end - start, "anon": int(len(parts) <= 5 or parts[5].startswith("[anon")),
                         "Rss": 0, "Pss": 0})
        elif maps and head in ("Rss:", "Pss:"):
            maps[-1][head[:-1]] += int(line.split()[1]) * 1024
    anon = [m for m in maps if m["anon"] and m["size"] >= _MIN_GUEST_MAPPING]
    guest = max(anon, key=lambda m: m["size"]) if anon else {"Rss": 0, "Pss": 0}
    return VmmOverhead(pid, sum(m["Rss"] for m in maps), sum(m["Pss"] for m in maps),
                       guest["Rss"], guest["Pss"], "anonymous" if anon else "none")


def vmm_overhead(pid: int) -> VmmOverhead | None:
    """`pid`'s memory with its guest memory counted apart; None if the process is gone."""
    from poolsvc.launcher import LauncherError, vmm_memory

    mem_file = next((p for p in _maps_paths(pid) if os.path.basename(p) == "vm.mem"), None)
    if mem_file is None:
        return _anonymous_guest(pid)
    try:
        m = vmm_memory(pid, mem_file)
    except LauncherError:
        return None
    return VmmOverhead(pid, m.rss, m.pss, m.guest_rss, m.guest_pss, mem_file)


def host_mem_used(meminfo: str = "/proc/meminfo") -> int:
    """MemTotal - MemAvailable, bytes."""
    fields = {}
    with open(meminfo) as f:
        for line in f:
            key, _, rest = line.partition(":")
            fields[key] = int(rest.split()[0]) * 1024
    return fields["MemTotal"] - fields["MemAvailable"]


@dataclass(frozen=True)
class CpuTimes:
    """The aggregate ``cpu`` line of /proc/stat, in clock ticks."""

    busy: int
    total: int

    @classmethod
    def read(cls, stat: str = "/proc/stat") -> CpuTimes:
        with open(stat) as f:
            values = [int(v) for v in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal (guest time is already in user).
        total = sum(values[:8])
        return cls(busy=total - values[3] - values[4], total=total)

    def percent_since(self, before: CpuTimes) -> float:
        dt = self.total - before.total
        return math.nan if dt <= 0 else 100.0 * (self.busy - before.busy) / dt


@dataclass
class VmmSample:
    t: float
    vmms: int
    mem_used: int
    overheads: list[VmmOverhead] = field(default_factory=list)


class VmmSampler:
    """Every `interval` s: count the VMMs, read host memory and up to `max_read` VMMs' smaps."""

    def __init__(self, root: str | None, interval: float, max_read: int) -> None:
        self.root, self.interval, self.max_read = root, interval, max_read
        self.samples: list[VmmSample] = []
        self.cost_s = 0.0  # CPU time spent sampling
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ember-load-sampler", daemon=True)
        self._rng = random.Random(0)

    def __repr__(self) -> str:
        return f"<VmmSampler samples={len(self.samples)}>"

    def sample(self, read_smaps: bool = True) -> VmmSample:
        c0 = time.thread_time()
        pids = find_vmms(self.root)
        s = VmmSample(time.monotonic(), len(pids), host_mem_used())
        if read_smaps:
            for pid in self._rng.sample(pids, min(self.max_read, len(pids))):
                o = vmm_overhead(pid)
                if o is not None:
                    s.overheads.append(o)
        self.cost_s += time.thread_time() - c0
        return s

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append(self.sample())

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# ---- the run and its report --------------------------------------------------------------


def _ms(v: float) -> float:
    return v * 1000.0


def report(cfg: LoadConfig, launches: Sequence[Launch], window: tuple[float, float],
           samples: Sequence[VmmSample] = (), baseline: VmmSample | None = None,
           cpu: dict[str, float] | None = None, extra_failures: Sequence[str] = ()) -> dict[str, Any]:
    """The summary of a run (pure: everything it needs is passed in)."""
    start, stop = window
    measured = [x for x in launches if x.measured]
    ok = [x for x in measured if x.ok]
    completed = [x.end for x in launches if x.ok and start <= x.end < stop]
    acquire = summarize([_ms(x.acquire_s) for x in measured if x.acquire_s is not None])
    ready = summarize([_ms(x.ready_s) for x in ok if x.ready_s is not None])
    release = summarize([_ms(x.release_s) for x in measured if x.release_s is not None])
    failures = Counter(x.error for x in measured if x.error is not None)
    failures.update(extra_failures)
    in_window = [s for s in samples if start <= s.t <= stop] or list(samples)
    procs = [o for s in in_window for o in s.overheads]
    # Restored clones map the template's vm.mem; a VMM without it is still being restored (or was
    # restored some other way): its largest anonymous mapping stands for the guest only if no
    # clone maps a vm.mem, and a VMM with no guest memory at all is not a microVM yet.
    counted = [o for o in procs if o.guest.endswith("vm.mem")] or [o for o in procs if o.guest == "anonymous"]
    rss = [o.overhead_rss / MIB for o in counted]
    pss = [o.overhead_pss / MIB for o in counted]
    peak = max(in_window, key=lambda s: (s.vmms, s.mem_used), default=None)
    per_vmm = None
    if peak is not None and baseline is not None and peak.vmms > baseline.vmms:
        per_vmm = (peak.mem_used - baseline.mem_used) / (peak.vmms - baseline.vmms) / MIB
    guest_kinds = Counter("vm.mem" if o.guest.endswith("vm.mem") else o.guest for o in procs)
    attempts = [x.ping_attempts for x in ok if x.ping_attempts]
    return {
        "addr": cfg.addr, "template": cfg.template, "clients": cfg.clients, "channel": cfg.channel,
        "target_rate": cfg.rate, "duration_s": stop - start, "warmup_s": cfg.warmup, "hold": cfg.hold,
        "ping": cfg.ping,
        "launches": len(completed),
        "launches_per_s": len(completed) / (stop - start),
        "rate_series": rate_series(completed, start, stop, cfg.bucket),
        "acquire_p50_ms": acquire["p50"], "acquire_p90_ms": acquire["p90"], "acquire_p99_ms": acquire["p99"],
        "acquire_ms": acquire,
        "ready_p50_ms": ready["p50"], "ready_p99_ms": ready["p99"], "ready_ms": ready,
        "ping_attempts_p50": percentile(attempts, 50) if attempts else math.nan,
        "ping_attempts_max": max(attempts, default=0),
        "release_p50_ms": release["p50"], "release_ms": release,
        "failures": sum(failures.values()),
        "failures_by_code": dict(sorted(failures.items())),
        "overhead_rss_mib": percentile(rss, 50) if rss else math.nan,
        "overhead_pss_mib": percentile(pss, 50) if pss else math.nan,
        "overhead_rss_mib_max": max(rss) if rss else math.nan,
        "overhead_pss_mib_max": max(pss) if pss else math.nan,
        "overhead_samples": len(rss),
        "overhead_guest_mapping": dict(guest_kinds),
        "vmms_before": baseline.vmms if baseline is not None else None,
        "vmms_peak": peak.vmms if peak is not None else None,
        "host_mem_per_vmm_mib": per_vmm,
        **(cpu or {}),
    }


def run(cfg: LoadConfig, *, ping: Callable[[str, int, float], int | None] = agent_ping,
        log: Callable[[str], None] = lambda s: None) -> tuple[dict[str, Any], list[Launch]]:
    """Drive the service per `cfg`; the report and every launch."""
    clients = _Clients(cfg, ping)
    sampler = VmmSampler(cfg.root, cfg.sample_interval, cfg.sample_max)
    try:
        pools_before = clients.pools()
        baseline = sampler.sample(read_smaps=False)
        clients.start()
        if cfg.warmup:
            log(f"warm-up: {cfg.warmup:g} s, {cfg.clients} clients")
            time.sleep(cfg.warmup)
        extra: list[str] = []
        if cfg.hold:
            log(f"acquiring {cfg.hold} sandboxes to hold")
            try:
                clients.hold(cfg.hold)
            except Exception as exc:  # noqa: BLE001
                extra.append(f"hold/{_code(exc)}")
        log(f"measuring: {cfg.duration:g} s")
        sampler.start()
        cpu0, own0 = CpuTimes.read(), os.times()
        start = time.monotonic()
        clients.window = (start, start + cfg.duration)
        time.sleep(cfg.duration)
        stop = time.monotonic()
        cpu1, own1 = CpuTimes.read(), os.times()
        sampler.stop()
        clients.window = (start, stop)
        clients.join()
        extra += clients.release_held()
        own = (own1.user + own1.system) - (own0.user + own0.system)
        cpu = {"host_cpu_percent": cpu1.percent_since(cpu0),
               "harness_cpu_percent": 100.0 * own / (stop - start),
               "sampler_cpu_s": sampler.cost_s, "host_cpus": os.cpu_count()}
        with clients.lock:
            launches = list(clients.launches)
        # A launch's `measured` flag was set when it started; `stop` may be a little later than planned.
        doc = report(cfg, launches, (start, stop), sampler.samples, baseline, cpu, extra)
        doc["pools_before"], doc["pools_after"] = pools_before, clients.pools()
        doc["host"] = socket.gethostname()
        return doc, launches
    finally:
        clients.stop.set()
        clients.join()
        clients.release_held()
        clients.close()


# ---- output ------------------------------------------------------------------------------


def _f(v: Any, spec: str = ".2f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def print_summary(r: dict[str, Any], out: Any = sys.stdout) -> None:
    rate = "flat out" if r["target_rate"] is None else f"target {r['target_rate']:g}/s"
    lines = [
        f"ember load: {r['template']} at {r['addr']}, {r['clients']} clients ({r['channel']} channels), "
        f"{rate}, {r['duration_s']:.1f} s" + (f", holding {r['hold']}" if r["hold"] else ""),
        f"  launches/s          {_f(r['launches_per_s'])}   ({r['launches']} launches)",
        f"  acquire ms          p50 {_f(r['acquire_p50_ms'])}  p90 {_f(r['acquire_p90_ms'])}  "
        f"p99 {_f(r['acquire_p99_ms'])}  max {_f(r['acquire_ms']['max'])}",
        f"  agent ready ms      p50 {_f(r['ready_p50_ms'])}  p99 {_f(r['ready_p99_ms'])}  "
        f"(PINGs until PONG: p50 {_f(r['ping_attempts_p50'], '.0f')}, max {r['ping_attempts_max']})",
        f"  release ms          p50 {_f(r['release_p50_ms'])}",
        f"  failures            {r['failures']}"
        + ("  " + ", ".join(f"{k}: {v}" for k, v in r["failures_by_code"].items()) if r["failures"] else ""),
        f"  VMM overhead MiB    RSS-guest {_f(r['overhead_rss_mib'])} (max {_f(r['overhead_rss_mib_max'])})  "
        f"PSS-guest {_f(r['overhead_pss_mib'])} (max {_f(r['overhead_pss_mib_max'])})  "
        f"[{r['overhead_samples']} process samples]",
        f"  host MiB per VMM    {_f(r['host_mem_per_vmm_mib'])}  (VMMs {r['vmms_before']} -> {r['vmms_peak']})",
        f"  CPU                 host {_f(r.get('host_cpu_percent'), '.0f')}% of {r.get('host_cpus')} cores, "
        f"harness {_f(r.get('harness_cpu_percent'), '.0f')}% of one",
    ]
    print("\n".join(lines), file=out)


def _jsonable(v: Any) -> Any:
    """NaN as null (JSON has no NaN)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def write_outputs(out_dir: Path, r: dict[str, Any], launches: Sequence[Launch]) -> tuple[Path, Path]:
    """``load-<template>-<time>.json`` (report + raw launches) and ``.png`` in `out_dir`."""
    from bench.plot_png import load_plot

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"load-{r['template']}-{time.strftime('%Y%m%dT%H%M%S')}"
    t0 = min((x.start for x in launches), default=0.0)
    raw = [asdict(x) | {"start": x.start - t0, "end": x.end - t0} for x in launches]
    js = out_dir / f"{stem}.json"
    js.write_text(json.dumps(_jsonable(r | {"launch_records": raw}), indent=1) + "\n")
    png = out_dir / f"{stem}.png"
    lat = [_ms(x.acquire_s) for x in launches if x.measured and x.acquire_s is not None]
    title = (f"EMBER LOAD {r['template']}: {r['clients']} CLIENTS, {r['launches_per_s']:.1f} LAUNCHES/S, "
             f"{r['failures']} FAILURES")
    png.write_bytes(load_plot(lat, r["rate_series"], title=title,
                              markers=[("P50", r["acquire_p50_ms"]), ("P99", r["acquire_p99_ms"])]))
    return js, png


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--addr", default=None, help="the pool service (default: $EMBER_ADDR, else 127.0.0.1:50051)")
    p.add_argument("--template", required=True)
    p.add_argument("--duration", type=float, required=True, help="seconds measured (after the warm-up)")
    p.add_argument("--clients", type=int, default=2, help="concurrent client threads (default 2)")
    p.add_argument("--rate", type=float, default=None, help="target launches/s (default: flat out)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of unrecorded launches first (default 2)")
    p.add_argument("--hold", type=int, default=0, help="sandboxes acquired and kept during the window")
    p.add_argument("--channel", choices=("per-client", "shared"), default="per-client",
                   help="a gRPC channel per client (default) or one for all")
    p.add_argument("--root", default=None,
                   help="only VMMs working under this directory (e.g. $EMBER_HOME/run/default); default all")
    p.add_argument("--no-ping", dest="ping", action="store_false", help="skip the agent ping")
    p.add_argument("--lease-ttl", type=float, default=60.0)
    p.add_argument("--ready-timeout", type=float, default=10.0, help="seconds for the agent's first PONG")
    p.add_argument("--sample-interval", type=float, default=1.0, help="seconds between VMM memory samples")
    p.add_argument("--sample-max", type=int, default=8, help="most VMMs whose smaps one sample reads")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    p.add_argument("--out", type=Path, default=None, help="write the JSON report and a PNG plot here")
    p.add_argument("--tls-ca", default=None, help="speak TLS; the CA of the service's certificate "
                                                  "(default: $EMBER_TLS_CA; none: plaintext)")
    p.add_argument("--token", default=None, help="bearer token (default: $EMBER_TOKEN)")


def main_args(args: argparse.Namespace) -> int:
    from poolsvc.client_cli import service_addr

    try:
        cfg = LoadConfig(addr=service_addr(args.addr), template=args.template, duration=args.duration,
                         clients=args.clients, rate=args.rate, warmup=args.warmup, hold=args.hold,
                         channel=args.channel, root=args.root, ping=args.ping, lease_ttl=args.lease_ttl,
                         ready_timeout=args.ready_timeout, sample_interval=args.sample_interval,
                         sample_max=args.sample_max, bucket=1.0 if args.duration >= 10 else 0.5,
                         tls_ca=args.tls_ca or os.environ.get("EMBER_TLS_CA") or None,
                         token=args.token or os.environ.get("EMBER_TOKEN") or None)
        r, launches = run(cfg, log=lambda s: print(f"ember load: {s}", file=sys.stderr, flush=True))
    except LoadError as exc:
        print(f"ember: {exc}", file=sys.stderr)
        return 1
    if args.out is not None:
        js, png = write_outputs(args.out, r, launches)
        print(f"ember load: wrote {js} and {png}", file=sys.stderr)
    if args.json:
        print(json.dumps(_jsonable(r)))
    else:
        print_summary(r)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return main_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

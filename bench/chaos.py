"""Chaos under load: the pool service keeps answering correctly while its parts are killed.

    python -m bench.chaos --duration S [--seed N] [--clients N] [--rate R] [--min-warm N]
                          [--max-warm N] [--net-cidr CIDR] [--keep] [--json]

One run, everything at once. A fresh ``$EMBER_HOME`` (a short /tmp path:
socket paths must fit sun_path) gets an ``ember serve`` (service id
``chaos<hex>``) with one template, the freestanding test guest in ``agent``
mode, and a warm pool (``--min-warm``/``--max-warm``). Then, for
``--duration`` seconds:

* **load** — `bench.load`'s clients (Acquire -> agent PING -> Release,
  ``--clients`` threads sharing ``--rate`` launches/s). Every Acquire is
  recorded with the sandbox id and the client that held it, from the reply
  until its Release was sent; a PING must be answered PONG ``testguest``
  through the vsock socket *of that sandbox* (its run directory);
* **a side lab** (one thread) — restores the template's snapshot from a
  chunk store (``ember snapshot put``) through ``ember page-server --snapshot``
  into its own ``ember-vmm`` (``PUT /snapshot/load``, Uffd backend, half of
  the page servers checking chunks against the snapshot's signature), pings
  the guest, kills the VMM, again and again;
* **the chaos thread** — every 0.5-2 s (seeded random; the first actions are
  one of each kind, shuffled) one of:
    - ``kill_vmm``: SIGKILL a random VMM of the service, warm or leased
      (found by its command line ``--id`` under the service's run directory);
    - ``kill_page_server``: SIGKILL the lab's page server while it serves a
      running VM: that VM must exit with an error within 20 s (no hang, and
      no running on zero pages);
    - ``corrupt_chunk``: flip bytes of a stored chunk the guest touches (from
      the snapshot's recorded working set): ``ember snapshot verify`` must
      name it, a restore through the page server must fail (the page server
      refuses the chunk and stops the VM), and after ``snapshot rm`` +
      ``gc`` + ``put`` the store must verify clean again;
    - ``full_disk``: a VM of the lab (File backend) is paused and snapshotted
      (``PUT /snapshot/create``) into a tmpfs the run mounts, filled so that
      less room is left than the snapshot needs: the create must fail with a
      4xx ``fault_message``, leave no file, and the VM must resume and answer;
    - ``restart_service``: SIGKILL the service process (only it: its zygote
      and VMMs outlive it, as after a crash) and start it again on the same
      run directory and address; its crash recovery must clean up the old
      VMMs. Pool settings are not persisted: the run sets the pool again, as
      an operator would. Clients see UNAVAILABLE meanwhile and go on.

Correctness. A failed launch is *expected* only when chaos explains it:
UNAVAILABLE while the service was down; a failed PING, or a Release answered
NOT_FOUND/UNAVAILABLE, when the sandbox's VMM was killed during the lease or
the service restarted during it; an Acquire failing while VMMs are being
killed with a code in `_ACQUIRE_CODES_UNDER_KILLS`. Everything else is
``unexpected``. No sandbox id may be handed out twice (``handed_out_twice``),
let alone to two clients at once (``concurrent_holders``).

After the window: the load stops, the pool must refill to ``min_warm``, every
VMM and run directory must belong to a sandbox the service lists, ``ember
snapshot verify`` must be clean, and the service is stopped (SIGTERM, drain).
Then *nothing* may be left (``leftovers``): no process naming the run's home
(VMMs, zygote, page servers), no file under the run directory or on the
tmpfs, no mount under the home, no network namespace or link named after the
service, and no cgroup or network namespace that one of the run's processes
was seen in (sampled from /proc/PID/cgroup and /proc/PID/ns/net while it
ran) and that was not the run's own at the start. The last rule needs no
knowledge of how the jailer or the network slots name things.

The JSON report holds the counts (``python -m bench.chaos --json``);
`run(ChaosConfig(...))` returns the same dict (tests call it). ``ok`` is
true when there was nothing unexpected, no problem, every kind of chaos
happened at least once and every leftover count is zero.

bench/ drives the VMM and the service as programs; it never imports vmm/.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import queue
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import load

__all__ = [
    "ChaosConfig",
    "ChaosError",
    "Attempt",
    "Ledger",
    "CHAOS_KINDS",
    "classify",
    "lease_conflicts",
    "run",
    "main",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
CHAOS_KINDS = ("kill_vmm", "kill_page_server", "corrupt_chunk", "full_disk", "restart_service")
#: Relative weights of the actions after the first round (service restarts are slow: rarer).
DEFAULT_WEIGHTS = {"kill_vmm": 6, "kill_page_server": 2, "corrupt_chunk": 1, "full_disk": 2, "restart_service": 1}
#: Acquire status codes a client may see while VMMs are being killed (the VMM it was to get died).
_ACQUIRE_CODES_UNDER_KILLS = ("UNAVAILABLE", "ABORTED", "INTERNAL")
TEMPLATE = "tg"
AGENT_NAME = "testguest"
_VMM_COMM = "ember-vmm"
#: Seconds after a chaos event during which a failure it explains is expected.
_SLACK = 2.0


class ChaosError(Exception):
    """The chaos run could not be set up."""


# ---- the pure part: what happened, and which failures chaos explains ---------------------------


@dataclass
class Attempt:
    """One launch of the load harness, with the sandbox it got (monotonic seconds)."""

    client: int
    start: float
    epoch: int  # the service's generation when the launch started
    end: float = math.nan
    vm_id: str | None = None
    acquired: float | None = None
    release_sent: float | None = None
    acquire_code: str | None = None
    release_code: str | None = None
    error: str | None = None  # bench.load's "<stage>/<code>" (the first failure)

    @property
    def held_until(self) -> float:
        return self.release_sent if self.release_sent is not None else self.end


@dataclass
class Ledger:
    """What the chaos did and when: service generations, down windows, killed sandboxes."""

    #: [down_from, up_at) per service restart; up_at is inf while it is down.
    down: list[list[float]] = field(default_factory=list)
    #: sandbox id -> times its VMM was killed.
    killed: dict[str, list[float]] = field(default_factory=dict)
    #: times any VMM of the service was killed.
    kill_times: list[float] = field(default_factory=list)
    epoch: int = 0

    def __repr__(self) -> str:
        return f"<Ledger epoch={self.epoch} restarts={len(self.down)} vmm_kills={len(self.kill_times)}>"

    def service_killed(self, t: float) -> None:
        self.down.append([t, math.inf])
        self.epoch += 1

    def service_up(self, t: float) -> None:
        self.down[-1][1] = t

    def vmm_killed(self, vm_id: str, t: float) -> None:
        self.killed.setdefault(vm_id, []).append(t)
        self.kill_times.append(t)

    def down_during(self, a: float, b: float) -> bool:
        """The service was down (or just back: clients reconnect) at some moment of [a, b]."""
        return any(lo <= b and a <= hi + _SLACK for lo, hi in self.down)

    def restarted_during(self, a: float, b: float) -> bool:
        return any(a <= lo <= b for lo, _ in self.down)

    def vmm_killed_during(self, vm_id: str, a: float, b: float) -> bool:
        return any(a - _SLACK <= t <= b for t in self.killed.get(vm_id, ()))

    def any_kill_during(self, a: float, b: float) -> bool:
        return any(a - _SLACK <= t <= b for t in self.kill_times)


def classify(a: Attempt, ledger: Ledger) -> str:
    """``ok``, an expected failure's kind, or ``unexpected: ...`` (pure)."""
    if a.error is None:
        return "ok"
    stage = a.error.split("/", 1)[0]
    if stage == "acquire":
        if a.acquire_code == "UNAVAILABLE" and ledger.down_during(a.start, a.end):
            return "acquire_unavailable_service_down"
        if a.acquire_code in _ACQUIRE_CODES_UNDER_KILLS and ledger.any_kill_during(a.start, a.end):
            return f"acquire_{a.acquire_code.lower()}_vmm_killed"
        return f"unexpected: {a.error} ({a.acquire_code})"
    if a.vm_id is None or a.acquired is None:
        return f"unexpected: {a.error} without a sandbox"
    lost_vmm = ledger.vmm_killed_during(a.vm_id, a.acquired, a.end)
    lost_service = ledger.restarted_during(a.acquired, a.end)
    if stage == "ping":
        if "WrongAnswer" in a.error:
            return f"unexpected: {a.error}"
        if lost_vmm:
            return "ping_failed_vmm_killed"
        if lost_service:
            return "ping_failed_service_restarted"
        return f"unexpected: {a.error}"
    if stage == "release":
        if a.release_code in ("NOT_FOUND", "UNAVAILABLE") and (lost_vmm or lost_service):
            return f"release_{a.release_code.lower()}_after_loss"
        if a.release_code == "UNAVAILABLE" and ledger.down_during(a.release_sent or a.end, a.end):
            return "release_unavailable_service_down"
        return f"unexpected: {a.error}"
    return f"unexpected: {a.error}"


def release_after_failure(a: Attempt, ledger: Ledger) -> str | None:
    """For a launch that failed before Release: the Release's own failure kind (None: it succeeded
    or was expected to fail as it did). ``unexpected: ...`` if chaos does not explain it."""
    if a.release_code is None or (a.error or "").startswith("release/"):
        return None
    lost = (a.vm_id is not None and a.acquired is not None
            and (ledger.vmm_killed_during(a.vm_id, a.acquired, a.end) or ledger.restarted_during(a.acquired, a.end)))
    if a.release_code in ("NOT_FOUND", "UNAVAILABLE") and lost:
        return None
    if a.release_code == "UNAVAILABLE" and ledger.down_during(a.release_sent or a.end, a.end):
        return None
    return f"unexpected: release/{a.release_code} after {a.error}"


def lease_conflicts(attempts: Iterable[Attempt]) -> tuple[int, int, list[str]]:
    """(ids handed out more than once, pairs of leases of one id held at once by two clients, details)."""
    by_id: dict[str, list[Attempt]] = {}
    for a in attempts:
        if a.vm_id is not None and a.acquired is not None:
            by_id.setdefault(a.vm_id, []).append(a)
    twice = concurrent = 0
    details = []
    for vm_id, leases in sorted(by_id.items()):
        if len(leases) < 2:
            continue
        twice += 1
        leases.sort(key=lambda x: x.acquired or 0.0)
        for i, x in enumerate(leases):
            for y in leases[i + 1:]:
                if y.acquired is not None and y.acquired < x.held_until and x.client != y.client:
                    concurrent += 1
                    details.append(f"{vm_id}: client {x.client} held it (epoch {x.epoch}) when client "
                                   f"{y.client} got it (epoch {y.epoch})")
        details.append(f"{vm_id} handed out {len(leases)} times (epochs {[x.epoch for x in leases]})")
    return twice, concurrent, details


# ---- processes and the host -----------------------------------------------------------------


def _env(home: Path) -> dict[str, str]:
    return dict(os.environ, EMBER_HOME=str(home), PYTHONUNBUFFERED="1",
                PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p))


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    parts = [p.decode(errors="replace") for p in raw.split(b"\0") if p]
    if len(parts) == 1:  # setproctitle may leave one space-separated string
        parts = parts[0].split()
    return parts


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill(pid: int, sig: int = signal.SIGKILL) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def _vmm_id(pid: int) -> str | None:
    """The ``--id`` of an ember-vmm process (comm ``ember-vmm``, or ``vmm.main`` in its command line)."""
    argv = _cmdline(pid)
    try:
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
    except OSError:
        return None
    if (comm == _VMM_COMM or "vmm.main" in argv) and "--id" in argv[:-1]:
        return argv[argv.index("--id") + 1]
    return None


def service_vmms(run_dir: Path, ids: Iterable[str] = ()) -> dict[int, str]:
    """pid -> sandbox id of the ember-vmm processes of the service of `run_dir`: those whose ``--id``
    names a directory of the run directory (or one of `ids`), jailed or not, or that work under it."""
    known = set(ids)
    under = set(load.find_vmms(run_dir))
    out = {}
    for pid in _pids():
        vm_id = _vmm_id(pid)
        if vm_id is not None and _alive(pid) and (
                pid in under or vm_id in known or ("/" not in vm_id and (run_dir / vm_id).is_dir())):
            out[pid] = vm_id
    return out


def processes_naming(path: Path, *words: str) -> dict[int, str]:
    """pid -> command line of every process (not this one) whose command line or cwd names `path`,
    or whose command line holds one of `words` (a service id: the service's own command line
    names no path of its home)."""
    needle = str(path)
    out = {}
    for pid in _pids():
        if pid == os.getpid():
            continue
        argv = _cmdline(pid)
        text = " ".join(argv)
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            cwd = ""
        if (needle in text or cwd == needle or cwd.startswith(needle + "/")
                or any(w in argv for w in words)):
            if _alive(pid):
                out[pid] = text[:200]
    return out


def mounts_under(path: Path) -> list[str]:
    """Mount points at or under `path` (/proc/self/mountinfo, field 5)."""
    prefix = str(path)
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            target = line.split()[4].replace("\\040", " ")
            if target == prefix or target.startswith(prefix + "/"):
                out.append(target)
    return out


def files_under(path: Path) -> list[str]:
    """Every file and directory below `path` (not `path` itself), relative."""
    if not path.exists():
        return []
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def _ip(*args: str) -> list[str]:
    try:
        out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return out.stdout.splitlines()


def netns_names() -> set[str]:
    return {line.split()[0] for line in _ip("netns", "list") if line.strip()}


def link_names() -> set[str]:
    out = set()
    for line in _ip("-o", "link", "show"):
        parts = line.split(":", 2)
        if len(parts) >= 2:
            out.add(parts[1].strip().split("@")[0])
    return out


def _cgroup_mounts() -> list[tuple[str, frozenset[str]]]:
    """(mount point, controllers) of every cgroup hierarchy; cgroup2 has the empty set."""
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 4 and parts[2] in ("cgroup", "cgroup2"):
                opts = frozenset(o for o in parts[3].split(",")) if parts[2] == "cgroup" else frozenset()
                out.append((parts[1], opts))
    return out


def process_cgroups(pid: int | str) -> set[str]:
    """The cgroup directories `pid` is in (one per hierarchy), as host paths."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return set()
    mounts = _cgroup_mounts()
    out = set()
    for line in lines:
        hid, ctrls, path = line.split(":", 2)
        want = frozenset(c for c in ctrls.split(",") if c)
        for mount, opts in mounts:
            if (not want and not opts and hid == "0") or (want and want <= opts):
                out.add(os.path.normpath(mount + "/" + path.lstrip("/")))
                break
    return out


def all_cgroup_dirs(max_depth: int = 8) -> set[str]:
    """Every directory of every cgroup hierarchy (down to `max_depth` levels)."""
    out = set()
    for mount, _ in _cgroup_mounts():
        for dirpath, dirnames, _files in os.walk(mount):
            if dirpath.count("/") - mount.count("/") >= max_depth:
                dirnames.clear()
            out.add(dirpath)
    return out


def netns_inode(pid: int | str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def netns_by_inode() -> dict[int, str]:
    out = {}
    try:
        names = os.listdir("/run/netns")
    except OSError:
        return out
    for name in names:
        try:
            out[os.stat(f"/run/netns/{name}").st_ino] = name
        except OSError:
            continue
    return out


class Footprint:
    """Samples the cgroups and network namespaces the run's processes are in (besides its own),
    and the sandbox ids of the service's run directory."""

    def __init__(self, home: Path, service_id: str, run_dir: Callable[[], Path], interval: float = 1.0) -> None:
        self.home, self.service_id, self.run_dir = home, service_id, run_dir
        self.vm_ids: set[str] = set()
        self.interval = interval
        self.own_cgroups = process_cgroups("self")
        #: Every cgroup directory that existed before the run: none of them can be its leftover.
        self.cgroups_before = all_cgroup_dirs()
        self.own_netns = netns_inode("self")
        self.cgroups: set[str] = set()
        self.netns: set[str] = set()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-footprint", daemon=True)

    def __repr__(self) -> str:
        return f"<Footprint samples={self.samples} cgroups={len(self.cgroups)} netns={len(self.netns)}>"

    def processes(self) -> dict[int, str]:
        """The run's processes: naming its home or service id, or an ember-vmm of one of its sandboxes."""
        run_dir = self.run_dir()
        try:
            self.vm_ids |= {p.name for p in run_dir.iterdir() if p.is_dir()}
        except OSError:
            pass
        procs = processes_naming(self.home, self.service_id)
        for pid, vm_id in service_vmms(run_dir, self.vm_ids).items():
            procs.setdefault(pid, f"ember-vmm --id {vm_id}")
        return procs

    def sample(self) -> None:
        names = None
        for pid in self.processes():
            self.cgroups |= process_cgroups(pid) - self.own_cgroups
            ino = netns_inode(pid)
            if ino is not None and ino != self.own_netns:
                names = names if names is not None else netns_by_inode()
                if ino in names:
                    self.netns.add(names[ino])
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except OSError:
                continue

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join()


# ---- the service ------------------------------------------------------------------------------


class ServiceProcess:
    """`ember serve` in a subprocess that can be SIGKILLed and started again on the same run directory."""

    def __init__(self, home: Path, service_id: str, extra: Sequence[str] = ()) -> None:
        self.home, self.service_id = home, service_id
        self.addr = f"127.0.0.1:{load_free_port()}"
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None
        self.run_dir = home / "run" / service_id
        self.starts = 0
        self.log_path = home / "serve.log"

    def __repr__(self) -> str:
        return f"<ServiceProcess {self.addr} pid={self.proc.pid if self.proc else None} starts={self.starts}>"

    def start(self, timeout: float = 120.0) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "poolsvc.cli", "serve", "--listen", self.addr, "--service-id",
                 self.service_id, "--metrics-listen", "127.0.0.1:0", *self.extra],
                cwd=REPO_ROOT, env=_env(self.home), stdout=subprocess.PIPE, stderr=log)
        assert self.proc.stdout is not None
        line = self._first_line(timeout)
        if not line.startswith(b"{"):
            self.kill()
            raise ChaosError(f"ember serve did not start: {line!r}\n{self.log_tail()}")
        self.run_dir = Path(json.loads(line)["run_dir"])
        self.starts += 1
        threading.Thread(target=_drain, args=(self.proc.stdout,), daemon=True, name="chaos-serve-stdout").start()

    def _first_line(self, timeout: float) -> bytes:
        box: list[bytes] = []
        assert self.proc is not None and self.proc.stdout is not None
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        return box[0] if box else b""

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the service process alone (a crash: its zygote and VMMs outlive it)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def terminate(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (a graceful stop drains every VMM); its exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None


def _drain(stream: Any) -> None:
    """Read `stream` until EOF (a service that prints more than its first line never blocks)."""
    while stream.read(65536):
        pass


def load_free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Rpc:
    """A gRPC channel + stub to the service (one per thread that needs it)."""

    def __init__(self, addr: str) -> None:
        import grpc

        from poolsvc import proto

        self.pb2, pb2_grpc = proto.load()
        self.channel = grpc.insecure_channel(addr, options=_CHANNEL_OPTIONS)
        self.stub = pb2_grpc.PoolServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()


#: Clients reconnect quickly after the service restarts (gRPC's default backoff grows to 120 s).
_CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 1000)]


# ---- the load, recorded -----------------------------------------------------------------------


class WrongAnswer(Exception):
    """The sandbox's agent socket answered, but not as this sandbox's agent."""


class _RecordingClients(load._Clients):
    """bench.load's clients, recording which sandbox each launch held and how its calls ended."""

    def __init__(self, cfg: load.LoadConfig, epoch: Callable[[], int], run_dir: Callable[[], Path]) -> None:
        super().__init__(cfg, self._ping)
        import grpc

        from poolsvc import proto

        # Channels that reconnect within a second once the service is back.
        self.close()
        options = [("grpc.use_local_subchannel_pool", 1), *_CHANNEL_OPTIONS]
        _, pb2_grpc = proto.load()
        self.channels = [grpc.insecure_channel(cfg.addr, options=options) for _ in range(cfg.clients)]
        self.stubs = [pb2_grpc.PoolServiceStub(ch) for ch in self.channels]
        self.epoch = epoch
        self.run_dir = run_dir
        self.attempts: list[Attempt] = []
        self._local = threading.local()

    def _ping(self, uds_path: str, port: int, deadline: float) -> int:
        from poolsvc.agent import AgentClient, AgentConnectionError, AgentTimeout

        cur: Attempt = self._local.cur
        if cur.vm_id is None or cur.vm_id not in Path(uds_path).parts:
            raise WrongAnswer(f"sandbox {cur.vm_id}'s agent is at {uds_path}")
        attempts = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise load.AgentNotReady(f"no PONG from {uds_path} after {attempts} attempts")
            attempts += 1
            try:
                name = AgentClient(uds_path, port, timeout=left).ping()
            except (AgentConnectionError, AgentTimeout):
                time.sleep(0.005)
                continue
            if name != AGENT_NAME:
                raise WrongAnswer(f"{uds_path} answered PONG {name!r}")
            return attempts

    def acquire(self, stub: Any) -> Any:
        cur: Attempt = self._local.cur
        try:
            sandbox = super().acquire(stub)
        except Exception as exc:
            cur.acquire_code = load._code(exc)
            raise
        cur.vm_id, cur.acquired = sandbox.id, time.monotonic()
        return sandbox

    def release(self, stub: Any, sandbox_id: str) -> None:
        cur: Attempt = self._local.cur
        cur.release_sent = time.monotonic()
        try:
            super().release(stub, sandbox_id)
        except Exception as exc:
            cur.release_code = load._code(exc)
            raise

    def one(self, client: int) -> load.Launch:
        cur = self._local.cur = Attempt(client=client, start=time.monotonic(), epoch=self.epoch())
        rec = super().one(client)
        cur.end, cur.error = rec.end, rec.error
        with self.lock:
            self.attempts.append(cur)
        return rec


# ---- the side lab: page servers, corrupted chunks, a full disk -----------------------------------


class _Vmm:
    """A bare `ember-vmm` of the lab (`python -m vmm.main`), its console and log in `work`."""

    def __init__(self, work: Path, vm_id: str, netns: str | None = None) -> None:
        from poolsvc.vmm_client import VmmClient

        work.mkdir(parents=True, exist_ok=True)
        wrapper = ["ip", "netns", "exec", netns] if netns else []
        self.work, self.vm_id = work, vm_id
        self.api_sock, self.vsock = work / "api.sock", work / "v.sock"
        self.log_path = work / "vmm.log"
        with open(work / "console.log", "wb") as out, open(self.log_path, "wb") as err:
            self.proc = subprocess.Popen([*wrapper, sys.executable, "-m", "vmm.main", "--api-sock", str(self.api_sock),
                                          "--id", vm_id], cwd=work, env=_env(work), stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=err, start_new_session=True)
        self.api = VmmClient(self.api_sock, timeout=30.0)
        self.api.wait_until_listening(60.0, alive=lambda: self.proc.poll() is None)

    def __repr__(self) -> str:
        return f"<Vmm {self.vm_id} pid={self.proc.pid} rc={self.proc.poll()}>"

    def load(self, state: Path, backend: str, path: Path, resume: bool = True) -> None:
        self.api.put("/snapshot/load", {"snapshot_path": str(state),
                                        "mem_backend": {"backend_type": backend, "backend_path": str(path)},
                                        "resume_vm": resume, "vsock_override": {"uds_path": str(self.vsock)}})

    def ping(self, timeout: float = 15.0) -> str:
        from poolsvc.agent import AgentClient, AgentConnectionError, AgentTimeout

        deadline = time.monotonic() + timeout
        while True:
            try:
                return AgentClient(str(self.vsock), 52, timeout=max(0.1, deadline - time.monotonic())).ping()
            except (AgentConnectionError, AgentTimeout):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.01)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-1500:]
        except OSError:
            return ""

    def close(self) -> None:
        self.api.close()
        if self.proc.poll() is None:
            _kill(self.proc.pid)
        self.proc.wait()
        shutil.rmtree(self.work, ignore_errors=True)


class _PageServer:
    """`ember page-server --snapshot ID --store DIR` (optionally checking chunks against the signature)."""

    def __init__(self, sock: Path, store: Path, snapshot_id: str, home: Path, key_file: Path | None) -> None:
        self.sock = sock
        self.keyed = key_file is not None
        args = ["--key-file", str(key_file)] if key_file is not None else []
        self.proc = subprocess.Popen([sys.executable, "-m", "poolsvc.cli", "page-server", "--socket", str(sock),
                                      "--snapshot", snapshot_id, "--store", str(store), *args],
                                     cwd=REPO_ROOT, env=_env(home), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)
        self.events: list[dict[str, Any]] = []
        self.stderr = bytearray()
        self._cond = threading.Condition()
        threading.Thread(target=self._read_events, daemon=True, name="chaos-ps-out").start()
        threading.Thread(target=self._read_err, daemon=True, name="chaos-ps-err").start()
        deadline = time.monotonic() + 60
        while not self.listening():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ChaosError(f"page server did not start: {self.stderr.decode(errors='replace')[-2000:]}")
            time.sleep(0.02)

    def __repr__(self) -> str:
        return f"<PageServer pid={self.proc.pid} keyed={self.keyed} events={len(self.events)}>"

    def _read_events(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.extend(line)

    def listening(self) -> bool:
        with self._cond:
            return any(e.get("event") == "listening" for e in self.events)

    def wait_done(self, pid: int, timeout: float) -> dict[str, Any] | None:
        """The vm-done (or vm-refused) event of VMM `pid`, waiting up to `timeout` s."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for e in self.events:
                    if e.get("event") in ("vm-done", "vm-refused") and e.get("pid") == pid:
                        return e
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    return None
                self._cond.wait(left)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            _kill(self.proc.pid)
            return self.proc.wait()


class Lab:
    """The side loop: Uffd restores from the chunk store, and the chaos that needs a VMM of its own.

    One thread; chaos asks for work with `request(kind)` and never waits for it.
    """

    def __init__(self, home: Path, service_id: str, template_dir: Path, rng: random.Random,
                 log: Callable[[str], None], network: bool = False) -> None:
        self.home, self.rng, self.log = home, rng, log
        self.work = home / "lab"
        self.store = home / "store"
        self.full = home / "full"
        self.state, self.mem = template_dir / "vm.state", template_dir / "vm.mem"
        self.key_file = home / "snapshot.key"
        self.prefix = f"{service_id}-lab"
        #: With network slots the template has a NIC: the lab's VMMs run in a namespace with a tap0.
        self.netns = f"{service_id}-lab" if network else None
        self.counts: Counter[str] = Counter()
        self.problems: list[str] = []
        self.ps: _PageServer | None = None
        self._n = 0
        self._queue: queue.Queue[str] = queue.Queue()
        self._pending: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-lab", daemon=True)
        self.mounted = False

    def __repr__(self) -> str:
        return f"<Lab {dict(self.counts)} problems={len(self.problems)}>"

    # --- setup / teardown ------------------------------------------------------------------

    def setup(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self._cli_ok("snapshot", "put", TEMPLATE, "--state", str(self.state), "--mem", str(self.mem))
        self.full.mkdir(exist_ok=True)
        size = 4 * (self.mem.stat().st_blocks * 512 + self.state.stat().st_size) + (1 << 20)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "chaos-full", str(self.full)],
                       check=True, capture_output=True, timeout=30)
        self.mounted = True
        if self.netns:
            for cmd in (["netns", "add", self.netns], ["-n", self.netns, "tuntap", "add", "dev", "tap0", "mode", "tap"],
                        ["-n", self.netns, "link", "set", "tap0", "up"]):
                subprocess.run(["ip", *cmd], check=True, capture_output=True, timeout=30)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(120)
        if self.ps is not None:
            self.ps.stop()
            self.ps = None

    def unmount(self) -> None:
        """Unmount the tmpfs and remove the lab's network namespace."""
        if self.mounted:
            subprocess.run(["umount", str(self.full)], capture_output=True, timeout=30)
            self.mounted = False
        if self.netns and self.netns in netns_names():
            subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, timeout=30)

    def request(self, kind: str) -> bool:
        """Queue one piece of chaos (False if one of that kind is already waiting)."""
        if kind in self._pending:
            return False
        self._pending.add(kind)
        self._queue.put(kind)
        return True

    # --- the loop --------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                kind = self._queue.get(timeout=0.05)
            except queue.Empty:
                kind = "restore"
            self._pending.discard(kind)
            try:
                getattr(self, f"_do_{kind}")()
            except Exception as exc:  # noqa: BLE001 - recorded; the lab goes on
                self.problems.append(f"lab {kind}: {type(exc).__name__}: {exc}")
                self.log(f"lab {kind} failed: {exc}")
                time.sleep(0.5)

    def _cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        store = ["--store", str(self.store)] if args[0] == "snapshot" else []
        return subprocess.run([sys.executable, "-m", "poolsvc.cli", *args, *store], cwd=REPO_ROOT,
                              env=_env(self.home), capture_output=True, text=True, timeout=timeout)

    def _cli_ok(self, *args: str) -> str:
        r = self._cli(*args)
        if r.returncode != 0:
            raise ChaosError(f"ember {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()[-500:]}")
        return r.stdout

    def _page_server(self, keyed: bool | None = None) -> _PageServer:
        if self.ps is None or not self.ps.alive():
            if self.ps is not None:
                self.ps.stop()
            self._n += 1
            keyed = self.key_file.exists() and (self.rng.random() < 0.5 if keyed is None else keyed)
            self.ps = _PageServer(self.work / f"ps{self._n}.sock", self.store, TEMPLATE, self.home,
                                  self.key_file if keyed else None)
        return self.ps

    def _vmm(self) -> _Vmm:
        self._n += 1
        return _Vmm(self.work / f"vm{self._n}", f"{self.prefix}{self._n}", self.netns)

    def _uffd_vm(self) -> tuple[_Vmm, _PageServer]:
        ps = self._page_server()
        vm = self._vmm()
        try:
            vm.load(self.state, "Uffd", ps.sock)
        except BaseException:
            vm.close()
            raise
        return vm, ps

    # --- what the lab does ------------------------------------------------------------------

    def _do_restore(self) -> None:
        vm, ps = self._uffd_vm()
        try:
            name = vm.ping()
            if name != AGENT_NAME:
                self.problems.append(f"uffd restore answered {name!r}")
            time.sleep(self.rng.uniform(0.2, 1.0))
            vm.ping(5.0)
            self.counts["uffd_restores"] += 1
        finally:
            vm.close()

    def _do_kill_page_server(self) -> None:
        vm, ps = self._uffd_vm()
        try:
            vm.ping()
            _kill(ps.proc.pid)
            ps.proc.wait()
            self.counts["page_server_kills"] += 1
            try:
                rc = vm.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.counts["vm_hangs_after_page_server_kill"] += 1
                self.problems.append(f"{vm.vm_id} still runs 20 s after its page server was killed:\n{vm.log()}")
                return
            if rc == 0:
                self.problems.append(f"{vm.vm_id} exited 0 after its page server was killed")
            else:
                self.counts["vm_failed_cleanly_after_page_server_kill"] += 1
        finally:
            vm.close()
            self.ps = None

    def _chunk_in_working_set(self) -> bytes | None:
        from snapshot.chunkstore import ChunkStore

        with ChunkStore(self.store) as store:
            runs = store.get_working_set(TEMPLATE)
            if not runs:
                return None
            view = store.open(TEMPLATE)
            digests = []
            for offset, length in runs:
                for off in range(offset, offset + length, view.chunk_size):
                    d = view.locate(off).digest
                    if d is not None and d not in digests:
                        digests.append(d)
            return self.rng.choice(digests) if digests else None

    def _chunk_path(self, digest: bytes) -> Path:
        h = digest.hex()
        return self.store / "chunks" / h[:2] / h[2:]

    def _do_corrupt_chunk(self) -> None:
        digest = self._chunk_in_working_set()
        if digest is None:  # the first restore records the working set
            self._do_restore()
            digest = self._chunk_in_working_set()
            if digest is None:
                raise ChaosError("no working set was recorded for the snapshot")
        path = self._chunk_path(digest)
        data = bytearray(path.read_bytes())
        for pos in self.rng.sample(range(len(data) // 4, len(data)), min(8, len(data) // 2)):
            data[pos] ^= 0xFF
        path.write_bytes(bytes(data))
        self.counts["corruptions"] += 1
        # The store's own check names it.
        r = self._cli("snapshot", "verify", "--json")
        if r.returncode != 0 and digest.hex() in r.stdout:
            self.counts["corruptions_named_by_verify"] += 1
        else:
            self.problems.append(f"snapshot verify missed corrupted chunk {digest.hex()}: {r.stdout[-500:]}")
        # A restore through the page server must fail, not run on wrong memory.
        if self.ps is not None:
            self.ps.stop()
            self.ps = None
        # Odd corruptions meet a page server without the key (the chunk's own checksum must
        # catch it), even ones a page server checking chunks against the signature.
        ps = self._page_server(keyed=self.counts["corruptions"] % 2 == 0)
        vm = self._vmm()
        try:
            try:
                vm.load(self.state, "Uffd", ps.sock)
                answered = vm.ping(10.0) == AGENT_NAME
            except Exception:  # noqa: BLE001 - failing is what should happen
                answered = False
            event = ps.wait_done(vm.proc.pid, 0.5 if answered else 15.0)
            if not answered and vm.proc.poll() is None:
                try:
                    vm.proc.wait(15)
                except subprocess.TimeoutExpired:
                    self.problems.append(f"{vm.vm_id} neither runs nor exits on a corrupted chunk:\n{vm.log()}")
            if event is not None and event.get("end") == "error":
                self.counts["corruptions_refused_by_page_server"] += 1
                self.counts["keyed_refusals" if ps.keyed else "unkeyed_refusals"] += 1
            elif answered:
                self.counts["corruptions_served_undetected"] += 1
                self.problems.append(f"a restore ran on corrupted chunk {digest.hex()} (page server "
                                     f"{'with' if ps.keyed else 'without'} a key): it was served undetected")
            else:
                self.problems.append(f"a restore on corrupted chunk {digest.hex()} failed without the page "
                                     f"server refusing it: {event}\n{vm.log()}")
        finally:
            vm.close()
            ps.stop()
            self.ps = None
        # Repair: forget the snapshot, collect its chunks, store it again.
        self._cli_ok("snapshot", "rm", TEMPLATE)
        self._cli_ok("snapshot", "gc")
        self._cli_ok("snapshot", "put", TEMPLATE, "--state", str(self.state), "--mem", str(self.mem))
        r = self._cli("snapshot", "verify", "--json")
        if r.returncode == 0:
            self.counts["repairs_verified_clean"] += 1
        else:
            self.problems.append(f"the store does not verify after the repair: {r.stdout[-500:]}")

    def _do_full_disk(self) -> None:
        vm = self._vmm()
        filler = self.full / "filler"
        try:
            vm.load(self.state, "File", self.mem)
            vm.ping()
            vm.api.pause()
            need = self.mem.stat().st_blocks * 512 + self.state.stat().st_size
            st = os.statvfs(self.full)
            free = st.f_bavail * st.f_frsize
            room = self.rng.randrange(0, need) // 4096 * 4096
            with open(filler, "wb") as f:
                f.truncate(0)
                block = b"\xa5" * (1 << 20)
                left = max(0, free - room)
                while left > 0:
                    left -= f.write(block[:min(left, len(block))])
            self.counts["full_disk_attempts"] += 1
            from poolsvc.vmm_client import VmmApiError

            try:
                vm.api.create_snapshot(str(self.full / "s.state"), str(self.full / "s.mem"))
                self.counts["full_disk_not_full"] += 1  # the estimate of the room needed was too high
            except VmmApiError as exc:
                if 400 <= exc.status < 500 and exc.fault_message:
                    self.counts["full_disk_refusals"] += 1
                else:
                    self.problems.append(f"a snapshot create on a full disk answered {exc}")
                left = [n for n in os.listdir(self.full) if n != "filler"]
                if left:
                    self.counts["full_disk_partial_files"] += 1
                    self.problems.append(f"a failed snapshot create left {left} (room {room} of {need})")
            vm.api.resume()
            if vm.ping(10.0) == AGENT_NAME:
                self.counts["full_disk_resumed_ok"] += 1
        finally:
            vm.close()
            for name in os.listdir(self.full):
                os.unlink(self.full / name)


# ---- the chaos thread --------------------------------------------------------------------------


class Chaos:
    """Every 0.5-2 s one action: the first round is one of each kind (shuffled), then weighted."""

    def __init__(self, cfg: ChaosConfig, rng: random.Random, service: ServiceProcess, lab: Lab, ledger: Ledger,
                 ledger_lock: threading.Lock, log: Callable[[str], None]) -> None:
        self.cfg, self.rng, self.service, self.lab, self.ledger = cfg, rng, service, lab, ledger
        self.ledger_lock = ledger_lock
        self.log = log
        self.kills: Counter[str] = Counter()
        self.actions: Counter[str] = Counter()
        self.problems: list[str] = []
        self.restart_gaps: list[float] = []
        #: Seconds from each service kill until the restarted pool had min_warm warm again (inf: never).
        self.refills: list[float] = []
        self._last_restart = -math.inf
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos", daemon=True)
        self.seen_ids: set[str] = set()

    def __repr__(self) -> str:
        return f"<Chaos {dict(self.actions)}>"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(180)

    def _plan(self) -> Iterable[str]:
        first = list(CHAOS_KINDS)
        self.rng.shuffle(first)
        yield from first
        kinds, weights = zip(*self.cfg.weights.items())
        while True:
            yield self.rng.choices(kinds, weights)[0]

    def _run(self) -> None:
        plan = iter(self._plan())
        while not self._stop.wait(self.rng.uniform(*self.cfg.interval)):
            kind = next(plan)
            if kind == "restart_service" and time.monotonic() - self._last_restart < self.cfg.restart_spacing:
                kind = "kill_vmm"
            try:
                getattr(self, f"_{kind}")()
            except Exception as exc:  # noqa: BLE001 - recorded; chaos goes on
                self.problems.append(f"chaos {kind}: {type(exc).__name__}: {exc}")
                self.log(f"chaos {kind} failed: {exc}")

    def _kill_vmm(self) -> None:
        vmms = service_vmms(self.service.run_dir)
        if not vmms:
            return
        rpc = _Rpc(self.service.addr)
        try:
            states = {s.id: s.state for s in rpc.stub.List(rpc.pb2.ListRequest(), timeout=5).sandboxes}
        except Exception:  # noqa: BLE001 - the service may be restarting: kill blind
            states = {}
        finally:
            rpc.close()
        leased = [p for p, i in vmms.items() if states.get(i) == rpc.pb2.SANDBOX_STATE_LEASED]
        warm = [p for p, i in vmms.items() if states.get(i) == rpc.pb2.SANDBOX_STATE_WARM]
        want = self.rng.choice(("leased", "warm"))
        pool = {"leased": leased, "warm": warm}[want] or leased or warm or list(vmms)
        pid = self.rng.choice(pool)
        kind = "leased" if pid in leased else "warm" if pid in warm else "other"
        with self.ledger_lock:
            self.ledger.vmm_killed(vmms[pid], time.monotonic())
        if _kill(pid):
            self.kills[f"vmm_{kind}"] += 1
            self.actions["kill_vmm"] += 1

    def _restart_service(self) -> None:
        t0 = time.monotonic()
        with self.ledger_lock:
            self.ledger.service_killed(t0)
        self.service.kill()
        self.kills["service"] += 1
        self.actions["restart_service"] += 1
        time.sleep(self.rng.uniform(0.2, 1.0))
        self.service.start()
        with self.ledger_lock:
            self.ledger.service_up(time.monotonic())
        self.restart_gaps.append(time.monotonic() - t0)
        self._last_restart = time.monotonic()
        rpc = _Rpc(self.service.addr)
        try:
            rpc.stub.SetPool(rpc.pb2.SetPoolRequest(template=TEMPLATE, min_warm=self.cfg.min_warm,
                                                    max_warm=self.cfg.max_warm), timeout=30)
        finally:
            rpc.close()
        self.log(f"service restarted in {self.restart_gaps[-1]:.1f} s")
        threading.Thread(target=self._time_refill, args=(t0,), daemon=True, name="chaos-refill").start()

    def _time_refill(self, killed_at: float) -> None:
        """Record how long after the kill the restarted pool had `min_warm` warm sandboxes again."""
        rpc = _Rpc(self.service.addr)
        try:
            while time.monotonic() - killed_at < 60 and not self._stop.is_set():
                try:
                    status = rpc.stub.GetPoolStatus(rpc.pb2.GetPoolStatusRequest(template=TEMPLATE), timeout=5)
                    if status.warm >= self.cfg.min_warm:
                        self.refills.append(time.monotonic() - killed_at)
                        return
                except Exception:  # noqa: BLE001 - restarting again, or busy: ask again
                    pass
                time.sleep(0.1)
            if not self._stop.is_set():
                self.refills.append(math.inf)
        finally:
            rpc.close()

    def _kill_page_server(self) -> None:
        if self.lab.request("kill_page_server"):
            self.actions["kill_page_server"] += 1

    def _corrupt_chunk(self) -> None:
        if self.lab.request("corrupt_chunk"):
            self.actions["corrupt_chunk"] += 1

    def _full_disk(self) -> None:
        if self.lab.request("full_disk"):
            self.actions["full_disk"] += 1


# ---- the run -------------------------------------------------------------------------------------


@dataclass
class ChaosConfig:
    duration: float = 60.0
    seed: int = 1
    clients: int = 2
    rate: float | None = 8.0
    min_warm: int = 2
    max_warm: int = 3
    max_vms: int = 24
    interval: tuple[float, float] = (0.5, 2.0)
    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    restart_spacing: float = 15.0
    refill_timeout: float = 90.0
    net_cidr: str | None = None
    #: VMMs jailed (the service's default) or not (``ember serve --no-jail``).
    jail: bool = True
    kernel: Path | None = None
    keep: bool = False

    def __post_init__(self) -> None:
        if self.duration <= 0 or self.clients <= 0 or not 0 <= self.min_warm <= self.max_warm:
            raise ChaosError(f"bad chaos configuration: {self}")
        unknown = set(self.weights) - set(CHAOS_KINDS)
        if unknown:
            raise ChaosError(f"unknown chaos kinds {sorted(unknown)}")


def _testguest() -> Path:
    name = "ember_tests_guest_build"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "tests" / "guests" / "build.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return Path(module.build_testguest())


def _template_dir(home: Path) -> Path:
    """Where the service keeps the template's snapshot files (the store's layout is its own business)."""
    found = sorted(home.glob(f"templates/**/{TEMPLATE}/template.json"))
    if not found:
        raise ChaosError(f"no template {TEMPLATE!r} under {home / 'templates'}")
    return found[0].parent


def _wait_refill(service: ServiceProcess, cfg: ChaosConfig) -> float | None:
    """Seconds until the pool has `min_warm` warm sandboxes again, None if it never does."""
    t0 = time.monotonic()
    rpc = _Rpc(service.addr)
    try:
        while time.monotonic() - t0 < cfg.refill_timeout:
            try:
                status = rpc.stub.GetPoolStatus(rpc.pb2.GetPoolStatusRequest(template=TEMPLATE), timeout=10)
                if status.warm >= cfg.min_warm:
                    return time.monotonic() - t0
            except Exception:  # noqa: BLE001 - keep asking until the deadline
                pass
            time.sleep(0.2)
        return None
    finally:
        rpc.close()


def _untracked(service: ServiceProcess) -> tuple[list[str], list[str]]:
    """VMMs and run directories of the service that no sandbox it lists accounts for."""
    rpc = _Rpc(service.addr)
    try:
        listed = {s.id for s in rpc.stub.List(rpc.pb2.ListRequest(), timeout=10).sandboxes}
    finally:
        rpc.close()
    vmms = [f"{vm_id} (pid {pid})" for pid, vm_id in service_vmms(service.run_dir).items() if vm_id not in listed]
    dirs = [p.name for p in service.run_dir.iterdir() if p.is_dir() and p.name not in listed and p.name != ".jail"]
    jails = service.run_dir / ".jail"  # the chroots (poolsvc.launcher), one per VM
    if jails.is_dir():
        dirs += [f".jail/{p.name}" for p in jails.iterdir() if p.name not in listed]
    return vmms, dirs


def _named_after(service_id: str) -> tuple[list[str], list[str], list[str]]:
    """Network namespaces, links and cgroup directories whose names carry `service_id` (or its netslot tag)."""
    marks = [service_id]
    try:
        from poolsvc.netslots import service_tag

        marks.append(f"emb{service_tag(service_id)}-")
    except ImportError:
        pass
    netns = sorted(n for n in netns_names() if any(m in n for m in marks))
    links = sorted(n for n in link_names() if any(m in n for m in marks))
    cgroups = []
    for mount, _ in _cgroup_mounts():
        for dirpath, dirnames, _files in os.walk(mount):
            if dirpath.count("/") - mount.count("/") >= 6:
                dirnames.clear()
            cgroups += [os.path.join(dirpath, d) for d in dirnames if any(m in d for m in marks)]
    return netns, links, sorted(cgroups)


def run(cfg: ChaosConfig, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """One chaos run; the report (see the module docstring)."""
    rng = random.Random(cfg.seed)
    service_id = f"chaos{secrets.token_hex(3)}"
    home = Path(tempfile.mkdtemp(prefix="ech-"))  # short: socket paths live under it
    kernel = cfg.kernel or _testguest()
    extra = ["--max-vms", str(cfg.max_vms)]
    if cfg.net_cidr:
        extra += ["--net-cidr", cfg.net_cidr]
    if not cfg.jail:
        extra.append("--no-jail")
    service = ServiceProcess(home, service_id, extra)
    ledger, ledger_lock = Ledger(), threading.Lock()
    footprint = Footprint(home, service_id, lambda: service.run_dir)
    problems: list[str] = []
    lab: Lab | None = None
    chaos: Chaos | None = None
    clients: _RecordingClients | None = None
    report: dict[str, Any] = {"service_id": service_id, "home": str(home), "seed": cfg.seed,
                              "duration_s": cfg.duration, "clients": cfg.clients, "rate": cfg.rate}
    try:
        service.start()
        log(f"service {service_id} at {service.addr}, home {home}")
        rpc = _Rpc(service.addr)
        try:
            rpc.stub.CreateTemplate(rpc.pb2.CreateTemplateRequest(name=TEMPLATE, kernel=str(kernel),
                                                                  boot_args="mode=agent", vcpus=1, mem_mib=64),
                                    timeout=300)
            rpc.stub.SetPool(rpc.pb2.SetPoolRequest(template=TEMPLATE, min_warm=cfg.min_warm,
                                                    max_warm=cfg.max_warm), timeout=30)
        finally:
            rpc.close()
        if _wait_refill(service, cfg) is None:
            raise ChaosError(f"the pool never filled:\n{service.log_tail()}")
        lab = Lab(home, service_id, _template_dir(home), random.Random(rng.random()), log,
                  network=cfg.net_cidr is not None)
        lab.setup()
        footprint.start()
        lcfg = load.LoadConfig(addr=service.addr, template=TEMPLATE, duration=cfg.duration, clients=cfg.clients,
                               rate=cfg.rate, warmup=0.0, lease_ttl=60.0, rpc_timeout=30.0, ready_timeout=10.0)
        clients = _RecordingClients(lcfg, lambda: ledger.epoch, lambda: service.run_dir)
        chaos = Chaos(cfg, random.Random(rng.random()), service, lab, ledger, ledger_lock, log)
        t0 = time.monotonic()
        clients.start()
        lab.start()
        chaos.start()
        log(f"chaos under load for {cfg.duration:g} s")
        time.sleep(cfg.duration)
        chaos.stop()
        clients.join()
        lab.stop()
        window = time.monotonic() - t0
        log("chaos over: checking")
        refill = _wait_refill(service, cfg)
        vmms, dirs = _untracked(service)
        verify = lab._cli("snapshot", "verify", "--json")
        footprint.sample()
        rc = service.terminate()
        lab.unmount()
        footprint.stop()
        leftover_procs = _wait_no_processes(footprint, 15.0)
        netns, links, cgroups = _named_after(service_id)
        seen_cgroups = sorted(c for c in footprint.cgroups | set(cgroups)
                              if os.path.isdir(c) and c not in footprint.cgroups_before)
        seen_netns = sorted(n for n in footprint.netns if n in netns_names())
        with ledger_lock:
            attempts = list(clients.attempts)
            kinds = Counter(classify(a, ledger) for a in attempts)
            kinds.update(k for a in attempts if (k := release_after_failure(a, ledger)) is not None)
        unexpected = [f"{k}" for k in kinds if k.startswith("unexpected")]
        report["unexpected_details"] = [
            {"kind": k, "client": a.client, "vm_id": a.vm_id, "epoch": a.epoch, "error": a.error,
             "acquire_code": a.acquire_code, "release_code": a.release_code,
             "start": round(a.start - t0, 2), "end": round(a.end - t0, 2)}
            for a in attempts
            if (k := classify(a, ledger)).startswith("unexpected")
            or (release_after_failure(a, ledger) or "").startswith("unexpected")][:20]
        report["service_down"] = [[round(lo - t0, 2), round(hi - t0, 2)] for lo, hi in ledger.down]
        report["vmm_kill_times"] = {i: [round(t - t0, 2) for t in ts] for i, ts in ledger.killed.items()}
        twice, concurrent, conflict_details = lease_conflicts(attempts)
        leftovers = {
            "processes": len(leftover_procs),
            "run_dir_files": len(files_under(service.run_dir)),
            "tmpfs_files": len(files_under(lab.full)) if lab.full.exists() else 0,
            "mounts": len(mounts_under(home)),
            "netns": len(set(netns) | set(seen_netns)),
            "links": len(links),
            "cgroups": len(seen_cgroups),
        }
        problems += chaos.problems + lab.problems
        problems += [f"the pool did not refill within 60 s of service restart {i + 1}"
                     for i, g in enumerate(chaos.refills) if not math.isfinite(g)]
        counts = lab.counts
        report.update({
            "window_s": round(window, 1),
            "attempts": len(attempts),
            "launches": kinds.get("ok", 0),
            "failures_by_kind": {k: v for k, v in sorted(kinds.items()) if k != "ok"},
            "unexpected_failures": sum(kinds[k] for k in unexpected),
            "kills": dict(sorted((chaos.kills + Counter({"page_server": counts["page_server_kills"]})).items())),
            "chaos_actions": dict(sorted(chaos.actions.items())),
            "service_restarts": service.starts - 1,
            "restart_gap_s": [round(g, 2) for g in chaos.restart_gaps],
            "restart_refill_s": [round(g, 2) if math.isfinite(g) else None for g in chaos.refills],
            "uffd_restores": counts["uffd_restores"],
            "vm_failed_cleanly_after_page_server_kill": counts["vm_failed_cleanly_after_page_server_kill"],
            "vm_hangs_after_page_server_kill": counts["vm_hangs_after_page_server_kill"],
            "corruptions": counts["corruptions"],
            "corruptions_named_by_verify": counts["corruptions_named_by_verify"],
            "corruptions_refused_by_page_server": counts["corruptions_refused_by_page_server"],
            "corruptions_refused_keyed": counts["keyed_refusals"],
            "corruptions_refused_unkeyed": counts["unkeyed_refusals"],
            "corruptions_served_undetected": counts["corruptions_served_undetected"],
            "repairs_verified_clean": counts["repairs_verified_clean"],
            "full_disk_attempts": counts["full_disk_attempts"],
            "full_disk_refusals": counts["full_disk_refusals"],
            "full_disk_not_full": counts["full_disk_not_full"],
            "full_disk_partial_files": counts["full_disk_partial_files"],
            "full_disk_resumed_ok": counts["full_disk_resumed_ok"],
            "handed_out_twice": twice,
            "concurrent_holders": concurrent,
            "lease_conflicts": conflict_details[:20],
            "refill_s": None if refill is None else round(refill, 2),
            "untracked_vmms": vmms,
            "untracked_dirs": dirs,
            "store_verify_clean": verify.returncode == 0,
            "service_exit": rc,
            "leftovers": leftovers,
            "leftover_details": {"processes": list(leftover_procs.values())[:10],
                                 "run_dir_files": files_under(service.run_dir)[:10],
                                 "netns": sorted(set(netns) | set(seen_netns)), "links": links,
                                 "cgroups": seen_cgroups},
            "footprint_samples": footprint.samples,
            "footprint_seen": {"cgroups": len(footprint.cgroups), "netns": len(footprint.netns),
                               "sandbox_ids": len(footprint.vm_ids)},
            "problems": problems,
        })
        missing = [k for k in CHAOS_KINDS if not chaos.actions.get(k)]
        report["chaos_kinds_missing"] = missing
        report["ok"] = (not unexpected and not problems and not missing and refill is not None and not vmms
                        and not dirs and verify.returncode == 0 and rc == 0 and twice == 0 and concurrent == 0
                        and not any(leftovers.values()))
        if not report["ok"]:
            report["service_log_tail"] = service.log_tail(3000)
        return report
    finally:
        # Each step on its own: a failing one must not leave the rest (and the service) running.
        steps: list[Callable[[], object]] = []
        if chaos is not None:
            steps.append(chaos.stop)
        if clients is not None:
            steps += [clients.join, clients.close]
        if lab is not None:
            steps.append(lab.stop)
        steps += [service.kill, lambda: [_kill(p) for p in footprint.processes()]]
        if lab is not None:
            steps.append(lab.unmount)
        for step in steps:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - clean up what can be cleaned up
                log(f"cleanup step failed: {exc!r}")
        if not cfg.keep:
            shutil.rmtree(home, ignore_errors=True)


def _wait_no_processes(footprint: Footprint, timeout: float) -> dict[int, str]:
    deadline = time.monotonic() + timeout
    while (left := footprint.processes()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


# ---- output -------------------------------------------------------------------------------------


def print_summary(r: dict[str, Any], out: Any = sys.stdout) -> None:
    lines = [
        f"ember chaos: {r['duration_s']:g} s, seed {r['seed']}, {r['clients']} clients -> "
        f"{'OK' if r.get('ok') else 'FAILED'}",
        f"  launches            {r.get('launches')} of {r.get('attempts')} attempts",
        f"  failures            {r.get('failures_by_kind')}",
        f"  unexpected          {r.get('unexpected_failures')}",
        f"  kills               {r.get('kills')}   service restarts {r.get('service_restarts')} "
        f"(gaps {r.get('restart_gap_s')} s, refilled after {r.get('restart_refill_s')} s)",
        f"  page server         uffd restores {r.get('uffd_restores')}, VMs failed cleanly after a kill "
        f"{r.get('vm_failed_cleanly_after_page_server_kill')}, hangs {r.get('vm_hangs_after_page_server_kill')}",
        f"  corruptions         {r.get('corruptions')}: named by verify {r.get('corruptions_named_by_verify')}, "
        f"refused by the page server {r.get('corruptions_refused_by_page_server')}, undetected "
        f"{r.get('corruptions_served_undetected')}, repaired clean {r.get('repairs_verified_clean')}",
        f"  full disk           {r.get('full_disk_attempts')}: refused {r.get('full_disk_refusals')}, "
        f"partial files {r.get('full_disk_partial_files')}, resumed {r.get('full_disk_resumed_ok')}",
        f"  leases              handed out twice {r.get('handed_out_twice')}, held by two at once "
        f"{r.get('concurrent_holders')}",
        f"  after               refill {r.get('refill_s')} s, untracked VMMs {r.get('untracked_vmms')}, "
        f"store clean {r.get('store_verify_clean')}, service exit {r.get('service_exit')}",
        f"  leftovers           {r.get('leftovers')}",
    ]
    for p in r.get("problems", [])[:20]:
        lines.append(f"  problem: {p[:300]}")
    print("\n".join(lines), file=out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, required=True, help="seconds of chaos under load")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--rate", type=float, default=8.0, help="launches/s the clients share (0: flat out)")
    p.add_argument("--min-warm", type=int, default=2)
    p.add_argument("--max-warm", type=int, default=3)
    p.add_argument("--net-cidr", default=None, help="give sandboxes network slots from this block")
    p.add_argument("--no-jail", dest="jail", action="store_false", help="run the service's VMMs unjailed")
    p.add_argument("--keep", action="store_true", help="keep the run's home directory (logs)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    try:
        cfg = ChaosConfig(duration=args.duration, seed=args.seed, clients=args.clients,
                          rate=args.rate or None, min_warm=args.min_warm, max_warm=args.max_warm,
                          net_cidr=args.net_cidr, jail=args.jail, keep=args.keep)
        r = run(cfg, log=lambda s: print(f"ember chaos: {s}", file=sys.stderr, flush=True))
    except ChaosError as exc:
        print(f"ember: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(load._jsonable(r)))
    else:
        print_summary(r)
    return 0 if r.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())

"""Virtio device benchmarks: block, net and vsock, measured from inside a guest.

    python -m bench.virtio [--json] [--runs 5] [--only blk,net,vsock] [--quick]

Every figure is the median of `--runs` runs made by this one command (no
numbers from earlier runs are mixed in); ratios compare figures of the same
run. The guest is the freestanding test guest (tests/guests, mode `vbench`,
docs/test-guests.md): it drives the virtio queues from ring 3 and times
itself with the TSC (rate from KVM's CPUID leaf 0x40000010 when offered,
else calibrated against PIT channel 2; the output says which), so boot time
and console output are not part of any figure.

blk: drive 0 is a file on tmpfs (/dev/shm) and on disk (`--disk-dir`,
  default /var/tmp). The guest reads, then writes, `--blk-mib` MiB
  sequentially in `--req-kib` KiB requests with `--qd` in flight. Before each
  run the disk file is fsync'ed and dropped from the page cache
  (POSIX_FADV_DONTNEED), so disk reads are cold; writes land in the host page
  cache (cache_type Unsafe, no flush), as the ceilings' writes do. Host-side
  ceilings on the same file and request size: Python `os.preadv`/`pwritev`
  one request at a time (what Ember's backend does per request, so the most
  its device could reach) and `dd`. A request-size sweep on tmpfs shows the
  cost per request.
net: a TAP device in a fresh network namespace; the VMM runs inside it.
  TX: the guest sends `--net-frames` broadcast frames of 1514 bytes (a
  1500-byte MTU payload + Ethernet header); a helper in the namespace counts
  them on an AF_PACKET socket. RX: the helper writes the same number of
  frames into the TAP (txqueuelen raised so the kernel queue holds them all)
  and the guest counts what arrives. Mbit/s count Ethernet frame bytes.
vsock: the guest listens; the host connects through the hybrid Unix socket
  (`CONNECT <port>\\n`), times `--rtt` ping-pongs of 64 bytes (p50/p90/p99),
  then streams `--vsock-mib` MiB host->guest (until the guest's 1-byte ack)
  and guest->host (first to last byte received).

The VMM's CPU time is read from /proc/PID/stat (utime+stime, all threads) at
the edges of each timed phase (console markers for phases the guest starts,
the host's own clock for the others); /proc/PID/task/*/stat splits it into
the main thread (the event loop, which runs the devices when an ioeventfd
fires) and the rest (vCPU threads: MMIO/PIO exits, emulated guest ring 0,
guest ring 3; guest_time is reported separately). "per core" figures divide
a rate by the VMM's CPU use (CPU seconds / wall seconds) over the phase.
Firecracker's published figures are printed for comparison, labelled as
such: they were not measured here (and come from a Linux guest on bare
metal with a dedicated emulation core).

`--poll` makes the guest spin on the used rings with interrupts suppressed
instead of sleeping until an interrupt (on nested PVM hosts a guest
interrupt runs through emulated ring 0, so this isolates the device path).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import queue
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

__all__ = [
    "FIRECRACKER_PUBLISHED",
    "BenchError",
    "BenchConfig",
    "CpuTimes",
    "GuestVm",
    "build_guest",
    "python_ceiling",
    "dd_ceiling",
    "bench_blk",
    "bench_net",
    "bench_vsock",
    "run_benchmarks",
    "main",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Firecracker's SPECIFICATION.md, "IO Performance" (I3.metal, Linux guest, one host core
# dedicated to the device emulation thread). Published figures, NOT measured by this bench.
FIRECRACKER_PUBLISHED = {
    "note": "published by Firecracker, NOT measured by this benchmark",
    "source": "Firecracker SPECIFICATION.md, 'IO Performance' (I3.metal, Linux guest, dedicated emulation core)",
    "block_MBps": 1024 * MIB / 1e6,  # "up to 1 GiB/s storage throughput"
    "block_core_fraction": 0.70,  # "by using <= 70% of the host CPU core for emulation"
    "net_Mbps": 14_500.0,  # "up to 14.5 Gbps network throughput"
    "net_core_fraction": 0.80,  # "by using <= 80% of the host CPU core"
    "net_Mbps_full_core": 25_000.0,  # "up to 25 Gbps ... by using 100% of the host CPU core"
    "added_latency_ms": 0.06,  # "the virtualization layer adds on average 0.06ms of latency"
}
FIRECRACKER_PUBLISHED["block_MBps_per_core"] = (FIRECRACKER_PUBLISHED["block_MBps"]
                                                / FIRECRACKER_PUBLISHED["block_core_fraction"])
FIRECRACKER_PUBLISHED["net_Mbps_per_core"] = (FIRECRACKER_PUBLISHED["net_Mbps"]
                                              / FIRECRACKER_PUBLISHED["net_core_fraction"])

GUEST_MAC = "06:00:0a:c9:00:02"
GUEST_CID = 3
VSOCK_PORT = 5201
FRAME_LEN = 1514  # 1500-byte MTU payload + 14-byte Ethernet header (no FCS)
RESULT_RE = re.compile(r"^VBENCH (blk|net|vsock) (read|write|tx|rx) (.*)$")
MARK_RE = re.compile(r"^VBENCH (GO|STOP) (.+)$")
TSC_RE = re.compile(r"^VBENCH TSC hz=(\d+) src=(\S+)")


class BenchError(Exception):
    """A virtio benchmark run failed."""


@dataclass(frozen=True)
class BenchConfig:
    """What to run and how big. The defaults keep `python -m bench.virtio` under ~3 minutes."""

    runs: int = 5
    only: tuple[str, ...] = ("blk", "net", "vsock")
    poll: bool = False
    blk_mib: int = 512
    req_kib: int = 64
    qd: int = 16
    sweep: tuple[tuple[int, int, int], ...] = ((4, 16, 32), (64, 16, 256), (1024, 8, 512))  # (req_kib, qd, mib)
    disk_dir: str = "/var/tmp"
    tmpfs_dir: str = "/dev/shm"
    net_frames: int = 30000
    vsock_mib: int = 32
    rtt: int = 1000
    rtt_msg: int = 64
    vsock_pkt_kib: int = 4
    mem_mib: int = 256
    timeout_s: float = 60.0
    py_spy_dir: str | None = None  # record every VMM with py-spy (raw collapsed stacks) into this directory

    @classmethod
    def quick(cls) -> BenchConfig:
        """Tiny sizes: a smoke run of every path in a few seconds."""
        return cls(runs=1, blk_mib=4, sweep=((4, 8, 1),), net_frames=200, vsock_mib=1, rtt=20)


# --- the guest and the VMM process ---------------------------------------------------------------


def build_guest() -> Path:
    """The test guest ELF (built by tests/guests/build.py, cached)."""
    name = "ember_tests_guest_build"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "tests" / "guests" / "build.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return module.build_testguest()


@dataclass(frozen=True)
class CpuTimes:
    """A process's CPU clock ticks at one instant: utime+stime of the process and of its main
    thread, and guest_time summed over its threads (proc(5) fields 14, 15, 43)."""

    wall: float
    total: int
    main: int
    guest: int

    @classmethod
    def sample(cls, pid: int) -> CpuTimes:
        wall = time.monotonic()
        total = sum(_stat_fields(f"/proc/{pid}/stat")[11:13])
        main = guest = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                f = _stat_fields(f"/proc/{pid}/task/{tid}/stat")
            except OSError:
                continue  # the thread ended
            if int(tid) == pid:
                main = f[11] + f[12]
            guest += f[40]
        return cls(wall, total, main, guest)

    def until(self, later: CpuTimes) -> dict[str, float]:
        """CPU seconds between two samples, and cores used (CPU / wall)."""
        wall = later.wall - self.wall
        cpu = (later.total - self.total) / CLK_TCK
        main = (later.main - self.main) / CLK_TCK
        return {
            "wall_s": wall,
            "cpu_s": cpu,
            "main_thread_s": main,
            "other_threads_s": cpu - main,
            "guest_s": (later.guest - self.guest) / CLK_TCK,
            "cores": cpu / wall if wall > 0 else 0.0,
            "main_thread_cores": main / wall if wall > 0 else 0.0,
        }


def _stat_fields(path: str) -> list[int]:
    """Fields of a /proc stat file after the command name, as ints where they are numbers.

    Index i here is field i+3 of proc(5) (field 14 utime -> 11, 15 stime -> 12, 43 guest_time -> 40).
    """
    with open(path) as f:
        text = f.read()
    rest = text[text.rindex(")") + 2:].split()
    return [int(x) if x.lstrip("-").isdigit() else 0 for x in rest]


class GuestVm:
    """One `ember-vmm --no-api` process running the vbench mode; console lines collected by a thread.

    Console markers `VBENCH GO <x>` / `VBENCH STOP <x>` are answered at once
    with a CPU sample of the VMM (`marks[("GO", x)]`).
    """

    def __init__(self, kernel: Path, boot_args: str, tmp: Path, *, mem_mib: int, config_extra: dict,
                 wrapper: Sequence[str] = (), profile_to: Path | None = None):
        config = {
            "boot-source": {"kernel_image_path": str(kernel), "boot_args": f"mode=vbench {boot_args}"},
            "machine-config": {"vcpu_count": 1, "mem_size_mib": mem_mib},
            **config_extra,
        }
        cfg = tmp / "vm.json"
        cfg.write_text(json.dumps(config))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        self.lines: list[str] = []
        self.marks: dict[tuple[str, str], CpuTimes] = {}
        self._cond = threading.Condition()
        self._stderr = tmp / "vmm.stderr"
        with open(self._stderr, "wb") as err:
            self.proc = subprocess.Popen(
                [*wrapper, sys.executable, "-m", "vmm.main", "--no-api", "--config-file", str(cfg)],
                cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                start_new_session=True)
        self._profile_to = profile_to
        self._profiler: subprocess.Popen | None = None
        self._reader = threading.Thread(target=self._read, name="vbench-console", daemon=True)
        self._reader.start()

    def _start_profiler(self) -> None:
        # Attached once the VMM prints (so `ip netns exec` has exec'ed Python); it stops when the VMM exits.
        self._profiler = subprocess.Popen(
            ["py-spy", "record", "--pid", str(self.proc.pid), "--threads", "--nonblocking", "--rate", "200",
             "--format", "raw", "--output", str(self._profile_to)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _read(self) -> None:
        for raw in self.proc.stdout:
            if self._profile_to is not None and self._profiler is None:
                self._start_profiler()
            line = raw.decode(errors="replace").rstrip("\r\n")
            m = MARK_RE.match(line)
            if m:
                try:
                    self.marks[(m.group(1), m.group(2))] = CpuTimes.sample(self.proc.pid)
                except OSError:
                    pass  # the process is gone: no sample
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def cpu(self) -> CpuTimes:
        return CpuTimes.sample(self.proc.pid)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """The first console line matching `pattern`; BenchError on timeout, guest failure or exit."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    m = rx.search(line)
                    if m:
                        return m
                    if " FAIL " in line or line.startswith("TESTGUEST EXCEPTION"):
                        raise BenchError(f"guest failed: {line}\n{self.describe()}")
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(f"no console line /{pattern}/ within {timeout:.0f} s\n{self.describe()}")
                if not self._reader.is_alive() and seen == len(self.lines):
                    raise BenchError(f"the VMM exited before /{pattern}/\n{self.describe()}")
                self._cond.wait(min(left, 0.5))

    def finish(self, timeout: float) -> list[str]:
        """Waits for the guest's PASS and the VMM's exit; returns the console lines."""
        self.wait_for(r"^TESTGUEST vbench PASS", timeout)
        try:
            rc = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            raise BenchError(f"the VMM did not exit after the guest passed\n{self.describe()}") from None
        self._reader.join(5)
        if rc != 0:
            raise BenchError(f"the VMM exited with status {rc}\n{self.describe()}")
        return self.lines

    def describe(self) -> str:
        try:
            err = self._stderr.read_text(errors="replace")[-3000:]
        except OSError:
            err = ""
        return "--- console ---\n" + "\n".join(self.lines[-40:]) + "\n--- stderr ---\n" + err

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        self._reader.join(5)
        if self._profiler is not None:
            try:
                self._profiler.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._profiler.kill()
                self._profiler.wait()

    def __repr__(self) -> str:
        state = "running" if self.proc.poll() is None else f"exited {self.proc.returncode}"
        return f"<GuestVm pid={self.proc.pid} {state} lines={len(self.lines)}>"


_profile_counter = iter(range(1, 1 << 30))


@contextmanager
def _vm(kernel: Path, boot_args: str, cfg: BenchConfig, config_extra: dict,
        wrapper: Sequence[str] = ()) -> Iterator[GuestVm]:
    profile_to = None
    if cfg.py_spy_dir:
        Path(cfg.py_spy_dir).mkdir(parents=True, exist_ok=True)
        dev = re.search(r"vbench\.dev=(\w+)", boot_args).group(1)
        profile_to = Path(cfg.py_spy_dir) / f"{next(_profile_counter):03d}-{dev}.txt"
    with tempfile.TemporaryDirectory(prefix="ember-vbench-") as tmp:
        vm = GuestVm(kernel, f"{boot_args} vbench.poll={int(cfg.poll)}", Path(tmp), mem_mib=cfg.mem_mib,
                     config_extra=config_extra, wrapper=wrapper, profile_to=profile_to)
        try:
            yield vm
        finally:
            vm.kill()


def _fields(text: str) -> dict[str, float]:
    out = {}
    for word in text.split():
        key, sep, value = word.partition("=")
        if sep:
            try:
                out[key] = float(value)
            except ValueError:
                pass
    return out


def _results(lines: Sequence[str]) -> dict[tuple[str, str], dict[str, float]]:
    found = {}
    for line in lines:
        m = RESULT_RE.match(line)
        if m and "=" in m.group(3):
            found[(m.group(1), m.group(2))] = _fields(m.group(3))
    return found


def _tsc(lines: Sequence[str]) -> dict[str, object]:
    for line in lines:
        m = TSC_RE.match(line)
        if m:
            return {"hz": int(m.group(1)), "source": m.group(2)}
    return {}


def _phase_cpu(vm: GuestVm, what: str, start_kind: str = "GO") -> dict[str, float]:
    a, b = vm.marks.get((start_kind, what)), vm.marks.get(("STOP", what))
    return a.until(b) if a and b else {}


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _per_core(rate: float, cpu: dict[str, float]) -> float:
    cores = cpu.get("cores", 0.0)
    return rate / cores if cores > 0 else float("nan")


def _summarise(samples: list[dict], keys: Sequence[str]) -> dict[str, float]:
    """Medians over runs of `keys` (and of the CPU figures), plus the run count."""
    out: dict[str, float] = {"runs": len(samples)}
    for key in keys:
        out[key] = _median([s[key] for s in samples if key in s])
    for key in ("cpu_s", "main_thread_s", "other_threads_s", "guest_s", "cores", "main_thread_cores"):
        vals = [s["cpu"][key] for s in samples if s.get("cpu")]
        if vals:
            out[f"vmm_{key}"] = _median(vals)
    return out


# --- block ------------------------------------------------------------------------------------


def _make_file(path: Path, mib: int) -> None:
    chunk = os.urandom(MIB)
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def _drop_cache(path: Path) -> None:
    """fsync the file and drop its pages from the page cache (its next read comes from the device)."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def python_ceiling(path: Path, total: int, req: int, *, write: bool) -> dict[str, float]:
    """Python moving `total` bytes through `path` in `req`-byte preadv/pwritev calls, one at a time."""
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.lseek(fd, 0, os.SEEK_END) // req * req
        buf = memoryview(bytearray(os.urandom(req) if write else req))
        op = os.pwritev if write else os.preadv
        c0, t0 = time.process_time(), time.perf_counter()
        for off in range(0, total, req):
            op(fd, [buf], off % size)
        t1, c1 = time.perf_counter(), time.process_time()
    finally:
        os.close(fd)
    rate = total / (t1 - t0) / 1e6
    return {"MBps": rate, "cpu_s": c1 - c0, "MBps_per_core": rate / ((c1 - c0) / (t1 - t0)) if c1 > c0 else rate}


def dd_ceiling(path: Path, total: int, req: int, *, write: bool) -> dict[str, float]:
    """`dd` moving the same bytes in the same block size; its own reported time."""
    count = total // req
    if write:
        args = ["dd", "if=/dev/zero", f"of={path}", f"bs={req}", f"count={count}", "conv=notrunc"]
    else:
        args = ["dd", f"if={path}", "of=/dev/null", f"bs={req}", f"count={count}"]
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
    m = re.search(r"^(\d+) bytes .* copied, ([\d.e+-]+) s", proc.stderr, re.M)
    if proc.returncode != 0 or not m:
        raise BenchError(f"dd failed: {' '.join(args)}\n{proc.stderr}")
    return {"MBps": int(m.group(1)) / float(m.group(2)) / 1e6}


def _blk_run(kernel: Path, cfg: BenchConfig, path: Path, mib: int, req_kib: int, qd: int,
             cold: bool) -> dict[str, dict]:
    if cold:
        _drop_cache(path)
    drives = [{"drive_id": "bench", "path_on_host": str(path), "is_root_device": True, "is_read_only": False}]
    args = f"vbench.dev=blk vbench.mib={mib} vbench.req_kib={req_kib} vbench.qd={qd} vbench.op=rw"
    with _vm(kernel, args, cfg, {"drives": drives}) as vm:
        lines = vm.finish(cfg.timeout_s)
        res = _results(lines)
        out: dict[str, dict] = {"tsc": _tsc(lines)}
        for op in ("read", "write"):
            r = res.get(("blk", op))
            if r is None:
                raise BenchError(f"no blk {op} result\n{vm.describe()}")
            cpu = _phase_cpu(vm, f"blk {op}")
            out[op] = {"MBps": r["MBps"], "usec_per_req": r["usec"] / r["reqs"], "irqs": r["irqs"],
                       "kicks": r["kicks"], "cpu": cpu, "MBps_per_core": _per_core(r["MBps"], cpu)}
        return out


def bench_blk(kernel: Path, cfg: BenchConfig, log=print) -> dict:
    """Guest sequential read/write MB/s on tmpfs and disk, host ceilings, and a request-size sweep."""
    result: dict[str, object] = {"mib": cfg.blk_mib, "req_kib": cfg.req_kib, "qd": cfg.qd}
    req = cfg.req_kib * 1024
    total = cfg.blk_mib * MIB
    keys = ("MBps", "MBps_per_core", "usec_per_req", "irqs", "kicks")
    for backing, base, cold in (("tmpfs", cfg.tmpfs_dir, False), ("disk", cfg.disk_dir, True)):
        tmp = Path(tempfile.mkdtemp(prefix="ember-vbench-", dir=base))
        try:
            path = tmp / "disk.img"
            _make_file(path, cfg.blk_mib)
            runs = []
            for i in range(cfg.runs):
                runs.append(_blk_run(kernel, cfg, path, cfg.blk_mib, cfg.req_kib, cfg.qd, cold))
                log(f"  blk {backing} run {i + 1}: read {runs[-1]['read']['MBps']:.0f} MB/s, "
                    f"write {runs[-1]['write']['MBps']:.0f} MB/s")
            section: dict[str, object] = {"tsc": runs[0]["tsc"]}
            for op in ("read", "write"):
                section[op] = _summarise([r[op] for r in runs], keys)
            host: dict[str, dict] = {}
            for op in ("read", "write"):
                py, dd = [], []
                for _ in range(cfg.runs):
                    if cold and op == "read":
                        _drop_cache(path)
                    py.append(python_ceiling(path, total, req, write=op == "write"))
                    if cold and op == "read":
                        _drop_cache(path)
                    dd.append(dd_ceiling(path, total, req, write=op == "write"))
                host[f"python_{op}"] = {k: _median([s[k] for s in py]) for k in py[0]}
                host[f"dd_{op}"] = {k: _median([s[k] for s in dd]) for k in dd[0]}
            section["host"] = host
            section["ratios"] = {
                f"guest_vs_python_{op}": section[op]["MBps"] / host[f"python_{op}"]["MBps"] for op in ("read", "write")
            } | {
                f"guest_vs_dd_{op}": section[op]["MBps"] / host[f"dd_{op}"]["MBps"] for op in ("read", "write")
            }
            result[backing] = section
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if "tmpfs" in result and "disk" in result:
        result["ratios"] = {f"tmpfs_vs_disk_{op}": result["tmpfs"][op]["MBps"] / result["disk"][op]["MBps"]
                            for op in ("read", "write")}
    sweep = []
    tmp = Path(tempfile.mkdtemp(prefix="ember-vbench-", dir=cfg.tmpfs_dir))
    try:
        path = tmp / "disk.img"
        _make_file(path, max(mib for _, _, mib in cfg.sweep))
        for req_kib, qd, mib in cfg.sweep:
            runs = [_blk_run(kernel, cfg, path, mib, req_kib, qd, False) for _ in range(max(1, min(cfg.runs, 3)))]
            row = {"req_kib": req_kib, "qd": qd, "mib": mib}
            for op in ("read", "write"):
                row[op] = _summarise([r[op] for r in runs], ("MBps", "usec_per_req", "MBps_per_core"))
                cpu_per_req = [r[op]["cpu"]["main_thread_s"] / (mib * MIB // (req_kib * 1024)) * 1e6
                               for r in runs if r[op]["cpu"]]
                row[op]["main_thread_cpu_us_per_req"] = _median(cpu_per_req)
            log(f"  blk sweep {req_kib} KiB qd {qd}: read {row['read']['MBps']:.0f} MB/s "
                f"({row['read']['usec_per_req']:.1f} us/req)")
            sweep.append(row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["sweep_tmpfs"] = sweep
    return result


# --- net --------------------------------------------------------------------------------------

# Runs inside the network namespace: counts the guest's frames on an AF_PACKET socket and,
# when told, writes frames into the TAP. One JSON object per line on stdout; commands on stdin.
NETNS_HELPER = r"""
import json, os, select, socket, struct, sys, time
tap = sys.argv[1]
ETH_P = 0x88b5
SOL_PACKET, PACKET_STATISTICS = 263, 6
def say(**kw):
    sys.stdout.write(json.dumps(kw) + "\n"); sys.stdout.flush()
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P))
s.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE
s.bind((tap, 0))
s.setblocking(False)
host_mac = s.getsockname()[4]
count = nbytes = late = 0
first = last = None
buf = bytearray(4096)
ending = None
say(event="ready", mac=host_mac.hex(":"))
stdin = sys.stdin.buffer.raw
pending = b""
while True:
    timeout = 0.02 if ending is not None else None
    r, _, _ = select.select([s, stdin], [], [], timeout)
    if s in r:
        while True:
            try:
                n = s.recv_into(buf)
            except BlockingIOError:
                break
            if buf[14:23] == b"VBENCH-TX":
                now = time.monotonic()
                if first is None:
                    first = now
                last = now
                count += 1
                nbytes += n
    if ending is not None:
        s.send(ending)
    if stdin in r:
        chunk = os.read(stdin.fileno(), 4096)
        if not chunk:
            break
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            cmd = line.decode().split()
            if not cmd:
                continue
            if cmd[0] == "count":
                time.sleep(0.05)  # frames the TAP took just before the command may still be in the backlog
                while True:
                    try:
                        n = s.recv_into(buf)
                    except BlockingIOError:
                        break
                    if buf[14:23] == b"VBENCH-TX":  # counted, not timed (they arrived before now)
                        count += 1
                        nbytes += n
                        late += 1
                drops = struct.unpack("II", s.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))[1]
                say(event="count", frames=count, bytes=nbytes, first=first, last=last, drops=drops, late=late)
            elif cmd[0] == "send":
                frames, length = int(cmd[1]), int(cmd[2])
                head = b"\xff" * 6 + host_mac + struct.pack("!H", ETH_P)
                frame = bytearray(head + b"VBENCH-RX".ljust(length - 14, b"\0"))
                t0 = time.monotonic()
                for i in range(frames):
                    s.send(frame)
                t1 = time.monotonic()
                say(event="sent", frames=frames, start=t0, seconds=t1 - t0)
                ending = (head + b"VBENCH-END %d" % frames).ljust(60, b"\0")
            elif cmd[0] == "quit":
                sys.exit(0)
"""


@contextmanager
def _netns() -> Iterator[tuple[str, str]]:
    """(netns, tap): a TAP device with 10.201.0.1/24 in a fresh network namespace, deleted afterwards."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        raise BenchError("the net benchmark needs root and iproute2 (network namespaces, TAP devices)")
    tag = f"{os.getpid() % 100000}"
    netns, tap = f"ember-vbench-{tag}", f"tapvb{tag}"[:15]

    def ip(*args: str, check: bool = True) -> None:
        proc = subprocess.run(["ip", *args], capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise BenchError(f"ip {' '.join(args)}: {proc.stderr.strip()}")

    ip("netns", "add", netns)
    try:
        ip("-n", netns, "tuntap", "add", "dev", tap, "mode", "tap")
        ip("-n", netns, "addr", "add", "10.201.0.1/24", "dev", tap)
        ip("-n", netns, "link", "set", "lo", "up")
        ip("-n", netns, "link", "set", tap, "up")
        subprocess.run(["ip", "netns", "exec", netns, "sh", "-c",
                        f"echo 1 > /proc/sys/net/ipv6/conf/{tap}/disable_ipv6"], capture_output=True)
        yield netns, tap
    finally:
        ip("netns", "del", netns, check=False)


class _Helper:
    """The NETNS_HELPER process: JSON events out, commands in."""

    def __init__(self, netns: str, tap: str):
        self.proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", NETNS_HELPER, tap],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.events: queue.SimpleQueue[dict] = queue.SimpleQueue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(b"{"):
                self.events.put(json.loads(line))
        self.events.put({"event": "exit"})

    def send(self, command: str) -> None:
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()

    def expect(self, event: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                ev = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise BenchError(f"net helper: no '{event}' event within {timeout:.0f} s") from None
            if ev["event"] == event:
                return ev
            if ev["event"] == "exit":
                raise BenchError(f"net helper exited: {self.proc.stderr.read().decode(errors='replace')}")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def _net_run(kernel: Path, cfg: BenchConfig, netns: str, tap: str) -> dict[str, dict]:
    helper = _Helper(netns, tap)
    try:
        helper.expect("ready", 20)
        ifaces = [{"iface_id": "eth0", "host_dev_name": tap, "guest_mac": GUEST_MAC}]
        args = f"vbench.dev=net vbench.dir=both vbench.frames={cfg.net_frames} vbench.frame_len={FRAME_LEN}"
        with _vm(kernel, args, cfg, {"network-interfaces": ifaces}, wrapper=["ip", "netns", "exec", netns]) as vm:
            vm.wait_for(r"^VBENCH net rx READY", cfg.timeout_s)
            helper.send("count")
            counted = helper.expect("count", 10)
            cpu0 = vm.cpu()
            helper.send(f"send {cfg.net_frames} {FRAME_LEN}")
            sent = helper.expect("sent", cfg.timeout_s)
            lines = vm.finish(cfg.timeout_s)
            rx_cpu = cpu0.until(vm.marks[("STOP", "net rx")]) if ("STOP", "net rx") in vm.marks else {}
            res = _results(lines)
            tx, rx = res.get(("net", "tx")), res.get(("net", "rx"))
            if tx is None or rx is None:
                raise BenchError(f"no net results\n{vm.describe()}")
            tx_cpu = _phase_cpu(vm, "net tx")
    finally:
        helper.close()
    host_frames = counted["frames"]
    host_span = (counted["last"] - counted["first"]) if host_frames > 1 else 0.0
    host_mbps = (counted["bytes"] * (host_frames - 1) / host_frames) * 8 / host_span / 1e6 if host_span else 0.0
    return {
        "tx": {"Mbps": tx["Mbps"], "fps": tx["fps"], "host_frames": host_frames,
               "host_Mbps": host_mbps, "host_fps": (host_frames - 1) / host_span if host_span else 0.0,
               "lost": cfg.net_frames - host_frames, "host_socket_drops": counted["drops"],
               "irqs": tx["irqs"], "kicks": tx["kicks"], "cpu": tx_cpu,
               "Mbps_per_core": _per_core(tx["Mbps"], tx_cpu)},
        "rx": {"Mbps": rx["Mbps"], "fps": rx["fps"], "frames": rx["frames"], "host_sent": rx["host_sent"],
               "lost": rx["host_sent"] - rx["frames"], "host_send_fps": sent["frames"] / sent["seconds"],
               "irqs": rx["irqs"], "cpu": rx_cpu, "Mbps_per_core": _per_core(rx["Mbps"], rx_cpu)},
    }


def bench_net(kernel: Path, cfg: BenchConfig, log=print) -> dict:
    """Guest->host and host->guest frames/s and Mbit/s through a TAP."""
    runs = []
    with _netns() as (netns, tap):
        # The kernel queue in front of the TAP (tun's ring takes txqueuelen at attach) holds a whole RX burst.
        subprocess.run(["ip", "-n", netns, "link", "set", tap, "txqueuelen", str(cfg.net_frames + 1000)],
                       check=True, capture_output=True)
        for i in range(cfg.runs):
            runs.append(_net_run(kernel, cfg, netns, tap))
            log(f"  net run {i + 1}: tx {runs[-1]['tx']['Mbps']:.0f} Mbit/s (host saw "
                f"{runs[-1]['tx']['host_frames']}), rx {runs[-1]['rx']['Mbps']:.0f} Mbit/s "
                f"({runs[-1]['rx']['frames']:.0f} of {runs[-1]['rx']['host_sent']:.0f})")
    return {
        "frames": cfg.net_frames, "frame_len": FRAME_LEN,
        "tx": _summarise([r["tx"] for r in runs], ("Mbps", "fps", "host_Mbps", "host_fps", "lost",
                                                  "host_socket_drops", "irqs", "kicks", "Mbps_per_core")),
        "rx": _summarise([r["rx"] for r in runs], ("Mbps", "fps", "lost", "host_send_fps", "irqs",
                                                  "Mbps_per_core")),
    }


# --- vsock ------------------------------------------------------------------------------------


def _recv_exact(s: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise BenchError(f"vsock: connection closed after {len(out)} of {n} bytes")
        out += chunk
    return bytes(out)


def _vsock_run(kernel: Path, cfg: BenchConfig) -> dict:
    with tempfile.TemporaryDirectory(prefix="ember-vs-") as sockdir:
        uds = Path(sockdir) / "v.sock"
        args = (f"vbench.dev=vsock vbench.port={VSOCK_PORT} vbench.rtt={cfg.rtt} vbench.msg={cfg.rtt_msg} "
                f"vbench.mib={cfg.vsock_mib} vbench.pkt_kib={cfg.vsock_pkt_kib}")
        with _vm(kernel, args, cfg, {"vsock": {"guest_cid": GUEST_CID, "uds_path": str(uds)}}) as vm:
            vm.wait_for(r"^VBENCH vsock .*LISTENING", cfg.timeout_s)
            total = cfg.vsock_mib * MIB
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(cfg.timeout_s)
                s.connect(str(uds))
                s.sendall(f"CONNECT {VSOCK_PORT}\n".encode())
                reply = b""
                while not reply.endswith(b"\n") and len(reply) < 64:
                    chunk = s.recv(1)
                    if not chunk:
                        break
                    reply += chunk
                if not re.fullmatch(rb"OK \d+\n", reply):
                    raise BenchError(f"vsock: CONNECT answered {reply!r}\n{vm.describe()}")
                msg = bytes(range(256))[:cfg.rtt_msg].ljust(cfg.rtt_msg, b"x")
                rtts = []
                cpu0 = vm.cpu()
                for _ in range(cfg.rtt):
                    t0 = time.perf_counter_ns()
                    s.sendall(msg)
                    if _recv_exact(s, len(msg)) != msg:
                        raise BenchError("vsock: the echo differs from the message")
                    rtts.append((time.perf_counter_ns() - t0) / 1000)
                cpu1 = vm.cpu()
                block = memoryview(os.urandom(256 << 10))
                t0 = time.perf_counter()
                for off in range(0, total, len(block)):
                    s.sendall(block[:min(len(block), total - off)])
                _recv_exact(s, 1)  # the guest's ack: it has every byte
                t1 = time.perf_counter()
                cpu2 = vm.cpu()
                got, first, last = 0, None, None
                buf = bytearray(1 << 20)
                while got < total:
                    n = s.recv_into(buf)
                    if not n:
                        raise BenchError(f"vsock: guest->host stream ended after {got} of {total} bytes")
                    now = time.perf_counter()
                    first = first if first is not None else now
                    last = now
                    got += n
                cpu3 = vm.cpu()
                # The guest closes (SHUTDOWN); Ember closes the Unix socket.
                s.settimeout(10)
                try:
                    while s.recv(4096):
                        pass
                except TimeoutError:
                    pass  # the VMM kept the socket open; the guest's own result says whether it closed cleanly
            lines = vm.finish(cfg.timeout_s)
    res = _results(lines)
    rx, tx = res.get(("vsock", "rx")), res.get(("vsock", "tx"))
    if rx is None or tx is None:
        raise BenchError("no vsock results")
    rtts.sort()
    h2g = total / (t1 - t0) / 1e6
    g2h = total / (last - first) / 1e6 if last and first and last > first else float("nan")
    cpu_rtt, cpu_h2g, cpu_g2h = cpu0.until(cpu1), cpu1.until(cpu2), cpu2.until(cpu3)
    return {
        "rtt": {"p50_us": rtts[len(rtts) // 2], "p90_us": rtts[int(len(rtts) * 0.9)],
                "p99_us": rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))], "mean_us": statistics.fmean(rtts),
                "cpu": cpu_rtt, "vmm_cpu_us_per_round_trip": cpu_rtt["cpu_s"] / cfg.rtt * 1e6},
        "host_to_guest": {"MBps": h2g, "guest_MBps": rx["MBps"], "cpu": cpu_h2g, "MBps_per_core": _per_core(h2g, cpu_h2g)},
        "guest_to_host": {"MBps": g2h, "guest_MBps": tx["MBps"], "cpu": cpu_g2h,
                          "MBps_per_core": _per_core(g2h, cpu_g2h)},
    }


def bench_vsock(kernel: Path, cfg: BenchConfig, log=print) -> dict:
    """Round-trip latency and stream throughput both ways through the hybrid Unix socket."""
    runs = []
    for i in range(cfg.runs):
        runs.append(_vsock_run(kernel, cfg))
        r = runs[-1]
        log(f"  vsock run {i + 1}: rtt p50 {r['rtt']['p50_us']:.0f} us, h2g {r['host_to_guest']['MBps']:.1f} MB/s, "
            f"g2h {r['guest_to_host']['MBps']:.1f} MB/s")
    return {
        "mib": cfg.vsock_mib, "round_trips": cfg.rtt, "msg_bytes": cfg.rtt_msg, "pkt_kib": cfg.vsock_pkt_kib,
        "rtt": _summarise([r["rtt"] for r in runs], ("p50_us", "p90_us", "p99_us", "mean_us",
                                                    "vmm_cpu_us_per_round_trip")),
        "host_to_guest": _summarise([r["host_to_guest"] for r in runs], ("MBps", "guest_MBps", "MBps_per_core")),
        "guest_to_host": _summarise([r["guest_to_host"] for r in runs], ("MBps", "guest_MBps", "MBps_per_core")),
    }


# --- the whole run ------------------------------------------------------------------------------


def _host_info() -> dict:
    kvm = next((m for m in ("kvm_pvm", "kvm_intel", "kvm_amd") if Path("/sys/module", m).exists()), "unknown")
    return {"cpus": os.cpu_count(), "kvm_module": kvm, "python": sys.version.split()[0],
            "loadavg_1m_at_start": os.getloadavg()[0]}


def run_benchmarks(cfg: BenchConfig, log=print) -> dict:
    """Every benchmark `cfg.only` names; one dict of medians, ratios and the reference figures."""
    kernel = build_guest()
    out: dict[str, object] = {"config": asdict(cfg), "host": _host_info()}
    started = time.monotonic()
    if "blk" in cfg.only:
        log("blk ...")
        out["blk"] = bench_blk(kernel, cfg, log)
    if "net" in cfg.only:
        log("net ...")
        out["net"] = bench_net(kernel, cfg, log)
    if "vsock" in cfg.only:
        log("vsock ...")
        out["vsock"] = bench_vsock(kernel, cfg, log)
    out["seconds"] = time.monotonic() - started
    out["host"]["loadavg_1m_at_end"] = os.getloadavg()[0]
    fc = FIRECRACKER_PUBLISHED
    out["firecracker_published"] = fc
    comparison = {}
    if "blk" in out:
        tmpfs = out["blk"]["tmpfs"]
        comparison["blk_read_MBps_vs_fc"] = tmpfs["read"]["MBps"] / fc["block_MBps"]
        comparison["blk_read_MBps_per_core_vs_fc"] = tmpfs["read"]["MBps_per_core"] / fc["block_MBps_per_core"]
        comparison["blk_write_MBps_per_core_vs_fc"] = tmpfs["write"]["MBps_per_core"] / fc["block_MBps_per_core"]
    if "net" in out:
        for d in ("tx", "rx"):
            comparison[f"net_{d}_Mbps_vs_fc"] = out["net"][d]["Mbps"] / fc["net_Mbps"]
            comparison[f"net_{d}_Mbps_per_core_vs_fc"] = out["net"][d]["Mbps_per_core"] / fc["net_Mbps_per_core"]
    out["vs_firecracker_published"] = comparison
    return out


def _print_human(result: dict) -> None:
    def line(label: str, value: float, unit: str = "", extra: str = "") -> None:
        print(f"  {label:44} {value:12.2f} {unit:8} {extra}")

    cfg = result["config"]
    print(f"host: {result['host']}  runs={cfg['runs']} poll={cfg['poll']}  ({result['seconds']:.0f} s)")
    blk = result.get("blk")
    if blk:
        print(f"blk: {blk['mib']} MiB sequential, {blk['req_kib']} KiB requests, qd {blk['qd']} "
              f"(TSC {blk['tmpfs']['tsc']})")
        for backing in ("tmpfs", "disk"):
            s = blk[backing]
            for op in ("read", "write"):
                r = s[op]
                line(f"{backing} guest {op}", r["MBps"], "MB/s",
                     f"{r['usec_per_req']:.1f} us/req; VMM {r.get('vmm_cores', float('nan')):.2f} cores "
                     f"(main thread {r.get('vmm_main_thread_cores', float('nan')):.2f}) -> "
                     f"{r['MBps_per_core']:.0f} MB/s per core")
                line(f"{backing} host python {op} (ceiling)", s["host"][f"python_{op}"]["MBps"], "MB/s")
                line(f"{backing} host dd {op}", s["host"][f"dd_{op}"]["MBps"], "MB/s")
            for k, v in s["ratios"].items():
                line(f"{backing} ratio {k}", v)
        for k, v in blk.get("ratios", {}).items():
            line(f"ratio {k}", v)
        for row in blk["sweep_tmpfs"]:
            for op in ("read", "write"):
                r = row[op]
                line(f"sweep tmpfs {row['req_kib']} KiB qd {row['qd']} {op}", r["MBps"], "MB/s",
                     f"{r['usec_per_req']:.1f} us/req, main thread {r['main_thread_cpu_us_per_req']:.1f} "
                     f"CPU us/req")
    net = result.get("net")
    if net:
        print(f"net: {net['frames']} frames of {net['frame_len']} bytes each way")
        for d in ("tx", "rx"):
            r = net[d]
            line(f"{d} ({'guest->host' if d == 'tx' else 'host->guest'})", r["Mbps"], "Mbit/s",
                 f"{r['fps']:.0f} frames/s, lost {r['lost']:.0f}; VMM {r.get('vmm_cores', float('nan')):.2f} "
                 f"cores -> {r['Mbps_per_core']:.0f} Mbit/s per core")
        line("tx as counted by the host (AF_PACKET)", net["tx"]["host_Mbps"], "Mbit/s",
             f"{net['tx']['host_fps']:.0f} frames/s")
    vs = result.get("vsock")
    if vs:
        print(f"vsock: {vs['round_trips']} round trips of {vs['msg_bytes']} bytes, {vs['mib']} MiB each way")
        r = vs["rtt"]
        line("round trip p50", r["p50_us"], "us", f"p90 {r['p90_us']:.0f} us, p99 {r['p99_us']:.0f} us, "
             f"VMM CPU {r['vmm_cpu_us_per_round_trip']:.0f} us per round trip")
        for d in ("host_to_guest", "guest_to_host"):
            r = vs[d]
            line(d.replace("_", " "), r["MBps"], "MB/s", f"guest-timed {r['guest_MBps']:.1f} MB/s; VMM "
                 f"{r.get('vmm_cores', float('nan')):.2f} cores -> {r['MBps_per_core']:.1f} MB/s per core")
    fc = result["firecracker_published"]
    print(f"Firecracker's PUBLISHED figures (not measured here; {fc['source']}):")
    print(f"  block {fc['block_MBps']:.0f} MB/s at <= {fc['block_core_fraction']:.0%} of a core "
          f"(= {fc['block_MBps_per_core']:.0f} MB/s per core); net {fc['net_Mbps']:.0f} Mbit/s at <= "
          f"{fc['net_core_fraction']:.0%} of a core, {fc['net_Mbps_full_core']:.0f} Mbit/s at 100%; "
          f"added latency {fc['added_latency_ms']} ms")
    for k, v in result["vs_firecracker_published"].items():
        line(f"Ember / Firecracker-published {k}", v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = BenchConfig()
    ap.add_argument("--json", action="store_true", help="print one JSON object (progress goes to stderr)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one run: a smoke test")
    ap.add_argument("--runs", type=int, help=f"runs per figure (default {d.runs})")
    ap.add_argument("--only", help="comma-separated subset of blk,net,vsock")
    ap.add_argument("--poll", action="store_true", help="guest polls the used rings instead of sleeping")
    ap.add_argument("--blk-mib", type=int, help=f"MiB per block pass (default {d.blk_mib})")
    ap.add_argument("--req-kib", type=int, help=f"block request size (default {d.req_kib})")
    ap.add_argument("--qd", type=int, help=f"block requests in flight (default {d.qd})")
    ap.add_argument("--disk-dir", help=f"directory on disk for the backing file (default {d.disk_dir})")
    ap.add_argument("--net-frames", type=int, help=f"frames each way (default {d.net_frames})")
    ap.add_argument("--vsock-mib", type=int, help=f"MiB each way (default {d.vsock_mib})")
    ap.add_argument("--rtt", type=int, help=f"vsock round trips (default {d.rtt})")
    ap.add_argument("--vsock-pkt-kib", type=int, help=f"guest vsock TX packet payload (default {d.vsock_pkt_kib})")
    ap.add_argument("--py-spy", metavar="DIR", dest="py_spy_dir",
                    help="profile every VMM with py-spy (must be installed) into DIR; slows the runs")
    args = ap.parse_args(argv)
    cfg = BenchConfig.quick() if args.quick else d
    overrides = {k: v for k, v in (("runs", args.runs), ("blk_mib", args.blk_mib), ("req_kib", args.req_kib),
                                   ("qd", args.qd), ("disk_dir", args.disk_dir), ("net_frames", args.net_frames),
                                   ("vsock_mib", args.vsock_mib), ("rtt", args.rtt),
                                   ("vsock_pkt_kib", args.vsock_pkt_kib), ("py_spy_dir", args.py_spy_dir))
                 if v is not None}
    if args.py_spy_dir and shutil.which("py-spy") is None:
        ap.error("--py-spy: py-spy is not installed (pip install py-spy)")
    if args.only:
        overrides["only"] = tuple(x.strip() for x in args.only.split(",") if x.strip())
        unknown = set(overrides["only"]) - {"blk", "net", "vsock"}
        if unknown:
            ap.error(f"--only: unknown {', '.join(sorted(unknown))}")
    if args.poll:
        overrides["poll"] = True
    cfg = replace(cfg, **overrides)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.json else (lambda msg: print(msg, flush=True))
    try:
        result = run_benchmarks(cfg, log)
    except BenchError as exc:
        print(f"bench.virtio: {exc}", file=sys.stderr)
        return 1
    result["command"] = " ".join(["python -m bench.virtio", *(argv if argv is not None else sys.argv[1:])])
    if args.json:
        print(json.dumps(result, indent=2, default=float))
    else:
        _print_human(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

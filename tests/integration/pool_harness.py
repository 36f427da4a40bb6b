"""Test helpers: `ember serve` in a subprocess with its own EMBER_HOME, and gRPC stubs to it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable

import grpc

from poolsvc import proto

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """`python -m poolsvc.cli serve` on a free port; `stub` is a PoolService stub.

    `connect(addr)` makes the stub's channel (default: plaintext), e.g. a TLS
    channel with a token from `poolsvc.auth.client_channel`.
    """

    def __init__(self, home: Path, *extra: str, connect: Callable[[str], grpc.Channel] | None = None) -> None:
        self.home = home
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.env = dict(os.environ, EMBER_HOME=str(home), PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1")
        self.log = open(home / f"serve-{self.port}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "poolsvc.cli", "serve", "--listen", self.addr,
                                      "--metrics-listen", "127.0.0.1:0", *extra],
                                     cwd=REPO_ROOT, env=self.env, stdout=subprocess.PIPE, stderr=self.log,
                                     start_new_session=True)
        line = self.proc.stdout.readline().decode()
        if not line.startswith("{"):
            self.kill()
            raise AssertionError(f"ember serve did not start: {line!r}\n{self.logs()}")
        self.run_dir = Path(json.loads(line)["run_dir"])
        self.metrics_addr = json.loads(line)["metrics"]
        self.pb2, pb2_grpc = proto.load()
        self.channel = connect(self.addr) if connect is not None else grpc.insecure_channel(self.addr)
        self.stub = pb2_grpc.PoolServiceStub(self.channel)

    def logs(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return (self.home / f"serve-{self.port}.log").read_text(errors="replace")[-4000:]

    def vmm_pids(self) -> dict[str, int]:
        """vm id -> VMM pid, from the run directory's pid files."""
        out = {}
        for pidfile in self.run_dir.glob("*/vmm.pid"):
            try:
                out[pidfile.parent.name] = json.loads(pidfile.read_text())["pid"]
            except (OSError, ValueError, KeyError):
                continue
        return out

    def wait_pool(self, template: str, warm: int, timeout: float = 60.0) -> object:
        deadline = time.monotonic() + timeout
        while True:
            status = self.stub.GetPoolStatus(self.pb2.GetPoolStatusRequest(template=template))
            if status.warm >= warm:
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"pool {template} has {status.warm} warm, wanted {warm}\n{self.logs()}")
            time.sleep(0.1)

    def terminate(self, timeout: float = 60.0) -> int:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.log.close()

    def kill(self) -> None:
        """SIGKILL the service (a crash: its VMMs outlive it, as a real crash would leave them)."""
        if hasattr(self, "channel"):
            self.channel.close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()

    def cleanup(self) -> None:
        """Test teardown: stop the service and make sure none of its VMMs or its zygote survives."""
        if self.proc.poll() is None:
            try:
                self.terminate(timeout=30)
            except (subprocess.TimeoutExpired, OSError):
                self.kill()
        for pid in list(self.vmm_pids().values()) + _zygote_pids(self.run_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _zygote_pids(run_dir: Path) -> list[int]:
    """Zygote (and zygote-forked VMM) processes whose command line names `run_dir`."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "vmm.zygote" in cmdline and str(run_dir) in cmdline:
            out.append(int(proc.name))
    return out


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_dead(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def metric_value(svc: Service, line_prefix: str) -> float:
    """The value of the service's metric sample whose line starts with `line_prefix` (0 if it has none yet)."""
    with urllib.request.urlopen(f"http://{svc.metrics_addr}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(line_prefix):
                return float(line.rsplit(" ", 1)[1])
    return 0.0

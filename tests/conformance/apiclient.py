"""Drive a real `ember-vmm` process through its API socket (for conformance and integration tests).

* `ApiClient(path)` — HTTP/1.1 over the Unix socket with keep-alive
  (http.client); `request(method, path, body)` returns an `ApiResponse`.
* `VmmApiProcess(sock_dir, args)` — starts ``python -m vmm.main --api-sock
  <dir>/api.sock <args>``, waits for the socket, keeps the console (stdout)
  and stderr, and is killed on `close`.
* `curl(sock, method, path, data)` — the same request as the Firecracker
  docs make it, with curl(1).

Loaded by path (``importlib``) from tests in other directories.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 30.0

__all__ = ["REPO_ROOT", "ApiResponse", "ApiClient", "VmmApiProcess", "curl", "have_curl"]


class ApiResponse(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def fault(self) -> str:
        return self.json()["fault_message"]

    def __str__(self) -> str:
        return f"{self.status} {self.body[:500]!r}"


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


class ApiClient:
    """A keep-alive HTTP client on the API socket."""

    def __init__(self, path: str, timeout: float = TIMEOUT) -> None:
        self.path = path
        self._conn = _UnixConnection(path, timeout)

    def request(self, method: str, path: str, body: Any = None) -> ApiResponse:
        """`body`: a JSON-able value, or bytes sent as they are."""
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        for attempt in (1, 2):
            try:
                self._conn.request(method, path, body=data, headers=headers)
                resp = self._conn.getresponse()
                payload = resp.read()
                return ApiResponse(resp.status, {k.lower(): v for k, v in resp.getheaders()}, payload)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self._conn.close()  # the server closed an idle connection: reconnect once
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def get(self, path: str) -> ApiResponse:
        return self.request("GET", path)

    def put(self, path: str, body: Any) -> ApiResponse:
        return self.request("PUT", path, body)

    def patch(self, path: str, body: Any) -> ApiResponse:
        return self.request("PATCH", path, body)

    def close(self) -> None:
        self._conn.close()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class VmmApiProcess:
    """A running ``ember-vmm --api-sock``; `api` talks to it."""

    def __init__(self, sock_dir: str | os.PathLike, args: Sequence[str] = (), *, stdin: int | None = None,
                 wait: bool = True, sock_name: str = "api.sock", wrapper: Sequence[str] = ()) -> None:
        self.sock = str(Path(sock_dir) / sock_name)
        cmd = [*wrapper, sys.executable, "-m", "vmm.main", "--api-sock", self.sock, *args]
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env(),
                                     stdin=subprocess.PIPE if stdin is None else stdin,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        self._out = bytearray()
        self._err = bytearray()
        self._cond = threading.Condition()
        self._pumps = [threading.Thread(target=self._pump, args=(self.proc.stdout, self._out), daemon=True),
                       threading.Thread(target=self._pump, args=(self.proc.stderr, self._err), daemon=True)]
        for t in self._pumps:
            t.start()
        self.api = ApiClient(self.sock)
        if wait:
            self.wait_for_socket()

    def _pump(self, stream, buf: bytearray) -> None:
        while True:
            chunk = stream.read1(65536)
            with self._cond:
                buf.extend(chunk)
                self._cond.notify_all()
            if not chunk:
                return

    @property
    def stdout(self) -> str:
        with self._cond:
            return self._out.decode(errors="replace")

    @property
    def stderr(self) -> str:
        with self._cond:
            return self._err.decode(errors="replace")

    def describe(self) -> str:
        return f"exit={self.proc.poll()}\n--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"

    def wait_for_socket(self, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"ember-vmm exited before listening\n{self.describe()}")
            if os.path.exists(self.sock):
                try:
                    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                        s.connect(self.sock)
                    return
                except OSError:
                    pass
            time.sleep(0.02)
        raise AssertionError(f"ember-vmm did not listen on {self.sock} within {timeout} s\n{self.describe()}")

    def wait_for_output(self, needle: str, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while needle not in self._out.decode(errors="replace"):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {needle!r} on the console within {timeout} s\n{self.describe()}")
                if self.proc.poll() is not None and not any(t.is_alive() for t in self._pumps):
                    raise AssertionError(f"ember-vmm exited without printing {needle!r}\n{self.describe()}")
                self._cond.wait(min(left, 0.2))

    def send_console(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def wait(self, timeout: float = TIMEOUT) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"ember-vmm did not exit within {timeout} s\n{self.describe()}") from None
        for t in self._pumps:
            t.join(5)
        return rc

    def terminate(self, timeout: float = TIMEOUT) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def close(self) -> None:
        self.api.close()
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        for t in self._pumps:
            t.join(5)

    def __enter__(self) -> VmmApiProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<VmmApiProcess pid={self.proc.pid} exit={self.proc.poll()} sock={self.sock}>"


def have_curl() -> bool:
    return shutil.which("curl") is not None


def curl(sock: str, method: str, path: str, data: str | None = None, timeout: float = TIMEOUT) -> ApiResponse:
    """``curl -X METHOD --unix-socket SOCK --data DATA http://localhost/PATH``, as in Firecracker's docs."""
    cmd = ["curl", "-sS", "-X", method, "--unix-socket", sock, "-o", "-", "-w", "\n%{http_code}"]
    if data is not None:
        cmd += ["--data", data]
    cmd.append(f"http://localhost{path}")
    out = subprocess.run(cmd, capture_output=True, timeout=timeout, check=True).stdout
    body, _, code = out.rpartition(b"\n")
    return ApiResponse(int(code), {}, body)

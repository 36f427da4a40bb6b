"""`poolsvc.vmm_client` against a tiny fake VMM API: http.server on a Unix socket, scripted answers."""

from __future__ import annotations

import json
import socket
import socketserver
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Callable, Iterator

import pytest

from poolsvc.vmm_client import VmmApiError, VmmClient, VmmConnectionError

pytestmark = pytest.mark.timeout(30)

# (method, path, body) -> (status, body bytes, close the connection after?)
Script = Callable[[str, str, bytes], tuple[int, bytes, bool]]


class FakeVmm:
    """An HTTP/1.1 server on a Unix socket that records requests and answers from `script`."""

    def __init__(self, path: Path, script: Script) -> None:
        self.path = path
        self.script = script
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.connections = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                fake.connections += 1

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fake.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                                      body))
                status, payload, close = fake.script(self.command, self.path, body)
                self.send_response(status)
                if payload:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                if close:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_PUT = do_PATCH = _serve

            def log_message(self, *args: object) -> None:
                pass

        self.server = socketserver.ThreadingUnixStreamServer(str(path), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _ok(method: str, path: str, body: bytes) -> tuple[int, bytes, bool]:
    if method == "GET":
        return 200, json.dumps({"id": "vm7", "state": "Paused"}).encode(), False
    return 204, b"", False


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ember-vc-") as d:  # short: sun_path is 108 bytes
        yield Path(d)


@pytest.fixture
def fake(sock_dir: Path) -> Iterator[Callable[[Script], FakeVmm]]:
    servers: list[FakeVmm] = []

    def start(script: Script = _ok) -> FakeVmm:
        server = FakeVmm(sock_dir / "api.sock", script)
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.close()


def test_get_returns_json_and_put_sends_a_json_body(fake) -> None:
    server = fake()
    with VmmClient(server.path) as client:
        assert client.describe_instance() == {"id": "vm7", "state": "Paused"}
        assert client.put_machine_config(2, 256) is None
    method, path, headers, body = server.requests[1]
    assert (method, path) == ("PUT", "/machine-config")
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {"vcpu_count": 2, "mem_size_mib": 256}
    assert server.requests[0][3] == b""  # a GET carries no body


def test_requests_share_one_keep_alive_connection(fake) -> None:
    server = fake()
    with VmmClient(server.path) as client:
        for _ in range(5):
            client.pause()
            client.resume()
    assert server.connections == 1
    assert [json.loads(r[3])["state"] for r in server.requests] == ["Paused", "Resumed"] * 5
    assert all(r[:2] == ("PATCH", "/vm") for r in server.requests)


def test_an_error_status_raises_with_the_fault_message(fake) -> None:
    def script(method: str, path: str, body: bytes) -> tuple[int, bytes, bool]:
        if path == "/snapshot/load":
            return 400, json.dumps({"fault_message": "Load snapshot error: bad"}).encode(), False
        return 204, b"", False

    server = fake(script)
    client = VmmClient(server.path)
    with pytest.raises(VmmApiError) as info:
        client.load_snapshot("/t/vm.state", "/t/vm.mem")
    assert info.value.status == 400
    assert info.value.fault_message == "Load snapshot error: bad"
    assert info.value.method == "PUT" and info.value.path == "/snapshot/load"
    assert "Load snapshot error: bad" in str(info.value)
    client.resume()  # the connection is still usable after an error answer
    client.close()
    assert server.connections == 1


def test_an_error_without_json_keeps_the_text(fake) -> None:
    server = fake(lambda m, p, b: (500, b"internal trouble", False))
    with VmmClient(server.path) as client, pytest.raises(VmmApiError) as info:
        client.get("/")
    assert info.value.status == 500 and info.value.fault_message == "internal trouble"


def test_load_snapshot_sends_firecrackers_body_with_overrides(fake) -> None:
    server = fake()
    with VmmClient(server.path) as client:
        client.load_snapshot("/t/vm.state", "/t/vm.mem", vsock_uds_path="/run/vm7/v.sock",
                             drive_overrides={"rootfs": "/run/vm7/rootfs.ext4"})
        client.load_snapshot("/t/vm.state", "/t/vm.mem", resume_vm=True)
    assert json.loads(server.requests[0][3]) == {
        "snapshot_path": "/t/vm.state", "mem_backend": {"backend_type": "File", "backend_path": "/t/vm.mem"},
        "resume_vm": False, "vsock_override": {"uds_path": "/run/vm7/v.sock"},
        "drive_overrides": [{"drive_id": "rootfs", "path_on_host": "/run/vm7/rootfs.ext4"}]}
    second = json.loads(server.requests[1][3])
    assert second["resume_vm"] is True and "vsock_override" not in second and "drive_overrides" not in second


def test_a_closed_idle_connection_is_reopened_once(fake) -> None:
    server = fake(lambda m, p, b: (204, b"", True))  # the server closes after every answer
    with VmmClient(server.path) as client:
        client.resume()
        time.sleep(0.05)
        client.resume()
    assert server.connections == 2 and len(server.requests) == 2


def test_a_server_that_hangs_up_mid_request_is_a_connection_error(sock_dir: Path) -> None:
    path = sock_dir / "api.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)

    def hang_up() -> None:
        for _ in range(2):
            conn, _ = listener.accept()
            conn.recv(65536)
            conn.close()

    t = threading.Thread(target=hang_up, daemon=True)
    t.start()
    try:
        with VmmClient(path, timeout=5) as client, pytest.raises(VmmConnectionError):
            client.resume()
    finally:
        t.join(5)
        listener.close()


def test_no_socket_is_a_connection_error(sock_dir: Path) -> None:
    with VmmClient(sock_dir / "missing.sock") as client, pytest.raises(VmmConnectionError, match="missing.sock"):
        client.get("/")


def test_wait_until_listening_waits_for_a_late_socket(fake, sock_dir: Path) -> None:
    client = VmmClient(sock_dir / "api.sock")
    timer = threading.Timer(0.2, fake)
    timer.start()
    start = time.monotonic()
    client.wait_until_listening(10)
    assert 0.15 < time.monotonic() - start < 5
    assert client.describe_instance()["state"] == "Paused"
    timer.join()
    client.close()


def test_wait_until_listening_gives_up_on_timeout_or_a_dead_vmm(sock_dir: Path) -> None:
    client = VmmClient(sock_dir / "api.sock")
    start = time.monotonic()
    with pytest.raises(VmmConnectionError, match="after 0.2 s"):
        client.wait_until_listening(0.2)
    assert time.monotonic() - start < 2
    calls: list[float] = []

    def alive() -> bool:
        calls.append(time.monotonic())
        return len(calls) < 3

    start = time.monotonic()
    with pytest.raises(VmmConnectionError, match="exited"):
        client.wait_until_listening(30, alive=alive)
    assert len(calls) == 3 and time.monotonic() - start < 2

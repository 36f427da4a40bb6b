"""`ember-vmm --api-sock` end to end: real processes, the test guest, hostile clients.

The contract itself (every endpoint's status and body) is checked in
tests/conformance; here: the API together with a config file, the
command-line flags that feed the API's subsystems (MMDS, logger, metrics),
pause and resume seen from the guest, and clients that misbehave on the
socket, after each of which the VMM must still serve.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from pathlib import Path

import pytest

from tests.integration.conftest import load_apiclient

pytestmark = pytest.mark.kvm

REPO_ROOT = Path(__file__).resolve().parents[2]


apiclient = load_apiclient()


@pytest.fixture
def sock_dir():
    with tempfile.TemporaryDirectory(prefix="ember-api-") as d:  # short: sun_path is 108 bytes
        yield Path(d)


@pytest.fixture
def vmm(sock_dir):
    procs = []

    def start(*args: str, wait: bool = True, stdin: int | None = None):
        p = apiclient.VmmApiProcess(sock_dir, args, wait=wait, stdin=stdin)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.close()


def boot_echo(proc, testguest) -> None:
    assert proc.api.put("/boot-source", {"kernel_image_path": str(testguest), "boot_args": "mode=echo"}).status == 204
    resp = proc.api.put("/actions", {"action_type": "InstanceStart"})
    assert resp.status == 204, f"{resp}\n{proc.describe()}"
    proc.wait_for_output("ECHO READY")


def raw(proc) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(proc.sock)
    return s


def read_all(s: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


def assert_serving(proc) -> None:
    resp = proc.api.get("/")
    assert resp.status == 200, f"{resp}\n{proc.describe()}"


# --- the API with a config file ------------------------------------------------------------


def test_a_config_file_boots_then_the_api_serves_the_running_vm(vmm, testguest, tmp_path) -> None:
    cfg = tmp_path / "vm.json"
    cfg.write_text(json.dumps({"boot-source": {"kernel_image_path": str(testguest), "boot_args": "mode=echo"},
                               "machine-config": {"vcpu_count": 1, "mem_size_mib": 64}}))
    proc = vmm("--config-file", str(cfg), "--id", "from-file")
    proc.wait_for_output("ECHO READY")
    assert proc.api.get("/").json()["state"] == "Running"
    assert proc.api.get("/machine-config").json()["mem_size_mib"] == 64
    assert proc.api.get("/vm/config").json()["boot-source"]["boot_args"] == "mode=echo"
    resp = proc.api.put("/boot-source", {"kernel_image_path": str(testguest)})
    assert resp.status == 400 and resp.fault == "The requested operation is not supported after starting the microVM."
    proc.send_console(b"quit\n")
    assert proc.wait() == 0, proc.describe()
    assert "TESTGUEST echo PASS" in proc.stdout
    assert not os.path.exists(proc.sock)


def test_a_config_file_with_a_device_the_builder_lacks(vmm, testguest, tmp_path) -> None:
    cfg = tmp_path / "vm.json"
    cfg.write_text(json.dumps({"boot-source": {"kernel_image_path": str(testguest), "boot_args": "mode=hello"},
                               "vsock": {"guest_cid": 3, "uds_path": str(tmp_path / "v.sock")}}))
    proc = vmm("--config-file", str(cfg), wait=False)
    rc = proc.wait()
    if rc == 1:  # no virtio-vsock yet: the process ends with one line naming it
        assert "vsock" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.describe()
    else:  # the builder has the device: the guest boots and resets
        assert rc == 0 and "TESTGUEST hello PASS" in proc.stdout, proc.describe()
    assert not os.path.exists(proc.sock)


def test_an_existing_socket_path_is_refused(vmm, sock_dir) -> None:
    taken = sock_dir / "api.sock"
    taken.write_text("not ours")
    proc = vmm(wait=False)
    assert proc.wait() == 1
    assert "Failed to open the API socket at:" in proc.stderr and "Check that it is not already used." in proc.stderr
    assert taken.read_text() == "not ours"


def test_sigterm_stops_the_vmm_and_removes_the_socket(vmm, testguest) -> None:
    proc = vmm()
    boot_echo(proc, testguest)
    assert proc.terminate() == 143
    assert not os.path.exists(proc.sock)


# --- the guest sees pause, resume and the API's actions ---------------------------------------


def test_a_paused_guest_runs_nothing_until_resumed(vmm, testguest) -> None:
    proc = vmm()
    boot_echo(proc, testguest)
    assert proc.api.patch("/vm", {"state": "Paused"}).status == 204
    assert proc.api.get("/").json()["state"] == "Paused"
    proc.send_console(b"while-paused\n")
    time.sleep(1.0)
    assert "ECHO:while-paused" not in proc.stdout
    assert proc.api.patch("/vm", {"state": "Resumed"}).status == 204
    proc.wait_for_output("ECHO:while-paused")
    assert proc.api.put("/actions", {"action_type": "SendCtrlAltDel"}).status == 204
    assert proc.api.put("/actions", {"action_type": "InstanceStart"}).fault.endswith("after starting the microVM.")


# --- flags that feed the API's subsystems -------------------------------------------------------


def test_metadata_seeds_mmds_and_the_size_limit_holds(vmm, tmp_path) -> None:
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"latest": {"meta-data": {"ami-id": "ami-12345678"}}}))
    proc = vmm("--metadata", str(meta), "--mmds-size-limit", "1024")
    assert proc.api.get("/mmds").json() == {"latest": {"meta-data": {"ami-id": "ami-12345678"}}}
    resp = proc.api.patch("/mmds", {"blob": "x" * 2000})
    assert resp.status == 413 and resp.fault.startswith("MMDS limit exceeded error")
    assert proc.api.get("/mmds").json()["latest"]["meta-data"]["ami-id"] == "ami-12345678"


def test_bad_metadata_is_refused_at_startup(vmm, tmp_path) -> None:
    meta = tmp_path / "meta.json"
    meta.write_text("[1, 2]")
    proc = vmm("--metadata", str(meta), wait=False)
    assert proc.wait() == 1 and "must be a JSON object" in proc.stderr


def test_log_flags_give_json_lines(vmm, tmp_path) -> None:
    log = tmp_path / "vmm.log"
    proc = vmm("--log-path", str(log), "--level", "Info", "--show-level", "--module", "vmm.api")
    assert proc.api.get("/version").status == 200
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert any(r["event"] == "API request" and r["path"] == "/version" and r["level"] == "info" for r in records)
    assert all(r["logger"].startswith("vmm.api") for r in records)


def test_metrics_fifo_gets_lines_on_flush(vmm, testguest, tmp_path) -> None:
    fifo = tmp_path / "metrics.fifo"
    os.mkfifo(fifo)
    proc = vmm("--metrics-path", str(fifo))
    boot_echo(proc, testguest)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert proc.api.put("/actions", {"action_type": "FlushMetrics"}).status == 204
        line = json.loads(os.read(reader, 1 << 20).decode().splitlines()[-1])
    finally:
        os.close(reader)
    assert line["vcpu"]["exit_io_out"] > 0 and line["uart"]["write_count"] > 0
    assert line["put_api_requests"]["boot_source_count"] == 1


# --- requests the VMM must refuse and survive ------------------------------------------------------


@pytest.mark.parametrize("path,body,fault", [
    ("/machine-config", {"vcpu_count": 1, "mem_size_mib": 128, "vcpus": 2}, "unknown field `vcpus`"),
    ("/machine-config", {"vcpu_count": True, "mem_size_mib": 128}, "invalid type: boolean `true`, expected u8"),
    ("/machine-config", {"vcpu_count": 0, "mem_size_mib": 128}, "The number of vCPUs must be greater than 0"),
    ("/machine-config", {"vcpu_count": 33, "mem_size_mib": 128}, "The number of vCPUs must be greater than 0"),
    ("/machine-config", {"vcpu_count": 1, "mem_size_mib": 0}, "The memory size (MiB) is either 0"),
    ("/boot-source", {"kernel_image_path": 7}, "kernel_image_path: invalid type: integer `7`, expected a string"),
])
def test_bad_bodies_get_400_and_the_vmm_serves_on(vmm, path, body, fault) -> None:
    proc = vmm()
    resp = proc.api.put(path, body)
    assert resp.status == 400 and fault in resp.fault, resp
    assert_serving(proc)


def test_instance_start_twice_and_boot_source_after_start(vmm, testguest) -> None:
    proc = vmm()
    boot_echo(proc, testguest)
    again = proc.api.put("/actions", {"action_type": "InstanceStart"})
    late = proc.api.put("/boot-source", {"kernel_image_path": str(testguest)})
    for resp in (again, late):
        assert resp.status == 400 and resp.fault == "The requested operation is not supported after starting the microVM."
    assert proc.api.get("/").json()["state"] == "Running"


@pytest.mark.parametrize("limit,size", [(None, 51201), ("1000", 1001)])
def test_oversize_payloads_get_400(vmm, limit, size) -> None:
    proc = vmm(*(["--http-api-max-payload-size", limit] if limit else []))
    max_size = int(limit) if limit else 51200
    ok = proc.api.put("/mmds", {"k": "x" * (max_size - 20)})
    assert ok.status == 204, ok
    s = raw(proc)
    s.sendall(b"PUT /mmds HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(size).encode() + b"\r\n\r\n")
    answer = read_all(s)
    s.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert json.loads(body) == {"fault_message": f"Request payload with size {size} is larger than the limit of "
                                                 f"{max_size} allowed by server."}
    assert_serving(proc)


@pytest.mark.parametrize("garbage", [
    bytes(range(256)) * 16 + b"\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64 + b"\r\n",  # a TLS ClientHello
    b"HELLO\r\n\r\n",
    b"PUT /actions HTTP/1.1\r\nHost: localhost\r\nContent-Length: -5\r\n\r\n",
], ids=["binary", "tls", "not-http", "negative-length"])
def test_garbage_on_the_socket_gets_400_and_the_vmm_serves_on(vmm, garbage) -> None:
    proc = vmm()
    s = raw(proc)
    s.sendall(garbage)
    answer = read_all(s)
    s.close()
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["fault_message"].startswith("Invalid HTTP request")
    assert_serving(proc)


def test_clients_that_disconnect_mid_request_are_harmless(vmm, testguest) -> None:
    proc = vmm()
    for partial in (b"PUT /boot-so",
                    b"PUT /boot-source HTTP/1.1\r\nHost: localhost\r\nContent-Length: 200\r\n\r\n{\"kernel_"):
        s = raw(proc)
        s.sendall(partial)
        s.close()
    assert_serving(proc)
    assert proc.api.get("/vm/config").json()["boot-source"]["kernel_image_path"] == ""
    boot_echo(proc, testguest)


def test_a_stalled_client_does_not_block_the_api(vmm) -> None:
    proc = vmm()
    stalled = raw(proc)
    stalled.sendall(b"PUT /machine-config HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n{")
    started = time.monotonic()
    for _ in range(5):
        assert_serving(proc)
    assert time.monotonic() - started < 5
    stalled.close()

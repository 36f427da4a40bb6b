"""`ember pool|sandbox|template|status|acquire` against an in-process PoolService."""

from __future__ import annotations

import datetime
import io
import json
import socket
import sys
import time

import pytest

from poolsvc import client_cli
from poolsvc.api_types import ResourceExhausted
from poolsvc.cli import main

from tests.unit.poolsvc._grpc_fake import FakeBackend, backend, server  # noqa: F401


@pytest.fixture
def ember(server: str, capsys):
    """``ember(*argv) -> (status, stdout, stderr)`` talking to the test server."""
    def run(*argv: str) -> tuple[int, str, str]:
        args = list(argv)
        at = 2 if args[0] in ("pool", "sandbox", "template") else 1
        args[at:at] = ["--addr", server]  # right after the command: before exec's ID
        rc = main(args)
        out, err = capsys.readouterr()
        return rc, out, err
    return run


@pytest.fixture
def ready(ember, backend: FakeBackend):
    """Template `py` with a pool of 1..3."""
    assert ember("template", "create", "py", "--kernel", "/k", "--rootfs", "/r")[0] == 0
    assert ember("pool", "set", "py", "--min-warm", "1", "--max-warm", "3")[0] == 0
    return ember


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_pool_set_ls_drain(ready, backend: FakeBackend) -> None:
    rc, out, _ = ready("pool", "ls")
    assert rc == 0
    header, row = out.splitlines()
    assert header.split() == ["TEMPLATE", "MIN", "MAX", "WARM", "LEASED", "RESTORING"]
    assert row.split() == ["py", "1", "3", "1", "0", "0"]
    rc, out, _ = ready("pool", "drain", "py", "--json")
    assert rc == 0 and json.loads(out) == {
        "template": "py", "min_warm": 0, "max_warm": 0, "warm": 0, "leased": 0, "restoring": 0,
        "launches_total": 0, "failures_total": 0, "launch_rate": 0.0, "mem_mib": 0}
    assert backend.last("set_pool").args == {"template": "py", "min_warm": 0, "max_warm": 0}
    rc, out, _ = ready("pool", "ls", "--json")
    assert [p["max_warm"] for p in json.loads(out)] == [0]


def test_pool_set_invalid_is_one_line_and_status_1(ready) -> None:
    rc, out, err = ready("pool", "set", "py", "--min-warm", "3", "--max-warm", "1")
    assert (rc, out) == (1, "")
    assert _one_error_line(err) == "ember: INVALID_ARGUMENT: min_warm (3) is greater than max_warm (1)"
    rc, _, err = ready("pool", "set", "nope", "--min-warm", "0", "--max-warm", "1")
    assert rc == 1 and _one_error_line(err) == "ember: NOT_FOUND: no template 'nope'"


def test_status_table_and_json(ready, backend: FakeBackend) -> None:
    ready("acquire", "py")
    ready("acquire", "py")
    rc, out, _ = ready("status")
    assert rc == 0
    lines = out.splitlines()
    assert "1 pool" in lines[0]
    assert lines[1].split() == ["TEMPLATE", "WARM", "LEASED", "RESTORING", "LAUNCHES", "FAILURES", "LAUNCH/S",
                                "MEM_MIB"]
    assert lines[2].split() == ["py", "1", "2", "0", "2", "0", "0.0", "0"]
    assert lines[3].split() == ["TOTAL", "1", "2", "0", "2", "0", "0.0", "0"]
    rc, out, _ = ready("status", "--json")
    doc = json.loads(out)
    assert doc["total"] == {"warm": 1, "leased": 2, "restoring": 0, "launches_total": 2, "failures_total": 0,
                            "launch_rate": 0.0, "mem_mib": 0}
    assert [p["template"] for p in doc["pools"]] == ["py"]


def test_acquire_json_and_table(ready, backend: FakeBackend) -> None:
    rc, out, _ = ready("acquire", "py", "--ttl", "60", "--meta", "user=ann", "--meta", "k=a=b",
                       "--idempotency-key", "key-1", "--json")
    assert rc == 0
    s = json.loads(out)
    assert {k: s[k] for k in ("id", "template", "state", "agent", "network", "metadata")} == {
        "id": "sb-1", "template": "py", "state": "leased",
        "agent": {"vsock_uds_path": "/run/ember/sb-1/v.sock", "port": 52},
        "network": {"ip_address": "10.0.0.1", "tap": "tap1"},
        "metadata": {"user": "ann", "k": "a=b"}}
    deadline = datetime.datetime.fromisoformat(s["lease_deadline"].replace("Z", "+00:00")).timestamp()
    assert abs(deadline - (time.time() + 60)) < 5
    assert backend.last("acquire").args["idempotency_key"] == "key-1"
    rc, out, _ = ready("acquire", "py")
    header, row = out.splitlines()
    assert header.split()[:3] == ["ID", "TEMPLATE", "STATE"]
    assert row.split()[:4] == ["sb-2", "py", "leased", "10.0.0.2"]


def test_acquire_errors(ready, backend: FakeBackend) -> None:
    rc, out, err = ready("acquire", "missing")
    assert (rc, out) == (1, "") and _one_error_line(err) == "ember: NOT_FOUND: no template 'missing'"
    backend.fail["acquire"] = ResourceExhausted("host memory limit reached")
    rc, _, err = ready("acquire", "py")
    assert rc == 1 and _one_error_line(err) == "ember: RESOURCE_EXHAUSTED: host memory limit reached"
    rc, _, err = ready("acquire", "py", "--meta", "novalue")
    assert rc == 1 and _one_error_line(err) == "ember: --meta 'novalue' is not KEY=VALUE"


def test_sandbox_ls_and_kill(ready) -> None:
    ready("acquire", "py")
    rc, out, _ = ready("sandbox", "ls", "--json")
    assert rc == 0 and [s["id"] for s in json.loads(out)] == ["sb-1"]
    rc, out, _ = ready("sandbox", "ls", "--template", "other", "--json")
    assert json.loads(out) == []
    rc, out, _ = ready("sandbox", "kill", "sb-1")
    assert (rc, out) == (0, "released sb-1\n")
    rc, out, _ = ready("sandbox", "ls")
    assert out.splitlines()[1:] == []
    rc, _, err = ready("sandbox", "kill", "sb-1")
    assert rc == 1 and _one_error_line(err) == "ember: NOT_FOUND: no sandbox 'sb-1'"


def test_sandbox_cp_in_and_out(ready, backend: FakeBackend, tmp_path, monkeypatch) -> None:
    ready("acquire", "py")
    src = tmp_path / "in.bin"
    data = bytes(range(256)) * 9000  # 2.2 MiB: three WriteFile messages
    src.write_bytes(data)
    src.chmod(0o750)
    rc, out, _ = ready("sandbox", "cp", str(src), "sb-1:/root/in.bin")
    assert (rc, out) == (0, f"{len(data)} bytes to sb-1:/root/in.bin\n")
    assert backend.files[("sb-1", "/root/in.bin")] == data
    assert backend.last("write_file").args["mode"] == 0o750
    rc, out, _ = ready("sandbox", "cp", "--json", "sb-1:/root/in.bin", str(tmp_path))  # into a directory
    assert rc == 0 and json.loads(out)["bytes"] == len(data) and (tmp_path / "in.bin").read_bytes() == data
    assert ready("sandbox", "cp", str(src), "sb-1:/tmp/")[0] == 0  # a guest directory: the source's name
    assert backend.files[("sb-1", "/tmp/in.bin")] == data
    rc, out, _ = ready("sandbox", "cp", "--mode", "600", str(src), "sb-1:/root/b")
    assert rc == 0 and backend.last("write_file").args["mode"] == 0o600
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"from stdin")))
    assert ready("sandbox", "cp", "-", "sb-1:/s")[0] == 0 and backend.files[("sb-1", "/s")] == b"from stdin"
    assert backend.last("write_file").args["mode"] == 0o644
    backend.files[("sb-1", "/small")] = b"hello\n"
    rc, out, _ = ready("sandbox", "cp", "sb-1:/small", "-")
    assert (rc, out) == (0, "hello\n")


def test_sandbox_cp_errors(ready, tmp_path) -> None:
    ready("acquire", "py")
    rc, _, err = ready("sandbox", "cp", str(tmp_path / "a"), str(tmp_path / "b"))
    assert rc == 1 and "exactly one of SRC and DST" in _one_error_line(err)
    rc, _, err = ready("sandbox", "cp", "sb-1:/x", "sb-1:/y")
    assert rc == 1 and "exactly one of SRC and DST" in _one_error_line(err)
    rc, _, err = ready("sandbox", "cp", "sb-1:/missing", str(tmp_path / "out"))
    assert rc == 1 and _one_error_line(err).startswith("ember: NOT_FOUND: no file '/missing'")
    assert list(tmp_path.iterdir()) == []  # no partial file left behind
    rc, _, err = ready("sandbox", "cp", "sb-1:/missing", "-")
    assert rc == 1 and "NOT_FOUND" in err


def test_sandbox_exec(ready, backend: FakeBackend, monkeypatch) -> None:
    ready("acquire", "py")
    rc, out, err = ready("sandbox", "exec", "sb-1", "--", "echo", "hi", "--flag")
    assert (rc, out, err) == (0, "hi --flag\n", "")
    rc, out, err = ready("sandbox", "exec", "sb-1", "--", "fail")
    assert (rc, out, err) == (3, "partial\n", "boom\n")
    rc, out, err = ready("sandbox", "exec", "--env", "A=1", "--env", "B=x=y", "--timeout", "5",
                         "sb-1", "--", "env")
    assert (rc, out) == (0, "A=1\nB=x=y\n")
    assert backend.last("exec").args["timeout"] == 5.0
    assert backend.last("exec").deadline is not None  # bounded by --timeout plus slack
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"from stdin")))
    rc, out, _ = ready("sandbox", "exec", "--stdin", "sb-1", "--", "cat")
    assert (rc, out) == (0, "from stdin")
    rc, _, err = ready("sandbox", "exec", "sb-1", "--", "sleep", "100")
    assert rc == client_cli.EXIT_TIMED_OUT and err == "ember: sleep timed out\n"
    rc, _, _ = ready("sandbox", "exec", "sb-1", "--", "killed")
    assert rc == 128 + 9
    rc, out, _ = ready("sandbox", "exec", "--json", "sb-1", "--", "fail")
    assert rc == 3 and json.loads(out) == {"exit_code": 3, "timed_out": False,
                                           "stdout": "partial\n", "stderr": "boom\n"}


def test_sandbox_exec_errors(ready) -> None:
    rc, _, err = ready("sandbox", "exec", "nope", "--", "echo")
    assert rc == 1 and _one_error_line(err) == "ember: NOT_FOUND: no sandbox 'nope'"
    ready("acquire", "py")
    rc, _, err = ready("sandbox", "exec", "sb-1", "--env", "A=1", "--", "env")
    assert rc == 1 and "put options before ID" in _one_error_line(err)
    rc, _, err = ready("sandbox", "exec", "sb-1", "--")
    assert rc == 1 and "no command" in _one_error_line(err)
    rc, _, err = ready("sandbox", "exec", "sb-1", "--", "explode")
    assert rc == 1 and _one_error_line(err) == "ember: FAILED_PRECONDITION: the agent went away"


def test_template_create_with_flags_shows_progress(ember, backend: FakeBackend, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(client_cli, "PROGRESS_INTERVAL", 0.05)
    backend.sleep["create_template"] = 0.3
    monkeypatch.chdir(tmp_path)
    rc, out, err = ember("template", "create", "py", "--kernel", "vmlinux", "--rootfs", "root.ext4",
                         "--boot-args", "console=ttyS0", "--vcpus", "2", "--mem", "256", "--json")
    assert rc == 0, err
    spec = backend.last("create_template").args["spec"]
    assert (spec.kernel, spec.rootfs, spec.initrd, spec.boot_args, spec.vcpus, spec.mem_mib) == \
        (str(tmp_path / "vmlinux"), str(tmp_path / "root.ext4"), None, "console=ttyS0", 2, 256)
    assert backend.last("create_template").deadline - time.monotonic() > 3000  # an hour, not 30 s
    t = json.loads(out)
    assert (t["name"], t["state"], t["vcpus"], t["mem_mib"]) == ("py", "ready", 2, 256)
    assert t["created"] == "2023-11-14T22:13:20.250Z"
    progress = err.splitlines()
    assert progress[0].startswith("ember: creating template py")
    assert any(line.startswith("ember: creating template py: ") for line in progress[1:-1])
    assert progress[-1].startswith("ember: template py is ready after ")


def test_template_create_defaults_to_the_built_images(ember, backend: FakeBackend, tmp_path, monkeypatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    files = {k: home / k for k in ("kernel", "initrd", "rootfs", "system_map", "kernel_config")}
    for f in files.values():
        f.write_text("x")
    (home / "images.json").write_text(json.dumps({**{k: str(v) for k, v in files.items()},
                                                  "boot_args": "console=ttyS0 quiet"}))
    monkeypatch.setenv("EMBER_HOME", str(home))
    rc, _, err = ember("template", "create", "py")
    assert rc == 0, err
    spec = backend.last("create_template").args["spec"]
    assert (spec.kernel, spec.rootfs, spec.initrd, spec.boot_args) == \
        (str(files["kernel"]), str(files["rootfs"]), None, "console=ttyS0 quiet")
    assert (spec.vcpus, spec.mem_mib) == (None, None)  # the service's defaults
    rc, _, err = ember("template", "create", "py2", "--initrd", "/boot/initrd.img")
    spec = backend.last("create_template").args["spec"]
    assert (spec.kernel, spec.rootfs, spec.initrd) == (str(files["kernel"]), None, "/boot/initrd.img")


def test_template_create_without_images_or_kernel(ember, backend: FakeBackend, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EMBER_HOME", str(tmp_path / "empty"))
    rc, out, err = ember("template", "create", "py")
    assert (rc, out) == (1, "")
    assert "ember images build" in _one_error_line(err)
    assert not any(c.method == "create_template" for c in backend.calls)


def test_template_ls_rm(ready, backend: FakeBackend) -> None:
    rc, out, _ = ready("template", "ls")
    header, row = out.splitlines()
    assert header.split() == ["NAME", "STATE", "VCPUS", "MEM", "MIB", "CREATED"]
    assert row.split() == ["py", "ready", "1", "128", "2023-11-14T22:13:20.250Z"]
    rc, _, err = ready("template", "create", "py", "--kernel", "/k")
    assert rc == 1 and "ember: ALREADY_EXISTS: template 'py' exists" in err.splitlines()[-1]
    ready("acquire", "py")
    rc, _, err = ready("template", "rm", "py")
    assert rc == 1 and _one_error_line(err) == "ember: FAILED_PRECONDITION: template 'py' has leased sandboxes"
    ready("sandbox", "kill", "sb-1")
    rc, out, _ = ready("template", "rm", "py", "--json")
    assert rc == 0 and json.loads(out) == {"name": "py", "deleted": True}
    rc, out, _ = ready("template", "ls", "--json")
    assert json.loads(out) == []


def test_deadline_flag(ready, backend: FakeBackend) -> None:
    backend.hold["list_pools"] = 10.0
    t0 = time.monotonic()
    rc, _, err = ready("status", "--deadline", "0.3")
    assert rc == 1 and _one_error_line(err).startswith("ember: DEADLINE_EXCEEDED")
    assert time.monotonic() - t0 < 3


def test_addr_from_environment(server: str, capsys, monkeypatch) -> None:
    monkeypatch.setenv("EMBER_ADDR", server)
    assert main(["pool", "ls", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert client_cli.service_addr("h:1") == "h:1"
    monkeypatch.delenv("EMBER_ADDR")
    assert client_cli.service_addr(None) == "127.0.0.1:50051"


def test_unreachable_service_is_unavailable(capsys) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc = main(["status", "--addr", f"127.0.0.1:{port}", "--deadline", "5"])
    out, err = capsys.readouterr()
    assert (rc, out) == (1, "")
    assert _one_error_line(err).startswith("ember: UNAVAILABLE: ")

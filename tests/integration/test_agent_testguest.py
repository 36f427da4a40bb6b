"""The test guest's `agent` mode (a PING-only agent on vsock) driven by poolsvc.agent.AgentClient.

The microVM runs `ember-vmm --no-api` with a vsock device (Firecracker's
hybrid vsock: the host connects to `uds_path` and sends `CONNECT 52`); the
client is the one the pool service uses.
"""

from __future__ import annotations

import shutil
import socket
import struct
import tempfile
from pathlib import Path

import pytest

from poolsvc.agent import (
    AgentClient,
    AgentConnectFailed,
    AgentRequestFailed,
    Error,
    FrameDecoder,
    Ping,
    Pong,
    encode,
)

GUEST_CID = 3


@pytest.fixture
def vsock_dir():
    """A short directory for the vsock Unix socket (sun_path holds 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="ember-ag-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def agent_vm(testguest, spawn_vmm, vsock_dir):
    """A running test guest in mode=agent, printing a line per request; yields (vmm, uds_path)."""
    uds = vsock_dir / "v.sock"
    vmm = spawn_vmm(testguest, "mode=agent agent.log=1",
                    config_extra={"vsock": {"guest_cid": GUEST_CID, "uds_path": str(uds)}})
    vmm.wait_for_output(r"^AGENT LISTENING 52 cid=3", timeout=60)
    yield vmm, uds


def _connect(uds: Path, port: int = 52) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(str(uds))
    s.sendall(f"CONNECT {port}\n".encode())
    line = b""
    while not line.endswith(b"\n"):
        chunk = s.recv(1)
        assert chunk, f"CONNECT {port} refused"
        line += chunk
    assert line.startswith(b"OK "), line
    return s


def _receive(s: socket.socket):
    decoder = FrameDecoder()
    while (msg := decoder.next_message()) is None:
        data = s.recv(4096)
        assert data, "connection closed before a whole frame"
        decoder.feed(data)
    return msg


@pytest.mark.kvm
def test_agent_client_pings_the_test_guest_repeatedly(agent_vm):
    vmm, uds = agent_vm
    client = AgentClient(str(uds), timeout=20)
    for _ in range(5):
        assert client.ping() == "testguest"
    vmm.wait_for_output(r"^AGENT PING 5\b", timeout=20)
    assert "TESTGUEST agent FAIL" not in vmm.stdout


@pytest.mark.kvm
def test_the_test_guest_prints_no_line_per_request_by_default(testguest, spawn_vmm, vsock_dir):
    # Pool templates use plain mode=agent: console bytes are emulated exits, so a line per
    # request would be counted in every Acquire of a test-guest template.
    uds = vsock_dir / "v.sock"
    vmm = spawn_vmm(testguest, "mode=agent", config_extra={"vsock": {"guest_cid": GUEST_CID, "uds_path": str(uds)}})
    vmm.wait_for_output(r"^AGENT LISTENING 52 cid=3", timeout=60)
    client = AgentClient(str(uds), timeout=20)
    for _ in range(3):
        assert client.ping() == "testguest"
    with pytest.raises(AgentRequestFailed):
        client.run(["true"])
    assert AgentClient(str(uds), timeout=20).ping() == "testguest"
    lines = [line for line in vmm.stdout.splitlines() if line.startswith("AGENT")]
    assert lines == ["AGENT LISTENING 52 cid=3"], lines


@pytest.mark.kvm
def test_test_guest_serves_several_pings_on_one_connection_and_refuses_exec(agent_vm):
    vmm, uds = agent_vm
    with _connect(uds) as s:
        for _ in range(3):
            s.sendall(encode(Ping()))
            assert _receive(s) == Pong(1, "testguest")
    with pytest.raises(AgentRequestFailed, match="exec not supported by the test guest"):
        AgentClient(str(uds), timeout=20).run(["echo", "hi"])
    # A malformed frame: ERROR, then the guest closes; it keeps serving others.
    with _connect(uds) as s:
        s.sendall(struct.pack(">BI", 0x7F, 0))
        reply = _receive(s)
        assert isinstance(reply, Error) and "unknown request type" in reply.message
    assert AgentClient(str(uds), timeout=20).ping() == "testguest"
    assert "TESTGUEST agent FAIL" not in vmm.stdout


@pytest.mark.kvm
def test_connect_to_a_port_nobody_listens_on_fails_cleanly(agent_vm):
    _vmm, uds = agent_vm
    with pytest.raises(AgentConnectFailed):
        AgentClient(str(uds), port=53, timeout=20).ping()
    assert AgentClient(str(uds), timeout=20).ping() == "testguest"

"""guest/tools/ember-agent.c compiled for the host and run with --unix PATH.

The agent is built exactly as guest/rootfs.py builds it for the guest
(compile_tool: gcc with TOOL_CFLAGS, static, checked for PT_INTERP) and
driven through poolsvc.agent.AgentClient in its direct mode (port=None: no
hybrid-vsock CONNECT line), so the protocol, the process handling and the
hostile-input paths are tested without booting a guest.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import stat
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from guest.rootfs import INIT_D_DIR, TOOLS_DIR, compile_tool, load_hooks, rootfs_cache_key, stage_tree
from poolsvc.agent import (
    AgentClient,
    AgentRequestFailed,
    Error,
    Exec,
    Exit,
    FrameDecoder,
    Ping,
    Pong,
    Stdout,
    encode,
)

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")


@pytest.fixture(scope="module")
def agent_binary(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("agent-build")
    return compile_tool("ember-agent", (TOOLS_DIR / "ember-agent.c").read_bytes(), workdir)


@pytest.fixture
def agent(agent_binary):
    """A running agent on a Unix socket; yields (client, socket path, process)."""
    directory = Path(tempfile.mkdtemp(prefix="ember-agent-"))
    path = directory / "a.sock"
    proc = subprocess.Popen([agent_binary, "--unix", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = proc.stdout.readline()
        assert line == f"ember-agent: listening on unix socket {path}\n".encode(), (line, proc.stderr.read())
        yield AgentClient(str(path), port=None, timeout=10), path, proc
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(directory, ignore_errors=True)


def raw(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(path))
    return s


def read_reply(s: socket.socket, decoder: FrameDecoder):
    """The next message on s. The decoder must live as long as the connection:
    one recv may carry several frames (STDOUT and EXIT often arrive together),
    and the bytes after the first frame stay buffered in it for the next call."""
    while (msg := decoder.next_message()) is None:
        data = s.recv(65536)
        if not data:
            return None
        decoder.feed(data)
    return msg


def assert_closed(s: socket.socket) -> None:
    assert s.recv(1) == b""


def test_ping_and_echo(agent):
    client, _path, _proc = agent
    assert client.ping() == "ember-agent 1.0"
    result = client.run(["echo", "hi"])
    assert (result.exit_code, result.stdout, result.stderr, result.timed_out) == (0, b"hi\n", b"", False)


def test_stdin_is_piped_and_big_output_streams_in_chunks(agent):
    client, _path, _proc = agent
    data = os.urandom(3 << 20)
    events = list(client.exec(["cat"], stdin=data))
    assert events[-1] == Exit(0)
    chunks = [e.data for e in events if isinstance(e, Stdout)]
    assert b"".join(chunks) == data and max(map(len, chunks)) <= 64 << 10


def test_stderr_exit_codes_env_and_cwd(agent):
    client, _path, _proc = agent
    r = client.run(["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (r.exit_code, r.stdout, r.stderr) == (7, b"out\n", b"err\n")
    assert client.run(["sh", "-c", "kill -TERM $$"]).exit_code == -15
    r = client.run(["sh", "-c", 'echo "$GREETING|$HOME|$PATH"; pwd'], env={"GREETING": "hello"}, cwd="/tmp")
    assert r.stdout == b"hello|/root|/sbin:/bin:/usr/sbin:/usr/bin\n/tmp\n"
    r = client.run(["no-such-program-ember"])
    assert r.exit_code == 127 and b"No such file or directory" in r.stderr
    r = client.run(["true"], cwd="/no/such/dir")
    assert r.exit_code == 126 and b"cannot enter directory /no/such/dir" in r.stderr


def test_timeout_kills_the_whole_process_group(agent, tmp_path):
    client, _path, _proc = agent
    marker = tmp_path / "grandchild-survived"
    start = time.monotonic()
    r = client.run(["sh", "-c", f"(sleep 2; touch {marker}) & sleep 30"], timeout_s=0.5)
    assert r.timed_out and r.exit_code == -9
    assert time.monotonic() - start < 5
    time.sleep(2.5)
    assert not marker.exists()
    assert client.run(["true"]).exit_code == 0


def test_a_background_process_does_not_hold_the_exit(agent):
    client, _path, _proc = agent
    start = time.monotonic()
    r = client.run(["sh", "-c", "sleep 5 & echo started"])
    assert (r.exit_code, r.stdout) == (0, b"started\n")
    assert time.monotonic() - start < 3


def test_write_file_replaces_atomically_with_the_mode(agent, tmp_path):
    client, _path, _proc = agent
    target = tmp_path / "metadata.json"
    client.write_file(str(target), b'{"id": "sb-1"}', mode=0o600)
    assert target.read_bytes() == b'{"id": "sb-1"}' and stat.S_IMODE(target.stat().st_mode) == 0o600
    client.write_file(str(target), b"second")
    assert target.read_bytes() == b"second" and stat.S_IMODE(target.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metadata.json"]
    with pytest.raises(AgentRequestFailed, match="No such file or directory"):
        client.write_file(str(tmp_path / "missing" / "x"), b"")


def test_read_file_streams_a_regular_file_in_chunks(agent, tmp_path):
    client, _path, _proc = agent
    data = os.urandom((3 << 20) + 17)
    (tmp_path / "big").write_bytes(data)
    chunks = list(client.read_file(str(tmp_path / "big")))
    assert b"".join(chunks) == data and max(map(len, chunks)) <= 64 << 10
    (tmp_path / "empty").write_bytes(b"")
    assert list(client.read_file(str(tmp_path / "empty"))) == []
    assert b"".join(client.read_file("/proc/self/status")).startswith(b"Name:")  # size 0 in stat, read to EOF


def test_read_file_refuses_what_is_not_a_regular_file_without_blocking(agent, tmp_path):
    client, _path, proc = agent
    os.mkfifo(tmp_path / "fifo")  # nobody writes: a blocking open or read would hang the agent
    for name, message in [("missing", "No such file or directory"), ("", "Is a directory"),
                          ("fifo", "Invalid argument")]:
        with pytest.raises(AgentRequestFailed, match=message):
            b"".join(client.read_file(str(tmp_path / name)))
    with pytest.raises(AgentRequestFailed, match="Invalid argument"):
        b"".join(client.read_file("/dev/zero"))  # endless: refused, not streamed forever
    assert proc.poll() is None and client.ping() == "ember-agent 1.0"


def test_write_file_chunks_writes_long_files_in_parts(agent, tmp_path):
    client, _path, _proc = agent
    data = os.urandom(9 << 20)  # three frames: WRITE_FILE, then two APPEND_FILEs
    target = tmp_path / "upload.bin"
    pieces = (data[i:i + 300_000] for i in range(0, len(data), 300_000))
    assert client.write_file_chunks(str(target), pieces, mode=0o600) == len(data)
    assert target.read_bytes() == data and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert client.write_file_chunks(str(target), iter([b"a", b"b"])) == 2 and target.read_bytes() == b"ab"
    assert client.write_file_chunks(str(target), iter([])) == 0 and target.read_bytes() == b""
    assert b"".join(client.read_file(str(target))) == b""


def test_append_file_needs_an_existing_regular_file_and_follows_no_link(agent, tmp_path):
    from poolsvc.agent import AppendFile
    client, _path, _proc = agent
    with pytest.raises(AgentRequestFailed, match="No such file or directory"):
        client._expect_ok(AppendFile(str(tmp_path / "missing").encode(), b"x"), "APPEND_FILE")
    (tmp_path / "real").write_bytes(b"keep")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(AgentRequestFailed, match="Too many levels of symbolic links"):
        client._expect_ok(AppendFile(str(tmp_path / "link").encode(), b"x"), "APPEND_FILE")
    assert (tmp_path / "real").read_bytes() == b"keep"
    client._expect_ok(AppendFile(str(tmp_path / "real").encode(), b"+more"), "APPEND_FILE")
    assert (tmp_path / "real").read_bytes() == b"keep+more"


def test_several_requests_on_one_connection(agent):
    _client, path, _proc = agent
    with raw(path) as s:
        decoder = FrameDecoder()
        s.sendall(encode(Ping()))
        assert read_reply(s, decoder) == Pong(1, "ember-agent 1.0")
        s.sendall(encode(Exec((b"echo", b"one"))))
        assert read_reply(s, decoder) == Stdout(b"one\n")
        assert read_reply(s, decoder) == Exit(0)
        s.sendall(encode(Ping()))
        assert read_reply(s, decoder) == Pong(1, "ember-agent 1.0")
        assert decoder.pending == 0


@pytest.mark.parametrize("frame, message", [
    (struct.pack(">BI", 0x7F, 0), "unknown request type"),
    (struct.pack(">BI", 0x84, 0), "unknown request type"),  # a response type sent as a request
    (struct.pack(">BI", 0x02, 0xFFFFFFFF), "longer than 8 MiB"),
    (struct.pack(">BIB", 0x01, 1, 9), "unsupported protocol version"),
    (struct.pack(">BI", 0x01, 0), "unsupported protocol version"),
    (struct.pack(">BII", 0x02, 4, 0), "argc out of range"),
    (struct.pack(">BII", 0x02, 4, 4097), "argc out of range"),
    (struct.pack(">BIII", 0x02, 8, 1, 0xFFFFFFF0), "malformed EXEC"),  # argv[0] longer than the payload
    (encode(Exec((b"true",)))[:1] + struct.pack(">I", len(encode(Exec((b"true",)))) - 4)
     + encode(Exec((b"true",)))[5:] + b"\0", "trailing"),
    (struct.pack(">BIIB", 0x02, 29, 1, 0) + struct.pack(">I", 0) + b"\0" * 20, "malformed EXEC"),  # empty argv[0]
    (struct.pack(">BI", 0x03, 12) + struct.pack(">I", 1) + b"x" + struct.pack(">I", 0o644)[:3] + b"\0" * 4,
     "malformed WRITE_FILE"),
    (struct.pack(">BI", 0x04, 4) + b"\0" * 4, "malformed SET_TIME"),
    (struct.pack(">BII", 0x05, 7, 3) + b"etc", "malformed READ_FILE"),  # a relative path
    (struct.pack(">BII", 0x05, 9, 4) + b"/etc" + b"\0", "malformed READ_FILE"),  # trailing byte
    (struct.pack(">BII", 0x06, 8, 4) + b"/tmp", "malformed APPEND_FILE"),  # no data field
    (struct.pack(">BIQ", 0x04, 8, 1 << 63), "malformed SET_TIME"),
])
def test_malformed_frames_get_error_and_close_and_the_agent_keeps_serving(agent, frame, message):
    client, path, proc = agent
    with raw(path) as s:
        s.sendall(frame)
        reply = read_reply(s, FrameDecoder())
        assert isinstance(reply, Error) and message in reply.message, reply
        assert_closed(s)
    assert proc.poll() is None
    assert client.run(["echo", "still"]).stdout == b"still\n"


def test_random_garbage_never_crashes_the_agent(agent):
    # PING and EXEC with random payloads, and random types. (Never WRITE_FILE,
    # APPEND_FILE or SET_TIME: a random frame that happened to be valid would change the host.)
    client, path, proc = agent
    rng = random.Random(52)
    for _ in range(200):
        kind = rng.choice([0x01, 0x02, 0x00, 0x08, 0x7F, 0x86, 0xFF])
        payload = rng.randbytes(rng.randrange(0, 64))
        declared = rng.choice([len(payload), len(payload) + rng.randrange(1, 9), rng.randrange(0, 1 << 32)])
        with raw(path) as s:
            s.sendall(struct.pack(">BI", kind, declared) + payload)
            if declared == len(payload) or declared > 8 << 20 or kind not in (0x01, 0x02):
                reply = read_reply(s, FrameDecoder())
                assert isinstance(reply, (Error, Pong)), reply
    assert proc.poll() is None
    assert client.ping() == "ember-agent 1.0"


def test_nul_in_argv_and_env_without_equals_are_refused(agent):
    _client, path, _proc = agent
    payload = struct.pack(">I", 1) + struct.pack(">I", 3) + b"a\0b" + struct.pack(">III", 0, 0, 0) + struct.pack(">I", 0)
    with raw(path) as s:
        s.sendall(struct.pack(">BI", 0x02, len(payload)) + payload)
        assert "malformed EXEC" in read_reply(s, FrameDecoder()).message
    payload = (struct.pack(">II", 1, 4) + b"true" + struct.pack(">II", 1, 5) + b"NOVAL"
               + struct.pack(">III", 0, 0, 0))
    with raw(path) as s:
        s.sendall(struct.pack(">BI", 0x02, len(payload)) + payload)
        assert "malformed EXEC" in read_reply(s, FrameDecoder()).message


def test_truncated_and_silent_connections_do_not_block_others(agent):
    client, path, proc = agent
    with raw(path) as s:
        s.sendall(b"\x02\x00\x00")  # half a header, then hang up
    idle = raw(path)  # connects, then sends nothing
    try:
        start = time.monotonic()
        assert client.ping() == "ember-agent 1.0"  # the silent one yields after 0.5 s
        assert time.monotonic() - start < 3
    finally:
        idle.close()
    assert proc.poll() is None


def test_an_idle_connection_yields_to_a_waiting_client(agent):
    client, path, _proc = agent
    with raw(path) as s:
        s.sendall(encode(Ping()))
        assert isinstance(read_reply(s, FrameDecoder()), Pong)
        start = time.monotonic()
        assert client.ping() == "ember-agent 1.0"
        assert time.monotonic() - start < 2
        assert_closed(s)


def test_client_hang_up_kills_the_running_command(agent, tmp_path):
    client, path, proc = agent
    marker = tmp_path / "finished"
    with raw(path) as s:
        s.sendall(encode(Exec((b"sh", b"-c", f"sleep 2; touch {marker}".encode()))))
        time.sleep(0.3)
    time.sleep(2.5)
    assert not marker.exists()
    assert client.run(["true"]).exit_code == 0
    assert proc.poll() is None


def test_usage_errors_exit_2(agent_binary):
    result = subprocess.run([agent_binary, "--port", "x"], capture_output=True, timeout=10)
    assert result.returncode == 2 and b"usage" in result.stderr


# --- installing the hook in the guest tree (guest/rootfs.py) ------------------------------


def test_the_agent_hook_is_installed_executable_and_keyed(tmp_path):
    hooks = load_hooks()
    assert ("50-agent" in dict(hooks)) and (INIT_D_DIR / "50-agent").is_file()
    busybox = tmp_path / "busybox"
    applets = ["bin/sh", "bin/mount", "bin/devmem", "bin/setsid", "bin/cttyhack", "bin/reboot", "bin/base64",
               "bin/sleep", "bin/mkdir"]
    busybox.write_text("#!/bin/sh\n" + "".join(f"echo /{a}\n" for a in applets))
    busybox.chmod(0o755)
    tree = tmp_path / "tree"
    tree.mkdir()
    stage_tree(tree, b"#!/bin/sh\n", busybox=busybox, hooks=hooks)
    installed = tree / "etc/ember/init.d/50-agent"
    assert installed.read_bytes() == dict(hooks)["50-agent"]
    assert stat.S_IMODE(installed.stat().st_mode) == 0o755
    key = rootfs_cache_key(b"init", b"busybox", hooks=hooks)
    assert rootfs_cache_key(b"init", b"busybox", hooks=[("50-agent", b"changed")]) != key
    assert rootfs_cache_key(b"init", b"busybox") != key

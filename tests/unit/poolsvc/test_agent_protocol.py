"""poolsvc.agent's frame codec (docs/agent.md): round trips, exact bytes, hostile input,
and the client against an in-memory peer (socketpair) speaking the protocol."""

from __future__ import annotations

import socket
import struct
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poolsvc.agent import (
    MAX_PAYLOAD,
    AgentClient,
    AgentConnectFailed,
    AgentConnectionError,
    AgentProtocolError,
    AgentRequestFailed,
    AgentTimeout,
    AppendFile,
    Error,
    Exec,
    ExecResult,
    Exit,
    FileData,
    FrameDecoder,
    Ok,
    Ping,
    Pong,
    ReadFile,
    SetTime,
    Stderr,
    Stdout,
    WriteFile,
    decode_payload,
    encode,
)

text = st.binary(max_size=64).filter(lambda b: b"\0" not in b)
env_entry = st.builds(lambda k, v: k + b"=" + v, text.filter(lambda b: b and b"=" not in b), text)

messages = st.one_of(
    st.builds(Ping, st.integers(0, 255)),
    st.builds(Pong, st.integers(0, 255), st.text(max_size=40)),
    st.builds(Exec, st.lists(text, min_size=1, max_size=5).filter(lambda a: a[0] != b"").map(tuple),
              st.lists(env_entry, max_size=4).map(tuple), text, st.integers(0, 2**32 - 1),
              st.binary(max_size=200)),
    st.builds(Stdout, st.binary(max_size=200)),
    st.builds(Stderr, st.binary(max_size=200)),
    st.builds(Exit, st.integers(-(2**31), 2**31 - 1), st.booleans()),
    st.builds(WriteFile, text.map(lambda b: b"/" + b), st.integers(0, 0o7777), st.binary(max_size=200)),
    st.builds(SetTime, st.integers(0, 2**63 - 1)),
    st.builds(ReadFile, text.map(lambda b: b"/" + b)),
    st.builds(AppendFile, text.map(lambda b: b"/" + b), st.binary(max_size=200)),
    st.builds(FileData, st.binary(max_size=200)),
    st.just(Ok()),
    st.builds(Error, st.text(max_size=80)),
)


def decode_all(data: bytes) -> list:
    decoder = FrameDecoder()
    decoder.feed(data)
    out = []
    while (msg := decoder.next_message()) is not None:
        out.append(msg)
    assert decoder.pending == 0
    return out


@given(messages)
def test_decode_of_encode_is_identity(msg):
    assert decode_all(encode(msg)) == [msg]


@given(st.lists(messages, max_size=5), st.integers(1, 7))
def test_a_stream_split_anywhere_decodes_the_same(msgs, step):
    stream = b"".join(encode(m) for m in msgs)
    decoder = FrameDecoder()
    out = []
    for i in range(0, len(stream), step):
        decoder.feed(stream[i:i + step])
        while (msg := decoder.next_message()) is not None:
            out.append(msg)
    assert out == msgs


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_garbage_raises_only_the_protocol_error(data):
    decoder = FrameDecoder()
    decoder.feed(data)
    try:
        while decoder.next_message() is not None:
            pass
    except AgentProtocolError:
        pass


@settings(max_examples=500)
@given(st.sampled_from([0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x87, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x00, 0x7F, 0xFF]),
       st.binary(max_size=120))
def test_garbage_payloads_of_every_type_raise_only_the_protocol_error(kind, payload):
    try:
        decode_payload(kind, payload)
    except AgentProtocolError:
        pass


def test_exact_bytes_of_the_documented_examples():
    # docs/agent.md "Examples".
    assert encode(Ping()) == bytes.fromhex("01 00000001 01")
    assert encode(Pong(1, "ember-agent 1.0")) == b"\x81\x00\x00\x00\x10\x01ember-agent 1.0"
    assert encode(Exec((b"echo", b"hi"))) == bytes.fromhex(
        "02 00000022" "00000002" "00000004" "6563686f" "00000002" "6869" "00000000" "00000000" "00000000" "00000000")
    assert encode(Exit(-9, True)) == bytes.fromhex("84 00000005 fffffff7 01")
    assert encode(SetTime(1)) == bytes.fromhex("04 00000008 0000000000000001")
    assert encode(Ok()) == bytes.fromhex("85 00000000")
    assert encode(ReadFile(b"/etc/hostname")) == bytes.fromhex("05 00000011 0000000d") + b"/etc/hostname"
    assert encode(AppendFile(b"/x", b"ab")) == bytes.fromhex("06 0000000c 00000002 2f78 00000002 6162")
    assert encode(FileData(b"hi")) == bytes.fromhex("87 00000002 6869")


def test_oversized_and_malformed_frames_are_refused():
    decoder = FrameDecoder()
    decoder.feed(struct.pack(">BI", 0x82, MAX_PAYLOAD + 1))
    with pytest.raises(AgentProtocolError, match="more than"):
        decoder.next_message()
    with pytest.raises(AgentProtocolError, match="unknown frame type"):
        decode_payload(0x42, b"")
    with pytest.raises(AgentProtocolError, match="trailing"):
        decode_payload(0x02, encode(Exec((b"true",)))[5:] + b"x")
    with pytest.raises(AgentProtocolError):  # argc says 4096 entries, the payload holds none
        decode_payload(0x02, struct.pack(">I", 4096))
    with pytest.raises(AgentProtocolError, match="argc"):
        decode_payload(0x02, struct.pack(">I", 4097))
    with pytest.raises(AgentProtocolError, match="EXIT"):
        decode_payload(0x84, struct.pack(">iB", 0, 2))


def test_encoder_refuses_what_the_agent_would_refuse():
    with pytest.raises(AgentProtocolError, match="NUL"):
        encode(Exec((b"a\0b",)))
    with pytest.raises(AgentProtocolError, match="argv"):
        encode(Exec(()))
    with pytest.raises(AgentProtocolError, match="NAME=VALUE"):
        encode(Exec((b"env",), env=(b"NOEQUALS",)))
    with pytest.raises(AgentProtocolError, match="absolute"):
        encode(WriteFile(b"relative", 0o644, b""))
    with pytest.raises(AgentProtocolError, match="mode"):
        encode(WriteFile(b"/x", 0o10000, b""))
    with pytest.raises(AgentProtocolError, match="more than"):
        encode(Exec((b"cat",), stdin=bytes(MAX_PAYLOAD + 1)))
    with pytest.raises(AgentProtocolError, match="absolute"):
        encode(ReadFile(b"etc/passwd"))
    with pytest.raises(AgentProtocolError, match="absolute"):
        encode(AppendFile(b"x", b""))
    with pytest.raises(AgentProtocolError, match="more than"):
        encode(FileData(bytes((64 << 10) + 1)))
    with pytest.raises(AgentProtocolError, match="FILE_DATA"):
        decode_payload(0x87, bytes((64 << 10) + 1))


# --- the client against an in-memory hybrid-vsock peer ------------------------------------


class FakeMuxer:
    """A Unix socket server speaking Firecracker's CONNECT handshake, then running
    `serve(sock, decoder)` per connection; answer=None refuses the CONNECT (closes)."""

    def __init__(self, path: Path, serve, answer: bytes | None = b"OK 1073741824\n"):
        self.path, self.serve, self.answer = path, serve, answer
        self.connect_lines: list[bytes] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                line = b""
                while not line.endswith(b"\n"):
                    chunk = conn.recv(1)
                    if not chunk:
                        break
                    line += chunk
                self.connect_lines.append(line)
                if self.answer is None:
                    continue
                conn.sendall(self.answer)
                decoder = FrameDecoder()
                try:
                    self.serve(conn, decoder)
                except OSError:
                    pass

    def close(self):
        self.sock.close()


def next_request(conn, decoder):
    while (msg := decoder.next_message()) is None:
        data = conn.recv(65536)
        if not data:
            return None
        decoder.feed(data)
    return msg


@pytest.fixture
def muxer(tmp_path):
    servers = []

    def make(serve, answer=b"OK 1073741824\n"):
        m = FakeMuxer(tmp_path / f"v{len(servers)}.sock", serve, answer)
        servers.append(m)
        return m

    yield make
    for m in servers:
        m.close()


def test_client_handshakes_and_runs_requests(muxer):
    seen = []

    def serve(conn, decoder):
        req = next_request(conn, decoder)
        seen.append(req)
        if isinstance(req, Ping):
            conn.sendall(encode(Pong(1, "fake 1")))
        elif isinstance(req, Exec):
            conn.sendall(encode(Stdout(b"h")) + encode(Stderr(b"e")) + encode(Stdout(b"i\n")) + encode(Exit(3)))
        elif isinstance(req, (WriteFile, SetTime)):
            conn.sendall(encode(Ok()))

    m = muxer(serve)
    client = AgentClient(str(m.path), port=52, timeout=5)
    assert client.ping() == "fake 1"
    events = list(client.exec(["echo", "hi"], stdin=b"in", env={"A": "b"}, cwd="/tmp", timeout_s=1.5))
    assert events == [Stdout(b"h"), Stderr(b"e"), Stdout(b"i\n"), Exit(3)]
    assert client.run(["x"]) == ExecResult(3, b"hi\n", b"e", False)
    client.write_file("/run/ember/metadata.json", b"{}", mode=0o600)
    client.set_time(1_700_000_000_000_000_000)
    assert m.connect_lines == [b"CONNECT 52\n"] * 5
    assert seen[1] == Exec((b"echo", b"hi"), (b"A=b",), b"/tmp", 1500, b"in")
    assert seen[3] == WriteFile(b"/run/ember/metadata.json", 0o600, b"{}")
    assert seen[4] == SetTime(1_700_000_000_000_000_000)


def test_refresh_clone_writes_metadata_then_steps_the_clock_on_one_connection(muxer):
    seen = []

    def serve(conn, decoder):
        while (req := next_request(conn, decoder)) is not None:
            seen.append(req)
            if isinstance(req, WriteFile) and req.path == b"/refused":
                conn.sendall(encode(Error("read-only file system")))
            elif isinstance(req, SetTime) and req.ns == 1:
                conn.sendall(encode(Error("unknown request type 4")))  # an agent without clocks
            else:
                conn.sendall(encode(Ok()))

    m = muxer(serve)
    client = AgentClient(str(m.path), port=52, timeout=5)
    assert client.refresh_clone(("/run/ember/metadata.json", b'{"a": "b"}'), clock=lambda: 1_800_000_000_000_000_000)
    assert seen == [WriteFile(b"/run/ember/metadata.json", 0o644, b'{"a": "b"}'), SetTime(1_800_000_000_000_000_000)]
    assert m.connect_lines == [b"CONNECT 52\n"]
    # Without metadata: the clock alone; a refused SET_TIME is an answer all the same.
    seen.clear()
    assert client.refresh_clone(clock=lambda: 5)
    assert client.refresh_clone(clock=lambda: 1) is False
    assert seen == [SetTime(5), SetTime(1)]
    # A refused metadata write is the caller's error, and the clock is then left alone.
    seen.clear()
    with pytest.raises(AgentRequestFailed, match="read-only"):
        client.refresh_clone(("/refused", b"{}"), clock=lambda: 7)
    assert seen == [WriteFile(b"/refused", 0o644, b"{}")]


def test_client_reports_each_failure_as_its_error(muxer, tmp_path):
    with pytest.raises(AgentConnectionError, match="cannot connect"):
        AgentClient(str(tmp_path / "missing.sock"), timeout=2).ping()
    refused = muxer(lambda c, d: None, answer=None)
    with pytest.raises(AgentConnectFailed, match="refused"):
        AgentClient(str(refused.path), timeout=2).ping()
    garbled = muxer(lambda c, d: None, answer=b"NOPE\n")
    with pytest.raises(AgentConnectFailed, match="NOPE"):
        AgentClient(str(garbled.path), timeout=2).ping()

    def error(conn, decoder):
        next_request(conn, decoder)
        conn.sendall(encode(Error("exec not supported")))

    with pytest.raises(AgentRequestFailed, match="exec not supported"):
        AgentClient(str(muxer(error).path), timeout=2).run(["true"])

    def garbage(conn, decoder):
        next_request(conn, decoder)
        conn.sendall(b"\x99\x00\x00\x00\x00")

    with pytest.raises(AgentProtocolError, match="unknown frame type"):
        AgentClient(str(muxer(garbage).path), timeout=2).ping()

    def silent(conn, decoder):
        next_request(conn, decoder)
        conn.recv(1)  # holds the connection until the client gives up

    with pytest.raises(AgentTimeout):
        AgentClient(str(muxer(silent).path), timeout=0.3).ping()

    def hang_up(conn, decoder):
        next_request(conn, decoder)
        conn.sendall(encode(Stdout(b"partial"))[:4])

    with pytest.raises(AgentConnectionError, match="mid-frame"):
        AgentClient(str(muxer(hang_up).path), timeout=2).run(["true"])


def test_repr_names_the_socket_and_port(tmp_path):
    assert repr(AgentClient(str(tmp_path / "v.sock"))) == f"<AgentClient {tmp_path / 'v.sock'} vsock port 52>"
    assert "direct" in repr(AgentClient("/x", port=None))

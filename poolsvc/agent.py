"""Host-side client of the Ember guest agent (docs/agent.md).

Primer. The agent (guest/tools/ember-agent.c) listens on vsock port 52 in
the guest. The host reaches it through Firecracker's hybrid vsock: connect
to the VM's ``uds_path`` Unix socket, send ``CONNECT 52\\n``, read
``OK <host port>\\n``; from then on the stream is the agent's. Both
directions carry frames::

    u8 type | u32 length (big-endian) | payload

A request (PING, EXEC, WRITE_FILE, SET_TIME, READ_FILE, APPEND_FILE) is
answered by PONG; a stream of STDOUT/STDERR chunks ending with EXIT; OK;
OK; a stream of FILE_DATA chunks ending with OK; OK - or by ERROR. The module
has two layers, in h11's manner:

* a pure codec: message dataclasses, ``encode(msg) -> bytes`` and
  ``FrameDecoder`` (feed bytes, take messages), which never does I/O and
  raises nothing but ``AgentProtocolError`` on bad input;
* ``AgentClient``, which opens one connection per call, so that a dead or
  slow call never poisons the next one.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "AGENT_PORT",
    "PROTOCOL_VERSION",
    "MAX_PAYLOAD",
    "MAX_ARGS",
    "MAX_STRING",
    "MAX_PATH",
    "AgentError",
    "AgentConnectionError",
    "AgentConnectFailed",
    "AgentProtocolError",
    "AgentTimeout",
    "AgentRequestFailed",
    "Ping",
    "Pong",
    "Exec",
    "Stdout",
    "Stderr",
    "Exit",
    "WriteFile",
    "SetTime",
    "ReadFile",
    "AppendFile",
    "FileData",
    "Ok",
    "Error",
    "Message",
    "ExecEvent",
    "ExecResult",
    "encode",
    "decode_payload",
    "FrameDecoder",
    "AgentClient",
]

AGENT_PORT = 52
PROTOCOL_VERSION = 1

# docs/agent.md "Frames": type codes. Requests have the high bit clear.
T_PING, T_EXEC, T_WRITE_FILE, T_SET_TIME, T_READ_FILE, T_APPEND_FILE = 0x01, 0x02, 0x03, 0x04, 0x05, 0x06
T_PONG, T_STDOUT, T_STDERR, T_EXIT, T_OK, T_ERROR, T_FILE_DATA = 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87

# docs/agent.md "Limits" (the same numbers as ember-agent.c).
HEADER = struct.Struct(">BI")
MAX_PAYLOAD = 8 << 20
MAX_ARGS = 4096
MAX_STRING = 128 << 10
MAX_PATH = 4096
MAX_CHUNK = 64 << 10
MAX_ERROR = 4096
MAX_CONNECT_REPLY = 64
# The data of one WRITE_FILE or APPEND_FILE the client sends: well under MAX_PAYLOAD with
# the path and lengths around it. Longer files go as WRITE_FILE + APPEND_FILEs.
FILE_FRAME_DATA = 4 << 20


class AgentError(Exception):
    """The guest agent could not do what was asked."""


class AgentConnectionError(AgentError):
    """The agent's socket could not be reached (refused, missing, reset)."""


class AgentConnectFailed(AgentConnectionError):
    """The hybrid vsock CONNECT handshake failed: nothing listens on the guest port."""


class AgentProtocolError(AgentError):
    """A frame broke the agent protocol."""


class AgentTimeout(AgentError):
    """The agent did not answer in time."""


class AgentRequestFailed(AgentError):
    """The agent answered ERROR."""


# --- messages ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ping:
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class Pong:
    version: int
    agent: str


@dataclass(frozen=True)
class Exec:
    argv: tuple[bytes, ...]
    env: tuple[bytes, ...] = ()
    cwd: bytes = b""
    timeout_ms: int = 0
    stdin: bytes = b""


@dataclass(frozen=True)
class Stdout:
    data: bytes


@dataclass(frozen=True)
class Stderr:
    data: bytes


@dataclass(frozen=True)
class Exit:
    status: int  # exit code, or -signal
    timed_out: bool = False


@dataclass(frozen=True)
class WriteFile:
    path: bytes
    mode: int
    data: bytes


@dataclass(frozen=True)
class SetTime:
    ns: int


@dataclass(frozen=True)
class ReadFile:
    path: bytes


@dataclass(frozen=True)
class AppendFile:
    path: bytes
    data: bytes


@dataclass(frozen=True)
class FileData:
    data: bytes


@dataclass(frozen=True)
class Ok:
    pass


@dataclass(frozen=True)
class Error:
    message: str


Message = (Ping | Pong | Exec | Stdout | Stderr | Exit | WriteFile | SetTime | ReadFile | AppendFile | FileData
           | Ok | Error)
ExecEvent = Stdout | Stderr | Exit


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False


# --- encoding ------------------------------------------------------------------------------


def _u32(value: int) -> bytes:
    return struct.pack(">I", value)


def _string(value: bytes, limit: int, what: str) -> bytes:
    if len(value) > limit:
        raise AgentProtocolError(f"{what} is {len(value)} bytes, more than {limit}")
    if b"\0" in value:
        raise AgentProtocolError(f"{what} contains a NUL byte")
    return _u32(len(value)) + value


def _blob(value: bytes, limit: int, what: str) -> bytes:
    if len(value) > limit:
        raise AgentProtocolError(f"{what} is {len(value)} bytes, more than {limit}")
    return _u32(len(value)) + value


def _payload(msg: Message) -> tuple[int, bytes]:
    match msg:
        case Ping(version):
            if not 0 <= version <= 0xFF:
                raise AgentProtocolError(f"protocol version {version} does not fit a byte")
            return T_PING, bytes([version])
        case Pong(version, agent):
            if not 0 <= version <= 0xFF:
                raise AgentProtocolError(f"protocol version {version} does not fit a byte")
            return T_PONG, bytes([version]) + agent.encode()
        case Exec(argv, env, cwd, timeout_ms, stdin):
            if not 1 <= len(argv) <= MAX_ARGS or not argv[0]:
                raise AgentProtocolError(f"argv needs 1 to {MAX_ARGS} entries and a non-empty argv[0]")
            if len(env) > MAX_ARGS:
                raise AgentProtocolError(f"env has more than {MAX_ARGS} entries")
            for entry in env:
                if b"=" not in entry or entry.startswith(b"="):
                    raise AgentProtocolError(f"env entry {entry[:40]!r} is not NAME=VALUE")
            if not 0 <= timeout_ms <= 0xFFFF_FFFF:
                raise AgentProtocolError(f"timeout {timeout_ms} ms out of range")
            parts = [_u32(len(argv))]
            parts += [_string(a, MAX_STRING, "an argv entry") for a in argv]
            parts.append(_u32(len(env)))
            parts += [_string(e, MAX_STRING, "an env entry") for e in env]
            parts += [_string(cwd, MAX_PATH, "cwd"), _u32(timeout_ms), _blob(stdin, MAX_PAYLOAD, "stdin")]
            return T_EXEC, b"".join(parts)
        case Stdout(data):
            return T_STDOUT, data
        case Stderr(data):
            return T_STDERR, data
        case Exit(status, timed_out):
            if not -(1 << 31) <= status < (1 << 31):
                raise AgentProtocolError(f"exit status {status} does not fit an i32")
            return T_EXIT, struct.pack(">iB", status, int(timed_out))
        case WriteFile(path, mode, data):
            if not path.startswith(b"/"):
                raise AgentProtocolError(f"path {path[:80]!r} is not absolute")
            if not 0 <= mode <= 0o7777:
                raise AgentProtocolError(f"mode {mode:#o} out of range")
            return T_WRITE_FILE, _string(path, MAX_PATH, "path") + _u32(mode) + _blob(data, MAX_PAYLOAD, "data")
        case SetTime(ns):
            if not 0 <= ns < (1 << 63):
                raise AgentProtocolError(f"time {ns} ns out of range")
            return T_SET_TIME, struct.pack(">Q", ns)
        case ReadFile(path):
            if not path.startswith(b"/"):
                raise AgentProtocolError(f"path {path[:80]!r} is not absolute")
            return T_READ_FILE, _string(path, MAX_PATH, "path")
        case AppendFile(path, data):
            if not path.startswith(b"/"):
                raise AgentProtocolError(f"path {path[:80]!r} is not absolute")
            return T_APPEND_FILE, _string(path, MAX_PATH, "path") + _blob(data, MAX_PAYLOAD, "data")
        case FileData(data):
            if len(data) > MAX_CHUNK:
                raise AgentProtocolError(f"FILE_DATA of {len(data)} bytes, more than {MAX_CHUNK}")
            return T_FILE_DATA, data
        case Ok():
            return T_OK, b""
        case Error(message):
            return T_ERROR, message.encode()
    raise TypeError(f"not an agent message: {msg!r}")


def encode(msg: Message) -> bytes:
    """The frame of one message."""
    kind, payload = _payload(msg)
    if len(payload) > MAX_PAYLOAD:
        raise AgentProtocolError(f"payload of {len(payload)} bytes is more than {MAX_PAYLOAD}")
    return HEADER.pack(kind, len(payload)) + payload


class _Reader:
    """Bounds-checked reads over one payload; every overrun is a protocol error."""

    def __init__(self, data: bytes, what: str):
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise AgentProtocolError(f"{self.what}: payload ends early")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def u32(self) -> int:
        return struct.unpack(">I", self.take(4))[0]

    def blob(self, limit: int) -> bytes:
        n = self.u32()
        if n > limit:
            raise AgentProtocolError(f"{self.what}: field of {n} bytes, more than {limit}")
        return self.take(n)

    def string(self, limit: int) -> bytes:
        value = self.blob(limit)
        if b"\0" in value:
            raise AgentProtocolError(f"{self.what}: string with a NUL byte")
        return value

    def end(self) -> None:
        if self.pos != len(self.data):
            raise AgentProtocolError(f"{self.what}: {len(self.data) - self.pos} trailing bytes")


def _text(data: bytes, what: str) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise AgentProtocolError(f"{what}: not UTF-8") from exc


def decode_payload(kind: int, payload: bytes) -> Message:
    """The message of one frame (type and payload), validated as untrusted input."""
    r = _Reader(payload, f"frame type {kind:#04x}")
    match kind:
        case 0x01:  # T_PING
            if len(payload) != 1:
                raise AgentProtocolError("PING: payload must be one byte")
            return Ping(payload[0])
        case 0x81:  # T_PONG
            if not payload:
                raise AgentProtocolError("PONG: empty payload")
            return Pong(payload[0], _text(payload[1:], "PONG"))
        case 0x02:  # T_EXEC
            argc = r.u32()
            if not 1 <= argc <= MAX_ARGS:
                raise AgentProtocolError(f"EXEC: argc {argc} out of range")
            argv = tuple(r.string(MAX_STRING) for _ in range(argc))
            if not argv[0]:
                raise AgentProtocolError("EXEC: empty argv[0]")
            envc = r.u32()
            if envc > MAX_ARGS:
                raise AgentProtocolError(f"EXEC: envc {envc} out of range")
            env = tuple(r.string(MAX_STRING) for _ in range(envc))
            if any(b"=" not in e or e.startswith(b"=") for e in env):
                raise AgentProtocolError("EXEC: env entry is not NAME=VALUE")
            cwd = r.string(MAX_PATH)
            timeout_ms = r.u32()
            stdin = r.blob(MAX_PAYLOAD)
            r.end()
            return Exec(argv, env, cwd, timeout_ms, stdin)
        case 0x82:  # T_STDOUT
            return Stdout(payload)
        case 0x83:  # T_STDERR
            return Stderr(payload)
        case 0x84:  # T_EXIT
            if len(payload) != 5 or payload[4] > 1:
                raise AgentProtocolError("EXIT: payload must be i32 status + u8 timed_out (0 or 1)")
            status, timed_out = struct.unpack(">iB", payload)
            return Exit(status, bool(timed_out))
        case 0x03:  # T_WRITE_FILE
            path = r.string(MAX_PATH)
            mode = r.u32()
            data = r.blob(MAX_PAYLOAD)
            r.end()
            if not path.startswith(b"/") or mode > 0o7777:
                raise AgentProtocolError("WRITE_FILE: needs an absolute path and a mode <= 0o7777")
            return WriteFile(path, mode, data)
        case 0x04:  # T_SET_TIME
            if len(payload) != 8:
                raise AgentProtocolError("SET_TIME: payload must be 8 bytes")
            (ns,) = struct.unpack(">Q", payload)
            if ns >= 1 << 63:
                raise AgentProtocolError("SET_TIME: time out of range")
            return SetTime(ns)
        case 0x05:  # T_READ_FILE
            path = r.string(MAX_PATH)
            r.end()
            if not path.startswith(b"/"):
                raise AgentProtocolError("READ_FILE: needs an absolute path")
            return ReadFile(path)
        case 0x06:  # T_APPEND_FILE
            path = r.string(MAX_PATH)
            data = r.blob(MAX_PAYLOAD)
            r.end()
            if not path.startswith(b"/"):
                raise AgentProtocolError("APPEND_FILE: needs an absolute path")
            return AppendFile(path, data)
        case 0x87:  # T_FILE_DATA
            if len(payload) > MAX_CHUNK:
                raise AgentProtocolError(f"FILE_DATA: {len(payload)} bytes, more than {MAX_CHUNK}")
            return FileData(payload)
        case 0x85:  # T_OK
            if payload:
                raise AgentProtocolError("OK: payload must be empty")
            return Ok()
        case 0x86:  # T_ERROR
            return Error(_text(payload, "ERROR"))
    raise AgentProtocolError(f"unknown frame type {kind:#04x}")


class FrameDecoder:
    """Turns a byte stream into messages. ``feed`` bytes, then call
    ``next_message()`` until it returns None (it needs more bytes)."""

    def __init__(self, max_payload: int = MAX_PAYLOAD):
        self._buf = bytearray()
        self._max = max_payload

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def pending(self) -> int:
        """Bytes received and not yet decoded."""
        return len(self._buf)

    def next_message(self) -> Message | None:
        if len(self._buf) < HEADER.size:
            return None
        kind, length = HEADER.unpack_from(self._buf)
        if length > self._max:
            raise AgentProtocolError(f"frame type {kind:#04x} announces {length} bytes, more than {self._max}")
        if len(self._buf) < HEADER.size + length:
            return None
        payload = bytes(self._buf[HEADER.size:HEADER.size + length])
        del self._buf[:HEADER.size + length]
        return decode_payload(kind, payload)

    def __repr__(self) -> str:
        return f"<FrameDecoder pending={len(self._buf)}>"


# --- the client ----------------------------------------------------------------------------


def _bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


class _Connection:
    """One connected socket with a decoder; reads are bounded by a deadline."""

    def __init__(self, sock: socket.socket, decoder: FrameDecoder):
        self.sock, self.decoder = sock, decoder

    def send(self, msg: Message, deadline: float | None) -> None:
        self._set_timeout(deadline)
        try:
            self.sock.sendall(encode(msg))
        except TimeoutError as exc:
            raise AgentTimeout("timed out sending to the agent") from exc
        except OSError as exc:
            raise AgentConnectionError(f"sending to the agent: {exc}") from exc

    def receive(self, deadline: float | None) -> Message:
        while True:
            msg = self.decoder.next_message()
            if msg is not None:
                return msg
            self._set_timeout(deadline)
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError as exc:
                raise AgentTimeout("timed out waiting for the agent") from exc
            except OSError as exc:
                raise AgentConnectionError(f"receiving from the agent: {exc}") from exc
            if not data:
                raise AgentConnectionError("the agent closed the connection"
                                           + (" mid-frame" if self.decoder.pending else ""))
            self.decoder.feed(data)

    def _set_timeout(self, deadline: float | None) -> None:
        if deadline is None:
            self.sock.settimeout(None)
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise AgentTimeout("timed out waiting for the agent")
        self.sock.settimeout(left)

    def close(self) -> None:
        self.sock.close()


class AgentClient:
    """Talks to one guest's agent through its hybrid vsock Unix socket.

    ``port=None`` skips the CONNECT handshake: ``uds_path`` is then the
    agent's own socket (``ember-agent --unix PATH``, for host tests).
    ``timeout`` bounds connecting and every request except a command's run
    time (``exec(timeout_s=...)`` adds that).
    """

    def __init__(self, uds_path: str, port: int | None = AGENT_PORT, timeout: float = 10.0):
        self.uds_path = str(uds_path)
        self.port = port
        self.timeout = timeout

    def __repr__(self) -> str:
        via = f"vsock port {self.port}" if self.port is not None else "direct"
        return f"<AgentClient {self.uds_path} {via}>"

    # -- connections --

    def _connect(self) -> _Connection:
        deadline = time.monotonic() + self.timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.uds_path)
            except TimeoutError as exc:
                raise AgentTimeout(f"connecting to {self.uds_path} timed out") from exc
            except OSError as exc:
                raise AgentConnectionError(f"cannot connect to {self.uds_path}: {exc}") from exc
            decoder = FrameDecoder()
            if self.port is not None:
                self._handshake(sock, decoder, deadline)
            return _Connection(sock, decoder)
        except BaseException:
            sock.close()
            raise

    def _handshake(self, sock: socket.socket, decoder: FrameDecoder, deadline: float) -> None:
        """Firecracker's hybrid vsock: ``CONNECT <port>\\n`` -> ``OK <host port>\\n``."""
        reply = bytearray()
        try:
            sock.sendall(f"CONNECT {self.port}\n".encode())
            while b"\n" not in reply:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
                data = sock.recv(MAX_CONNECT_REPLY)
                if not data:
                    raise AgentConnectFailed(
                        f"{self.uds_path}: CONNECT {self.port} refused (nothing listens on that guest port)")
                reply += data
                if len(reply) > MAX_CONNECT_REPLY and b"\n" not in reply:
                    raise AgentConnectFailed(f"{self.uds_path}: CONNECT {self.port}: overlong reply")
        except TimeoutError as exc:
            raise AgentTimeout(f"{self.uds_path}: no answer to CONNECT {self.port}") from exc
        except OSError as exc:
            raise AgentConnectFailed(f"{self.uds_path}: CONNECT {self.port}: {exc}") from exc
        line, _, rest = bytes(reply).partition(b"\n")
        words = line.split()
        if len(words) != 2 or words[0] != b"OK" or not words[1].isdigit():
            raise AgentConnectFailed(f"{self.uds_path}: CONNECT {self.port} answered {line[:64]!r}")
        decoder.feed(rest)

    def _request(self, msg: Message, conn: _Connection | None = None) -> Message:
        """One request answered by one message (PONG or OK, or ERROR), on `conn` or a connection of its own."""
        deadline = time.monotonic() + self.timeout
        own = conn is None
        if conn is None:
            conn = self._connect()
        try:
            conn.send(msg, deadline)
            reply = conn.receive(deadline)
        finally:
            if own:
                conn.close()
        if isinstance(reply, Error):
            raise AgentRequestFailed(reply.message)
        return reply

    # -- requests --

    def ping(self) -> str:
        """The agent's version string, once it answers PONG."""
        reply = self._request(Ping(PROTOCOL_VERSION))
        if not isinstance(reply, Pong):
            raise AgentProtocolError(f"PING answered by {type(reply).__name__}")
        if reply.version != PROTOCOL_VERSION:
            raise AgentProtocolError(f"the agent speaks protocol {reply.version}, not {PROTOCOL_VERSION}")
        return reply.agent

    def exec(self, argv: Sequence[str | bytes], stdin: bytes = b"", env: Mapping[str, str] | None = None,
             cwd: str | None = None, timeout_s: float | None = None) -> Iterator[ExecEvent]:
        """Runs a command; yields Stdout/Stderr chunks as they come, then one Exit.

        ``env`` is added to the agent's defaults (PATH, HOME). With
        ``timeout_s`` the agent kills the command's process group after that
        long and reports ``Exit(-9, timed_out=True)``; without it the call
        waits as long as the command runs.
        """
        request = Exec(
            argv=tuple(_bytes(a) for a in argv),
            env=tuple(_bytes(f"{k}={v}") for k, v in (env or {}).items()),
            cwd=_bytes(cwd or b""),
            timeout_ms=0 if timeout_s is None else max(1, int(timeout_s * 1000)),
            stdin=bytes(stdin),
        )
        encode(request)  # refuse a bad request before connecting
        return self._exec_events(request, timeout_s)

    def _exec_events(self, request: Exec, timeout_s: float | None) -> Iterator[ExecEvent]:
        conn = self._connect()
        try:
            conn.send(request, time.monotonic() + self.timeout)
            deadline = None if timeout_s is None else time.monotonic() + timeout_s + self.timeout
            while True:
                msg = conn.receive(deadline)
                if isinstance(msg, (Stdout, Stderr)):
                    yield msg
                elif isinstance(msg, Exit):
                    yield msg
                    return
                elif isinstance(msg, Error):
                    raise AgentRequestFailed(msg.message)
                else:
                    raise AgentProtocolError(f"EXEC answered by {type(msg).__name__}")
        finally:
            conn.close()

    def run(self, argv: Sequence[str | bytes], stdin: bytes = b"", env: Mapping[str, str] | None = None,
            cwd: str | None = None, timeout_s: float | None = None) -> ExecResult:
        """``exec`` collected: the whole stdout and stderr and the exit."""
        out, err = bytearray(), bytearray()
        for event in self.exec(argv, stdin=stdin, env=env, cwd=cwd, timeout_s=timeout_s):
            if isinstance(event, Stdout):
                out += event.data
            elif isinstance(event, Stderr):
                err += event.data
            else:
                return ExecResult(event.status, bytes(out), bytes(err), event.timed_out)
        raise AgentProtocolError("EXEC stream ended without EXIT")  # _exec_events always ends with Exit

    def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Writes ``data`` to ``path`` in the guest (replaced atomically, by rename)."""
        self._expect_ok(WriteFile(_bytes(path), mode, bytes(data)), "WRITE_FILE")

    def write_file_chunks(self, path: str, chunks: Iterable[bytes], mode: int = 0o644) -> int:
        """Writes the concatenated ``chunks`` to ``path``; returns the number of bytes written.

        Up to `FILE_FRAME_DATA` bytes this is one WRITE_FILE (the file is
        replaced atomically). A longer file is a WRITE_FILE of its first
        part followed by APPEND_FILEs: a reader in the guest may see it
        partly written, and a failure half-way leaves the part written.
        """
        pending = bytearray()
        written = 0  # also "has the first part gone": only the last part may be empty

        def send(part: bytes) -> None:
            nonlocal written
            if written:
                self._expect_ok(AppendFile(_bytes(path), part), "APPEND_FILE")
            else:
                self.write_file(path, part, mode)
            written += len(part)

        for chunk in chunks:
            pending += chunk
            while len(pending) > FILE_FRAME_DATA:
                send(bytes(pending[:FILE_FRAME_DATA]))
                del pending[:FILE_FRAME_DATA]
        if pending or not written:
            send(bytes(pending))
        return written

    def _expect_ok(self, msg: Message, what: str, conn: _Connection | None = None) -> None:
        reply = self._request(msg, conn)
        if not isinstance(reply, Ok):
            raise AgentProtocolError(f"{what} answered by {type(reply).__name__}")

    def read_file(self, path: str) -> Iterator[bytes]:
        """The bytes of the guest's regular file ``path``, in chunks of at most 64 KiB, as they come.

        Raises `AgentRequestFailed` (missing, a directory, not a regular
        file, unreadable) before the first chunk or, for a read error,
        after some: the caller discards what it got.
        """
        request = ReadFile(_bytes(path))
        encode(request)  # refuse a bad request before connecting
        return self._read_events(request)

    def _read_events(self, request: ReadFile) -> Iterator[bytes]:
        conn = self._connect()
        try:
            conn.send(request, time.monotonic() + self.timeout)
            while True:
                msg = conn.receive(time.monotonic() + self.timeout)  # each chunk must come within the timeout
                if isinstance(msg, FileData):
                    yield msg.data
                elif isinstance(msg, Ok):
                    return
                elif isinstance(msg, Error):
                    raise AgentRequestFailed(msg.message)
                else:
                    raise AgentProtocolError(f"READ_FILE answered by {type(msg).__name__}")
        finally:
            conn.close()

    def set_time(self, ns: int) -> None:
        """Steps the guest's CLOCK_REALTIME to ``ns`` nanoseconds since the epoch."""
        self._expect_ok(SetTime(ns), "SET_TIME")

    def refresh_clone(self, metadata: tuple[str, bytes] | None = None,
                      clock: Callable[[], int] = time.time_ns) -> bool:
        """What a just-resumed clone needs before it is handed out, on one connection.

        ``metadata`` (path, bytes) is written first (WRITE_FILE; a refusal
        raises `AgentRequestFailed`); then the guest's clock is stepped to
        ``clock()``, read as the request is sent. Returns False when the
        agent refuses SET_TIME (an agent that does not set clocks, such as
        the test guest's): its answer still proves it ready. Every request
        is harmless to repeat, so a caller may retry the whole call.
        """
        conn = self._connect()
        try:
            if metadata is not None:
                path, data = metadata
                self._expect_ok(WriteFile(_bytes(path), 0o644, bytes(data)), "WRITE_FILE", conn)
            try:
                self._expect_ok(SetTime(clock()), "SET_TIME", conn)
            except AgentRequestFailed:
                return False
            return True
        finally:
            conn.close()

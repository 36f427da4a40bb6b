"""`ApiServer`: HTTP/1.1 on a Unix socket, against well-behaved and hostile clients.

The server runs in-process with a recording handler; clients are real
sockets (http.client for ordinary requests, raw bytes for the rest).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from vmm.api import ApiServer, ApiServerError, Reply, SocketInUse

DEADLINE = 5.0


class Recorder:
    """A handler that records requests and answers `reply(method, path, body)`."""

    def __init__(self, reply: Callable[[str, str, bytes], Reply] | None = None) -> None:
        self.requests: list[tuple[str, str, bytes]] = []
        self._reply = reply or (lambda m, p, b: Reply(200, {"method": m, "path": p, "size": len(b)}))
        self.lock = threading.Lock()

    def __call__(self, method: str, path: str, body: bytes) -> Reply:
        with self.lock:
            self.requests.append((method, path, body))
        return self._reply(method, path, body)


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=DEADLINE)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(DEADLINE)
        self.sock.connect(self.path)


@pytest.fixture
def sock_dir() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="ember-api-") as d:  # short: sun_path is 108 bytes
        yield d


@pytest.fixture
def serve(sock_dir: str):
    servers: list[ApiServer] = []

    def start(handler=None, **kw) -> tuple[ApiServer, Recorder]:
        recorder = handler if handler is not None else Recorder()
        server = ApiServer(os.path.join(sock_dir, f"api{len(servers)}.sock"), recorder, **kw)
        server.start()
        servers.append(server)
        return server, recorder

    yield start
    for s in servers:
        s.stop()


class RawClient:
    """A socket that sends raw bytes and reads HTTP responses in order (one buffered reader)."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(DEADLINE)
        self.sock.connect(path)
        self._reader = self.sock.makefile("rb")

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)

    def makefile(self, *args, **kwargs) -> "RawClient":  # what http.client.HTTPResponse reads through
        return self

    def __getattr__(self, name: str):
        return getattr(self._reader, name)

    def close(self) -> None:  # HTTPResponse closes its file after each body: keep reading
        pass

    def response(self, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
        resp = http.client.HTTPResponse(self, method=method)  # type: ignore[arg-type]
        resp.begin()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()

    def recv(self, n: int) -> bytes:
        return self._reader.read1(n)

    def is_closed(self) -> bool:
        try:
            return self._reader.read1(1) == b""
        except ConnectionResetError:
            return True

    def disconnect(self) -> None:
        self._reader.close()
        self.sock.close()


def connect(server: ApiServer) -> RawClient:
    return RawClient(server.path)


def read_response(client: RawClient) -> tuple[int, dict[str, str], bytes]:
    return client.response()


def is_closed(client: RawClient) -> bool:
    return client.is_closed()


def get(server: ApiServer, path: str = "/") -> tuple[int, bytes]:
    conn = UnixHTTPConnection(server.path)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# --- ordinary requests ------------------------------------------------------------------


def test_a_request_and_its_json_answer(serve) -> None:
    server, rec = serve()
    conn = UnixHTTPConnection(server.path)
    conn.request("PUT", "/drives/rootfs?ignored=1", body=b'{"a": 1}')
    resp = conn.getresponse()
    assert resp.status == 200 and resp.reason == "OK"
    assert resp.getheader("Server") == "Firecracker API"
    assert resp.getheader("Content-Type") == "application/json"
    assert json.loads(resp.read()) == {"method": "PUT", "path": "/drives/rootfs", "size": 8}
    assert rec.requests == [("PUT", "/drives/rootfs", b'{"a": 1}')]
    conn.close()


def test_keep_alive_serves_many_requests_on_one_connection(serve) -> None:
    server, rec = serve()
    conn = UnixHTTPConnection(server.path)
    socks = set()
    for i in range(5):
        conn.request("GET", f"/r{i}")
        assert conn.getresponse().read()
        socks.add(id(conn.sock))
    assert len(socks) == 1 and [p for _, p, _ in rec.requests] == [f"/r{i}" for i in range(5)]
    conn.close()


def test_pipelined_requests_are_answered_in_order(serve) -> None:
    server, rec = serve()
    s = connect(server)
    s.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n"
              b"PUT /c HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    bodies = [json.loads(read_response(s)[2]) for _ in range(3)]
    assert [b["path"] for b in bodies] == ["/a", "/b", "/c"]
    s.disconnect()


def test_no_content_and_deprecation(serve) -> None:
    server, _ = serve(Recorder(lambda m, p, b: Reply(204, None, deprecated=True)))
    s = connect(server)
    s.sendall(b"PUT /vsock HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    status, headers, body = read_response(s)
    assert (status, body) == (204, b"")
    assert headers["deprecation"] == "true" and "content-length" not in headers
    s.disconnect()


def test_absolute_form_target_and_http_1_0(serve) -> None:
    server, rec = serve()
    s = connect(server)
    s.sendall(b"GET http://localhost/version HTTP/1.0\r\n\r\n")
    status, _, _ = read_response(s)
    assert status == 200 and rec.requests == [("GET", "/version", b"")]
    assert is_closed(s)  # HTTP/1.0: one request per connection


def test_chunked_body(serve) -> None:
    server, rec = serve()
    s = connect(server)
    s.sendall(b"PUT /mmds HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"4\r\n{\"a\"\r\n4\r\n: 1}\r\n0\r\n\r\n")
    assert read_response(s)[0] == 200
    assert rec.requests == [("PUT", "/mmds", b'{"a": 1}')]


def test_expect_100_continue(serve) -> None:
    server, rec = serve()
    s = connect(server)
    s.sendall(b"PUT /mmds HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
    assert s.recv(64).startswith(b"HTTP/1.1 100 ")
    s.sendall(b"{}")
    assert read_response(s)[0] == 200 and rec.requests == [("PUT", "/mmds", b"{}")]


def test_a_handler_failure_is_a_500_and_the_server_goes_on(serve) -> None:
    def reply(m, p, b):
        if p == "/boom":
            raise RuntimeError("bug")
        return Reply(200, {})
    server, _ = serve(Recorder(reply))
    status, body = get(server, "/boom")
    assert status == 500 and "bug" in json.loads(body)["fault_message"]
    assert get(server)[0] == 200


def test_head_gets_headers_without_a_body_and_the_server_goes_on(serve) -> None:
    # Found by atheris (bench/fuzz, target api): h11 refused the body of a HEAD response and the
    # exception ended the API thread, so the VMM could no longer be controlled.
    server, rec = serve()
    s = connect(server)
    s.sendall(b"HEAD /x HTTP/1.1\r\nHost: a\r\n\r\nGET /y HTTP/1.1\r\nHost: a\r\n\r\n")
    status, headers, body = s.response("HEAD")
    assert (status, body) == (200, b"") and int(headers["content-length"]) > 0
    status, _, body = s.response()
    assert status == 200 and json.loads(body)["path"] == "/y"
    s.disconnect()
    assert get(server)[0] == 200 and [m for m, _, _ in rec.requests] == ["HEAD", "GET", "GET"]


def test_a_failure_while_serving_one_client_closes_only_that_client(serve, monkeypatch) -> None:
    server, _ = serve()
    real = server._send_reply

    def failing(client, reply, **kw):
        if client.request is not None and client.request.target == b"/fail":
            raise RuntimeError("a bug in the server")
        return real(client, reply, **kw)

    monkeypatch.setattr(server, "_send_reply", failing)
    s = connect(server)
    s.sendall(b"GET /fail HTTP/1.1\r\nHost: a\r\n\r\n")
    assert is_closed(s)
    assert get(server, "/ok")[0] == 200


# --- limits -------------------------------------------------------------------------------------


def test_an_oversize_payload_is_refused_before_it_is_read(serve) -> None:
    server, rec = serve(max_payload=100)
    s = connect(server)
    s.sendall(b"PUT /mmds HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n")
    status, headers, body = read_response(s)
    assert status == 400 and headers["connection"] == "close"
    assert json.loads(body) == {"fault_message": "Request payload with size 101 is larger than the limit of 100 "
                                                 "allowed by server."}
    assert is_closed(s) and rec.requests == []
    assert get(server)[0] == 200


def test_a_payload_at_the_limit_is_fine(serve) -> None:
    server, rec = serve(max_payload=100)
    s = connect(server)
    s.sendall(b"PUT /mmds HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b" " * 100)
    assert read_response(s)[0] == 200 and len(rec.requests[0][2]) == 100


def test_an_oversize_chunked_payload_is_refused(serve) -> None:
    server, rec = serve(max_payload=10)
    s = connect(server)
    s.sendall(b"PUT /mmds HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n12345678\r\n8\r\n12345678\r\n")
    status, _, body = read_response(s)
    assert status == 400 and "is larger than the limit of 10" in json.loads(body)["fault_message"]
    assert rec.requests == []


def test_a_client_still_sending_a_big_body_reads_the_refusal(serve) -> None:
    server, _ = serve(max_payload=1024)
    s = connect(server)
    s.sendall(b"PUT /mmds HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
    try:
        s.sendall(b"x" * 1_000_000)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server stopped reading: what matters is the answer below
    status, _, body = read_response(s)
    assert status == 400 and "1000000" in json.loads(body)["fault_message"]


# --- hostile clients ---------------------------------------------------------------------------


@pytest.mark.parametrize("garbage", [
    b"\x00\x01\x02\xff\r\n\r\n",
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
    b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
])
def test_malformed_http_gets_400_and_the_server_goes_on(serve, garbage: bytes) -> None:
    server, rec = serve()
    s = connect(server)
    s.sendall(garbage)
    status, _, body = read_response(s)
    assert status == 400 and json.loads(body)["fault_message"].startswith("Invalid HTTP request: ")
    assert is_closed(s) and rec.requests == []
    assert get(server)[0] == 200


def test_headers_too_large_get_400(serve) -> None:
    server, _ = serve()
    s = connect(server)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
    assert read_response(s)[0] == 400
    assert get(server)[0] == 200


@pytest.mark.parametrize("partial", [
    b"PUT /boot-sou",
    b"PUT /boot-source HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{\"kernel",
])
def test_a_client_that_disconnects_mid_request_is_harmless(serve, partial: bytes) -> None:
    server, rec = serve()
    s = connect(server)
    s.sendall(partial)
    s.disconnect()
    assert get(server)[0] == 200
    assert rec.requests == [("GET", "/", b"")]


def test_a_slow_client_does_not_hold_up_the_others(serve) -> None:
    server, _ = serve()
    slow = connect(server)
    slow.sendall(b"PUT /boot-source HTTP/1.1\r\nHost: x\r\n")  # and nothing more
    started = time.monotonic()
    for _ in range(3):
        assert get(server)[0] == 200
    assert time.monotonic() - started < 2.0
    slow.disconnect()


def test_an_incomplete_request_times_out(serve) -> None:
    server, rec = serve(request_timeout=0.3)
    s = connect(server)
    s.sendall(b"PUT /boot-source HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{")
    status, _, body = read_response(s)
    assert status == 408 and "timed out" in json.loads(body)["fault_message"]
    assert rec.requests == []


def test_an_idle_keep_alive_connection_does_not_time_out(serve) -> None:
    server, _ = serve(request_timeout=0.2)
    conn = UnixHTTPConnection(server.path)
    conn.request("GET", "/")
    conn.getresponse().read()
    time.sleep(0.4)
    sock = conn.sock
    conn.request("GET", "/")
    assert conn.getresponse().status == 200 and conn.sock is sock
    conn.close()


def test_a_client_that_never_reads_its_answers_does_not_block_the_server(serve) -> None:
    big = "x" * 65536
    server, _ = serve(Recorder(lambda m, p, b: Reply(200, {"data": big})))
    greedy = connect(server)
    greedy.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 64)  # ~4 MiB of answers it never reads
    time.sleep(0.2)
    started = time.monotonic()
    assert get(server)[0] == 200
    assert time.monotonic() - started < 2.0
    greedy.disconnect()


def test_the_oldest_idle_connection_makes_room(serve) -> None:
    server, _ = serve(max_connections=2)
    first, second = connect(server), connect(server)
    for s in (first, second):  # both served once, then idle
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        read_response(s)
    time.sleep(0.05)
    assert get(server)[0] == 200
    assert is_closed(first)
    second.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_response(second)[0] == 200


def test_when_every_connection_is_busy_a_new_one_gets_503(serve) -> None:
    server, _ = serve(max_connections=2)
    busy = [connect(server), connect(server)]
    for s in busy:
        s.sendall(b"GET / HTTP/1.1\r\n")  # a request in progress
    time.sleep(0.05)
    status, body = get(server)
    assert status == 503 and json.loads(body) == {"fault_message": "Too many open connections."}
    for s in busy:
        s.sendall(b"Host: x\r\n\r\n")
        assert read_response(s)[0] == 200


# --- the socket -----------------------------------------------------------------------------------


def test_an_existing_path_is_refused(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "taken")
    open(path, "w").close()
    with pytest.raises(SocketInUse, match="Failed to open the API socket at: .*taken. Check that it is not already used."):
        ApiServer(path, Recorder()).bind()
    assert os.path.exists(path)  # never removed: it was not ours


def test_an_unusable_path_is_refused(sock_dir: str) -> None:
    with pytest.raises(ApiServerError, match="No such file or directory"):
        ApiServer(os.path.join(sock_dir, "no", "api.sock"), Recorder()).bind()


def test_stop_closes_connections_and_removes_the_socket(serve) -> None:
    server, _ = serve()
    s = connect(server)
    server.stop()
    assert not os.path.exists(server.path)
    assert is_closed(s)
    assert repr(server).startswith("<ApiServer ") and "stopped" in repr(server)


def test_an_adopted_socket_serves_the_requests_queued_before_the_server_started(sock_dir: str) -> None:
    """The zygote binds a VMM's socket before forking it: a client may connect and send first."""
    path = os.path.join(sock_dir, "adopted.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    listener.bind(path)
    listener.listen(8)
    early = RawClient(path)  # queued in the backlog: nobody accepts yet
    early.sendall(b"GET /early HTTP/1.1\r\nHost: x\r\n\r\n")
    server = ApiServer(path, Recorder())
    server.adopt(listener)
    server.start()
    try:
        assert read_response(early)[0] == 200
        assert get(server, "/later")[0] == 200
    finally:
        server.stop()
    assert not os.path.exists(path)


def test_only_a_unix_stream_socket_is_adopted(sock_dir: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as dgram:
        with pytest.raises(ApiServerError, match="not a Unix stream socket"):
            ApiServer(os.path.join(sock_dir, "x.sock"), Recorder()).adopt(dgram)

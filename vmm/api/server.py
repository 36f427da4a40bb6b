"""The API's HTTP/1.1 server on a Unix socket: h11 on its own thread, many connections.

Primer. A client connects to the socket at ``--api-sock`` and sends HTTP/1.1
requests (``curl --unix-socket``); each gets one response, and the
connection stays open for the next (keep-alive) unless the client or an
error closes it. h11 does all of the HTTP parsing and framing
(Content-Length or chunked bodies, ``Expect: 100-continue``, HTTP/1.0,
pipelining); this module only moves bytes and enforces limits.

One thread serves every connection with a `selectors` loop over
non-blocking sockets, so a client that sends slowly, stops half-way or
never reads its responses holds only its own connection. A complete
request is handed to the `RequestHandler` (`handler.ApiHandler`), which
waits for the VMM event loop to execute it: requests are executed one at a
time, in arrival order, as in Firecracker's API thread.

What a client gets, whatever it sends:

* a request that is not HTTP/1.x, or breaks its framing: 400 with
  ``{"fault_message": "Invalid HTTP request: ..."}``, then the connection
  is closed (the rest of the byte stream cannot be trusted);
* a body larger than ``--http-api-max-payload-size``: 400 with
  Firecracker's (micro-http's) sentence "Request payload with size N is
  larger than the limit of M allowed by server.", then close; the size is
  checked from Content-Length before the body is read;
* a request still incomplete `request_timeout` seconds after its first
  byte: 408, then close;
* more than `max_connections` connections: the longest idle one is closed
  to make room; if none is idle, the new one gets 503 and is closed.

Before closing after an error the server shuts down its sending side and
keeps reading (and discarding) for a moment, so a client still writing a
body reads the error instead of a reset.

Deviation from Firecracker (micro-http): error bodies use the spec's
``fault_message`` key (micro-http writes ``{"error": ...}``); and h11
requires the ``Host`` header of HTTP/1.1 (every HTTP client sends it).

`ApiServer.bind` refuses a socket path that already exists (Firecracker:
"Failed to open the API socket at: ... Check that it is not already
used."); `stop` removes the socket file.
"""

from __future__ import annotations

import errno
import json
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from urllib.parse import urlsplit

import h11
import structlog

from vmm import seccomp

from .handler import Reply

__all__ = [
    "ApiServerError",
    "SocketInUse",
    "ApiServer",
    "RequestHandler",
    "HTTP_MAX_PAYLOAD_SIZE",
    "MAX_CONNECTIONS",
]

log = structlog.get_logger("vmm.api.server")

#: ``handler(method, path, body) -> Reply``, called on the API thread.
RequestHandler = Callable[[str, str, bytes], Reply]

# Firecracker src/firecracker/src/main.rs HTTP_MAX_PAYLOAD_SIZE (micro-http MAX_PAYLOAD_SIZE).
HTTP_MAX_PAYLOAD_SIZE = 51200
# micro-http allows 10; Ember allows more and evicts idle connections.
MAX_CONNECTIONS = 32
# From the first byte of a request to its last.
REQUEST_TIMEOUT_S = 10.0
# How long a connection closed after an error keeps draining its input.
LINGER_S = 1.0
# Request line plus headers (h11's max_incomplete_event_size).
MAX_HEADER_BYTES = 16 * 1024
RECV_SIZE = 64 * 1024
LISTEN_BACKLOG = 64
SERVER_HEADER = "Firecracker API"


class ApiServerError(Exception):
    """The API server could not start."""

    def __init__(self, message: str | None = None) -> None:
        # The docstring is the message when none is given.
        super().__init__(message if message is not None else " ".join((type(self).__doc__ or "").split()))


class SocketInUse(ApiServerError):
    """Failed to open the API socket: the path is already used."""


class _Client:
    """One connection: its socket, its h11 state machine, its partial request and output."""

    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        self.request: h11.Request | None = None
        self.body = bytearray()
        self.out = bytearray()
        self.busy_since: float | None = None  # first byte of the request in progress
        self.last_active = now
        self.closing = False  # an error was answered: flush, then linger and close
        self.linger_until: float | None = None
        self.writing = False  # registered for EVENT_WRITE

    @property
    def idle(self) -> bool:
        return self.busy_since is None and not self.out and not self.closing

    def __repr__(self) -> str:
        return (f"<_Client fd={self.fd} {self.h11.their_state}/{self.h11.our_state} "
                f"body={len(self.body)} out={len(self.out)}{' closing' if self.closing else ''}>")


class ApiServer:
    """Serves `handler` over HTTP/1.1 on the Unix socket at `path`, on its own thread."""

    def __init__(self, path: str, handler: RequestHandler, *, max_payload: int = HTTP_MAX_PAYLOAD_SIZE,
                 max_connections: int = MAX_CONNECTIONS, request_timeout: float = REQUEST_TIMEOUT_S,
                 linger: float = LINGER_S, clock: Callable[[], float] = time.monotonic) -> None:
        if max_payload < 0 or max_connections < 1:
            raise ValueError("max_payload must be >= 0 and max_connections >= 1")
        self.path = path
        self.max_payload = max_payload
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self.linger = linger
        self._handler = handler
        self._clock = clock
        self._listener: socket.socket | None = None
        self._selector = selectors.DefaultSelector()
        self._clients: dict[int, _Client] = {}
        self._wake_efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.requests_served = 0

    # --- lifecycle --------------------------------------------------------------------------

    def bind(self) -> None:
        """Create and listen on the socket; raises `SocketInUse` or `ApiServerError`."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(self.path)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:  # the path exists, socket or not
                raise SocketInUse(f"Failed to open the API socket at: {self.path}. "
                                  "Check that it is not already used.") from exc
            raise ApiServerError(f"Failed to open the API socket at: {self.path}: {exc.strerror or exc}") from exc
        sock.listen(LISTEN_BACKLOG)
        self.adopt(sock)

    def adopt(self, sock: socket.socket) -> None:
        """Serve on `sock`, a stream socket already bound at `path` and listening (instead of `bind`).

        The zygote binds a pool VMM's socket before it forks it, so a client may
        connect (and queue its first request) as soon as the VMM exists.
        """
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise ApiServerError("the API socket handed over is not a Unix stream socket")
        sock.setblocking(False)
        self._listener = sock
        self._selector.register(sock, selectors.EVENT_READ, "listener")
        self._selector.register(self._wake_efd, selectors.EVENT_READ, "wake")

    def start(self) -> None:
        """Bind if needed and serve on a new thread (``fc_api``), under the api seccomp filter.

        Raises `ApiServerError` if the thread cannot install its filter (it then serves nothing).
        """
        if self._listener is None:
            self.bind()
        entered: list[BaseException | None] = []
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve_filtered, args=(entered, ready), name="fc_api",
                                        daemon=True)
        self._thread.start()
        ready.wait()
        if entered[0] is not None:
            self.stop()  # closes and removes the socket
            raise ApiServerError(f"the API thread cannot install its seccomp filter: {entered[0]}")

    def _serve_filtered(self, entered: list[BaseException | None], ready: threading.Event) -> None:
        try:
            seccomp.enter_thread(seccomp.Role.API, "fc_api")
        except seccomp.SeccompError as exc:
            entered.append(exc)
            ready.set()
            return
        entered.append(None)
        ready.set()
        self.serve()

    def stop(self, *, unlink: bool = True, timeout: float = 5.0) -> None:
        """Stop serving, close every connection and (by default) remove the socket file."""
        self._stopping.set()
        try:
            os.eventfd_write(self._wake_efd, 1)
        except OSError:
            pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self._thread is None or not self._thread.is_alive():
            self._close_all()
        if unlink and self._listener is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def serve(self) -> None:
        """The server loop (runs on the calling thread until `stop`)."""
        log.info("API server listening", path=self.path)
        while not self._stopping.is_set():
            timeout = self._next_deadline()
            for key, mask in self._selector.select(timeout):
                if key.data == "listener":
                    self._accept()
                elif key.data == "wake":
                    continue
                else:
                    client = self._clients.get(key.fd)
                    if client is None:
                        continue
                    try:
                        if mask & selectors.EVENT_WRITE:
                            self._flush(client)
                        if mask & selectors.EVENT_READ and key.fd in self._clients:
                            self._on_readable(client)
                    except Exception as exc:  # a bug in handling one client: drop it, keep serving the rest
                        log.error("API connection failed; closing it", error=repr(exc))
                        self._close(client)
            self._expire()
        self._close_all()

    def _close_all(self) -> None:
        for client in list(self._clients.values()):
            self._close(client)
        if self._listener is not None:
            try:
                self._selector.unregister(self._listener)
            except (KeyError, ValueError):
                pass
            self._listener.close()

    # --- connections ------------------------------------------------------------------------

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: try again on the next event
                log.warning("API server cannot accept a connection", error=str(exc))
                return
            sock.setblocking(False)
            now = self._clock()
            if len(self._clients) >= self.max_connections and not self._evict_idle():
                client = _Client(sock, now)
                self._clients[client.fd] = client
                self._selector.register(sock, selectors.EVENT_READ, "client")
                self._reject(client, HTTPStatus.SERVICE_UNAVAILABLE, "Too many open connections.")
                continue
            client = _Client(sock, now)
            self._clients[client.fd] = client
            self._selector.register(sock, selectors.EVENT_READ, "client")

    def _evict_idle(self) -> bool:
        idle = [c for c in self._clients.values() if c.idle]
        if not idle:
            return False
        self._close(min(idle, key=lambda c: c.last_active))
        return True

    def _close(self, client: _Client) -> None:
        if self._clients.pop(client.fd, None) is None:
            return
        try:
            self._selector.unregister(client.sock)
        except (KeyError, ValueError):
            pass
        client.sock.close()

    def _on_readable(self, client: _Client) -> None:
        try:
            data = client.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(client)
            return
        now = self._clock()
        client.last_active = now
        if client.closing:  # draining after an error answer
            if not data:
                self._close(client)
            return
        if data and client.busy_since is None:
            client.busy_since = now
        client.h11.receive_data(data)
        self._advance(client)

    def _advance(self, client: _Client) -> None:
        """Handle every event h11 can parse from what the client sent so far."""
        conn = client.h11
        while not client.closing and client.fd in self._clients:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._reject(client, HTTPStatus.BAD_REQUEST, f"Invalid HTTP request: {exc}")
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                if conn.their_state is h11.IDLE and not conn.trailing_data[0]:
                    client.busy_since = None
                return
            if isinstance(event, h11.Request):
                if event.http_version not in (b"1.0", b"1.1"):
                    self._reject(client, HTTPStatus.BAD_REQUEST,
                                 f"Invalid HTTP request: unsupported HTTP version {event.http_version.decode()}")
                    return
                client.request, client.body = event, bytearray()
                length = _content_length(event)
                if length is not None and length > self.max_payload:
                    self._reject_oversize(client, length)
                    return
                if conn.they_are_waiting_for_100_continue:
                    self._send(client, h11.InformationalResponse(status_code=100, headers=[]))
            elif isinstance(event, h11.Data):
                client.body += event.data
                if len(client.body) > self.max_payload:
                    self._reject_oversize(client, len(client.body))
                    return
            elif isinstance(event, h11.EndOfMessage):
                self._respond(client)
                if client.closing or client.fd not in self._clients:
                    return
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                    client.busy_since = self._clock() if conn.trailing_data[0] else None
                else:  # HTTP/1.0 or "Connection: close": done with this client
                    self._finish(client)
                    return
            elif isinstance(event, h11.ConnectionClosed):
                self._finish(client)  # after any answer still being sent
                return

    def _respond(self, client: _Client) -> None:
        request = client.request
        assert request is not None
        method = request.method.decode("ascii", "replace")
        path = urlsplit(request.target.decode("ascii", "replace")).path or "/"
        try:
            reply = self._handler(method, path, bytes(client.body))
        except Exception as exc:  # the handler answers every request; this is a bug
            log.error("API handler failed", method=method, path=path, error=repr(exc))
            reply = Reply(int(HTTPStatus.INTERNAL_SERVER_ERROR), {"fault_message": f"Internal error: {exc!r}"})
        client.body = bytearray()
        self.requests_served += 1
        self._send_reply(client, reply)

    def _send_reply(self, client: _Client, reply: Reply, *, close: bool = False) -> None:
        headers = [("Server", SERVER_HEADER)]
        payload = b""
        if reply.body is not None:
            payload = json.dumps(reply.body, separators=(",", ":"), ensure_ascii=False).encode()
            headers += [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
        elif reply.status != HTTPStatus.NO_CONTENT:
            headers.append(("Content-Length", "0"))
        if reply.deprecated:
            headers.append(("Deprecation", "true"))
        if close:
            headers.append(("Connection", "close"))
        reason = _reason(reply.status)
        self._send(client, h11.Response(status_code=reply.status, headers=headers, reason=reason))
        # A response to HEAD has the headers a GET would get and never a body (RFC 9110 9.3.2;
        # h11 refuses to send one, which once killed this thread: bench/fuzz found it).
        head = client.request is not None and client.request.method == b"HEAD"
        if payload and not head:
            self._send(client, h11.Data(data=payload))
        self._send(client, h11.EndOfMessage())

    def _reject_oversize(self, client: _Client, size: int) -> None:
        # micro-http's RequestError::SizeLimitExceeded wording.
        self._reject(client, HTTPStatus.BAD_REQUEST,
                     f"Request payload with size {size} is larger than the limit of {self.max_payload} "
                     "allowed by server.")

    def _reject(self, client: _Client, status: HTTPStatus, message: str) -> None:
        """Answer an error that ends the connection, then close it."""
        log.info("API connection rejected", status=int(status), reason=message)
        if client.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            try:
                self._send_reply(client, Reply(int(status), {"fault_message": message}), close=True)
            except h11.LocalProtocolError:
                pass
        self._finish(client)

    def _finish(self, client: _Client) -> None:
        client.closing = True
        client.busy_since = None
        if client.fd in self._clients and not client.out:
            self._linger(client)

    def _linger(self, client: _Client) -> None:
        try:
            client.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(client)
            return
        client.linger_until = self._clock() + self.linger

    # --- output -----------------------------------------------------------------------------

    def _send(self, client: _Client, event: h11.Event) -> None:
        data = client.h11.send(event)
        if data:
            client.out += data
            self._flush(client)

    def _flush(self, client: _Client) -> None:
        if client.fd not in self._clients:
            return
        while client.out:
            try:
                n = client.sock.send(client.out)
            except (BlockingIOError, InterruptedError):
                if not client.writing:
                    client.writing = True
                    self._selector.modify(client.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, "client")
                return
            except OSError:  # the client went away: nothing left to tell it
                self._close(client)
                return
            del client.out[:n]
        if client.writing:
            client.writing = False
            self._selector.modify(client.sock, selectors.EVENT_READ, "client")
        if client.closing and client.linger_until is None:
            self._linger(client)

    # --- timeouts ---------------------------------------------------------------------------

    def _next_deadline(self) -> float | None:
        deadlines = []
        for c in self._clients.values():
            if c.linger_until is not None:
                deadlines.append(c.linger_until)
            elif c.busy_since is not None:
                deadlines.append(c.busy_since + self.request_timeout)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - self._clock())

    def _expire(self) -> None:
        now = self._clock()
        for client in list(self._clients.values()):
            if client.linger_until is not None:
                if now >= client.linger_until:
                    self._close(client)
            elif client.busy_since is not None and now - client.busy_since >= self.request_timeout:
                self._reject(client, HTTPStatus.REQUEST_TIMEOUT,
                             f"Request timed out: incomplete after {self.request_timeout:g} s.")

    def __repr__(self) -> str:
        state = "stopped" if self._stopping.is_set() else ("serving" if self._thread else "bound")
        return (f"<ApiServer {self.path} {state} connections={len(self._clients)} "
                f"served={self.requests_served}>")


def _content_length(request: h11.Request) -> int | None:
    for name, value in request.headers:
        if name == b"content-length":
            return int(value)  # h11 has checked it is a decimal number
    return None


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""

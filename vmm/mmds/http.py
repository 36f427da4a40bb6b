"""The guest-facing MMDS HTTP server: request bytes in, response bytes out.

h11 frames the requests (in server mode, one fresh state machine per
request, fed the bytes of the TCP stream) and serializes the responses; the
semantics are Firecracker's (`mmds/mod.rs` ``convert_to_response``):

=====================================  ============================================
request                                answer
=====================================  ============================================
not parseable HTTP/1.x                 400 ``Invalid request.`` (and close)
HTTP version other than 1.0/1.1        501 ``Invalid HTTP Version: Unsupported HTTP version.``
target with no absolute path           400 ``Invalid URI.``
GET with a body                        400 ``Invalid request.``
method other than GET/PUT              405 ``Not allowed HTTP method.``, ``Allow: GET, PUT``
GET, V2, no token header               401 ``No MMDS token provided. ...``
GET, V2, token invalid or expired      401 ``MMDS token not valid.``
GET, V1                                token optional; a bad one is only counted
GET, path missing in the store         404 ``Resource not found: <path>.``
GET, IMDS format, not str/object       501 ``Cannot retrieve value. ...``
GET                                    200, JSON (``Accept: application/json``,
                                       unless ``imds_compat``) or IMDS text
PUT with ``X-Forwarded-For``           400 ``Invalid header. Reason: Unsupported header name. Key: <name>``
PUT to anything but /latest/api/token  404 ``Resource not found: <path>.``
PUT without a TTL header               400 ``Token time to live value not found. ...``
PUT, TTL not a u32                     400 ``Invalid header. Reason: Invalid value. Key:<name>; Value:<value>``
PUT, TTL outside 1..21600              400 ``Invalid time to live value provided for token: ...``
PUT                                    200, the token as text/plain, TTL header echoed
=====================================  ============================================

Token and TTL headers have EC2 aliases (``X-aws-ec2-metadata-token``,
``X-aws-ec2-metadata-token-ttl-seconds``); header names are case-insensitive.
PUT works in V1 too. Every body is text; errors are ``text/plain``.

Differences from Firecracker, all from using a real HTTP parser: HTTP/1.1
requests need a ``Host`` header (every client sends one); a malformed
request closes the connection; HTTP/1.0 requests and ``Connection: close``
get ``Connection: close`` and the server closes after answering; a response
in IMDS format is labelled ``text/plain`` even when the client asked for
JSON (Firecracker echoes the ``Accept`` type); every method other than GET
and PUT gets 405 (Firecracker's parser answers 501 for methods it does not
know, its documentation promises 405).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import h11

from vmm.config.mmds import MmdsVersion

from .data_store import MmdsStore, NotFound, OutputFormat, UnsupportedValueType, sanitize_path
from .token import PATH_TO_TOKEN, InvalidTtlValue

__all__ = ["MmdsHttp", "HttpExchange", "MmdsHttpMetrics", "MAX_REQUEST_SIZE"]

# The largest request (line, headers and body) accepted, as Firecracker's
# dumbo endpoint: its receive buffer is RCV_BUF_MAX_SIZE = 2500 bytes.
MAX_REQUEST_SIZE = 2500

X_FORWARDED_FOR_HEADER = b"x-forwarded-for"
TOKEN_HEADERS = (b"x-metadata-token", b"x-aws-ec2-metadata-token")
TTL_HEADERS = (b"x-metadata-token-ttl-seconds", b"x-aws-ec2-metadata-token-ttl-seconds")

MSG_INVALID_REQUEST = "Invalid request."
MSG_INVALID_VERSION = "Invalid HTTP Version: Unsupported HTTP version."
MSG_INVALID_URI = "Invalid URI."
MSG_METHOD_NOT_ALLOWED = "Not allowed HTTP method."
MSG_INVALID_TOKEN = "MMDS token not valid."
MSG_NO_TOKEN = (
    "No MMDS token provided. Use `X-metadata-token` or `X-aws-ec2-metadata-token` header "
    "to specify the session token."
)
MSG_NO_TTL = (
    "Token time to live value not found. Use `X-metadata-token-ttl-seconds` or "
    "`X-aws-ec2-metadata-token-ttl-seconds` header to specify the token's lifetime."
)

REASONS = {
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    404: b"Not Found",
    405: b"Method Not Allowed",
    413: b"Payload Too Large",
    431: b"Request Header Fields Too Large",
    501: b"Not Implemented",
}

U32_MAX = 0xFFFF_FFFF


@dataclass
class MmdsHttpMetrics:
    """Counters with Firecracker's `mmds` metric names."""

    rx_invalid_token: int = 0
    rx_no_token: int = 0


@dataclass(frozen=True)
class HttpExchange:
    """One request framed out of a byte stream, and its answer."""

    consumed: int
    """How many bytes at the start of the stream made up the request."""
    response: bytes
    """The serialized response."""
    close: bool
    """The server must close the connection once the response is sent."""


@dataclass(frozen=True)
class _Answer:
    status: int
    body: str
    content_type: str = OutputFormat.IMDS.value
    headers: tuple[tuple[bytes, bytes], ...] = field(default=())


class MmdsHttp:
    """Answers guest HTTP requests from an `MmdsStore`; stateless apart from counters."""

    def __init__(self, store: MmdsStore, metrics: MmdsHttpMetrics | None = None) -> None:
        self.store = store
        self.metrics = metrics if metrics is not None else MmdsHttpMetrics()

    def __repr__(self) -> str:
        return f"<MmdsHttp {self.store!r}>"

    def respond(self, request: bytes) -> bytes:
        """The response to one complete request; an incomplete one is a bad request."""
        exchange = self.next_exchange(request)
        if exchange is None:
            return self._serialize(h11.Connection(h11.SERVER), None, _Answer(400, MSG_INVALID_REQUEST))
        return exchange.response

    def next_exchange(self, stream: bytes | bytearray) -> HttpExchange | None:
        """Frame the first request of `stream` and answer it; None while it is incomplete.

        Bytes after the request (a pipelined next request) are left alone:
        `HttpExchange.consumed` says where they start.
        """
        if not stream:
            return None  # h11 reads b"" as end of stream
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_SIZE)
        conn.receive_data(bytes(stream))
        request: h11.Request | None = None
        body = bytearray()
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    if len(stream) > MAX_REQUEST_SIZE:
                        answer = _Answer(413, MSG_INVALID_REQUEST)
                        return HttpExchange(len(stream), self._serialize(conn, request, answer), True)
                    return None
                if isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:  # ConnectionClosed or PAUSED cannot happen on a fresh server; never loop on them
                    return None
        except h11.RemoteProtocolError as exc:
            status = 431 if exc.error_status_hint == 431 else 400
            answer = _Answer(status, MSG_INVALID_REQUEST)
            return HttpExchange(len(stream), self._serialize(conn, request, answer), True)
        assert request is not None  # h11 yields Request before EndOfMessage
        consumed = len(stream) - len(conn.trailing_data[0])
        answer = self._answer(request, bytes(body))
        response = self._serialize(conn, request, answer)
        return HttpExchange(consumed, response, conn.our_state is h11.MUST_CLOSE)

    # --- semantics -------------------------------------------------------------------

    def _answer(self, request: h11.Request, body: bytes) -> _Answer:
        if request.http_version not in (b"1.0", b"1.1"):
            return _Answer(501, MSG_INVALID_VERSION)
        path = _abs_path(request.target)
        if not path:
            return _Answer(400, MSG_INVALID_URI)
        headers = list(request.headers.raw_items())
        if request.method == b"GET":
            if body:
                return _Answer(400, MSG_INVALID_REQUEST)
            return self._get(path, headers)
        if request.method == b"PUT":
            return self._put(path, headers)
        return _Answer(405, MSG_METHOD_NOT_ALLOWED, headers=((b"Allow", b"GET, PUT"),))

    def _get(self, path: str, headers: Sequence[tuple[bytes, bytes]]) -> _Answer:
        token = _find_header(headers, TOKEN_HEADERS)
        if token is None:
            self.metrics.rx_no_token += 1
            if self.store.version is MmdsVersion.V2:
                return _Answer(401, MSG_NO_TOKEN)
        elif not self.store.is_valid_token(token[1].decode("latin-1")):
            self.metrics.rx_invalid_token += 1
            if self.store.version is MmdsVersion.V2:
                return _Answer(401, MSG_INVALID_TOKEN)
        try:
            text, used = self.store.render(path, _requested_format(headers))
        except NotFound:
            return _Answer(404, f"Resource not found: {path}.")
        except UnsupportedValueType as exc:
            return _Answer(501, exc.message)
        return _Answer(200, text, content_type=used.value)

    def _put(self, path: str, headers: Sequence[tuple[bytes, bytes]]) -> _Answer:
        forwarded = _find_header(headers, (X_FORWARDED_FOR_HEADER,))
        if forwarded is not None:
            name = forwarded[0].decode("latin-1")
            return _Answer(400, f"Invalid header. Reason: Unsupported header name. Key: {name}")
        if sanitize_path(path) != PATH_TO_TOKEN:
            return _Answer(404, f"Resource not found: {path}.")
        ttl_header = _find_header(headers, TTL_HEADERS)
        if ttl_header is None:
            return _Answer(400, MSG_NO_TTL)
        name, value = (part.decode("latin-1") for part in ttl_header)
        ttl = _parse_u32(value)
        if ttl is None:
            return _Answer(400, f"Invalid header. Reason: Invalid value. Key:{name}; Value:{value}")
        try:
            token = self.store.generate_token(ttl)
        except InvalidTtlValue as exc:
            return _Answer(400, str(exc))
        return _Answer(200, token, headers=((ttl_header[0], str(ttl).encode()),))

    # --- wire ------------------------------------------------------------------------

    @staticmethod
    def _serialize(conn: h11.Connection, request: h11.Request | None, answer: _Answer) -> bytes:
        body = answer.body.encode()
        headers = [
            *answer.headers,
            (b"Content-Type", answer.content_type.encode()),
            (b"Content-Length", str(len(body)).encode()),
        ]
        reason = REASONS.get(answer.status, b"")
        out = conn.send(h11.Response(status_code=answer.status, headers=headers, reason=reason))
        if request is None or request.method != b"HEAD":
            out += conn.send(h11.Data(data=body))
        out += conn.send(h11.EndOfMessage())
        return out


def _abs_path(target: bytes) -> str:
    """micro_http's `Uri::get_abs_path`: the path of an origin or absolute-form target, or ""."""
    try:
        text = target.decode("utf-8")
    except UnicodeDecodeError:
        return ""
    if text.startswith("http://"):
        rest = text[len("http://") :]
        slash = rest.find("/")
        return rest[slash:] if slash >= 0 else ""
    return text if text.startswith("/") else ""


def _find_header(headers: Sequence[tuple[bytes, bytes]], names: Sequence[bytes]) -> tuple[bytes, bytes] | None:
    """The first header (raw name, value) whose name is one of `names` (lower case)."""
    for name, value in headers:
        if name.lower() in names:
            return name, value
    return None


def _requested_format(headers: Sequence[tuple[bytes, bytes]]) -> OutputFormat:
    """JSON iff the last ``Accept`` names ``application/json`` (parameters ignored)."""
    accept = None
    for name, value in headers:
        if name.lower() == b"accept":
            accept = value
    if accept is not None and accept.split(b";", 1)[0].strip().lower() == b"application/json":
        return OutputFormat.JSON
    return OutputFormat.IMDS


def _parse_u32(text: str) -> int | None:
    """Rust's `u32::from_str`: optional ``+``, ASCII digits, at most 2^32-1."""
    digits = text[1:] if text.startswith("+") else text
    if not digits or not digits.isascii() or not digits.isdigit():
        return None
    value = int(digits)
    return value if value <= U32_MAX else None

"""MmdsHttp: Firecracker's MMDS HTTP semantics, with an h11 client as the peer."""

from __future__ import annotations

import json

import pytest

from vmm.mmds import MmdsHttp, MmdsStore, MmdsVersion
from vmm.mmds.http import MAX_REQUEST_SIZE

from .packets import FakeClock, HttpResponse, http_request, parse_response, parse_responses

DATA = {
    "age": 43,
    "name": {"first": "John", "second": "Doe"},
    "phones": {"home": {"RO": "+401234567", "UK": "+441234567"}, "mobile": "+442345678"},
    "latest": {"meta-data": {"ami-id": "ami-12345678", "list": ["a", "b"]}},
}
NO_TOKEN = (
    "No MMDS token provided. Use `X-metadata-token` or `X-aws-ec2-metadata-token` header "
    "to specify the session token."
)
NO_TTL = (
    "Token time to live value not found. Use `X-metadata-token-ttl-seconds` or "
    "`X-aws-ec2-metadata-token-ttl-seconds` header to specify the token's lifetime."
)


def server(
    version: MmdsVersion = MmdsVersion.V1, *, imds_compat: bool = False, clock: FakeClock | None = None
) -> MmdsHttp:
    store = MmdsStore(version=version, imds_compat=imds_compat, clock=clock or FakeClock())
    store.put(DATA)
    return MmdsHttp(store)


def ask(http: MmdsHttp, method: str, target: str, headers: list[tuple[str, str]] | None = None, **kw) -> HttpResponse:
    return parse_response(http.respond(http_request(method, target, headers, **kw)), method)


def get_token(http: MmdsHttp, ttl: int = 60, header: str = "X-metadata-token-ttl-seconds") -> str:
    response = ask(http, "PUT", "/latest/api/token", [(header, str(ttl))])
    assert response.status == 200, response.body
    return response.body.decode()


# --- GET ------------------------------------------------------------------------------


def test_accept_header_selects_the_format() -> None:
    http = server()
    for headers in ([], [("Accept", "text/plain")], [("Accept", "*/*")], [("Accept", "")]):
        r = ask(http, "GET", "/", headers)
        assert (r.status, r.headers["content-type"], r.body) == (200, "text/plain", b"age\nlatest/\nname/\nphones/")
    for accept in ("application/json", "Application/JSON; charset=utf-8"):
        r = ask(http, "GET", "/", [("Accept", accept)])
        assert r.status == 200 and r.headers["content-type"] == "application/json"
        assert json.loads(r.body) == DATA
        assert r.body == json.dumps(DATA, sort_keys=True, separators=(",", ":")).encode()


def test_content_length_matches_body() -> None:
    r = ask(server(), "GET", "/latest/meta-data/ami-id")
    assert r.body == b"ami-12345678"
    assert r.headers["content-length"] == "12"


def test_imds_compat_ignores_accept() -> None:
    r = ask(server(imds_compat=True), "GET", "/name", [("Accept", "application/json")])
    assert (r.status, r.headers["content-type"], r.body) == (200, "text/plain", b"first\nsecond")


def test_absolute_form_target_and_slashes() -> None:
    http = server()
    assert ask(http, "GET", "http://169.254.169.254/name/first").body == b"John"
    assert ask(http, "GET", "//name//first/").body == b"John"
    assert ask(http, "GET", "http://169.254.169.254:80/phones/").body == b"home/\nmobile"


@pytest.mark.parametrize("target", ["/invalid", "/name/third", "/latest/meta-data/list/5"])
def test_missing_resource_is_404(target: str) -> None:
    r = ask(server(), "GET", target)
    expected = (404, "text/plain", f"Resource not found: {target}.".encode())
    assert (r.status, r.headers["content-type"], r.body) == expected


def test_unsupported_type_in_imds_is_501_but_fine_in_json() -> None:
    http = server()
    r = ask(http, "GET", "/age")
    assert (r.status, r.body) == (501, b"Cannot retrieve value. The value has an unsupported type.")
    assert ask(http, "GET", "/age", [("Accept", "application/json")]).body == b"43"
    assert ask(http, "GET", "/latest/meta-data/list", [("Accept", "application/json")]).body == b'["a","b"]'
    assert ask(http, "GET", "/latest/meta-data/list/1").body == b"b"


@pytest.mark.parametrize("target", ["http://169.254.169.254", "relative/path", "*"])
def test_target_without_absolute_path_is_invalid_uri(target: str) -> None:
    for method in ("GET", "PUT", "PATCH"):
        r = ask(server(), method, target)
        assert (r.status, r.body) == (400, b"Invalid URI.")


@pytest.mark.parametrize("method", ["PATCH", "DELETE", "POST", "OPTIONS", "FOO"])
def test_other_methods_are_405_with_allow(method: str) -> None:
    r = ask(server(), method, "/")
    assert (r.status, r.body) == (405, b"Not allowed HTTP method.")
    assert r.headers["allow"] == "GET, PUT"


def test_head_is_405_without_a_body() -> None:
    raw = server().respond(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 405 ")
    assert raw.endswith(b"\r\n\r\n")
    assert parse_response(raw, "HEAD").status == 405


def test_get_with_a_body_is_invalid() -> None:
    r = ask(server(), "GET", "/", body=b"x=1")
    assert (r.status, r.body) == (400, b"Invalid request.")


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
        b"G@T / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"\x00\x01\x02\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: zz\r\n\r\n",
    ],
)
def test_malformed_requests_are_400_and_close(raw: bytes) -> None:
    http = server()
    exchange = http.next_exchange(raw)
    assert exchange is not None and exchange.close and exchange.consumed == len(raw)
    r = parse_response(exchange.response)
    assert (r.status, r.body) == (400, b"Invalid request.")


def test_incomplete_request_respond_is_400() -> None:
    assert parse_response(server().respond(b"GET / HTTP/1.1\r\nHost")).status == 400


def test_unsupported_http_version_is_501() -> None:
    r = parse_response(server().respond(b"GET / HTTP/2.0\r\nHost: x\r\n\r\n"))
    assert (r.status, r.body) == (501, b"Invalid HTTP Version: Unsupported HTTP version.")


def test_http10_is_answered_and_closed() -> None:
    exchange = server().next_exchange(b"GET http://169.254.169.254/name/first HTTP/1.0\r\n\r\n")
    assert exchange is not None and exchange.close
    assert b"Connection: close" in exchange.response
    assert parse_response(exchange.response).body == b"John"


# --- framing a stream -----------------------------------------------------------------


def test_next_exchange_frames_pipelined_requests() -> None:
    http = server()
    first = http_request("GET", "/name/first")
    second = http_request("GET", "/name/second")
    stream = first + second[:10]
    exchange = http.next_exchange(stream)
    assert exchange is not None and not exchange.close
    assert exchange.consumed == len(first)
    assert parse_response(exchange.response).body == b"John"
    assert http.next_exchange(stream[exchange.consumed :]) is None
    exchange = http.next_exchange(second)
    assert exchange is not None and parse_response(exchange.response).body == b"Doe"


def test_incomplete_request_needs_more_bytes() -> None:
    http = server()
    request = http_request("GET", "/")
    for cut in range(len(request)):
        assert http.next_exchange(request[:cut]) is None
    assert http.next_exchange(request) is not None


def test_request_body_is_framed_by_content_length_and_chunks() -> None:
    http = server()
    put = http_request("PUT", "/latest/api/token", [("X-metadata-token-ttl-seconds", "5")], body=b"ignored")
    exchange = http.next_exchange(put + b"GET")
    assert exchange is not None and exchange.consumed == len(put)
    chunked = (
        b"PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nX-metadata-token-ttl-seconds: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )
    exchange = http.next_exchange(chunked)
    assert exchange is not None and parse_response(exchange.response).status == 200


def test_oversized_incomplete_request_is_refused() -> None:
    exchange = server().next_exchange(b"GET /" + b"a" * MAX_REQUEST_SIZE)
    assert exchange is not None and exchange.close
    assert parse_response(exchange.response).status in (413, 431)


# --- tokens ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", [MmdsVersion.V1, MmdsVersion.V2])
def test_put_token(version: MmdsVersion) -> None:
    http = server(version)
    for header in ("X-metadata-token-ttl-seconds", "x-aws-ec2-metadata-token-ttl-seconds"):
        r = ask(http, "PUT", "/latest/api/token", [(header, "60")])
        assert (r.status, r.headers["content-type"]) == (200, "text/plain")
        assert r.headers[header.lower()] == "60"
        assert http.store.is_valid_token(r.body.decode())


@pytest.mark.parametrize("version", [MmdsVersion.V1, MmdsVersion.V2])
def test_put_errors(version: MmdsVersion) -> None:
    http = server(version)
    for header in ("X-Forwarded-For", "x-forwarded-for", "X-fOrWaRdEd-FoR"):
        r = ask(http, "PUT", "/latest/api/token", [(header, "203.0.113.195"), ("X-metadata-token-ttl-seconds", "60")])
        assert (r.status, r.body.decode()) == (400, f"Invalid header. Reason: Unsupported header name. Key: {header}")
    r = ask(http, "PUT", "/token", [("X-metadata-token-ttl-seconds", "60")])
    assert (r.status, r.body) == (404, b"Resource not found: /token.")
    r = ask(http, "PUT", "/latest/api/token", [("X-metadata-token-ttl-seconds", "application/json")])
    assert (r.status, r.body) == (
        400,
        b"Invalid header. Reason: Invalid value. Key:X-metadata-token-ttl-seconds; Value:application/json",
    )
    for bad in ("-1", "4294967296", "1.5", ""):
        r = ask(http, "PUT", "/latest/api/token", [("X-metadata-token-ttl-seconds", bad)])
        assert r.status == 400 and r.body.startswith(b"Invalid header. Reason: Invalid value.")
    for ttl in (0, 21601):
        r = ask(http, "PUT", "/latest/api/token", [("X-metadata-token-ttl-seconds", str(ttl))])
        assert (r.status, r.body.decode()) == (
            400,
            f"Invalid time to live value provided for token: {ttl}. Please provide a value between 1 and 21600.",
        )
    r = ask(http, "PUT", "/latest/api/token")
    assert (r.status, r.body.decode()) == (400, NO_TTL)


def test_v2_token_flow() -> None:
    clock = FakeClock()
    http = server(MmdsVersion.V2, clock=clock)
    r = ask(http, "GET", "/name/first")
    assert (r.status, r.body.decode()) == (401, NO_TOKEN)
    assert http.metrics.rx_no_token == 1

    token = get_token(http, ttl=2)
    for header in ("X-metadata-token", "X-AWS-EC2-METADATA-TOKEN"):
        assert ask(http, "GET", "/name/first", [(header, token)]).body == b"John"

    r = ask(http, "GET", "/name/first", [("X-metadata-token", "INVALID_TOKEN")])
    assert (r.status, r.body) == (401, b"MMDS token not valid.")
    assert http.metrics.rx_invalid_token == 1

    clock.advance(2.0)
    r = ask(http, "GET", "/name/first", [("X-metadata-token", token)])
    assert (r.status, r.body) == (401, b"MMDS token not valid.")


def test_v2_token_checked_before_the_path() -> None:
    r = ask(server(MmdsVersion.V2), "GET", "/does/not/exist")
    assert r.status == 401


def test_v1_accepts_missing_and_invalid_tokens_but_counts_them() -> None:
    http = server(MmdsVersion.V1)
    assert ask(http, "GET", "/name/first").body == b"John"
    assert ask(http, "GET", "/name/first", [("X-metadata-token", "INVALID")]).body == b"John"
    token = get_token(http)
    assert ask(http, "GET", "/name/first", [("X-metadata-token", token)]).body == b"John"
    assert (http.metrics.rx_no_token, http.metrics.rx_invalid_token) == (1, 1)


def test_ttl_header_ignored_on_get() -> None:
    http = server(MmdsVersion.V2)
    token = get_token(http)
    r = ask(http, "GET", "/", [("X-metadata-token", token), ("X-metadata-token-ttl-seconds", "application/json")])
    assert r.status == 200


def test_keep_alive_responses_parse_in_sequence() -> None:
    http = server()
    data = http.respond(http_request("GET", "/name/first")) + http.respond(http_request("GET", "/nope"))
    first, second = parse_responses(data, count=2)
    assert (first.status, first.body) == (200, b"John")
    assert second.status == 404

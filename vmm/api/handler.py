"""One API request in, one reply out: route it, have it executed, count and log it.

`ApiHandler` is what the HTTP server calls for every complete request. It
is transport-free (method, path and body in; status, JSON body and a
deprecation flag out) and runs on the API thread: the action itself is
executed by `dispatch`, which in the VMM hands it to the event loop
(`EventLoopChannel.call`) and waits for the controller's answer.

It keeps Firecracker's API metrics (``put_api_requests.drive_count``, the
``_fails`` counters, ``deprecated_api``, the pause/resume latencies) and
logs each request the way Firecracker's `ParsedRequest` does, without the
MMDS contents.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus

import structlog

from vmm.config import Json
from vmm.metrics import Metrics

from .actions import ApiError, ApiResult, Pause, Resume, VmmAction
from .channel import ChannelError, EventLoopChannel
from .routes import deprecation_notice, request_metric, route

__all__ = ["Reply", "ApiHandler"]

log = structlog.get_logger("vmm.api.handler")

# How much of a request body a debug log line quotes.
_LOGGED_BODY_LIMIT = 1024


@dataclass(frozen=True)
class Reply:
    """An HTTP answer: `status`, and `body` as JSON (None: no body)."""

    status: int
    body: Json | None = None
    deprecated: bool = False

    @classmethod
    def from_result(cls, result: ApiResult, deprecated: bool = False) -> Reply:
        return cls(int(result.status), result.body, deprecated)


class ApiHandler:
    """Route, dispatch, count and log API requests (called on the API thread)."""

    def __init__(self, dispatch: Callable[[VmmAction], ApiResult], metrics: Metrics | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._dispatch = dispatch
        self._metrics = metrics
        self._clock = clock

    @classmethod
    def through_channel(cls, channel: EventLoopChannel, execute: Callable[[VmmAction], ApiResult],
                        metrics: Metrics | None = None) -> ApiHandler:
        """A handler whose actions run on the event loop behind `channel` (`execute` there)."""
        def dispatch(action: VmmAction) -> ApiResult:
            try:
                return channel.call(lambda: execute(action))
            except ChannelError as exc:
                return ApiError(f"The VMM is shutting down: {exc}", HTTPStatus.SERVICE_UNAVAILABLE)
        return cls(dispatch, metrics)

    def __call__(self, method: str, path: str, body: bytes) -> Reply:
        started = self._clock()
        method = method.upper()
        log.info("API request", method=method, path=path)
        if body and path != "/mmds":  # MMDS contents may be secrets: never logged
            log.debug("API request body", body=body[:_LOGGED_BODY_LIMIT].decode("utf-8", "replace"))
        # Counted on arrival, as Firecracker counts at parse time (a FlushMetrics counts itself).
        metric = request_metric(method, path)
        if metric is not None:
            self._count(metric[0], f"{metric[1]}_count")
        routed = route(method, path, body)
        deprecated = False
        if isinstance(routed, ApiError):
            result: ApiResult = routed
        else:
            notice = deprecation_notice(method, routed)
            if notice is not None:
                deprecated = True
                log.warning(notice)
                self._count("deprecated_api", "deprecated_http_api_calls")
            result = self._dispatch(routed)
            if not isinstance(result, ApiError) and isinstance(routed, (Pause, Resume)) and self._metrics:
                name = "pause_vm" if isinstance(routed, Pause) else "resume_vm"
                self._metrics.gauge("latencies_us", name).set(int((self._clock() - started) * 1_000_000))
        if isinstance(result, ApiError):
            if metric is not None and metric[0] != "get_api_requests":
                self._count(metric[0], f"{metric[1]}_fails")
            log.info("API request failed", method=method, path=path, status=int(result.status),
                     fault_message=result.fault_message)
        else:
            log.debug("API request done", method=method, path=path, status=int(result.status))
        return Reply.from_result(result, deprecated)

    def _count(self, section: str, name: str) -> None:
        if self._metrics is not None:
            self._metrics.counter(section, name).inc()

    def __repr__(self) -> str:
        return f"<ApiHandler metrics={self._metrics!r}>"

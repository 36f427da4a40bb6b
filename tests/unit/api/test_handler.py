"""`ApiHandler`: routing, dispatch, Firecracker's API metrics, deprecation flags."""

from __future__ import annotations

import json
import threading

from vmm.api import ApiError, ApiHandler, ApiOk, EventLoopChannel, GetInstanceInfo, Pause, Reply, StartMicroVm
from vmm.metrics import Metrics


class Recorder:
    def __init__(self, result=ApiOk()) -> None:
        self.actions = []
        self.result = result

    def __call__(self, action):
        self.actions.append(action)
        return self.result


def test_a_routed_request_is_dispatched_and_counted() -> None:
    metrics, dispatch = Metrics(), Recorder()
    handler = ApiHandler(dispatch, metrics)
    reply = handler("PUT", "/actions", b'{"action_type": "InstanceStart"}')
    assert reply == Reply(204, None, False)
    assert dispatch.actions == [StartMicroVm()]
    put = metrics.snapshot()["put_api_requests"]
    assert (put["actions_count"], put["actions_fails"]) == (1, 0)


def test_a_refused_request_is_not_dispatched_and_counts_as_failed() -> None:
    metrics, dispatch = Metrics(), Recorder()
    reply = ApiHandler(dispatch, metrics)("PUT", "/drives/x", b'{"drive_id": "y", "is_root_device": false}')
    assert reply.status == 400 and "does not match" in reply.body["fault_message"]
    assert dispatch.actions == []
    put = metrics.snapshot()["put_api_requests"]
    assert (put["drive_count"], put["drive_fails"]) == (1, 1)


def test_an_action_error_counts_as_failed_and_keeps_its_status() -> None:
    metrics = Metrics()
    dispatch = Recorder(ApiError("MMDS limit exceeded error: too big", 413))
    reply = ApiHandler(dispatch, metrics)("PATCH", "/mmds", b"{}")
    assert reply == Reply(413, {"fault_message": "MMDS limit exceeded error: too big"})
    patch = metrics.snapshot()["patch_api_requests"]
    assert (patch["mmds_count"], patch["mmds_fails"]) == (1, 1)


def test_get_requests_are_counted_without_fails() -> None:
    metrics = Metrics()
    handler = ApiHandler(Recorder(ApiOk({"x": 1})), metrics)
    assert handler("GET", "/", b"") == Reply(200, {"x": 1})
    handler("GET", "/", b"{}")  # refused: a GET body
    got = metrics.snapshot()["get_api_requests"]
    assert got["instance_info_count"] == 2 and "instance_info_fails" not in got


def test_deprecated_fields_flag_the_reply_and_count() -> None:
    metrics = Metrics()
    reply = ApiHandler(Recorder(), metrics)("PUT", "/vsock", b'{"vsock_id": "v", "guest_cid": 3, "uds_path": "/v"}')
    assert reply.deprecated and reply.status == 204
    assert metrics.snapshot()["deprecated_api"]["deprecated_http_api_calls"] == 1


def test_pause_latency_is_recorded() -> None:
    metrics = Metrics()
    ticks = iter([1.0, 1.25])
    dispatch = Recorder()
    ApiHandler(dispatch, metrics, clock=lambda: next(ticks))("PATCH", "/vm", b'{"state": "Paused"}')
    assert dispatch.actions == [Pause()]
    assert metrics.snapshot()["latencies_us"]["pause_vm"] == 250_000


def test_through_a_closed_channel_the_answer_is_503() -> None:
    channel = EventLoopChannel()
    channel.close()
    handler = ApiHandler.through_channel(channel, Recorder())
    reply = handler("GET", "/", b"")
    assert reply.status == 503 and "shutting down" in reply.body["fault_message"]
    json.dumps(reply.body)


def test_through_a_channel_the_action_runs_where_the_channel_is_served() -> None:
    channel = EventLoopChannel()
    executed = []
    handler = ApiHandler.through_channel(channel, lambda a: executed.append(a) or ApiOk({"ok": True}))
    result = []
    t = threading.Thread(target=lambda: result.append(handler("GET", "/", b"")))
    t.start()
    channel.run_until(lambda: bool(executed), timeout=5)
    t.join(5)
    channel.close()
    assert executed == [GetInstanceInfo()] and result == [Reply(200, {"ok": True})]

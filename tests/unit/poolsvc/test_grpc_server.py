"""PoolService over gRPC, in process, against a fake backend; and the generated-code cache."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from poolsvc import proto
from poolsvc.api_types import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PoolError,
    ResourceExhausted,
    Unavailable,
)
from poolsvc.server import SERVICE_NAME, ServerError, start

from tests.unit.poolsvc._grpc_fake import FakeBackend, backend, pb, server, stub  # noqa: F401

SC = grpc.StatusCode


def _rpc_error(fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = fn(*args, **kwargs)
        if hasattr(result, "__next__"):
            list(result)
    return info.value


@pytest.fixture
def ready(stub, pb, backend: FakeBackend):
    """A template `py` with a pool of 1..3."""
    stub.CreateTemplate(pb.CreateTemplateRequest(name="py", kernel="/k", rootfs="/r", vcpus=2, mem_mib=256))
    stub.SetPool(pb.SetPoolRequest(template="py", min_warm=1, max_warm=3))
    return stub


# ---- round trips ----------------------------------------------------------------

def test_template_round_trip(stub, pb, backend: FakeBackend) -> None:
    t = stub.CreateTemplate(pb.CreateTemplateRequest(
        name="py-3.11", kernel="/k", initrd="/i", boot_args="console=ttyS0", vcpus=2, mem_mib=256))
    assert (t.name, t.vcpus, t.mem_mib, t.kernel, t.initrd, t.boot_args, t.rootfs) == \
        ("py-3.11", 2, 256, "/k", "/i", "console=ttyS0", "")
    assert t.state == pb.TEMPLATE_STATE_READY
    assert t.created.ToNanoseconds() == 1_700_000_000_250_000_000
    spec = backend.last("create_template").args["spec"]
    assert spec.rootfs is None and spec.vcpus == 2  # empty strings reach the backend as None
    stub.CreateTemplate(pb.CreateTemplateRequest(name="bare"))
    assert backend.last("create_template").args["spec"].vcpus is None  # 0: the service's default
    assert [x.name for x in stub.ListTemplates(pb.ListTemplatesRequest()).templates] == ["py-3.11", "bare"]
    stub.DeleteTemplate(pb.DeleteTemplateRequest(name="bare"))
    assert [x.name for x in stub.ListTemplates(pb.ListTemplatesRequest()).templates] == ["py-3.11"]


def test_pool_round_trip(ready, pb) -> None:
    status = ready.GetPoolStatus(pb.GetPoolStatusRequest(template="py"))
    assert (status.template, status.min_warm, status.max_warm, status.warm) == ("py", 1, 3, 1)
    ready.SetPool(pb.SetPoolRequest(template="py", min_warm=0, max_warm=0))
    assert [(p.template, p.max_warm) for p in ready.ListPools(pb.ListPoolsRequest()).pools] == [("py", 0)]


def test_sandbox_round_trip(ready, pb, backend: FakeBackend) -> None:
    req = pb.AcquireRequest(template="py", metadata={"user": "ann"}, idempotency_key="k1")
    req.lease_ttl.FromSeconds(60)
    before = time.time()
    s = ready.Acquire(req)
    call = backend.last("acquire")
    assert call.args == {"template": "py", "lease_ttl": 60.0, "metadata": {"user": "ann"},
                         "idempotency_key": "k1"}
    assert s.id == "sb-1" and s.template == "py" and s.state == pb.SANDBOX_STATE_LEASED
    assert (s.agent.vsock_uds_path, s.agent.port) == ("/run/ember/sb-1/v.sock", 52)
    assert (s.network.ip_address, s.network.tap) == ("10.0.0.1", "tap1")
    assert before + 59 < s.lease_deadline.ToNanoseconds() / 1e9 < time.time() + 61
    assert dict(s.metadata) == {"user": "ann"}

    ready.Acquire(pb.AcquireRequest(template="py"))
    assert backend.last("acquire").args["lease_ttl"] is None  # unset: the default
    assert backend.last("acquire").args["idempotency_key"] is None
    assert ready.Get(pb.GetRequest(id="sb-1")) == s
    assert [x.id for x in ready.List(pb.ListRequest()).sandboxes] == ["sb-1", "sb-2"]
    assert [x.id for x in ready.List(pb.ListRequest(template="other")).sandboxes] == []
    assert backend.last("list_sandboxes").args["template"] == "other"
    ready.Release(pb.ReleaseRequest(id="sb-1"))
    assert backend.released == ["sb-1"]
    assert _rpc_error(ready.Get, pb.GetRequest(id="sb-1")).code() == SC.NOT_FOUND


def test_exec_streams_output_then_exit(ready, pb, backend: FakeBackend) -> None:
    sid = ready.Acquire(pb.AcquireRequest(template="py")).id
    req = pb.ExecRequest(id=sid, argv=["fail"], env={"A": "1"}, stdin=b"in")
    req.timeout.FromMilliseconds(1500)
    out = list(ready.Exec(req))
    assert [m.WhichOneof("output") for m in out] == ["stdout", "stderr", "exit"]
    assert (out[0].stdout, out[1].stderr, out[2].exit.exit_code, out[2].exit.timed_out) == \
        (b"partial\n", b"boom\n", 3, False)
    assert backend.last("exec").args == {"sandbox_id": sid, "argv": ["fail"], "stdin": b"in",
                                         "env": {"A": "1"}, "timeout": 1.5}
    assert backend.exec_closed == ["fail"]
    timed = list(ready.Exec(pb.ExecRequest(id=sid, argv=["sleep", "100"])))
    assert timed[-1].exit.timed_out and timed[-1].exit.exit_code == -9


def test_exec_errors(ready, pb) -> None:
    sid = ready.Acquire(pb.AcquireRequest(template="py")).id
    err = _rpc_error(ready.Exec, pb.ExecRequest(id="nope", argv=["echo"]))
    assert (err.code(), err.details()) == (SC.NOT_FOUND, "no sandbox 'nope'")
    # An error in the middle of the stream ends it with its status.
    stream = ready.Exec(pb.ExecRequest(id=sid, argv=["explode"]))
    assert next(stream).stdout == b"x"
    err = _rpc_error(lambda: next(stream))
    assert (err.code(), err.details()) == (SC.FAILED_PRECONDITION, "the agent went away")
    # A backend that ends the stream without an exit status is a bug: INTERNAL.
    err = _rpc_error(ready.Exec, pb.ExecRequest(id=sid, argv=["noexit"]))
    assert err.code() == SC.INTERNAL and "without an exit status" in err.details()


def test_files_round_trip_in_chunks(ready, pb, backend: FakeBackend) -> None:
    sid = ready.Acquire(pb.AcquireRequest(template="py")).id
    data = os.urandom(300_000)
    messages = [pb.WriteFileRequest(id=sid, path="/root/x.bin", mode=0o600, data=data[:100_000]),
                pb.WriteFileRequest(data=data[100_000:200_000]),
                pb.WriteFileRequest(id=sid, path="/root/x.bin", data=data[200_000:])]  # repeating them is fine
    assert ready.WriteFile(iter(messages)).bytes_written == len(data)
    assert backend.last("write_file").args == {"sandbox_id": sid, "path": "/root/x.bin", "mode": 0o600}
    chunks = [m.data for m in ready.ReadFile(pb.ReadFileRequest(id=sid, path="/root/x.bin"))]
    assert b"".join(chunks) == data and len(chunks) == 5
    assert ready.WriteFile(iter([pb.WriteFileRequest(id=sid, path="/e")])).bytes_written == 0
    assert backend.last("write_file").args["mode"] == 0o644  # mode 0: the default
    assert list(ready.ReadFile(pb.ReadFileRequest(id=sid, path="/e"))) == []


def test_file_errors(ready, pb, backend: FakeBackend) -> None:
    sid = ready.Acquire(pb.AcquireRequest(template="py")).id
    for path, what in [("", "path is empty"), ("rel/x", "not absolute"), ("/a\0b", "NUL"),
                       ("/" + "x" * 4096, "longer than 4096")]:
        err = _rpc_error(ready.ReadFile, pb.ReadFileRequest(id=sid, path=path))
        assert err.code() == SC.INVALID_ARGUMENT and what in err.details(), err.details()
        err = _rpc_error(ready.WriteFile, iter([pb.WriteFileRequest(id=sid, path=path)]))
        assert err.code() == SC.INVALID_ARGUMENT and what in err.details(), err.details()
    assert _rpc_error(ready.ReadFile, pb.ReadFileRequest(id=sid, path="/missing")).code() == SC.NOT_FOUND
    assert _rpc_error(ready.ReadFile, pb.ReadFileRequest(id="nope", path="/x")).code() == SC.NOT_FOUND
    err = _rpc_error(ready.ReadFile, pb.ReadFileRequest(path="/x"))
    assert err.code() == SC.INVALID_ARGUMENT and "id" in err.details()
    err = _rpc_error(ready.WriteFile, iter([]))
    assert err.code() == SC.INVALID_ARGUMENT and "at least one message" in err.details()
    err = _rpc_error(ready.WriteFile, iter([pb.WriteFileRequest(id=sid, path="/x", mode=0o10000)]))
    assert err.code() == SC.INVALID_ARGUMENT and "0o7777" in err.details()
    err = _rpc_error(ready.WriteFile, iter([pb.WriteFileRequest(id=sid, path="/x", data=b"a"),
                                            pb.WriteFileRequest(id=sid, path="/y", data=b"b")]))
    assert err.code() == SC.INVALID_ARGUMENT and "another sandbox or path" in err.details()
    assert (sid, "/y") not in backend.files


def test_a_cancelled_read_stops_pulling_from_the_backend(ready, pb, backend: FakeBackend) -> None:
    sid = ready.Acquire(pb.AcquireRequest(template="py")).id
    stream = ready.ReadFile(pb.ReadFileRequest(id=sid, path="/dev/forever"))
    assert len(next(stream).data) == 65536
    stream.cancel()
    assert backend.read_closed.wait(10)


# ---- status codes ---------------------------------------------------------------

@pytest.mark.parametrize("error,code", [
    (NotFound("no template 'x'"), SC.NOT_FOUND),
    (AlreadyExists("template 'x' exists"), SC.ALREADY_EXISTS),
    (ResourceExhausted("host memory limit: 3.9 of 4 GiB"), SC.RESOURCE_EXHAUSTED),
    (InvalidArgument("bad"), SC.INVALID_ARGUMENT),
    (FailedPrecondition("template 'x' is creating"), SC.FAILED_PRECONDITION),
    (DeadlineExceeded("restore did not finish in time"), SC.DEADLINE_EXCEEDED),
    (Unavailable("draining"), SC.UNAVAILABLE),
    (PoolError("something else"), SC.UNKNOWN),
])
def test_pool_errors_map_to_status_codes(ready, pb, backend: FakeBackend, error, code) -> None:
    backend.fail["acquire"] = error
    err = _rpc_error(ready.Acquire, pb.AcquireRequest(template="py"))
    assert (err.code(), err.details()) == (code, str(error))


def test_error_without_message_sends_its_docstring(ready, pb, backend: FakeBackend) -> None:
    backend.fail["list_pools"] = ResourceExhausted()
    err = _rpc_error(ready.ListPools, pb.ListPoolsRequest())
    assert (err.code(), err.details()) == (SC.RESOURCE_EXHAUSTED, ResourceExhausted.__doc__)


def test_backend_bug_is_internal_and_the_server_keeps_serving(ready, pb, backend: FakeBackend) -> None:
    backend.fail["list_templates"] = KeyError("oops")
    err = _rpc_error(ready.ListTemplates, pb.ListTemplatesRequest())
    assert err.code() == SC.INTERNAL and "KeyError" in err.details()
    del backend.fail["list_templates"]
    assert len(ready.ListTemplates(pb.ListTemplatesRequest()).templates) == 1


def test_every_rpc_maps_errors(ready, pb, backend: FakeBackend) -> None:
    """Each RPC goes through the mapping, not only Acquire."""
    rpcs = {
        "release": (ready.Release, pb.ReleaseRequest(id="a")),
        "get": (ready.Get, pb.GetRequest(id="a")),
        "list_sandboxes": (ready.List, pb.ListRequest()),
        "exec": (ready.Exec, pb.ExecRequest(id="a", argv=["echo"])),
        "create_template": (ready.CreateTemplate, pb.CreateTemplateRequest(name="n")),
        "list_templates": (ready.ListTemplates, pb.ListTemplatesRequest()),
        "delete_template": (ready.DeleteTemplate, pb.DeleteTemplateRequest(name="n")),
        "set_pool": (ready.SetPool, pb.SetPoolRequest(template="py", max_warm=1)),
        "pool_status": (ready.GetPoolStatus, pb.GetPoolStatusRequest(template="py")),
        "list_pools": (ready.ListPools, pb.ListPoolsRequest()),
    }
    for method, (rpc, req) in rpcs.items():
        backend.fail = {method: Unavailable(f"{method} draining")}
        err = _rpc_error(rpc, req)
        assert (err.code(), err.details()) == (SC.UNAVAILABLE, f"{method} draining"), method


# ---- validation -----------------------------------------------------------------

def _bad_requests(pb):
    ttl0 = pb.AcquireRequest(template="py")
    ttl0.lease_ttl.SetInParent()  # present and zero
    neg_timeout = pb.ExecRequest(id="a", argv=["echo"])
    neg_timeout.timeout.FromSeconds(-1)
    return [
        ("Acquire", pb.AcquireRequest(), "template is empty"),
        ("Acquire", ttl0, "lease_ttl must be positive"),
        ("Acquire", pb.AcquireRequest(template="py", metadata={"": "x"}), "metadata has an empty key"),
        ("Acquire", pb.AcquireRequest(template="py", idempotency_key="k" * 257), "idempotency_key"),
        ("Release", pb.ReleaseRequest(), "id is empty"),
        ("Get", pb.GetRequest(), "id is empty"),
        ("Exec", pb.ExecRequest(argv=["echo"]), "id is empty"),
        ("Exec", pb.ExecRequest(id="a"), "argv is empty"),
        ("Exec", pb.ExecRequest(id="a", argv=[""]), "argv[0] is empty"),
        ("Exec", pb.ExecRequest(id="a", argv=["env"], env={"A=B": "1"}), "'='"),
        ("Exec", neg_timeout, "timeout must be positive"),
        ("CreateTemplate", pb.CreateTemplateRequest(), "name is empty"),
        ("CreateTemplate", pb.CreateTemplateRequest(name="../etc"), "does not match"),
        ("CreateTemplate", pb.CreateTemplateRequest(name="x", vcpus=-1), "must be >= 0"),
        ("CreateTemplate", pb.CreateTemplateRequest(name="x", mem_mib=-5), "must be >= 0"),
        ("DeleteTemplate", pb.DeleteTemplateRequest(), "name is empty"),
        ("SetPool", pb.SetPoolRequest(min_warm=1, max_warm=2), "template is empty"),
        ("SetPool", pb.SetPoolRequest(template="py", min_warm=-1, max_warm=2), "must be >= 0"),
        ("SetPool", pb.SetPoolRequest(template="py", min_warm=0, max_warm=-2), "must be >= 0"),
        ("SetPool", pb.SetPoolRequest(template="py", min_warm=3, max_warm=2),
         "min_warm (3) is greater than max_warm (2)"),
        ("GetPoolStatus", pb.GetPoolStatusRequest(), "template is empty"),
    ]


def test_malformed_requests_are_invalid_argument_and_never_reach_the_backend(
        ready, pb, backend: FakeBackend) -> None:
    calls = len(backend.calls)
    for rpc, req, needle in _bad_requests(pb):
        err = _rpc_error(getattr(ready, rpc), req)
        assert err.code() == SC.INVALID_ARGUMENT, (rpc, req)
        assert needle in err.details(), (rpc, err.details())
    assert len(backend.calls) == calls


# ---- deadlines and cancellation -------------------------------------------------

def test_backend_gets_the_deadline_as_a_monotonic_instant(ready, pb, backend: FakeBackend) -> None:
    ready.ListPools(pb.ListPoolsRequest(), timeout=20)
    d = backend.last("list_pools").deadline
    assert d is not None and 18 < d - time.monotonic() < 20.5
    ready.ListPools(pb.ListPoolsRequest())
    assert backend.last("list_pools").deadline is None


def test_client_deadline_cancels_a_waiting_backend(ready, pb, backend: FakeBackend) -> None:
    backend.hold["acquire"] = 10.0
    t0 = time.monotonic()
    err = _rpc_error(ready.Acquire, pb.AcquireRequest(template="py"), timeout=0.3)
    assert err.code() == SC.DEADLINE_EXCEEDED and time.monotonic() - t0 < 3
    call = backend.last("acquire")
    assert call.done.wait(3), "the backend was not told the call ended"
    assert call.woke_by_cancel


def test_client_cancel_reaches_the_backend(ready, pb, backend: FakeBackend) -> None:
    backend.hold["create_template"] = 10.0
    future = ready.CreateTemplate.future(pb.CreateTemplateRequest(name="slow"))
    deadline = time.monotonic() + 3
    while not any(c.method == "create_template" and c.args["spec"].name == "slow" for c in backend.calls):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    future.cancel()
    call = backend.last("create_template")
    assert call.done.wait(3) and call.woke_by_cancel


def test_acquire_abandoned_by_its_client_is_released(ready, pb, backend: FakeBackend) -> None:
    """The lease finished after the client gave up: nobody can use it, so it is given back."""
    backend.sleep["acquire"] = 0.6  # a restore that cannot be interrupted
    err = _rpc_error(ready.Acquire, pb.AcquireRequest(template="py"), timeout=0.2)
    assert err.code() == SC.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 3
    while backend.released != ["sb-1"]:
        assert time.monotonic() < deadline, backend.released
        time.sleep(0.02)
    assert backend.sandboxes == {}


def test_abandoned_acquire_with_idempotency_key_is_kept_for_the_retry(ready, pb, backend: FakeBackend) -> None:
    backend.sleep["acquire"] = 0.6
    err = _rpc_error(ready.Acquire, pb.AcquireRequest(template="py", idempotency_key="k"), timeout=0.2)
    assert err.code() == SC.DEADLINE_EXCEEDED
    assert backend.last("acquire").done.wait(3)
    del backend.sleep["acquire"]
    retry = ready.Acquire(pb.AcquireRequest(template="py", idempotency_key="k"))
    assert retry.id == "sb-1" and backend.released == []


def test_cancelled_exec_stream_closes_the_backend_generator(ready, pb, backend: FakeBackend) -> None:
    sid = ready.Acquire(pb.AcquireRequest(template="py")).id
    stream = ready.Exec(pb.ExecRequest(id=sid, argv=["forever"]))
    assert next(stream).stdout == b"tick\n"
    assert next(stream).stdout == b"tick\n"
    stream.cancel()
    assert backend.exec_closed_event.wait(3), "the backend generator kept running"
    assert backend.exec_closed == ["forever"]
    n = len(backend.exec_closed)
    time.sleep(0.1)
    assert len(backend.exec_closed) == n


def test_cancelled_exec_wakes_a_silent_command(ready, pb, backend: FakeBackend) -> None:
    """A command with no output waits on the cancellation event: cancel ends it."""
    sid = ready.Acquire(pb.AcquireRequest(template="py")).id
    err = _rpc_error(ready.Exec, pb.ExecRequest(id=sid, argv=["block"]), timeout=0.3)
    assert err.code() == SC.DEADLINE_EXCEEDED
    assert backend.exec_closed_event.wait(3)
    assert backend.exec_closed == ["block"]


# ---- health and reflection ------------------------------------------------------

def test_health_check_serving(server: str) -> None:
    with grpc.insecure_channel(server) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", SERVICE_NAME):
            resp = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        err = _rpc_error(health.Check, health_pb2.HealthCheckRequest(service="nope"), timeout=5)
        assert err.code() == SC.NOT_FOUND


def test_reflection_lists_and_describes_the_service(server: str) -> None:
    with grpc.insecure_channel(server) as ch:
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        reqs = [reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME)]
        listed, described = list(refl.ServerReflectionInfo(iter(reqs), timeout=5))
    names = {s.name for s in listed.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names
    files = described.file_descriptor_response.file_descriptor_proto
    assert files and any(b"AcquireRequest" in f for f in files)


def test_listening_on_a_taken_port_fails(backend: FakeBackend, server: str) -> None:
    with pytest.raises(ServerError, match="Could not start"):
        start(backend, server)


# ---- generated code -------------------------------------------------------------

def test_codegen_is_cached_by_proto_content(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = proto.generate(proto.PROTO_ROOT, home)
    assert first.parent == home / "gen"
    assert (first / "ember/pool/v1/pool_pb2.py").is_file()
    assert (first / "ember/pool/v1/pool_pb2_grpc.py").is_file()
    stamp = (first / "ember/pool/v1/pool_pb2.py").stat().st_mtime_ns
    assert proto.generate(proto.PROTO_ROOT, home) == first
    assert (first / "ember/pool/v1/pool_pb2.py").stat().st_mtime_ns == stamp  # not recompiled

    changed_root = tmp_path / "proto"
    shutil.copytree(proto.PROTO_ROOT, changed_root)
    changed = changed_root / proto.PROTO_NAME
    changed.write_text(changed.read_text() + "\nmessage AddedLater { string x = 1; }\n")
    second = proto.generate(changed_root, home)
    assert second != first and second.parent == first.parent
    assert sorted(p.name for p in (home / "gen").iterdir()) == sorted([first.name, second.name])
    # The new modules hold the new message (imported in a fresh process: one
    # process holds one version of a .proto).
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from ember.pool.v1 import pool_pb2, pool_pb2_grpc; "
            "print(pool_pb2.AddedLater(x='y').x, hasattr(pool_pb2_grpc, 'PoolServiceStub'))")
    out = subprocess.run([sys.executable, "-c", code, str(second)], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["y", "True"]


def test_codegen_error_leaves_nothing_behind(tmp_path: Path) -> None:
    root = tmp_path / "proto"
    (root / proto.PROTO_NAME).parent.mkdir(parents=True)
    (root / proto.PROTO_NAME).write_text('syntax = "proto3";\nmessage Broken { strin x = 1; }\n')
    with pytest.raises(proto.ProtoCompileError, match="strin"):
        proto.generate(root, tmp_path / "home")
    assert list((tmp_path / "home" / "gen").iterdir()) == []


def test_codegen_concurrent_first_use_agrees(tmp_path: Path) -> None:
    home = tmp_path / "home"
    results: list[Path] = []
    errors: list[BaseException] = []

    def gen() -> None:
        try:
            results.append(proto.generate(proto.PROTO_ROOT, home))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=gen) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(results)) == 1
    assert [p.name for p in (home / "gen").iterdir()] == [results[0].name]  # no temp dirs left


def test_cache_key_covers_the_generator_version(monkeypatch) -> None:
    text = b'syntax = "proto3";'
    key = proto.cache_key(text)
    monkeypatch.setattr(proto, "_versions", lambda: "grpcio-tools 0.0.1\nprotobuf 1\n")
    assert proto.cache_key(text) != key


def test_load_uses_ember_home_and_is_cached_in_process() -> None:
    pb2, pb2_grpc = proto.load()
    assert proto.load() == (pb2, pb2_grpc)
    home = Path(os.environ.get("EMBER_HOME", Path.home() / ".cache/ember")).expanduser().resolve()
    assert Path(pb2.__file__).resolve().is_relative_to(home / "gen")
    assert pb2.DESCRIPTOR.package == "ember.pool.v1"


def test_free_port_helper_is_not_needed() -> None:
    """start() binds port 0 and reports the port it got."""
    srv, port = start(FakeBackend(), "127.0.0.1:0")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
    finally:
        srv.stop(0).wait(5)

"""`ember serve` end to end with test-guest templates (real KVM, fast).

The template is the freestanding test guest in `agent` mode: it boots in
well under a second and answers agent PINGs on vsock port 52, so these
tests measure Ember's own machinery (zygote, restore, pool, gRPC), not a
guest kernel. The Linux-guest version (Exec, isolation) is
test_pool_linux.py.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import grpc
import pytest

from poolsvc.agent import AgentClient
from tests.integration.pool_harness import Service, alive, wait_dead

pytestmark = pytest.mark.kvm


@pytest.fixture
def home(tmp_path_factory) -> Path:
    # Short: vsock and API socket paths under it must fit sun_path.
    import tempfile
    d = Path(tempfile.mkdtemp(prefix="eph-"))
    yield d
    import shutil
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def service(home):
    services: list[Service] = []

    def start(*extra: str) -> Service:
        s = Service(home, *extra)
        services.append(s)
        return s

    yield start
    for s in services:
        s.cleanup()


def _template(svc: Service, testguest: Path, name: str = "tg") -> None:
    pb2 = svc.pb2
    t = svc.stub.CreateTemplate(pb2.CreateTemplateRequest(name=name, kernel=str(testguest), boot_args="mode=agent",
                                                          vcpus=1, mem_mib=64), timeout=120)
    assert t.name == name


def _acquire(svc: Service, template: str = "tg", **kw):
    return svc.stub.Acquire(svc.pb2.AcquireRequest(template=template, **kw), timeout=60)


def test_acquire_ping_release_with_a_warm_pool(service, testguest) -> None:
    svc = service()
    pb2 = svc.pb2
    _template(svc, testguest)
    assert [t.name for t in svc.stub.ListTemplates(pb2.ListTemplatesRequest()).templates] == ["tg"]
    svc.stub.SetPool(pb2.SetPoolRequest(template="tg", min_warm=2, max_warm=3))
    svc.wait_pool("tg", 2)
    warm_pids = svc.vmm_pids()
    t0 = time.monotonic()
    sb = _acquire(svc, metadata={})
    acquire_ms = (time.monotonic() - t0) * 1000
    print(f"\n[pool] Acquire from a warm pool: {acquire_ms:.1f} ms (incl. a new gRPC call from Python)")
    assert sb.id in warm_pids  # handed out from the warm pool, not restored on demand
    assert sb.template == "tg" and sb.agent.port == 52
    assert AgentClient(sb.agent.vsock_uds_path, sb.agent.port).ping() == "testguest"
    got = svc.stub.Get(pb2.GetRequest(id=sb.id))
    assert got.id == sb.id and got.state == pb2.SANDBOX_STATE_LEASED
    assert sb.id in [s.id for s in svc.stub.List(pb2.ListRequest(template="tg")).sandboxes]
    pid = warm_pids[sb.id]
    svc.stub.Release(pb2.ReleaseRequest(id=sb.id))
    assert wait_dead(pid), "Release did not end the VMM process"
    deadline = time.monotonic() + 10
    while (svc.run_dir / sb.id).exists():  # destruction finishes in the background
        assert time.monotonic() < deadline, "the released sandbox's files were not removed"
        time.sleep(0.05)
    with pytest.raises(grpc.RpcError) as err:
        svc.stub.Get(pb2.GetRequest(id=sb.id))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # A released sandbox is never handed out again; the pool refills.
    svc.wait_pool("tg", 2)
    again = _acquire(svc)
    assert again.id != sb.id
    running = set(svc.vmm_pids().values())
    assert len(running) >= 3
    assert svc.terminate() == 0  # a graceful stop drains: every VMM ends
    assert all(wait_dead(p) for p in running)


def test_unknown_template_idempotency_and_lease_expiry(service, testguest) -> None:
    svc = service()
    pb2 = svc.pb2
    with pytest.raises(grpc.RpcError) as err:
        _acquire(svc, template="nope")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    _template(svc, testguest)
    # An empty pool restores on demand rather than failing.
    a = _acquire(svc, idempotency_key="k1")
    b = _acquire(svc, idempotency_key="k1")
    assert a.id == b.id
    short = _acquire(svc, lease_ttl={"seconds": 1})
    pid = svc.vmm_pids()[short.id]
    deadline = time.monotonic() + 15
    while True:
        try:
            svc.stub.Get(pb2.GetRequest(id=short.id))
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
            break
        assert time.monotonic() < deadline, "the expired lease was not reaped"
        time.sleep(0.2)
    assert wait_dead(pid)
    assert svc.terminate() == 0


def test_a_killed_warm_vmm_is_noticed_and_replaced(service, testguest) -> None:
    svc = service()
    pb2 = svc.pb2
    _template(svc, testguest)
    svc.stub.SetPool(pb2.SetPoolRequest(template="tg", min_warm=2, max_warm=2))
    svc.wait_pool("tg", 2)
    victim, pid = next(iter(svc.vmm_pids().items()))
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while victim in {s.id for s in svc.stub.List(pb2.ListRequest(template="tg")).sandboxes}:
        assert time.monotonic() < deadline, "the dead VMM is still listed"
        time.sleep(0.2)
    status = svc.wait_pool("tg", 2)
    assert status.failures_total >= 1 and status.launches_total >= 3
    assert victim not in svc.vmm_pids()
    assert svc.terminate() == 0


def test_host_full_is_resource_exhausted(service, testguest) -> None:
    svc = service("--max-vms", "2")
    _template(svc, testguest)
    _acquire(svc)
    _acquire(svc)
    with pytest.raises(grpc.RpcError) as err:
        _acquire(svc)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert svc.terminate() == 0


def test_a_crashed_service_leaves_nothing_after_restart(service, testguest, home) -> None:
    svc = service()
    pb2 = svc.pb2
    _template(svc, testguest)
    svc.stub.SetPool(pb2.SetPoolRequest(template="tg", min_warm=2, max_warm=2))
    svc.wait_pool("tg", 2)
    _acquire(svc)
    pids = list(svc.vmm_pids().values())
    assert len(pids) == 3
    svc.kill()  # no drain: the VMMs outlive it
    assert all(alive(p) for p in pids)
    svc2 = service()
    assert all(wait_dead(p) for p in pids), "the new service did not clean up its predecessor's VMMs"
    # The template survived; the new service serves it.
    sb = _acquire(svc2)
    assert AgentClient(sb.agent.vsock_uds_path, sb.agent.port).ping() == "testguest"
    assert svc2.terminate() == 0
    assert not [d for d in svc2.run_dir.iterdir() if d.is_dir()], list(svc2.run_dir.iterdir())


def test_health_checking_and_exec_on_an_agent_without_exec(service, testguest) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    svc = service()
    health = health_pb2_grpc.HealthStub(svc.channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="ember.pool.v1.PoolService")).status == \
        health_pb2.HealthCheckResponse.SERVING
    _template(svc, testguest)
    sb = _acquire(svc)
    with pytest.raises(grpc.RpcError) as err:
        list(svc.stub.Exec(svc.pb2.ExecRequest(id=sb.id, argv=["echo", "hi"]), timeout=30))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not supported" in err.value.details()
    assert svc.terminate() == 0

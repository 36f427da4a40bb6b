"""`ember serve` end to end with test-guest templates (real KVM, fast).

The template is the freestanding test guest in `agent` mode: it boots in
well under a second and answers agent PINGs on vsock port 52, so these
tests measure Ember's own machinery (zygote, restore, pool, gRPC), not a
guest kernel. The Linux-guest version (Exec, isolation) is
test_pool_linux.py.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from poolsvc.agent import AgentClient
from tests.integration.pool_harness import Service, alive, metric_value, wait_dead

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


def _warm_pool(svc: Service, testguest: Path, warm: int) -> None:
    """Template "tg" with `warm` warm sandboxes (min_warm = max_warm)."""
    _template(svc, testguest)
    svc.stub.SetPool(svc.pb2.SetPoolRequest(template="tg", min_warm=warm, max_warm=warm))
    svc.wait_pool("tg", warm)


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
    svc.wait_pool("tg", 2)  # the refill after that Acquire (a warm Acquire can beat its pid file)
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
    _warm_pool(svc, testguest, 2)
    victim, pid = next(iter(svc.vmm_pids().items()))
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while victim in {s.id for s in svc.stub.List(pb2.ListRequest(template="tg")).sandboxes}:
        assert time.monotonic() < deadline, "the dead VMM is still listed"
        time.sleep(0.2)
    status = svc.wait_pool("tg", 2)
    assert status.failures_total >= 1 and status.launches_total >= 3
    assert status.launch_rate > 0 and status.mem_mib >= 64 * (status.warm + status.leased + status.restoring)
    assert victim not in svc.vmm_pids()
    with urllib.request.urlopen(f"http://{svc.metrics_addr}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    assert 'ember_vmm_deaths_total{cause="killed by SIGKILL",template="tg"} 1.0' in metrics
    assert 'ember_pool_sandboxes{state="warm",template="tg"} 2.0' in metrics
    assert 'ember_restores_total{outcome="ok",template="tg"}' in metrics
    assert svc.terminate() == 0


def test_each_acquire_reaches_the_agent_at_the_first_connection(service, testguest) -> None:
    # A refused first connection costs a guest round trip and a retry in every Acquire.
    svc = service()
    pb2 = svc.pb2
    _warm_pool(svc, testguest, 2)
    for _ in range(4):
        sb = _acquire(svc)
        assert AgentClient(sb.agent.vsock_uds_path, sb.agent.port, timeout=20).ping() == "testguest"
        svc.stub.Release(pb2.ReleaseRequest(id=sb.id))
    assert metric_value(svc, 'ember_agent_retries_total{template="tg"}') == 0
    assert svc.terminate() == 0


def test_a_vmm_killed_by_sigsys_is_logged_as_a_seccomp_violation(service, testguest) -> None:
    # A seccomp violation ends the VMM with SIGSYS. A jailed VMM is pid 1 of its PID namespace,
    # which ignores signals from outside except SIGKILL/SIGSTOP, so `kill -SYS` can only stand
    # in for a violation with the jail off (test_seccomp.py triggers real violations).
    svc = service("--no-jail")
    _warm_pool(svc, testguest, 1)
    victim, pid = next(iter(svc.vmm_pids().items()))
    os.kill(pid, signal.SIGSYS)
    deadline = time.monotonic() + 30
    while "seccomp violation" not in svc.logs():
        assert time.monotonic() < deadline, f"the seccomp death was not logged:\n{svc.logs()}"
        time.sleep(0.2)
    assert victim in next(line for line in svc.logs().splitlines() if "seccomp violation" in line)
    svc.wait_pool("tg", 1)
    with urllib.request.urlopen(f"http://{svc.metrics_addr}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    assert 'ember_vmm_deaths_total{cause="killed by SIGSYS (seccomp violation)",template="tg"} 1.0' in metrics
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
    _warm_pool(svc, testguest, 2)
    _acquire(svc)
    svc.wait_pool("tg", 2)  # the refill's VMM has written its pid file
    pids = list(svc.vmm_pids().values())
    assert len(pids) == 3
    svc.kill()  # no drain: the VMMs outlive it
    assert all(alive(p) for p in pids)
    svc2 = service()
    assert all(wait_dead(p) for p in pids), "the new service did not clean up its predecessor's VMMs"
    # The template survived, with the bounds SetPool gave it: the new service refills to them.
    status = svc2.stub.GetPoolStatus(pb2.GetPoolStatusRequest(template="tg"))
    assert (status.min_warm, status.max_warm) == (2, 2)
    svc2.wait_pool("tg", 2)
    sb = _acquire(svc2)
    assert AgentClient(sb.agent.vsock_uds_path, sb.agent.port).ping() == "testguest"
    assert _fstype(svc2.run_dir / ".jail") == "tmpfs"  # the predecessor's was replaced, not stacked on
    assert sum(1 for line in Path("/proc/self/mountinfo").read_text().splitlines()
               if f" {svc2.run_dir}/" in line) == 1
    assert svc2.terminate() == 0
    assert not [d for d in svc2.run_dir.iterdir() if d.is_dir()], list(svc2.run_dir.iterdir())
    assert str(svc2.run_dir) not in Path("/proc/self/mountinfo").read_text()  # no mount left behind


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
    # Metadata is the first thing Acquire asks of the agent: refused, the sandbox is not handed out.
    before = set(svc.vmm_pids())
    with pytest.raises(grpc.RpcError) as err:
        _acquire(svc, metadata={"who": "alice"})
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "its metadata" in err.value.details() and "not supported" in err.value.details()
    leased = [s.id for s in svc.stub.List(svc.pb2.ListRequest()).sandboxes
              if s.state == svc.pb2.SANDBOX_STATE_LEASED]
    assert leased == [sb.id], leased
    deadline = time.monotonic() + 30
    while set(svc.vmm_pids()) != before:  # the refused sandbox's VMM is destroyed (its directory goes)
        assert time.monotonic() < deadline, (svc.vmm_pids(), before)
        time.sleep(0.1)
    assert svc.terminate() == 0


def _fstype(path: Path) -> str | None:
    """The filesystem type of the mount at `path` exactly (None: not a mount point)."""
    found = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(path):
            found = fields[fields.index("-") + 1]  # the last mount there is the one in use
    return found


def _proc_status(pid: int) -> dict[str, str]:
    return {k: v.strip() for k, _, v in (line.partition(":") for line in
                                         Path(f"/proc/{pid}/status").read_text().splitlines())}


@pytest.mark.skipif(os.geteuid() != 0, reason="jails need root")
def test_every_pool_vmm_is_jailed(service, testguest) -> None:
    """Warm VMMs (forked by the zygote) each run with their own uid, no privilege, in their chroot and cgroup."""
    svc = service()
    pb2 = svc.pb2
    _warm_pool(svc, testguest, 3)
    sb = _acquire(svc)
    assert AgentClient(sb.agent.vsock_uds_path, sb.agent.port).ping() == "testguest"  # works through the jail
    svc.wait_pool("tg", 3)  # the refill is done: no VMM is still on its way into its jail
    pids = svc.vmm_pids()
    assert len(pids) >= 4
    uids = set()
    for vm_id, pid in pids.items():
        st = _proc_status(pid)
        uid = int(st["Uid"].split()[0])
        assert uid != 0 and st["Uid"].split() == [str(uid)] * 4, st["Uid"]
        uids.add(uid)
        assert st["NoNewPrivs"] == "1"
        for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(st[cap], 16) == 0, (vm_id, cap)
        assert st["NSpid"].split()[-1] == "1"  # pid 1 of its own PID namespace
        root, chroot = os.stat(f"/proc/{pid}/root/"), os.stat(svc.run_dir / ".jail" / vm_id)
        assert (root.st_dev, root.st_ino) == (chroot.st_dev, chroot.st_ino)
        assert "vm.mem" in os.listdir(f"/proc/{pid}/root/snapshot")
        api = os.stat(svc.run_dir / ".jail" / vm_id / "api.sock")  # bound by the zygote, for the VMM
        assert (api.st_uid, api.st_gid) == (uid, uid)
        for ns in ("mnt", "pid", "ipc", "uts"):
            assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}")
        groups = Path(f"/proc/{pid}/cgroup").read_text()
        assert "/slot-" in groups, groups
        assert _memory_limit(groups) == (64 + 256) << 20  # guest memory + the VMM's own allowance
        limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
        assert any(line.startswith("Max open files") and line.split()[3:5] == ["2048", "2048"] for line in limits)
        assert any(line.startswith("Max file size") and line.split()[3] == str(16384 << 20) for line in limits)
    assert len(uids) == len(pids)  # unique per live VMM
    assert _fstype(svc.run_dir / ".jail") == "tmpfs"  # the chroots' churn stays off the disk
    assert len({os.readlink(f"/proc/{pid}/ns/pid") for pid in pids.values()}) == len(pids)  # a PID namespace each
    # The zygote makes each VMM pid 1 of a new namespace and goes back to its own: its next child
    # is not born into the last VMM's namespace.
    zpid = json.loads((svc.run_dir / ".zygote.pid").read_text())["pid"]
    assert all(int(_proc_status(pid)["PPid"]) == zpid for pid in pids.values())  # one fork, by the zygote
    assert os.readlink(f"/proc/{zpid}/ns/pid_for_children") == os.readlink(f"/proc/{zpid}/ns/pid")
    svc.stub.Release(pb2.ReleaseRequest(id=sb.id))
    assert svc.terminate() == 0


def _memory_limit(proc_cgroup: str) -> int:
    """The memory limit of the cgroup a /proc/PID/cgroup text names (v1 memory hierarchy, or v2)."""
    for line in proc_cgroup.splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return int(Path(f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes").read_text())
    for line in proc_cgroup.splitlines():
        if line.startswith("0::") and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            return int(Path(f"/sys/fs/cgroup{line[3:]}/memory.max").read_text())
    raise AssertionError(f"no memory cgroup in {proc_cgroup!r}")

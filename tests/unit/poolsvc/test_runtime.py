"""PoolRuntime with an in-memory launcher: the pool's behaviour through real threads."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest

from poolsvc.api_types import DeadlineExceeded, NotFound, ResourceExhausted
from poolsvc.pool import HostBudget, PoolMachine, VmState
from poolsvc.runtime import Cancelled, PoolRuntime


@dataclass(eq=False)
class FakeVm:
    vm_id: str
    template: str
    alive: bool = True
    resumes: int = 0
    destroys: int = 0


class FakeLauncher:
    """Records every call; restores/resumes can be slowed (gates) or made to fail."""

    def __init__(self, restore_delay: float = 0.005) -> None:
        self.lock = threading.Lock()
        self.restore_delay = restore_delay
        self.fail_restores = False
        self.restore_gate = threading.Event()
        self.restore_gate.set()
        self.resume_gate = threading.Event()
        self.resume_gate.set()
        self.destroy_gate = threading.Event()
        self.destroy_gate.set()
        self.destroying = 0
        self.max_destroying = 0
        self.restore_calls: list[tuple[float, str]] = []
        self.vms: dict[str, FakeVm] = {}

    def restore(self, template_name: str, vm_id: str) -> FakeVm:
        with self.lock:
            self.restore_calls.append((time.monotonic(), vm_id))
        self.restore_gate.wait(5)
        time.sleep(self.restore_delay)
        if self.fail_restores:
            raise RuntimeError("restore failed (fake)")
        vm = FakeVm(vm_id, template_name)
        with self.lock:
            assert vm_id not in self.vms
            self.vms[vm_id] = vm
        return vm

    def resume(self, handle: FakeVm) -> None:
        self.resume_gate.wait(5)
        with self.lock:
            assert handle.destroys == 0
            handle.resumes += 1

    def destroy(self, handle: FakeVm) -> None:
        with self.lock:
            self.destroying += 1
            self.max_destroying = max(self.max_destroying, self.destroying)
        self.destroy_gate.wait(5)
        with self.lock:
            self.destroying -= 1
            handle.destroys += 1
            handle.alive = False

    def alive(self, handle: FakeVm) -> bool:
        return handle.alive

    def destroyed(self) -> list[str]:
        with self.lock:
            return [v.vm_id for v in self.vms.values() if v.destroys]


def wait_for(pred, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


def pool_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("ember-pool")]


@pytest.fixture
def launcher() -> FakeLauncher:
    return FakeLauncher()


@pytest.fixture
def make_runtime(launcher):
    made = []

    def make(budget=HostBudget(mem_mib=1 << 20, max_vms=200), **kw) -> PoolRuntime:
        mkw = {k: kw.pop(k) for k in ("max_restoring", "backoff_base", "max_attempts") if k in kw}
        rt = PoolRuntime(PoolMachine(budget, **mkw), launcher,
                         **{"tick_interval": 0.02, "health_interval": 0.05, **kw}).start()
        made.append(rt)
        return rt

    yield make
    for rt in made:
        rt.shutdown()
    assert pool_threads() == []


def test_refills_to_min_warm(make_runtime, launcher):
    rt = make_runtime(max_restoring=2)
    rt.set_pool("py", 3, 5)
    wait_for(lambda: rt.status("py").warm == 3)
    time.sleep(0.1)
    s = rt.status("py")
    assert (s.warm, s.restoring, s.launches_total) == (3, 0, 3)
    assert len(launcher.restore_calls) == 3


def test_acquire_from_warm_resumes_the_oldest(make_runtime, launcher):
    rt = make_runtime()
    rt.set_pool("py", 2, 2)
    wait_for(lambda: rt.status("py").warm == 2)
    oldest = min((r for r in rt.list("py")), key=lambda r: r.state_since).vm_id
    vm_id, handle = rt.acquire("py", lease_ttl=30, timeout=5)
    assert vm_id == oldest and handle is launcher.vms[vm_id] and handle.resumes == 1
    rec = rt.get(vm_id)
    assert rec.state is VmState.LEASED and rec.lease_deadline is not None
    assert abs(rt.to_wall(rec.lease_deadline) - (time.time() + 30)) < 2
    wait_for(lambda: rt.status("py").warm == 2)  # refilled behind it


def test_acquire_on_empty_pool_restores_on_demand(make_runtime, launcher):
    rt = make_runtime()
    rt.set_pool("py", 0, 2)
    vm_id, handle = rt.acquire("py", timeout=5)
    assert handle.resumes == 1 and rt.get(vm_id).on_demand
    assert [v for _, v in launcher.restore_calls] == [vm_id]


def test_unknown_template_and_full_host(make_runtime, launcher):
    rt = make_runtime(budget=HostBudget(mem_mib=1000, max_vms=1))
    with pytest.raises(NotFound):
        rt.acquire("nope", timeout=1)
    rt.set_pool("py", 0, 1)
    rt.acquire("py", timeout=5)
    with pytest.raises(ResourceExhausted):
        rt.acquire("py", timeout=5)


def test_idempotent_acquire_returns_the_same_sandbox(make_runtime, launcher):
    rt = make_runtime()
    rt.set_pool("py", 0, 2)
    launcher.restore_gate.clear()  # both calls are pending together
    results = []
    threads = [threading.Thread(target=lambda: results.append(rt.acquire("py", 60, "key-1", timeout=5)))
               for _ in range(2)]
    for t in threads:
        t.start()
    wait_for(lambda: rt.list("py") and rt.get(rt.list("py")[0].vm_id).state is VmState.RESTORING)
    time.sleep(0.05)
    launcher.restore_gate.set()
    for t in threads:
        t.join()
    assert results[0][0] == results[1][0]
    assert rt.acquire("py", 60, "key-1", timeout=5)[0] == results[0][0]  # a later retry
    assert len(launcher.restore_calls) == 1 and results[0][1].resumes == 1


def test_lease_expiry_destroys(make_runtime, launcher):
    rt = make_runtime()
    rt.set_pool("py", 0, 1)
    vm_id, handle = rt.acquire("py", lease_ttl=0.1, timeout=5)
    wait_for(lambda: handle.destroys == 1)
    wait_for(lambda: not any(r.vm_id == vm_id for r in rt.list()))
    with pytest.raises(NotFound):
        rt.release(vm_id)


def test_restore_failures_are_counted_and_retried_with_backoff(make_runtime, launcher):
    launcher.fail_restores = True
    rt = make_runtime(backoff_base=0.1)
    rt.set_pool("py", 1, 1)
    time.sleep(0.65)
    # Attempts at ~0, 0.1, 0.3 (+delays) and maybe 0.7: no tight loop.
    assert 2 <= len(launcher.restore_calls) <= 4
    assert rt.status("py").failures_total == len(launcher.restore_calls) - rt.status("py").restoring
    gaps = [b - a for (a, _), (b, _) in zip(launcher.restore_calls, launcher.restore_calls[1:])]
    assert gaps == sorted(gaps) and gaps[0] >= 0.08
    launcher.fail_restores = False
    wait_for(lambda: rt.status("py").warm == 1)


def test_a_dead_vm_is_replaced(make_runtime, launcher):
    rt = make_runtime()
    rt.set_pool("py", 2, 2)
    wait_for(lambda: rt.status("py").warm == 2)
    victim = rt.list("py")[0].vm_id
    launcher.vms[victim].alive = False
    wait_for(lambda: launcher.vms[victim].destroys == 1)
    wait_for(lambda: rt.status("py").warm == 2 and victim not in {r.vm_id for r in rt.list()})
    assert rt.status("py").failures_total == 1
    assert launcher.vms[victim].resumes == 0


def test_release_destroys_exactly_once(make_runtime, launcher):
    rt = make_runtime()
    rt.set_pool("py", 1, 1)
    vm_id, handle = rt.acquire("py", timeout=5)
    rt.release(vm_id)
    try:
        rt.release(vm_id)  # already going: a no-op, or gone: NotFound
    except NotFound:
        pass
    wait_for(lambda: vm_id not in {r.vm_id for r in rt.list()})
    with pytest.raises(NotFound):
        rt.release(vm_id)
    time.sleep(0.1)
    assert handle.destroys == 1
    # never handed out again
    for _ in range(5):
        other, _ = rt.acquire("py", timeout=5)
        assert other != vm_id
        rt.release(other)


def test_slow_destroys_run_four_at_a_time(make_runtime, launcher):
    # A real destroy waits ~45 ms for the killed VMM to exit on a busy host, and the VM counts
    # against the host budget until it has: the lane must keep up with a high release rate.
    rt = make_runtime()
    rt.set_pool("py", 6, 6)
    wait_for(lambda: rt.status("py").warm == 6)
    launcher.destroy_gate.clear()
    held = [rt.acquire("py", timeout=5)[0] for _ in range(6)]
    for vm_id in held:
        rt.release(vm_id)
    wait_for(lambda: launcher.destroying == 4)
    time.sleep(0.05)
    assert launcher.max_destroying == 4
    launcher.destroy_gate.set()
    wait_for(lambda: set(held) <= set(launcher.destroyed()))


def test_deadline_while_restoring_leaves_the_vm_to_the_pool(make_runtime, launcher):
    rt = make_runtime()
    rt.set_pool("py", 0, 1)
    launcher.restore_gate.clear()
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        rt.acquire("py", timeout=0.1)
    assert time.monotonic() - t0 < 1.0
    launcher.restore_gate.set()
    wait_for(lambda: rt.status("py").warm == 1)
    assert all(v.resumes == 0 for v in launcher.vms.values())


def test_deadline_while_resuming_destroys_the_late_vm(make_runtime, launcher):
    rt = make_runtime()
    rt.set_pool("py", 1, 1)
    wait_for(lambda: rt.status("py").warm == 1)
    [warm] = rt.list("py")
    launcher.resume_gate.clear()
    with pytest.raises(DeadlineExceeded):
        rt.acquire("py", deadline=time.monotonic() + 0.1)
    launcher.resume_gate.set()
    wait_for(lambda: launcher.vms[warm.vm_id].destroys == 1)


def test_cancelled_acquire(make_runtime, launcher):
    rt = make_runtime()
    rt.set_pool("py", 0, 1)
    launcher.restore_gate.clear()
    ev = threading.Event()
    threading.Timer(0.05, ev.set).start()
    with pytest.raises(Cancelled):
        rt.acquire("py", cancelled=ev)
    launcher.restore_gate.set()


def test_shutdown_destroys_everything_and_joins_threads(launcher):
    rt = PoolRuntime(PoolMachine(HostBudget(mem_mib=4096, max_vms=50)), launcher,
                     tick_interval=0.02).start()
    rt.set_pool("py", 3, 3)
    wait_for(lambda: rt.status("py").warm == 3)
    rt.acquire("py", timeout=5)
    rt.acquire("py", timeout=5)
    assert pool_threads()
    rt.shutdown()
    assert pool_threads() == []
    assert launcher.vms and all(v.destroys == 1 for v in launcher.vms.values())
    assert rt.list() == []
    with pytest.raises(Exception):
        rt.acquire("py", timeout=1)
    rt.shutdown()  # idempotent


def test_shutdown_fails_waiting_acquires(launcher):
    rt = PoolRuntime(PoolMachine(HostBudget(mem_mib=4096, max_vms=50)), launcher).start()
    rt.set_pool("py", 0, 1)
    launcher.restore_gate.clear()
    errors = []

    def call():
        try:
            rt.acquire("py", timeout=10)
        except Exception as exc:
            errors.append(exc)

    t = threading.Thread(target=call)
    t.start()
    wait_for(lambda: rt.status("py").restoring == 1)
    threading.Timer(0.1, launcher.restore_gate.set).start()
    rt.shutdown()
    t.join(5)
    assert not t.is_alive() and len(errors) == 1
    assert pool_threads() == []


def test_concurrent_acquires_never_share_a_vm(make_runtime, launcher):
    rt = make_runtime(max_restoring=4)
    rt.set_pool("py", 4, 8)
    got: list[str] = []
    lock = threading.Lock()
    errors = []

    def client():
        try:
            for _ in range(6):
                vm_id, handle = rt.acquire("py", lease_ttl=30, timeout=10)
                with lock:
                    got.append(vm_id)
                assert handle.resumes == 1 and handle.destroys == 0
                if len(got) % 2:
                    rt.release(vm_id)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(got) == 72 and len(set(got)) == 72
    assert all(v.resumes <= 1 and v.destroys <= 1 for v in launcher.vms.values())


def test_metrics_count_restores_hand_outs_releases_and_deaths_with_their_cause(make_runtime, launcher):
    from poolsvc.metrics import sample_values

    launcher.exit_cause = lambda handle: "killed by SIGSYS (seccomp violation)"
    rt = make_runtime()
    rt.set_pool("py", 2, 2)
    wait_for(lambda: rt.status("py").warm == 2)
    vm_id, _ = rt.acquire("py", timeout=5)
    rt.release(vm_id)
    victim = next(r.vm_id for r in rt.list("py") if r.vm_id != vm_id and r.state is VmState.WARM)
    launcher.vms[victim].alive = False
    wait_for(lambda: launcher.vms[victim].destroys == 1)

    def value(name: str, **labels: str) -> float:
        return sum(v for ls, v in sample_values(rt.metrics, name) if labels.items() <= ls.items())

    wait_for(lambda: value("ember_vmm_deaths_total") == 1)
    assert value("ember_vmm_deaths_total", cause="killed by SIGSYS (seccomp violation)") == 1
    assert value("ember_restores_total", template="py", outcome="ok") >= 3
    assert value("ember_pool_handout_seconds_count", template="py", source="warm") == 1
    assert value("ember_releases_total", template="py") == 1


def test_launch_rate_follows_the_restores(make_runtime, launcher):
    rt = make_runtime()
    assert rt.statuses() == []
    rt.set_pool("py", 4, 4)
    wait_for(lambda: rt.status("py").warm == 4)
    time.sleep(0.1)  # the ticker samples the counter
    st = rt.status("py")
    assert st.launches_total == 4 and st.launch_rate > 0
    assert st.mem_mib == 4 * rt.list("py")[0].mem_mib > 0

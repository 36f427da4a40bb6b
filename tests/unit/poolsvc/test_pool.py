"""The pool state machine: examples of each input, then hypothesis-driven invariants.

The machine is pure, so the tests play the runtime's part by hand: they carry
out (or fail) the actions it returns and feed the completions back.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from poolsvc.api_types import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    SandboxState,
    Unavailable,
)
from poolsvc.pool import (
    Destroy,
    Fail,
    HostBudget,
    PoolMachine,
    Reply,
    Resume,
    StartRestore,
    VmState,
)

BIG = HostBudget(mem_mib=1 << 20, max_vms=1000)


def kinds(actions, kind):
    return [a for a in actions if isinstance(a, kind)]


def warm_pool(m: PoolMachine, template="py", n=2, max_warm=None, now=0.0):
    """A pool with `n` warm sandboxes; returns their ids oldest first."""
    acts = m.set_pool(template, n, max_warm if max_warm is not None else n, now)
    ids = [a.vm_id for a in kinds(acts, StartRestore)]
    assert len(ids) == n
    for vm_id in ids:
        assert m.restored(vm_id, True, now) == []
    return ids


# -- examples -----------------------------------------------------------------


def test_set_pool_refills_to_min_warm_bounded_by_max_restoring():
    m = PoolMachine(BIG, max_restoring=2)
    acts = m.set_pool("py", 3, 5, 0.0)
    assert acts == [StartRestore("py", "sb-000001"), StartRestore("py", "sb-000002")]
    assert m.status("py").restoring == 2
    assert m.tick(0.1) == []  # still 2 restoring: no third
    acts = m.restored("sb-000001", True, 0.2)
    assert acts == [StartRestore("py", "sb-000003")]
    s = m.status("py")
    assert (s.min_warm, s.max_warm, s.warm, s.restoring, s.launches_total) == (3, 5, 1, 2, 1)


def test_set_pool_rejects_bad_bounds():
    m = PoolMachine(BIG)
    with pytest.raises(InvalidArgument):
        m.set_pool("py", 3, 2, 0.0)
    with pytest.raises(InvalidArgument):
        m.set_pool("py", -1, 2, 0.0)


def test_acquire_hands_out_oldest_warm_then_replies_after_resume():
    m = PoolMachine(BIG)
    first, second = warm_pool(m, n=2)
    acts = m.acquire("py", 1.0, 30.0, None, "r1")
    assert acts == [Resume(first, "r1"), StartRestore("py", "sb-000003")]  # and refills
    assert m.sandbox(first).state is VmState.RESUMING
    assert m.sandbox(first).api_state is SandboxState.LEASED
    assert m.resumed(first, True, 1.5) == [Reply("r1", first)]
    rec = m.sandbox(first)
    assert rec.state is VmState.LEASED and rec.request_id == "r1" and rec.lease_deadline == 31.5
    assert m.status("py").leased == 1


def test_acquire_on_empty_pool_restores_on_demand():
    m = PoolMachine(BIG)
    m.set_pool("py", 0, 2, 0.0)
    acts = m.acquire("py", 0.0, None, None, "r1")
    assert acts == [StartRestore("py", "sb-000001", for_request="r1")]
    assert m.waiting("py") == 1
    assert m.restored("sb-000001", True, 0.5) == [Resume("sb-000001", "r1")]
    assert m.resumed("sb-000001", True, 0.6) == [Reply("r1", "sb-000001")]
    assert m.sandbox("sb-000001").lease_deadline is None


def test_waiter_is_served_by_whichever_restore_finishes_first():
    m = PoolMachine(BIG, max_restoring=4)
    m.set_pool("py", 1, 1, 0.0)                    # refill sb-1 in flight
    acts = m.acquire("py", 0.0, None, None, "r1")  # covered by sb-1: no extra restore
    assert acts == []
    acts = m.acquire("py", 0.0, None, None, "r2")  # uncovered: on demand
    assert acts == [StartRestore("py", "sb-000002", for_request="r2")]
    assert m.restored("sb-000002", True, 0.1) == [Resume("sb-000002", "r1")]  # FIFO
    acts = m.restored("sb-000001", True, 0.2)
    assert Resume("sb-000001", "r2") in acts


def test_unknown_template_fails_not_found():
    m = PoolMachine(BIG)
    [fail] = m.acquire("nope", 0.0, None, None, "r1")
    assert isinstance(fail, Fail) and fail.request_id == "r1"
    assert isinstance(fail.error, NotFound)


def test_bad_lease_ttl_fails_invalid_argument():
    m = PoolMachine(BIG)
    warm_pool(m, n=1)
    [fail] = m.acquire("py", 0.0, 0.0, None, "r1")
    assert isinstance(fail.error, InvalidArgument)
    assert m.status("py").warm == 1


def test_duplicate_pending_request_id_is_a_caller_bug():
    m = PoolMachine(BIG)
    m.set_pool("py", 0, 1, 0.0)
    m.acquire("py", 0.0, None, None, "r1")
    with pytest.raises(InvalidArgument):
        m.acquire("py", 0.0, None, None, "r1")


def test_idempotency_key_returns_same_sandbox_pending_and_leased():
    m = PoolMachine(BIG)
    m.set_pool("py", 0, 2, 0.0)
    [start] = m.acquire("py", 0.0, 10.0, "k", "r1")
    assert m.acquire("py", 0.1, 10.0, "k", "r2") == []  # joins the pending acquire
    [resume] = m.restored(start.vm_id, True, 0.2)
    assert m.resumed(resume.vm_id, True, 0.3) == [Reply("r1", start.vm_id), Reply("r2", start.vm_id)]
    assert m.acquire("py", 1.0, 10.0, "k", "r3") == [Reply("r3", start.vm_id)]
    [fail] = m.acquire("other", 1.0, 10.0, "k", "r4")
    assert isinstance(fail.error, NotFound)
    m.set_pool("other", 0, 1, 1.0)
    [fail] = m.acquire("other", 1.0, 10.0, "k", "r5")
    assert isinstance(fail.error, InvalidArgument)
    # Once the lease ends the key starts a fresh sandbox.
    assert m.release(start.vm_id, 2.0) == [Destroy(start.vm_id)]
    [start2] = m.acquire("py", 2.0, 10.0, "k", "r6")
    assert isinstance(start2, StartRestore) and start2.vm_id != start.vm_id


def test_idempotency_key_of_an_expired_lease_is_not_reused():
    m = PoolMachine(BIG)
    (vm,) = warm_pool(m, n=1, max_warm=1)
    m.acquire("py", 0.0, 5.0, "k", "r1")
    m.resumed(vm, True, 0.0)
    acts = m.acquire("py", 6.0, 5.0, "k", "r2")  # tick has not run yet
    assert Destroy(vm) in acts
    assert not kinds(acts, Reply)


def test_release_destroys_once_and_never_hands_out_again():
    m = PoolMachine(BIG)
    (vm,) = warm_pool(m, n=1, max_warm=1)
    acts = m.acquire("py", 0.0, None, None, "r1")
    assert kinds(acts, StartRestore)  # the refill starts as soon as the warm one goes
    m.resumed(vm, True, 0.0)
    assert m.release(vm, 1.0) == [Destroy(vm)]
    assert m.release(vm, 1.1) == []  # already going
    assert m.sandbox(vm).api_state is SandboxState.RELEASING
    m.destroyed(vm, 2.0)
    with pytest.raises(NotFound):
        m.release(vm, 3.0)
    with pytest.raises(NotFound):
        m.sandbox(vm)


def test_lease_expiry_destroys():
    m = PoolMachine(BIG)
    (vm,) = warm_pool(m, n=1, max_warm=1)
    m.acquire("py", 0.0, 5.0, None, "r1")
    m.resumed(vm, True, 1.0)
    assert Destroy(vm) not in m.tick(5.9)
    assert Destroy(vm) in m.tick(6.0)


def test_failed_restores_back_off_and_fail_waiters_after_max_attempts():
    m = PoolMachine(BIG, max_attempts=2, backoff_base=1.0, backoff_max=4.0)
    [s1] = m.set_pool("py", 1, 1, 0.0)
    assert m.restored(s1.vm_id, False, 0.0) == []  # backing off until 1.0
    assert m.tick(0.9) == []
    [s2] = m.tick(1.0)
    assert m.restored(s2.vm_id, False, 1.0) == []  # next retry at 3.0
    assert m.tick(2.9) == []
    assert m.status("py").failures_total == 2
    # An acquire does not wait for the backoff, but gives up after max_attempts.
    [o1] = m.acquire("py", 2.9, None, None, "r1")
    [o2] = m.restored(o1.vm_id, False, 2.9)
    assert o2.for_request == "r1"
    [fail] = m.restored(o2.vm_id, False, 3.0)
    assert fail.request_id == "r1" and isinstance(fail.error, Unavailable)
    assert m.usage().vms == 0
    # A success resets the backoff.
    [s3] = m.tick(100.0)
    m.restored(s3.vm_id, True, 100.0)
    assert m.status("py").warm == 1


def test_failed_resume_destroys_and_tries_another():
    m = PoolMachine(BIG)
    a, b = warm_pool(m, n=2, max_warm=2)
    m.acquire("py", 0.0, None, None, "r1")
    acts = m.resumed(a, False, 0.1)
    assert acts[:2] == [Destroy(a), Resume(b, "r1")]
    assert m.status("py").failures_total == 1


def test_host_budget_exhausted_fails_acquire_and_stops_refills():
    m = PoolMachine(HostBudget(mem_mib=300, max_vms=10), max_restoring=8)
    acts = m.set_pool("py", 5, 5, 0.0, mem_mib=100)
    assert len(kinds(acts, StartRestore)) == 3  # 3 x 100 MiB fit
    for a in acts:
        m.restored(a.vm_id, True, 0.0)
    for i in range(3):
        m.acquire("py", 0.0, None, None, f"r{i}")
    [fail] = m.acquire("py", 0.0, None, None, "r9")
    assert isinstance(fail.error, ResourceExhausted)
    assert m.tick(1.0) == []
    assert m.usage().mem_mib == 300


def test_oversubscription_and_vm_count_limits():
    m = PoolMachine(HostBudget(mem_mib=100, max_vms=3, vcpus=2, oversubscription=2.0))
    acts = m.set_pool("py", 5, 5, 0.0, mem_mib=50, vcpus=1)
    assert len(kinds(acts, StartRestore)) == 3  # max_vms, though 200 MiB / 4 vCPUs would allow 4


def test_vm_died_is_replaced():
    m = PoolMachine(BIG)
    a, b = warm_pool(m, n=2)
    acts = m.vm_died(a, 1.0)
    assert acts[0] == Destroy(a)
    m.destroyed(a, 1.1)
    assert kinds(acts, StartRestore) or kinds(m.tick(1.2), StartRestore)
    assert m.vm_died("sb-999999", 1.0) == []
    assert m.status("py").failures_total == 1


def test_cancel_of_a_resuming_request_destroys_the_late_sandbox():
    m = PoolMachine(BIG)
    (vm,) = warm_pool(m, n=1)
    m.acquire("py", 0.0, None, None, "r1")
    m.cancel("r1", 0.5)
    assert m.resumed(vm, True, 1.0)[0] == Destroy(vm)
    assert m.cancel("r1", 1.0) == []


def test_cancel_of_a_waiting_request_leaves_its_restore_to_the_pool():
    m = PoolMachine(BIG)
    m.set_pool("py", 0, 1, 0.0)
    [s] = m.acquire("py", 0.0, None, None, "r1")
    m.cancel("r1", 0.1)
    assert m.waiting("py") == 0
    assert m.restored(s.vm_id, True, 0.2) == []
    assert m.status("py").warm == 1


def test_lowering_max_warm_trims():
    m = PoolMachine(BIG)
    ids = warm_pool(m, n=3, max_warm=3)
    acts = m.set_pool("py", 0, 1, 1.0)
    assert acts == [Destroy(ids[2]), Destroy(ids[1])]  # newest first, oldest kept


def test_drain_destroys_warm_fails_waiters_and_stops_refills():
    m = PoolMachine(BIG)
    a, b = warm_pool(m, n=2)
    acts = m.acquire("py", 0.0, None, None, "r1")  # takes a, refills one
    [refill] = kinds(acts, StartRestore)
    m.resumed(a, True, 0.0)
    acts = m.drain(1.0)
    assert acts == [Destroy(b)]
    assert m.restored(refill.vm_id, True, 1.1) == [Destroy(refill.vm_id)]
    [fail] = m.acquire("py", 1.2, None, None, "r2")
    assert isinstance(fail.error, Unavailable)
    assert m.tick(2.0) == []
    assert m.drain(2.0, release_leases=True) == [Destroy(a)]


def test_remove_template():
    m = PoolMachine(BIG)
    a, b = warm_pool(m, n=2)
    [refill] = kinds(m.acquire("py", 0.0, None, None, "r1"), StartRestore)
    m.resumed(a, True, 0.0)
    acts = m.remove_template("py", 1.0)
    assert acts == [Destroy(b)]
    assert m.sandbox(refill.vm_id).doomed
    acts += m.restored(refill.vm_id, True, 1.0)
    assert acts[-1] == Destroy(refill.vm_id)
    with pytest.raises(NotFound):
        m.status("py")
    [fail] = m.acquire("py", 1.0, None, None, "r2")
    assert isinstance(fail.error, NotFound)
    assert m.sandbox(a).state is VmState.LEASED  # the lease lives on
    m.release(a, 2.0)
    m.destroyed(a, 2.0)
    for vm_id in [x.vm_id for x in kinds(acts, Destroy)]:
        m.destroyed(vm_id, 2.0)
    assert m.sandboxes() == [] and m.templates() == []


def test_completion_for_wrong_state_is_refused():
    m = PoolMachine(BIG)
    (vm,) = warm_pool(m, n=1)
    with pytest.raises(FailedPrecondition):
        m.restored(vm, True, 0.0)
    with pytest.raises(FailedPrecondition):
        m.destroyed(vm, 0.0)


def test_injected_id_factory_and_repr():
    ids = iter(["x", "y"])
    m = PoolMachine(BIG, id_factory=lambda: next(ids))
    assert [a.vm_id for a in m.set_pool("py", 2, 2, 0.0)] == ["x", "y"]
    assert repr(m) == "<PoolMachine pools=1 warm=0 leased=0 restoring=2 destroying=0>"


# -- invariants under random interleavings -------------------------------------

TEMPLATES = ("a", "b")


class PoolModel(RuleBasedStateMachine):
    """Plays the runtime: holds the outstanding effects and completes them in any order."""

    def __init__(self) -> None:
        super().__init__()
        self.budget = HostBudget(mem_mib=1000, max_vms=8, vcpus=4, oversubscription=1.5)
        self.m = PoolMachine(self.budget, max_restoring=3, max_attempts=2, backoff_base=0.5)
        self.now = 0.0
        self.restoring: dict[str, str] = {}
        self.resuming: set[str] = set()
        self.destroying: set[str] = set()
        self.restored_ok: set[str] = set()
        self.seen_ids: set[str] = set()
        self.dead: set[str] = set()           # Destroy issued: never handed out again
        self.resumed_once: set[str] = set()
        self.holder: dict[str, tuple[str, str | None]] = {}  # vm -> (first request, key)
        self.req_key: dict[str, str | None] = {}
        self.answered: dict[str, object] = {}
        self.cancelled: set[str] = set()
        self.leased: dict[str, str] = {}      # vm -> request (from replies)
        self.n = 0

    # -- the runtime's side ----------------------------------------------------

    def apply(self, actions) -> None:
        for a in actions:
            if isinstance(a, StartRestore):
                assert a.vm_id not in self.seen_ids
                self.seen_ids.add(a.vm_id)
                self.restoring[a.vm_id] = a.template
            elif isinstance(a, Resume):
                assert a.vm_id in self.restored_ok and a.vm_id not in self.dead
                assert a.vm_id not in self.resumed_once, "a sandbox is resumed at most once"
                self.resumed_once.add(a.vm_id)
                self.resuming.add(a.vm_id)
            elif isinstance(a, Destroy):
                assert a.vm_id not in self.dead, "destroyed exactly once"
                assert a.vm_id in self.restored_ok
                self.dead.add(a.vm_id)
                self.destroying.add(a.vm_id)
                self.leased.pop(a.vm_id, None)
            elif isinstance(a, Reply):
                assert a.request_id not in self.answered and a.request_id not in self.cancelled
                assert a.vm_id not in self.dead, "a destroyed sandbox is never handed out"
                self.answered[a.request_id] = a
                key = self.req_key[a.request_id]
                first = self.holder.setdefault(a.vm_id, (a.request_id, key))
                assert first[0] == a.request_id or (key is not None and first[1] == key), \
                    "a sandbox is handed to one request (and its idempotent retries)"
                self.leased[a.vm_id] = first[0]
            elif isinstance(a, Fail):
                assert a.request_id not in self.answered and a.request_id not in self.cancelled
                self.answered[a.request_id] = a
            else:  # pragma: no cover
                raise AssertionError(a)

    def pending_requests(self) -> list[str]:
        return sorted(r for r in self.req_key if r not in self.answered and r not in self.cancelled)

    # -- rules -----------------------------------------------------------------

    @rule(t=st.sampled_from(TEMPLATES), lo=st.integers(0, 3), extra=st.integers(0, 2),
          mem=st.sampled_from([100, 200, 400]), vcpus=st.integers(1, 2))
    def set_pool(self, t, lo, extra, mem, vcpus):
        self.apply(self.m.set_pool(t, lo, lo + extra, self.now, mem_mib=mem, vcpus=vcpus))

    @rule(t=st.sampled_from(TEMPLATES + ("unknown",)),
          key=st.sampled_from([None, None, "k1", "k2"]),
          ttl=st.sampled_from([None, 1.0, 4.0]))
    def acquire(self, t, key, ttl):
        self.n += 1
        rid = f"r{self.n}"
        self.req_key[rid] = key
        self.apply(self.m.acquire(t, self.now, ttl, key, rid))

    @precondition(lambda self: self.restoring)
    @rule(data=st.data(), ok=st.booleans())
    def finish_restore(self, data, ok):
        vm = data.draw(st.sampled_from(sorted(self.restoring)))
        del self.restoring[vm]
        if ok:
            self.restored_ok.add(vm)
        self.apply(self.m.restored(vm, ok, self.now))

    @precondition(lambda self: self.resuming)
    @rule(data=st.data(), ok=st.booleans())
    def finish_resume(self, data, ok):
        vm = data.draw(st.sampled_from(sorted(self.resuming)))
        self.resuming.discard(vm)
        self.apply(self.m.resumed(vm, ok, self.now))

    @precondition(lambda self: self.destroying)
    @rule(data=st.data())
    def finish_destroy(self, data):
        vm = data.draw(st.sampled_from(sorted(self.destroying)))
        self.destroying.discard(vm)
        self.apply(self.m.destroyed(vm, self.now))

    @precondition(lambda self: self.seen_ids)
    @rule(data=st.data())
    def release(self, data):
        vm = data.draw(st.sampled_from(sorted(self.seen_ids)))
        try:
            acts = self.m.release(vm, self.now)
        except NotFound:
            assert vm in self.dead and vm not in self.destroying or vm not in self.restored_ok
            return
        self.apply(acts)

    @precondition(lambda self: self.leased)
    @rule(data=st.data())
    def release_leased(self, data):
        vm = data.draw(st.sampled_from(sorted(self.leased)))
        self.apply(self.m.release(vm, self.now))
        assert vm in self.dead

    @precondition(lambda self: self.seen_ids)
    @rule(data=st.data())
    def vm_died(self, data):
        vm = data.draw(st.sampled_from(sorted(self.seen_ids)))
        self.apply(self.m.vm_died(vm, self.now))

    @precondition(lambda self: self.pending_requests())
    @rule(data=st.data())
    def cancel(self, data):
        rid = data.draw(st.sampled_from(self.pending_requests()))
        self.cancelled.add(rid)
        self.apply(self.m.cancel(rid, self.now))

    @rule(dt=st.sampled_from([0.0, 0.3, 1.0, 3.0]))
    def tick(self, dt):
        self.now += dt
        self.apply(self.m.tick(self.now))

    @rule(t=st.sampled_from(TEMPLATES))
    def remove_template(self, t):
        try:
            self.apply(self.m.remove_template(t, self.now))
        except NotFound:
            assert t not in self.m.templates()

    @precondition(lambda self: self.n > 5)
    @rule(leases=st.booleans())
    def drain(self, leases):
        self.apply(self.m.drain(self.now, release_leases=leases))

    # -- invariants --------------------------------------------------------------

    @invariant()
    def each_vm_in_exactly_one_state(self):
        members = list(self.m._iter_members())
        ids = [vm for _, _, vm in members]
        assert len(ids) == len(set(ids))
        assert set(ids) == {r.vm_id for r in self.m.sandboxes()}
        for t, state, vm in members:
            rec = self.m.sandbox(vm)
            assert rec.state is state and rec.template == t

    @invariant()
    def machine_agrees_with_outstanding_effects(self):
        by_state = {s: set() for s in VmState}
        for r in self.m.sandboxes():
            by_state[r.state].add(r.vm_id)
        assert by_state[VmState.RESTORING] == set(self.restoring)
        assert by_state[VmState.RESUMING] == self.resuming
        assert by_state[VmState.DESTROYING] == self.destroying
        assert by_state[VmState.LEASED] == set(self.leased)
        assert not (by_state[VmState.WARM] | by_state[VmState.LEASED]) & self.dead

    @invariant()
    def leased_vm_belongs_to_one_request(self):
        for r in self.m.sandboxes():
            if r.state is VmState.LEASED:
                assert r.request_id == self.leased[r.vm_id]

    @invariant()
    def warm_plus_refills_within_max_warm(self):
        for t in self.m.templates():
            s = self.m.status(t)
            recs = self.m.sandboxes(t)
            refills = sum(1 for r in recs if r.state is VmState.RESTORING
                          and not r.on_demand and not r.doomed)
            assert s.warm + refills <= s.max_warm
            assert min(s.warm, s.leased, s.restoring, s.launches_total, s.failures_total) >= 0

    @invariant()
    def refills_within_max_restoring(self):
        refills = sum(1 for r in self.m.sandboxes()
                      if r.state is VmState.RESTORING and not r.on_demand)
        assert refills <= self.m.max_restoring

    @invariant()
    def budget_never_exceeded(self):
        u = self.m.usage()
        recs = self.m.sandboxes()
        assert u.vms == len(recs) <= self.budget.max_vms
        assert u.mem_mib == sum(r.mem_mib for r in recs) <= self.budget.mem_limit_mib
        assert u.vcpus == sum(r.vcpus for r in recs) <= self.budget.vcpu_limit
        assert min(u.vms, u.mem_mib, u.vcpus) >= 0

    @invariant()
    def pending_requests_are_known_to_the_machine(self):
        assert set(self.pending_requests()) == set(self.m._requests)

    def teardown(self) -> None:
        # Liveness: with every effect succeeding, every acquire gets its answer.
        for _ in range(200):
            if not (self.restoring or self.resuming or self.destroying):
                break
            for vm in sorted(self.restoring):
                del self.restoring[vm]
                self.restored_ok.add(vm)
                self.apply(self.m.restored(vm, True, self.now))
            for vm in sorted(self.resuming):
                self.resuming.discard(vm)
                self.apply(self.m.resumed(vm, True, self.now))
            for vm in sorted(self.destroying):
                self.destroying.discard(vm)
                self.apply(self.m.destroyed(vm, self.now))
        assert not (self.restoring or self.resuming or self.destroying)
        assert self.pending_requests() == []


TestPoolModel = PoolModel.TestCase
TestPoolModel.settings = settings(max_examples=300, stateful_step_count=60, deadline=None,
                                  suppress_health_check=[HealthCheck.too_slow])

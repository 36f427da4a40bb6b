"""The pool machine's tenants: ownership, per-tenant idempotency keys and quotas.

Examples first, then the hypothesis model of test_pool.py played by two
tenants with quotas, and the tenant invariants checked after every step.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, rule

from poolsvc.api_types import NotFound, PermissionDenied, Quota, QuotaExceeded, ResourceExhausted
from poolsvc.auth import pool_key, split_pool_key
from poolsvc.pool import Fail, HostBudget, PoolMachine, Reply, Resume, StartRestore, VmState
from tests.unit.poolsvc.test_pool import PoolModel

BIG = HostBudget(mem_mib=1 << 20, max_vms=1000)


def lease(m: PoolMachine, key: str, tenant: str, rid: str, idem: str | None = None, now: float = 0.0):
    """Acquire and carry out restores and resumes until the request is answered."""
    actions = m.acquire(key, now, 60.0, idem, rid, tenant=tenant)
    for _ in range(10):
        answer = [a for a in actions if isinstance(a, (Reply, Fail)) and a.request_id == rid]
        if answer:
            return answer[0]
        nxt = []
        for a in actions:
            if isinstance(a, StartRestore):
                nxt += m.restored(a.vm_id, True, now)
            elif isinstance(a, Resume):
                nxt += m.resumed(a.vm_id, True, now)
        actions = nxt
    raise AssertionError(f"{rid} was never answered")


def two_tenants(**quotas: Quota) -> PoolMachine:
    m = PoolMachine(BIG)
    for tenant in ("alice", "bob"):
        m.set_pool(pool_key(tenant, "py"), 0, 0, 0.0, mem_mib=100, tenant=tenant)
        if tenant in quotas:
            m.set_quota(tenant, quotas[tenant], 0.0)
    return m


def test_sandboxes_belong_to_their_pools_tenant() -> None:
    m = two_tenants()
    a = lease(m, "alice/py", "alice", "r1")
    b = lease(m, "bob/py", "bob", "r2")
    assert isinstance(a, Reply) and isinstance(b, Reply)
    assert m.sandbox(a.vm_id).tenant == "alice" and m.sandbox(b.vm_id).tenant == "bob"
    assert [r.vm_id for r in m.sandboxes(tenant="alice")] == [a.vm_id]
    assert m.status("bob/py").tenant == "bob"


def test_a_tenant_cannot_acquire_from_another_tenants_pool() -> None:
    m = two_tenants()
    fail = lease(m, "alice/py", "bob", "r1")
    assert isinstance(fail, Fail) and isinstance(fail.error, NotFound)
    assert m.sandboxes() == []


def test_another_tenant_cannot_resize_a_pool() -> None:
    m = two_tenants()
    with pytest.raises(PermissionDenied):
        m.set_pool("alice/py", 2, 2, 0.0, tenant="bob")
    assert m.status("alice/py").min_warm == 0


def test_the_same_idempotency_key_from_two_tenants_names_two_sandboxes() -> None:
    m = PoolMachine(BIG)
    m.set_pool("shared", 0, 0, 0.0)  # one pool key for both, to show the key alone is per tenant
    m._pools["shared"].tenant = "alice"
    m.set_pool("b", 0, 0, 0.0, tenant="bob")
    a1 = lease(m, "shared", "alice", "r1", idem="k")
    b1 = lease(m, "b", "bob", "r2", idem="k")
    a2 = lease(m, "shared", "alice", "r3", idem="k")
    assert isinstance(a1, Reply) and isinstance(b1, Reply) and isinstance(a2, Reply)
    assert a1.vm_id != b1.vm_id
    assert a2.vm_id == a1.vm_id  # a retry within the tenant still gets the same one


def test_pending_idempotency_keys_are_per_tenant_too() -> None:
    m = two_tenants()
    acts_a = m.acquire("alice/py", 0.0, 60.0, "k", "r1", tenant="alice")
    acts_b = m.acquire("bob/py", 0.0, 60.0, "k", "r2", tenant="bob")
    restores = [a for a in acts_a + acts_b if isinstance(a, StartRestore)]
    assert len(restores) == 2 and {m.sandbox(r.vm_id).tenant for r in restores} == {"alice", "bob"}


def test_max_sandboxes_quota_fails_the_acquire_over_it_naming_the_quota() -> None:
    m = two_tenants(alice=Quota(max_sandboxes=2))
    first = lease(m, "alice/py", "alice", "r1", idem="k")
    assert isinstance(lease(m, "alice/py", "alice", "r2"), Reply)
    over = lease(m, "alice/py", "alice", "r3")
    assert isinstance(over, Fail) and isinstance(over.error, QuotaExceeded)
    assert isinstance(over.error, ResourceExhausted)  # RESOURCE_EXHAUSTED on the wire
    assert "max_sandboxes=2" in str(over.error) and "alice" in str(over.error)
    retry = lease(m, "alice/py", "alice", "r4", idem="k")  # an idempotent retry is not a new lease
    assert isinstance(retry, Reply) and retry.vm_id == first.vm_id
    assert isinstance(lease(m, "bob/py", "bob", "r5"), Reply)  # other tenants are not affected
    m.release(first.vm_id, 0.0)
    assert isinstance(lease(m, "alice/py", "alice", "r6"), Reply)
    assert m.tenant_usage("alice")[0] == 2


def test_waiting_acquires_count_against_max_sandboxes() -> None:
    m = two_tenants(alice=Quota(max_sandboxes=1))
    m.acquire("alice/py", 0.0, 60.0, None, "r1", tenant="alice")  # restore in flight
    over = m.acquire("alice/py", 0.0, 60.0, None, "r2", tenant="alice")
    assert isinstance(over[0], Fail) and isinstance(over[0].error, QuotaExceeded)
    m.cancel("r1", 0.0)
    assert m.tenant_usage("alice")[0] == 0


def test_max_mem_quota_stops_refills_and_fails_on_demand_restores() -> None:
    m = two_tenants(alice=Quota(max_mem_mib=250))
    acts = m.set_pool("alice/py", 5, 5, 0.0, mem_mib=100, tenant="alice")
    assert len([a for a in acts if isinstance(a, StartRestore)]) == 2  # 2 x 100 MiB <= 250
    assert m.tenant_usage("alice")[1] == 200
    m.set_pool("alice/big", 0, 0, 0.0, mem_mib=100, tenant="alice")
    fail = m.acquire("alice/big", 0.0, 60.0, None, "r1", tenant="alice")
    assert isinstance(fail[0], Fail) and isinstance(fail[0].error, QuotaExceeded)
    assert "max_mem_mib=250" in str(fail[0].error)
    assert isinstance(lease(m, "bob/py", "bob", "r2"), Reply)


def test_lowering_a_quota_takes_nothing_away() -> None:
    m = two_tenants()
    a = lease(m, "alice/py", "alice", "r1")
    m.set_quota("alice", Quota(max_sandboxes=0), 0.0)
    assert m.sandbox(a.vm_id).state is VmState.LEASED
    assert isinstance(lease(m, "alice/py", "alice", "r2"), Fail)
    m.set_quota("alice", None, 0.0)
    assert isinstance(lease(m, "alice/py", "alice", "r3"), Reply)


# -- invariants under random interleavings -------------------------------------------------

TENANTS = ("alice", "bob")
POOLS = (("alice", "alice/a"), ("alice", "alice/b"), ("bob", "bob/a"))
QUOTAS = st.builds(Quota, max_sandboxes=st.sampled_from([None, 0, 1, 2]),
                   max_mem_mib=st.sampled_from([None, 100, 300, 600]))


class TenantPoolModel(PoolModel):
    """PoolModel with two tenants, their own pools and fixed quotas."""

    def __init__(self) -> None:
        super().__init__()
        self.req_tenant: dict[str, str] = {}
        self.first_holder: dict[str, str] = {}  # vm -> tenant of the first request it answered
        self.quotas: dict[str, Quota] = {}

    @initialize(qa=QUOTAS, qb=QUOTAS)
    def quotas_once(self, qa, qb):
        for tenant, q in zip(TENANTS, (qa, qb)):
            self.quotas[tenant] = q
            self.apply(self.m.set_quota(tenant, q, self.now))

    def apply(self, actions) -> None:
        for a in actions:
            if isinstance(a, Reply):
                tenant = self.req_tenant[a.request_id]
                assert self.m.sandbox(a.vm_id).tenant == tenant, "a tenant gets only its own sandboxes"
                assert split_pool_key(self.m.sandbox(a.vm_id).template)[0] == tenant
                assert self.first_holder.setdefault(a.vm_id, tenant) == tenant, \
                    "one sandbox never answers two tenants (idempotency keys are per tenant)"
            elif isinstance(a, Fail) and isinstance(a.error, QuotaExceeded):
                q = self.quotas.get(self.req_tenant[a.request_id])
                assert q is not None and ("max_sandboxes" in str(a.error) or "max_mem_mib" in str(a.error))
        super().apply(actions)

    @rule(pool=st.sampled_from(POOLS), lo=st.integers(0, 3), extra=st.integers(0, 2),
          mem=st.sampled_from([100, 200, 400]), vcpus=st.integers(1, 2))
    def set_pool(self, pool, lo, extra, mem, vcpus):
        tenant, key = pool
        self.apply(self.m.set_pool(key, lo, lo + extra, self.now, mem_mib=mem, vcpus=vcpus, tenant=tenant))

    @rule(pool=st.sampled_from(POOLS), tenant=st.sampled_from(TENANTS))
    def set_pool_as_someone(self, pool, tenant):
        owner, key = pool
        if key not in self.m._pools:
            return  # whoever sets a pool up first owns it: only the `set_pool` rule does
        try:
            self.apply(self.m.set_pool(key, 0, 1, self.now, tenant=tenant))
        except PermissionDenied:
            assert owner != tenant
            return
        assert owner == tenant

    @rule(pool=st.sampled_from(POOLS + (("bob", "unknown"),)), tenant=st.sampled_from(TENANTS),
          key=st.sampled_from([None, None, "k1", "k2"]), ttl=st.sampled_from([None, 1.0, 4.0]))
    def acquire(self, pool, tenant, key, ttl):
        self.n += 1
        rid = f"r{self.n}"
        self.req_key[rid] = key
        self.req_tenant[rid] = tenant
        self.apply(self.m.acquire(pool[1], self.now, ttl, key, rid, tenant=tenant))

    @rule(pool=st.sampled_from(POOLS))
    def remove_template(self, pool):
        try:
            self.apply(self.m.remove_template(pool[1], self.now))
        except NotFound:
            assert pool[1] not in self.m.templates()

    @invariant()
    def sandboxes_belong_to_their_pools_tenant(self):
        for r in self.m.sandboxes():
            assert r.tenant == self.m._pools[r.template].tenant

    @invariant()
    def tenant_usage_is_counted_and_within_quota(self):
        for tenant in TENANTS:
            recs = self.m.sandboxes(tenant=tenant)
            leases, mem = self.m.tenant_usage(tenant)
            assert mem == sum(r.mem_mib for r in recs)
            leased = sum(1 for r in recs if r.state in (VmState.LEASED, VmState.RESUMING))
            assert leased <= leases
            q = self.quotas.get(tenant)
            if q is not None and q.max_sandboxes is not None:
                assert leases <= q.max_sandboxes
            if q is not None and q.max_mem_mib is not None:
                assert mem <= q.max_mem_mib

    @invariant()
    def idempotency_keys_are_per_tenant(self):
        for (tenant, _key), vm in self.m._leased_keys.items():
            assert self.m.sandbox(vm).tenant == tenant
        for (tenant, _key), claim in self.m._pending_keys.items():
            assert claim.tenant == tenant


TestTenantPoolModel = TenantPoolModel.TestCase
TestTenantPoolModel.settings = settings(max_examples=200, stateful_step_count=60, deadline=None,
                                        suppress_health_check=[HealthCheck.too_slow])

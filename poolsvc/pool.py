"""The warm pool's brain: a pure state machine (sans-IO, like h11).

Primer. Every template has a pool of microVMs ("sandboxes") restored from its
snapshot and left *paused*. A sandbox moves through

    RESTORING --restored(ok)--> WARM --acquire--> RESUMING --resumed(ok)--> LEASED
        |                         |                  |                        |
        +-------------------------+------------------+---- release / expiry / death
                                                             v
                                                         DESTROYING --destroyed--> (gone)

The machine never does anything itself. Each input is a method call with the
current time passed in (`now`, seconds on whatever monotonic clock the caller
uses); each returns the list of actions the caller must carry out
(`StartRestore`, `Resume`, `Destroy`) or deliver (`Reply`, `Fail`), and the
caller reports how the effects ended through the completion inputs
(`restored`, `resumed`, `destroyed`). There are no threads, clocks or I/O
here; `poolsvc.runtime` is the edge that executes actions.

What is guaranteed (and checked by the hypothesis tests):

* a sandbox is in exactly one state, and is handed to at most one acquire
  (plus retries carrying the same idempotency key);
* a released, expired, dead or destroyed sandbox is never handed out again,
  and every sandbox gets at most one `Destroy`;
* WARM plus RESTORING refills of a pool never exceed its ``max_warm``;
  restores started on demand for a waiting acquire are the only extra ones;
* the host budget (VM count, memory and vCPUs, times the oversubscription
  ratio) counts every sandbox from its `StartRestore` to its `destroyed`,
  and no restore is started that would exceed it;
* every acquire ends in exactly one `Reply` or `Fail` unless it is cancelled.

Tenants. Every pool belongs to one tenant (`set_pool`'s ``tenant``), and so
does every sandbox restored for it. An acquire names its tenant and is
served only from that tenant's pools (another tenant's pool answers
NotFound), so a sandbox of a tenant is only ever a clone of that tenant's
templates. Idempotency keys are per tenant: the same key from two tenants
names two acquires. With a `Quota` set (`set_quota`) a tenant's leases
(LEASED, RESUMING and acquires waiting) never exceed ``max_sandboxes`` —
the acquire over it fails with QuotaExceeded — and the guest memory of all
its sandboxes, counted like the host budget, never exceeds ``max_mem_mib``
(refills stop below it; an on-demand restore over it fails the acquire).

Acquires are served FIFO per template: whichever sandbox of the template
becomes WARM first goes to the oldest waiting acquire, so a refill that
finishes before a dedicated on-demand restore serves the waiter sooner; the
on-demand sandbox then joins the pool (or is trimmed).
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Union

from poolsvc.api_types import (
    DEFAULT_TENANT,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    PoolError,
    PoolStatusInfo,
    Quota,
    QuotaExceeded,
    ResourceExhausted,
    SandboxState,
    Unavailable,
)

__all__ = [
    "Action",
    "Destroy",
    "Fail",
    "HostBudget",
    "HostUsage",
    "PoolMachine",
    "Reply",
    "Resume",
    "SandboxRecord",
    "StartRestore",
    "VmState",
]


# ---------------------------------------------------------------------------
# Actions (outputs)


@dataclass(frozen=True)
class StartRestore:
    """Restore a new microVM of `template` from its snapshot, paused, as `vm_id`.

    `for_request` names the acquire it was started for (on demand), None for
    a refill. Report the end with `PoolMachine.restored`.
    """

    template: str
    vm_id: str
    for_request: str | None = None


@dataclass(frozen=True)
class Resume:
    """Resume the paused `vm_id` for `request_id`; report with `PoolMachine.resumed`."""

    vm_id: str
    request_id: str


@dataclass(frozen=True)
class Destroy:
    """Destroy `vm_id` (kill its VMM, free its resources); report with `PoolMachine.destroyed`."""

    vm_id: str


@dataclass(frozen=True)
class Reply:
    """The acquire `request_id` is answered: its sandbox is `vm_id`, running and leased."""

    request_id: str
    vm_id: str


@dataclass(frozen=True)
class Fail:
    """The acquire `request_id` failed with `error`."""

    request_id: str
    error: PoolError


Action = Union[StartRestore, Resume, Destroy, Reply, Fail]


# ---------------------------------------------------------------------------
# Configuration and views


class VmState(enum.Enum):
    """Where a sandbox is, as the machine sees it (finer than the API's `SandboxState`)."""

    RESTORING = "restoring"
    WARM = "warm"
    RESUMING = "resuming"
    LEASED = "leased"
    DESTROYING = "destroying"

    @property
    def api_state(self) -> SandboxState:
        return _API_STATE[self]


_API_STATE = {
    VmState.RESTORING: SandboxState.RESTORING,
    VmState.WARM: SandboxState.WARM,
    VmState.RESUMING: SandboxState.LEASED,
    VmState.LEASED: SandboxState.LEASED,
    VmState.DESTROYING: SandboxState.RELEASING,
}


@dataclass(frozen=True)
class HostBudget:
    """What the host may hold: every sandbox counts from restore start to destroyed.

    Memory and vCPUs may be oversubscribed up to `oversubscription` times the
    host's amount; `max_vms` is absolute. `vcpus=None`: no CPU limit.
    """

    mem_mib: int
    max_vms: int
    vcpus: int | None = None
    oversubscription: float = 1.0

    def __post_init__(self) -> None:
        if self.mem_mib <= 0 or self.max_vms <= 0 or (self.vcpus is not None and self.vcpus <= 0):
            raise InvalidArgument("host budget: mem_mib, max_vms and vcpus must be positive")
        if self.oversubscription < 1.0:
            raise InvalidArgument("host budget: oversubscription ratio must be >= 1.0")

    @property
    def mem_limit_mib(self) -> float:
        return self.mem_mib * self.oversubscription

    @property
    def vcpu_limit(self) -> float | None:
        return None if self.vcpus is None else self.vcpus * self.oversubscription


@dataclass(frozen=True)
class HostUsage:
    """What the host holds now, against its budget."""

    vms: int
    mem_mib: int
    vcpus: int
    budget: HostBudget


@dataclass(frozen=True)
class SandboxRecord:
    """A read-only view of one sandbox. Times are on the caller's `now` clock."""

    vm_id: str
    template: str
    state: VmState
    created_at: float
    state_since: float
    mem_mib: int
    vcpus: int
    #: Started for a waiting acquire rather than as a refill.
    on_demand: bool
    #: Will be destroyed as soon as its in-flight restore/resume ends.
    doomed: bool
    #: The acquire it was handed to (RESUMING, LEASED, or DESTROYING after a lease).
    request_id: str | None
    idempotency_key: str | None
    lease_deadline: float | None
    #: The tenant that owns it (its pool's).
    tenant: str = DEFAULT_TENANT

    @property
    def api_state(self) -> SandboxState:
        return self.state.api_state


# ---------------------------------------------------------------------------
# Internal records


@dataclass(eq=False)
class _Claim:
    """One pending acquire (plus retries that carry the same idempotency key)."""

    template: str
    lease_ttl: float | None
    key: str | None
    reply_to: list[str]
    tenant: str = DEFAULT_TENANT
    attempts: int = 0
    #: The sandbox being resumed for it, if any.
    vm_id: str | None = None


@dataclass(eq=False)
class _Sandbox:
    vm_id: str
    template: str
    mem_mib: int
    vcpus: int
    state: VmState
    created_at: float
    state_since: float
    on_demand: bool
    tenant: str = DEFAULT_TENANT
    for_claim: _Claim | None = None
    doomed: bool = False
    claim: _Claim | None = None
    request_id: str | None = None
    idempotency_key: str | None = None
    lease_deadline: float | None = None

    def record(self) -> SandboxRecord:
        return SandboxRecord(
            vm_id=self.vm_id, template=self.template, state=self.state,
            created_at=self.created_at, state_since=self.state_since,
            mem_mib=self.mem_mib, vcpus=self.vcpus, on_demand=self.on_demand,
            doomed=self.doomed, request_id=self.request_id,
            idempotency_key=self.idempotency_key, lease_deadline=self.lease_deadline,
            tenant=self.tenant,
        )


@dataclass(eq=False)
class _Pool:
    name: str
    min_warm: int
    max_warm: int
    mem_mib: int
    vcpus: int
    tenant: str = DEFAULT_TENANT
    removed: bool = False
    #: vm ids per state; dicts as insertion-ordered sets (WARM: oldest first).
    members: dict[VmState, dict[str, None]] = field(
        default_factory=lambda: {s: {} for s in VmState})
    waiters: deque[_Claim] = field(default_factory=deque)
    launches_total: int = 0
    failures_total: int = 0
    consecutive_failures: int = 0
    retry_at: float = float("-inf")

    def count(self, state: VmState) -> int:
        return len(self.members[state])

    def live_restores(self, machine: "PoolMachine", *, refills_only: bool) -> int:
        n = 0
        for vm_id in self.members[VmState.RESTORING]:
            sb = machine._vms[vm_id]
            if not sb.doomed and not (refills_only and sb.on_demand):
                n += 1
        return n

    def empty(self) -> bool:
        return not any(self.members.values())


# ---------------------------------------------------------------------------
# The machine


class PoolMachine:
    """Warm pools of paused microVMs per template, as a pure state machine.

    `budget`: the host's admission limits. `max_restoring`: refills never
    bring the host's RESTORING count above this (on-demand restores for a
    waiting acquire are not held back by it, only by the budget).
    `max_attempts`: how many sandboxes may fail (restore or resume) under one
    acquire before it fails with Unavailable. After a failed restore a pool's
    refills pause for `backoff_base * 2**(n-1)` seconds (n consecutive
    failures), at most `backoff_max`. vm ids are ``f"{id_prefix}{n:06d}"``
    unless `id_factory` is given.
    """

    def __init__(
        self,
        budget: HostBudget,
        *,
        max_restoring: int = 4,
        max_attempts: int = 3,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        id_prefix: str = "sb-",
        id_factory: Callable[[], str] | None = None,
        default_mem_mib: int = 128,
        default_vcpus: int = 1,
    ) -> None:
        if max_restoring < 1 or max_attempts < 1:
            raise InvalidArgument("max_restoring and max_attempts must be >= 1")
        self.budget = budget
        self.max_restoring = max_restoring
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.default_mem_mib = default_mem_mib
        self.default_vcpus = default_vcpus
        counter = itertools.count(1)
        self._new_id = id_factory or (lambda: f"{id_prefix}{next(counter):06d}")
        self._pools: dict[str, _Pool] = {}
        self._vms: dict[str, _Sandbox] = {}
        self._requests: dict[str, _Claim] = {}
        #: Idempotency keys, per tenant: (tenant, key).
        self._pending_keys: dict[tuple[str, str], _Claim] = {}
        self._leased_keys: dict[tuple[str, str], str] = {}
        self._quotas: dict[str, Quota] = {}
        self._tenant_mem: dict[str, int] = {}
        self._draining = False
        self._used_vms = 0
        self._used_mem = 0
        self._used_vcpus = 0

    # -- configuration inputs ------------------------------------------------

    def set_pool(self, template: str, min_warm: int, max_warm: int, now: float, *,
                 mem_mib: int | None = None, vcpus: int | None = None,
                 tenant: str = DEFAULT_TENANT) -> list[Action]:
        """Create or resize `template`'s pool, owned by `tenant`; `mem_mib`/`vcpus` size its future VMs.

        Raises InvalidArgument for bad bounds, PermissionDenied if the pool
        belongs to another tenant. Lowering `max_warm` trims warm sandboxes
        now and dooms surplus refills still restoring.
        """
        if min_warm < 0 or max_warm < min_warm:
            raise InvalidArgument(f"pool {template!r}: need 0 <= min_warm <= max_warm, "
                                  f"got {min_warm}..{max_warm}")
        if (mem_mib is not None and mem_mib <= 0) or (vcpus is not None and vcpus <= 0):
            raise InvalidArgument(f"pool {template!r}: mem_mib and vcpus must be positive")
        pool = self._pools.get(template)
        if pool is not None and pool.tenant != tenant:
            raise PermissionDenied(f"pool {template!r} belongs to another tenant")
        if pool is None:
            pool = self._pools[template] = _Pool(
                template, min_warm, max_warm,
                mem_mib or self.default_mem_mib, vcpus or self.default_vcpus, tenant)
        else:
            pool.min_warm, pool.max_warm, pool.removed = min_warm, max_warm, False
            pool.mem_mib = mem_mib or pool.mem_mib
            pool.vcpus = vcpus or pool.vcpus
        actions: list[Action] = []
        self._trim(pool, now, actions)
        self._dispatch(pool, now, actions)
        self._refill(now, actions)
        return actions

    def set_quota(self, tenant: str, quota: Quota | None, now: float) -> list[Action]:
        """Limit what `tenant` holds (None: no limits of its own). Takes nothing away:
        a lower quota only refuses what would go over it from now on."""
        if quota is None:
            self._quotas.pop(tenant, None)
        else:
            self._quotas[tenant] = quota
        actions: list[Action] = []
        self._refill(now, actions)
        return actions

    def remove_template(self, template: str, now: float) -> list[Action]:
        """Stop serving `template`: fail its waiters, destroy its warm VMs.

        Leased sandboxes live on until released or expired. Raises NotFound.
        """
        pool = self._live_pool(template)
        pool.removed = True
        actions: list[Action] = []
        while pool.waiters:
            self._fail_claim(pool.waiters.popleft(), NotFound(f"template {template!r} was removed"),
                             actions)
        self._doom_idle(pool, now, actions)
        self._forget_if_empty(pool)
        return actions

    def drain(self, now: float, *, release_leases: bool = False) -> list[Action]:
        """Graceful shutdown: no more refills or acquires, warm VMs destroyed.

        Waiting acquires fail with Unavailable; in-flight restores are
        destroyed when they finish. With `release_leases` leased sandboxes
        are destroyed too (and resumes in flight when they finish).
        """
        self._draining = True
        actions: list[Action] = []
        for pool in list(self._pools.values()):
            while pool.waiters:
                self._fail_claim(pool.waiters.popleft(), Unavailable("the pool service is draining"),
                                 actions)
            self._doom_idle(pool, now, actions)
            if release_leases:
                for vm_id in list(pool.members[VmState.LEASED]):
                    self._destroy(self._vms[vm_id], now, actions)
                for vm_id in pool.members[VmState.RESUMING]:
                    self._vms[vm_id].doomed = True
        return actions

    # -- request inputs ------------------------------------------------------

    def acquire(self, template: str, now: float, lease_ttl: float | None,
                idempotency_key: str | None, request_id: str, *,
                tenant: str = DEFAULT_TENANT) -> list[Action]:
        """Ask, as `tenant`, for a running sandbox of `template` for `lease_ttl` seconds (None: no expiry).

        The answer is a `Reply` or `Fail` naming `request_id`, now or after
        later inputs; another tenant's pool fails NotFound, a lease over the
        tenant's ``max_sandboxes`` fails QuotaExceeded. Raises
        InvalidArgument if `request_id` is still pending.
        """
        if request_id in self._requests:
            raise InvalidArgument(f"request id {request_id!r} is already pending")
        actions: list[Action] = []
        if self._draining:
            actions.append(Fail(request_id, Unavailable("the pool service is draining")))
            return actions
        pool = self._pools.get(template)
        if pool is None or pool.removed or pool.tenant != tenant:
            actions.append(Fail(request_id, NotFound(f"no pool for template {template!r}")))
            return actions
        if lease_ttl is not None and not lease_ttl > 0:
            actions.append(Fail(request_id, InvalidArgument(f"lease_ttl must be > 0, got {lease_ttl}")))
            return actions
        if idempotency_key:
            leased = self._leased_keys.get((tenant, idempotency_key))
            if leased is not None:
                sb = self._vms[leased]
                if sb.lease_deadline is not None and sb.lease_deadline <= now:
                    self._destroy(sb, now, actions)  # expired, tick has not reaped it yet
                    leased = None
            pending = self._pending_keys.get((tenant, idempotency_key))
            other = (self._vms[leased].template if leased is not None
                     else pending.template if pending is not None else template)
            if other != template:
                actions.append(Fail(request_id, InvalidArgument(
                    f"idempotency key {idempotency_key!r} was used for template {other!r}")))
                return actions
            if leased is not None:
                actions.append(Reply(request_id, leased))
                return actions
            if pending is not None:
                pending.reply_to.append(request_id)
                self._requests[request_id] = pending
                return actions
        quota = self._quotas.get(tenant)
        if quota is not None and quota.max_sandboxes is not None:
            leases = self._leases(tenant)
            if leases >= quota.max_sandboxes:
                actions.append(Fail(request_id, QuotaExceeded(
                    f"tenant {tenant!r} is at its quota max_sandboxes={quota.max_sandboxes} "
                    f"({leases} leased or being acquired)")))
                return actions
        claim = _Claim(template, lease_ttl, idempotency_key or None, [request_id], tenant)
        self._requests[request_id] = claim
        if claim.key:
            self._pending_keys[(tenant, claim.key)] = claim
        pool.waiters.append(claim)
        self._dispatch(pool, now, actions)
        self._refill(now, actions)
        return actions

    def cancel(self, request_id: str, now: float) -> list[Action]:
        """The caller of `request_id` gave up (deadline, cancellation).

        No `Reply`/`Fail` for it follows. A sandbox already being resumed
        for it is destroyed when the resume ends (unless an idempotent retry
        still waits for it). Unknown or answered ids are ignored.
        """
        claim = self._requests.pop(request_id, None)
        actions: list[Action] = []
        if claim is None:
            return actions
        claim.reply_to.remove(request_id)
        if claim.reply_to:
            return actions
        if claim.key and self._pending_keys.get((claim.tenant, claim.key)) is claim:
            del self._pending_keys[(claim.tenant, claim.key)]
        pool = self._pools[claim.template]
        if claim.vm_id is None:
            pool.waiters.remove(claim)
        self._refill(now, actions)
        return actions

    def release(self, vm_id: str, now: float) -> list[Action]:
        """End a sandbox's life (its lease, or an operator's kill): it will be destroyed.

        Raises NotFound for an unknown id. Releasing a sandbox already being
        destroyed is a no-op.
        """
        sb = self._vms.get(vm_id)
        if sb is None:
            raise NotFound(f"no sandbox {vm_id!r}")
        actions: list[Action] = []
        self._kill(sb, now, actions)
        self._refill(now, actions)
        return actions

    # -- completion inputs ---------------------------------------------------

    def restored(self, vm_id: str, ok: bool, now: float) -> list[Action]:
        """The `StartRestore` for `vm_id` ended; on failure nothing of it is left."""
        sb = self._expect(vm_id, VmState.RESTORING)
        pool = self._pools[sb.template]
        actions: list[Action] = []
        if not ok:
            pool.failures_total += 1
            pool.consecutive_failures += 1
            delay = min(self.backoff_max, self.backoff_base * 2 ** (pool.consecutive_failures - 1))
            pool.retry_at = now + delay
            claim = sb.for_claim
            self._forget(sb)
            if claim is not None and claim in pool.waiters:
                claim.attempts += 1
                if claim.attempts >= self.max_attempts:
                    pool.waiters.remove(claim)
                    self._fail_claim(claim, Unavailable(
                        f"template {pool.name!r}: {claim.attempts} sandboxes failed to start"), actions)
            self._dispatch(pool, now, actions)
            self._forget_if_empty(pool)
            return actions
        pool.launches_total += 1
        pool.consecutive_failures = 0
        pool.retry_at = float("-inf")
        if sb.doomed or self._draining or pool.removed:
            self._destroy(sb, now, actions)
        else:
            self._move(sb, VmState.WARM, now)
            self._dispatch(pool, now, actions)
            self._trim(pool, now, actions)
        self._refill(now, actions)
        return actions

    def resumed(self, vm_id: str, ok: bool, now: float) -> list[Action]:
        """The `Resume` of `vm_id` ended."""
        sb = self._expect(vm_id, VmState.RESUMING)
        claim = sb.claim
        assert claim is not None
        pool = self._pools[sb.template]
        sb.claim = None
        claim.vm_id = None
        actions: list[Action] = []
        live = bool(claim.reply_to)
        if ok and live and not sb.doomed:
            self._lease(sb, claim, now, actions)
            self._refill(now, actions)
            return actions
        self._destroy(sb, now, actions)
        if not ok:
            pool.failures_total += 1
        if live:
            claim.attempts += 1  # a doomed (dead, killed) sandbox counts like a failed one
            if claim.attempts >= self.max_attempts:
                self._fail_claim(claim, Unavailable(
                    f"template {pool.name!r}: {claim.attempts} sandboxes failed to start"), actions)
            elif self._draining or pool.removed:
                self._fail_claim(claim, Unavailable(f"template {pool.name!r} is going away"), actions)
            else:
                pool.waiters.appendleft(claim)
                self._dispatch(pool, now, actions)
        self._refill(now, actions)
        return actions

    def destroyed(self, vm_id: str, now: float) -> list[Action]:
        """The `Destroy` of `vm_id` ended; its resources are free again."""
        sb = self._expect(vm_id, VmState.DESTROYING)
        pool = self._pools[sb.template]
        self._forget(sb)
        self._forget_if_empty(pool)
        actions: list[Action] = []
        self._refill(now, actions)
        return actions

    def vm_died(self, vm_id: str, now: float) -> list[Action]:
        """The VMM process of `vm_id` is gone (health check). Unknown ids are ignored."""
        sb = self._vms.get(vm_id)
        actions: list[Action] = []
        if sb is None or sb.state is VmState.DESTROYING:
            return actions
        self._pools[sb.template].failures_total += 1
        self._kill(sb, now, actions)
        self._refill(now, actions)
        return actions

    def tick(self, now: float) -> list[Action]:
        """Time passed: expire leases, trim pools above max_warm, refill pools below min_warm."""
        actions: list[Action] = []
        for pool in list(self._pools.values()):
            for vm_id in list(pool.members[VmState.LEASED]):
                sb = self._vms[vm_id]
                if sb.lease_deadline is not None and sb.lease_deadline <= now:
                    self._destroy(sb, now, actions)
            self._trim(pool, now, actions)
        self._refill(now, actions)
        return actions

    # -- queries -------------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self._draining

    def templates(self) -> list[str]:
        return [p.name for p in self._pools.values() if not p.removed]

    def status(self, template: str) -> PoolStatusInfo:
        """The pool's bounds, counts and counters; RESUMING counts as leased. Raises NotFound.

        launches_total counts successful restores, failures_total failed
        restores, failed resumes and VMs found dead.
        """
        pool = self._live_pool(template)
        return PoolStatusInfo(
            template=pool.name, min_warm=pool.min_warm, max_warm=pool.max_warm,
            warm=pool.count(VmState.WARM),
            leased=pool.count(VmState.LEASED) + pool.count(VmState.RESUMING),
            restoring=pool.count(VmState.RESTORING),
            launches_total=pool.launches_total, failures_total=pool.failures_total,
            tenant=pool.tenant,
            mem_mib=sum(pool.count(s) for s in VmState) * pool.mem_mib,  # as the budget counts it
        )

    def waiting(self, template: str) -> int:
        """How many acquires of `template` wait for a sandbox."""
        pool = self._pools.get(template)
        return 0 if pool is None else len(pool.waiters)

    def sandbox(self, vm_id: str) -> SandboxRecord:
        """Raises NotFound."""
        sb = self._vms.get(vm_id)
        if sb is None:
            raise NotFound(f"no sandbox {vm_id!r}")
        return sb.record()

    def sandboxes(self, template: str | None = None, *, tenant: str | None = None) -> list[SandboxRecord]:
        """Every sandbox, or one template's, or one tenant's (None: any)."""
        return [sb.record() for sb in self._vms.values()
                if (template is None or sb.template == template)
                and (tenant is None or sb.tenant == tenant)]

    def pool_tenant(self, template: str) -> str:
        """Who owns the pool; raises NotFound."""
        return self._live_pool(template).tenant

    def quota(self, tenant: str) -> Quota | None:
        return self._quotas.get(tenant)

    def tenant_usage(self, tenant: str) -> tuple[int, int]:
        """``(leases, mem_mib)``: what counts against `tenant`'s quota now."""
        return self._leases(tenant), self._tenant_mem.get(tenant, 0)

    def usage(self) -> HostUsage:
        return HostUsage(self._used_vms, self._used_mem, self._used_vcpus, self.budget)

    def __repr__(self) -> str:
        counts = {s: 0 for s in VmState}
        for sb in self._vms.values():
            counts[sb.state] += 1
        return (f"<PoolMachine pools={len(self._pools)} warm={counts[VmState.WARM]} "
                f"leased={counts[VmState.LEASED] + counts[VmState.RESUMING]} "
                f"restoring={counts[VmState.RESTORING]} destroying={counts[VmState.DESTROYING]}"
                f"{' draining' if self._draining else ''}>")

    # -- internals -----------------------------------------------------------

    def _live_pool(self, template: str) -> _Pool:
        pool = self._pools.get(template)
        if pool is None or pool.removed:
            raise NotFound(f"no pool for template {template!r}")
        return pool

    def _expect(self, vm_id: str, state: VmState) -> _Sandbox:
        sb = self._vms.get(vm_id)
        if sb is None or sb.state is not state:
            raise FailedPrecondition(
                f"sandbox {vm_id!r} is {'unknown' if sb is None else sb.state.value}, "
                f"expected {state.value}")
        return sb

    def _move(self, sb: _Sandbox, state: VmState, now: float) -> None:
        members = self._pools[sb.template].members
        del members[sb.state][sb.vm_id]
        members[state][sb.vm_id] = None
        sb.state, sb.state_since = state, now

    def _fits(self, pool: _Pool) -> bool:
        return self._no_room(pool) is None

    def _no_room(self, pool: _Pool) -> PoolError | None:
        """Why another VM of `pool` may not start now (host budget, tenant quota); None: it may."""
        b = self.budget
        limit = b.vcpu_limit
        if not (self._used_vms + 1 <= b.max_vms
                and self._used_mem + pool.mem_mib <= b.mem_limit_mib
                and (limit is None or self._used_vcpus + pool.vcpus <= limit)):
            u = self.usage()
            return ResourceExhausted(
                f"host full: {u.vms}/{b.max_vms} VMs, {u.mem_mib}/{b.mem_limit_mib:g} MiB, "
                f"{u.vcpus} vCPUs (template {pool.name!r} needs {pool.mem_mib} MiB, {pool.vcpus} vCPUs)")
        quota = self._quotas.get(pool.tenant)
        used = self._tenant_mem.get(pool.tenant, 0)
        if quota is not None and quota.max_mem_mib is not None and used + pool.mem_mib > quota.max_mem_mib:
            return QuotaExceeded(
                f"tenant {pool.tenant!r} is at its quota max_mem_mib={quota.max_mem_mib} "
                f"({used} MiB in its microVMs, template {pool.name!r} needs {pool.mem_mib} MiB)")
        return None

    def _leases(self, tenant: str) -> int:
        """The tenant's LEASED and RESUMING sandboxes plus its acquires still waiting for one."""
        waiting = {id(c) for c in self._requests.values() if c.tenant == tenant and c.vm_id is None}
        held = sum(1 for sb in self._vms.values()
                   if sb.tenant == tenant and sb.state in (VmState.LEASED, VmState.RESUMING))
        return len(waiting) + held

    def _start_restore(self, pool: _Pool, now: float, claim: _Claim | None,
                       actions: list[Action]) -> None:
        vm_id = self._new_id()
        if vm_id in self._vms:
            raise FailedPrecondition(f"id factory returned a live id {vm_id!r}")
        sb = _Sandbox(vm_id, pool.name, pool.mem_mib, pool.vcpus, VmState.RESTORING,
                      created_at=now, state_since=now, on_demand=claim is not None,
                      tenant=pool.tenant, for_claim=claim)
        self._vms[vm_id] = sb
        pool.members[VmState.RESTORING][vm_id] = None
        self._used_vms += 1
        self._used_mem += sb.mem_mib
        self._used_vcpus += sb.vcpus
        self._tenant_mem[sb.tenant] = self._tenant_mem.get(sb.tenant, 0) + sb.mem_mib
        actions.append(StartRestore(pool.name, vm_id, claim.reply_to[0] if claim else None))

    def _forget(self, sb: _Sandbox) -> None:
        del self._pools[sb.template].members[sb.state][sb.vm_id]
        del self._vms[sb.vm_id]
        self._used_vms -= 1
        self._used_mem -= sb.mem_mib
        self._used_vcpus -= sb.vcpus
        left = self._tenant_mem[sb.tenant] - sb.mem_mib
        if left:
            self._tenant_mem[sb.tenant] = left
        else:
            del self._tenant_mem[sb.tenant]

    def _forget_if_empty(self, pool: _Pool) -> None:
        if pool.removed and pool.empty() and self._pools.get(pool.name) is pool:
            del self._pools[pool.name]

    def _destroy(self, sb: _Sandbox, now: float, actions: list[Action]) -> None:
        key = (sb.tenant, sb.idempotency_key or "")
        if sb.idempotency_key and self._leased_keys.get(key) == sb.vm_id:
            del self._leased_keys[key]
        sb.lease_deadline = None
        self._move(sb, VmState.DESTROYING, now)
        actions.append(Destroy(sb.vm_id))

    def _kill(self, sb: _Sandbox, now: float, actions: list[Action]) -> None:
        """Destroy `sb` now, or once its restore/resume ends; cover waiters it would have served."""
        if sb.state in (VmState.WARM, VmState.LEASED):
            self._destroy(sb, now, actions)
        elif sb.state in (VmState.RESTORING, VmState.RESUMING) and not sb.doomed:
            sb.doomed = True
            pool = self._pools[sb.template]
            if sb.state is VmState.RESTORING and not (self._draining or pool.removed):
                self._dispatch(pool, now, actions)

    def _doom_idle(self, pool: _Pool, now: float, actions: list[Action]) -> None:
        for vm_id in list(pool.members[VmState.WARM]):
            self._destroy(self._vms[vm_id], now, actions)
        for vm_id in pool.members[VmState.RESTORING]:
            self._vms[vm_id].doomed = True

    def _fail_claim(self, claim: _Claim, error: PoolError, actions: list[Action]) -> None:
        for rid in claim.reply_to:
            del self._requests[rid]
            actions.append(Fail(rid, error))
        claim.reply_to.clear()
        if claim.key and self._pending_keys.get((claim.tenant, claim.key)) is claim:
            del self._pending_keys[(claim.tenant, claim.key)]

    def _lease(self, sb: _Sandbox, claim: _Claim, now: float, actions: list[Action]) -> None:
        self._move(sb, VmState.LEASED, now)
        sb.request_id = claim.reply_to[0]
        sb.lease_deadline = None if claim.lease_ttl is None else now + claim.lease_ttl
        if claim.key:
            sb.idempotency_key = claim.key
            key = (claim.tenant, claim.key)
            if self._pending_keys.get(key) is claim:
                del self._pending_keys[key]
            self._leased_keys[key] = sb.vm_id
        for rid in claim.reply_to:
            del self._requests[rid]
            actions.append(Reply(rid, sb.vm_id))
        claim.reply_to.clear()

    def _dispatch(self, pool: _Pool, now: float, actions: list[Action]) -> None:
        """Hand warm sandboxes to waiters (FIFO), and make sure every other waiter
        has a restore in flight that will serve it, or fail it if the host is full."""
        warm = pool.members[VmState.WARM]
        while pool.waiters and warm:
            claim = pool.waiters.popleft()
            sb = self._vms[next(iter(warm))]
            self._move(sb, VmState.RESUMING, now)
            sb.claim, claim.vm_id = claim, sb.vm_id
            sb.request_id = claim.reply_to[0]
            actions.append(Resume(sb.vm_id, claim.reply_to[0]))
        covered = pool.live_restores(self, refills_only=False)
        uncovered = list(itertools.islice(pool.waiters, covered, None))
        for claim in uncovered:
            refusal = self._no_room(pool)
            if refusal is None:
                self._start_restore(pool, now, claim, actions)
            else:
                pool.waiters.remove(claim)
                self._fail_claim(claim, refusal, actions)

    def _trim(self, pool: _Pool, now: float, actions: list[Action]) -> None:
        """Keep WARM + live refills <= max_warm: doom surplus refills, then destroy newest warm."""
        warm = pool.members[VmState.WARM]
        excess = len(warm) + pool.live_restores(self, refills_only=True) - pool.max_warm
        if excess <= 0:
            return
        for vm_id in reversed(list(pool.members[VmState.RESTORING])):
            sb = self._vms[vm_id]
            if excess > 0 and not sb.doomed and not sb.on_demand:
                sb.doomed = True
                excess -= 1
        for vm_id in reversed(list(warm)):
            if excess <= 0:
                break
            self._destroy(self._vms[vm_id], now, actions)
            excess -= 1

    def _refill(self, now: float, actions: list[Action]) -> None:
        """Start refills, one per pool in turn, while pools are below min_warm,
        the host's RESTORING count is below max_restoring and the budget allows."""
        if self._draining:
            return
        restoring = sum(p.count(VmState.RESTORING) for p in self._pools.values())
        candidates = [p for p in self._pools.values() if not p.removed and now >= p.retry_at]
        while candidates and restoring < self.max_restoring:
            still = []
            for pool in candidates:
                if restoring >= self.max_restoring:
                    break
                have = pool.count(VmState.WARM) + pool.live_restores(self, refills_only=True)
                if have < pool.min_warm and self._fits(pool):
                    self._start_restore(pool, now, None, actions)
                    restoring += 1
                    still.append(pool)
            candidates = still

    # For tests and debugging: every sandbox, by pool.
    def _iter_members(self) -> Iterator[tuple[str, VmState, str]]:
        for pool in self._pools.values():
            for state, ids in pool.members.items():
                for vm_id in ids:
                    yield pool.name, state, vm_id

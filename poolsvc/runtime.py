"""The edge that runs the pool: executes `PoolMachine` actions with a `Launcher`.

Threads have fixed roles. Callers (gRPC handlers) feed requests into the
machine and wait on a condition variable for their answer; worker lanes
(restore, resume, destroy: separate thread pools so a hand-out's resume
never queues behind slow restores) call the launcher *outside* the lock and
feed each result back; one background thread ticks the machine every
`tick_interval` and health-checks warm and leased VMs every
`health_interval`. A destroy mostly waits for the killed VMM to be
scheduled, exit and be reaped (~45 ms on a busy two-core host), and the VM
counts against the host budget until then, so the destroy lane has as many
threads as the restore lane unless told otherwise: with two, releases at
~40/s built a backlog of dying VMMs that held memory and VM slots. The
machine is only ever touched under the one lock, with `now` read from
`clock` (monotonic; the lease deadlines the machine reports are on this
clock, `to_wall` converts them to UNIX time).
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Protocol

import structlog

from poolsvc.api_types import (
    DEFAULT_TENANT,
    DeadlineExceeded,
    NotFound,
    PoolError,
    PoolStatusInfo,
    Quota,
    Unavailable,
)
from poolsvc.metrics import RateMeter, ServiceMetrics
from poolsvc.pool import (
    Action,
    Destroy,
    Fail,
    HostUsage,
    PoolMachine,
    Reply,
    Resume,
    SandboxRecord,
    StartRestore,
    VmState,
)

__all__ = ["Cancelled", "Launcher", "PoolRuntime"]

log = structlog.get_logger("poolsvc.runtime")

#: How often a waiting acquire looks at its `cancelled` event.
_CANCEL_POLL = 0.05


class Cancelled(PoolError):
    """The caller cancelled the request."""


class Launcher(Protocol):
    """What the runtime needs from a VM launcher (`poolsvc.launcher.Launcher` fits)."""

    def restore(self, template_name: str, vm_id: str) -> Any:
        """Restore a paused microVM of the template; returns its handle. Raises on failure,
        leaving nothing behind."""

    def resume(self, handle: Any) -> None:
        """Let the paused microVM run. Raises on failure."""

    def destroy(self, handle: Any) -> None:
        """Kill the microVM and free what it holds; idempotent."""

    def alive(self, handle: Any) -> bool:
        """Is the microVM's VMM process still there?"""

    def exit_cause(self, handle: Any) -> str:
        """Why a dead microVM's VMM ended (e.g. ``killed by SIGSYS (seccomp)``, ``exit 1``)."""


class PoolRuntime:
    """Drives a `PoolMachine` with a `Launcher`; the blocking API of the pool service.

    ``start()`` (or ``with``) starts the threads; ``shutdown()`` stops them.
    """

    def __init__(
        self,
        machine: PoolMachine,
        launcher: Launcher,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_parallel: int = 4,
        resume_parallel: int = 2,
        destroy_parallel: int | None = None,
        tick_interval: float = 0.1,
        health_interval: float = 1.0,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self._machine = machine
        self._launcher = launcher
        self._clock = clock
        self._tick_interval = tick_interval
        self._health_interval = health_interval
        self._cond = threading.Condition(threading.Lock())
        self._lanes = {
            StartRestore: ThreadPoolExecutor(max_parallel, thread_name_prefix="ember-pool-restore"),
            Resume: ThreadPoolExecutor(resume_parallel, thread_name_prefix="ember-pool-resume"),
            Destroy: ThreadPoolExecutor(destroy_parallel or max_parallel, thread_name_prefix="ember-pool-destroy"),
        }
        self._handles: dict[str, Any] = {}
        self._waiting: set[str] = set()
        self._outcomes: dict[str, tuple[str, Any] | PoolError] = {}
        self._request_ids = itertools.count(1)
        self._inflight = 0
        self._dropped = 0
        self._running = False
        self._closed = False
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self.metrics = metrics if metrics is not None else ServiceMetrics()
        self._rates: dict[str, RateMeter] = {}

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> PoolRuntime:
        with self._cond:
            if self._closed:
                raise Unavailable("the pool runtime was shut down")
            if self._running:
                return self
            self._running = True
            self._execute(self._machine.tick(self._clock()))
        self._ticker = threading.Thread(target=self._tick_loop, name="ember-pool-ticker", daemon=True)
        self._ticker.start()
        return self

    def __enter__(self) -> PoolRuntime:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def shutdown(self, drain: bool = True, timeout: float = 10.0) -> None:
        """Stop taking requests, then stop every thread.

        `drain`: destroy every microVM (warm, leased, and those still being
        restored or resumed once they finish) and wait up to `timeout` s for
        it. Without it, microVMs are left as they are for the next service
        start's cleanup. Acquires still waiting fail with Unavailable.
        """
        with self._cond:
            if self._closed:
                return
            self._running = False
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        end = time.monotonic() + timeout
        with self._cond:
            if drain:
                self._execute(self._machine.drain(self._clock(), release_leases=True))
                while self._machine.sandboxes() or self._inflight:
                    left = end - time.monotonic()
                    if left <= 0:
                        log.warning("pool drain timed out", left=repr(self._machine))
                        break
                    self._cond.wait(left)
            self._closed = True
            for rid in self._waiting:
                self._outcomes.setdefault(rid, Unavailable("the pool service is shutting down"))
            self._cond.notify_all()
        for lane in self._lanes.values():
            lane.shutdown(wait=True)
        log.info("pool runtime stopped", machine=repr(self._machine), dropped_actions=self._dropped)

    # -- the blocking API ------------------------------------------------------

    def acquire(self, template: str, lease_ttl: float | None = None,
                idempotency_key: str | None = None, *, deadline: float | None = None,
                timeout: float | None = None,
                cancelled: threading.Event | None = None,
                tenant: str = DEFAULT_TENANT) -> tuple[str, Any]:
        """A running, leased sandbox of `template`: ``(vm_id, launcher handle)``.

        Waits until the pool answers, `deadline` (on this runtime's clock) or
        `timeout` seconds pass (DeadlineExceeded), or `cancelled` is set
        (Cancelled); a sandbox that arrives late is destroyed. Raises the
        pool's errors: NotFound, ResourceExhausted, InvalidArgument, Unavailable.
        """
        if timeout is not None:
            t = self._clock() + timeout
            deadline = t if deadline is None else min(deadline, t)
        rid = f"req-{next(self._request_ids)}"
        started = self._clock()
        with self._cond:
            if not self._running:
                raise Unavailable("the pool service is not running")
            self._waiting.add(rid)
            try:
                self._execute(self._machine.acquire(template, self._clock(), lease_ttl,
                                                    idempotency_key, rid, tenant=tenant))
                while rid not in self._outcomes:
                    wait = None
                    if deadline is not None:
                        wait = deadline - self._clock()
                        if wait <= 0:
                            self._execute(self._machine.cancel(rid, self._clock()))
                            raise DeadlineExceeded(f"no sandbox of {template!r} before the deadline")
                    if cancelled is not None:
                        if cancelled.is_set():
                            self._execute(self._machine.cancel(rid, self._clock()))
                            raise Cancelled(f"acquire of {template!r} cancelled")
                        wait = _CANCEL_POLL if wait is None else min(wait, _CANCEL_POLL)
                    self._cond.wait(wait)
                outcome = self._outcomes.pop(rid)
            finally:
                self._waiting.discard(rid)
                self._outcomes.pop(rid, None)
        if isinstance(outcome, PoolError):
            # One error object may answer several idempotent retries: raise a copy each.
            raise type(outcome)(*outcome.args)
        with self._cond:
            try:
                source = "on_demand" if self._machine.sandbox(outcome[0]).on_demand else "warm"
            except PoolError:
                source = "warm"
        self.metrics.handed_out(template, self._clock() - started, source)
        return outcome

    def release(self, vm_id: str) -> None:
        """Destroy the sandbox (NotFound if unknown); it is never handed out again."""
        with self._cond:
            self._execute(self._machine.release(vm_id, self._clock()))
            template = next((r.template for r in self._machine.sandboxes() if r.vm_id == vm_id), None)
        if template is not None:
            self.metrics.released(template)

    def set_pool(self, template: str, min_warm: int, max_warm: int, *,
                 mem_mib: int | None = None, vcpus: int | None = None,
                 tenant: str = DEFAULT_TENANT) -> PoolStatusInfo:
        with self._cond:
            self._execute(self._machine.set_pool(template, min_warm, max_warm, self._clock(),
                                                 mem_mib=mem_mib, vcpus=vcpus, tenant=tenant))
            return self._machine.status(template)

    def remove_template(self, template: str) -> None:
        with self._cond:
            self._execute(self._machine.remove_template(template, self._clock()))

    def drain(self) -> None:
        """Stop refills and acquires, destroy warm VMs; leases live on (see `shutdown`)."""
        with self._cond:
            self._execute(self._machine.drain(self._clock()))

    def status(self, template: str) -> PoolStatusInfo:
        with self._cond:
            return self._rated(self._machine.status(template))

    def statuses(self) -> list[PoolStatusInfo]:
        with self._cond:
            return [self._rated(self._machine.status(t)) for t in self._machine.templates()]

    def _rated(self, st: PoolStatusInfo) -> PoolStatusInfo:
        """`st` with its launch rate (lock held)."""
        now = self._clock()
        meter = self._rates.setdefault(st.template, RateMeter())
        meter.observe(now, st.launches_total)
        return dataclasses.replace(st, launch_rate=round(meter.rate(now), 3))

    def list(self, template: str | None = None, tenant: str | None = None) -> list[SandboxRecord]:
        with self._cond:
            return self._machine.sandboxes(template, tenant=tenant)

    def set_quota(self, tenant: str, quota: Quota | None) -> None:
        """Limit what `tenant` holds (`PoolMachine.set_quota`)."""
        with self._cond:
            self._execute(self._machine.set_quota(tenant, quota, self._clock()))

    def get(self, vm_id: str) -> SandboxRecord:
        with self._cond:
            return self._machine.sandbox(vm_id)

    def handle(self, vm_id: str) -> Any:
        """The launcher's handle of a restored sandbox; NotFound otherwise."""
        with self._cond:
            try:
                return self._handles[vm_id]
            except KeyError:
                raise NotFound(f"no running sandbox {vm_id!r}") from None

    def usage(self) -> HostUsage:
        with self._cond:
            return self._machine.usage()

    def to_wall(self, t: float) -> float:
        """A time on this runtime's clock as UNIX seconds."""
        return time.time() + (t - self._clock())

    def __repr__(self) -> str:
        state = "running" if self._running else "closed" if self._closed else "stopped"
        return f"<PoolRuntime {state} inflight={self._inflight} {self._machine!r}>"

    # -- executing actions (lock held) ----------------------------------------

    def _execute(self, actions: list[Action]) -> None:
        answered = False
        for a in actions:
            if isinstance(a, StartRestore):
                self._submit(a, self._do_restore, a.template, a.vm_id)
            elif isinstance(a, Resume):
                self._submit(a, self._do_resume, a.vm_id, self._handles[a.vm_id])
            elif isinstance(a, Destroy):
                self._submit(a, self._do_destroy, a.vm_id, self._handles.get(a.vm_id))
            elif isinstance(a, Reply):
                if a.request_id in self._waiting:
                    self._outcomes[a.request_id] = (a.vm_id, self._handles[a.vm_id])
                    answered = True
            elif isinstance(a, Fail):
                if a.request_id in self._waiting:
                    self._outcomes[a.request_id] = a.error
                    answered = True
        if answered:
            self._cond.notify_all()

    def _submit(self, action: Action, fn: Callable[..., None], *args: Any) -> None:
        if self._closed:
            self._dropped += 1
            log.warning("pool action dropped after shutdown", action=repr(action))
            return
        self._inflight += 1
        self._lanes[type(action)].submit(self._guarded, fn, *args)

    def _guarded(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:  # a bug: keep the worker and the pool alive, say so
            log.exception("pool worker failed", fn=fn.__name__, args=repr(args))
        finally:
            with self._cond:
                self._inflight -= 1
                self._cond.notify_all()

    def _feed(self, event: Callable[..., list[Action]], *args: Any) -> None:
        """Report an effect's end to the machine (takes the lock)."""
        with self._cond:
            self._execute(event(*args, self._clock()))

    # -- workers (no lock held while calling the launcher) ----------------------

    def _do_restore(self, template: str, vm_id: str) -> None:
        t0 = time.monotonic()
        try:
            handle = self._launcher.restore(template, vm_id)
        except Exception as exc:
            log.warning("restore failed", template=template, vm_id=vm_id, error=repr(exc))
            self.metrics.restored(template, time.monotonic() - t0, False)
            self._feed(self._machine.restored, vm_id, False)
            return
        self.metrics.restored(template, time.monotonic() - t0, True)
        with self._cond:
            self._handles[vm_id] = handle
            self._execute(self._machine.restored(vm_id, True, self._clock()))

    def _do_resume(self, vm_id: str, handle: Any) -> None:
        try:
            self._launcher.resume(handle)
            ok = True
        except Exception as exc:
            log.warning("resume failed", vm_id=vm_id, error=repr(exc))
            ok = False
        self._feed(self._machine.resumed, vm_id, ok)

    def _do_destroy(self, vm_id: str, handle: Any) -> None:
        if handle is not None:
            try:
                self._launcher.destroy(handle)
            except Exception as exc:  # the machine frees the slot anyway; cleanup reaps leftovers
                log.error("destroy failed", vm_id=vm_id, error=repr(exc))
        with self._cond:
            self._handles.pop(vm_id, None)
            self._execute(self._machine.destroyed(vm_id, self._clock()))

    # -- the background thread ---------------------------------------------------

    def _tick_loop(self) -> None:
        next_health = time.monotonic() + self._health_interval
        while not self._stop.wait(self._tick_interval):
            try:
                self._feed(self._machine.tick)
                self.statuses()  # samples every pool's launch counter for its rate
                if time.monotonic() >= next_health:
                    self._health_check()
                    next_health = time.monotonic() + self._health_interval
            except Exception:
                log.exception("pool tick failed")

    def _health_check(self) -> None:
        with self._cond:
            targets = [(r.vm_id, r.template, self._handles.get(r.vm_id)) for r in self._machine.sandboxes()
                       if r.state in (VmState.WARM, VmState.LEASED)]
        dead = []
        for vm_id, template, handle in targets:
            if handle is None:
                continue
            try:
                ok = self._launcher.alive(handle)
            except Exception as exc:
                log.warning("health check failed", vm_id=vm_id, error=repr(exc))
                ok = False
            if not ok:
                dead.append((vm_id, template, handle))
        for vm_id, template, handle in dead:
            cause = "unknown"
            exit_cause = getattr(self._launcher, "exit_cause", None)
            if exit_cause is not None:
                try:
                    cause = exit_cause(handle)
                except Exception as exc:  # the cause is only for the log and the metric
                    log.info("exit cause unknown", vm_id=vm_id, error=repr(exc))
            log.warning("sandbox died", vm_id=vm_id, template=template, cause=cause)
            self.metrics.died(template, cause)
            self._feed(self._machine.vm_died, vm_id)

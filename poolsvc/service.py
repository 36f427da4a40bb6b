"""The pool service: the gRPC backend that ties templates, pools, VMMs and agents together.

`PoolService` implements `server.PoolBackend` over:

* `launcher.TemplateStore` — templates on disk (a snapshot of a guest booted
  until its agent answered);
* `pool.PoolMachine` + `runtime.PoolRuntime` — the pure pool logic and the
  threads that execute its actions;
* `launcher.Launcher` — one `ember-vmm` process per microVM, forked by the
  zygote, restored PAUSED from the template's snapshot, resumed on Acquire,
  killed on Release;
* `agent.AgentClient` — the guest agent on vsock (Exec, metadata, clock).

Acquire from a warm pool is a resume of a paused VM; per-sandbox identity is
refreshed after it: VMGenID (new generation ID, the guest reseeds its RNG)
happened at restore; metadata from the Acquire call is written by the agent
to ``/run/ember/metadata.json`` before Acquire returns; the guest clock is
stepped to the host's time by the agent in the background (best effort: the
test guest's agent does not set clocks).

Tenants (`poolsvc.auth`). Every method takes the servicer's ``caller``
(None: the implicit default tenant, with every right). Templates live per
tenant — the default tenant's in ``$EMBER_HOME/templates`` as before,
another's in ``$EMBER_HOME/tenants/<tenant>/templates`` — and their pools
are keyed by `auth.pool_key`, so a tenant acquires only clones of its own
templates: template memory is shared copy-on-write only within a tenant.
A sandbox, template or pool of another tenant is PERMISSION_DENIED (an
admin may touch all); lists show only the caller's own (an admin's: all).
Quotas: ``max_templates`` here, the rest in the pool machine.

`serve_forever(...)` is `ember serve`: it cleans up what a crashed
predecessor left in the run directory, starts the gRPC server, and on
SIGTERM/SIGINT drains (destroys every microVM) and exits 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog

from .agent import AgentClient, AgentError, AgentRequestFailed, Exit, Stderr, Stdout
from .jailing import JailConfig
from .api_types import (
    DEFAULT_TENANT,
    AlreadyExists,
    DeadlineExceeded,
    ExecChunk,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PoolError,
    PoolStatusInfo,
    QuotaExceeded,
    SandboxInfo,
    TemplateInfo,
    TemplateSpec,
    TemplateState,
    Unavailable,
)
from .auth import IMPLICIT_CALLER, TENANT_NAME_RE, Authenticator, Caller, ImplicitTenant, pool_key, split_pool_key
from .launcher import (
    LaunchError,
    Launcher,
    TemplateError,
    TemplateExists,
    TemplateNotFound,
    TemplateStore,
    cleanup_stale,
    ember_home,
)
from .launcher import TemplateInfo as StoredTemplate
from .metrics import MetricsError, ServiceMetrics
from .netslots import NetConfig, NetSlots
from .netslots import cleanup_stale as cleanup_stale_slots
from .pool import HostBudget, PoolMachine
from .runtime import PoolRuntime

log = structlog.get_logger("poolsvc.service")

__all__ = ["PoolService", "ServiceConfig", "serve_forever", "default_budget", "template_boot_args"]

#: Where the agent keeps per-sandbox metadata (docs/agent.md).
METADATA_PATH = "/run/ember/metadata.json"
DEFAULT_LEASE_TTL_S = 600.0
TEMPLATE_BOOT_ATTEMPTS = 3
#: How long Acquire waits for a resumed sandbox's agent to answer.
AGENT_ANSWER_TIMEOUT_S = 30.0
#: /init prints EMBER-INIT-OK; the agent normally listens a second or two later.
AGENT_START_TIMEOUT_S = 180.0


class _AgentNeverStarted(Exception):
    """The template guest ran /init but its agent never started listening."""


#: What guest agents print on the console once they listen: ember-agent, the test guest's agent mode.
AGENT_READY_MARKERS = (b"ember-agent: listening", b"AGENT LISTENING")
#: Template boots wait this long for the agent (a Linux boot takes ~1 min on nested hosts).
DEFAULT_TEMPLATE_TIMEOUT_S = 1800.0


def template_boot_args(boot_args: str) -> str:
    """A template's kernel command line: `boot_args` plus, unless it sets them, ``ember.agent=1``
    and ``ember.exit=idle`` (Ember's default guest, guest/rootfs/init; other guests ignore them).

    Without ``ember.exit=idle`` the guest's /init ends by starting a shell on the console. The
    snapshot is taken once the agent answers, which can be while that shell is still starting;
    every clone then finishes starting it first: ~1 s of emulated guest work per Acquire on a
    nested host (bench/results/README.md), and a root shell on the console of every sandbox.
    """
    boot_args = boot_args.strip()
    for arg, default in (("ember.agent=", "ember.agent=1"), ("ember.exit=", "ember.exit=idle")):
        if arg not in boot_args:
            boot_args = f"{boot_args} {default}".strip()
    return boot_args


def default_budget(*, max_vms: int = 512, oversubscription: float = 4.0) -> HostBudget:
    """80% of the host's RAM for guests, with `oversubscription` (clones share memory copy-on-write)."""
    mem_total_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_total_kib = int(line.split()[1])
    return HostBudget(mem_mib=int(mem_total_kib / 1024 * 0.8), max_vms=max_vms, vcpus=None,
                      oversubscription=oversubscription)


class ServiceConfig:
    """Where the service keeps its files and how big it may grow."""

    def __init__(self, home: Path | None = None, *, service_id: str = "default", budget: HostBudget | None = None,
                 max_restoring: int = 4, metrics_listen: str | None = None, network: NetConfig | None = None) -> None:
        self.home = home if home is not None else ember_home()
        self.service_id = service_id
        self.templates_dir = self.home / "templates"
        self.run_dir = self.home / "run" / service_id
        self.budget = budget if budget is not None else default_budget()
        self.max_restoring = max_restoring
        #: ``host:port`` of the Prometheus endpoint (`serve_forever` serves it); None: not served.
        self.metrics_listen = metrics_listen
        #: Network slots for sandboxes (`poolsvc.netslots`); None: sandboxes have no network.
        self.network = network
        #: Who may call (`poolsvc.auth`); None: the implicit default tenant, unauthenticated.
        self.auth: Authenticator | None = None
        #: TLS for the gRPC server (`auth.server_credentials`), and whether it verifies client certificates.
        self.tls: Any = None
        self.mtls = False
        #: How every VMM is jailed (`poolsvc.jailing`); None (``ember serve --no-jail``): not jailed.
        self.jail: JailConfig | None = JailConfig() if os.geteuid() == 0 else None

    def __repr__(self) -> str:
        return f"<ServiceConfig {self.home} id={self.service_id} {self.budget}>"


class PoolService:
    """`server.PoolBackend` over the runtime, launcher, template store and agents. Thread-safe."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        config.templates_dir.mkdir(parents=True, exist_ok=True)
        config.run_dir.mkdir(parents=True, exist_ok=True)
        stale = cleanup_stale(config.run_dir)
        if stale:
            log.warning("cleaned up after a previous service", vms=len(stale))
        self.network: NetSlots | None = None
        if config.network is not None:
            self.network = NetSlots(config.service_id, config.network)
            stale_slots = self.network.start()  # takes the service id's host lock, removes stale slots
        else:
            stale_slots = cleanup_stale_slots(config.service_id)
        if stale_slots:
            log.warning("removed a previous service's network slots", names=len(stale_slots))
        self.store = TemplateStore(config.templates_dir, network=self.network)
        self.auth: Authenticator = config.auth if config.auth is not None else ImplicitTenant()
        self._stores: dict[str, TemplateStore] = {DEFAULT_TENANT: self.store}
        self.launcher = Launcher(_TenantTemplates(self), config.run_dir, service_id=config.service_id,
                                 jail=config.jail)
        # Ids never repeat across restarts: a client of the crashed predecessor still holding
        # its sb-000007 must not reach (or Release) this run's sb-000007 (bench/chaos.py).
        self.machine = PoolMachine(config.budget, max_restoring=config.max_restoring,
                                   id_prefix=f"sb-{os.urandom(3).hex()}-")
        self.metrics = ServiceMetrics()
        self.runtime = PoolRuntime(self.machine, self.launcher, metrics=self.metrics)
        self.metrics.watch(self.runtime.statuses, self.runtime.usage)
        self._metadata: dict[str, dict[str, str]] = {}
        self._creating: set[str] = set()
        self._lock = threading.Lock()

    # --- life cycle --------------------------------------------------------------------------

    def start(self) -> "PoolService":
        self.launcher.start()
        self.runtime.start()
        for tenant in self.auth.tenants():
            self.runtime.set_quota(tenant.name, tenant.quota)
        for tenant in self._tenant_names():  # known templates get an (empty) pool: Acquire restores on demand
            store = self._store(tenant)
            for t in store.list():
                # The bounds the last SetPool saved (a restarted service refills to them), else empty.
                lo, hi = store.pool_settings(t.name) or (0, 0)
                self.runtime.set_pool(pool_key(tenant, t.name), lo, hi, mem_mib=t.mem_mib, vcpus=t.vcpus,
                                      tenant=tenant)
        return self

    def shutdown(self, drain: bool = True) -> None:
        """Stop serving; with `drain`, destroy every microVM. Leaves no process behind when draining."""
        self.runtime.shutdown(drain=drain)
        if drain:
            self.launcher.destroy_all()
        self.launcher.close()
        if self.network is not None:
            self.network.close(destroy=drain)  # without a drain VMMs still use them: the next start cleans up

    def __repr__(self) -> str:
        return f"<PoolService {self.config.run_dir} {self.runtime!r}>"

    # --- helpers -----------------------------------------------------------------------------

    def _store(self, tenant: str) -> TemplateStore:
        """`tenant`'s templates (the default tenant's: ``$EMBER_HOME/templates``)."""
        with self._lock:
            store = self._stores.get(tenant)
            if store is None:
                if not TENANT_NAME_RE.fullmatch(tenant):
                    raise InvalidArgument(f"tenant {tenant!r} does not match {TENANT_NAME_RE.pattern}")
                store = self._stores[tenant] = TemplateStore(self.config.home / "tenants" / tenant,
                                                             network=self.network)
            return store

    def _tenant_names(self) -> list[str]:
        """The default tenant, the configured ones and every tenant with a template directory."""
        names = {DEFAULT_TENANT, *(t.name for t in self.auth.tenants())}
        try:
            names.update(d for d in os.listdir(self.config.home / "tenants") if TENANT_NAME_RE.fullmatch(d))
        except FileNotFoundError:
            pass
        return sorted(names)

    def _owned(self, sandbox_id: str, caller: Caller | None) -> Any:
        """The sandbox's record, if the caller may touch it: NotFound, PermissionDenied."""
        record = self.runtime.get(sandbox_id)
        (caller or IMPLICIT_CALLER).check_owner(record.tenant, f"sandbox {sandbox_id}")
        return record

    def _pool_view(self, status: PoolStatusInfo) -> PoolStatusInfo:
        """A pool status as clients see it: the template's own name, its tenant."""
        tenant, name = split_pool_key(status.template)
        return dataclasses.replace(status, template=name, tenant=tenant)

    def _template(self, name: str, tenant: str = DEFAULT_TENANT) -> StoredTemplate:
        try:
            return self._store(tenant).get(name)
        except TemplateNotFound:
            raise NotFound(f"no template named {name!r}") from None
        except TemplateError as exc:
            raise FailedPrecondition(str(exc)) from exc

    def _info(self, vm_id: str) -> SandboxInfo:
        record = self.runtime.get(vm_id)
        handle = self.runtime.handle(vm_id)
        deadline = record.lease_deadline
        return SandboxInfo(
            id=record.vm_id, template=split_pool_key(record.template)[1], state=record.api_state,
            tenant=record.tenant,
            vsock_uds_path=str(handle.vsock_uds) if handle is not None else "",
            agent_port=handle.agent_port if handle is not None else 0,
            ip_address=handle.net.address if handle is not None and handle.net is not None else "",
            tap=handle.net.tap if handle is not None and handle.net is not None else "",
            lease_deadline=self.runtime.to_wall(deadline) if deadline is not None else None,
            metadata=dict(self._metadata.get(vm_id, {})))

    def _agent(self, vm_id: str, timeout: float = 30.0) -> AgentClient:
        handle = self.runtime.handle(vm_id)
        if handle is None:
            raise NotFound(f"no sandbox {vm_id!r}")
        return AgentClient(str(handle.vsock_uds), handle.agent_port, timeout=timeout)

    @staticmethod
    def _remaining(deadline: float | None, default: float) -> float:
        if deadline is None:
            return default
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("the deadline passed")
        return left

    # --- sandboxes -----------------------------------------------------------------------------

    def acquire(self, template: str, *, lease_ttl: float | None, metadata: Mapping[str, str],
                idempotency_key: str | None, deadline: float | None, cancelled: threading.Event,
                caller: Caller | None = None) -> SandboxInfo:
        tenant = (caller or IMPLICIT_CALLER).tenant  # only the caller's own templates
        self._template(template, tenant)
        key = pool_key(tenant, template)
        vm_id, _handle = self.runtime.acquire(key,
                                              lease_ttl if lease_ttl else DEFAULT_LEASE_TTL_S,
                                              idempotency_key, deadline=deadline, cancelled=cancelled,
                                              tenant=tenant)
        # One connection to the clone's agent: its metadata written (when there is metadata to
        # give and it was not given yet: a retried Acquire), then its clock stepped to now, so
        # the sandbox is handed out with both done. The first answer proves the agent ready.
        given = None
        if metadata and vm_id not in self._metadata:
            given = (METADATA_PATH, json.dumps(dict(metadata), sort_keys=True).encode())
        try:
            self._wait_for_agent(vm_id, key, deadline, cancelled, given)
        except NotFound as exc:  # its VMM died while it was handed out: not "no such template"
            raise Unavailable(f"sandbox {vm_id} died before it was ready; try again") from exc
        except AgentRequestFailed as exc:  # the agent answered, refusing the metadata
            self._release_quietly(vm_id)
            raise FailedPrecondition(f"cannot give sandbox {vm_id} its metadata: {exc}") from exc
        except PoolError:
            self._release_quietly(vm_id)
            raise
        with self._lock:
            self._metadata.setdefault(vm_id, dict(metadata))
        try:
            return self._info(vm_id)
        except NotFound as exc:
            raise Unavailable(f"sandbox {vm_id} died before it was handed out; try again") from exc

    def _wait_for_agent(self, vm_id: str, pool: str, deadline: float | None, cancelled: threading.Event,
                        metadata: tuple[str, bytes] | None = None) -> None:
        """Return once the resumed sandbox's agent has taken `metadata` and stepped its clock.

        (`AgentClient.refresh_clone`; an agent that refuses SET_TIME, such as
        the test guest's, has answered all the same.) `AgentRequestFailed`
        (the agent refused the metadata) is raised at once; every other
        agent error is retried until the deadline.

        Right after a resume the guest is still handling the vsock
        TRANSPORT_RESET that every restore sends (its pre-snapshot
        connections are gone), and a CONNECT can be refused for that moment.
        Each retry is counted under `pool` (the pool key, as the runtime's
        metrics are labelled) in `ember_agent_retries_total`: with the VMM's
        hold on RX until the guest acknowledges the reset and its fresh
        host-side ports, a healthy clone answers the first connection.
        """
        until = time.monotonic() + AGENT_ANSWER_TIMEOUT_S
        if deadline is not None:
            until = min(until, deadline)
        delay = 0.002
        while True:
            try:
                self._agent(vm_id, max(0.5, until - time.monotonic())).refresh_clone(metadata)
                return
            except AgentRequestFailed:
                raise
            except AgentError as exc:
                if cancelled.is_set():
                    raise DeadlineExceeded("the Acquire call was cancelled") from exc
                if time.monotonic() + delay >= until:
                    raise Unavailable(f"sandbox {vm_id}'s agent does not answer: {exc}") from exc
            self.metrics.agent_retried(pool)
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _release_quietly(self, vm_id: str) -> None:
        try:
            self.runtime.release(vm_id)
        except PoolError:
            pass

    def release(self, sandbox_id: str, *, deadline: float | None, cancelled: threading.Event,
                caller: Caller | None = None) -> None:
        self._owned(sandbox_id, caller)
        self.runtime.release(sandbox_id)
        with self._lock:
            self._metadata.pop(sandbox_id, None)

    def get(self, sandbox_id: str, *, deadline: float | None, cancelled: threading.Event,
            caller: Caller | None = None) -> SandboxInfo:
        self._owned(sandbox_id, caller)
        return self._info(sandbox_id)

    def list_sandboxes(self, template: str | None, *, deadline: float | None,
                       cancelled: threading.Event, caller: Caller | None = None) -> Sequence[SandboxInfo]:
        c = caller or IMPLICIT_CALLER
        if c.admin:  # every tenant's; a template name picks that name in every tenant
            records = [r for r in self.runtime.list()
                       if template is None or split_pool_key(r.template)[1] == template]
        else:
            records = self.runtime.list(pool_key(c.tenant, template) if template else None, tenant=c.tenant)
        out = []
        for record in records:
            try:
                out.append(self._info(record.vm_id))
            except NotFound:
                continue  # destroyed meanwhile
        return out

    def exec(self, sandbox_id: str, argv: Sequence[str], *, stdin: bytes, env: Mapping[str, str],
             timeout: float | None, deadline: float | None, cancelled: threading.Event,
             caller: Caller | None = None) -> Iterator[ExecChunk]:
        self._leased(sandbox_id, caller)
        io_timeout = self._remaining(deadline, 3600.0)
        client = self._agent(sandbox_id, io_timeout)
        try:
            events = client.exec(list(argv), stdin=stdin, env=dict(env) or None, timeout_s=timeout)
            for event in events:
                if isinstance(event, Stdout):
                    yield ExecChunk(stdout=event.data)
                elif isinstance(event, Stderr):
                    yield ExecChunk(stderr=event.data)
                elif isinstance(event, Exit):
                    yield ExecChunk(exit_code=event.status, timed_out=event.timed_out)
                    return
        except AgentRequestFailed as exc:
            raise FailedPrecondition(f"the sandbox's agent refused: {exc}") from exc
        except AgentError as exc:
            raise Unavailable(f"cannot reach the sandbox's agent: {exc}") from exc

    def _leased(self, sandbox_id: str, caller: Caller | None) -> None:
        """FailedPrecondition unless the caller's sandbox is leased (Exec and files need a running guest)."""
        record = self._owned(sandbox_id, caller)
        if record.api_state.value != "leased":
            raise FailedPrecondition(f"sandbox {sandbox_id} is not leased (it is {record.api_state.value})")

    @staticmethod
    def _file_error(exc: AgentError, path: str, writing: bool = False) -> PoolError:
        if isinstance(exc, AgentRequestFailed):
            if "No such file or directory" in str(exc):
                what = f"no directory for {path!r}" if writing else f"no file {path!r}"
                return NotFound(f"{what} in the sandbox ({exc})")
            return FailedPrecondition(f"the sandbox's agent refused: {exc}")
        return Unavailable(f"cannot reach the sandbox's agent: {exc}")

    def read_file(self, sandbox_id: str, path: str, *, deadline: float | None, cancelled: threading.Event,
                  caller: Caller | None = None) -> Iterator[bytes]:
        self._leased(sandbox_id, caller)
        client = self._agent(sandbox_id, self._remaining(deadline, 600.0))
        try:
            yield from client.read_file(path)
        except AgentError as exc:
            raise self._file_error(exc, path) from exc

    def write_file(self, sandbox_id: str, path: str, chunks: Iterator[bytes], *, mode: int,
                   deadline: float | None, cancelled: threading.Event, caller: Caller | None = None) -> int:
        self._leased(sandbox_id, caller)
        client = self._agent(sandbox_id, self._remaining(deadline, 600.0))
        try:
            return client.write_file_chunks(path, chunks, mode)
        except AgentError as exc:
            raise self._file_error(exc, path, writing=True) from exc

    # --- templates ---------------------------------------------------------------------------

    def _defaults(self, spec: TemplateSpec) -> dict[str, Any]:
        kernel, rootfs, initrd, boot_args = spec.kernel, spec.rootfs, spec.initrd, spec.boot_args
        if not kernel:
            from guest.images import ImagesNotBuilt, show
            try:
                images = show()
            except ImagesNotBuilt as exc:
                raise FailedPrecondition(f"no kernel given and the default guest images are not built "
                                         f"(`ember images build`): {exc}") from exc
            except (OSError, ValueError) as exc:
                raise FailedPrecondition(f"no kernel given and no default guest images: {exc}") from exc
            kernel = images["kernel"]
            rootfs = rootfs if rootfs else images["rootfs"]
            boot_args = boot_args if boot_args else images["boot_args"]
        return {"kernel": kernel, "rootfs": rootfs or None, "initrd": initrd or None,
                "boot_args": template_boot_args(boot_args or ""), "vcpus": spec.vcpus or 1,
                "mem_mib": spec.mem_mib or 128}

    def create_template(self, spec: TemplateSpec, *, deadline: float | None,
                        cancelled: threading.Event, caller: Caller | None = None) -> TemplateInfo:
        args = self._defaults(spec)
        tenant = (caller or IMPLICIT_CALLER).tenant
        store, key = self._store(tenant), pool_key(tenant, spec.name)
        quota = next((t.quota for t in self.auth.tenants() if t.name == tenant), None)
        have = len(store.list()) if quota is not None and quota.max_templates is not None else 0
        with self._lock:
            if key in self._creating:
                raise AlreadyExists(f"template {spec.name!r} is being created")
            if quota is not None and quota.max_templates is not None:
                creating = sum(1 for k in self._creating if split_pool_key(k)[0] == tenant)
                if have + creating >= quota.max_templates:
                    raise QuotaExceeded(f"tenant {tenant!r} is at its quota max_templates={quota.max_templates} "
                                        f"({have} templates, {creating} being created)")
            self._creating.add(key)
        try:
            stored = None
            for attempt in range(1, TEMPLATE_BOOT_ATTEMPTS + 1):
                try:
                    stored = self._boot_template(spec.name, args, deadline, cancelled, store=store)
                    break
                except _AgentNeverStarted as exc:
                    log.warning("template boot: the agent never started; booting again", template=spec.name,
                                attempt=attempt, reason=str(exc))
            if stored is None:
                raise FailedPrecondition(f"cannot create template {spec.name!r}: the guest agent did not start "
                                         f"in {TEMPLATE_BOOT_ATTEMPTS} boots")
            self.runtime.set_pool(key, 0, 0, mem_mib=stored.mem_mib, vcpus=stored.vcpus, tenant=tenant)
            return _template_info(stored, tenant)
        finally:
            with self._lock:
                self._creating.discard(key)

    def _boot_template(self, name: str, args: dict[str, Any], deadline: float | None,
                       cancelled: threading.Event, *, store: TemplateStore | None = None) -> StoredTemplate:
        """One boot of a template VM until its agent answers, then the snapshot.

        Raises `_AgentNeverStarted` when /init ran but no agent appeared within
        `AGENT_START_TIMEOUT_S` (on kvm_pvm hosts a guest process occasionally
        sleeps forever — docs/host-kvm.md — and a new boot is the cure).
        """
        timeout = self._remaining(deadline, DEFAULT_TEMPLATE_TIMEOUT_S)
        init_seen: list[float] = []

        def ready(handle: Any) -> bool:
            # Ping only once the agent says it listens: there is no point earlier.
            if cancelled.is_set():
                raise TemplateError("the CreateTemplate call was cancelled")
            try:
                console = handle.console_log.read_bytes()[-65536:]
            except OSError:
                return False
            if not any(marker in console for marker in AGENT_READY_MARKERS):
                if b"EMBER-INIT-OK" in console:
                    if not init_seen:
                        init_seen.append(time.monotonic())
                    elif time.monotonic() - init_seen[0] > AGENT_START_TIMEOUT_S:
                        raise _AgentNeverStarted(f"no agent {AGENT_START_TIMEOUT_S:.0f} s after /init started")
                return False
            try:
                AgentClient(str(handle.vsock_uds), handle.agent_port, timeout=5.0).ping()
                return True
            except AgentError:
                return False

        try:
            return (store or self.store).create(
                name, args["kernel"], args["rootfs"], args["initrd"], args["boot_args"],
                args["vcpus"], args["mem_mib"], ready=ready, timeout=timeout, poll_interval=0.5)
        except TemplateExists:
            raise AlreadyExists(f"template {name!r} exists") from None
        except TemplateError as exc:
            if isinstance(exc.__cause__, _AgentNeverStarted):
                raise exc.__cause__ from exc
            raise FailedPrecondition(f"cannot create template {name!r}: {exc}") from exc
        except LaunchError as exc:
            raise FailedPrecondition(f"cannot create template {name!r}: {exc}") from exc

    def list_templates(self, *, deadline: float | None, cancelled: threading.Event,
                       caller: Caller | None = None) -> Sequence[TemplateInfo]:
        c = caller or IMPLICIT_CALLER
        tenants = self._tenant_names() if c.admin else [c.tenant]
        return [_template_info(t, tenant) for tenant in tenants for t in self._store(tenant).list()]

    def delete_template(self, name: str, *, deadline: float | None, cancelled: threading.Event,
                        caller: Caller | None = None) -> None:
        tenant = (caller or IMPLICIT_CALLER).tenant
        self._template(name, tenant)
        self.runtime.remove_template(pool_key(tenant, name))
        try:
            self._store(tenant).remove(name)
        except TemplateNotFound:
            raise NotFound(f"no template named {name!r}") from None

    # --- pools -------------------------------------------------------------------------------

    def set_pool(self, template: str, min_warm: int, max_warm: int, *, deadline: float | None,
                 cancelled: threading.Event, caller: Caller | None = None) -> PoolStatusInfo:
        tenant = (caller or IMPLICIT_CALLER).tenant
        t = self._template(template, tenant)
        if min_warm > max_warm:
            raise InvalidArgument("min_warm is above max_warm")
        try:
            self._store(tenant).save_pool_settings(template, min_warm, max_warm)  # first: a failure changes nothing
        except TemplateNotFound:
            raise NotFound(f"no template named {template!r}") from None
        except TemplateError as exc:
            raise Unavailable(str(exc)) from exc
        return self._pool_view(self.runtime.set_pool(pool_key(tenant, template), min_warm, max_warm,
                                                     mem_mib=t.mem_mib, vcpus=t.vcpus, tenant=tenant))

    def pool_status(self, template: str, *, deadline: float | None, cancelled: threading.Event,
                    caller: Caller | None = None) -> PoolStatusInfo:
        tenant = (caller or IMPLICIT_CALLER).tenant
        self._template(template, tenant)
        return self._pool_view(self.runtime.status(pool_key(tenant, template)))

    def list_pools(self, *, deadline: float | None, cancelled: threading.Event,
                   caller: Caller | None = None) -> Sequence[PoolStatusInfo]:
        c = caller or IMPLICIT_CALLER
        return [self._pool_view(s) for s in self.runtime.statuses() if c.sees(s.tenant)]


class _TenantTemplates:
    """The launcher's template store: a pool key (`auth.pool_key`) names a template of that tenant."""

    def __init__(self, service: PoolService) -> None:
        self._service = service

    def get(self, key: str) -> StoredTemplate:
        tenant, name = split_pool_key(key)
        return self._service._store(tenant).get(name)

    def __getattr__(self, name: str) -> Any:
        # Everything else (e.g. `network`) is the same for every tenant: the default store's.
        return getattr(self._service.store, name)

    def __repr__(self) -> str:
        return f"<TenantTemplates {self._service.config.home}>"


def _template_info(t: StoredTemplate, tenant: str = DEFAULT_TENANT) -> TemplateInfo:
    try:
        created = time.mktime(time.strptime(t.created[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
    except (ValueError, TypeError):
        created = 0.0
    return TemplateInfo(name=t.name, state=TemplateState.READY, vcpus=t.vcpus, mem_mib=t.mem_mib, created=created,
                        kernel=t.kernel, rootfs=str(t.rootfs_path or ""), initrd=t.initrd or "",
                        boot_args=t.boot_args, tenant=tenant)


def serve_forever(listen: str, config: ServiceConfig) -> int:
    """`ember serve`: run until SIGTERM/SIGINT, then drain. Returns the exit status."""
    from .server import ServerError, start

    service = PoolService(config).start()
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            server, port = start(service, listen, auth=service.auth, tls=config.tls, mtls=config.mtls)
        except ServerError as exc:
            log.error("cannot listen", addr=listen, error=str(exc))
            service.shutdown(drain=True)
            return 1
        metrics_addr = None
        if config.metrics_listen:
            try:
                host, mport = service.metrics.serve(config.metrics_listen)
                metrics_addr = f"{host}:{mport}"
            except MetricsError as exc:
                log.error("cannot serve metrics", addr=config.metrics_listen, error=str(exc))
                server.stop(grace=0)
                service.shutdown(drain=True)
                return 1
        print(json.dumps({"event": "listening", "addr": listen, "port": port, "pid": os.getpid(),
                          "run_dir": str(config.run_dir), "metrics": metrics_addr}), flush=True)
        log.info("ember pool service listening", addr=listen, port=port, run_dir=str(config.run_dir))
        while not stop.wait(0.5):
            pass
        log.info("draining")
        server.stop(grace=2.0).wait(5.0)
        service.shutdown(drain=True)
        return 0
    finally:
        service.metrics.close()
        for s, h in previous.items():
            signal.signal(s, h)

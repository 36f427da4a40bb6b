"""The gRPC surface of the pool service: ``ember.pool.v1.PoolService`` over a `PoolBackend`.

The servicer is a thin adapter, and the only place protobuf types exist on
the service side. For each call it

1. parses the request into plain values, rejecting malformed ones with
   INVALID_ARGUMENT before the backend sees them;
2. calls the backend with the call's deadline, as a ``time.monotonic()``
   instant (None: the client set none), and a ``cancelled`` event that is set
   when the RPC ends for any reason — the client cancelled, its deadline
   passed, or the call completed. A backend that waits (a restore on demand,
   a template boot, a command's output) waits on ``cancelled`` or checks it,
   and gives up when it is set or the deadline passes;
3. maps the `poolsvc.api_types.PoolError` family to the status code of the
   same meaning, the message becoming the status details; any other
   exception is logged and answered INTERNAL.

Two cancellation cases need more than that. An Acquire whose client went
away while the backend was leasing would leak the sandbox until its TTL: the
servicer releases it, unless the request carried an idempotency key (then a
retry will claim it). An Exec stream stops pulling from the backend's
iterator as soon as the client cancels, and closes it (``close()`` runs the
generator's cleanup) — so the command is killed by the backend, not left
running.

Authentication. With an `auth.Authenticator` (``ember serve`` always gives
one) every call is authenticated before the backend sees it — the bearer
token in the call's metadata, else (with ``mtls``) the verified client
certificate's names — and the backend gets the resulting `auth.Caller` as
``caller``; a request's admin-only ``tenant`` field turns it into the
caller acting for that tenant (PERMISSION_DENIED for non-admins). Failures
are UNAUTHENTICATED. Without one (an embedded server) the backend gets no
``caller`` and ``tenant`` fields must be empty. Health checking and
reflection need no credentials (they tell nothing about tenants).

`start` serves plaintext, or TLS given ``tls`` (server credentials, see
`auth.server_credentials`).

`serve` builds the server with gRPC health checking (``grpc.health.v1``,
SERVING for "" and for PoolService) and server reflection (``grpcurl
-plaintext ADDR list`` works).
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from concurrent import futures
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence, TypeVar

import grpc

from . import proto
from .agent import MAX_PATH
from .api_types import (
    PermissionDenied,
    Unauthenticated,
    AlreadyExists,
    DeadlineExceeded,
    ExecChunk,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PoolError,
    PoolStatusInfo,
    ResourceExhausted,
    SandboxInfo,
    SandboxState,
    TemplateInfo,
    TemplateSpec,
    TemplateState,
    Unavailable,
)
from .auth import Authenticator, Caller, peer_names

log = logging.getLogger(__name__)

#: The service's full name, as reflection and health checking know it.
SERVICE_NAME = "ember.pool.v1.PoolService"

#: Template names end up in paths and metric labels.
TEMPLATE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
MAX_IDEMPOTENCY_KEY = 256
MAX_METADATA_ENTRIES = 64

_STATUS: dict[type[PoolError], grpc.StatusCode] = {
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}

_SANDBOX_STATE_PB = {s: f"SANDBOX_STATE_{s.name}" for s in SandboxState}
_TEMPLATE_STATE_PB = {s: f"TEMPLATE_STATE_{s.name}" for s in TemplateState}

T = TypeVar("T")


class ServerError(Exception):
    """Could not start the gRPC server."""


class PoolBackend(Protocol):
    """What the servicer needs from the pool service; it raises only `PoolError`s.

    Every method takes ``deadline`` (a ``time.monotonic()`` instant, or None)
    and ``cancelled`` (set when the RPC ends); see the module docstring.
    Served with an authenticator, every method also takes ``caller`` (an
    `auth.Caller`), and must keep each tenant to what it owns.
    Requests arrive validated: names non-empty, counts in range, argv
    non-empty. Methods are called from several threads at once.
    """

    def acquire(self, template: str, *, lease_ttl: float | None, metadata: Mapping[str, str],
                idempotency_key: str | None, deadline: float | None,
                cancelled: threading.Event) -> SandboxInfo:
        """Lease a sandbox of ``template`` (``lease_ttl`` None: the default TTL)."""
        ...

    def release(self, sandbox_id: str, *, deadline: float | None,
                cancelled: threading.Event) -> None:
        """End the lease and destroy the sandbox."""
        ...

    def get(self, sandbox_id: str, *, deadline: float | None,
            cancelled: threading.Event) -> SandboxInfo:
        ...

    def list_sandboxes(self, template: str | None, *, deadline: float | None,
                       cancelled: threading.Event) -> Sequence[SandboxInfo]:
        """Sandboxes of one template, or of all (None)."""
        ...

    def exec(self, sandbox_id: str, argv: Sequence[str], *, stdin: bytes, env: Mapping[str, str],
             timeout: float | None, deadline: float | None,
             cancelled: threading.Event) -> Iterator[ExecChunk]:
        """Run ``argv`` in the sandbox: output chunks, then one exit chunk.

        The servicer calls ``close()`` on the iterator when the client goes
        away; a generator kills the command in its ``finally``.
        """
        ...

    def read_file(self, sandbox_id: str, path: str, *, deadline: float | None,
                  cancelled: threading.Event) -> Iterator[bytes]:
        """The bytes of the guest's file ``path`` in chunks; ``close()`` when the client goes away."""
        ...

    def write_file(self, sandbox_id: str, path: str, chunks: Iterator[bytes], *, mode: int,
                   deadline: float | None, cancelled: threading.Event) -> int:
        """Write the concatenated ``chunks`` to the guest's ``path``; the number of bytes written."""
        ...

    def create_template(self, spec: TemplateSpec, *, deadline: float | None,
                        cancelled: threading.Event) -> TemplateInfo:
        ...

    def list_templates(self, *, deadline: float | None,
                       cancelled: threading.Event) -> Sequence[TemplateInfo]:
        ...

    def delete_template(self, name: str, *, deadline: float | None,
                        cancelled: threading.Event) -> None:
        ...

    def set_pool(self, template: str, min_warm: int, max_warm: int, *, deadline: float | None,
                 cancelled: threading.Event) -> PoolStatusInfo:
        ...

    def pool_status(self, template: str, *, deadline: float | None,
                    cancelled: threading.Event) -> PoolStatusInfo:
        ...

    def list_pools(self, *, deadline: float | None,
                   cancelled: threading.Event) -> Sequence[PoolStatusInfo]:
        ...


# ---- request parsing (pure) -----------------------------------------------------

def _require(value: str, what: str) -> str:
    if not value:
        raise InvalidArgument(f"{what} is empty")
    return value


def _seconds(msg: Any, field: str, present: bool) -> float | None:
    """A google.protobuf.Duration field as positive seconds; None when unset."""
    if not present:
        return None
    d = getattr(msg, field)
    seconds = d.seconds + d.nanos / 1e9
    if seconds <= 0:
        raise InvalidArgument(f"{field} must be positive, got {seconds:g} s")
    return seconds


def _string_map(m: Mapping[str, str], what: str) -> dict[str, str]:
    if len(m) > MAX_METADATA_ENTRIES:
        raise InvalidArgument(f"{what} has {len(m)} entries, at most {MAX_METADATA_ENTRIES}")
    for k in m:
        if not k:
            raise InvalidArgument(f"{what} has an empty key")
    return dict(m)


def parse_guest_path(path: str) -> str:
    """A path in the guest as the agent takes it: absolute, no NUL, at most `agent.MAX_PATH` bytes."""
    if not path:
        raise InvalidArgument("path is empty")
    if not path.startswith("/"):
        raise InvalidArgument(f"path {path[:80]!r} is not absolute")
    if "\0" in path:
        raise InvalidArgument("path contains a NUL character")
    if len(path.encode()) > MAX_PATH:
        raise InvalidArgument(f"path is longer than {MAX_PATH} bytes")
    return path


def parse_set_pool(template: str, min_warm: int, max_warm: int) -> tuple[str, int, int]:
    """Check SetPool's arguments; raise InvalidArgument."""
    _require(template, "template")
    if min_warm < 0 or max_warm < 0:
        raise InvalidArgument(f"min_warm and max_warm must be >= 0, got {min_warm} and {max_warm}")
    if min_warm > max_warm:
        raise InvalidArgument(f"min_warm ({min_warm}) is greater than max_warm ({max_warm})")
    return template, min_warm, max_warm


def parse_template_spec(request: Any) -> TemplateSpec:
    """A CreateTemplateRequest as a TemplateSpec; raise InvalidArgument."""
    name = _require(request.name, "name")
    if not TEMPLATE_NAME_RE.fullmatch(name):
        raise InvalidArgument(f"template name {name!r} does not match {TEMPLATE_NAME_RE.pattern}")
    if request.vcpus < 0 or request.mem_mib < 0:
        raise InvalidArgument(f"vcpus and mem_mib must be >= 0, got {request.vcpus} and {request.mem_mib}")
    return TemplateSpec(name=name, kernel=request.kernel or None, rootfs=request.rootfs or None,
                        initrd=request.initrd or None, boot_args=request.boot_args or None,
                        vcpus=request.vcpus or None, mem_mib=request.mem_mib or None)


# ---- plain values -> protobuf ---------------------------------------------------

def _timestamp(ts: Any, unix_seconds: float) -> None:
    # Whole seconds and fraction apart: seconds * 1e9 as a float loses nanoseconds.
    whole = math.floor(unix_seconds)
    nanos = min(int(round((unix_seconds - whole) * 1e9)), 999_999_999)
    ts.seconds, ts.nanos = whole, nanos


def sandbox_to_pb(pb2: Any, info: SandboxInfo) -> Any:
    msg = pb2.Sandbox(
        id=info.id, template=info.template,
        agent=pb2.AgentEndpoint(vsock_uds_path=info.vsock_uds_path, port=info.agent_port),
        network=pb2.NetworkInfo(ip_address=info.ip_address, tap=info.tap),
        state=_SANDBOX_STATE_PB[info.state], metadata=dict(info.metadata), tenant=info.tenant)
    if info.lease_deadline is not None:
        _timestamp(msg.lease_deadline, info.lease_deadline)
    return msg


def template_to_pb(pb2: Any, info: TemplateInfo) -> Any:
    msg = pb2.Template(name=info.name, vcpus=info.vcpus, mem_mib=info.mem_mib,
                       state=_TEMPLATE_STATE_PB[info.state], kernel=info.kernel,
                       rootfs=info.rootfs, initrd=info.initrd, boot_args=info.boot_args,
                       tenant=info.tenant)
    _timestamp(msg.created, info.created)
    return msg


def pool_status_to_pb(pb2: Any, info: PoolStatusInfo) -> Any:
    return pb2.PoolStatus(template=info.template, min_warm=info.min_warm, max_warm=info.max_warm,
                          warm=info.warm, leased=info.leased, restoring=info.restoring,
                          launches_total=info.launches_total, failures_total=info.failures_total,
                          launch_rate=info.launch_rate, mem_mib=info.mem_mib, tenant=info.tenant)


def exec_output_to_pb(pb2: Any, chunk: ExecChunk) -> Any:
    if chunk.stdout is not None:
        return pb2.ExecOutput(stdout=chunk.stdout)
    if chunk.stderr is not None:
        return pb2.ExecOutput(stderr=chunk.stderr)
    return pb2.ExecOutput(exit=pb2.ExecExit(exit_code=chunk.exit_code, timed_out=chunk.timed_out))


# ---- the servicer ---------------------------------------------------------------

def status_for(exc: PoolError) -> grpc.StatusCode:
    """The gRPC status code of a PoolError (UNKNOWN for the bare base class)."""
    for cls in type(exc).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return grpc.StatusCode.UNKNOWN


class _Call:
    """The backend's view of one RPC: its deadline, its end and (with tenants) its caller."""

    def __init__(self, context: grpc.ServicerContext, caller: Caller | None = None) -> None:
        self.caller = caller
        remaining = context.time_remaining()
        # No deadline reads as an enormous (or infinite) remaining time.
        if remaining is None or not math.isfinite(remaining) or remaining > 10 * 365 * 86400:
            self.deadline: float | None = None
        else:
            self.deadline = time.monotonic() + remaining
        self.cancelled = threading.Event()
        if not context.add_callback(self.cancelled.set):
            self.cancelled.set()  # the RPC has already ended

    def kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"deadline": self.deadline, "cancelled": self.cancelled}
        if self.caller is not None:
            kw["caller"] = self.caller
        return kw


class PoolServicer:
    """``ember.pool.v1.PoolService`` over a PoolBackend (method names are the RPCs')."""

    def __init__(self, backend: PoolBackend, auth: Authenticator | None = None, *, mtls: bool = False) -> None:
        """`auth`: authenticate every call (see the module docstring); `mtls`: client
        certificates are verified by the TLS layer, so their names may authenticate."""
        self._backend = backend
        self._auth = auth
        self._mtls = mtls
        self._pb2, _ = proto.load()

    def __repr__(self) -> str:
        return f"<PoolServicer backend={type(self._backend).__name__} auth={self._auth!r} mtls={self._mtls}>"

    def _call(self, context: grpc.ServicerContext, tenant: str = "") -> _Call:
        """The RPC's `_Call`, its caller authenticated (acting for `tenant`, an admin-only field)."""
        if self._auth is None:
            if tenant:
                raise InvalidArgument("this service has no tenants: leave `tenant` empty")
            return _Call(context)
        names = peer_names(context.auth_context() or {}) if self._mtls else []
        caller = self._auth.authenticate(context.invocation_metadata() or (), names)
        return _Call(context, caller.acting_for(tenant or None))

    def _run(self, context: grpc.ServicerContext, method: str, thunk: Callable[[], T]) -> T:
        """``thunk()``, its errors turned into the call's status (abort raises)."""
        try:
            return thunk()
        except PoolError as exc:
            code, details = status_for(exc), str(exc) or (type(exc).__doc__ or type(exc).__name__)
        except Exception as exc:  # a backend bug: say so, keep serving
            log.exception("%s failed", method)
            code, details = grpc.StatusCode.INTERNAL, f"{method}: {type(exc).__name__}: {exc}"
        context.abort(code, details)
        raise AssertionError("unreachable: context.abort raises")

    # -- sandboxes

    def Acquire(self, request: Any, context: grpc.ServicerContext) -> Any:
        def act() -> SandboxInfo:
            call = self._call(context)
            template = _require(request.template, "template")
            ttl = _seconds(request, "lease_ttl", request.HasField("lease_ttl"))
            metadata = _string_map(request.metadata, "metadata")
            if len(request.idempotency_key) > MAX_IDEMPOTENCY_KEY:
                raise InvalidArgument(f"idempotency_key is longer than {MAX_IDEMPOTENCY_KEY} characters")
            info = self._backend.acquire(template, lease_ttl=ttl, metadata=metadata,
                                         idempotency_key=request.idempotency_key or None,
                                         **call.kwargs())
            if not context.is_active() and not request.idempotency_key:
                self._release_abandoned(info, call.caller)
            return info
        return sandbox_to_pb(self._pb2, self._run(context, "Acquire", act))

    def _release_abandoned(self, info: SandboxInfo, caller: Caller | None) -> None:
        """The client left while we leased ``info``, and cannot retry for it: give it back."""
        log.info("Acquire of %s was cancelled after the lease: releasing %s", info.template, info.id)
        try:
            self._backend.release(info.id, deadline=None, cancelled=threading.Event(),
                                  **({"caller": caller} if caller is not None else {}))
        except PoolError as exc:
            log.warning("releasing abandoned sandbox %s failed: %s", info.id, exc)

    def Release(self, request: Any, context: grpc.ServicerContext) -> Any:
        sandbox_id = request.id
        self._run(context, "Release", lambda: self._backend.release(
            _require(sandbox_id, "id"), **self._call(context).kwargs()))
        return self._pb2.ReleaseResponse()

    def Get(self, request: Any, context: grpc.ServicerContext) -> Any:
        info = self._run(context, "Get", lambda: self._backend.get(
            _require(request.id, "id"), **self._call(context).kwargs()))
        return sandbox_to_pb(self._pb2, info)

    def List(self, request: Any, context: grpc.ServicerContext) -> Any:
        infos = self._run(context, "List", lambda: self._backend.list_sandboxes(
            request.template or None, **self._call(context).kwargs()))
        return self._pb2.ListResponse(sandboxes=[sandbox_to_pb(self._pb2, i) for i in infos])

    def Exec(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        def start() -> tuple[_Call, Iterator[ExecChunk]]:
            call = self._call(context)
            sandbox_id = _require(request.id, "id")
            argv = list(request.argv)
            if not argv or not argv[0]:
                raise InvalidArgument("argv is empty" if not argv else "argv[0] is empty")
            env = _string_map(request.env, "env")
            if any("=" in k for k in env):
                raise InvalidArgument("env has a key containing '='")
            timeout = _seconds(request, "timeout", request.HasField("timeout"))
            chunks = self._backend.exec(sandbox_id, argv, stdin=request.stdin, env=env,
                                        timeout=timeout, **call.kwargs())
            return call, iter(chunks)

        call, chunks = self._run(context, "Exec", start)
        finished = False
        try:
            while context.is_active() and not finished:
                chunk = self._run(context, "Exec", lambda: next(chunks, None))
                if chunk is None:
                    break
                if not isinstance(chunk, ExecChunk):
                    self._run(context, "Exec", lambda: _raise(TypeError(
                        f"backend yielded {type(chunk).__name__}, not ExecChunk")))
                finished = chunk.exit_code is not None
                if not context.is_active():
                    break
                yield exec_output_to_pb(self._pb2, chunk)
            if not finished and context.is_active():
                self._run(context, "Exec", lambda: _raise(RuntimeError(
                    "the command's output ended without an exit status")))
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    def ReadFile(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        def start() -> Iterator[bytes]:
            call = self._call(context)
            path = parse_guest_path(request.path)
            return iter(self._backend.read_file(_require(request.id, "id"), path, **call.kwargs()))

        chunks = self._run(context, "ReadFile", start)
        try:
            while context.is_active():
                data = self._run(context, "ReadFile", lambda: next(chunks, None))
                if data is None:
                    break
                yield self._pb2.FileChunk(data=data)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    def WriteFile(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        def act() -> int:
            call = self._call(context)
            first = next(request_iterator, None)
            if first is None:
                raise InvalidArgument("WriteFile needs at least one message naming the sandbox and the path")
            sandbox_id = _require(first.id, "id")
            path = parse_guest_path(first.path)
            mode = first.mode or 0o644
            if mode > 0o7777:
                raise InvalidArgument(f"mode {mode:#o} is above 0o7777")

            def chunks() -> Iterator[bytes]:  # each message is bounded by gRPC's message size limit
                yield first.data
                for message in request_iterator:
                    if message.id not in ("", sandbox_id) or message.path not in ("", first.path):
                        raise InvalidArgument("a later WriteFile message names another sandbox or path")
                    yield message.data

            return self._backend.write_file(sandbox_id, path, chunks(), mode=mode, **call.kwargs())

        written = self._run(context, "WriteFile", act)
        return self._pb2.WriteFileResponse(bytes_written=written)

    # -- templates

    def CreateTemplate(self, request: Any, context: grpc.ServicerContext) -> Any:
        info = self._run(context, "CreateTemplate", lambda: self._backend.create_template(
            parse_template_spec(request), **self._call(context, request.tenant).kwargs()))
        return template_to_pb(self._pb2, info)

    def ListTemplates(self, request: Any, context: grpc.ServicerContext) -> Any:
        infos = self._run(context, "ListTemplates", lambda: self._backend.list_templates(
            **self._call(context).kwargs()))
        return self._pb2.ListTemplatesResponse(templates=[template_to_pb(self._pb2, i) for i in infos])

    def DeleteTemplate(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._run(context, "DeleteTemplate", lambda: self._backend.delete_template(
            _require(request.name, "name"), **self._call(context, request.tenant).kwargs()))
        return self._pb2.DeleteTemplateResponse()

    # -- pools

    def SetPool(self, request: Any, context: grpc.ServicerContext) -> Any:
        info = self._run(context, "SetPool", lambda: self._backend.set_pool(
            *parse_set_pool(request.template, request.min_warm, request.max_warm),
            **self._call(context, request.tenant).kwargs()))
        return pool_status_to_pb(self._pb2, info)

    def GetPoolStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        info = self._run(context, "GetPoolStatus", lambda: self._backend.pool_status(
            _require(request.template, "template"), **self._call(context, request.tenant).kwargs()))
        return pool_status_to_pb(self._pb2, info)

    def ListPools(self, request: Any, context: grpc.ServicerContext) -> Any:
        infos = self._run(context, "ListPools", lambda: self._backend.list_pools(
            **self._call(context).kwargs()))
        return self._pb2.ListPoolsResponse(pools=[pool_status_to_pb(self._pb2, i) for i in infos])


def _raise(exc: Exception) -> Any:
    raise exc


# ---- the server -----------------------------------------------------------------

def start(backend: PoolBackend, listen_addr: str, *, max_workers: int = 16,
          auth: Authenticator | None = None, tls: grpc.ServerCredentials | None = None,
          mtls: bool = False) -> tuple[grpc.Server, int]:
    """Build and start the server; ``(server, bound port)`` (port 0 picks a free one).

    `auth`: authenticate every PoolService call; `tls`: serve TLS with these
    credentials (plaintext without); `mtls`: the credentials require and
    verify client certificates, whose names may then authenticate callers.
    Health checking says SERVING for "" and for PoolService; stopping is the
    caller's: ``server.stop(grace)``.
    """
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    _, pb2_grpc = proto.load()
    # so_reuseport off: a second server on a taken port must fail, not share it.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
                         options=[("grpc.so_reuseport", 0)])
    pb2_grpc.add_PoolServiceServicer_to_server(PoolServicer(backend, auth, mtls=mtls and tls is not None), server)
    # Health Watch streams are long-lived: serve them off the request pool.
    health_servicer = health.HealthServicer(
        experimental_non_blocking=True,
        experimental_thread_pool=futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="health"))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        port = server.add_secure_port(listen_addr, tls) if tls is not None else server.add_insecure_port(listen_addr)
    except RuntimeError as exc:
        raise ServerError(f"{ServerError.__doc__} ({listen_addr}: {exc})") from exc
    if port == 0:
        raise ServerError(f"{ServerError.__doc__} (cannot listen on {listen_addr})")
    server.start()
    log.info("PoolService listening on %s (port %d)", listen_addr, port)
    return server, port


def serve(backend: PoolBackend, listen_addr: str, *, max_workers: int = 16,
          auth: Authenticator | None = None, tls: grpc.ServerCredentials | None = None,
          mtls: bool = False) -> grpc.Server:
    """Start PoolService (with health checking and reflection) on ``listen_addr``."""
    return start(backend, listen_addr, max_workers=max_workers, auth=auth, tls=tls, mtls=mtls)[0]

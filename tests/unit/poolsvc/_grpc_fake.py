"""A dict-based PoolBackend for the gRPC servicer and CLI tests, and an in-process server.

It records every call (with the deadline and cancellation event the servicer
passed), can be told to fail a method with a given error (``fail``) or to
wait in it (``hold``), and runs a few scripted commands in Exec.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Mapping, Sequence

import grpc
import pytest

from poolsvc import proto
from poolsvc.api_types import (
    AlreadyExists,
    ExecChunk,
    FailedPrecondition,
    NotFound,
    PoolStatusInfo,
    SandboxInfo,
    SandboxState,
    TemplateInfo,
    TemplateSpec,
    TemplateState,
)
from poolsvc.server import start

DEFAULT_TTL = 300.0


@dataclass
class Call:
    method: str
    args: dict[str, Any]
    deadline: float | None
    cancelled: threading.Event
    #: set once a held method stops waiting; .woke_by_cancel tells why
    done: threading.Event = field(default_factory=threading.Event)
    woke_by_cancel: bool = False


class FakeBackend:
    """Templates, pools and sandboxes in dicts; behaviour switches for tests."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.templates: dict[str, TemplateInfo] = {}
        self.pools: dict[str, PoolStatusInfo] = {}
        self.sandboxes: dict[str, SandboxInfo] = {}
        self.idempotent: dict[str, str] = {}
        self.calls: list[Call] = []
        self.released: list[str] = []
        #: method name -> error it raises
        self.fail: dict[str, Exception] = {}
        #: method name -> seconds it waits on the call's cancellation event first
        self.hold: dict[str, float] = {}
        #: method name -> seconds it sleeps first, deaf to cancellation
        self.sleep: dict[str, float] = {}
        #: Exec generators that ran their cleanup (argv[0] of each)
        self.exec_closed: list[str] = []
        self.exec_closed_event = threading.Event()
        #: (sandbox id, path) -> bytes: the sandboxes' files for ReadFile/WriteFile
        self.files: dict[tuple[str, str], bytes] = {}
        self.read_closed = threading.Event()
        self._n = 0

    def __repr__(self) -> str:
        return f"<FakeBackend templates={len(self.templates)} sandboxes={len(self.sandboxes)}>"

    def _enter(self, method: str, deadline: float | None, cancelled: threading.Event,
               **args: Any) -> Call:
        call = Call(method, args, deadline, cancelled)
        with self.lock:
            self.calls.append(call)
        if method in self.hold:
            call.woke_by_cancel = cancelled.wait(self.hold[method])
        if method in self.sleep:
            time.sleep(self.sleep[method])
        call.done.set()
        if method in self.fail:
            raise self.fail[method]
        return call

    def last(self, method: str) -> Call:
        return [c for c in self.calls if c.method == method][-1]

    # -- sandboxes

    def acquire(self, template: str, *, lease_ttl: float | None, metadata: Mapping[str, str],
                idempotency_key: str | None, deadline: float | None,
                cancelled: threading.Event) -> SandboxInfo:
        self._enter("acquire", deadline, cancelled, template=template, lease_ttl=lease_ttl,
                    metadata=dict(metadata), idempotency_key=idempotency_key)
        with self.lock:
            if template not in self.templates:
                raise NotFound(f"no template {template!r}")
            if idempotency_key and idempotency_key in self.idempotent:
                return self.sandboxes[self.idempotent[idempotency_key]]
            self._n += 1
            sid = f"sb-{self._n}"
            info = SandboxInfo(id=sid, template=template, state=SandboxState.LEASED,
                               vsock_uds_path=f"/run/ember/{sid}/v.sock", agent_port=52,
                               ip_address=f"10.0.0.{self._n}", tap=f"tap{self._n}",
                               lease_deadline=time.time() + (lease_ttl or DEFAULT_TTL),
                               metadata=dict(metadata))
            self.sandboxes[sid] = info
            if idempotency_key:
                self.idempotent[idempotency_key] = sid
            pool = self.pools.get(template)
            if pool is not None:
                self.pools[template] = replace(pool, leased=pool.leased + 1,
                                               launches_total=pool.launches_total + 1)
            return info

    def release(self, sandbox_id: str, *, deadline: float | None, cancelled: threading.Event) -> None:
        self._enter("release", deadline, cancelled, sandbox_id=sandbox_id)
        with self.lock:
            if self.sandboxes.pop(sandbox_id, None) is None:
                raise NotFound(f"no sandbox {sandbox_id!r}")
            self.released.append(sandbox_id)

    def get(self, sandbox_id: str, *, deadline: float | None, cancelled: threading.Event) -> SandboxInfo:
        self._enter("get", deadline, cancelled, sandbox_id=sandbox_id)
        try:
            return self.sandboxes[sandbox_id]
        except KeyError:
            raise NotFound(f"no sandbox {sandbox_id!r}") from None

    def list_sandboxes(self, template: str | None, *, deadline: float | None,
                       cancelled: threading.Event) -> Sequence[SandboxInfo]:
        self._enter("list_sandboxes", deadline, cancelled, template=template)
        return [s for s in self.sandboxes.values() if template is None or s.template == template]

    def exec(self, sandbox_id: str, argv: Sequence[str], *, stdin: bytes, env: Mapping[str, str],
             timeout: float | None, deadline: float | None,
             cancelled: threading.Event) -> Iterator[ExecChunk]:
        self._enter("exec", deadline, cancelled, sandbox_id=sandbox_id, argv=list(argv),
                    stdin=stdin, env=dict(env), timeout=timeout)
        if sandbox_id not in self.sandboxes:
            raise NotFound(f"no sandbox {sandbox_id!r}")
        return self._run(list(argv), stdin, dict(env), cancelled)

    def _run(self, argv: list[str], stdin: bytes, env: dict[str, str],
             cancelled: threading.Event) -> Iterator[ExecChunk]:
        try:
            cmd = argv[0]
            if cmd == "echo":
                yield ExecChunk(stdout=(" ".join(argv[1:]) + "\n").encode())
                yield ExecChunk(exit_code=0)
            elif cmd == "fail":
                yield ExecChunk(stdout=b"partial\n")
                yield ExecChunk(stderr=b"boom\n")
                yield ExecChunk(exit_code=3)
            elif cmd == "cat":
                yield ExecChunk(stdout=stdin)
                yield ExecChunk(exit_code=0)
            elif cmd == "env":
                yield ExecChunk(stdout="".join(f"{k}={v}\n" for k, v in sorted(env.items())).encode())
                yield ExecChunk(exit_code=0)
            elif cmd == "sleep":
                yield ExecChunk(exit_code=-9, timed_out=True)
            elif cmd == "killed":
                yield ExecChunk(exit_code=-9)
            elif cmd == "forever":  # output that never ends, deaf to cancellation
                while True:
                    yield ExecChunk(stdout=b"tick\n")
                    time.sleep(0.01)
            elif cmd == "block":  # no output until the call ends
                cancelled.wait(30)
                yield ExecChunk(exit_code=0)
            elif cmd == "noexit":
                yield ExecChunk(stdout=b"x")
            elif cmd == "explode":
                yield ExecChunk(stdout=b"x")
                raise FailedPrecondition("the agent went away")
            else:
                yield ExecChunk(stderr=f"{cmd}: not found\n".encode())
                yield ExecChunk(exit_code=127)
        finally:
            self.exec_closed.append(argv[0])
            self.exec_closed_event.set()

    def read_file(self, sandbox_id: str, path: str, *, deadline: float | None,
                  cancelled: threading.Event) -> Iterator[bytes]:
        self._enter("read_file", deadline, cancelled, sandbox_id=sandbox_id, path=path)
        if sandbox_id not in self.sandboxes:
            raise NotFound(f"no sandbox {sandbox_id!r}")
        if path == "/dev/forever":  # never ends, deaf to cancellation: the servicer must stop pulling
            return self._forever()
        try:
            data = self.files[(sandbox_id, path)]
        except KeyError:
            raise NotFound(f"no file {path!r}") from None
        return iter([data[i:i + 65536] for i in range(0, len(data), 65536)])

    def _forever(self) -> Iterator[bytes]:
        try:
            while True:
                yield b"z" * 65536
                time.sleep(0.01)
        finally:
            self.read_closed.set()

    def write_file(self, sandbox_id: str, path: str, chunks: Iterator[bytes], *, mode: int,
                   deadline: float | None, cancelled: threading.Event) -> int:
        self._enter("write_file", deadline, cancelled, sandbox_id=sandbox_id, path=path, mode=mode)
        if sandbox_id not in self.sandboxes:
            raise NotFound(f"no sandbox {sandbox_id!r}")
        data = b"".join(chunks)
        self.files[(sandbox_id, path)] = data
        return len(data)

    # -- templates

    def create_template(self, spec: TemplateSpec, *, deadline: float | None,
                        cancelled: threading.Event) -> TemplateInfo:
        self._enter("create_template", deadline, cancelled, spec=spec)
        with self.lock:
            if spec.name in self.templates:
                raise AlreadyExists(f"template {spec.name!r} exists")
            info = TemplateInfo(name=spec.name, state=TemplateState.READY, vcpus=spec.vcpus or 1,
                                mem_mib=spec.mem_mib or 128, created=1_700_000_000.25,
                                kernel=spec.kernel or "", rootfs=spec.rootfs or "",
                                initrd=spec.initrd or "", boot_args=spec.boot_args or "")
            self.templates[spec.name] = info
            return info

    def list_templates(self, *, deadline: float | None,
                       cancelled: threading.Event) -> Sequence[TemplateInfo]:
        self._enter("list_templates", deadline, cancelled)
        return list(self.templates.values())

    def delete_template(self, name: str, *, deadline: float | None, cancelled: threading.Event) -> None:
        self._enter("delete_template", deadline, cancelled, name=name)
        with self.lock:
            if name not in self.templates:
                raise NotFound(f"no template {name!r}")
            if any(s.template == name for s in self.sandboxes.values()):
                raise FailedPrecondition(f"template {name!r} has leased sandboxes")
            del self.templates[name]
            self.pools.pop(name, None)

    # -- pools

    def set_pool(self, template: str, min_warm: int, max_warm: int, *, deadline: float | None,
                 cancelled: threading.Event) -> PoolStatusInfo:
        self._enter("set_pool", deadline, cancelled, template=template, min_warm=min_warm,
                    max_warm=max_warm)
        with self.lock:
            if template not in self.templates:
                raise NotFound(f"no template {template!r}")
            old = self.pools.get(template, PoolStatusInfo(template, 0, 0))
            self.pools[template] = replace(old, min_warm=min_warm, max_warm=max_warm, warm=min_warm)
            return self.pools[template]

    def pool_status(self, template: str, *, deadline: float | None,
                    cancelled: threading.Event) -> PoolStatusInfo:
        self._enter("pool_status", deadline, cancelled, template=template)
        try:
            return self.pools[template]
        except KeyError:
            raise NotFound(f"no pool for {template!r}") from None

    def list_pools(self, *, deadline: float | None,
                   cancelled: threading.Event) -> Sequence[PoolStatusInfo]:
        self._enter("list_pools", deadline, cancelled)
        return list(self.pools.values())


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def server(backend: FakeBackend) -> Iterator[str]:
    """An in-process PoolService on a free port over ``backend``: its address."""
    srv, port = start(backend, "127.0.0.1:0", max_workers=8)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        srv.stop(0).wait(5)


@pytest.fixture
def pb() -> Any:
    return proto.load()[0]


@pytest.fixture
def stub(server: str) -> Iterator[Any]:
    _, pb2_grpc = proto.load()
    with grpc.insecure_channel(server) as channel:
        yield pb2_grpc.PoolServiceStub(channel)


__all__ = ["Call", "FakeBackend", "backend", "pb", "server", "stub"]

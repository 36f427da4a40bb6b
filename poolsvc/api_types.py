"""The pool service's API in plain Python: what the gRPC servicer and a backend exchange.

Protobuf types stop at the servicer (`poolsvc.server`); everything behind it
speaks these frozen dataclasses and raises the `PoolError` family below, each
of which the servicer maps to the gRPC status code of the same meaning, with
the message as the status details. Times are floats: wall-clock instants are
UNIX seconds (``time.time()``), durations are seconds.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Mapping

#: The tenant that owns everything when the service has no tenants file (and
#: the templates kept directly under ``$EMBER_HOME/templates``).
DEFAULT_TENANT = "default"


class SandboxState(enum.Enum):
    """Where a sandbox is in its life (proto ``SandboxState``)."""

    RESTORING = "restoring"
    WARM = "warm"
    LEASED = "leased"
    RELEASING = "releasing"


class TemplateState(enum.Enum):
    """Where a template is in its life (proto ``TemplateState``)."""

    CREATING = "creating"
    READY = "ready"
    FAILED = "failed"
    DELETING = "deleting"


@dataclass(frozen=True)
class SandboxInfo:
    """A sandbox as clients see it."""

    id: str
    template: str
    state: SandboxState
    #: The guest agent: the VMM's vsock Unix socket and the agent's port.
    vsock_uds_path: str = ""
    agent_port: int = 0
    ip_address: str = ""
    tap: str = ""
    #: UNIX seconds; None when not leased.
    lease_deadline: float | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    #: The tenant that owns it ("": not said).
    tenant: str = ""


@dataclass(frozen=True)
class TemplateSpec:
    """What CreateTemplate asks for; None: the service's default."""

    name: str
    kernel: str | None = None
    rootfs: str | None = None
    initrd: str | None = None
    boot_args: str | None = None
    vcpus: int | None = None
    mem_mib: int | None = None


@dataclass(frozen=True)
class TemplateInfo:
    """A template as clients see it."""

    name: str
    state: TemplateState
    vcpus: int
    mem_mib: int
    #: UNIX seconds.
    created: float
    kernel: str = ""
    rootfs: str = ""
    initrd: str = ""
    boot_args: str = ""
    #: The tenant that owns it ("": not said).
    tenant: str = ""


@dataclass(frozen=True)
class PoolStatusInfo:
    """One template's pool: its bounds, its counts and its lifetime counters."""

    template: str
    min_warm: int
    max_warm: int
    warm: int = 0
    leased: int = 0
    restoring: int = 0
    launches_total: int = 0
    failures_total: int = 0
    #: The tenant that owns the template ("": not said).
    tenant: str = ""
    #: Restores per second over the last minute (the runtime's meter; 0 from the pure machine).
    launch_rate: float = 0.0
    #: Guest memory committed to the pool's sandboxes (warm, leased, restoring), MiB.
    mem_mib: int = 0


@dataclass(frozen=True)
class Quota:
    """What one tenant may hold at once; None: no limit of its own (the host's still applies).

    `max_sandboxes`: sandboxes leased (or being acquired); `max_templates`:
    templates; `max_mem_mib`: guest memory of all its microVMs, warm ones
    included, counted like the host budget (from restore start to destroyed).
    """

    max_sandboxes: int | None = None
    max_templates: int | None = None
    max_mem_mib: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_sandboxes", "max_templates", "max_mem_mib"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise InvalidArgument(f"quota {name} must be a whole number >= 0, got {value!r}")


@dataclass(frozen=True)
class ExecChunk:
    """One piece of an Exec stream: exactly one of the fields is set.

    A stream is any number of stdout/stderr chunks, then one exit chunk.
    """

    stdout: bytes | None = None
    stderr: bytes | None = None
    exit_code: int | None = None
    timed_out: bool = False

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.stdout, self.stderr, self.exit_code)) != 1:
            raise ValueError("an ExecChunk carries exactly one of stdout, stderr, exit_code")


class PoolError(Exception):
    """The pool service could not do what was asked."""


class NotFound(PoolError):
    """No such template or sandbox."""


class AlreadyExists(PoolError):
    """A template of that name already exists."""


class ResourceExhausted(PoolError):
    """The host has no room for another microVM."""


class QuotaExceeded(ResourceExhausted):
    """The tenant's quota does not allow it."""


class Unauthenticated(PoolError):
    """The call carries no valid credentials."""


class PermissionDenied(PoolError):
    """The caller may not do that (e.g. it is another tenant's sandbox)."""


class InvalidArgument(PoolError):
    """The request is malformed."""


class FailedPrecondition(PoolError):
    """The request does not fit the current state (e.g. the template is not ready)."""


class DeadlineExceeded(PoolError):
    """The call's deadline passed before the work was done."""


class Unavailable(PoolError):
    """The service cannot take the request now (starting or draining); retry later."""

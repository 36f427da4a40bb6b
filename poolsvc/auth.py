"""Tenants and credentials of the pool service: who is calling, and what they may hold.

Primer. A *tenant* owns templates and the sandboxes cloned from them. The
service learns its tenants from a JSON file (``ember serve --tenants FILE``,
default ``$EMBER_HOME/tenants.json`` when it exists)::

    {"tenants": {
        "alice": {"tokens_sha256": ["<64 hex digits>"],
                  "client_names": ["alice.clients.example"],
                  "quota": {"max_sandboxes": 20, "max_templates": 4, "max_mem_mib": 8192}},
        "ops":   {"role": "admin", "tokens_sha256": ["<64 hex digits>"]}}}

A caller proves who it is in one of two ways:

* a bearer token in the call's metadata, ``authorization: Bearer <token>``;
  the file keeps only SHA-256 hashes of tokens (`token_sha256`), and the
  check compares the caller's hash with every stored one in constant time
  (``hmac.compare_digest``, no early exit), so timing tells nothing about
  which tenant or how many bytes matched;
* a TLS client certificate (mTLS, ``--tls-client-ca``): the TLS handshake
  verifies it against the client CA, and its subject CN or any subject
  alternative name that equals one of a tenant's ``client_names`` names
  that tenant.

A token, when present, decides (an invalid one is UNAUTHENTICATED even with
a good certificate); otherwise the certificate does. No credentials:
UNAUTHENTICATED. ``"role": "admin"`` tenants see and manage every tenant's
sandboxes, templates and pools.

Without a tenants file there is one implicit tenant, ``default``, that owns
everything (the service as it was before tenants) — allowed only where
nobody else can connect: `check_exposure` refuses a non-loopback listen
address then, unless client certificates are required or ``--insecure`` is
given. Bearer tokens off loopback need TLS for the same reason.

Namespaces. A template's name is only unique within its tenant; the pool
machine knows each pool by a key, `pool_key` (``tenant/name``; the default
tenant's templates keep their bare names, as before tenants). Templates of
different tenants are different files, so clones share template memory
copy-on-write only with clones of the same tenant (docs/pool.md, Security).

The client side is here too: `client_channel` (TLS, client certificate,
and a bearer token attached to every call).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, Sequence

import grpc

from .api_types import DEFAULT_TENANT, InvalidArgument, PermissionDenied, Quota, Unauthenticated

__all__ = [
    "AuthError",
    "Authenticator",
    "Caller",
    "IMPLICIT_CALLER",
    "ImplicitTenant",
    "InsecureListen",
    "TENANT_NAME_RE",
    "Tenant",
    "TenantRegistry",
    "TenantsFileError",
    "TlsFileError",
    "check_exposure",
    "client_channel",
    "is_loopback",
    "pool_key",
    "server_credentials",
    "split_pool_key",
    "token_sha256",
]

#: Tenant names end up in directory names and pool keys.
TENANT_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_SHA256_HEX_RE = re.compile(r"[0-9a-f]{64}")
_BEARER_RE = re.compile(r"bearer[ \t]+(\S+)[ \t]*", re.IGNORECASE)
#: Metadata key of the bearer token (gRPC lowercases keys).
AUTHORIZATION = "authorization"
ROLES = ("tenant", "admin")


class AuthError(Exception):
    """The service's security configuration is unusable."""


class TenantsFileError(AuthError):
    """The tenants file is malformed."""


class TlsFileError(AuthError):
    """A TLS certificate or key file cannot be read."""


class InsecureListen(AuthError):
    """Refusing to listen where others can connect without authentication."""


# ---- who is calling -------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: the tenant whose namespace it acts in, and whether it is an admin.

    `via`: how it proved it (``token``, ``mtls``, ``implicit``) — for logs.
    """

    tenant: str
    admin: bool = False
    via: str = "token"

    def acting_for(self, tenant: str | None) -> "Caller":
        """The caller acting in `tenant`'s namespace (None or its own: unchanged).

        Only admins may act for another tenant: PermissionDenied otherwise,
        InvalidArgument for a malformed name.
        """
        if not tenant or tenant == self.tenant:
            return self
        if not TENANT_NAME_RE.fullmatch(tenant):
            raise InvalidArgument(f"tenant {tenant!r} does not match {TENANT_NAME_RE.pattern}")
        if not self.admin:
            raise PermissionDenied(f"tenant {self.tenant!r} may not act for tenant {tenant!r}")
        return replace(self, tenant=tenant)

    def sees(self, owner: str) -> bool:
        """May this caller see and manage something `owner` owns?"""
        return self.admin or owner == self.tenant

    def check_owner(self, owner: str, what: str) -> None:
        """PermissionDenied unless the caller may manage `what`, which `owner` owns."""
        if not self.sees(owner):
            raise PermissionDenied(f"{what} belongs to another tenant")


#: The caller of a service without a tenants file: the default tenant, with every right.
IMPLICIT_CALLER = Caller(DEFAULT_TENANT, admin=True, via="implicit")


@dataclass(frozen=True)
class Tenant:
    """One tenant of the tenants file."""

    name: str
    admin: bool = False
    #: SHA-256 digests (32 bytes each) of its bearer tokens.
    token_hashes: tuple[bytes, ...] = ()
    #: Client-certificate CNs / SANs that authenticate it.
    client_names: tuple[str, ...] = ()
    quota: Quota = field(default_factory=Quota)

    def __repr__(self) -> str:
        return (f"<Tenant {self.name}{' admin' if self.admin else ''} tokens={len(self.token_hashes)} "
                f"client_names={len(self.client_names)} {self.quota}>")


class Authenticator(Protocol):
    """Resolves a call's credentials to a `Caller`; raises Unauthenticated."""

    def authenticate(self, metadata: Iterable[tuple[str, Any]], peer_names: Sequence[str]) -> Caller:
        """`metadata`: the call's invocation metadata; `peer_names`: the verified client
        certificate's CN and SANs (empty without mTLS)."""
        ...

    def tenants(self) -> Sequence[Tenant]:
        """Every configured tenant (their quotas apply)."""
        ...


class ImplicitTenant:
    """No tenants file: every caller is the default tenant (`IMPLICIT_CALLER`)."""

    def authenticate(self, metadata: Iterable[tuple[str, Any]], peer_names: Sequence[str]) -> Caller:
        return IMPLICIT_CALLER

    def tenants(self) -> Sequence[Tenant]:
        return ()

    def __repr__(self) -> str:
        return "<ImplicitTenant default>"


def token_sha256(token: str) -> str:
    """The hex SHA-256 of a bearer token, as the tenants file stores it."""
    return hashlib.sha256(token.encode()).hexdigest()


def bearer_token(metadata: Iterable[tuple[str, Any]]) -> str | None:
    """The token of the call's ``authorization: Bearer <token>``; None if there is none.

    Raises Unauthenticated for a malformed or repeated header.
    """
    values = [v for k, v in metadata if k.lower() == AUTHORIZATION]
    if not values:
        return None
    if len(values) > 1:
        raise Unauthenticated("more than one authorization header")
    value = values[0].decode(errors="replace") if isinstance(values[0], bytes) else str(values[0])
    m = _BEARER_RE.fullmatch(value)
    if m is None:
        raise Unauthenticated("the authorization header is not 'Bearer <token>'")
    return m.group(1)


class TenantRegistry:
    """The tenants file, parsed and checked; an `Authenticator`."""

    def __init__(self, tenants: Iterable[Tenant]) -> None:
        self._tenants: dict[str, Tenant] = {}
        self._token_table: list[tuple[bytes, str]] = []
        self._names: dict[str, str] = {}
        for t in tenants:
            if not TENANT_NAME_RE.fullmatch(t.name):
                raise TenantsFileError(f"tenant name {t.name!r} does not match {TENANT_NAME_RE.pattern}")
            if t.name in self._tenants:
                raise TenantsFileError(f"tenant {t.name!r} appears twice")
            self._tenants[t.name] = t
            for h in t.token_hashes:
                if len(h) != 32:
                    raise TenantsFileError(f"tenant {t.name!r}: a token hash is not 32 bytes")
                if any(hmac.compare_digest(h, other) for other, _ in self._token_table):
                    raise TenantsFileError(f"tenant {t.name!r}: a token hash is used twice")
                self._token_table.append((h, t.name))
            for name in t.client_names:
                if name in self._names:
                    raise TenantsFileError(f"client name {name!r} names tenants {self._names[name]!r} "
                                           f"and {t.name!r}")
                self._names[name] = t.name
        if not self._tenants:
            raise TenantsFileError("the tenants file names no tenant")

    @classmethod
    def load(cls, path: str | Path) -> "TenantRegistry":
        """Read a tenants file; TenantsFileError if it is missing or malformed."""
        try:
            doc = json.loads(Path(path).read_text())
        except OSError as exc:
            raise TenantsFileError(f"cannot read the tenants file {path}: {exc}") from exc
        except ValueError as exc:
            raise TenantsFileError(f"the tenants file {path} is not JSON: {exc}") from exc
        try:
            return cls.from_doc(doc)
        except TenantsFileError as exc:
            raise TenantsFileError(f"{path}: {exc}") from None

    @classmethod
    def from_doc(cls, doc: Any) -> "TenantRegistry":
        """A registry from the tenants file's JSON document (unknown keys are refused)."""
        if not isinstance(doc, dict) or set(doc) != {"tenants"} or not isinstance(doc["tenants"], dict):
            raise TenantsFileError('the tenants file must be {"tenants": {NAME: {...}, ...}}')
        return cls(_parse_tenant(name, body) for name, body in doc["tenants"].items())

    def tenants(self) -> Sequence[Tenant]:
        return list(self._tenants.values())

    def get(self, name: str) -> Tenant | None:
        return self._tenants.get(name)

    def authenticate(self, metadata: Iterable[tuple[str, Any]], peer_names: Sequence[str]) -> Caller:
        token = bearer_token(metadata)
        if token is not None:
            name = self._by_token(token)
            if name is None:
                raise Unauthenticated("the bearer token is not valid")
            return self._caller(name, "token")
        for peer in peer_names:
            name = self._names.get(peer)
            if name is not None:
                return self._caller(name, "mtls")
        if peer_names:
            raise Unauthenticated("the client certificate names no tenant")
        raise Unauthenticated("no credentials: send 'authorization: Bearer <token>' or a client certificate")

    def _by_token(self, token: str) -> str | None:
        digest = hashlib.sha256(token.encode()).digest()
        found: str | None = None
        for stored, name in self._token_table:  # every entry, no early exit: constant time
            if hmac.compare_digest(digest, stored):
                found = name
        return found

    def _caller(self, name: str, via: str) -> Caller:
        return Caller(name, admin=self._tenants[name].admin, via=via)

    def __repr__(self) -> str:
        admins = sum(t.admin for t in self._tenants.values())
        return f"<TenantRegistry tenants={len(self._tenants)} admins={admins}>"


def _parse_tenant(name: Any, body: Any) -> Tenant:
    where = f"tenant {name!r}"
    if not isinstance(name, str) or not TENANT_NAME_RE.fullmatch(name):
        raise TenantsFileError(f"{where}: the name must match {TENANT_NAME_RE.pattern}")
    if not isinstance(body, dict):
        raise TenantsFileError(f"{where}: must be an object")
    unknown = set(body) - {"role", "tokens_sha256", "client_names", "quota"}
    if unknown:
        raise TenantsFileError(f"{where}: unknown keys {sorted(unknown)}")
    role = body.get("role", "tenant")
    if role not in ROLES:
        raise TenantsFileError(f"{where}: role must be one of {ROLES}, got {role!r}")
    hashes = _str_list(body.get("tokens_sha256", []), f"{where} tokens_sha256")
    for h in hashes:
        if not _SHA256_HEX_RE.fullmatch(h):
            raise TenantsFileError(f"{where}: {h!r} is not a SHA-256 in lowercase hex")
    names = _str_list(body.get("client_names", []), f"{where} client_names")
    if not hashes and not names:
        raise TenantsFileError(f"{where}: no credentials (tokens_sha256 or client_names)")
    quota_doc = body.get("quota", {})
    if not isinstance(quota_doc, dict):
        raise TenantsFileError(f"{where}: quota must be an object")
    unknown = set(quota_doc) - {"max_sandboxes", "max_templates", "max_mem_mib"}
    if unknown:
        raise TenantsFileError(f"{where}: unknown quota keys {sorted(unknown)}")
    try:
        quota = Quota(**quota_doc)
    except InvalidArgument as exc:
        raise TenantsFileError(f"{where}: {exc}") from None
    return Tenant(name, admin=role == "admin", token_hashes=tuple(bytes.fromhex(h) for h in hashes),
                  client_names=tuple(names), quota=quota)


def _str_list(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise TenantsFileError(f"{what} must be a list of non-empty strings")
    return value


# ---- namespaces ----------------------------------------------------------------------


def pool_key(tenant: str, name: str) -> str:
    """The pool machine's key of `tenant`'s template `name` (the default tenant's: `name`)."""
    return name if tenant == DEFAULT_TENANT else f"{tenant}/{name}"


def split_pool_key(key: str) -> tuple[str, str]:
    """``(tenant, template name)`` of a `pool_key`; template names never contain '/'."""
    tenant, sep, name = key.partition("/")
    return (tenant, name) if sep else (DEFAULT_TENANT, key)


# ---- where the service may listen ----------------------------------------------------


def is_loopback(listen: str) -> bool:
    """Does `listen` (``host:port``, ``[v6]:port``, ``unix:PATH``) accept only local connections?"""
    if listen.startswith(("unix:", "unix-abstract:")):
        return True
    host = listen.rsplit(":", 1)[0] if ":" in listen else listen
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name, "", 0.0.0.0's spellings: assume reachable


def check_exposure(listen: str, *, tls: bool, client_ca: bool, tenants: bool, insecure: bool) -> None:
    """Raise InsecureListen where the service would be reachable without authentication.

    Off loopback the service needs callers to authenticate — a tenants file
    or required client certificates — and bearer tokens need TLS; both
    rules give way to `insecure`.
    """
    if insecure or is_loopback(listen):
        return
    if not tenants and not client_ca:
        raise InsecureListen(f"{InsecureListen.__doc__} ({listen} is not a loopback address and there is no "
                             "tenants file (--tenants) or client CA (--tls-client-ca); --insecure overrides)")
    if tenants and not tls:
        raise InsecureListen(f"{InsecureListen.__doc__} (bearer tokens would cross the network in clear text "
                             f"on {listen}: give --tls-cert and --tls-key; --insecure overrides)")


# ---- TLS -------------------------------------------------------------------------------


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TlsFileError(f"cannot read the {what} {path}: {exc}") from exc


def server_credentials(cert: str | Path, key: str | Path,
                       client_ca: str | Path | None = None) -> grpc.ServerCredentials:
    """TLS for the server; with `client_ca`, every client must present a certificate it signed."""
    ca = _read(client_ca, "client CA") if client_ca is not None else None
    return grpc.ssl_server_credentials([(_read(key, "TLS key"), _read(cert, "TLS certificate"))],
                                       root_certificates=ca, require_client_auth=ca is not None)


def peer_names(auth_context: Mapping[str, Sequence[bytes]]) -> list[str]:
    """The client certificate's CN and subject alternative names, from a call's auth context."""
    names = []
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        for value in auth_context.get(key, ()):
            names.append(value.decode(errors="replace") if isinstance(value, bytes) else str(value))
    return names


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call (TLS or, on loopback, plaintext)."""

    def __init__(self, token: str) -> None:
        self._header = (AUTHORIZATION, f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        # grpc passes its own _ClientCallDetails, a namedtuple.
        metadata = [m for m in (details.metadata or ()) if m[0] != AUTHORIZATION]
        metadata.append(self._header)
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(details), request_iterator)

    def __repr__(self) -> str:
        return "<BearerToken ***>"


def client_channel(addr: str, *, tls_ca: str | Path | None = None, token: str | None = None,
                   cert: str | Path | None = None, key: str | Path | None = None,
                   tls: bool = False, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A channel to the pool service at `addr`.

    TLS when `tls`, `tls_ca` (the CA that signed the server's certificate;
    None with `tls`: the system's roots) or a client certificate
    (`cert` + `key`, for mTLS) is given; plaintext otherwise. `token` is
    sent as ``authorization: Bearer <token>`` on every call.
    """
    if (cert is None) != (key is None):
        raise TlsFileError("a client certificate needs both --tls-cert and --tls-key")
    if tls or tls_ca is not None or cert is not None:
        creds = grpc.ssl_channel_credentials(
            root_certificates=_read(tls_ca, "TLS CA") if tls_ca is not None else None,
            private_key=_read(key, "TLS key") if key is not None else None,
            certificate_chain=_read(cert, "TLS certificate") if cert is not None else None)
        channel = grpc.secure_channel(addr, creds, options=list(options))
    else:
        channel = grpc.insecure_channel(addr, options=list(options))
    if token:
        channel = grpc.intercept_channel(channel, _BearerToken(token))
    return channel

"""Tenants and credentials: the tenants file, token and certificate checks, where the service may
listen, and the servicer's authentication over plaintext, TLS and mTLS (in process, a recording backend)."""

from __future__ import annotations

import hashlib
import io
import json
import threading
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from poolsvc import auth, proto
from poolsvc.api_types import (
    DEFAULT_TENANT,
    NotFound,
    PermissionDenied,
    PoolStatusInfo,
    Quota,
    SandboxInfo,
    SandboxState,
    Unauthenticated,
)
from poolsvc.auth import (
    IMPLICIT_CALLER,
    Caller,
    InsecureListen,
    TenantRegistry,
    TenantsFileError,
    TlsFileError,
    check_exposure,
    client_channel,
    is_loopback,
    pool_key,
    server_credentials,
    split_pool_key,
    token_sha256,
)
from poolsvc.server import TEMPLATE_NAME_RE, start
from tests.unit.poolsvc._tls import make_pki

SC = grpc.StatusCode
ALICE, BOB, ROOT = "alice-token-0123456789", "bob-token-0123456789", "root-token-0123456789"


def tenants_doc() -> dict[str, Any]:
    return {"tenants": {
        "alice": {"tokens_sha256": [token_sha256(ALICE)], "client_names": ["alice.example"],
                  "quota": {"max_sandboxes": 2, "max_templates": 1, "max_mem_mib": 512}},
        "bob": {"tokens_sha256": [token_sha256(BOB)]},
        "ops": {"role": "admin", "tokens_sha256": [token_sha256(ROOT)]},
    }}


@pytest.fixture
def registry() -> TenantRegistry:
    return TenantRegistry.from_doc(tenants_doc())


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


# ---- the tenants file ---------------------------------------------------------------

def test_registry_reads_tenants_roles_and_quotas(registry: TenantRegistry, tmp_path: Path) -> None:
    alice = registry.get("alice")
    assert alice is not None and not alice.admin
    assert alice.quota == Quota(max_sandboxes=2, max_templates=1, max_mem_mib=512)
    assert alice.token_hashes == (hashlib.sha256(ALICE.encode()).digest(),)
    assert registry.get("bob").quota == Quota() and registry.get("ops").admin
    path = tmp_path / "tenants.json"
    path.write_text(json.dumps(tenants_doc()))
    assert [t.name for t in TenantRegistry.load(path).tenants()] == ["alice", "bob", "ops"]
    assert "tenants=3 admins=1" in repr(registry) and ALICE not in repr(registry.get("alice"))


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(extra=1), "must be"),
    (lambda d: d["tenants"].clear(), "no tenant"),
    (lambda d: d["tenants"].update({"Bad Name": {"tokens_sha256": ["0" * 64]}}), "name must match"),
    (lambda d: d["tenants"]["bob"].update(color="red"), "unknown keys"),
    (lambda d: d["tenants"]["bob"].update(role="root"), "role must be"),
    (lambda d: d["tenants"]["bob"].update(tokens_sha256=["ABC"]), "SHA-256"),
    (lambda d: d["tenants"]["bob"].update(tokens_sha256=[]), "no credentials"),
    (lambda d: d["tenants"]["bob"].update(tokens_sha256=[token_sha256(ALICE)]), "used twice"),
    (lambda d: d["tenants"]["bob"].update(client_names=["alice.example"]), "names tenants"),
    (lambda d: d["tenants"]["bob"].update(quota={"max_sandboxes": -1}), "max_sandboxes"),
    (lambda d: d["tenants"]["bob"].update(quota={"max_cpus": 1}), "unknown quota keys"),
    (lambda d: d["tenants"]["bob"].update(client_names="bob"), "list of non-empty strings"),
])
def test_malformed_tenants_files_are_refused(mutate, message: str) -> None:
    doc = tenants_doc()
    mutate(doc)
    with pytest.raises(TenantsFileError, match=message):
        TenantRegistry.from_doc(doc)


def test_unreadable_tenants_file(tmp_path: Path) -> None:
    with pytest.raises(TenantsFileError, match="cannot read"):
        TenantRegistry.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(TenantsFileError, match="not JSON"):
        TenantRegistry.load(tmp_path / "bad.json")


# ---- authentication -------------------------------------------------------------------

def test_a_token_names_its_tenant(registry: TenantRegistry) -> None:
    assert registry.authenticate(bearer(ALICE), []) == Caller("alice", admin=False, via="token")
    assert registry.authenticate([("authorization", f"bearer  {ROOT} ".encode())], []) == \
        Caller("ops", admin=True, via="token")


@pytest.mark.parametrize("metadata, message", [
    ([], "no credentials"),
    (bearer("not-a-token"), "not valid"),
    (bearer(ALICE + "x"), "not valid"),
    ([("authorization", ALICE)], "Bearer <token>"),
    ([("authorization", f"Basic {ALICE}")], "Bearer <token>"),
    (bearer(ALICE) + bearer(BOB), "more than one"),
])
def test_missing_wrong_or_malformed_tokens_are_unauthenticated(registry, metadata, message) -> None:
    with pytest.raises(Unauthenticated, match=message):
        registry.authenticate(metadata, [])


def test_the_token_check_compares_with_every_stored_hash(registry, monkeypatch) -> None:
    """No early exit: the first tenant's token costs as many comparisons as a wrong one."""
    calls: list[bytes] = []
    real = auth.hmac.compare_digest

    def counting(a, b):
        calls.append(b)
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    registry.authenticate(bearer(ALICE), [])
    first = len(calls)
    calls.clear()
    with pytest.raises(Unauthenticated):
        registry.authenticate(bearer("wrong"), [])
    assert first == len(calls) == 3


def test_certificate_names_map_to_tenants_and_a_token_decides(registry: TenantRegistry) -> None:
    assert registry.authenticate([], ["CN-unknown", "alice.example"]) == Caller("alice", via="mtls")
    with pytest.raises(Unauthenticated, match="names no tenant"):
        registry.authenticate([], ["mallory.example"])
    assert registry.authenticate(bearer(BOB), ["alice.example"]).tenant == "bob"
    with pytest.raises(Unauthenticated, match="not valid"):  # a bad token is not rescued by the cert
        registry.authenticate(bearer("wrong"), ["alice.example"])


def test_callers_act_in_their_namespace_and_admins_in_any() -> None:
    alice, admin = Caller("alice"), Caller("ops", admin=True)
    assert alice.acting_for(None) is alice and alice.acting_for("alice") is alice
    with pytest.raises(PermissionDenied):
        alice.acting_for("bob")
    assert admin.acting_for("bob") == Caller("bob", admin=True)
    with pytest.raises(Exception, match="does not match"):
        admin.acting_for("../etc")
    assert alice.sees("alice") and not alice.sees("bob") and admin.sees("bob")
    with pytest.raises(PermissionDenied, match="another tenant"):
        alice.check_owner("bob", "sandbox sb-1")
    assert IMPLICIT_CALLER.tenant == DEFAULT_TENANT and IMPLICIT_CALLER.admin


@given(tenant=st.from_regex(auth.TENANT_NAME_RE, fullmatch=True),
       name=st.from_regex(TEMPLATE_NAME_RE, fullmatch=True))
def test_pool_keys_round_trip_and_never_collide_across_tenants(tenant: str, name: str) -> None:
    assert split_pool_key(pool_key(tenant, name)) == (tenant, name)
    other = tenant[:-1] + ("y" if tenant[-1] != "y" else "z")  # another valid tenant name ("x" + "x"[:-1] was not)
    assert pool_key(other, name) != pool_key(tenant, name)
    assert pool_key(DEFAULT_TENANT, name) == name


# ---- where the service may listen ----------------------------------------------------

@pytest.mark.parametrize("addr, loopback", [
    ("127.0.0.1:50051", True), ("127.3.2.1:1", True), ("[::1]:50051", True), ("localhost:1", True),
    ("unix:/run/ember.sock", True), ("0.0.0.0:50051", False), ("[::]:50051", False),
    ("10.0.0.5:50051", False), ("pool.example:50051", False), (":50051", False),
])
def test_is_loopback(addr: str, loopback: bool) -> None:
    assert is_loopback(addr) is loopback


def test_exposure_rules() -> None:
    check_exposure("127.0.0.1:1", tls=False, client_ca=False, tenants=False, insecure=False)
    with pytest.raises(InsecureListen, match="no tenants file"):
        check_exposure("0.0.0.0:1", tls=True, client_ca=False, tenants=False, insecure=False)
    with pytest.raises(InsecureListen, match="clear text"):
        check_exposure("0.0.0.0:1", tls=False, client_ca=False, tenants=True, insecure=False)
    check_exposure("0.0.0.0:1", tls=True, client_ca=False, tenants=True, insecure=False)
    check_exposure("0.0.0.0:1", tls=True, client_ca=True, tenants=False, insecure=False)
    check_exposure("0.0.0.0:1", tls=False, client_ca=False, tenants=False, insecure=True)


def test_serve_flags(tmp_path: Path) -> None:
    from poolsvc.cli import build_parser, serve_security

    def flags(*argv: str) -> Any:
        return build_parser().parse_args(["serve", *argv])

    with pytest.raises(InsecureListen):
        serve_security(flags("--listen", "0.0.0.0:1"), tmp_path)
    assert serve_security(flags("--listen", "0.0.0.0:1", "--insecure"), tmp_path) == (None, None, False)
    with pytest.raises(TlsFileError, match="both"):
        serve_security(flags("--tls-cert", "x.pem"), tmp_path)
    pki = make_pki(tmp_path / "pki")
    (tmp_path / "tenants.json").write_text(json.dumps(tenants_doc()))  # picked up from $EMBER_HOME
    reg, tls, mtls = serve_security(flags("--listen", "0.0.0.0:1", "--tls-cert", str(pki.server_cert),
                                          "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca)),
                                    tmp_path)
    assert isinstance(reg, TenantRegistry) and isinstance(tls, grpc.ServerCredentials) and mtls
    with pytest.raises(TlsFileError, match="cannot read"):
        server_credentials(tmp_path / "none.pem", pki.server_key)


# ---- the servicer ----------------------------------------------------------------------

class Recorder:
    """A backend that records each call's caller; sandbox `sb-1` is alice's."""

    def __init__(self) -> None:
        self.callers: list[Any] = []
        self.lock = threading.Lock()

    def _note(self, kw: dict[str, Any]) -> Any:
        with self.lock:
            self.callers.append(kw.get("caller", "<none>"))
        return kw.get("caller")

    def get(self, sandbox_id: str, **kw: Any) -> SandboxInfo:
        caller = self._note(kw)
        if sandbox_id != "sb-1":
            raise NotFound(f"no sandbox {sandbox_id!r}")
        (caller or IMPLICIT_CALLER).check_owner("alice", f"sandbox {sandbox_id}")
        return SandboxInfo(id="sb-1", template="py", state=SandboxState.LEASED, tenant="alice")

    def list_pools(self, **kw: Any) -> list[PoolStatusInfo]:
        caller = self._note(kw)
        return [PoolStatusInfo("py", 0, 1, tenant=caller.tenant if caller else "")]

    def set_pool(self, template: str, min_warm: int, max_warm: int, **kw: Any) -> PoolStatusInfo:
        caller = self._note(kw)
        return PoolStatusInfo(template, min_warm, max_warm, tenant=caller.tenant if caller else "")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def serve(registry: TenantRegistry):
    servers: list[grpc.Server] = []

    def run(backend: Any, **kw: Any) -> str:
        kw.setdefault("auth", registry)
        server, port = start(backend, "127.0.0.1:0", max_workers=4, **kw)
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield run
    for s in servers:
        s.stop(None)


def stub_for(channel: grpc.Channel) -> Any:
    return proto.load()[1].PoolServiceStub(channel)


def rpc_code(fn, *args, **kwargs) -> SC:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, timeout=10, **kwargs)
    return info.value.code()


def test_plaintext_calls_need_a_valid_token(serve) -> None:
    pb2, _ = proto.load()
    backend = Recorder()
    addr = serve(backend)
    with client_channel(addr) as ch:
        assert rpc_code(stub_for(ch).Get, pb2.GetRequest(id="sb-1")) == SC.UNAUTHENTICATED
    with client_channel(addr, token="wrong") as ch:
        assert rpc_code(stub_for(ch).ListPools, pb2.ListPoolsRequest()) == SC.UNAUTHENTICATED
    assert backend.callers == []  # refused before the backend
    with client_channel(addr, token=ALICE) as ch:
        assert stub_for(ch).Get(pb2.GetRequest(id="sb-1"), timeout=10).tenant == "alice"
    with client_channel(addr, token=BOB) as ch:
        assert rpc_code(stub_for(ch).Get, pb2.GetRequest(id="sb-1")) == SC.PERMISSION_DENIED
    assert backend.callers == [Caller("alice"), Caller("bob")]


def test_the_tenant_field_is_for_admins(serve) -> None:
    pb2, _ = proto.load()
    backend = Recorder()
    addr = serve(backend)
    with client_channel(addr, token=BOB) as ch:
        assert rpc_code(stub_for(ch).SetPool, pb2.SetPoolRequest(template="py", max_warm=1, tenant="alice")) \
            == SC.PERMISSION_DENIED
        assert stub_for(ch).SetPool(pb2.SetPoolRequest(template="py", max_warm=1, tenant="bob"),
                                    timeout=10).tenant == "bob"
    with client_channel(addr, token=ROOT) as ch:
        assert stub_for(ch).SetPool(pb2.SetPoolRequest(template="py", max_warm=1, tenant="alice"),
                                    timeout=10).tenant == "alice"
        assert stub_for(ch).Get(pb2.GetRequest(id="sb-1"), timeout=10).id == "sb-1"  # admins see all
    assert backend.callers[-2:] == [Caller("alice", admin=True), Caller("ops", admin=True)]


def test_without_an_authenticator_the_backend_gets_no_caller(serve) -> None:
    pb2, _ = proto.load()
    backend = Recorder()
    addr = serve(backend, auth=None)
    with client_channel(addr) as ch:
        assert stub_for(ch).ListPools(pb2.ListPoolsRequest(), timeout=10).pools[0].tenant == ""
        assert rpc_code(stub_for(ch).SetPool, pb2.SetPoolRequest(template="py", tenant="bob")) \
            == SC.INVALID_ARGUMENT
    assert backend.callers == ["<none>"]


def test_tls_with_a_token_and_plaintext_to_tls_fails(serve, pki) -> None:
    pb2, _ = proto.load()
    addr = serve(Recorder(), tls=server_credentials(pki.server_cert, pki.server_key))
    with client_channel(addr, tls_ca=pki.ca, token=ALICE) as ch:
        assert stub_for(ch).ListPools(pb2.ListPoolsRequest(), timeout=10).pools[0].tenant == "alice"
    with client_channel(addr, tls_ca=pki.ca) as ch:
        assert rpc_code(stub_for(ch).ListPools, pb2.ListPoolsRequest()) == SC.UNAUTHENTICATED
    with client_channel(addr, token=ALICE) as ch:  # plaintext to a TLS port
        assert rpc_code(stub_for(ch).ListPools, pb2.ListPoolsRequest()) == SC.UNAVAILABLE
    other = make_pki(pki.dir / "other", "other")
    with client_channel(addr, tls_ca=other.ca, token=ALICE) as ch:  # a server we do not trust
        assert rpc_code(stub_for(ch).ListPools, pb2.ListPoolsRequest()) == SC.UNAVAILABLE


def test_mtls_maps_the_client_certificate_to_its_tenant(serve, pki) -> None:
    pb2, _ = proto.load()
    backend = Recorder()
    addr = serve(backend, tls=server_credentials(pki.server_cert, pki.server_key, pki.ca), mtls=True)
    cert, key = pki.client("alice.example")
    with client_channel(addr, tls_ca=pki.ca, cert=cert, key=key) as ch:
        assert stub_for(ch).Get(pb2.GetRequest(id="sb-1"), timeout=10).tenant == "alice"
    assert backend.callers == [Caller("alice", via="mtls")]
    with client_channel(addr, tls_ca=pki.ca, cert=cert, key=key, token=BOB) as ch:  # a token decides
        assert rpc_code(stub_for(ch).Get, pb2.GetRequest(id="sb-1")) == SC.PERMISSION_DENIED
    cert, key = pki.client("mallory.example")
    with client_channel(addr, tls_ca=pki.ca, cert=cert, key=key) as ch:
        assert rpc_code(stub_for(ch).Get, pb2.GetRequest(id="sb-1")) == SC.UNAUTHENTICATED
    with client_channel(addr, tls_ca=pki.ca, token=ALICE) as ch:  # no client certificate at all
        assert rpc_code(stub_for(ch).Get, pb2.GetRequest(id="sb-1")) == SC.UNAVAILABLE
    stranger = make_pki(pki.dir / "stranger", "stranger")
    cert, key = pki.client("alice.example", ca=stranger)  # the right name from the wrong CA
    with client_channel(addr, tls_ca=pki.ca, cert=cert, key=key) as ch:
        assert rpc_code(stub_for(ch).Get, pb2.GetRequest(id="sb-1")) == SC.UNAVAILABLE


def test_the_cli_speaks_tls_with_a_token(serve, pki, monkeypatch) -> None:
    from poolsvc.cli import main

    addr = serve(Recorder(), tls=server_credentials(pki.server_cert, pki.server_key))

    def ember(*argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            rc = main(list(argv))
        return rc, out.getvalue(), err.getvalue()

    rc, out, _ = ember("pool", "ls", "--json", "--addr", addr, "--tls-ca", str(pki.ca), "--token", BOB)
    assert rc == 0 and json.loads(out)[0]["tenant"] == "bob"
    monkeypatch.setenv("EMBER_TOKEN", ALICE)
    monkeypatch.setenv("EMBER_TLS_CA", str(pki.ca))
    rc, out, _ = ember("pool", "ls", "--json", "--addr", addr)
    assert rc == 0 and json.loads(out)[0]["tenant"] == "alice"
    monkeypatch.setenv("EMBER_TOKEN", "wrong")
    rc, _, err = ember("pool", "ls", "--addr", addr)
    assert rc == 1 and err.startswith("ember: UNAUTHENTICATED")
    rc, _, err = ember("pool", "ls", "--addr", addr, "--tls-cert", str(pki.server_cert))
    assert rc == 1 and "both" in err

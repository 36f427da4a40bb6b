"""`ember serve` with tenants: TLS, tokens, mTLS, ownership, per-tenant templates and quotas (real KVM).

The template is the freestanding test guest in `agent` mode (boots in well
under a second), so these tests measure the security layer, not a guest.
Certificates are generated per test run (tests/unit/poolsvc/_tls.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc
import pytest

from poolsvc.agent import AgentClient
from poolsvc.auth import client_channel, token_sha256
from tests.integration.pool_harness import REPO_ROOT, Service, free_port
from tests.unit.poolsvc._tls import Pki, make_pki

pytestmark = pytest.mark.kvm

SC = grpc.StatusCode
ALICE, BOB, ROOT = "alice-secret-token-1", "bob-secret-token-22", "ops-secret-token-333"


@pytest.fixture
def home():
    d = Path(tempfile.mkdtemp(prefix="epa-"))  # short: socket paths under it must fit sun_path
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def pki(home: Path) -> Pki:
    return make_pki(home / "pki")


@pytest.fixture
def tenants_file(home: Path) -> Path:
    path = home / "tenants.json"
    path.write_text(json.dumps({"tenants": {
        "alice": {"tokens_sha256": [token_sha256(ALICE)], "quota": {"max_sandboxes": 2, "max_templates": 1}},
        "bob": {"tokens_sha256": [token_sha256(BOB)]},
        "carol": {"client_names": ["carol.example"], "quota": {"max_mem_mib": 64}},
        "ops": {"role": "admin", "tokens_sha256": [token_sha256(ROOT)]},
    }}))
    return path


@pytest.fixture
def service():
    services: list[Service] = []

    def start(home: Path, *extra: str, **kw) -> Service:
        s = Service(home, *extra, **kw)
        services.append(s)
        return s

    yield start
    for s in services:
        s.cleanup()


class As:
    """One tenant's view of the service: a TLS channel with its token (or client certificate)."""

    def __init__(self, svc: Service, pki: Pki, token: str | None = None, cert: tuple[Path, Path] | None = None,
                 tls: bool = True) -> None:
        from poolsvc import proto

        self.pb2, pb2_grpc = proto.load()
        cert_path, key_path = cert if cert is not None else (None, None)
        self.channel = client_channel(svc.addr, tls_ca=pki.ca if tls else None, token=token,
                                      cert=cert_path, key=key_path)
        self.stub = pb2_grpc.PoolServiceStub(self.channel)

    def code(self, method: str, request) -> SC:
        with pytest.raises(grpc.RpcError) as info:
            result = getattr(self.stub, method)(request, timeout=60)
            if hasattr(result, "__next__"):
                list(result)
        return info.value.code(), info.value.details()

    def template(self, name: str, testguest: Path, **kw):
        return self.stub.CreateTemplate(self.pb2.CreateTemplateRequest(
            name=name, kernel=str(testguest), boot_args="mode=agent", vcpus=1, mem_mib=64, **kw), timeout=120)

    def acquire(self, template: str, **kw):
        return self.stub.Acquire(self.pb2.AcquireRequest(template=template, **kw), timeout=60)


def _tls_service(service, home: Path, pki: Pki, tenants_file: Path, *extra: str) -> Service:
    # Unjailed: /proc/PID/maps then shows the host paths of the snapshot files a clone maps.
    return service(home, "--no-jail", "--tenants", str(tenants_file), "--tls-cert", str(pki.server_cert),
                   "--tls-key", str(pki.server_key), *extra,
                   connect=lambda addr: client_channel(addr, tls_ca=pki.ca, token=ROOT))


def test_tokens_over_tls_ownership_per_tenant_templates_and_quotas(service, home, pki, tenants_file,
                                                                   testguest) -> None:
    svc = _tls_service(service, home, pki, tenants_file)
    pb2 = svc.pb2
    alice, bob, admin = As(svc, pki, ALICE), As(svc, pki, BOB), As(svc, pki, ROOT)

    # Authentication: TLS with a token works; no token, a wrong one, or plaintext do not.
    assert list(alice.stub.ListTemplates(pb2.ListTemplatesRequest(), timeout=30).templates) == []
    assert As(svc, pki).code("ListTemplates", pb2.ListTemplatesRequest())[0] == SC.UNAUTHENTICATED
    assert As(svc, pki, "wrong-token").code("ListTemplates", pb2.ListTemplatesRequest())[0] == SC.UNAUTHENTICATED
    assert As(svc, pki, ALICE, tls=False).code("ListTemplates", pb2.ListTemplatesRequest())[0] == SC.UNAVAILABLE

    # Templates are per tenant: the same name twice, in two namespaces, two snapshot files.
    assert alice.template("tg", testguest).tenant == "alice"
    assert bob.template("tg", testguest).tenant == "bob"
    assert bob.template("tb", testguest).tenant == "bob"
    assert (home / "tenants" / "alice" / "templates" / "tg" / "template.json").exists()
    assert (home / "tenants" / "bob" / "templates" / "tg" / "template.json").exists()
    code, details = alice.code("CreateTemplate", pb2.CreateTemplateRequest(
        name="second", kernel=str(testguest), boot_args="mode=agent", mem_mib=64))
    assert code == SC.RESOURCE_EXHAUSTED and "max_templates=1" in details
    assert [t.name for t in alice.stub.ListTemplates(pb2.ListTemplatesRequest(), timeout=30).templates] == ["tg"]
    assert sorted((t.tenant, t.name) for t in admin.stub.ListTemplates(pb2.ListTemplatesRequest(),
                                                                       timeout=30).templates) == \
        [("alice", "tg"), ("bob", "tb"), ("bob", "tg")]

    # B cannot acquire A's template: only its own namespace exists for it.
    assert alice.code("Acquire", pb2.AcquireRequest(template="tb"))[0] == SC.NOT_FOUND

    # The same idempotency key from two tenants: two sandboxes; a retry within a tenant: the same one.
    a = alice.acquire("tg", idempotency_key="job-1")
    b = bob.acquire("tg", idempotency_key="job-1")
    assert a.id != b.id and (a.tenant, b.tenant) == ("alice", "bob") and a.template == b.template == "tg"
    assert alice.acquire("tg", idempotency_key="job-1").id == a.id
    pids = svc.vmm_pids()
    maps_a = Path(f"/proc/{pids[a.id]}/maps").read_text()
    maps_b = Path(f"/proc/{pids[b.id]}/maps").read_text()
    assert str(home / "tenants" / "alice" / "templates" / "tg") in maps_a  # guest memory: alice's snapshot
    assert str(home / "tenants" / "alice") not in maps_b  # bob's clone maps nothing of alice's

    # Another tenant's sandbox is PERMISSION_DENIED for Get, Exec and Release; the lease survives.
    for method, request in (("Get", pb2.GetRequest(id=a.id)), ("Release", pb2.ReleaseRequest(id=a.id)),
                            ("Exec", pb2.ExecRequest(id=a.id, argv=["true"]))):
        code, details = bob.code(method, request)
        assert code == SC.PERMISSION_DENIED and "another tenant" in details, method
    assert alice.stub.Get(pb2.GetRequest(id=a.id), timeout=30).state == pb2.SANDBOX_STATE_LEASED
    assert AgentClient(a.agent.vsock_uds_path, a.agent.port).ping() == "testguest"
    assert [s.id for s in bob.stub.List(pb2.ListRequest(), timeout=30).sandboxes] == [b.id]
    assert {s.id for s in admin.stub.List(pb2.ListRequest(), timeout=30).sandboxes} == {a.id, b.id}
    assert [p.tenant for p in bob.stub.ListPools(pb2.ListPoolsRequest(), timeout=30).pools] == ["bob", "bob"]

    # Quotas: alice may hold 2 sandboxes.
    a2 = alice.acquire("tg")
    code, details = alice.code("Acquire", pb2.AcquireRequest(template="tg"))
    assert code == SC.RESOURCE_EXHAUSTED and "max_sandboxes=2" in details
    bob.acquire("tb")  # bob has no quota of his own

    # Pools: the tenant field is an admin's.
    assert bob.code("SetPool", pb2.SetPoolRequest(template="tg", min_warm=1, max_warm=1,
                                                  tenant="alice"))[0] == SC.PERMISSION_DENIED
    status = admin.stub.SetPool(pb2.SetPoolRequest(template="tg", min_warm=0, max_warm=2, tenant="alice"),
                                timeout=30)
    assert (status.template, status.tenant, status.leased) == ("tg", "alice", 2)

    # Admins may release anyone's sandbox; the owner frees its quota by releasing.
    admin.stub.Release(pb2.ReleaseRequest(id=a2.id), timeout=30)
    alice.stub.Release(pb2.ReleaseRequest(id=a.id), timeout=30)
    assert alice.acquire("tg").tenant == "alice"
    admin.stub.DeleteTemplate(pb2.DeleteTemplateRequest(name="tb", tenant="bob"), timeout=30)
    assert [t.name for t in bob.stub.ListTemplates(pb2.ListTemplatesRequest(), timeout=30).templates] == ["tg"]


def test_mtls_maps_client_certificates_to_tenants(service, home, pki, tenants_file, testguest) -> None:
    svc = _tls_service(service, home, pki, tenants_file, "--tls-client-ca", str(pki.ca))
    pb2 = svc.pb2
    carol = As(svc, pki, cert=pki.client("carol.example"))
    t = carol.template("tc", testguest)
    assert t.tenant == "carol" and (home / "tenants" / "carol" / "templates" / "tc").is_dir()
    s = carol.acquire("tc")
    assert s.tenant == "carol"
    # carol's max_mem_mib=64 is taken by that 64 MiB sandbox: the next restore would exceed it.
    code, details = carol.code("Acquire", pb2.AcquireRequest(template="tc"))
    assert code == SC.RESOURCE_EXHAUSTED and "max_mem_mib=64" in details
    # A token over mTLS still decides; a certificate of no tenant, or none at all, does not pass.
    nobody = pki.client("nobody.example")
    bob = As(svc, pki, BOB, cert=nobody)
    assert bob.code("Get", pb2.GetRequest(id=s.id))[0] == SC.PERMISSION_DENIED
    assert As(svc, pki, cert=nobody).code("Get", pb2.GetRequest(id=s.id))[0] == SC.UNAUTHENTICATED
    assert As(svc, pki, ALICE).code("Get", pb2.GetRequest(id=s.id))[0] == SC.UNAVAILABLE  # no certificate


def test_serve_refuses_an_unauthenticated_non_loopback_listener(home) -> None:
    proc = subprocess.run([sys.executable, "-m", "poolsvc.cli", "serve", "--listen", f"0.0.0.0:{free_port()}"],
                          cwd=REPO_ROOT, env={"EMBER_HOME": str(home), "PATH": "/usr/bin:/bin",
                                              "PYTHONPATH": str(REPO_ROOT)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Refusing to listen" in proc.stderr and "--insecure" in proc.stderr

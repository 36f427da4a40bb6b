"""API fuzzing: schemathesis, driven by Firecracker's OpenAPI file, against a live ``ember-vmm``.

    python -m bench.fuzz.api --requests 100000 [--generated N] [--spec PATH] [--seed K] [--json PATH]

By default every request is a case schemathesis generated, sent as
generated and checked by schemathesis's conformance checks too (~17 ms a
case here, most of it Hypothesis drawing JSON-schema values in Python:
10^5 requests take about half an hour). With ``--generated N`` < ``--requests``
there is a second, faster phase:

1. ``--generated`` cases come straight from schemathesis;
2. the rest of ``--requests`` are recombinations of those cases, ~1 ms
   each: per operation, a generated request with one to three of its body
   fields (or its path id) replaced by values schemathesis generated for
   the same field in other cases, by a value of another field, or
   deleted, or the body swapped for another operation's.

A real ``python -m vmm.main --api-sock SOCK --id fuzz`` runs in a private
temporary directory (its working directory). schemathesis turns every
operation of the spec into a Hypothesis strategy of requests, valid ones
(`GenerationMode.POSITIVE`) and ones that break the schema (`NEGATIVE`);
requests go over the Unix socket through a `requests` adapter (no TCP
bridge). For every response:

* the status is < 500 (the spec lists no 5xx code; its ``default`` answer
  is not taken as permission);
* a 4xx carries a JSON object with a string ``fault_message``;
* the VMM is still alive and answered within ``--request-timeout``.

schemathesis's own conformance checks (status code listed, content type,
response schema) run too and are reported as counts; they are not
failures of this run (Ember answers 400 where the spec has no 4xx, e.g.).

The VMM stays unbootable: no kernel is configured by the harness, so
InstanceStart fails with 400 unless the fuzzer configured a kernel path
that exists; if an InstanceStart or a snapshot load ever succeeds, the
VMM is restarted (its state changed irreversibly). Paths the VMM would
create or write (``log_path``, ``metrics_path``, ``uds_path``,
``snapshot_path``, ``mem_file_path``) are rewritten to stay inside the
temporary directory; paths it only reads are left as generated.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import urllib3
from requests.adapters import HTTPAdapter

from .engine import REPO_ROOT

__all__ = ["ApiFuzzReport", "VmmUnderTest", "UdsAdapter", "run", "main"]

DEFAULT_SPEC = Path("/work/shared/reference/firecracker-api-v1.17.yaml")
# Keys whose value is a path the VMM creates or writes.
_WRITTEN_PATH_KEYS = frozenset({"log_path", "metrics_path", "uds_path", "snapshot_path", "mem_file_path"})
BATCH = 2000


class _UdsConnection(urllib3.connection.HTTPConnection):
    def __init__(self, uds_path: str, **kw: Any) -> None:
        super().__init__("localhost", **kw)
        self.uds_path = uds_path

    def _new_conn(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout if isinstance(self.timeout, (int, float)) else None)
        sock.connect(self.uds_path)
        return sock


class _UdsPool(urllib3.connectionpool.HTTPConnectionPool):
    def __init__(self, uds_path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout, maxsize=1)
        self.uds_path = uds_path

    def _new_conn(self) -> _UdsConnection:
        return _UdsConnection(self.uds_path, timeout=self.timeout.connect_timeout)


class UdsAdapter(HTTPAdapter):
    """A `requests` transport that sends every request to the HTTP server on a Unix socket."""

    def __init__(self, uds_path: str, timeout: float = 10.0) -> None:
        super().__init__()
        self._pool = _UdsPool(uds_path, timeout)

    def get_connection_with_tls_context(self, request: Any, verify: Any, proxies: Any = None,
                                        cert: Any = None) -> _UdsPool:
        return self._pool

    def get_connection(self, url: str, proxies: Any = None) -> _UdsPool:
        return self._pool

    def close(self) -> None:
        self._pool.close()
        super().close()


class VmmUnderTest:
    """One ``python -m vmm.main`` process serving the API at `sock` (restartable)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.sock = str(workdir / "api.sock")
        self.log_path = workdir / "vmm.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.stop()
        if os.path.lexists(self.sock):
            os.unlink(self.sock)
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "vmm.main", "--api-sock", self.sock, "--id", "fuzz"],
                                         cwd=self.workdir, stdout=log, stderr=log, env=env,
                                         start_new_session=True)
        self.starts += 1
        deadline = time.monotonic() + 30
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the VMM did not come up; see {self.log_path}")
            time.sleep(0.02)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def __repr__(self) -> str:
        return f"<VmmUnderTest {self.sock} alive={self.alive} starts={self.starts}>"


@dataclass
class ApiFuzzReport:
    """The run's books (plain data)."""

    requests: int = 0
    seconds: float = 0.0
    statuses: Counter = field(default_factory=Counter)
    by_operation: Counter = field(default_factory=Counter)
    op_seconds: Counter = field(default_factory=Counter)
    failures: dict[str, dict[str, Any]] = field(default_factory=dict)
    conformance: Counter = field(default_factory=Counter)
    generated: int = 0
    vmm_starts: int = 0
    vmm_deaths: int = 0
    hangs: int = 0
    restarts_for_state: int = 0

    @property
    def failure_count(self) -> int:
        return sum(f["count"] for f in self.failures.values())

    def fail(self, key: str, detail: dict[str, Any]) -> None:
        if key in self.failures:
            self.failures[key]["count"] += 1
        else:
            self.failures[key] = {"count": 1, **detail}
            print(f"[api-fuzz] new failure: {key}", file=sys.stderr, flush=True)

    def to_json(self) -> dict[str, Any]:
        return {"requests": self.requests, "generated_by_schemathesis": self.generated,
                "seconds": round(self.seconds, 1),
                "requests_per_s": round(self.requests / self.seconds, 1) if self.seconds else 0,
                "statuses": dict(sorted(self.statuses.items())), "by_operation": dict(self.by_operation),
                "ms_per_request_by_operation": {k: round(1000 * v / max(self.by_operation[k], 1), 2)
                                                for k, v in self.op_seconds.items()},
                "failures": self.failures, "failure_count": self.failure_count,
                "conformance_findings": dict(self.conformance), "vmm_starts": self.vmm_starts,
                "vmm_deaths": self.vmm_deaths, "hangs": self.hangs, "restarts_for_state": self.restarts_for_state}

    def __repr__(self) -> str:
        return f"<ApiFuzzReport requests={self.requests} failures={self.failure_count} deaths={self.vmm_deaths}>"


def _confine(value: Any, root: Path) -> Any:
    """Rewrite written-path values inside `root` (``..`` and leading ``/`` defused), recursively."""
    if isinstance(value, dict):
        return {k: (str(root / "w" / v.lstrip("/").replace("..", "__")) if k in _WRITTEN_PATH_KEYS
                    and isinstance(v, str) and "\0" not in v else _confine(v, root)) for k, v in value.items()}
    if isinstance(value, list):
        return [_confine(v, root) for v in value]
    return value


def _curl(kwargs: dict[str, Any]) -> str:
    body = json.dumps(kwargs["json"]) if "json" in kwargs else ""
    return f"curl --unix-socket SOCK -X {kwargs['method']} {kwargs['url']!r} -d {body[:300]!r}"


class _Recombiner:
    """Variants of schemathesis-generated requests, built from the values schemathesis generated."""

    def __init__(self, pool: list[tuple[str, dict[str, Any]]], rng: random.Random) -> None:
        self.pool, self.rng = pool, rng
        self.by_op: dict[str, list[dict[str, Any]]] = {}
        self.values: dict[str, list[Any]] = {}
        self.any_values: list[Any] = []
        self.bodies: list[Any] = []
        for op, kw in pool:
            self.by_op.setdefault(op, []).append(kw)
            body = kw.get("json")
            if body is not None:
                self.bodies.append(body)
            if isinstance(body, dict):
                for k, v in body.items():
                    self.values.setdefault(k, []).append(v)
                    self.any_values.append(v)
        self.ops = list(self.by_op)

    def next(self) -> tuple[str, dict[str, Any]]:
        rng = self.rng
        op = rng.choice(self.ops)
        base = rng.choice(self.by_op[op])
        kw = dict(base)
        kw["headers"] = dict(base.get("headers") or {})
        body = base.get("json")
        if isinstance(body, dict):
            body = dict(body)
            for _ in range(rng.randint(1, 3)):
                roll = rng.random()
                keys = list(body)
                if keys and roll < 0.45:
                    k = rng.choice(keys)
                    body[k] = rng.choice(self.values.get(k) or self.any_values or [None])
                elif keys and roll < 0.6:
                    del body[rng.choice(keys)]
                elif roll < 0.8 and self.any_values:
                    k = rng.choice(list(self.values) or ["x"])
                    body[k] = rng.choice(self.any_values)
                elif self.bodies:
                    body = rng.choice(self.bodies)
                    break
            kw["json"] = body
        elif self.bodies and rng.random() < 0.3:
            kw["json"] = rng.choice(self.bodies)
        if "{" in op and rng.random() < 0.3:  # another case's path id on this one's body
            other = rng.choice(self.by_op[op])
            kw["url"] = other["url"]
        return op, kw

    def __repr__(self) -> str:
        return f"<_Recombiner ops={len(self.ops)} pool={len(self.pool)}>"


def _normalize(message: str) -> str:
    return re.sub(r"\d+", "N", message)[:120]


def run(n_requests: int, *, generated: int | None = None, spec: Path = DEFAULT_SPEC, seed: int = 0,
        request_timeout: float = 10.0, conformance: bool = True, workdir: Path | None = None) -> ApiFuzzReport:
    """Send `n_requests` requests (`generated` of them straight from schemathesis, default all) to a live VMM."""
    import hypothesis
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    generated = n_requests if generated is None else generated
    own_dir = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="emberapi", dir="/tmp")) if workdir is None else workdir
    (workdir / "w").mkdir(parents=True, exist_ok=True)
    schema = schemathesis.openapi.from_path(str(spec))
    operations = [r.ok() for r in schema.get_all_operations()]
    strategy = st.one_of([op.as_strategy(generation_mode=mode) for op in operations
                          for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)])
    vmm = VmmUnderTest(workdir)
    report = ApiFuzzReport()
    session = requests.Session()

    def connect() -> None:
        nonlocal session
        session.close()
        vmm.start()
        report.vmm_starts = vmm.starts
        session = requests.Session()
        session.mount("http://", UdsAdapter(vmm.sock, request_timeout))

    def restart(reason: str) -> None:
        connect()

    pool: list[tuple[str, dict[str, Any]]] = []  # (operation, transport kwargs) of every generated case

    def one(case: Any) -> None:
        if report.requests >= min(generated, n_requests):
            return
        op = f"{case.method.upper()} {case.operation.path}"
        if isinstance(case.body, (dict, list)):
            case.body = _confine(case.body, workdir)
        kwargs = case.as_transport_kwargs(base_url="http://localhost")
        pool.append((op, kwargs))
        send(op, kwargs, case)

    def send(op: str, kwargs: dict[str, Any], case: Any = None) -> None:
        report.requests += 1
        report.by_operation[op] += 1
        curl = case.as_curl_command() if case is not None else _curl(kwargs)
        t0 = time.perf_counter()
        try:
            response = session.request(**kwargs, timeout=request_timeout)
            report.op_seconds[op] += time.perf_counter() - t0
        except requests.Timeout:
            report.hangs += 1
            report.fail(f"{op}: no answer within {request_timeout:g} s", {"curl": curl})
            restart("hang")
            return
        except (requests.ConnectionError, urllib3.exceptions.HTTPError) as exc:
            if not vmm.alive:
                report.vmm_deaths += 1
                report.fail(f"{op}: the VMM died", {"curl": curl, "log": vmm.log_tail()})
            else:
                report.fail(f"{op}: connection failed: {type(exc).__name__}",
                            {"curl": curl, "error": str(exc)[:500]})
            restart("connection")
            return
        status = response.status_code
        report.statuses[status] += 1
        if status >= 500:
            report.fail(f"{op}: HTTP {status}: {_normalize(response.text)}",
                        {"curl": curl, "body": response.text[:1000]})
        elif status >= 400:
            try:
                body = response.json()
            except ValueError:
                body = None
            if not (isinstance(body, dict) and isinstance(body.get("fault_message"), str)):
                report.fail(f"{op}: HTTP {status} without fault_message",
                            {"curl": curl, "body": response.text[:1000]})
        if conformance and case is not None:
            try:
                case.validate_response(response)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # noqa: BLE001 - schemathesis's FailureGroup: counted, not fatal
                for failure in getattr(exc, "exceptions", [exc]):
                    report.conformance[f"{op}: {getattr(failure, 'title', type(failure).__name__)}"] += 1
        if 200 <= status < 300 and op in ("PUT /actions", "PUT /snapshot/load"):
            info = session.get("http://localhost/", timeout=request_timeout)
            if info.status_code != 200 or info.json().get("state") != "Not started":
                report.restarts_for_state += 1
                restart("state")

    def progress() -> None:
        nonlocal last
        if time.monotonic() - last > 10:
            last = time.monotonic()
            el = last - started
            print(f"[api-fuzz] {report.requests} requests, {report.requests / el:.0f}/s, "
                  f"failures={report.failure_count} deaths={report.vmm_deaths}", file=sys.stderr, flush=True)

    def probe() -> None:
        try:
            answer = session.get("http://localhost/", timeout=request_timeout)
            ok = answer.status_code == 200 and vmm.alive
        except requests.RequestException:
            ok = False
        if not ok:
            report.fail("GET / liveness probe failed", {"log": vmm.log_tail()})
            restart("probe")

    connect()
    started = time.monotonic()
    last = started
    batch = 0
    rng = random.Random(seed)
    try:
        while report.requests < min(generated, n_requests):
            batch += 1

            @settings(max_examples=min(BATCH, min(generated, n_requests) - report.requests), database=None, deadline=None,
                      phases=[Phase.generate], suppress_health_check=list(HealthCheck), derandomize=False)
            @given(case=strategy)
            def fuzz(case: Any) -> None:
                one(case)

            hypothesis.seed(seed * 100003 + batch)(fuzz)()
            probe()
            progress()
        report.generated = report.requests
        recombine = _Recombiner(pool, rng)
        while report.requests < n_requests and pool:
            op, kwargs = recombine.next()
            if isinstance(kwargs.get("json"), (dict, list)):
                kwargs["json"] = _confine(kwargs["json"], workdir)
            send(op, kwargs)
            if report.requests % 1000 == 0:
                probe()
                progress()
        probe()
    finally:
        report.seconds = time.monotonic() - started
        session.close()
        vmm.stop()
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fuzz.api", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=10000)
    p.add_argument("--generated", type=int, default=None,
                   help="requests straight from schemathesis (default: all); the rest are recombinations")
    p.add_argument("--spec", type=Path, default=DEFAULT_SPEC)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-timeout", type=float, default=10.0)
    p.add_argument("--no-conformance", action="store_true", help="skip schemathesis's conformance checks")
    p.add_argument("--json", type=Path, help="write the report here")
    args = p.parse_args(argv)
    report = run(args.requests, generated=args.generated, spec=args.spec, seed=args.seed, request_timeout=args.request_timeout,
                 conformance=not args.no_conformance)
    out = report.to_json()
    print(f"requests={out['requests']} (schemathesis-generated: {out['generated_by_schemathesis']}) seconds={out['seconds']} rate={out['requests_per_s']}/s "
          f"failures={out['failure_count']} vmm_deaths={out['vmm_deaths']} hangs={out['hangs']} "
          f"vmm_starts={out['vmm_starts']}")
    print("statuses:", out["statuses"])
    for key, f in report.failures.items():
        print(f"FAIL x{f['count']}: {key}\n  {f.get('curl', '')[:300]}")
    top = sorted(report.conformance.items(), key=lambda kv: -kv[1])[:15]
    for key, n in top:
        print(f"conformance x{n}: {key}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    return 1 if report.failure_count or report.vmm_deaths else 0


if __name__ == "__main__":
    raise SystemExit(main())

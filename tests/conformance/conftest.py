"""Fixtures for conformance tests: the shared OpenAPI (Swagger 2.0) contract and real `ember-vmm` processes.

* `spec` (session): the contract, ../shared/reference/firecracker-api-v1.17.yaml.
* `validator` (session): `SpecValidator` — checks a response's status and body
  against the operation the request matched in the contract.
* `apiclient` (session): tests/conformance/apiclient.py as a module.
* `testguest` (session): the test guest ELF built from tests/guests.
* `vmm_process(*args, stdin=None)`: a running ``ember-vmm --api-sock``,
  killed at teardown.

Tests marked `@pytest.mark.kvm` are skipped when /dev/kvm is not usable.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
SPEC_PATH = REPO_ROOT.parent / "shared" / "reference" / "firecracker-api-v1.17.yaml"
KVM_DEVICE = "/dev/kvm"


def load_module(name: str, path: Path):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def strip_nulls(value: Any) -> Any:
    """`value` without null members.

    Firecracker (serde) writes an absent optional as ``null``; Swagger 2.0 has
    no ``nullable``, so a strict validator would read ``"balloon": null`` as
    "balloon is not an object". The contract's intent is "absent".
    """
    if isinstance(value, dict):
        return {k: strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [strip_nulls(v) for v in value]
    return value


class SpecValidator:
    """Checks API exchanges against the contract's paths and definitions."""

    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.operations: dict[tuple[str, str], dict] = {}
        self._patterns: list[tuple[re.Pattern, str]] = []
        for template, ops in spec["paths"].items():
            regex = "^" + re.sub(r"\{[^/}]+\}", "[^/]+", template) + "$"
            self._patterns.append((re.compile(regex), template))
            for method, op in ops.items():
                self.operations[(method.upper(), template)] = op

    def template(self, path: str) -> str | None:
        path = path.split("?", 1)[0]
        return next((t for rx, t in self._patterns if rx.match(path)), None)

    def _schema(self, schema: dict) -> dict:
        return {**schema, "definitions": self.spec["definitions"]}

    def check_request(self, method: str, path: str, body: Any) -> None:
        """A request body the tests send as valid must be valid per the contract."""
        op = self.operations[(method, self.template(path))]
        params = [p for p in op.get("parameters", []) if p.get("in") == "body"]
        if params and body is not None:
            jsonschema.Draft4Validator(self._schema(params[0]["schema"])).validate(body)

    def check_response(self, method: str, path: str, status: int, body: bytes) -> str:
        """Validate `status` and `body`; returns the operation's path template."""
        template = self.template(path)
        assert template is not None, f"{path} matches no path of the contract"
        op = self.operations.get((method, template))
        assert op is not None, f"the contract has no {method} {template}"
        responses = {str(k): v for k, v in op["responses"].items()}
        if str(status) in responses:
            response = responses[str(status)]
        else:
            assert status >= 400, f"{method} {path}: a success ({status}) the contract does not declare"
            assert "default" in responses, f"{method} {path}: status {status} is not in the contract"
            response = responses["default"]
        schema = response.get("schema")
        if schema is None:
            assert body == b"", f"{method} {path}: {status} must have no body, got {body[:200]!r}"
            return template
        document = json.loads(body)
        jsonschema.Draft4Validator(self._schema(schema)).validate(strip_nulls(document))
        return template


@pytest.fixture(autouse=True)
def _skip_kvm_tests_without_kvm(request):
    if request.node.get_closest_marker("kvm") and not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        pytest.skip(f"needs {KVM_DEVICE}")


@pytest.fixture(scope="session")
def spec() -> dict:
    with open(SPEC_PATH) as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="session")
def validator(spec: dict) -> SpecValidator:
    return SpecValidator(spec)


@pytest.fixture(scope="session")
def apiclient():
    return load_module("ember_tests_apiclient", HERE / "apiclient.py")


@pytest.fixture(scope="session")
def testguest() -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the test guest")
    build = load_module("ember_tests_guest_build", REPO_ROOT / "tests" / "guests" / "build.py")
    return build.build_testguest()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ember-conf-") as d:  # short: sun_path is 108 bytes
        yield Path(d)


@pytest.fixture
def vmm_process(apiclient, sock_dir: Path):
    procs = []

    def start(*args: str, stdin: int | None = None, wait: bool = True, sock_name: str = "api.sock"):
        p = apiclient.VmmApiProcess(sock_dir, args, stdin=stdin, wait=wait, sock_name=sock_name)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.close()

"""The config types against the Firecracker API spec's `definitions:`.

Reads the Swagger file (``$EMBER_FIRECRACKER_SPEC``, default the shared
reference copy); skipped where it, PyYAML or jsonschema is unavailable.
"""

from __future__ import annotations

import enum
import os
import re
from pathlib import Path
from typing import Any

import pytest

from vmm.config import (
    BalloonConfig,
    BalloonStatsUpdateConfig,
    BalloonUpdateConfig,
    BootSourceConfig,
    CacheType,
    ConfigType,
    CpuConfig,
    CpuidLeafModifier,
    CpuidRegister,
    CpuidRegisterModifier,
    CpuTemplate,
    DriveConfig,
    DrivePatch,
    EntropyConfig,
    HugePages,
    IoEngine,
    LoggerConfig,
    LogLevel,
    MachineConfig,
    MetricsConfig,
    MmdsConfig,
    MmdsVersion,
    MsrModifier,
    NetworkInterfaceConfig,
    NetworkInterfacePatch,
    RateLimiterConfig,
    TokenBucketConfig,
    VmConfig,
    VsockConfig,
)

from .examples import ROUND_TRIP

yaml = pytest.importorskip("yaml")

# The contract lives in the steering repo's shared/, checked out beside this one.
_DEFAULT_SPEC = Path(__file__).resolve().parents[3].parent / "shared" / "reference" / "firecracker-api-v1.17.yaml"
SPEC_PATH = Path(os.environ.get("EMBER_FIRECRACKER_SPEC", _DEFAULT_SPEC))
if not SPEC_PATH.is_file():
    pytest.skip(f"Firecracker API spec not found at {SPEC_PATH}", allow_module_level=True)



class _JsonishLoader(yaml.SafeLoader):
    """YAML 1.1 reads `Off`, `On`, `yes`, `no` as booleans (the log level `Off`
    would become false); like JSON, only `true` and `false` are booleans here."""


_BOOL = "tag:yaml.org,2002:bool"
_JsonishLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_JsonishLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|false)$"), list("tf"))

DEFINITIONS: dict[str, Any] = yaml.load(SPEC_PATH.read_text(), Loader=_JsonishLoader)[
    "definitions"
]

TYPES: dict[type[ConfigType], str] = {
    BootSourceConfig: "BootSource",
    MachineConfig: "MachineConfiguration",
    DriveConfig: "Drive",
    DrivePatch: "PartialDrive",
    NetworkInterfaceConfig: "NetworkInterface",
    NetworkInterfacePatch: "PartialNetworkInterface",
    VsockConfig: "Vsock",
    LoggerConfig: "Logger",
    MetricsConfig: "Metrics",
    MmdsConfig: "MmdsConfig",
    BalloonConfig: "Balloon",
    BalloonUpdateConfig: "BalloonUpdate",
    BalloonStatsUpdateConfig: "BalloonStatsUpdate",
    EntropyConfig: "EntropyDevice",
    RateLimiterConfig: "RateLimiter",
    TokenBucketConfig: "TokenBucket",
    CpuConfig: "CpuConfig",
    CpuidLeafModifier: "CpuidLeafModifier",
    CpuidRegisterModifier: "CpuidRegisterModifier",
    MsrModifier: "MsrModifier",
    VmConfig: "FullVmConfiguration",
}

# Spec properties Ember deliberately does not model.
NOT_MODELLED = {
    "CpuConfig": {"reg_modifiers", "vcpu_features"},  # aarch64 only
}
# Keys Ember requires although the spec does not mark them required.
EXTRA_REQUIRED = {
    "FullVmConfiguration": {"boot-source"},  # Firecracker's VmmConfig requires it
}


@pytest.mark.parametrize("cls", TYPES, ids=lambda cls: cls.__name__)
def test_fields_match_the_spec(cls: type[ConfigType]) -> None:
    definition = DEFINITIONS[TYPES[cls]]
    spec_keys = set(definition["properties"]) - NOT_MODELLED.get(TYPES[cls], set())
    assert set(cls.SCHEMA.keys) == spec_keys


@pytest.mark.parametrize("cls", TYPES, ids=lambda cls: cls.__name__)
def test_required_fields_match_the_spec(cls: type[ConfigType]) -> None:
    definition = DEFINITIONS[TYPES[cls]]
    spec_required = set(definition.get("required", ())) | EXTRA_REQUIRED.get(TYPES[cls], set())
    assert set(cls.SCHEMA.required_keys) == spec_required


@pytest.mark.parametrize(
    ("enum_cls", "definition", "prop"),
    [
        (HugePages, "MachineConfiguration", "huge_pages"),
        (CacheType, "Drive", "cache_type"),
        (IoEngine, "Drive", "io_engine"),
        (MmdsVersion, "MmdsConfig", "version"),
        (LogLevel, "Logger", "level"),
        (CpuidRegister, "CpuidRegisterModifier", "register"),
        (CpuTemplate, "CpuTemplate", None),
    ],
)
def test_enums_match_the_spec(enum_cls: type[enum.Enum], definition: str, prop: str | None) -> None:
    schema = DEFINITIONS[definition]
    if prop is not None:
        schema = schema["properties"][prop]
    assert {member.value for member in enum_cls} == set(schema["enum"])


def _without_nulls(value: Any) -> Any:
    # Firecracker writes unset options as null; Swagger 2.0 has no nullable.
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _in_spec(value: ConfigType) -> bool:
    # A cpu-config path is a config-file extension the API schema lacks.
    return type(value) in TYPES and not isinstance(getattr(value, "cpu_config", None), str)


@pytest.mark.parametrize(
    "value", [v for v in ROUND_TRIP if _in_spec(v)], ids=lambda v: type(v).__name__
)
def test_to_json_validates_against_the_spec(value: ConfigType) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"$ref": f"#/definitions/{TYPES[type(value)]}", "definitions": DEFINITIONS}
    jsonschema.Draft4Validator(schema).validate(_without_nulls(value.to_json()))

"""Random JSON never escapes as anything but a ConfigError.

Two generators: arbitrary JSON-ish values whose object keys lean towards real
field names, and one-point mutations of valid configurations (which reach
the deep, nearly-valid cases). Whatever parses must round-trip.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmm.config import ConfigError, ConfigType, loads

from .examples import ROUND_TRIP

TYPES = sorted({type(value) for value in ROUND_TRIP}, key=lambda cls: cls.__name__)


def _all_keys() -> list[str]:
    keys: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            keys.update(value)
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    for example in ROUND_TRIP:
        walk(example.to_json())
    return sorted(keys)


KEYS = _all_keys()
PLAUSIBLE_STRINGS = [
    "None", "2M", "Transparent", "C3", "V1N1", "Unsafe", "Writeback", "Sync", "Async",
    "V1", "V2", "warn", "OFF", "eax", "06:00:00:00:00:01", "06:00:00:00:00:0G",
    "169.254.169.254", "169.254.0.1", "0x10a", "0b1x0_1", "!56", "rootfs", "tap0", "",
    "a\ud800b", "\x00",
]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(PLAUSIBLE_STRINGS)
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), children, max_size=8),
    max_leaves=40,
)


def _check(cls: type[ConfigType], obj: object) -> None:
    try:
        value = cls.from_json(obj)
    except ConfigError:
        return
    encoded = value.to_json()
    json.dumps(encoded)  # plain JSON data
    assert cls.from_json(encoded) == value
    try:
        value.validate()
    except ConfigError:
        pass


@pytest.mark.parametrize("cls", TYPES, ids=lambda cls: cls.__name__)
@settings(max_examples=40, deadline=None)
@given(obj=json_values)
def test_random_json_raises_only_config_errors(cls: type[ConfigType], obj: object) -> None:
    _check(cls, obj)


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            out += _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            out += _paths(item, prefix + (index,))
    return out


@st.composite
def mutated_examples(draw: st.DrawFn) -> tuple[type[ConfigType], object]:
    example = draw(st.sampled_from(ROUND_TRIP))
    doc = example.to_json()
    path = draw(st.sampled_from(_paths(doc)))
    action = draw(st.sampled_from(["replace", "delete", "add"]))
    if not path:
        return type(example), draw(json_values) if action == "replace" else doc
    parent: Any = doc
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if action == "replace":
        parent[last] = draw(json_values)
    elif action == "delete":
        del parent[last]
    elif isinstance(parent, dict):
        parent[draw(st.sampled_from(KEYS) | st.text(max_size=4))] = draw(json_values)
    else:
        parent.insert(last, draw(json_values))
    return type(example), doc


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=mutated_examples())
def test_mutated_configs_raise_only_config_errors(case: tuple[type[ConfigType], object]) -> None:
    cls, obj = case
    _check(cls, obj)


@settings(max_examples=200, deadline=None)
@given(data=st.text(max_size=60) | st.binary(max_size=60))
def test_loads_raises_only_config_errors(data: str | bytes) -> None:
    try:
        loads(data)
    except ConfigError:
        pass


@settings(max_examples=200, deadline=None)
@given(obj=json_values)
def test_loads_reads_back_what_json_writes(obj: object) -> None:
    try:
        text = json.dumps(obj, allow_nan=False)
    except ValueError:
        return  # NaN/Infinity: not JSON
    assert loads(text) == json.loads(text)

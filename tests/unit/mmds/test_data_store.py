"""MmdsStore: put/patch/get, size limits, paths, output formats, persistence."""

from __future__ import annotations

import json
import math

import pytest

from vmm.mmds.data_store import MAX_DEPTH
from vmm.mmds import (
    DataStoreLimitExceeded,
    InvalidJsonData,
    InvalidMmdsState,
    MmdsState,
    MmdsStore,
    MmdsVersion,
    NotAJsonObject,
    NotFound,
    NotInitialized,
    OutputFormat,
    UnsupportedValueType,
    format_imds,
    json_merge_patch,
)

DATA = {
    "name": {"first": "John", "second": "Doe"},
    "age": 43,
    "phones": ["+401234567", "+441234567"],
    "member": False,
    "shares_percentage": 12.12,
    "balance": -24,
    "nothing": None,
    "json_string": '{\n  "hello": "world"\n}',
    "latest": {"meta-data": {"ami-id": "ami-12345678", "dummy_obj": {"k": "v"}, "empty": ""}},
    "a/b": {"c~d": "escaped"},
}


def store(**kw) -> MmdsStore:
    s = MmdsStore(**kw)
    s.put(DATA)
    return s


# --- put / patch / get ----------------------------------------------------------------


def test_fresh_store_is_uninitialized() -> None:
    s = MmdsStore()
    assert not s.initialized
    assert s.get() == {}
    assert s.size == 0
    assert s.version is MmdsVersion.V1 and s.imds_compat is False
    assert repr(s) == "<MmdsStore V1 uninitialized>"


def test_put_replaces_and_get_returns_copies() -> None:
    s = MmdsStore()
    s.put({"a": 1, "b": {"c": "d"}})
    s.put({"x": "y"})
    assert s.get() == {"x": "y"}
    got = s.get()
    got["x"] = "mutated"
    assert s.get() == {"x": "y"}
    assert s.initialized


def test_put_copies_its_argument() -> None:
    s = MmdsStore()
    doc = {"a": {"b": "c"}}
    s.put(doc)
    doc["a"]["b"] = "changed"
    assert s.get_path("/a/b") == "c"


def test_patch_before_put_is_not_initialized() -> None:
    s = MmdsStore()
    with pytest.raises(NotInitialized) as info:
        s.patch({"a": "b"})
    assert str(info.value) == "The MMDS data store is not initialized."


def test_patch_merges() -> None:
    s = MmdsStore()
    s.put({"meta-data": {"iam": "dummy"}, "user-data": "1522850095"})
    s.patch({"user-data": "10"})
    assert s.get() == {"meta-data": {"iam": "dummy"}, "user-data": "10"}
    s.patch({"meta-data": {"iam": None, "new": {"deep": "x"}}})
    assert s.get() == {"meta-data": {"new": {"deep": "x"}}, "user-data": "10"}


@pytest.mark.parametrize(
    "target,patch,result",
    [  # RFC 7396 Appendix A
        ({"a": "b"}, {"a": "c"}, {"a": "c"}),
        ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
        ({"a": "b"}, {"a": None}, {}),
        ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
        ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
        ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
        ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
        ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
        (["a", "b"], ["c", "d"], ["c", "d"]),
        ({"a": "b"}, ["c"], ["c"]),
        ({"a": "foo"}, None, None),
        ({"a": "foo"}, "bar", "bar"),
        ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
        ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
        ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
    ],
)
def test_json_merge_patch_rfc7396_examples(target, patch, result) -> None:
    assert json_merge_patch(target, patch) == result


def test_merge_patch_does_not_alias_the_patch() -> None:
    patch = {"a": {"b": ["x"]}}
    merged = json_merge_patch({}, patch)
    merged["a"]["b"].append("y")
    assert patch == {"a": {"b": ["x"]}}


def nested(depth: int) -> dict:
    doc: dict = {"leaf": "x"}
    for _ in range(depth - 1):
        doc = {"k": doc}
    return doc


def test_nesting_is_bounded_like_serde_json() -> None:
    s = MmdsStore(size_limit=1 << 20)
    s.put(nested(MAX_DEPTH))
    s.patch(nested(MAX_DEPTH))
    assert s.get_path("/k" * (MAX_DEPTH - 1) + "/leaf") == "x"
    with pytest.raises(InvalidJsonData):
        s.put(nested(MAX_DEPTH + 1))
    with pytest.raises(InvalidJsonData):
        s.patch(nested(MAX_DEPTH + 1))
    cyclic: dict = {}
    cyclic["self"] = cyclic
    with pytest.raises(InvalidJsonData):
        s.put(cyclic)


@pytest.mark.parametrize("bad", [[1, 2], "string", 3, None])
def test_only_objects_are_stored(bad) -> None:
    s = MmdsStore()
    with pytest.raises(NotAJsonObject):
        s.put(bad)
    s.put({})
    with pytest.raises(NotAJsonObject):
        s.patch(bad)


@pytest.mark.parametrize("bad", [{"x": math.nan}, {"x": math.inf}, {1: "int key"}, {"s": {1, 2}}, {"b": b"bytes"}])
def test_values_json_cannot_carry_are_refused(bad) -> None:
    with pytest.raises(InvalidJsonData):
        MmdsStore().put(bad)


def test_tuples_become_lists() -> None:
    s = MmdsStore()
    s.put({"t": (1, 2)})
    assert s.get() == {"t": [1, 2]}


# --- size limits ----------------------------------------------------------------------


def test_put_over_the_limit_is_refused_and_changes_nothing() -> None:
    s = MmdsStore()
    s.put({"keep": "me"})
    with pytest.raises(DataStoreLimitExceeded) as info:
        s.put({"key": "X" * 51300})
    assert str(info.value) == "The MMDS patch request doesn't fit."
    assert s.get() == {"keep": "me"}


def test_limit_counts_compact_utf8_json_exactly() -> None:
    doc = {"k": "é" * 10}  # {"k":"éééééééééé"} = 8 + 20 bytes
    size = len(json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode())
    assert size == 28
    MmdsStore(size_limit=28).put(doc)
    with pytest.raises(DataStoreLimitExceeded):
        MmdsStore(size_limit=27).put(doc)


def test_patch_limit_as_firecracker() -> None:
    # Firecracker data_store.rs test_update_data_store, same numbers.
    s = MmdsStore()
    s.put({"name": {"first": "John", "second": "Doe"}, "age": 43})
    s.patch({"name": {"first": "John", "second": None}, "age": "43"})
    s.patch({"new_key": "X" * 51151})
    with pytest.raises(DataStoreLimitExceeded):
        s.patch({"new_key2": "smth"})
    assert "smth" not in json.dumps(s.get())
    s.patch({"new_key": "smth"})
    assert s.size == 53
    s.patch({"new_key2": "smth2"})
    assert s.size == 72


def test_size_limit_can_change() -> None:
    s = MmdsStore(size_limit=10)
    with pytest.raises(DataStoreLimitExceeded):
        s.put({"abc": "defgh"})
    s.size_limit = 100
    s.put({"abc": "defgh"})
    with pytest.raises(ValueError):
        s.size_limit = -1


# --- paths ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path,value",
    [
        ("", DATA),
        ("/", DATA),
        ("/name", {"first": "John", "second": "Doe"}),
        ("/name/first", "John"),
        ("/name/first/", "John"),
        ("//name///first", "John"),
        ("/phones/0", "+401234567"),
        ("/phones/1/", "+441234567"),
        ("/age", 43),
        ("/nothing", None),
        ("/latest/meta-data/ami-id", "ami-12345678"),
        ("/a~1b/c~0d", "escaped"),
    ],
)
def test_get_path(path, value) -> None:
    assert store().get_path(path) == value


@pytest.mark.parametrize(
    "path",
    [
        "/missing", "/name/third", "/name/first/deeper", "/phones/2", "/phones/01",
        "/phones/-1", "/phones/+1", "name", "/age/0",
    ],
)
def test_missing_paths(path) -> None:
    with pytest.raises(NotFound) as info:
        store().get_path(path)
    assert str(info.value) == "The MMDS resource does not exist."


def test_uninitialized_root_is_null_and_children_missing() -> None:
    s = MmdsStore()
    assert s.get_path("/") is None
    with pytest.raises(NotFound):
        s.get_path("/anything")


# --- output formats -------------------------------------------------------------------


def test_imds_format() -> None:
    assert format_imds({"b": "x", "a": {"k": 1}, "c": [1]}) == "a/\nb\nc"
    assert format_imds({}) == ""
    assert format_imds("plain\nvalue") == "plain\nvalue"
    for unsupported in (43, 1.5, True, None, ["a"]):
        with pytest.raises(UnsupportedValueType) as info:
            format_imds(unsupported)
        assert str(info.value) == "Cannot retrieve value. The value has an unsupported type."


@pytest.mark.parametrize("imds_compat", [False, True])
@pytest.mark.parametrize("fmt", [OutputFormat.JSON, OutputFormat.IMDS])
def test_render_as_firecracker(imds_compat: bool, fmt: OutputFormat) -> None:
    # Firecracker data_store.rs test_get_value.
    s = store(imds_compat=imds_compat)
    json_out = fmt is OutputFormat.JSON and not imds_compat
    expected_fmt = OutputFormat.JSON if json_out else OutputFormat.IMDS
    assert s.render("/name", fmt) == (
        '{"first":"John","second":"Doe"}' if json_out else "first\nsecond",
        expected_fmt,
    )
    assert s.render("/phones/0/", fmt)[0] == ('"+401234567"' if json_out else "+401234567")
    assert s.render("/json_string", fmt)[0] == (r'"{\n  \"hello\": \"world\"\n}"' if json_out else DATA["json_string"])
    for path, as_json in [("/age", "43"), ("/phones", '["+401234567","+441234567"]'), ("/member", "false"),
                          ("/shares_percentage", "12.12"), ("/balance", "-24"), ("/nothing", "null")]:
        if json_out:
            assert s.render(path, fmt)[0] == as_json
        else:
            with pytest.raises(UnsupportedValueType):
                s.render(path, fmt)
    with pytest.raises(NotFound):
        s.render("/invalid_path", fmt)


def test_root_listing_is_sorted_with_object_suffixes() -> None:
    text, _ = store().render("/", OutputFormat.IMDS)
    assert text.split("\n") == [
        "a/b/", "age", "balance", "json_string", "latest/", "member", "name/", "nothing", "phones", "shares_percentage"
    ]
    assert store().render("/latest/meta-data", OutputFormat.IMDS)[0] == "ami-id\ndummy_obj/\nempty"


# --- persistence ----------------------------------------------------------------------


def test_state_round_trip_without_data_by_default() -> None:
    s = store(version=MmdsVersion.V2, imds_compat=True)
    state = s.state()
    assert state == MmdsState(version=MmdsVersion.V2, imds_compat=True, data=None)
    restored = MmdsStore.from_state(state)
    assert restored.version is MmdsVersion.V2 and restored.imds_compat
    assert not restored.initialized


def test_state_round_trip_with_data() -> None:
    s = store()
    restored = MmdsStore.from_state(s.state(include_data=True))
    assert restored.get() == DATA
    assert restored.size == s.size


def test_tokens_do_not_survive_a_restore() -> None:
    s = store(version=MmdsVersion.V2)
    token = s.generate_token(60)
    assert s.is_valid_token(token)
    assert not MmdsStore.from_state(s.state()).is_valid_token(token)


@pytest.mark.parametrize(
    "state",
    [
        MmdsState(version="V3", imds_compat=False),  # type: ignore[arg-type]
        MmdsState(version=MmdsVersion.V1, imds_compat="yes"),  # type: ignore[arg-type]
        MmdsState(version=MmdsVersion.V1, imds_compat=False, data="{not json"),
        MmdsState(version=MmdsVersion.V1, imds_compat=False, data="[1]"),
        MmdsState(version=MmdsVersion.V1, imds_compat=False, data='{"k": "' + "x" * 60000 + '"}'),
    ],
)
def test_invalid_state_is_refused(state: MmdsState) -> None:
    with pytest.raises(InvalidMmdsState):
        MmdsStore.from_state(state)


def test_version_accepts_strings() -> None:
    s = MmdsStore()
    s.version = "V2"  # type: ignore[assignment]
    assert s.version is MmdsVersion.V2
    with pytest.raises(ValueError):
        s.version = "V9"  # type: ignore[assignment]

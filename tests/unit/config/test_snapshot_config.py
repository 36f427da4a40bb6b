"""`vmm.config.snapshot`: the bodies of PUT /snapshot/create and PUT /snapshot/load."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmm.config import (
    LOAD_DEPRECATION_MESSAGE,
    ConfigError,
    ConfigParseError,
    ConflictingFields,
    DriveOverride,
    DuplicateDeviceId,
    InvalidInterfaceName,
    InvalidResourceId,
    InvalidSnapshotPath,
    InvalidType,
    InvalidUdsPath,
    MemBackendType,
    MemoryBackend,
    MissingField,
    NetworkOverride,
    SnapshotCreateParams,
    SnapshotHugePages,
    SnapshotLoadParams,
    SnapshotType,
    UnknownField,
    UnknownVariant,
    UnsupportedConfig,
    VsockOverride,
)
from vmm.config.snapshot import MEM_BACKEND_MISSING, MEM_BACKEND_TOO_MANY

FILE_BACKEND = {"backend_type": "File", "backend_path": "/snap/mem"}
FULL_LOAD = SnapshotLoadParams(
    snapshot_path="/snap/vm",
    mem_backend=MemoryBackend(MemBackendType.UFFD, "/run/uffd.sock"),
    track_dirty_pages=True,
    resume_vm=True,
    network_overrides=(NetworkOverride("eth0", "tap7"), NetworkOverride("eth1", "tap8")),
    vsock_override=VsockOverride("/run/v.sock"),
    drive_overrides=(DriveOverride("rootfs", "/images/clone.ext4"),),
    clock_realtime=True,
)


def load(**fields: Any) -> SnapshotLoadParams:
    return SnapshotLoadParams.from_json({"snapshot_path": "/snap/vm", **fields})


# --- create ----------------------------------------------------------------------------------


def test_create_defaults_to_a_full_snapshot() -> None:
    params = SnapshotCreateParams.from_json({"snapshot_path": "/s", "mem_file_path": "/m"})
    assert params == SnapshotCreateParams("/s", "/m", SnapshotType.FULL)


def test_create_diff_and_firecrackers_key_order() -> None:
    params = SnapshotCreateParams.from_json({"mem_file_path": "/m", "snapshot_path": "/s", "snapshot_type": "Diff"})
    assert params.snapshot_type is SnapshotType.DIFF
    assert list(params.to_json().items()) == [("snapshot_type", "Diff"), ("snapshot_path", "/s"),
                                              ("mem_file_path", "/m")]
    assert SnapshotCreateParams.from_json(params.to_json()) == params


@pytest.mark.parametrize(("obj", "error", "message"), [
    ({"snapshot_path": "/s"}, MissingField, "missing field `mem_file_path`"),
    ({"mem_file_path": "/m"}, MissingField, "missing field `snapshot_path`"),
    ({"snapshot_path": "/s", "mem_file_path": "/m", "x": 1}, UnknownField,
     "unknown field `x`, expected one of `snapshot_type`, `snapshot_path`, `mem_file_path`"),
    ({"snapshot_path": "/s", "mem_file_path": "/m", "snapshot_type": "full"}, UnknownVariant,
     "snapshot_type: unknown variant `full`, expected `Diff` or `Full`"),
    ({"snapshot_path": "/s", "mem_file_path": "/m", "snapshot_type": None}, InvalidType,
     "snapshot_type: invalid type: null"),
    ({"snapshot_path": 7, "mem_file_path": "/m"}, InvalidType,
     "snapshot_path: invalid type: integer `7`, expected path string"),
])
def test_create_shape_errors(obj: dict[str, Any], error: type[ConfigError], message: str) -> None:
    with pytest.raises(error) as caught:
        SnapshotCreateParams.from_json(obj)
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize(("params", "message"), [
    (SnapshotCreateParams("", "/m"), "snapshot_path: The snapshot path is empty."),
    (SnapshotCreateParams("/s", ""), "mem_file_path: The memory file path is empty."),
    (SnapshotCreateParams("/s\0x", "/m"), "snapshot_path: The snapshot path contains a NUL byte."),
    (SnapshotCreateParams("/s", "/m\0"), "mem_file_path: The memory file path contains a NUL byte."),
])
def test_create_validate_refuses_unusable_paths(params: SnapshotCreateParams, message: str) -> None:
    with pytest.raises(InvalidSnapshotPath, match=re.escape(message)):
        params.validate()


def test_create_validate_accepts_a_good_request() -> None:
    SnapshotCreateParams("/s", "/m", SnapshotType.DIFF).validate()


# --- load: memory backend ----------------------------------------------------------------------


def test_load_with_mem_backend() -> None:
    params = load(mem_backend={"backend_type": "Uffd", "backend_path": "/run/uffd.sock"})
    assert params == SnapshotLoadParams("/snap/vm", MemoryBackend(MemBackendType.UFFD, "/run/uffd.sock"))
    assert (params.track_dirty_pages, params.resume_vm, params.clock_realtime) == (False, False, False)
    assert params.network_overrides == () and params.drive_overrides == () and params.vsock_override is None


def test_deprecated_mem_file_path_means_a_file_backend() -> None:
    assert load(mem_file_path="/snap/mem").mem_backend == MemoryBackend(MemBackendType.FILE, "/snap/mem")


def test_a_null_memory_field_counts_as_absent() -> None:
    # Both are Rust `Option`s: null is None.
    assert load(mem_file_path=None, mem_backend=FILE_BACKEND) == load(mem_backend=FILE_BACKEND)
    assert load(mem_file_path="/snap/mem", mem_backend=None) == load(mem_backend=FILE_BACKEND)


@pytest.mark.parametrize(("fields", "error", "message"), [
    ({}, MissingField, MEM_BACKEND_MISSING),
    ({"mem_file_path": None, "mem_backend": None}, MissingField, MEM_BACKEND_MISSING),
    ({"mem_file_path": "/m", "mem_backend": FILE_BACKEND}, ConflictingFields, MEM_BACKEND_TOO_MANY),
])
def test_exactly_one_memory_field(fields: dict[str, Any], error: type[ConfigError], message: str) -> None:
    with pytest.raises(error) as caught:
        load(**fields)
    assert isinstance(caught.value, ConfigParseError)
    assert str(caught.value) == message


def test_firecrackers_messages_for_the_memory_fields() -> None:
    assert MEM_BACKEND_MISSING == "missing field: either `mem_backend` or `mem_file_path` is required"
    assert MEM_BACKEND_TOO_MANY == ("too many fields: either `mem_backend` or `mem_file_path` exclusively is "
                                    "required")


@pytest.mark.parametrize(("backend", "error", "message"), [
    ({"backend_type": "File"}, MissingField, "mem_backend: missing field `backend_path`"),
    ({"backend_path": "/m"}, MissingField, "mem_backend: missing field `backend_type`"),
    ({"backend_type": "Mmap", "backend_path": "/m"}, UnknownVariant,
     "mem_backend.backend_type: unknown variant `Mmap`, expected `File` or `Uffd`"),
    ({"backend_type": "File", "backend_path": "/m", "x": 1}, UnknownField, "mem_backend: unknown field `x`"),
    ("/m", InvalidType, "mem_backend: invalid type: string \"/m\", expected struct MemBackendConfig"),
])
def test_mem_backend_shape_errors(backend: object, error: type[ConfigError], message: str) -> None:
    with pytest.raises(error) as caught:
        load(mem_backend=backend)
    assert str(caught.value).startswith(message)


# --- load: flags and overrides -----------------------------------------------------------------


@pytest.mark.parametrize(("enable_diff", "track", "expected"), [
    (False, False, False), (True, False, True), (False, True, True), (True, True, True),
])
def test_enable_diff_snapshots_is_ored_into_track_dirty_pages(enable_diff: bool, track: bool,
                                                              expected: bool) -> None:
    params = load(mem_backend=FILE_BACKEND, enable_diff_snapshots=enable_diff, track_dirty_pages=track)
    assert params.track_dirty_pages is expected


@pytest.mark.parametrize("huge_pages", ["Snapshot", "None"])
def test_huge_pages_ember_can_honour_are_accepted(huge_pages: str) -> None:
    assert load(mem_backend=FILE_BACKEND, huge_pages=huge_pages) == load(mem_backend=FILE_BACKEND)


@pytest.mark.parametrize("huge_pages", ["Transparent", "2M"])
def test_huge_pages_are_refused_as_unsupported(huge_pages: str) -> None:
    with pytest.raises(UnsupportedConfig) as caught:
        load(mem_backend=FILE_BACKEND, huge_pages=huge_pages)
    assert not isinstance(caught.value, ConfigParseError)
    assert caught.value.path == "huge_pages"
    assert f"Huge pages (`{huge_pages}`) are not supported by Ember" in str(caught.value)


def test_an_unknown_huge_pages_value_lists_firecrackers_variants() -> None:
    with pytest.raises(UnknownVariant, match=re.escape(
            "huge_pages: unknown variant `1G`, expected one of `Snapshot`, `None`, `Transparent`, `2M`")):
        load(mem_backend=FILE_BACKEND, huge_pages="1G")


def test_every_field_of_the_load_body() -> None:
    body = {
        "snapshot_path": "/snap/vm",
        "mem_backend": {"backend_path": "/run/uffd.sock", "backend_type": "Uffd"},
        "enable_diff_snapshots": False,
        "track_dirty_pages": True,
        "resume_vm": True,
        "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap7"},
                              {"iface_id": "eth1", "host_dev_name": "tap8"}],
        "vsock_override": {"uds_path": "/run/v.sock"},
        "clock_realtime": True,
        "huge_pages": "None",
        "drive_overrides": [{"drive_id": "rootfs", "path_on_host": "/images/clone.ext4"}],
    }
    assert SnapshotLoadParams.from_json(body) == FULL_LOAD


def test_to_json_writes_the_normalised_form_and_parses_back() -> None:
    params = load(mem_file_path="/snap/mem", enable_diff_snapshots=True)
    written = params.to_json()
    assert written == {"snapshot_path": "/snap/vm", "mem_backend": FILE_BACKEND, "track_dirty_pages": True,
                       "resume_vm": False, "network_overrides": [], "clock_realtime": False,
                       "drive_overrides": []}
    assert SnapshotLoadParams.from_json(json.loads(json.dumps(written))) == params
    assert SnapshotLoadParams.from_json(FULL_LOAD.to_json()) == FULL_LOAD
    assert FULL_LOAD.to_json()["vsock_override"] == {"uds_path": "/run/v.sock"}


def test_lists_become_tuples() -> None:
    params = SnapshotLoadParams("/s", MemoryBackend(MemBackendType.FILE, "/m"),
                                network_overrides=[NetworkOverride("a", "tap0")],  # type: ignore[arg-type]
                                drive_overrides=[DriveOverride("d", "/d")])  # type: ignore[arg-type]
    assert params.network_overrides == (NetworkOverride("a", "tap0"),)
    assert params.drive_overrides == (DriveOverride("d", "/d"),)
    hash(params)  # frozen and hashable, as every config value


@pytest.mark.parametrize(("fields", "error", "message"), [
    ({"mem_backend": FILE_BACKEND, "bogus": 1}, UnknownField, "unknown field `bogus`, expected one of "
     "`snapshot_path`, `mem_file_path`, `mem_backend`, `enable_diff_snapshots`, `track_dirty_pages`, `resume_vm`, "
     "`network_overrides`, `vsock_override`, `clock_realtime`, `huge_pages`, `drive_overrides`"),
    ({"mem_backend": FILE_BACKEND, "resume_vm": None}, InvalidType,
     "resume_vm: invalid type: null, expected a boolean"),
    ({"mem_backend": FILE_BACKEND, "track_dirty_pages": 1}, InvalidType, "track_dirty_pages: invalid type"),
    ({"mem_backend": FILE_BACKEND, "network_overrides": None}, InvalidType,
     "network_overrides: invalid type: null, expected a sequence"),
    ({"mem_backend": FILE_BACKEND, "network_overrides": [{"iface_id": "eth0"}]}, MissingField,
     "network_overrides[0]: missing field `host_dev_name`"),
    ({"mem_backend": FILE_BACKEND, "network_overrides": [{"iface_id": "a", "host_dev_name": "t", "mtu": 1}]},
     UnknownField, "network_overrides[0]: unknown field `mtu`"),
    ({"mem_backend": FILE_BACKEND, "vsock_override": {"uds_path": "/v", "guest_cid": 3}}, UnknownField,
     "vsock_override: unknown field `guest_cid`"),
    ({"mem_backend": FILE_BACKEND, "vsock_override": {}}, MissingField, "vsock_override: missing field `uds_path`"),
    ({"mem_backend": FILE_BACKEND, "drive_overrides": [{"drive_id": "d"}]}, MissingField,
     "drive_overrides[0]: missing field `path_on_host`"),
    ({"mem_backend": FILE_BACKEND, "drive_overrides": {"drive_id": "d", "path_on_host": "/d"}}, InvalidType,
     "drive_overrides: invalid type: map, expected a sequence"),
])
def test_load_shape_errors(fields: dict[str, Any], error: type[ConfigError], message: str) -> None:
    with pytest.raises(error) as caught:
        load(**fields)
    assert str(caught.value).startswith(message), str(caught.value)


def test_a_missing_snapshot_path_is_reported() -> None:
    with pytest.raises(MissingField, match="missing field `snapshot_path`"):
        SnapshotLoadParams.from_json({"mem_backend": FILE_BACKEND})


@pytest.mark.parametrize(("obj", "deprecated"), [
    ({"snapshot_path": "/s", "mem_backend": FILE_BACKEND}, False),
    ({"snapshot_path": "/s", "mem_file_path": "/m"}, True),
    ({"snapshot_path": "/s", "mem_file_path": None, "mem_backend": FILE_BACKEND}, False),
    ({"snapshot_path": "/s", "mem_backend": FILE_BACKEND, "enable_diff_snapshots": True}, True),
    ({"snapshot_path": "/s", "mem_backend": FILE_BACKEND, "enable_diff_snapshots": False}, False),
    ([], False),
])
def test_uses_deprecated_fields_as_firecracker_decides(obj: Any, deprecated: bool) -> None:
    assert SnapshotLoadParams.uses_deprecated_fields(obj) is deprecated


def test_the_deprecation_message_is_firecrackers() -> None:
    assert LOAD_DEPRECATION_MESSAGE == (
        "PUT /snapshot/load: mem_file_path and enable_diff_snapshots fields are deprecated.")


# --- load: validate --------------------------------------------------------------------------


def test_validate_accepts_a_full_request() -> None:
    FULL_LOAD.validate()


def _with(**changes: Any) -> SnapshotLoadParams:
    return SnapshotLoadParams(**{**FULL_LOAD.__dict__, **changes})


@pytest.mark.parametrize(("params", "error", "message"), [
    (_with(snapshot_path=""), InvalidSnapshotPath, "snapshot_path: The snapshot path is empty."),
    (_with(snapshot_path="/a\0b"), InvalidSnapshotPath, "snapshot_path: The snapshot path contains a NUL byte."),
    (_with(mem_backend=MemoryBackend(MemBackendType.FILE, "")), InvalidSnapshotPath,
     "mem_backend.backend_path: The memory file path is empty."),
    (_with(mem_backend=MemoryBackend(MemBackendType.UFFD, "")), InvalidSnapshotPath,
     "mem_backend.backend_path: The UFFD handler socket path is empty."),
    (_with(mem_backend=MemoryBackend(MemBackendType.UFFD, "/" + "u" * 107)), InvalidUdsPath,
     "mem_backend.backend_path: The UFFD handler socket path is too long: 108 bytes, at most 107."),
    (_with(network_overrides=(NetworkOverride("eth0", "tap7"), NetworkOverride("eth0", "tap8"))),
     DuplicateDeviceId, "network_overrides[1]: Duplicate iface_id `eth0`"),
    (_with(network_overrides=(NetworkOverride("eth-0", "tap7"),)), InvalidResourceId,
     "network_overrides[0]: API Resource IDs can only contain"),
    (_with(network_overrides=(NetworkOverride("eth0", "a/b"),)), InvalidInterfaceName,
     "network_overrides[0]: Invalid interface name `a/b`"),
    (_with(vsock_override=VsockOverride("")), InvalidSnapshotPath,
     "vsock_override.uds_path: The vsock Unix domain socket path is empty."),
    (_with(vsock_override=VsockOverride("/" + "v" * 200)), InvalidUdsPath, "vsock_override.uds_path: "),
    (_with(drive_overrides=(DriveOverride("rootfs", "/a"), DriveOverride("rootfs", "/b"))),
     DuplicateDeviceId, "drive_overrides[1]: Duplicate drive_id `rootfs`"),
    (_with(drive_overrides=(DriveOverride("", "/a"),)), InvalidResourceId,
     "drive_overrides[0]: The ID cannot be empty."),
    (_with(drive_overrides=(DriveOverride("data", ""),)), InvalidSnapshotPath,
     "drive_overrides[0].path_on_host: The drive path is empty."),
])
def test_validate_refuses(params: SnapshotLoadParams, error: type[ConfigError], message: str) -> None:
    with pytest.raises(error) as caught:
        params.validate()
    assert str(caught.value).startswith(message), str(caught.value)


def test_the_same_tap_for_different_interfaces_is_left_to_the_restore() -> None:
    # Only ids must be unique here; which TAPs are free is known when the devices are rebuilt.
    _with(network_overrides=(NetworkOverride("eth0", "tap7"), NetworkOverride("eth1", "tap7"))).validate()


# --- against the contract ----------------------------------------------------------------------

_DEFAULT_SPEC = Path(__file__).resolve().parents[3].parent / "shared" / "reference" / "firecracker-api-v1.17.yaml"
SPEC_PATH = Path(os.environ.get("EMBER_FIRECRACKER_SPEC", _DEFAULT_SPEC))
needs_spec = pytest.mark.skipif(not SPEC_PATH.is_file(), reason=f"Firecracker API spec not found at {SPEC_PATH}")


@pytest.fixture(scope="module")
def definitions() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(SPEC_PATH.read_text())["definitions"]


# Keys Ember accepts beyond the contract.
EXTENSIONS = {"SnapshotLoadParams": {"drive_overrides"}}
SPEC_TYPES = {
    SnapshotCreateParams: "SnapshotCreateParams",
    SnapshotLoadParams: "SnapshotLoadParams",
    MemoryBackend: "MemoryBackend",
    NetworkOverride: "NetworkOverride",
    VsockOverride: "VsockOverride",
}


@needs_spec
@pytest.mark.parametrize("cls", SPEC_TYPES, ids=lambda cls: cls.__name__)
def test_keys_match_the_spec(cls: Any, definitions: dict[str, Any]) -> None:
    name = SPEC_TYPES[cls]
    definition = definitions[name]
    assert set(cls.SCHEMA.keys) == set(definition["properties"]) | EXTENSIONS.get(name, set())
    assert set(cls.SCHEMA.required_keys) == set(definition.get("required", ()))


@needs_spec
@pytest.mark.parametrize(("enum_cls", "definition", "prop"), [
    (SnapshotType, "SnapshotCreateParams", "snapshot_type"),
    (MemBackendType, "MemoryBackend", "backend_type"),
    (SnapshotHugePages, "SnapshotLoadParams", "huge_pages"),
])
def test_enums_match_the_spec(enum_cls: Any, definition: str, prop: str, definitions: dict[str, Any]) -> None:
    assert {member.value for member in enum_cls} == set(definitions[definition]["properties"][prop]["enum"])


# --- random input ----------------------------------------------------------------------------

_KEYS = sorted(set(SnapshotLoadParams.SCHEMA.keys) | set(SnapshotCreateParams.SCHEMA.keys)
               | {"backend_type", "backend_path", "iface_id", "host_dev_name", "uds_path", "drive_id",
                  "path_on_host"})
_scalars = (st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=6)
            | st.sampled_from(["File", "Uffd", "Full", "Diff", "None", "Snapshot", "2M", "/p", "eth0", "tap0"]))
_json = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.sampled_from(_KEYS), children, max_size=6),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(cls=st.sampled_from([SnapshotCreateParams, SnapshotLoadParams]), obj=_json)
def test_random_json_raises_only_config_errors_and_what_parses_round_trips(cls: Any, obj: object) -> None:
    try:
        value = cls.from_json(obj)
    except ConfigError:
        return
    assert cls.from_json(json.loads(json.dumps(value.to_json()))) == value
    try:
        value.validate()
    except ConfigError:
        pass

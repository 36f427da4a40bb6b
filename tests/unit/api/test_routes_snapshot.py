"""`vmm.api.routes` for PUT /snapshot/create and PUT /snapshot/load (pure, no I/O)."""

from __future__ import annotations

import json

import pytest

from vmm.api.actions import ApiError, CreateSnapshot, LoadSnapshot
from vmm.api.routes import DESERIALIZE_PREFIX, deprecation_notice, request_metric, route
from vmm.config import (
    DriveOverride,
    MemBackendType,
    MemoryBackend,
    NetworkOverride,
    SnapshotCreateParams,
    SnapshotLoadParams,
    SnapshotType,
    VsockOverride,
)

FILE_BACKEND = {"backend_type": "File", "backend_path": "/snap/mem"}
DEPRECATED = "PUT /snapshot/load: mem_file_path and enable_diff_snapshots fields are deprecated."


def body(obj: object) -> bytes:
    return json.dumps(obj).encode()


def test_create_becomes_create_snapshot() -> None:
    action = route("PUT", "/snapshot/create", body({"snapshot_type": "Diff", "snapshot_path": "/s",
                                                     "mem_file_path": "/m"}))
    assert action == CreateSnapshot(SnapshotCreateParams("/s", "/m", SnapshotType.DIFF))
    assert deprecation_notice("PUT", action) is None


def test_curl_style_create_with_a_trailing_slash() -> None:
    payload = b'{\n  "snapshot_path": "./snapshot_file",\n  "mem_file_path": "./mem_file"\n}'
    assert route("PUT", "/snapshot/create/", payload) == CreateSnapshot(
        SnapshotCreateParams("./snapshot_file", "./mem_file"))


def test_load_becomes_load_snapshot() -> None:
    payload = body({
        "snapshot_path": "/snap/vm",
        "mem_backend": {"backend_type": "Uffd", "backend_path": "/run/uffd.sock"},
        "track_dirty_pages": True,
        "resume_vm": True,
        "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap7"}],
        "vsock_override": {"uds_path": "/run/v.sock"},
        "drive_overrides": [{"drive_id": "rootfs", "path_on_host": "/images/clone.ext4"}],
        "clock_realtime": True,
        "huge_pages": "Snapshot",
    })
    action = route("PUT", "/snapshot/load", payload)
    assert action == LoadSnapshot(SnapshotLoadParams(
        snapshot_path="/snap/vm",
        mem_backend=MemoryBackend(MemBackendType.UFFD, "/run/uffd.sock"),
        track_dirty_pages=True,
        resume_vm=True,
        network_overrides=(NetworkOverride("eth0", "tap7"),),
        vsock_override=VsockOverride("/run/v.sock"),
        drive_overrides=(DriveOverride("rootfs", "/images/clone.ext4"),),
        clock_realtime=True,
    ))
    assert deprecation_notice("PUT", action) is None


@pytest.mark.parametrize("fields", [
    {"mem_file_path": "/snap/mem"},
    {"mem_backend": FILE_BACKEND, "enable_diff_snapshots": True},
])
def test_deprecated_load_fields_are_parsed_and_flagged(fields: dict[str, object]) -> None:
    action = route("PUT", "/snapshot/load", body({"snapshot_path": "/snap/vm", **fields}))
    assert isinstance(action, LoadSnapshot) and action.uses_deprecated_fields
    assert action.params.mem_backend == MemoryBackend(MemBackendType.FILE, "/snap/mem")
    assert action.params.track_dirty_pages is ("enable_diff_snapshots" in fields)
    assert deprecation_notice("PUT", action) == DEPRECATED


REFUSED = [
    ("/snapshot", body({}), "Missing snapshot operation type."),
    ("/snapshot/", body({}), "Missing snapshot operation type."),
    ("/snapshot/restore", body({}), "Invalid request method and/or path: PUT /snapshot/restore."),
    ("/snapshot/create/now", body({}), "Invalid request method and/or path: PUT /snapshot/create/now."),
    ("/snapshot/create", b"", "Empty PUT request."),
    ("/snapshot/load", b"", "Empty PUT request."),
    ("/snapshot/create", b"{", DESERIALIZE_PREFIX + "Invalid JSON"),
    ("/snapshot/create", body({"snapshot_path": "/s"}), DESERIALIZE_PREFIX + "missing field `mem_file_path`."),
    ("/snapshot/create", body({"snapshot_path": "/s", "mem_file_path": "/m", "snapshot_type": "Incremental"}),
     DESERIALIZE_PREFIX + "snapshot_type: unknown variant `Incremental`, expected `Diff` or `Full`."),
    ("/snapshot/load", body({"snapshot_path": "/s"}),
     DESERIALIZE_PREFIX + "missing field: either `mem_backend` or `mem_file_path` is required."),
    ("/snapshot/load", body({"snapshot_path": "/s", "mem_file_path": "/m", "mem_backend": FILE_BACKEND}),
     DESERIALIZE_PREFIX + "too many fields: either `mem_backend` or `mem_file_path` exclusively is required."),
    ("/snapshot/load", body({"snapshot_path": "/s", "mem_file_path": "/m", "resume": True}),
     DESERIALIZE_PREFIX + "unknown field `resume`, expected one of"),
    ("/snapshot/load", body({"snapshot_path": "/s", "mem_backend": {"backend_type": "Disk", "backend_path": "/m"}}),
     DESERIALIZE_PREFIX + "mem_backend.backend_type: unknown variant `Disk`, expected `File` or `Uffd`."),
    ("/snapshot/load", body({"snapshot_path": "/s", "mem_file_path": "/m", "huge_pages": "2M"}),
     "huge_pages: Huge pages (`2M`) are not supported by Ember: use `Snapshot` or `None`."),
    ("/snapshot/load", body({"snapshot_path": "/s", "mem_file_path": "/m", "huge_pages": "Transparent"}),
     "huge_pages: Huge pages (`Transparent`) are not supported by Ember"),
]


@pytest.mark.parametrize("path,payload,message", REFUSED, ids=[f"{p} {i}" for i, (p, _, _) in enumerate(REFUSED)])
def test_refused_snapshot_requests(path: str, payload: bytes, message: str) -> None:
    result = route("PUT", path, payload)
    assert isinstance(result, ApiError), result
    assert result.status == 400
    assert result.fault_message.startswith(message), result.fault_message


@pytest.mark.parametrize("method", ["GET", "PATCH", "DELETE"])
@pytest.mark.parametrize("path", ["/snapshot/create", "/snapshot/load"])
def test_only_put_reaches_the_snapshot_endpoints(method: str, path: str) -> None:
    payload = b"" if method in ("GET", "DELETE") else body({"snapshot_path": "/s", "mem_file_path": "/m"})
    result = route(method, path, payload)
    assert result == ApiError(f"Invalid request method and/or path: {method} {path}.")


def test_parsing_leaves_semantic_checks_to_the_controller() -> None:
    # An empty path and a duplicate override are well-formed; `validate` refuses them.
    action = route("PUT", "/snapshot/load", body({
        "snapshot_path": "", "mem_file_path": "/m",
        "drive_overrides": [{"drive_id": "d", "path_on_host": "/a"}, {"drive_id": "d", "path_on_host": "/b"}]}))
    assert isinstance(action, LoadSnapshot)
    assert action.params.snapshot_path == ""


@pytest.mark.parametrize("path", ["/snapshot/create", "/snapshot/load"])
def test_firecracker_keeps_no_request_counter_for_snapshots(path: str) -> None:
    assert request_metric("PUT", path) is None

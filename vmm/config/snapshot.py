"""Snapshot requests: what PUT /snapshot/create and PUT /snapshot/load ask for.

Spec: `SnapshotCreateParams`, `SnapshotLoadParams`, `MemoryBackend`,
`NetworkOverride`, `VsockOverride`. Parsing follows Firecracker's
``vmm_config/snapshot.rs`` and ``api_server/request/snapshot.rs``:

* a load body names guest memory either with `mem_backend` (a file, or a
  Unix socket where a UFFD page-fault handler listens) or with the deprecated
  `mem_file_path` (which means ``{"backend_type": "File", "backend_path":
  ...}``), never both and never neither;
* the deprecated `enable_diff_snapshots` is ORed into `track_dirty_pages`;
* `huge_pages` accepts ``Snapshot`` (the default) and ``None``: Ember guest
  memory never uses huge pages, so both mean the same; ``Transparent`` and
  ``2M`` are refused as unsupported rather than silently ignored.

Ember extension: `drive_overrides` (an array of ``{"drive_id",
"path_on_host"}``) re-points block devices at other host files on restore,
as `network_overrides` does for TAP devices (Firecracker issue #4014 asks
for it). Firecracker refuses the key as unknown.

`from_json` checks only shapes; `validate` checks paths and ids (no I/O:
whether the files exist is the loader's business).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Self

from .errors import (
    ConfigError,
    ConfigParseError,
    DuplicateDeviceId,
    InvalidType,
    InvalidUdsPath,
    MissingField,
    UnsupportedConfig,
)
from .ids import check_resource_id
from .net import check_tap_name
from .schema import (
    ConfigType,
    Field,
    Json,
    Schema,
    describe,
    enum_of,
    nested,
    read_bool,
    read_str,
    sequence_of,
)
from .vsock import UNIX_PATH_MAX

__all__ = [
    "SnapshotType",
    "MemBackendType",
    "SnapshotHugePages",
    "MemoryBackend",
    "NetworkOverride",
    "VsockOverride",
    "DriveOverride",
    "SnapshotCreateParams",
    "SnapshotLoadParams",
    "InvalidSnapshotPath",
    "ConflictingFields",
    "MEM_BACKEND_MISSING",
    "MEM_BACKEND_TOO_MANY",
    "LOAD_DEPRECATION_MESSAGE",
]

# Firecracker api_server/request/snapshot.rs: MISSING_FIELD, TOO_MANY_FIELDS.
MEM_BACKEND_MISSING = "missing field: either `mem_backend` or `mem_file_path` is required"
MEM_BACKEND_TOO_MANY = "too many fields: either `mem_backend` or `mem_file_path` exclusively is required"
# Firecracker api_server/request/snapshot.rs: LOAD_DEPRECATION_MESSAGE.
LOAD_DEPRECATION_MESSAGE = "PUT /snapshot/load: mem_file_path and enable_diff_snapshots fields are deprecated."


class InvalidSnapshotPath(ConfigError):
    """A snapshot path is empty or contains a NUL byte."""


class ConflictingFields(ConfigParseError):
    """Two fields that exclude each other are both present."""


# --- enumerations (Firecracker's declaration order: it sets serde's messages) -------------


class SnapshotType(enum.StrEnum):
    """Spec `SnapshotCreateParams.snapshot_type`."""

    DIFF = "Diff"  # only the pages dirtied since the previous snapshot
    FULL = "Full"  # all of guest memory


class MemBackendType(enum.StrEnum):
    """Spec `MemoryBackend.backend_type`."""

    FILE = "File"  # backend_path is the memory file, mapped privately
    UFFD = "Uffd"  # backend_path is the socket of a userfaultfd page-fault handler


class SnapshotHugePages(enum.StrEnum):
    """Spec `SnapshotLoadParams.huge_pages` (Firecracker's `SnapshotLoadHugePageConfig`)."""

    SNAPSHOT = "Snapshot"  # what the snapshot recorded (for Ember: no huge pages)
    NONE = "None"
    TRANSPARENT = "Transparent"
    HUGETLBFS_2M = "2M"


_EMBER_HUGE_PAGES = frozenset({SnapshotHugePages.SNAPSHOT, SnapshotHugePages.NONE})
_read_huge_pages_variant = enum_of(SnapshotHugePages)


def _read_huge_pages(value: object, path: str) -> SnapshotHugePages:
    choice = _read_huge_pages_variant(value, path)
    if choice not in _EMBER_HUGE_PAGES:
        raise UnsupportedConfig(
            f"Huge pages (`{choice.value}`) are not supported by Ember: "
            "use `Snapshot` or `None`.",
            path=path,
        )
    return choice


def _read_path(value: object, path: str) -> str:
    """Rust ``PathBuf``: a string (serde names it a "path string")."""
    if not isinstance(value, str):
        raise InvalidType(f"invalid type: {describe(value)}, expected path string", path=path)
    return read_str(value, path)


def _check_path(value: str, what: str, path: str = "") -> None:
    if not value:
        raise InvalidSnapshotPath(f"The {what} path is empty.", path=path)
    if "\0" in value:
        raise InvalidSnapshotPath(f"The {what} path contains a NUL byte.", path=path)


def _check_socket_path(value: str, what: str, path: str = "") -> None:
    _check_path(value, what, path)
    size = len(value.encode("utf-8", "surrogatepass"))
    if size >= UNIX_PATH_MAX:
        raise InvalidUdsPath(
            f"The {what} path is too long: {size} bytes, at most {UNIX_PATH_MAX - 1}.",
            path=path,
        )


def _validate_at(prefix: str, value: ConfigType) -> None:
    """`value.validate()`, any `ConfigError` located under `prefix`."""
    try:
        value.validate()
    except ConfigError as exc:
        raise exc.at(prefix) from exc.__cause__


# --- create ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SnapshotCreateParams(ConfigType):
    """Spec `SnapshotCreateParams`: where to write the microVM state and guest memory."""

    snapshot_path: str
    mem_file_path: str
    snapshot_type: SnapshotType = SnapshotType.FULL

    SCHEMA = Schema(
        "CreateSnapshotParams",
        [
            Field("snapshot_type", enum_of(SnapshotType), default=SnapshotType.FULL),
            Field("snapshot_path", _read_path),
            Field("mem_file_path", _read_path),
        ],
    )

    def validate(self) -> None:
        _check_path(self.snapshot_path, "snapshot", "snapshot_path")
        _check_path(self.mem_file_path, "memory file", "mem_file_path")


# --- load --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryBackend(ConfigType):
    """Spec `MemoryBackend`: where restored guest memory comes from."""

    backend_type: MemBackendType
    backend_path: str

    SCHEMA = Schema(
        "MemBackendConfig",
        [
            Field("backend_path", _read_path),
            Field("backend_type", enum_of(MemBackendType)),
        ],
    )

    def validate(self) -> None:
        if self.backend_type is MemBackendType.UFFD:
            _check_socket_path(self.backend_path, "UFFD handler socket", "backend_path")
        else:
            _check_path(self.backend_path, "memory file", "backend_path")


@dataclass(frozen=True)
class NetworkOverride(ConfigType):
    """Spec `NetworkOverride`: restore interface `iface_id` on another TAP device.

    Unlike Firecracker, Ember refuses unknown fields here too.
    """

    iface_id: str
    host_dev_name: str

    SCHEMA = Schema(
        "NetworkOverride",
        [Field("iface_id", read_str), Field("host_dev_name", read_str)],
    )

    def validate(self) -> None:
        check_resource_id(self.iface_id)
        check_tap_name(self.host_dev_name)


@dataclass(frozen=True)
class VsockOverride(ConfigType):
    """Spec `VsockOverride`: restore the vsock device on another Unix socket path.

    Unlike Firecracker, Ember refuses unknown fields here too.
    """

    uds_path: str

    SCHEMA = Schema("VsockOverride", [Field("uds_path", read_str)])

    def validate(self) -> None:
        _check_socket_path(self.uds_path, "vsock Unix domain socket", "uds_path")


@dataclass(frozen=True)
class DriveOverride(ConfigType):
    """Ember extension: restore block device `drive_id` from another host file.

    The file must hold the disk the snapshot expects (same size and
    contents the guest last saw); Ember cannot check that.
    """

    drive_id: str
    path_on_host: str

    SCHEMA = Schema(
        "DriveOverride",
        [Field("drive_id", read_str), Field("path_on_host", _read_path)],
    )

    def validate(self) -> None:
        check_resource_id(self.drive_id)
        _check_path(self.path_on_host, "drive", "path_on_host")


# The request body (Firecracker's `LoadSnapshotConfig`, plus `drive_overrides`).
_LOAD_BODY = Schema(
    "LoadSnapshotConfig",
    [
        Field("snapshot_path", _read_path),
        Field.option("mem_file_path", _read_path),
        Field.option("mem_backend", nested(MemoryBackend)),
        Field("enable_diff_snapshots", read_bool, default=False),
        Field("track_dirty_pages", read_bool, default=False),
        Field("resume_vm", read_bool, default=False),
        Field("network_overrides", sequence_of(nested(NetworkOverride)), default=()),
        Field.option("vsock_override", nested(VsockOverride)),
        Field("clock_realtime", read_bool, default=False),
        Field("huge_pages", _read_huge_pages, default=SnapshotHugePages.SNAPSHOT, stored=False),
        Field("drive_overrides", sequence_of(nested(DriveOverride)), default=()),
    ],
)

# What `to_json` writes: the body without its deprecated spellings.
_LOAD_WRITTEN = Schema(
    "LoadSnapshotParams",
    [
        Field("snapshot_path", _read_path),
        Field("mem_backend", nested(MemoryBackend)),
        Field("track_dirty_pages", read_bool, default=False),
        Field("resume_vm", read_bool, default=False),
        Field("network_overrides", sequence_of(nested(NetworkOverride)), default=()),
        Field.option("vsock_override", nested(VsockOverride), skip_none=True),
        Field("clock_realtime", read_bool, default=False),
        Field("drive_overrides", sequence_of(nested(DriveOverride)), default=()),
    ],
)


@dataclass(frozen=True)
class SnapshotLoadParams(ConfigType):
    """Spec `SnapshotLoadParams`, normalised: deprecated fields folded in.

    `SCHEMA` describes the request body (every key the API accepts);
    `to_json` writes the normalised form, which parses back to an equal value.
    """

    snapshot_path: str
    mem_backend: MemoryBackend
    track_dirty_pages: bool = False
    resume_vm: bool = False
    network_overrides: tuple[NetworkOverride, ...] = ()
    vsock_override: VsockOverride | None = None
    drive_overrides: tuple[DriveOverride, ...] = ()
    clock_realtime: bool = False

    SCHEMA = _LOAD_BODY

    def __post_init__(self) -> None:
        for name in ("network_overrides", "drive_overrides"):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))

    @classmethod
    def from_json(cls, obj: object, *, path: str = "") -> Self:
        """Parse a PUT /snapshot/load body; raises `ConfigError` (a `ConfigParseError`
        for a shape mismatch, `UnsupportedConfig` for huge pages Ember lacks)."""
        fields = cls.SCHEMA.parse(obj, path)
        mem_file_path: str | None = fields.pop("mem_file_path")
        enable_diff_snapshots: bool = fields.pop("enable_diff_snapshots")
        mem_backend: MemoryBackend | None = fields["mem_backend"]
        if mem_backend is not None and mem_file_path is not None:
            raise ConflictingFields(MEM_BACKEND_TOO_MANY, path=path)
        if mem_backend is None:
            if mem_file_path is None:
                raise MissingField(MEM_BACKEND_MISSING, path=path)
            fields["mem_backend"] = MemoryBackend(MemBackendType.FILE, mem_file_path)
        fields["track_dirty_pages"] = fields["track_dirty_pages"] or enable_diff_snapshots
        return cls(**fields)

    @staticmethod
    def uses_deprecated_fields(obj: Json) -> bool:
        """Whether a load body uses `mem_file_path` or `enable_diff_snapshots`
        (Firecracker then answers with `LOAD_DEPRECATION_MESSAGE`)."""
        return isinstance(obj, dict) and (
            obj.get("mem_file_path") is not None or obj.get("enable_diff_snapshots") is True
        )

    def to_json(self) -> dict[str, Json]:
        return _LOAD_WRITTEN.dump(self)

    def validate(self) -> None:
        _check_path(self.snapshot_path, "snapshot", "snapshot_path")
        _validate_at("mem_backend", self.mem_backend)
        seen_ifaces: set[str] = set()
        for index, net in enumerate(self.network_overrides):
            where = f"network_overrides[{index}]"
            _validate_at(where, net)
            if net.iface_id in seen_ifaces:
                raise DuplicateDeviceId(
                    f"Duplicate iface_id `{net.iface_id}`: each network interface can be "
                    "overridden once.",
                    path=where,
                )
            seen_ifaces.add(net.iface_id)
        if self.vsock_override is not None:
            _validate_at("vsock_override", self.vsock_override)
        seen_drives: set[str] = set()
        for index, drive in enumerate(self.drive_overrides):
            where = f"drive_overrides[{index}]"
            _validate_at(where, drive)
            if drive.drive_id in seen_drives:
                raise DuplicateDeviceId(
                    f"Duplicate drive_id `{drive.drive_id}`: each drive can be overridden once.",
                    path=where,
                )
            seen_drives.add(drive.drive_id)

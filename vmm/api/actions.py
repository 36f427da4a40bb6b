"""What the API asks of the VMM (`VmmAction`) and what the VMM answers (`ApiResult`).

One frozen dataclass per action, named after Firecracker's `VmmAction`
variants (src/vmm/src/rpc_interface.rs). `routes.route` turns an HTTP request
into one; a config file is turned into a list of them
(`controller.actions_from_config`); only `controller.VmmController` executes
them, and it alone knows which are allowed before and after InstanceStart.

An answer is `ApiOk` (200 with a JSON body, or 204 without one) or
`ApiError` (a status, 400 unless said otherwise, and the spec's
``{"fault_message": ...}`` body).
"""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus

from vmm.config import (
    BootSourceConfig,
    DriveConfig,
    DrivePatch,
    EntropyConfig,
    Json,
    LoggerConfig,
    MachineConfigUpdate,
    MetricsConfig,
    MmdsConfig,
    NetworkInterfaceConfig,
    NetworkInterfacePatch,
    SnapshotCreateParams,
    SnapshotLoadParams,
    VsockConfig,
)

__all__ = [
    "ApiError",
    "ApiOk",
    "ApiResult",
    "VmmAction",
    "ConfigureBootSource",
    "ConfigureLogger",
    "ConfigureMetrics",
    "CreateSnapshot",
    "FlushMetrics",
    "GetFullVmConfig",
    "GetInstanceInfo",
    "GetMachineConfig",
    "GetMmds",
    "GetVmmVersion",
    "InsertBlockDevice",
    "InsertNetworkDevice",
    "LoadSnapshot",
    "PatchMmds",
    "Pause",
    "PutMmds",
    "Resume",
    "SendCtrlAltDel",
    "SetEntropyDevice",
    "SetMmdsConfig",
    "SetVsockDevice",
    "StartMicroVm",
    "UpdateBlockDevice",
    "UpdateMachineConfig",
    "UpdateNetworkInterface",
]


# --- answers -------------------------------------------------------------------------


@dataclass(frozen=True)
class ApiOk:
    """Success: 200 with `body` as JSON, or 204 No Content when `body` is None."""

    body: Json | None = None

    @property
    def status(self) -> HTTPStatus:
        return HTTPStatus.NO_CONTENT if self.body is None else HTTPStatus.OK


@dataclass(frozen=True)
class ApiError:
    """Failure: `status` (400 unless said otherwise) with ``{"fault_message": ...}``."""

    fault_message: str
    status: HTTPStatus = HTTPStatus.BAD_REQUEST

    @property
    def body(self) -> Json:
        return {"fault_message": self.fault_message}


ApiResult = ApiOk | ApiError


# --- actions -------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigureBootSource:
    """PUT /boot-source."""

    config: BootSourceConfig


@dataclass(frozen=True)
class ConfigureLogger:
    """PUT /logger."""

    config: LoggerConfig


@dataclass(frozen=True)
class ConfigureMetrics:
    """PUT /metrics."""

    config: MetricsConfig


@dataclass(frozen=True)
class CreateSnapshot:
    """PUT /snapshot/create (post-boot; the microVM must be paused)."""

    params: SnapshotCreateParams


@dataclass(frozen=True)
class FlushMetrics:
    """PUT /actions {"action_type": "FlushMetrics"}."""


@dataclass(frozen=True)
class GetFullVmConfig:
    """GET /vm/config."""


@dataclass(frozen=True)
class GetInstanceInfo:
    """GET /."""


@dataclass(frozen=True)
class GetMachineConfig:
    """GET /machine-config."""


@dataclass(frozen=True)
class GetMmds:
    """GET /mmds."""


@dataclass(frozen=True)
class GetVmmVersion:
    """GET /version."""


@dataclass(frozen=True)
class InsertBlockDevice:
    """PUT /drives/{drive_id}."""

    config: DriveConfig


@dataclass(frozen=True)
class InsertNetworkDevice:
    """PUT /network-interfaces/{iface_id}."""

    config: NetworkInterfaceConfig


@dataclass(frozen=True)
class LoadSnapshot:
    """PUT /snapshot/load (pre-boot, on a fresh VMM).

    `uses_deprecated_fields`: the body named `mem_file_path` or
    `enable_diff_snapshots` (the answer then carries a deprecation notice).
    """

    params: SnapshotLoadParams
    uses_deprecated_fields: bool = False


@dataclass(frozen=True)
class PatchMmds:
    """PATCH /mmds: a JSON merge patch (RFC 7396) of the data store."""

    data: dict[str, Json]


@dataclass(frozen=True)
class Pause:
    """PATCH /vm {"state": "Paused"}."""


@dataclass(frozen=True)
class PutMmds:
    """PUT /mmds (and ``--metadata``): replace the data store."""

    data: dict[str, Json]


@dataclass(frozen=True)
class Resume:
    """PATCH /vm {"state": "Resumed"}."""


@dataclass(frozen=True)
class SendCtrlAltDel:
    """PUT /actions {"action_type": "SendCtrlAltDel"}: keystrokes through the i8042."""


@dataclass(frozen=True)
class SetEntropyDevice:
    """PUT /entropy."""

    config: EntropyConfig


@dataclass(frozen=True)
class SetMmdsConfig:
    """PUT /mmds/config."""

    config: MmdsConfig


@dataclass(frozen=True)
class SetVsockDevice:
    """PUT /vsock."""

    config: VsockConfig


@dataclass(frozen=True)
class StartMicroVm:
    """PUT /actions {"action_type": "InstanceStart"}."""


@dataclass(frozen=True)
class UpdateBlockDevice:
    """PATCH /drives/{drive_id} (post-boot)."""

    patch: DrivePatch


@dataclass(frozen=True)
class UpdateMachineConfig:
    """PUT or PATCH /machine-config: both apply an update (Firecracker's semantics)."""

    update: MachineConfigUpdate


@dataclass(frozen=True)
class UpdateNetworkInterface:
    """PATCH /network-interfaces/{iface_id} (post-boot)."""

    patch: NetworkInterfacePatch


VmmAction = (
    ConfigureBootSource
    | ConfigureLogger
    | ConfigureMetrics
    | CreateSnapshot
    | FlushMetrics
    | GetFullVmConfig
    | GetInstanceInfo
    | GetMachineConfig
    | GetMmds
    | GetVmmVersion
    | InsertBlockDevice
    | InsertNetworkDevice
    | LoadSnapshot
    | PatchMmds
    | Pause
    | PutMmds
    | Resume
    | SendCtrlAltDel
    | SetEntropyDevice
    | SetMmdsConfig
    | SetVsockDevice
    | StartMicroVm
    | UpdateBlockDevice
    | UpdateMachineConfig
    | UpdateNetworkInterface
)

"""Parse, then act: an HTTP request becomes a `VmmAction`, or an `ApiError`.

`route(method, path, body)` is pure: no I/O, no VMM state, no metrics. It
follows Firecracker's `parsed_request.rs` and `request/*.rs`:

* the path is split on ``/`` after its leading slashes; the first segment
  names the resource (``drives``), the next ones its id or sub-resource;
* a body is required for PUT and PATCH ("Empty PUT request.") and refused
  for GET ("GET request cannot have a body.");
* bodies are decoded strictly (`vmm.config.loads`) and parsed by the config
  type's `from_json`; a shape error becomes "An error occurred when
  deserializing the json body of a request: ...". Semantic checks (vCPU
  count, memory size, ...) are the controller's, since some depend on state;
* an id in the path must be a valid resource id and equal the body's id;
* PATCH /machine-config with nothing to change is "Empty PATCH request.".

Ember is stricter in two places: extra path segments (``/drives/a/b``) are
an invalid path, not ignored; and an MMDS body must be a JSON object
(the spec's `MmdsContentsObject`). Endpoints of features Ember does not have
(balloon, custom CPU templates, serial configuration, pmem, memory hotplug,
hot-unplug) answer 400 naming the feature and the request; so does a body
asking for one (huge pages on snapshot load), without the deserializing
prefix.

PUT /snapshot/create and PUT /snapshot/load become `CreateSnapshot` and
`LoadSnapshot`; the load body may carry Ember's `drive_overrides`
extension (see `vmm.config.snapshot`).

`request_metric` names the Firecracker metric a request counts under;
`deprecation_notice` gives the warning Firecracker attaches to deprecated
fields (the response then carries a ``Deprecation`` header).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TypeVar

from vmm.config import (
    LOAD_DEPRECATION_MESSAGE,
    BootSourceConfig,
    ConfigError,
    ConfigParseError,
    DriveConfig,
    DrivePatch,
    EntropyConfig,
    Json,
    LoggerConfig,
    MachineConfig,
    MachineConfigUpdate,
    MetricsConfig,
    MmdsConfig,
    MmdsVersion,
    NetworkInterfaceConfig,
    NetworkInterfacePatch,
    SnapshotCreateParams,
    SnapshotLoadParams,
    VsockConfig,
    check_resource_id,
    loads,
)
from vmm.config.schema import ConfigType, Field, Schema, describe, enum_of

from .actions import (
    ApiError,
    ConfigureBootSource,
    ConfigureLogger,
    ConfigureMetrics,
    CreateSnapshot,
    FlushMetrics,
    GetFullVmConfig,
    GetInstanceInfo,
    GetMachineConfig,
    GetMmds,
    GetVmmVersion,
    InsertBlockDevice,
    InsertNetworkDevice,
    LoadSnapshot,
    PatchMmds,
    Pause,
    PutMmds,
    Resume,
    SendCtrlAltDel,
    SetEntropyDevice,
    SetMmdsConfig,
    SetVsockDevice,
    StartMicroVm,
    UpdateBlockDevice,
    UpdateMachineConfig,
    UpdateNetworkInterface,
    VmmAction,
)

__all__ = ["route", "request_metric", "deprecation_notice", "DESERIALIZE_PREFIX"]

_T = TypeVar("_T", bound=ConfigType)

# Firecracker parsed_request.rs RequestError::SerdeJson.
DESERIALIZE_PREFIX = "An error occurred when deserializing the json body of a request: "
# Firecracker drive.rs / net.rs.
_ID_MISMATCH = "The id from the path does not match the id from the body!"


class _Fault(Exception):
    """A request that cannot become an action; `route` turns it into an `ApiError`."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# --- bodies that have no config type ------------------------------------------------


class ActionType(enum.StrEnum):
    """Spec `InstanceActionInfo.action_type` (Firecracker's declaration order)."""

    FLUSH_METRICS = "FlushMetrics"
    INSTANCE_START = "InstanceStart"
    SEND_CTRL_ALT_DEL = "SendCtrlAltDel"


class VmState(enum.StrEnum):
    """Spec `Vm.state`."""

    PAUSED = "Paused"
    RESUMED = "Resumed"


@dataclass(frozen=True)
class _ActionBody(ConfigType):
    action_type: ActionType

    SCHEMA = Schema("ActionBody", [Field("action_type", enum_of(ActionType))])


@dataclass(frozen=True)
class _VmBody(ConfigType):
    state: VmState

    SCHEMA = Schema("Vm", [Field("state", enum_of(VmState))])


_ACTIONS: dict[ActionType, VmmAction] = {
    ActionType.FLUSH_METRICS: FlushMetrics(),
    ActionType.INSTANCE_START: StartMicroVm(),
    ActionType.SEND_CTRL_ALT_DEL: SendCtrlAltDel(),
}


# --- helpers ----------------------------------------------------------------------------


def _decode(body: bytes) -> Json:
    try:
        return loads(body)
    except ConfigError as exc:
        raise _Fault(f"{DESERIALIZE_PREFIX}{exc}.") from exc


def _from_json(cls: type[_T], value: Json) -> _T:
    try:
        return cls.from_json(value)
    except ConfigParseError as exc:
        raise _Fault(f"{DESERIALIZE_PREFIX}{exc}.") from exc
    except ConfigError as exc:  # well-formed, but asks for something Ember lacks
        raise _Fault(exc.fault_message) from exc


def _parse(cls: type[_T], body: bytes) -> _T:
    return _from_json(cls, _decode(body))


def _parse_object(body: bytes) -> dict[str, Json]:
    value = _decode(body)
    if not isinstance(value, dict):
        raise _Fault(f"{DESERIALIZE_PREFIX}invalid type: {describe(value)}, expected a JSON object.")
    return value


def _path_id(tokens: list[str]) -> str:
    if len(tokens) < 2:
        raise _Fault("The ID cannot be empty.")
    try:
        check_resource_id(tokens[1])
    except ConfigError as exc:
        raise _Fault(exc.fault_message) from exc
    return tokens[1]


def _split(path: str) -> list[str]:
    # Firecracker: trim the leading '/'s, split on '/', drop one trailing empty segment.
    tokens = path.lstrip("/").split("/")
    if len(tokens) > 1 and tokens[-1] == "":
        tokens.pop()
    return tokens


def _invalid(method: str, path: str) -> _Fault:
    return _Fault(f"Invalid request method and/or path: {method} {path}.")


def _unsupported(method: str, path: str, tokens: list[str]) -> str | None:
    """The fault for an endpoint of a feature Ember does not have (None: not one)."""
    resource = tokens[0]
    sub = tokens[1] if len(tokens) > 1 else None
    request = f"{method} {path}"
    if resource == "balloon" and method in ("GET", "PUT", "PATCH"):
        return f"The balloon device is not supported by Ember: {request}."
    if resource == "cpu-config" and method == "PUT":
        return f"Custom CPU templates are not supported by Ember: {request}."
    if resource == "serial" and method == "PUT":
        return f"Configuring the serial device is not supported by Ember: {request}."
    if resource == "hotplug" and sub == "memory" and method in ("GET", "PUT", "PATCH"):
        return f"Memory hotplug (virtio-mem) is not supported by Ember: {request}."
    if resource == "pmem" and method in ("PUT", "PATCH", "DELETE"):
        return f"virtio-pmem devices are not supported by Ember: {request}."
    if resource in ("drives", "network-interfaces") and method == "DELETE":
        return f"Hot-unplugging devices is not supported by Ember: {request}."
    return None


# --- per method ------------------------------------------------------------------------


def _route_get(path: str, tokens: list[str]) -> VmmAction:
    match tokens:
        case [""]:
            return GetInstanceInfo()
        case ["version"]:
            return GetVmmVersion()
        case ["machine-config"]:
            return GetMachineConfig()
        case ["mmds"]:
            return GetMmds()
        case ["vm", "config"]:
            return GetFullVmConfig()
    raise _invalid("GET", path)


def _route_put_snapshot(path: str, tokens: list[str], body: bytes) -> VmmAction:
    # Firecracker api_server/request/snapshot.rs: parse_put_snapshot.
    match tokens:
        case ["snapshot"]:
            raise _Fault("Missing snapshot operation type.")
        case ["snapshot", "create"]:
            return CreateSnapshot(_parse(SnapshotCreateParams, body))
        case ["snapshot", "load"]:
            value = _decode(body)
            return LoadSnapshot(_from_json(SnapshotLoadParams, value),
                                uses_deprecated_fields=SnapshotLoadParams.uses_deprecated_fields(value))
        case ["snapshot", operation]:
            raise _invalid("PUT", f"/snapshot/{operation}")
    raise _invalid("PUT", path)


def _route_put(path: str, tokens: list[str], body: bytes) -> VmmAction:
    resource = tokens[0]
    if resource == "drives" and len(tokens) <= 2:
        drive_id = _path_id(tokens)
        drive = _parse(DriveConfig, body)
        if drive.drive_id != drive_id:
            raise _Fault(_ID_MISMATCH)
        return InsertBlockDevice(drive)
    if resource == "network-interfaces" and len(tokens) <= 2:
        iface_id = _path_id(tokens)
        iface = _parse(NetworkInterfaceConfig, body)
        if iface.iface_id != iface_id:
            raise _Fault(f"The id from the path [{iface_id}] does not match the id from the body "
                         f"[{iface.iface_id}]!")
        return InsertNetworkDevice(iface)
    if resource == "mmds" and len(tokens) <= 2:
        if len(tokens) == 1:
            return PutMmds(_parse_object(body))
        if tokens[1] == "config":
            return SetMmdsConfig(_parse(MmdsConfig, body))
        raise _Fault(f"Unrecognized PUT request path `{tokens[1]}`.")
    if resource == "snapshot":
        return _route_put_snapshot(path, tokens, body)
    if len(tokens) != 1:
        raise _invalid("PUT", path)
    match resource:
        case "actions":
            return _ACTIONS[_parse(_ActionBody, body).action_type]
        case "boot-source":
            return ConfigureBootSource(_parse(BootSourceConfig, body))
        case "machine-config":
            # PUT gives the whole configuration; it is applied as an update, as in Firecracker.
            return UpdateMachineConfig(MachineConfigUpdate.from_machine_config(_parse(MachineConfig, body)))
        case "logger":
            return ConfigureLogger(_parse(LoggerConfig, body))
        case "metrics":
            return ConfigureMetrics(_parse(MetricsConfig, body))
        case "vsock":
            return SetVsockDevice(_parse(VsockConfig, body))
        case "entropy":
            return SetEntropyDevice(_parse(EntropyConfig, body))
    raise _invalid("PUT", path)


def _route_patch(path: str, tokens: list[str], body: bytes) -> VmmAction:
    resource = tokens[0]
    if resource == "drives" and len(tokens) <= 2:
        drive_id = _path_id(tokens)
        patch = _parse(DrivePatch, body)
        if patch.drive_id != drive_id:
            raise _Fault(_ID_MISMATCH)
        return UpdateBlockDevice(patch)
    if resource == "network-interfaces" and len(tokens) <= 2:
        iface_id = _path_id(tokens)
        ipatch = _parse(NetworkInterfacePatch, body)
        if ipatch.iface_id != iface_id:
            raise _Fault(f"The id from the path [{iface_id}] does not match the id from the body "
                         f"[{ipatch.iface_id}]!")
        return UpdateNetworkInterface(ipatch)
    if len(tokens) != 1:
        raise _invalid("PATCH", path)
    match resource:
        case "machine-config":
            update = _parse(MachineConfigUpdate, body)
            if update.is_empty:
                raise _Fault("Empty PATCH request.")
            return UpdateMachineConfig(update)
        case "mmds":
            return PatchMmds(_parse_object(body))
        case "vm":
            state = _parse(_VmBody, body).state
            return Pause() if state is VmState.PAUSED else Resume()
    raise _invalid("PATCH", path)


_KNOWN_PUT = frozenset({"actions", "boot-source", "drives", "entropy", "logger", "machine-config",
                        "metrics", "mmds", "network-interfaces", "snapshot", "vsock"})
_KNOWN_PATCH = frozenset({"drives", "machine-config", "mmds", "network-interfaces", "vm"})


def route(method: str, path: str, body: bytes) -> VmmAction | ApiError:
    """The action for an API request, or the 400 answer explaining why there is none.

    `method` is the HTTP method (any case), `path` the request target's path
    (no query string), `body` the raw payload (empty when there was none).
    """
    method = method.upper()
    tokens = _split(path)
    try:
        reason = _unsupported(method, path, tokens)
        if reason is not None:
            raise _Fault(reason)
        if method == "GET":
            if body:
                raise _Fault("GET request cannot have a body.")
            return _route_get(path, tokens)
        if method == "PUT":
            if tokens[0] not in _KNOWN_PUT:
                raise _invalid(method, path)
            if not body:
                raise _Fault("Empty PUT request.")
            return _route_put(path, tokens, body)
        if method == "PATCH":
            if tokens[0] not in _KNOWN_PATCH:
                raise _invalid(method, path)
            if not body:
                raise _Fault("Empty PATCH request.")
            return _route_patch(path, tokens, body)
        raise _invalid(method, path)
    except _Fault as fault:
        return ApiError(fault.message)


# --- metrics and deprecations -----------------------------------------------------------

# Firecracker logger/metrics.rs: GetRequestsMetrics, PutRequestsMetrics, PatchRequestsMetrics.
_GET_METRICS = {"": "instance_info", "machine-config": "machine_cfg", "mmds": "mmds", "version": "vmm_version",
                "hotplug": "hotplug_memory"}
_PUT_METRICS = {"actions": "actions", "boot-source": "boot_source", "drives": "drive", "logger": "logger",
                "machine-config": "machine_cfg", "cpu-config": "cpu_cfg", "metrics": "metrics",
                "network-interfaces": "network", "mmds": "mmds", "vsock": "vsock", "pmem": "pmem",
                "serial": "serial", "hotplug": "hotplug_memory"}
_PATCH_METRICS = {"drives": "drive", "network-interfaces": "network", "machine-config": "machine_cfg",
                  "mmds": "mmds", "hotplug": "hotplug_memory", "pmem": "pmem"}
_METRIC_TABLES = {"GET": ("get_api_requests", _GET_METRICS), "PUT": ("put_api_requests", _PUT_METRICS),
                  "PATCH": ("patch_api_requests", _PATCH_METRICS)}


def request_metric(method: str, path: str) -> tuple[str, str] | None:
    """``(section, name)`` of the Firecracker counters a request counts under.

    The request counts in ``<section>.<name>_count``; a failed PUT or PATCH
    also in ``<section>.<name>_fails``. None when Firecracker keeps no
    counter for the endpoint (e.g. GET /vm/config).
    """
    table = _METRIC_TABLES.get(method.upper())
    if table is None:
        return None
    section, names = table
    name = names.get(_split(path)[0])
    return None if name is None else (section, name)


def deprecation_notice(method: str, action: VmmAction) -> str | None:
    """Firecracker's warning for a request that uses a deprecated field, if any."""
    match action:
        case UpdateMachineConfig(update=update) if update.cpu_template is not None:
            return f"{method.upper()} /machine-config: cpu_template field is deprecated."
        case SetVsockDevice(config=config) if config.vsock_id is not None:
            return "PUT /vsock: vsock_id field is deprecated."
        case SetMmdsConfig(config=config) if config.version is MmdsVersion.V1:
            return "PUT /mmds/config: V1 is deprecated. Use V2 instead."
        case LoadSnapshot(uses_deprecated_fields=True):
            return LOAD_DEPRECATION_MESSAGE
    return None

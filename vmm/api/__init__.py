"""Ember's Firecracker-compatible REST API (contract: ../shared/reference/firecracker-api-v1.17.yaml).

The layers, top to bottom:

* `server.ApiServer` — HTTP/1.1 (h11) on the Unix socket, on its own thread;
* `handler.ApiHandler` — one request in, one reply out: routes, counts, logs;
* `routes.route` — pure: (method, path, body) -> `VmmAction` or `ApiError`;
* `channel.EventLoopChannel` — hands the action to the VMM event loop thread;
* `controller.VmmController` — executes it before boot (the resources being
  configured) or after (the running `Vmm`), and knows which phase allows what.
"""

from .actions import (
    ApiError,
    ApiOk,
    ApiResult,
    ConfigureBootSource,
    ConfigureLogger,
    ConfigureMetrics,
    FlushMetrics,
    GetFullVmConfig,
    GetInstanceInfo,
    GetMachineConfig,
    GetMmds,
    GetVmmVersion,
    InsertBlockDevice,
    InsertNetworkDevice,
    PatchMmds,
    Pause,
    PutMmds,
    Resume,
    SendCtrlAltDel,
    SetEntropyDevice,
    SetMmdsConfig,
    SetVsockDevice,
    StartMicroVm,
    CreateSnapshot,
    LoadSnapshot,
    UpdateBlockDevice,
    UpdateMachineConfig,
    UpdateNetworkInterface,
    VmmAction,
)
from .channel import ChannelClosed, ChannelError, EventLoopChannel
from .controller import (
    ALLOWED_PHASES,
    APP_NAME,
    FIRECRACKER_API_VERSION,
    InstanceState,
    Phase,
    VmmController,
    VmResources,
    actions_from_config,
)
from .handler import ApiHandler, Reply
from .routes import deprecation_notice, request_metric, route
from .server import HTTP_MAX_PAYLOAD_SIZE, MAX_CONNECTIONS, ApiServer, ApiServerError, RequestHandler, SocketInUse

__all__ = [
    # answers
    "ApiError",
    "ApiOk",
    "ApiResult",
    # actions
    "VmmAction",
    "ConfigureBootSource",
    "ConfigureLogger",
    "ConfigureMetrics",
    "FlushMetrics",
    "GetFullVmConfig",
    "GetInstanceInfo",
    "GetMachineConfig",
    "GetMmds",
    "GetVmmVersion",
    "InsertBlockDevice",
    "InsertNetworkDevice",
    "PatchMmds",
    "Pause",
    "PutMmds",
    "Resume",
    "SendCtrlAltDel",
    "SetEntropyDevice",
    "SetMmdsConfig",
    "SetVsockDevice",
    "StartMicroVm",
    "CreateSnapshot",
    "LoadSnapshot",
    "UpdateBlockDevice",
    "UpdateMachineConfig",
    "UpdateNetworkInterface",
    # routing
    "route",
    "request_metric",
    "deprecation_notice",
    # execution
    "VmmController",
    "VmResources",
    "InstanceState",
    "Phase",
    "ALLOWED_PHASES",
    "APP_NAME",
    "FIRECRACKER_API_VERSION",
    "actions_from_config",
    "EventLoopChannel",
    "ChannelError",
    "ChannelClosed",
    # HTTP
    "ApiHandler",
    "Reply",
    "ApiServer",
    "ApiServerError",
    "SocketInUse",
    "RequestHandler",
    "HTTP_MAX_PAYLOAD_SIZE",
    "MAX_CONNECTIONS",
]

"""`vmm.api.routes`: every endpoint, every way a request can be refused (pure, no I/O)."""

from __future__ import annotations

import json

import pytest

from vmm.api import (
    ApiError,
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
    UpdateBlockDevice,
    UpdateMachineConfig,
    UpdateNetworkInterface,
    deprecation_notice,
    request_metric,
    route,
)
from vmm.config import (
    BootSourceConfig,
    CpuTemplate,
    DriveConfig,
    DrivePatch,
    EntropyConfig,
    HugePages,
    LoggerConfig,
    LogLevel,
    MacAddr,
    MachineConfigUpdate,
    MetricsConfig,
    MmdsConfig,
    MmdsVersion,
    NetworkInterfaceConfig,
    NetworkInterfacePatch,
    VsockConfig,
)

DESER = "An error occurred when deserializing the json body of a request: "


def body(obj: object) -> bytes:
    return json.dumps(obj).encode()


# --- every endpoint Ember implements ---------------------------------------------------

ROUTED = [
    ("GET", "/", b"", GetInstanceInfo()),
    ("GET", "/version", b"", GetVmmVersion()),
    ("GET", "/machine-config", b"", GetMachineConfig()),
    ("GET", "/mmds", b"", GetMmds()),
    ("GET", "/vm/config", b"", GetFullVmConfig()),
    ("PUT", "/boot-source", body({"kernel_image_path": "/k", "boot_args": "console=ttyS0"}),
     ConfigureBootSource(BootSourceConfig("/k", boot_args="console=ttyS0"))),
    ("PUT", "/machine-config", body({"vcpu_count": 2, "mem_size_mib": 256}),
     UpdateMachineConfig(MachineConfigUpdate(vcpu_count=2, mem_size_mib=256, smt=False, track_dirty_pages=False,
                                             huge_pages=HugePages.NONE))),
    ("PATCH", "/machine-config", body({"mem_size_mib": 512}), UpdateMachineConfig(MachineConfigUpdate(mem_size_mib=512))),
    ("PUT", "/drives/rootfs", body({"drive_id": "rootfs", "path_on_host": "/r.ext4", "is_root_device": True,
                                    "is_read_only": False}),
     InsertBlockDevice(DriveConfig("rootfs", path_on_host="/r.ext4", is_root_device=True, is_read_only=False))),
    ("PATCH", "/drives/rootfs", body({"drive_id": "rootfs", "path_on_host": "/new.ext4"}),
     UpdateBlockDevice(DrivePatch("rootfs", path_on_host="/new.ext4"))),
    ("PUT", "/network-interfaces/net1", body({"iface_id": "net1", "host_dev_name": "tap0",
                                              "guest_mac": "06:00:AC:10:00:02"}),
     InsertNetworkDevice(NetworkInterfaceConfig("net1", "tap0", guest_mac=MacAddr.parse("06:00:ac:10:00:02")))),
    ("PATCH", "/network-interfaces/net1", body({"iface_id": "net1"}),
     UpdateNetworkInterface(NetworkInterfacePatch("net1"))),
    ("PUT", "/vsock", body({"guest_cid": 3, "uds_path": "/v.sock"}), SetVsockDevice(VsockConfig(3, "/v.sock"))),
    ("PUT", "/entropy", body({}), SetEntropyDevice(EntropyConfig())),
    ("PUT", "/logger", body({"log_path": "/l", "level": "debug", "show_level": True}),
     ConfigureLogger(LoggerConfig(log_path="/l", level=LogLevel.DEBUG, show_level=True))),
    ("PUT", "/metrics", body({"metrics_path": "/m"}), ConfigureMetrics(MetricsConfig("/m"))),
    ("PUT", "/mmds", body({"latest": {"meta-data": {"id": "i-1"}}}), PutMmds({"latest": {"meta-data": {"id": "i-1"}}})),
    ("PATCH", "/mmds", body({"latest": None}), PatchMmds({"latest": None})),
    ("PUT", "/mmds/config", body({"network_interfaces": ["net1"], "version": "V2"}),
     SetMmdsConfig(MmdsConfig(("net1",), version=MmdsVersion.V2))),
    ("PUT", "/actions", body({"action_type": "InstanceStart"}), StartMicroVm()),
    ("PUT", "/actions", body({"action_type": "SendCtrlAltDel"}), SendCtrlAltDel()),
    ("PUT", "/actions", body({"action_type": "FlushMetrics"}), FlushMetrics()),
    ("PATCH", "/vm", body({"state": "Paused"}), Pause()),
    ("PATCH", "/vm", body({"state": "Resumed"}), Resume()),
]


@pytest.mark.parametrize("method,path,payload,expected", ROUTED, ids=[f"{m} {p} {i}" for i, (m, p, _, _) in
                                                                     enumerate(ROUTED)])
def test_every_endpoint_becomes_its_action(method: str, path: str, payload: bytes, expected: object) -> None:
    assert route(method, path, payload) == expected


def test_put_machine_config_is_applied_as_an_update_of_every_field() -> None:
    action = route("PUT", "/machine-config", body({"vcpu_count": 2, "mem_size_mib": 256}))
    assert isinstance(action, UpdateMachineConfig)
    update = action.update
    assert (update.vcpu_count, update.mem_size_mib, update.smt, update.track_dirty_pages) == (2, 256, False, False)
    assert update.cpu_template is None  # a PUT without a template keeps the current one (Firecracker)


@pytest.mark.parametrize("path", ["//", "/version/", "//version", "/vm/config/"])
def test_leading_and_one_trailing_slash_are_ignored(path: str) -> None:
    assert not isinstance(route("GET", path, b""), ApiError)


def test_method_is_case_insensitive() -> None:
    assert route("get", "/version", b"") == GetVmmVersion()


def test_multiline_json_as_curl_sends_it() -> None:
    payload = b'{\n        "action_type": "InstanceStart"\n    }'
    assert route("PUT", "/actions", payload) == StartMicroVm()


# --- refusals -----------------------------------------------------------------------------

REFUSED = [
    # method and path
    ("POST", "/actions", b"{}", "Invalid request method and/or path: POST /actions."),
    ("DELETE", "/machine-config", b"", "Invalid request method and/or path: DELETE /machine-config."),
    ("GET", "/nope", b"", "Invalid request method and/or path: GET /nope."),
    ("PUT", "/nope", b"{}", "Invalid request method and/or path: PUT /nope."),
    ("PATCH", "/boot-source", b"{}", "Invalid request method and/or path: PATCH /boot-source."),
    ("GET", "/vm", b"", "Invalid request method and/or path: GET /vm."),
    ("PUT", "/drives/a/b", body({"drive_id": "a"}), "Invalid request method and/or path: PUT /drives/a/b."),
    ("PUT", "/actions/x", body({}), "Invalid request method and/or path: PUT /actions/x."),
    ("PUT", "/snapshot/other", body({}), "Invalid request method and/or path: PUT /snapshot/other."),
    ("PUT", "/snapshot", body({}), "Missing snapshot operation type."),
    ("PUT", "/mmds/other", body({}), "Unrecognized PUT request path `other`."),
    # bodies
    ("GET", "/", b"{}", "GET request cannot have a body."),
    ("PUT", "/boot-source", b"", "Empty PUT request."),
    ("PATCH", "/vm", b"", "Empty PATCH request."),
    ("PATCH", "/machine-config", b"{}", "Empty PATCH request."),
    ("PUT", "/actions", b"{", DESER + "Invalid JSON"),
    ("PUT", "/actions", b"\xff", DESER + "Invalid JSON: invalid UTF-8"),
    ("PUT", "/actions", body({"action_type": "Reboot"}), DESER + "action_type: unknown variant `Reboot`"),
    ("PUT", "/actions", body({"action_type": "InstanceStart", "x": 1}), DESER + "unknown field `x`"),
    ("PUT", "/actions", b'{"action_type": "InstanceStart", "action_type": "InstanceStart"}',
     DESER + "duplicate field `action_type`"),
    ("PUT", "/boot-source", body({"kernel_image_path": "/k", "bogus": True}), DESER + "unknown field `bogus`"),
    ("PUT", "/boot-source", body({}), DESER + "missing field `kernel_image_path`"),
    ("PUT", "/machine-config", body({"vcpu_count": "2", "mem_size_mib": 128}),
     DESER + "vcpu_count: invalid type: string \"2\", expected u8"),
    ("PUT", "/machine-config", body({"vcpu_count": 256, "mem_size_mib": 128}),
     DESER + "vcpu_count: invalid value: integer `256`, expected u8"),
    ("PUT", "/machine-config", body({"mem_size_mib": 128}), DESER + "missing field `vcpu_count`"),
    ("PUT", "/machine-config", body({"vcpu_count": 1.0, "mem_size_mib": 128}), DESER + "vcpu_count: invalid type"),
    ("PATCH", "/machine-config", body({"smt": 1}), DESER + "smt: invalid type: integer `1`, expected a boolean"),
    ("PATCH", "/vm", body({"state": "Stopped"}), DESER + "state: unknown variant `Stopped`"),
    ("PUT", "/mmds", body([1, 2]), DESER + "invalid type: sequence, expected a JSON object."),
    ("PATCH", "/mmds", body("x"), DESER + "invalid type: string \"x\", expected a JSON object."),
    ("PUT", "/mmds/config", body({"network_interfaces": "eth0"}), DESER + "network_interfaces: invalid type"),
    ("PUT", "/logger", body({"level": "Loud"}), DESER + "level: Invalid LevelFilter"),
    ("PUT", "/metrics", body({}), DESER + "missing field `metrics_path`"),
    ("PUT", "/vsock", body({"guest_cid": -1, "uds_path": "/v"}), DESER + "guest_cid: invalid value"),
    ("PUT", "/entropy", body({"rate_limiter": {"bandwidth": {"size": 1}}}), DESER + "rate_limiter.bandwidth: missing field `refill_time`"),
    # ids
    ("PUT", "/drives", body({"drive_id": "a", "is_root_device": False}), "The ID cannot be empty."),
    ("PUT", "/drives/", body({"drive_id": "a", "is_root_device": False}), "The ID cannot be empty."),
    ("PUT", "/drives/a-b", body({"drive_id": "a-b", "is_root_device": False}),
     "API Resource IDs can only contain alphanumeric characters and underscores."),
    ("PUT", "/drives/a", body({"drive_id": "b", "is_root_device": False, "path_on_host": "/x"}),
     "The id from the path does not match the id from the body!"),
    ("PATCH", "/drives/a", body({"drive_id": "b"}), "The id from the path does not match the id from the body!"),
    ("PUT", "/network-interfaces/a", body({"iface_id": "b", "host_dev_name": "tap0"}),
     "The id from the path [a] does not match the id from the body [b]!"),
    ("PATCH", "/network-interfaces/a", body({"iface_id": "b"}),
     "The id from the path [a] does not match the id from the body [b]!"),
    ("PATCH", "/network-interfaces", body({"iface_id": "b"}), "The ID cannot be empty."),
]


@pytest.mark.parametrize("method,path,payload,message", REFUSED,
                         ids=[f"{m} {p} {i}" for i, (m, p, _, _) in enumerate(REFUSED)])
def test_refused_requests_answer_400_with_a_fault_message(method: str, path: str, payload: bytes,
                                                          message: str) -> None:
    result = route(method, path, payload)
    assert isinstance(result, ApiError), result
    assert result.status == 400
    assert result.fault_message.startswith(message), result.fault_message
    assert result.body == {"fault_message": result.fault_message}


UNSUPPORTED = [
    ("PUT", "/balloon", "balloon"), ("GET", "/balloon", "balloon"), ("PATCH", "/balloon", "balloon"),
    ("GET", "/balloon/statistics", "balloon"), ("PATCH", "/balloon/statistics", "balloon"),
    ("PATCH", "/balloon/hinting/start", "balloon"), ("GET", "/balloon/hinting/status", "balloon"),
    ("PATCH", "/balloon/hinting/stop", "balloon"),
    ("PUT", "/cpu-config", "CPU templates"),
    ("PUT", "/serial", "serial"),
    ("PUT", "/hotplug/memory", "Memory hotplug"), ("PATCH", "/hotplug/memory", "Memory hotplug"),
    ("GET", "/hotplug/memory", "Memory hotplug"),
    ("PUT", "/pmem/p0", "pmem"), ("PATCH", "/pmem/p0", "pmem"), ("DELETE", "/pmem/p0", "pmem"),
    ("DELETE", "/drives/rootfs", "Hot-unplugging"), ("DELETE", "/network-interfaces/net1", "Hot-unplugging"),
]


@pytest.mark.parametrize("method,path,feature", UNSUPPORTED)
@pytest.mark.parametrize("payload", [b"", b'{"amount_mib": 1, "deflate_on_oom": true}'])
def test_features_ember_lacks_are_refused_by_name(method: str, path: str, feature: str, payload: bytes) -> None:
    result = route(method, path, payload)
    assert isinstance(result, ApiError) and result.status == 400
    assert feature in result.fault_message and f"{method} {path}" in result.fault_message


# --- metrics and deprecations ------------------------------------------------------------------


@pytest.mark.parametrize("method,path,metric", [
    ("GET", "/", ("get_api_requests", "instance_info")),
    ("GET", "/machine-config", ("get_api_requests", "machine_cfg")),
    ("GET", "/mmds", ("get_api_requests", "mmds")),
    ("GET", "/version", ("get_api_requests", "vmm_version")),
    ("GET", "/vm/config", None),
    ("PUT", "/actions", ("put_api_requests", "actions")),
    ("PUT", "/boot-source", ("put_api_requests", "boot_source")),
    ("PUT", "/drives/x", ("put_api_requests", "drive")),
    ("PUT", "/network-interfaces/x", ("put_api_requests", "network")),
    ("PUT", "/mmds/config", ("put_api_requests", "mmds")),
    ("PUT", "/logger", ("put_api_requests", "logger")),
    ("PUT", "/metrics", ("put_api_requests", "metrics")),
    ("PUT", "/vsock", ("put_api_requests", "vsock")),
    ("PUT", "/entropy", None),
    ("PATCH", "/drives/x", ("patch_api_requests", "drive")),
    ("PATCH", "/machine-config", ("patch_api_requests", "machine_cfg")),
    ("PATCH", "/vm", None),
    ("DELETE", "/drives/x", None),
])
def test_request_metric_names_follow_firecracker(method: str, path: str, metric: tuple | None) -> None:
    assert request_metric(method, path) == metric


def test_deprecation_notices() -> None:
    put_mc = route("PUT", "/machine-config", body({"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "T2"}))
    assert isinstance(put_mc, UpdateMachineConfig) and put_mc.update.cpu_template is CpuTemplate.T2
    assert deprecation_notice("PUT", put_mc) == "PUT /machine-config: cpu_template field is deprecated."
    patch_mc = route("PATCH", "/machine-config", body({"cpu_template": "None"}))
    assert deprecation_notice("PATCH", patch_mc) == "PATCH /machine-config: cpu_template field is deprecated."
    vsock = route("PUT", "/vsock", body({"vsock_id": "v", "guest_cid": 3, "uds_path": "/v"}))
    assert deprecation_notice("PUT", vsock) == "PUT /vsock: vsock_id field is deprecated."
    v1 = route("PUT", "/mmds/config", body({"network_interfaces": ["a"]}))
    assert deprecation_notice("PUT", v1) == "PUT /mmds/config: V1 is deprecated. Use V2 instead."
    v2 = route("PUT", "/mmds/config", body({"network_interfaces": ["a"], "version": "V2"}))
    assert deprecation_notice("PUT", v2) is None
    assert deprecation_notice("PUT", route("PUT", "/machine-config", body({"vcpu_count": 1, "mem_size_mib": 1}))) \
        is None

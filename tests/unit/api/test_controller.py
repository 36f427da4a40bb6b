"""`VmmController`: which action runs when, what each does to the configuration and the microVM."""

from __future__ import annotations

import json
import typing

import pytest

from vmm.api import (
    ALLOWED_PHASES,
    ApiError,
    ApiOk,
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
    InstanceState,
    LoadSnapshot,
    PatchMmds,
    Pause,
    Phase,
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
    VmmController,
    actions_from_config,
)
from vmm.config import (
    BalloonConfig,
    BootSourceConfig,
    CpuConfig,
    DriveConfig,
    DrivePatch,
    EntropyConfig,
    LoggerConfig,
    MacAddr,
    MemBackendType,
    MemoryBackend,
    MachineConfig,
    MachineConfigUpdate,
    MetricsConfig,
    MmdsConfig,
    MmdsVersion,
    NetworkInterfaceConfig,
    NetworkInterfacePatch,
    RateLimiterConfig,
    SnapshotCreateParams,
    SnapshotLoadParams,
    TokenBucketConfig,
    UnsupportedConfig,
    VmConfig,
    VsockConfig,
)
from vmm.devices.legacy import COM1_BASE

POST_BOOT_ONLY = "The requested operation is not supported after starting the microVM."
PRE_BOOT_ONLY = "The requested operation is not supported before starting the microVM."


def ok(result) -> ApiOk:
    assert isinstance(result, ApiOk), result
    return result


def err(result, startswith: str = "", status: int = 400) -> ApiError:
    assert isinstance(result, ApiError), result
    assert result.status == status, result
    assert result.fault_message.startswith(startswith), result.fault_message
    return result


def boot(controller: VmmController, kernel: str) -> None:
    ok(controller.handle(ConfigureBootSource(BootSourceConfig(kernel, boot_args="mode=echo"))))
    ok(controller.handle(StartMicroVm()))


SAMPLES: list[VmmAction] = [
    CreateSnapshot(SnapshotCreateParams("/nonexistent/s", "/nonexistent/m")),
    LoadSnapshot(SnapshotLoadParams("/nonexistent/s", MemoryBackend(MemBackendType.FILE, "/nonexistent/m"))),
    ConfigureBootSource(BootSourceConfig("/nonexistent")),
    ConfigureLogger(LoggerConfig()),
    ConfigureMetrics(MetricsConfig("/nonexistent/dir/m")),
    FlushMetrics(),
    GetFullVmConfig(),
    GetInstanceInfo(),
    GetMachineConfig(),
    GetMmds(),
    GetVmmVersion(),
    InsertBlockDevice(DriveConfig("d", path_on_host="/d", is_root_device=False)),
    InsertNetworkDevice(NetworkInterfaceConfig("n", "tap0")),
    PatchMmds({"a": 1}),
    Pause(),
    PutMmds({"a": 1}),
    Resume(),
    SendCtrlAltDel(),
    SetEntropyDevice(EntropyConfig()),
    SetMmdsConfig(MmdsConfig(("n",))),
    SetVsockDevice(VsockConfig(3, "/v.sock")),
    StartMicroVm(),
    UpdateBlockDevice(DrivePatch("d")),
    UpdateMachineConfig(MachineConfigUpdate(vcpu_count=2)),
    UpdateNetworkInterface(NetworkInterfacePatch("n")),
]


def test_the_phase_table_covers_every_action() -> None:
    assert set(ALLOWED_PHASES) == set(typing.get_args(VmmAction)) == {type(a) for a in SAMPLES}


@pytest.mark.parametrize("action", SAMPLES, ids=lambda a: type(a).__name__)
def test_pre_boot_refuses_exactly_the_post_boot_only_actions(controller: VmmController, action: VmmAction) -> None:
    result = controller.handle(action)
    if Phase.PRE_BOOT in ALLOWED_PHASES[type(action)]:
        assert not (isinstance(result, ApiError) and result.fault_message == PRE_BOOT_ONLY)
    else:
        err(result, PRE_BOOT_ONLY)


@pytest.mark.parametrize("action", SAMPLES, ids=lambda a: type(a).__name__)
def test_post_boot_refuses_exactly_the_pre_boot_only_actions(controller: VmmController, kernel: str,
                                                             action: VmmAction) -> None:
    boot(controller, kernel)
    result = controller.handle(action)
    if Phase.POST_BOOT in ALLOWED_PHASES[type(action)]:
        assert not (isinstance(result, ApiError) and result.fault_message == POST_BOOT_ONLY)
    else:
        err(result, POST_BOOT_ONLY)


# --- instance info and start ------------------------------------------------------------


def test_instance_info_follows_the_lifecycle(controller: VmmController, kernel: str) -> None:
    info = ok(controller.handle(GetInstanceInfo())).body
    assert info == {"id": "vm-1", "state": "Not started", "vmm_version": controller.vmm_version, "app_name": "Ember"}
    boot(controller, kernel)
    assert ok(controller.handle(GetInstanceInfo())).body["state"] == "Running"
    ok(controller.handle(Pause()))
    assert controller.state is InstanceState.PAUSED
    assert ok(controller.handle(GetInstanceInfo())).body["state"] == "Paused"
    ok(controller.handle(Resume()))
    assert ok(controller.handle(GetInstanceInfo())).body["state"] == "Running"


def test_version(controller: VmmController) -> None:
    assert ok(controller.handle(GetVmmVersion())).body == {"firecracker_version": "1.17.0"}


def test_instance_start_needs_a_boot_source(controller: VmmController, builder) -> None:
    err(controller.handle(StartMicroVm()), "Start microvm error: Cannot start microvm without kernel configuration.")
    assert builder.configs == [] and controller.phase is Phase.PRE_BOOT


def test_a_refused_instance_start_keeps_the_vmm_configurable(controller: VmmController, builder, kernel) -> None:
    ok(controller.handle(ConfigureBootSource(BootSourceConfig(kernel))))
    ok(controller.handle(InsertBlockDevice(DriveConfig("rootfs", path_on_host="/r", is_root_device=True))))
    builder.refusal = '"drives" is not supported yet (virtio devices are not implemented)'
    result = err(controller.handle(StartMicroVm()), "Start microvm error: ")
    assert "drives" in result.fault_message
    assert controller.phase is Phase.PRE_BOOT and controller.vmm is None
    assert builder.configs[0].drives[0].drive_id == "rootfs"
    builder.refusal = None
    ok(controller.handle(StartMicroVm()))
    assert controller.vmm is builder.vmm and controller.state is InstanceState.RUNNING


def test_instance_start_twice(controller: VmmController, kernel: str) -> None:
    boot(controller, kernel)
    err(controller.handle(StartMicroVm()), POST_BOOT_ONLY)


def test_an_unexpected_builder_failure_answers_500_and_keeps_serving(controller, builder, kernel) -> None:
    ok(controller.handle(ConfigureBootSource(BootSourceConfig(kernel))))
    builder.crash = RuntimeError("bug")
    err(controller.handle(StartMicroVm()), "Internal VMM error", status=500)
    assert controller.phase is Phase.PRE_BOOT
    assert ok(controller.handle(GetInstanceInfo())).body["state"] == "Not started"


def test_the_builder_gets_the_whole_configuration(controller: VmmController, builder, kernel) -> None:
    ok(controller.handle(UpdateMachineConfig(MachineConfigUpdate(vcpu_count=2, mem_size_mib=256))))
    ok(controller.handle(ConfigureBootSource(BootSourceConfig(kernel, boot_args="mode=smp"))))
    ok(controller.handle(SetVsockDevice(VsockConfig(3, "/v.sock"))))
    ok(controller.handle(SetEntropyDevice(EntropyConfig())))
    ok(controller.handle(StartMicroVm()))
    config = builder.configs[0]
    assert (config.machine_config.vcpu_count, config.machine_config.mem_size_mib) == (2, 256)
    assert config.boot_source.boot_args == "mode=smp"
    assert config.vsock == VsockConfig(3, "/v.sock") and config.entropy == EntropyConfig()
    assert len(builder.vmm.vcpus) == 2


# --- configuration rules ------------------------------------------------------------------


def test_boot_source_files_must_open(controller: VmmController, kernel: str, tmp_path) -> None:
    err(controller.handle(ConfigureBootSource(BootSourceConfig(str(tmp_path / "missing")))),
        "Boot source error: The kernel file cannot be opened: No such file or directory")
    err(controller.handle(ConfigureBootSource(BootSourceConfig(kernel, initrd_path=str(tmp_path / "no-initrd")))),
        "Boot source error: The initrd file cannot be opened")
    err(controller.handle(ConfigureBootSource(BootSourceConfig(""))), "Boot source error: The kernel file")
    err(controller.handle(ConfigureBootSource(BootSourceConfig(kernel, boot_args="a\x01b"))),
        "Boot source error: The kernel command line is invalid")
    assert controller.resources.boot_source is None


@pytest.mark.parametrize("update,message", [
    (MachineConfigUpdate(vcpu_count=0), "The number of vCPUs must be greater than 0"),
    (MachineConfigUpdate(vcpu_count=33), "The number of vCPUs must be greater than 0"),
    (MachineConfigUpdate(vcpu_count=3, smt=True), "The number of vCPUs"),
    (MachineConfigUpdate(mem_size_mib=0), "The memory size (MiB) is either 0"),
])
def test_machine_config_values_are_checked(controller: VmmController, update, message: str) -> None:
    err(controller.handle(UpdateMachineConfig(update)), f"Machine config error: {message}")
    assert controller.resources.machine_config == MachineConfig()


def test_machine_config_patch_keeps_other_fields(controller: VmmController) -> None:
    ok(controller.handle(UpdateMachineConfig(MachineConfigUpdate.from_machine_config(
        MachineConfig(vcpu_count=2, mem_size_mib=512, track_dirty_pages=True)))))
    ok(controller.handle(UpdateMachineConfig(MachineConfigUpdate(mem_size_mib=256))))
    assert ok(controller.handle(GetMachineConfig())).body == {
        "vcpu_count": 2, "mem_size_mib": 256, "smt": False, "track_dirty_pages": True, "huge_pages": "None"}


def test_drives_rules(controller: VmmController) -> None:
    root = DriveConfig("rootfs", path_on_host="/r", is_root_device=True)
    ok(controller.handle(InsertBlockDevice(root)))
    err(controller.handle(InsertBlockDevice(DriveConfig("other", path_on_host="/o", is_root_device=True))),
        "Drive config error: A root block device already exists! (`rootfs`)")
    # Putting the same id again replaces it.
    ok(controller.handle(InsertBlockDevice(DriveConfig("rootfs", path_on_host="/r2", is_root_device=True))))
    err(controller.handle(InsertBlockDevice(DriveConfig("nopath", is_root_device=False))),
        "Drive config error: Unable to create the virtio block device")
    drives = ok(controller.handle(GetFullVmConfig())).body["drives"]
    assert [d["drive_id"] for d in drives] == ["rootfs"] and drives[0]["path_on_host"] == "/r2"


def test_network_interface_rules(controller: VmmController) -> None:
    mac = MacAddr.parse("06:00:ac:10:00:02")
    ok(controller.handle(InsertNetworkDevice(NetworkInterfaceConfig("net1", "tap0", guest_mac=mac))))
    err(controller.handle(InsertNetworkDevice(NetworkInterfaceConfig("net2", "tap0"))),
        "Network config error: The TAP device `tap0` is already used")
    err(controller.handle(InsertNetworkDevice(NetworkInterfaceConfig("net2", "tap1", guest_mac=mac))),
        "Network config error: The MAC address is already in use: 06:00:ac:10:00:02")
    err(controller.handle(InsertNetworkDevice(NetworkInterfaceConfig("net2", "tap/1"))),
        "Network config error: Invalid interface name")
    ok(controller.handle(InsertNetworkDevice(NetworkInterfaceConfig("net1", "tap9"))))  # replace
    assert [i.host_dev_name for i in controller.resources.network_interfaces.values()] == ["tap9"]


def test_vsock_and_entropy(controller: VmmController) -> None:
    err(controller.handle(SetVsockDevice(VsockConfig(2, "/v"))), "Vsock config error: Invalid guest CID")
    err(controller.handle(SetVsockDevice(VsockConfig(3, ""))), "Vsock config error: The vsock Unix domain socket")
    ok(controller.handle(SetVsockDevice(VsockConfig(3, "/v"))))
    ok(controller.handle(SetEntropyDevice(EntropyConfig())))
    config = ok(controller.handle(GetFullVmConfig())).body
    assert config["vsock"] == {"guest_cid": 3, "uds_path": "/v"} and config["entropy"] == {"rate_limiter": None}


def test_full_vm_config_before_anything(controller: VmmController) -> None:
    config = ok(controller.handle(GetFullVmConfig())).body
    assert config["boot-source"] == {"kernel_image_path": "", "initrd_path": None, "boot_args": None}
    assert config["machine-config"]["vcpu_count"] == 1 and config["drives"] == []
    assert config["logger"] is None and config["metrics"] is None
    json.dumps(config)


# --- MMDS -----------------------------------------------------------------------------------


def test_mmds_data_store(controller: VmmController) -> None:
    assert ok(controller.handle(GetMmds())).body == {}
    err(controller.handle(PatchMmds({"a": 1})), "MMDS error: The MMDS data store is not initialized.")
    ok(controller.handle(PutMmds({"latest": {"meta-data": {"id": "i-1"}}})))
    ok(controller.handle(PatchMmds({"latest": {"meta-data": {"zone": "z"}}})))
    assert ok(controller.handle(GetMmds())).body == {"latest": {"meta-data": {"id": "i-1", "zone": "z"}}}
    err(controller.handle(PutMmds({"big": "x" * 2000})), "MMDS limit exceeded error: The MMDS patch request doesn't fit.",
        status=413)
    err(controller.handle(PatchMmds({"big": "x" * 2000})), "MMDS limit exceeded error", status=413)
    assert ok(controller.handle(GetMmds())).body["latest"]["meta-data"]["id"] == "i-1"


def test_mmds_works_after_boot(controller: VmmController, kernel: str) -> None:
    boot(controller, kernel)
    ok(controller.handle(PutMmds({"k": "v"})))
    assert ok(controller.handle(GetMmds())).body == {"k": "v"}


def test_mmds_config_needs_known_interfaces(controller: VmmController) -> None:
    err(controller.handle(SetMmdsConfig(MmdsConfig(("eth0",)))),
        "MMDS config error: The list of network interface IDs provided contains at least one ID")
    ok(controller.handle(InsertNetworkDevice(NetworkInterfaceConfig("eth0", "tap0"))))
    ok(controller.handle(SetMmdsConfig(MmdsConfig(("eth0",), version=MmdsVersion.V2, imds_compat=True))))
    assert controller.mmds.version is MmdsVersion.V2 and controller.mmds.imds_compat
    err(controller.handle(SetMmdsConfig(MmdsConfig(("eth0",), ipv4_address="10.0.0.1"))),
        "MMDS config error: The MMDS IPv4 address is not link local.")
    assert ok(controller.handle(GetFullVmConfig())).body["mmds-config"]["network_interfaces"] == ["eth0"]


def test_without_a_data_store_mmds_requests_say_so(builder, logger) -> None:
    controller = VmmController(boot=builder, mmds=None, logger=logger)
    for action in (GetMmds(), PutMmds({}), PatchMmds({})):
        err(controller.handle(action), "MMDS error: the MMDS data store is not available")


# --- logger and metrics ----------------------------------------------------------------------


def test_logger_configuration(controller: VmmController, logger, tmp_path) -> None:
    err(controller.handle(ConfigureLogger(LoggerConfig(log_path=str(tmp_path / "no" / "log")))),
        "Logger error: Failed to open target file: No such file or directory")
    ok(controller.handle(ConfigureLogger(LoggerConfig(log_path=str(tmp_path / "log"), show_level=True))))
    assert logger.settings.log_path == str(tmp_path / "log") and logger.settings.show_level


def test_metrics_configure_once(controller: VmmController, tmp_path) -> None:
    prefix = "Metrics error: Cannot initialize the metrics system due to bad user input: "
    err(controller.handle(ConfigureMetrics(MetricsConfig(str(tmp_path / "no" / "m")))), prefix)
    ok(controller.handle(ConfigureMetrics(MetricsConfig(str(tmp_path / "m")))))
    err(controller.handle(ConfigureMetrics(MetricsConfig(str(tmp_path / "m2")))),
        prefix + "Reinitialization of metrics not allowed.")


def test_flush_metrics_reports_vcpu_exits_and_legacy_device_accesses(controller, builder, kernel, tmp_path) -> None:
    path = tmp_path / "metrics.json"
    ok(controller.handle(ConfigureMetrics(MetricsConfig(str(path)))))
    boot(controller, kernel)
    vmm = builder.vmm
    vmm.vcpus[0].exit_counts.update(io_out=5, io_in=2, mmio_read=1)
    vmm.pio_bus.write(COM1_BASE, b"A")
    vmm.pio_bus.write(COM1_BASE, b"B")
    vmm.pio_bus.read(COM1_BASE + 5, 1)
    assert bytes(vmm.console) == b"AB"  # the counting wrapper passes accesses on
    ok(controller.handle(FlushMetrics()))
    line = json.loads(path.read_text().splitlines()[-1])
    assert line["vcpu"] == {"exit_io_in": 2, "exit_io_out": 5, "exit_mmio_read": 1}
    assert line["uart"] == {"read_count": 1, "write_count": 2}
    assert line["i8042"] == {"read_count": 0, "reset_count": 0, "write_count": 0}


def test_flush_metrics_without_a_destination_is_fine(controller, kernel) -> None:
    boot(controller, kernel)
    ok(controller.handle(FlushMetrics()))


# --- running microVM ---------------------------------------------------------------------------


def test_pause_and_resume_drive_the_vcpus_once(controller: VmmController, builder, kernel: str) -> None:
    boot(controller, kernel)
    ok(controller.handle(Pause()))
    ok(controller.handle(Pause()))
    ok(controller.handle(Resume()))
    ok(controller.handle(Resume()))
    assert builder.vmm.calls == ["pause", "resume"]
    assert controller.metrics.snapshot()["latencies_us"]["vmm_pause_vm"] >= 0


def test_a_failed_pause_is_reported(controller: VmmController, builder, kernel: str) -> None:
    boot(controller, kernel)
    builder.vmm.fail_pause = True
    err(controller.handle(Pause()), "Internal VMM error: cannot pause the vCPUs")
    assert controller.state is InstanceState.RUNNING


def test_ctrl_alt_del_reaches_the_i8042(controller: VmmController, builder, kernel: str) -> None:
    boot(controller, kernel)
    ok(controller.handle(SendCtrlAltDel()))
    assert builder.vmm.i8042.i8042.output_len > 0
    # The guest never reads its keyboard: the queue fills up and the request says why.
    results = [controller.handle(SendCtrlAltDel()) for _ in range(8)]
    err(results[-1], "Internal VMM error: the i8042 did not take Ctrl+Alt+Del")


def test_device_updates_after_boot(controller: VmmController, kernel: str) -> None:
    boot(controller, kernel)
    err(controller.handle(UpdateBlockDevice(DrivePatch("nope", path_on_host="/x"))),
        "Drive config error: Invalid block device ID: `nope`.")
    err(controller.handle(UpdateNetworkInterface(NetworkInterfacePatch("nope"))),
        "Network config error: Invalid network interface ID: `nope`.")


def test_devices_without_a_virtio_device_cannot_be_updated(builder, logger, kernel) -> None:
    controller = VmmController(boot=builder, logger=logger)
    ok(controller.handle(InsertBlockDevice(DriveConfig("d", path_on_host="/d", is_root_device=False))))
    ok(controller.handle(InsertNetworkDevice(NetworkInterfaceConfig("n", "tap0"))))
    boot(controller, kernel)
    err(controller.handle(UpdateBlockDevice(DrivePatch("d", path_on_host="/x"))),
        "Drive config error: the drive `d` has no virtio-block device.")
    err(controller.handle(UpdateNetworkInterface(NetworkInterfacePatch("n"))),
        "Network config error: the interface `n` has no virtio-net device.")


LIMITER = RateLimiterConfig(bandwidth=TokenBucketConfig(size=1 << 20, refill_time=100))


def test_running_drives_take_a_new_file_and_rate_limiter(controller, builder, kernel, tmp_path) -> None:
    old, new = tmp_path / "old.img", tmp_path / "new.img"
    old.write_bytes(b"\0" * 4096)
    new.write_bytes(b"\0" * 8192)
    ok(controller.handle(InsertBlockDevice(DriveConfig("data", path_on_host=str(old), is_root_device=False))))
    builder.virtio = True
    boot(controller, kernel)
    block = builder.vmm.devices["virtio"].get("drive:data").device
    ok(controller.handle(UpdateBlockDevice(DrivePatch("data", path_on_host=str(new)))))
    assert block.path == str(new) and block.capacity == 8192 // 512
    err(controller.handle(UpdateBlockDevice(DrivePatch("data", path_on_host=str(tmp_path / "missing")))),
        "Drive config error: ")
    assert block.path == str(new)
    ok(controller.handle(UpdateBlockDevice(DrivePatch("data", rate_limiter=LIMITER))))
    assert block.rate_limiter is not None and block.rate_limiter.fd in builder.vmm.sources
    drive = ok(controller.handle(GetFullVmConfig())).body["drives"][0]
    assert drive["path_on_host"] == str(new) and drive["rate_limiter"]["bandwidth"]["size"] == 1 << 20


def test_running_interfaces_take_new_rate_limiters(controller, builder, kernel) -> None:
    ok(controller.handle(InsertNetworkDevice(NetworkInterfaceConfig("eth0", "tap0"))))
    builder.virtio = True
    boot(controller, kernel)
    net = builder.vmm.devices["virtio"].get("net:eth0").device
    ok(controller.handle(UpdateNetworkInterface(NetworkInterfacePatch("eth0", tx_rate_limiter=LIMITER))))
    assert net.tx_rate_limiter.bandwidth is not None and net.tx_rate_limiter.bandwidth.capacity == 1 << 20
    assert net.rx_rate_limiter.bandwidth is None
    iface = ok(controller.handle(GetFullVmConfig())).body["network-interfaces"][0]
    assert iface["tx_rate_limiter"]["bandwidth"]["size"] == 1 << 20 and iface["rx_rate_limiter"] is None


def test_mmds_interfaces_get_their_network_stack_and_metrics(controller, builder, kernel, tmp_path) -> None:
    ok(controller.handle(InsertNetworkDevice(NetworkInterfaceConfig("eth0", "tap0"))))
    ok(controller.handle(InsertNetworkDevice(NetworkInterfaceConfig("eth1", "tap1"))))
    ok(controller.handle(SetMmdsConfig(MmdsConfig(("eth0",)))))
    ok(controller.handle(ConfigureMetrics(MetricsConfig(str(tmp_path / "m")))))
    builder.virtio = True
    boot(controller, kernel)
    manager = builder.vmm.devices["virtio"]
    assert manager.get("net:eth0").device.mmds is not None and manager.get("net:eth1").device.mmds is None
    manager.get("net:eth1").device.metrics.tx_count += 3
    ok(controller.handle(FlushMetrics()))
    line = json.loads((tmp_path / "m").read_text().splitlines()[-1])
    assert line["mmds"]["rx_count"] == 0
    assert line["net"]["tx_count"] == 3 and line["net_eth1"]["tx_count"] == 3 and line["net_eth0"]["tx_count"] == 0


# --- config files -------------------------------------------------------------------------------


def test_a_config_file_is_a_batch_of_requests_ending_with_instance_start(kernel: str) -> None:
    config = VmConfig(
        boot_source=BootSourceConfig(kernel),
        machine_config=MachineConfig(vcpu_count=2, mem_size_mib=256),
        drives=(DriveConfig("rootfs", path_on_host="/r", is_root_device=True),),
        network_interfaces=(NetworkInterfaceConfig("eth0", "tap0"),),
        vsock=VsockConfig(3, "/v"),
        entropy=EntropyConfig(),
        mmds_config=MmdsConfig(("eth0",)),
        logger=LoggerConfig(level=None),
        metrics=MetricsConfig("/m"),
    )
    kinds = [type(a).__name__ for a in actions_from_config(config)]
    assert kinds == ["ConfigureLogger", "ConfigureMetrics", "UpdateMachineConfig", "ConfigureBootSource",
                     "InsertBlockDevice", "InsertNetworkDevice", "SetVsockDevice", "SetEntropyDevice",
                     "SetMmdsConfig", "StartMicroVm"]


def test_apply_boots_or_stops_at_the_first_error(controller: VmmController, builder, kernel) -> None:
    config = VmConfig(boot_source=BootSourceConfig(kernel), machine_config=MachineConfig(vcpu_count=2))
    bad = VmConfig(boot_source=BootSourceConfig(kernel + ".missing"))
    error = controller.apply(actions_from_config(bad))
    assert error is not None and error.fault_message.startswith("Boot source error")
    assert builder.configs == []
    assert controller.apply(actions_from_config(config)) is None
    assert controller.state is InstanceState.RUNNING and builder.configs[0].machine_config.vcpu_count == 2


@pytest.mark.parametrize("config,section", [
    (VmConfig(boot_source=BootSourceConfig("/k"), balloon=BalloonConfig(16, False)), "balloon"),
    (VmConfig(boot_source=BootSourceConfig("/k"), cpu_config=CpuConfig()), "cpu-config"),
])
def test_config_sections_ember_cannot_honour_are_refused(config: VmConfig, section: str) -> None:
    with pytest.raises(UnsupportedConfig, match=f"^{section}: .*not supported by Ember"):
        actions_from_config(config)


def test_repr(controller: VmmController) -> None:
    assert repr(controller).startswith("<VmmController vm-1 Not started drives=0")

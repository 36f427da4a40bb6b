"""The full configuration: config files, GET /vm/config, cross-section rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmm.config import (
    BalloonConfig,
    BootSourceConfig,
    ConfigError,
    ConfigFileError,
    CpuConfig,
    DriveConfig,
    DuplicateDeviceId,
    DuplicateField,
    GuestMacAddressInUse,
    InvalidJson,
    InvalidNetworkInterfaceId,
    InvalidType,
    InvalidVcpuCount,
    KvmCapability,
    MacAddr,
    MachineConfig,
    MissingField,
    MmdsConfig,
    NetworkInterfaceConfig,
    RootBlockDeviceAlreadyAdded,
    TooManyPagesRequested,
    UnknownField,
    UnsupportedConfig,
    VmConfig,
)

from .examples import FULL_VM, MINIMAL_VM, ROOT_DRIVE

# A config file in the shape of Firecracker's getting-started guide.
CONFIG_FILE = {
    "boot-source": {
        "kernel_image_path": "vmlinux.bin",
        "boot_args": "console=ttyS0 reboot=k panic=1 pci=off",
        "initrd_path": None,
    },
    "drives": [
        {
            "drive_id": "rootfs",
            "partuuid": None,
            "is_root_device": True,
            "cache_type": "Unsafe",
            "is_read_only": False,
            "path_on_host": "rootfs.ext4",
            "io_engine": "Sync",
            "rate_limiter": None,
            "socket": None,
        }
    ],
    "machine-config": {
        "vcpu_count": 2,
        "mem_size_mib": 1024,
        "smt": False,
        "track_dirty_pages": False,
        "huge_pages": "None",
    },
    "cpu-config": None,
    "balloon": None,
    "network-interfaces": [
        {"iface_id": "net1", "guest_mac": "06:00:AC:10:00:02", "host_dev_name": "tap0"}
    ],
    "vsock": None,
    "logger": {"log_path": "fc.log", "level": "Debug", "show_level": True, "show_log_origin": True},
    "metrics": {"metrics_path": "metrics.fifo"},
    "mmds-config": {"network_interfaces": ["net1"], "version": "V2"},
    "entropy": None,
}

# What Firecracker's GET /vm/config returns for a running microVM.
GET_VM_CONFIG = {
    "balloon": {
        "amount_mib": 1,
        "deflate_on_oom": True,
        "stats_polling_interval_s": 0,
        "free_page_hinting": False,
        "free_page_reporting": False,
    },
    "drives": [
        {
            "drive_id": "rootfs",
            "partuuid": None,
            "is_root_device": True,
            "cache_type": "Unsafe",
            "is_read_only": True,
            "path_on_host": "/rootfs.ext4",
            "rate_limiter": None,
            "io_engine": "Sync",
            "socket": None,
        }
    ],
    "boot-source": {
        "kernel_image_path": "/vmlinux",
        "initrd_path": None,
        "boot_args": "reboot=k panic=1 nomodule swiotlb=noforce console=ttyS0",
    },
    "cpu-config": None,
    "logger": None,
    "machine-config": {
        "vcpu_count": 2,
        "mem_size_mib": 256,
        "smt": True,
        "track_dirty_pages": False,
        "huge_pages": "None",
    },
    "metrics": None,
    "mmds-config": {
        "version": "V1",
        "network_interfaces": ["eth0"],
        "ipv4_address": "169.254.169.254",
        "imds_compat": False,
    },
    "network-interfaces": [
        {
            "iface_id": "eth0",
            "host_dev_name": "tap0",
            "guest_mac": "06:00:c0:a8:00:02",
            "mtu": None,
            "rx_rate_limiter": None,
            "tx_rate_limiter": {
                "bandwidth": {"size": 1000000, "refill_time": 100, "one_time_burst": None},
                "ops": None,
            },
        }
    ],
    "vsock": {"guest_cid": 15, "uds_path": "vsock.sock"},
    "entropy": None,
    "pmem": [],
    "memory-hotplug": None,
}


def test_config_file_parses_and_validates() -> None:
    config = VmConfig.from_json(CONFIG_FILE)
    config.validate()
    assert config.machine_config == MachineConfig(vcpu_count=2, mem_size_mib=1024)
    assert config.root_drive is not None and config.root_drive.drive_id == "rootfs"
    assert config.network_interfaces[0].guest_mac == MacAddr.parse("06:00:ac:10:00:02")
    assert VmConfig.from_json(config.to_json()) == config


def test_firecracker_get_vm_config_output_parses_back() -> None:
    config = VmConfig.from_json(GET_VM_CONFIG)
    config.validate()
    assert config.to_json() == GET_VM_CONFIG


def test_to_json_writes_every_key_like_get_vm_config() -> None:
    assert MINIMAL_VM.to_json() == {
        "balloon": None,
        "drives": [],
        "boot-source": {"kernel_image_path": "vmlinux", "initrd_path": None, "boot_args": None},
        "cpu-config": None,
        "logger": None,
        "machine-config": {
            "vcpu_count": 1,
            "mem_size_mib": 128,
            "smt": False,
            "track_dirty_pages": False,
            "huge_pages": "None",
        },
        "metrics": None,
        "mmds-config": None,
        "network-interfaces": [],
        "vsock": None,
        "entropy": None,
        "pmem": [],
        "memory-hotplug": None,
    }


def test_minimal_file_gets_firecracker_defaults() -> None:
    config = VmConfig.from_json({"boot-source": {"kernel_image_path": "vmlinux"}})
    assert config == MINIMAL_VM
    assert VmConfig.from_json({"boot-source": {"kernel_image_path": "k"}, "machine-config": None}).machine_config == MachineConfig()


@pytest.mark.parametrize(
    ("patch", "error", "message"),
    [
        (
            {"boot-source": None},
            InvalidType,
            "boot-source: invalid type: null, expected struct BootSourceConfig",
        ),
        (
            {"machine_config": {}},
            UnknownField,
            "unknown field `machine_config`, expected one of `balloon`, `drives`, "
            "`boot-source`, `cpu-config`, `logger`, `machine-config`, `metrics`, "
            "`mmds-config`, `network-interfaces`, `vsock`, `entropy`, `pmem`, "
            "`memory-hotplug`",
        ),
        (
            {"drives": {}},
            InvalidType,
            "drives: invalid type: map, expected a sequence",
        ),
        (
            {"drives": [{"drive_id": "x"}]},
            MissingField,
            "drives[0]: missing field `is_root_device`",
        ),
        (
            {"network-interfaces": [{"iface_id": "a", "host_dev_name": "t", "guest_mac": "z"}]},
            ConfigError,
            "network-interfaces[0].guest_mac: The provided MAC address is invalid.",
        ),
        (
            {"pmem": [{"id": "p", "path_on_host": "x"}]},
            UnsupportedConfig,
            "pmem: virtio-pmem devices are not supported by Ember",
        ),
        (
            {"pmem": None},
            InvalidType,
            "pmem: invalid type: null, expected a sequence",
        ),
        (
            {"memory-hotplug": {"total_size_mib": 1024}},
            UnsupportedConfig,
            "memory-hotplug: memory hotplug (virtio-mem) is not supported by Ember",
        ),
        (
            {"cpu-config": 5},
            InvalidType,
            "cpu-config: invalid type: integer `5`, "
            "expected a path string or struct CustomCpuTemplate",
        ),
        (
            {"cpu-config": {"vcpu_features": []}},
            UnknownField,
            "cpu-config: unknown field `vcpu_features`, "
            "expected one of `kvm_capabilities`, `cpuid_modifiers`, `msr_modifiers`",
        ),
        (
            {"machine-config": {"vcpu_count": 1, "mem_size_mib": 128, "smt": "false"}},
            InvalidType,
            'machine-config.smt: invalid type: string "false", expected a boolean',
        ),
    ],
)
def test_config_file_parse_errors(patch: dict, error: type, message: str) -> None:
    body = {**CONFIG_FILE, **patch}
    with pytest.raises(error) as info:
        VmConfig.from_json(body)
    assert str(info.value) == message


def test_boot_source_is_required() -> None:
    body = dict(CONFIG_FILE)
    del body["boot-source"]
    with pytest.raises(MissingField, match="missing field `boot-source`"):
        VmConfig.from_json(body)


def _vm(**sections: object) -> VmConfig:
    return VmConfig(boot_source=BootSourceConfig("k"), **sections)  # type: ignore[arg-type]


def _drive(drive_id: str, root: bool = False) -> DriveConfig:
    return DriveConfig(drive_id=drive_id, path_on_host=f"/{drive_id}.img", is_root_device=root)


def test_at_most_one_root_device() -> None:
    config = _vm(drives=[_drive("a", root=True), _drive("b"), _drive("c", root=True)])
    with pytest.raises(RootBlockDeviceAlreadyAdded) as info:
        config.validate()
    assert str(info.value) == "drives[2]: A root block device already exists! (`a`)"


def test_drive_ids_are_unique() -> None:
    with pytest.raises(DuplicateDeviceId, match=r"drives\[1\]: Duplicate drive_id `a`"):
        _vm(drives=[_drive("a"), _drive("a")]).validate()


def test_drive_order_puts_the_root_first() -> None:
    config = _vm(drives=[_drive("a"), _drive("root", root=True), _drive("b")])
    config.validate()
    assert [d.drive_id for d in config.drives_in_device_order] == ["root", "a", "b"]
    assert config.root_drive == _drive("root", root=True)
    assert _vm().root_drive is None


def test_network_interface_uniqueness() -> None:
    mac = MacAddr.parse("06:00:00:00:00:01")
    with pytest.raises(DuplicateDeviceId, match="iface_id `e`"):
        _vm(network_interfaces=[NetworkInterfaceConfig("e", "t0"), NetworkInterfaceConfig("e", "t1")]).validate()
    with pytest.raises(DuplicateDeviceId, match="TAP device `t0`"):
        _vm(network_interfaces=[NetworkInterfaceConfig("a", "t0"), NetworkInterfaceConfig("b", "t0")]).validate()
    with pytest.raises(GuestMacAddressInUse) as info:
        _vm(
            network_interfaces=[
                NetworkInterfaceConfig("a", "t0", guest_mac=mac),
                NetworkInterfaceConfig("b", "t1", guest_mac=mac),
            ]
        ).validate()
    assert str(info.value) == "network-interfaces[1]: The MAC address is already in use: 06:00:00:00:00:01"


def test_mac_duplicates_are_found_whatever_the_case() -> None:
    body = {
        **CONFIG_FILE,
        "network-interfaces": [
            {"iface_id": "a", "host_dev_name": "t0", "guest_mac": "AA:00:00:00:00:01"},
            {"iface_id": "b", "host_dev_name": "t1", "guest_mac": "aa:00:00:00:00:01"},
        ],
        "mmds-config": None,
    }
    with pytest.raises(GuestMacAddressInUse):
        VmConfig.from_json(body).validate()


def test_mmds_interfaces_must_exist() -> None:
    config = _vm(
        network_interfaces=[NetworkInterfaceConfig("eth0", "tap0")],
        mmds_config=MmdsConfig(("eth0", "eth9")),
    )
    with pytest.raises(InvalidNetworkInterfaceId) as info:
        config.validate()
    assert info.value.path == "mmds-config.network_interfaces[1]"


def test_balloon_must_fit_in_memory() -> None:
    _vm(balloon=BalloonConfig(amount_mib=128, deflate_on_oom=True)).validate()
    with pytest.raises(TooManyPagesRequested, match="^balloon: Amount of pages requested is too large"):
        _vm(balloon=BalloonConfig(amount_mib=129, deflate_on_oom=True)).validate()


def test_section_errors_are_located() -> None:
    with pytest.raises(InvalidVcpuCount) as info:
        _vm(machine_config=MachineConfig(vcpu_count=0)).validate()
    assert info.value.path == "machine-config"
    assert str(info.value).startswith("machine-config: The number of vCPUs")
    with pytest.raises(ConfigError) as info2:
        _vm(drives=[_drive("ok"), DriveConfig(drive_id="bad")]).validate()
    assert str(info2.value).startswith("drives[1]: Unable to create the virtio block device")


def test_python_callers_may_pass_lists() -> None:
    config = _vm(drives=[ROOT_DRIVE], network_interfaces=[])
    assert config.drives == (ROOT_DRIVE,)
    assert config == _vm(drives=(ROOT_DRIVE,))
    assert hash(config) == hash(_vm(drives=(ROOT_DRIVE,)))


# --- files -------------------------------------------------------------------------


def test_from_file(tmp_path: Path) -> None:
    path = tmp_path / "vm.json"
    path.write_text(json.dumps(CONFIG_FILE))
    assert VmConfig.from_file(path) == VmConfig.from_json(CONFIG_FILE)
    assert VmConfig.from_file(str(path)) == VmConfig.from_json(CONFIG_FILE)


def test_from_file_validates(tmp_path: Path) -> None:
    path = tmp_path / "vm.json"
    path.write_text(json.dumps({**CONFIG_FILE, "machine-config": {"vcpu_count": 0, "mem_size_mib": 1}}))
    with pytest.raises(InvalidVcpuCount):
        VmConfig.from_file(path)


def test_unreadable_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigFileError) as info:
        VmConfig.from_file(missing)
    assert str(info.value) == f"Unable to read the configuration file `{missing}`: No such file or directory"
    with pytest.raises(ConfigFileError, match="Is a directory"):
        VmConfig.from_file(tmp_path)
    with pytest.raises(ConfigFileError, match="embedded null byte"):
        VmConfig.from_file("a\0b")
    big = tmp_path / "big.json"
    big.write_text(" " * 2000 + "{}")
    with pytest.raises(ConfigFileError, match="larger than 1000 bytes"):
        VmConfig.from_file(big, max_size=1000)


def test_invalid_json_files(tmp_path: Path) -> None:
    path = tmp_path / "vm.json"
    path.write_text('{"boot-source": {"kernel_image_path": "k",}}')
    with pytest.raises(InvalidJson) as info:
        VmConfig.from_file(path)
    assert str(info.value).startswith(f"{path}: Invalid JSON: ")
    assert "line 1 column" in str(info.value)
    path.write_text('{"boot-source": {"kernel_image_path": "k"}, "boot-source": {}}')
    with pytest.raises(DuplicateField, match="duplicate field `boot-source`"):
        VmConfig.from_file(path)
    path.write_bytes(b'{"boot-source": {"kernel_image_path": "\xff"}}')
    with pytest.raises(InvalidJson, match="UTF-8"):
        VmConfig.from_file(path)
    path.write_text("[]")
    with pytest.raises(InvalidType, match="expected struct VmmConfig"):
        VmConfig.from_file(path)


def test_cpu_config_path_is_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "template.json").write_text(json.dumps({"kvm_capabilities": ["!56"]}))
    (tmp_path / "vm.json").write_text(json.dumps({**CONFIG_FILE, "cpu-config": "template.json"}))
    config = VmConfig.from_file("vm.json")
    assert config.cpu_config == CpuConfig(kvm_capabilities=(KvmCapability(56, remove=True),))
    # Pure parsing keeps the path for the caller to resolve.
    assert VmConfig.from_json({**CONFIG_FILE, "cpu-config": "template.json"}).cpu_config == "template.json"


def test_cpu_config_path_errors_are_located(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "vm.json").write_text(json.dumps({**CONFIG_FILE, "cpu-config": "missing.json"}))
    with pytest.raises(ConfigFileError, match="^cpu-config: Unable to read the configuration file `missing.json`"):
        VmConfig.from_file("vm.json")
    (tmp_path / "bad.json").write_text(json.dumps({"msr_modifiers": [{"addr": "1"}]}))
    (tmp_path / "vm.json").write_text(json.dumps({**CONFIG_FILE, "cpu-config": "bad.json"}))
    with pytest.raises(MissingField) as info:
        VmConfig.from_file("vm.json")
    assert str(info.value) == "cpu-config.msr_modifiers[0]: missing field `bitmap`"


def test_full_example_is_valid() -> None:
    FULL_VM.validate()
    assert FULL_VM.load_cpu_config_file() is FULL_VM

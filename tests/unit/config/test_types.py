"""Each configuration type: round trip, Firecracker-style bodies, negatives."""

from __future__ import annotations

import ipaddress
import json

import pytest

from vmm.config import (
    DEFAULT_KERNEL_CMDLINE,
    DEFAULT_MMDS_IPV4,
    BalloonConfig,
    BalloonStatsUpdateConfig,
    BalloonUpdateConfig,
    BootSourceConfig,
    CacheType,
    ConfigError,
    ConfigParseError,
    ConfigType,
    CpuConfig,
    CpuTemplate,
    DriveConfig,
    DrivePatch,
    EmptyNetworkIfaceList,
    EntropyConfig,
    HugePages,
    InvalidBlockConfig,
    InvalidGuestCid,
    InvalidInterfaceName,
    InvalidIpv4Addr,
    InvalidKernelCommandLine,
    InvalidKernelPath,
    InvalidMemorySize,
    InvalidMtu,
    InvalidResourceId,
    InvalidType,
    InvalidUdsPath,
    InvalidValue,
    InvalidVcpuCount,
    IoEngine,
    KvmCapability,
    LoggerConfig,
    LogLevel,
    MacAddr,
    MachineConfig,
    MachineConfigUpdate,
    MetricsConfig,
    MissingField,
    MmdsConfig,
    MmdsVersion,
    NetworkInterfaceConfig,
    NetworkInterfacePatch,
    RateLimiterConfig,
    RegisterBitmap,
    TokenBucketConfig,
    UnknownField,
    UnknownVariant,
    VsockConfig,
)

from vmm.config.schema import one_of

from .examples import ROUND_TRIP


def _id(value: object) -> str:
    return type(value).__name__


# --- every type ----------------------------------------------------------------


@pytest.mark.parametrize("value", ROUND_TRIP, ids=_id)
def test_round_trip(value: ConfigType) -> None:
    encoded = value.to_json()
    # Plain JSON data: survives a trip through JSON text.
    assert json.loads(json.dumps(encoded)) == encoded
    assert type(value).from_json(encoded) == value
    assert type(value).from_json(json.loads(json.dumps(encoded))) == value


@pytest.mark.parametrize("value", ROUND_TRIP, ids=_id)
def test_examples_are_valid(value: ConfigType) -> None:
    value.validate()


@pytest.mark.parametrize("value", ROUND_TRIP, ids=_id)
def test_unknown_fields_are_rejected_with_the_expected_list(value: ConfigType) -> None:
    body = {**value.to_json(), "foo": 1}
    with pytest.raises(UnknownField) as info:
        type(value).from_json(body)
    assert str(info.value) == f"unknown field `foo`, {one_of(type(value).SCHEMA.keys)}"


@pytest.mark.parametrize("value", ROUND_TRIP, ids=_id)
def test_non_objects_are_rejected(value: ConfigType) -> None:
    for body in (None, [], "x", 1, True):
        with pytest.raises(InvalidType, match="expected struct"):
            type(value).from_json(body)


@pytest.mark.parametrize("value", ROUND_TRIP, ids=_id)
def test_every_required_field_is_required(value: ConfigType) -> None:
    for key in type(value).SCHEMA.required_keys:
        body = value.to_json()
        del body[key]
        with pytest.raises(MissingField) as info:
            type(value).from_json(body)
        assert str(info.value) == f"missing field `{key}`"


# --- boot source ---------------------------------------------------------------


def test_boot_source_body() -> None:
    cfg = BootSourceConfig.from_json(
        {"kernel_image_path": "./vmlinux", "boot_args": "console=ttyS0 reboot=k panic=1 pci=off"}
    )
    assert cfg == BootSourceConfig("./vmlinux", boot_args="console=ttyS0 reboot=k panic=1 pci=off")
    assert cfg.to_json() == {
        "kernel_image_path": "./vmlinux",
        "initrd_path": None,
        "boot_args": "console=ttyS0 reboot=k panic=1 pci=off",
    }
    assert BootSourceConfig("k").effective_boot_args == DEFAULT_KERNEL_CMDLINE


def test_boot_source_semantics() -> None:
    with pytest.raises(InvalidKernelPath):
        BootSourceConfig("").validate()
    with pytest.raises(InvalidKernelCommandLine, match="non-printable ASCII"):
        BootSourceConfig("k", boot_args="console=ttyS0\n init=/bin/sh").validate()
    with pytest.raises(InvalidKernelCommandLine, match="too long"):
        BootSourceConfig("k", boot_args="a" * 2048).validate()
    BootSourceConfig("k", boot_args="a" * 2047).validate()
    BootSourceConfig("k", boot_args="").validate()
    with pytest.raises(InvalidType):
        BootSourceConfig.from_json({"kernel_image_path": "k", "boot_args": ["a"]})


# --- machine config --------------------------------------------------------------


def test_machine_config_defaults_follow_firecracker() -> None:
    cfg = MachineConfig.from_json({"vcpu_count": 2, "mem_size_mib": 1024})
    assert cfg == MachineConfig(vcpu_count=2, mem_size_mib=1024)
    assert (cfg.smt, cfg.track_dirty_pages, cfg.huge_pages, cfg.cpu_template) == (
        False,
        False,
        HugePages.NONE,
        None,
    )
    # cpu_template is omitted when unset, exactly as Firecracker's GET does.
    assert cfg.to_json() == {
        "vcpu_count": 2,
        "mem_size_mib": 1024,
        "smt": False,
        "track_dirty_pages": False,
        "huge_pages": "None",
    }
    assert cfg.mem_size_bytes == 1024 << 20


@pytest.mark.parametrize(
    "body",
    [
        {"vcpu_count": 0, "mem_size_mib": 128},
        {"vcpu_count": 33, "mem_size_mib": 128},
        {"vcpu_count": 3, "mem_size_mib": 128, "smt": True},
    ],
)
def test_invalid_vcpu_counts(body: dict) -> None:
    cfg = MachineConfig.from_json(body)
    with pytest.raises(InvalidVcpuCount) as info:
        cfg.validate()
    assert str(info.value) == (
        "The number of vCPUs must be greater than 0, less than 32 and must be 1 "
        "or an even number if SMT is enabled."
    )


@pytest.mark.parametrize("vcpus", [1, 2, 31, 32])
def test_valid_vcpu_counts(vcpus: int) -> None:
    MachineConfig(vcpu_count=vcpus).validate()
    if vcpus == 1 or vcpus % 2 == 0:
        MachineConfig(vcpu_count=vcpus, smt=True).validate()


@pytest.mark.parametrize(
    ("mem", "pages"), [(0, HugePages.NONE), (129, HugePages.HUGETLBFS_2M), (3, HugePages.TRANSPARENT)]
)
def test_invalid_memory_sizes(mem: int, pages: HugePages) -> None:
    with pytest.raises(InvalidMemorySize):
        MachineConfig(mem_size_mib=mem, huge_pages=pages).validate()
    MachineConfig(mem_size_mib=mem + 1, huge_pages=pages).validate()


_MC = {"vcpu_count": 1, "mem_size_mib": 128}


@pytest.mark.parametrize(
    ("body", "error", "message"),
    [
        (
            {"vcpu_count": True, "mem_size_mib": 128},
            InvalidType,
            "vcpu_count: invalid type: boolean `true`, expected u8",
        ),
        (
            {"vcpu_count": 1, "mem_size_mib": 128.0},
            InvalidType,
            "mem_size_mib: invalid type: floating point `128.0`, expected usize",
        ),
        (
            {"vcpu_count": 256, "mem_size_mib": 128},
            InvalidValue,
            "vcpu_count: invalid value: integer `256`, expected u8",
        ),
        (
            {"vcpu_count": 1, "mem_size_mib": -1},
            InvalidValue,
            "mem_size_mib: invalid value: integer `-1`, expected usize",
        ),
        (
            {"vcpu_count": "2", "mem_size_mib": 128},
            InvalidType,
            'vcpu_count: invalid type: string "2", expected u8',
        ),
        (
            {**_MC, "smt": 0},
            InvalidType,
            "smt: invalid type: integer `0`, expected a boolean",
        ),
        (
            {**_MC, "huge_pages": "1G"},
            UnknownVariant,
            "huge_pages: unknown variant `1G`, expected one of `None`, `Transparent`, `2M`",
        ),
        (
            {**_MC, "cpu_template": "V1N1"},
            UnknownVariant,
            "cpu_template: unknown variant `V1N1`, "
            "expected one of `C3`, `T2`, `T2S`, `None`, `T2CL`, `T2A`",
        ),
        (
            {**_MC, "vcpus": 2},
            UnknownField,
            "unknown field `vcpus`, expected one of `vcpu_count`, `mem_size_mib`, "
            "`smt`, `cpu_template`, `track_dirty_pages`, `huge_pages`",
        ),
        ({"mem_size_mib": 128}, MissingField, "missing field `vcpu_count`"),
    ],
)
def test_machine_config_parse_errors(body: dict, error: type, message: str) -> None:
    with pytest.raises(error) as info:
        MachineConfig.from_json(body)
    assert str(info.value) == message


def test_machine_config_update_merges_and_validates() -> None:
    base = MachineConfig(vcpu_count=2, mem_size_mib=256, cpu_template=CpuTemplate.T2)
    patch = MachineConfigUpdate.from_json({"mem_size_mib": 512, "huge_pages": "2M"})
    assert base.update(patch) == MachineConfig(
        vcpu_count=2, mem_size_mib=512, cpu_template=CpuTemplate.T2, huge_pages=HugePages.HUGETLBFS_2M
    )
    # "None" clears the template; absence keeps it.
    assert base.update(MachineConfigUpdate(cpu_template=CpuTemplate.NONE)).cpu_template is None
    assert base.update(MachineConfigUpdate(vcpu_count=4)).cpu_template is CpuTemplate.T2
    with pytest.raises(InvalidVcpuCount):
        base.update(MachineConfigUpdate(smt=True, vcpu_count=3))
    with pytest.raises(InvalidMemorySize):
        base.update(MachineConfigUpdate(mem_size_mib=255, huge_pages=HugePages.HUGETLBFS_2M))
    assert base == MachineConfig(vcpu_count=2, mem_size_mib=256, cpu_template=CpuTemplate.T2)


def test_put_machine_config_is_an_update() -> None:
    base = MachineConfig(cpu_template=CpuTemplate.C3)
    put = MachineConfig.from_json({"vcpu_count": 4, "mem_size_mib": 64})
    merged = base.update(MachineConfigUpdate.from_machine_config(put))
    assert merged == MachineConfig(vcpu_count=4, mem_size_mib=64, cpu_template=CpuTemplate.C3)


def test_machine_config_update_emptiness_and_nulls() -> None:
    assert MachineConfigUpdate.from_json({}).is_empty
    assert MachineConfigUpdate.from_json({"vcpu_count": None}).is_empty
    assert not MachineConfigUpdate.from_json({"smt": False}).is_empty
    assert MachineConfigUpdate(vcpu_count=2).to_json() == {"vcpu_count": 2}
    with pytest.raises(UnknownField):
        MachineConfigUpdate.from_json({"vcpu": 2})


# --- drives ----------------------------------------------------------------------


def test_drive_body_from_firecracker_docs() -> None:
    drive = DriveConfig.from_json(
        {
            "drive_id": "rootfs",
            "path_on_host": "./ubuntu-22.04.ext4",
            "is_root_device": True,
            "is_read_only": False,
        }
    )
    drive.validate()
    assert not drive.is_vhost_user and not drive.read_only
    assert drive.effective_io_engine is IoEngine.SYNC
    assert drive.cache_type is CacheType.UNSAFE
    # Every field is written, None as null, as Firecracker's GET /vm/config does.
    assert drive.to_json() == {
        "drive_id": "rootfs",
        "partuuid": None,
        "is_root_device": True,
        "cache_type": "Unsafe",
        "is_read_only": False,
        "path_on_host": "./ubuntu-22.04.ext4",
        "rate_limiter": None,
        "io_engine": None,
        "socket": None,
    }


@pytest.mark.parametrize(
    "body",
    [
        {"drive_id": "d", "is_root_device": False},  # no backend at all
        {"drive_id": "d", "is_root_device": False, "path_on_host": "p", "socket": "s"},
        {"drive_id": "d", "is_root_device": False, "socket": "s", "is_read_only": True},
        {"drive_id": "d", "is_root_device": False, "socket": "s", "io_engine": "Sync"},
        {
            "drive_id": "d",
            "is_root_device": False,
            "socket": "s",
            "rate_limiter": {"ops": {"size": 1, "refill_time": 1}},
        },
    ],
)
def test_drive_backend_combinations(body: dict) -> None:
    with pytest.raises(InvalidBlockConfig, match="Invalid block config"):
        DriveConfig.from_json(body).validate()


def test_vhost_user_drive() -> None:
    drive = DriveConfig.from_json({"drive_id": "v", "is_root_device": True, "socket": "/s"})
    drive.validate()
    assert drive.is_vhost_user


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"drive_id": "d", "path_on_host": "p"}, MissingField),
        ({"drive_id": "d", "is_root_device": "true", "path_on_host": "p"}, InvalidType),
        ({"drive_id": "d", "is_root_device": False, "is_read_only": 1, "path_on_host": "p"}, InvalidType),
        ({"drive_id": "d", "is_root_device": False, "cache_type": "WriteThrough"}, UnknownVariant),
        ({"drive_id": "d", "is_root_device": False, "cache_type": None}, InvalidType),
        ({"drive_id": "d", "is_root_device": False, "io_engine": "sync"}, UnknownVariant),
        ({"drive_id": 5, "is_root_device": False}, InvalidType),
        ({"drive_id": "d", "is_root_device": False, "rate_limiter": {"bandwidth": {"size": 1}}}, MissingField),
    ],
)
def test_drive_parse_errors(body: dict, error: type) -> None:
    with pytest.raises(error):
        DriveConfig.from_json(body)


def test_drive_enum_messages() -> None:
    with pytest.raises(UnknownVariant) as info:
        DriveConfig.from_json({"drive_id": "d", "is_root_device": False, "io_engine": "Uring"})
    assert str(info.value) == "io_engine: unknown variant `Uring`, expected `Async` or `Sync`"
    with pytest.raises(UnknownVariant) as info:
        DriveConfig.from_json({"drive_id": "d", "is_root_device": False, "cache_type": "x"})
    assert str(info.value) == "cache_type: unknown variant `x`, expected `Unsafe` or `Writeback`"


@pytest.mark.parametrize("bad_id", ["", "root-fs", "a b", "a/b", "x.y"])
def test_drive_ids_must_fit_api_paths(bad_id: str) -> None:
    with pytest.raises(InvalidResourceId):
        DriveConfig(drive_id=bad_id, path_on_host="p").validate()
    with pytest.raises(InvalidResourceId):
        DrivePatch(drive_id=bad_id).validate()


def test_drive_patch() -> None:
    patch = DrivePatch.from_json({"drive_id": "scratch", "path_on_host": "/new.img"})
    patch.validate()
    assert patch == DrivePatch("scratch", path_on_host="/new.img")
    with pytest.raises(UnknownField, match="expected one of `drive_id`, `path_on_host`, `rate_limiter`"):
        DrivePatch.from_json({"drive_id": "scratch", "is_read_only": True})


# --- network interfaces ------------------------------------------------------------


def test_network_interface_body() -> None:
    iface = NetworkInterfaceConfig.from_json(
        {"iface_id": "net1", "guest_mac": "06:00:AC:10:00:02", "host_dev_name": "tap0"}
    )
    iface.validate()
    assert iface.guest_mac == MacAddr(bytes([6, 0, 0xAC, 0x10, 0, 2]))
    assert iface.to_json()["guest_mac"] == "06:00:ac:10:00:02"
    assert not iface.guest_mac.is_multicast


@pytest.mark.parametrize(
    "mac",
    [
        "06:00:AC:10:00",
        "06:00:AC:10:00:02:03",
        "06:00:AC:10:00:2",
        "06:00:AC:10:00:002",
        "06:00:AC:10:00:0g",
        "06-00-AC-10-00-02",
        "06:00:AC:10:00:+2",
        "06:00:AC:10:00: 2",
        "",
    ],
)
def test_bad_mac_addresses(mac: str) -> None:
    with pytest.raises(InvalidValue) as info:
        NetworkInterfaceConfig.from_json({"iface_id": "n", "host_dev_name": "t", "guest_mac": mac})
    assert str(info.value) == "guest_mac: The provided MAC address is invalid."


def test_mac_type_checks() -> None:
    with pytest.raises(InvalidType):
        NetworkInterfaceConfig.from_json({"iface_id": "n", "host_dev_name": "t", "guest_mac": 6})
    with pytest.raises(ValueError):
        MacAddr(b"\x00" * 5)
    assert repr(MacAddr(bytes(6))) == "MacAddr('00:00:00:00:00:00')"
    assert MacAddr.parse("ff:ff:ff:ff:ff:ff").is_multicast


@pytest.mark.parametrize("mtu", [67, 0])
def test_mtu_range(mtu: int) -> None:
    with pytest.raises(InvalidMtu, match=f"MTU {mtu} is out of range"):
        NetworkInterfaceConfig("n", "t", mtu=mtu).validate()
    NetworkInterfaceConfig("n", "t", mtu=68).validate()
    NetworkInterfaceConfig("n", "t", mtu=65535).validate()
    with pytest.raises(InvalidValue):
        NetworkInterfaceConfig.from_json({"iface_id": "n", "host_dev_name": "t", "mtu": 65536})


@pytest.mark.parametrize("name", ["", "a" * 16, "tap/0", "tap 0", "tap:0", ".", ".."])
def test_bad_tap_names(name: str) -> None:
    with pytest.raises(InvalidInterfaceName):
        NetworkInterfaceConfig("n", name).validate()


def test_network_interface_patch() -> None:
    patch = NetworkInterfacePatch.from_json(
        {"iface_id": "eth0", "tx_rate_limiter": {"bandwidth": {"size": 1, "refill_time": 2}}}
    )
    assert patch.rx_rate_limiter is None
    assert patch.to_json() == {
        "iface_id": "eth0",
        "tx_rate_limiter": {
            "bandwidth": {"size": 1, "one_time_burst": None, "refill_time": 2},
            "ops": None,
        },
    }
    with pytest.raises(UnknownField):
        NetworkInterfacePatch.from_json({"iface_id": "eth0", "host_dev_name": "tap1"})
    with pytest.raises(InvalidResourceId):
        NetworkInterfacePatch("eth-0").validate()


# --- vsock -------------------------------------------------------------------------


@pytest.mark.parametrize("cid", [0, 1, 2, 0xFFFF_FFFF])
def test_reserved_guest_cids(cid: int) -> None:
    with pytest.raises(InvalidGuestCid):
        VsockConfig.from_json({"guest_cid": cid, "uds_path": "/v.sock"}).validate()


def test_vsock_body() -> None:
    vsock = VsockConfig.from_json({"guest_cid": 3, "uds_path": "./v.sock"})
    vsock.validate()
    # The deprecated vsock_id is written only when given.
    assert vsock.to_json() == {"guest_cid": 3, "uds_path": "./v.sock"}
    assert VsockConfig(3, "v", vsock_id="1").to_json() == {
        "vsock_id": "1",
        "guest_cid": 3,
        "uds_path": "v",
    }
    with pytest.raises(InvalidValue, match="expected u32"):
        VsockConfig.from_json({"guest_cid": 2**32, "uds_path": "v"})
    with pytest.raises(InvalidType, match="expected u32"):
        VsockConfig.from_json({"guest_cid": True, "uds_path": "v"})


def test_vsock_socket_path() -> None:
    with pytest.raises(InvalidUdsPath):
        VsockConfig(3, "").validate()
    with pytest.raises(InvalidUdsPath, match="too long"):
        VsockConfig(3, "/" + "s" * 107).validate()
    VsockConfig(3, "/" + "s" * 106).validate()


# --- logger and metrics ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "level"),
    [
        ("Error", LogLevel.ERROR),
        ("warning", LogLevel.WARNING),
        ("WARN", LogLevel.WARNING),
        ("info", LogLevel.INFO),
        ("DEBUG", LogLevel.DEBUG),
        ("trace", LogLevel.TRACE),
        ("Off", LogLevel.OFF),
    ],
)
def test_log_levels_are_case_insensitive(text: str, level: LogLevel) -> None:
    assert LoggerConfig.from_json({"level": text}).level is level


def test_logger_errors_and_defaults() -> None:
    with pytest.raises(UnknownVariant) as info:
        LoggerConfig.from_json({"level": "verbose"})
    assert "Invalid LevelFilter" in str(info.value) and "`Warning`" in str(info.value)
    with pytest.raises(InvalidType):
        LoggerConfig.from_json({"level": 3})
    with pytest.raises(InvalidType):
        LoggerConfig.from_json({"show_level": "yes"})
    assert LoggerConfig().effective_level is LogLevel.INFO
    assert LogLevel.TRACE.python_level < LogLevel.DEBUG.python_level < LogLevel.ERROR.python_level
    assert LogLevel.OFF.python_level > LogLevel.ERROR.python_level


def test_metrics_config() -> None:
    metrics = MetricsConfig.from_json(
        {"metrics_path": "/m", "properties": {"zone": "b", "app": "x"}}
    )
    assert metrics.properties == (("app", "x"), ("zone", "b"))
    assert metrics == MetricsConfig("/m", properties={"zone": "b", "app": "x"})
    assert metrics.to_json() == {
        "metrics_path": "/m",
        "emit_id": False,
        "properties": {"app": "x", "zone": "b"},
    }
    assert MetricsConfig("/m").to_json() == {"metrics_path": "/m", "emit_id": False}
    with pytest.raises(InvalidType):
        MetricsConfig.from_json({"metrics_path": "/m", "properties": {"a": 1}})
    with pytest.raises(MissingField):
        MetricsConfig.from_json({"emit_id": True})


# --- MMDS --------------------------------------------------------------------------


def test_mmds_config_body() -> None:
    mmds = MmdsConfig.from_json({"network_interfaces": ["eth0"]})
    mmds.validate()
    assert mmds.version is MmdsVersion.V1
    assert mmds.effective_ipv4_address == DEFAULT_MMDS_IPV4
    assert mmds.to_json() == {
        "version": "V1",
        "network_interfaces": ["eth0"],
        "ipv4_address": None,
        "imds_compat": False,
    }
    assert MmdsConfig(["a"], ipv4_address="169.254.1.1").ipv4_address == ipaddress.IPv4Address(
        "169.254.1.1"
    )


@pytest.mark.parametrize("address", ["10.0.0.1", "169.254.0.1", "169.254.255.1", "169.253.1.1"])
def test_mmds_address_must_be_usable_link_local(address: str) -> None:
    with pytest.raises(InvalidIpv4Addr, match="not link local"):
        MmdsConfig.from_json({"network_interfaces": ["e"], "ipv4_address": address}).validate()


@pytest.mark.parametrize("address", ["169.254.1.0", "169.254.254.255", "169.254.169.254"])
def test_mmds_link_local_addresses(address: str) -> None:
    MmdsConfig.from_json({"network_interfaces": ["e"], "ipv4_address": address}).validate()


def test_mmds_errors() -> None:
    with pytest.raises(EmptyNetworkIfaceList):
        MmdsConfig.from_json({"network_interfaces": []}).validate()
    with pytest.raises(InvalidValue, match="invalid IPv4 address syntax"):
        MmdsConfig.from_json({"network_interfaces": ["e"], "ipv4_address": "169.254.1"})
    with pytest.raises(InvalidValue):
        MmdsConfig.from_json({"network_interfaces": ["e"], "ipv4_address": "169.254.01.1"})
    with pytest.raises(UnknownVariant, match="expected `V1` or `V2`"):
        MmdsConfig.from_json({"network_interfaces": ["e"], "version": "V3"})
    with pytest.raises(InvalidType) as info:
        MmdsConfig.from_json({"network_interfaces": ["e", 1]})
    assert info.value.path == "network_interfaces[1]"


# --- balloon, entropy, rate limiters --------------------------------------------------


def test_balloon_bodies() -> None:
    balloon = BalloonConfig.from_json({"amount_mib": 0, "deflate_on_oom": True})
    assert not balloon.stats_enabled
    assert balloon.to_json() == {
        "amount_mib": 0,
        "deflate_on_oom": True,
        "stats_polling_interval_s": 0,
        "free_page_hinting": False,
        "free_page_reporting": False,
    }
    with pytest.raises(MissingField, match="deflate_on_oom"):
        BalloonConfig.from_json({"amount_mib": 1})
    with pytest.raises(InvalidValue, match="expected u16"):
        BalloonConfig.from_json({"amount_mib": 1, "deflate_on_oom": True, "stats_polling_interval_s": 65536})
    assert BalloonUpdateConfig.from_json({"amount_mib": 7}) == BalloonUpdateConfig(7)
    with pytest.raises(UnknownField):
        BalloonUpdateConfig.from_json({"amount_mib": 7, "deflate_on_oom": True})
    assert BalloonStatsUpdateConfig.from_json({"stats_polling_interval_s": 0}).stats_polling_interval_s == 0


def test_entropy_and_rate_limiters() -> None:
    assert EntropyConfig.from_json({}) == EntropyConfig()
    assert EntropyConfig().to_json() == {"rate_limiter": None}
    limiter = RateLimiterConfig.from_json(
        {"bandwidth": {"size": 1000, "one_time_burst": 0, "refill_time": 10}, "ops": None}
    )
    assert limiter.bandwidth == TokenBucketConfig(1000, 10, one_time_burst=0)
    assert limiter.enabled
    assert not RateLimiterConfig(ops=TokenBucketConfig(size=0, refill_time=10)).enabled
    assert not RateLimiterConfig().enabled
    with pytest.raises(UnknownField, match="expected `bandwidth` or `ops`"):
        RateLimiterConfig.from_json({"bytes": {}})
    with pytest.raises(InvalidValue) as info:
        EntropyConfig.from_json({"rate_limiter": {"ops": {"size": -5, "refill_time": 1}}})
    assert str(info.value) == "rate_limiter.ops.size: invalid value: integer `-5`, expected u64"


# --- CPU templates ---------------------------------------------------------------------


def test_cpu_config_body() -> None:
    cfg = CpuConfig.from_json(
        {
            "kvm_capabilities": ["171", "!172"],
            "cpuid_modifiers": [
                {
                    "leaf": "0x80000001",
                    "subleaf": "0b0",
                    "flags": 0,
                    "modifiers": [{"register": "edx", "bitmap": "0bxxxx_xxxx_xx0x"}],
                }
            ],
            "msr_modifiers": [{"addr": "266", "bitmap": "0b1"}],
        }
    )
    assert cfg.kvm_capabilities == (KvmCapability(171), KvmCapability(172, remove=True))
    leaf = cfg.cpuid_modifiers[0]
    assert (leaf.leaf, leaf.subleaf) == (0x80000001, 0)
    bitmap = leaf.modifiers[0].bitmap
    assert (bitmap.mask, bitmap.value) == (0b10, 0)
    assert bitmap.apply(0xFFFF_FFFF) == 0xFFFF_FFFD
    assert cfg.msr_modifiers[0].addr == 0x10A
    assert cfg.to_json()["msr_modifiers"] == [{"addr": "0x10a", "bitmap": "0b" + "x" * 63 + "1"}]


@pytest.mark.parametrize(
    ("body", "error", "needle"),
    [
        ({"reg_modifiers": []}, UnknownField, "unknown field `reg_modifiers`"),
        ({"kvm_capabilities": ["abc"]}, InvalidValue, "as a kvm capability"),
        ({"kvm_capabilities": [171]}, InvalidType, "expected a string"),
        ({"msr_modifiers": [{"addr": "0x10a", "bitmap": "0b" + "1" * 65}]}, InvalidValue, "too long"),
        ({"msr_modifiers": [{"addr": "0x10a", "bitmap": "0b12"}]}, InvalidValue, "unknown character: 2"),
        ({"msr_modifiers": [{"addr": "0xzz", "bitmap": "0b1"}]}, InvalidValue, "as a number"),
        ({"msr_modifiers": [{"addr": "0x100000000", "bitmap": "0b1"}]}, InvalidValue, "as a number"),
        ({"msr_modifiers": [{"addr": "9" * 5000, "bitmap": "0b1"}]}, InvalidValue, "as a number"),
        (
            {
                "cpuid_modifiers": [
                    {
                        "leaf": "0x1",
                        "subleaf": "0x0",
                        "flags": 0,
                        "modifiers": [{"register": "rax", "bitmap": "0b1"}],
                    }
                ]
            },
            UnknownVariant,
            "`eax`",
        ),
        ({"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "modifiers": []}]}, MissingField, "`flags`"),
    ],
)
def test_cpu_config_errors(body: dict, error: type, needle: str) -> None:
    with pytest.raises(error) as info:
        CpuConfig.from_json(body)
    assert needle in str(info.value)


def test_register_bitmap_invariants() -> None:
    with pytest.raises(ValueError):
        RegisterBitmap(8, mask=0b01, value=0b10)
    with pytest.raises(ValueError):
        RegisterBitmap(8, mask=0x100, value=0)
    assert RegisterBitmap.parse("1x0", 8).to_json() == "0bxxxxx1x0"


def test_all_errors_are_config_errors() -> None:
    for error in (InvalidType, UnknownField, MissingField, UnknownVariant, InvalidValue):
        assert issubclass(error, ConfigParseError)
    for error in (InvalidVcpuCount, InvalidBlockConfig, InvalidGuestCid, InvalidIpv4Addr):
        assert issubclass(error, ConfigError) and not issubclass(error, ConfigParseError)

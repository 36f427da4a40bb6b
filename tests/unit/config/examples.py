"""Sample configuration values shared by the config tests."""

from __future__ import annotations

import ipaddress

from vmm.config import (
    BalloonConfig,
    BalloonStatsUpdateConfig,
    BalloonUpdateConfig,
    BootSourceConfig,
    CacheType,
    ConfigType,
    CpuConfig,
    CpuidLeafModifier,
    CpuidRegister,
    CpuidRegisterModifier,
    CpuTemplate,
    DriveConfig,
    DrivePatch,
    EntropyConfig,
    HugePages,
    IoEngine,
    KvmCapability,
    LoggerConfig,
    LogLevel,
    MacAddr,
    MachineConfig,
    MachineConfigUpdate,
    MetricsConfig,
    MmdsConfig,
    MmdsVersion,
    MsrModifier,
    NetworkInterfaceConfig,
    NetworkInterfacePatch,
    RateLimiterConfig,
    RegisterBitmap,
    TokenBucketConfig,
    VmConfig,
    VsockConfig,
)

BUCKET = TokenBucketConfig(size=1_000_000, refill_time=100, one_time_burst=5_000_000)
LIMITER = RateLimiterConfig(bandwidth=BUCKET, ops=TokenBucketConfig(size=100, refill_time=1000))

ROOT_DRIVE = DriveConfig(
    drive_id="rootfs", path_on_host="/images/rootfs.ext4", is_root_device=True, is_read_only=True
)
DATA_DRIVE = DriveConfig(
    drive_id="data_1",
    path_on_host="/images/data.img",
    is_read_only=False,
    partuuid="0eaa91a0-01",
    cache_type=CacheType.WRITEBACK,
    rate_limiter=LIMITER,
    io_engine=IoEngine.ASYNC,
)
VHOST_DRIVE = DriveConfig(drive_id="vhost", socket="/run/vhost-blk.sock")

ETH0 = NetworkInterfaceConfig(
    iface_id="eth0",
    host_dev_name="tap0",
    guest_mac=MacAddr(bytes.fromhex("06000ac80002")),
    mtu=1500,
    rx_rate_limiter=LIMITER,
    tx_rate_limiter=RateLimiterConfig(ops=BUCKET),
)
ETH1 = NetworkInterfaceConfig(iface_id="eth1", host_dev_name="tap1")

CPU_CONFIG = CpuConfig(
    kvm_capabilities=(KvmCapability(171), KvmCapability(56, remove=True)),
    cpuid_modifiers=(
        CpuidLeafModifier(
            leaf=0x1,
            subleaf=0x0,
            flags=0,
            modifiers=(
                CpuidRegisterModifier(
                    CpuidRegister.ECX, RegisterBitmap.parse("0bx00100xxx1xxxxxxxxxxxxxxxxxxxxxx", 32)
                ),
            ),
        ),
    ),
    msr_modifiers=(MsrModifier(0x10A, RegisterBitmap.parse("0b" + "0" * 62 + "x1", 64)),),
)

FULL_VM = VmConfig(
    boot_source=BootSourceConfig(
        kernel_image_path="/images/vmlinux",
        initrd_path="/images/initrd.cpio",
        boot_args="console=ttyS0 reboot=k panic=1 pci=off",
    ),
    machine_config=MachineConfig(
        vcpu_count=2,
        mem_size_mib=256,
        smt=True,
        cpu_template=CpuTemplate.T2,
        track_dirty_pages=True,
        huge_pages=HugePages.HUGETLBFS_2M,
    ),
    drives=(DATA_DRIVE, ROOT_DRIVE),
    network_interfaces=(ETH0, ETH1),
    vsock=VsockConfig(guest_cid=3, uds_path="/tmp/v.sock", vsock_id="vsock0"),
    balloon=BalloonConfig(
        amount_mib=64,
        deflate_on_oom=True,
        stats_polling_interval_s=1,
        free_page_hinting=True,
        free_page_reporting=True,
    ),
    entropy=EntropyConfig(rate_limiter=LIMITER),
    mmds_config=MmdsConfig(
        network_interfaces=("eth0",),
        version=MmdsVersion.V2,
        ipv4_address=ipaddress.IPv4Address("169.254.170.2"),
        imds_compat=True,
    ),
    logger=LoggerConfig(
        log_path="/tmp/log.fifo",
        level=LogLevel.DEBUG,
        show_level=True,
        show_log_origin=False,
        module="vmm::devices",
    ),
    metrics=MetricsConfig(metrics_path="/tmp/metrics", emit_id=True, properties={"az": "a"}),
    cpu_config=CPU_CONFIG,
)

MINIMAL_VM = VmConfig(boot_source=BootSourceConfig(kernel_image_path="vmlinux"))

#: Every config type, each with a fully populated and a minimal value.
ROUND_TRIP: list[ConfigType] = [
    BUCKET,
    TokenBucketConfig(size=0, refill_time=0),
    LIMITER,
    RateLimiterConfig(),
    FULL_VM.boot_source,
    MINIMAL_VM.boot_source,
    FULL_VM.machine_config,
    MachineConfig(),
    MachineConfig(cpu_template=CpuTemplate.NONE),
    MachineConfigUpdate(vcpu_count=4, smt=False, cpu_template=CpuTemplate.C3),
    MachineConfigUpdate(),
    ROOT_DRIVE,
    DATA_DRIVE,
    VHOST_DRIVE,
    DrivePatch(drive_id="rootfs", path_on_host="/new.ext4", rate_limiter=LIMITER),
    DrivePatch(drive_id="rootfs"),
    ETH0,
    ETH1,
    NetworkInterfacePatch(iface_id="eth0", rx_rate_limiter=LIMITER),
    NetworkInterfacePatch(iface_id="eth0"),
    FULL_VM.vsock,
    VsockConfig(guest_cid=42, uds_path="v.sock"),
    FULL_VM.logger,
    LoggerConfig(),
    FULL_VM.metrics,
    MetricsConfig(metrics_path="m"),
    FULL_VM.mmds_config,
    MmdsConfig(network_interfaces=("eth0", "eth1")),
    FULL_VM.balloon,
    BalloonConfig(amount_mib=0, deflate_on_oom=False),
    BalloonUpdateConfig(amount_mib=10),
    BalloonStatsUpdateConfig(stats_polling_interval_s=5),
    FULL_VM.entropy,
    EntropyConfig(),
    CPU_CONFIG,
    CpuConfig(),
    FULL_VM,
    MINIMAL_VM,
    VmConfig(boot_source=BootSourceConfig("k"), cpu_config="template.json"),
]

"""Configuration types of the Firecracker API (v1.17 `definitions:`).

One frozen dataclass per spec definition. Each has:

* ``T.from_json(obj)`` — strict parse of decoded JSON, as Firecracker's serde
  types do it (unknown fields, wrong JSON types, out-of-range integers are
  errors); no semantic checks;
* ``x.validate()`` — the semantic rules (vCPU count, memory size, backend
  combinations, MAC syntax, link-local MMDS address, ...), pure, no I/O;
* ``x.to_json()`` — what Firecracker's API returns for the value.

`SnapshotCreateParams` and `SnapshotLoadParams` are the bodies of
PUT /snapshot/create and PUT /snapshot/load.

`VmConfig` is the whole config file (``ember-vmm --config-file``,
GET /vm/config); `VmConfig.from_file` reads, parses and validates one.

Every error is a `ConfigError` whose ``str()`` is the API's ``fault_message``;
`ConfigParseError` marks the serde-style ("An error occurred when
deserializing the json body of a request: ...") branch. `loads` decodes JSON
text as strictly as serde_json (duplicate keys, NaN are errors).
"""

from .balloon import BalloonConfig, BalloonStatsUpdateConfig, BalloonUpdateConfig
from .entropy import EntropyConfig
from .boot_source import CMDLINE_MAX_SIZE, DEFAULT_KERNEL_CMDLINE, BootSourceConfig
from .cpu import (
    CpuConfig,
    CpuidLeafModifier,
    CpuidRegister,
    CpuidRegisterModifier,
    KvmCapability,
    MsrModifier,
    RegisterBitmap,
)
from .drive import CacheType, DriveConfig, DrivePatch, IoEngine
from .errors import (
    ConfigError,
    ConfigFileError,
    ConfigParseError,
    DuplicateDeviceId,
    DuplicateField,
    EmptyNetworkIfaceList,
    GuestMacAddressInUse,
    InvalidBlockConfig,
    InvalidGuestCid,
    InvalidInterfaceName,
    InvalidIpv4Addr,
    InvalidJson,
    InvalidKernelCommandLine,
    InvalidKernelPath,
    InvalidMemorySize,
    InvalidMtu,
    InvalidNetworkInterfaceId,
    InvalidResourceId,
    InvalidType,
    InvalidUdsPath,
    InvalidValue,
    InvalidVcpuCount,
    MissingField,
    RootBlockDeviceAlreadyAdded,
    TooManyPagesRequested,
    UnknownField,
    UnknownVariant,
    UnsupportedConfig,
)
from .ids import check_resource_id
from .logger import LoggerConfig, LogLevel, MetricsConfig
from .machine import (
    DEFAULT_MEM_SIZE_MIB,
    MAX_SUPPORTED_VCPUS,
    CpuTemplate,
    HugePages,
    MachineConfig,
    MachineConfigUpdate,
)
from .mmds import DEFAULT_MMDS_IPV4, MmdsConfig, MmdsVersion
from .net import MacAddr, NetworkInterfaceConfig, NetworkInterfacePatch
from .rate_limiter import RateLimiterConfig, TokenBucketConfig
from .schema import ConfigType, Json, loads
from .snapshot import (
    LOAD_DEPRECATION_MESSAGE,
    ConflictingFields,
    DriveOverride,
    InvalidSnapshotPath,
    MemBackendType,
    MemoryBackend,
    NetworkOverride,
    SnapshotCreateParams,
    SnapshotHugePages,
    SnapshotLoadParams,
    SnapshotType,
    VsockOverride,
)
from .vm import MAX_CONFIG_FILE_SIZE, VmConfig, read_json_file
from .vsock import VsockConfig

__all__ = [
    # the full configuration
    "VmConfig",
    "MAX_CONFIG_FILE_SIZE",
    "read_json_file",
    "loads",
    "Json",
    "ConfigType",
    # sections
    "BootSourceConfig",
    "CMDLINE_MAX_SIZE",
    "DEFAULT_KERNEL_CMDLINE",
    "MachineConfig",
    "MachineConfigUpdate",
    "HugePages",
    "CpuTemplate",
    "MAX_SUPPORTED_VCPUS",
    "DEFAULT_MEM_SIZE_MIB",
    "DriveConfig",
    "DrivePatch",
    "CacheType",
    "IoEngine",
    "NetworkInterfaceConfig",
    "NetworkInterfacePatch",
    "MacAddr",
    "VsockConfig",
    "LoggerConfig",
    "LogLevel",
    "MetricsConfig",
    "MmdsConfig",
    "MmdsVersion",
    "DEFAULT_MMDS_IPV4",
    "BalloonConfig",
    "BalloonUpdateConfig",
    "BalloonStatsUpdateConfig",
    "EntropyConfig",
    "RateLimiterConfig",
    "TokenBucketConfig",
    "CpuConfig",
    "CpuidLeafModifier",
    "CpuidRegister",
    "CpuidRegisterModifier",
    "KvmCapability",
    "MsrModifier",
    "RegisterBitmap",
    "check_resource_id",
    # snapshot requests
    "SnapshotCreateParams",
    "SnapshotLoadParams",
    "SnapshotType",
    "SnapshotHugePages",
    "MemoryBackend",
    "MemBackendType",
    "NetworkOverride",
    "VsockOverride",
    "DriveOverride",
    "LOAD_DEPRECATION_MESSAGE",
    # errors
    "ConfigError",
    "ConfigParseError",
    "ConfigFileError",
    "InvalidJson",
    "UnknownField",
    "MissingField",
    "DuplicateField",
    "InvalidType",
    "InvalidValue",
    "UnknownVariant",
    "InvalidKernelCommandLine",
    "InvalidKernelPath",
    "InvalidVcpuCount",
    "InvalidMemorySize",
    "InvalidResourceId",
    "InvalidBlockConfig",
    "RootBlockDeviceAlreadyAdded",
    "DuplicateDeviceId",
    "GuestMacAddressInUse",
    "InvalidInterfaceName",
    "InvalidMtu",
    "InvalidGuestCid",
    "InvalidUdsPath",
    "EmptyNetworkIfaceList",
    "InvalidIpv4Addr",
    "InvalidNetworkInterfaceId",
    "TooManyPagesRequested",
    "UnsupportedConfig",
    "InvalidSnapshotPath",
    "ConflictingFields",
]

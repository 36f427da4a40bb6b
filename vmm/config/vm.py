"""The full microVM configuration: ``ember-vmm --config-file`` and GET /vm/config.

Spec: `FullVmConfiguration`. The keys are Firecracker's (``boot-source``,
``machine-config``, ``drives``, ``network-interfaces``, ...). Differences from
Firecracker, all deliberate:

* unknown top-level keys are rejected (Firecracker ignores them, so a typo
  such as ``machine_config`` silently drops a section);
* ``drives`` may be omitted (Firecracker requires the key, even if empty);
* ``pmem`` and ``memory-hotplug`` are accepted only empty (``[]`` / ``null``,
  which is what Firecracker's GET /vm/config writes when they are unused):
  Ember has neither device;
* `validate` also rejects what Firecracker resolves by "last one wins":
  two drives or interfaces with one ID, two interfaces on one TAP device.

`to_json` writes every key, ``null`` for absent sections, as Firecracker's
GET /vm/config does.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

from .balloon import BalloonConfig
from .boot_source import BootSourceConfig
from .cpu import CpuConfig
from .drive import DriveConfig
from .entropy import EntropyConfig
from .errors import (
    ConfigError,
    ConfigFileError,
    DuplicateDeviceId,
    GuestMacAddressInUse,
    InvalidNetworkInterfaceId,
    InvalidType,
    RootBlockDeviceAlreadyAdded,
    TooManyPagesRequested,
    UnsupportedConfig,
)
from .logger import LoggerConfig, MetricsConfig
from .machine import MachineConfig
from .mmds import MmdsConfig
from .net import NetworkInterfaceConfig
from .schema import ConfigType, Field, Json, Schema, describe, loads, nested, sequence_of
from .vsock import VsockConfig

__all__ = ["VmConfig", "MAX_CONFIG_FILE_SIZE", "read_json_file"]

_T = TypeVar("_T")

#: Largest configuration (or CPU template) file Ember reads. Real ones are a
#: few KiB; the bound keeps a wrong path (a disk image, /dev/zero) from being
#: slurped into memory.
MAX_CONFIG_FILE_SIZE = 1 << 20


def read_json_file(path: str | os.PathLike[str], *, max_size: int = MAX_CONFIG_FILE_SIZE) -> Json:
    """Read and decode a JSON file of at most `max_size` bytes.

    Raises `ConfigFileError` if it cannot be read or is too large, and
    `InvalidJson` (naming the file) if it is not JSON.
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as file:
            data = file.read(max_size + 1)
    except OSError as exc:
        raise ConfigFileError(
            f"Unable to read the configuration file `{name}`: {exc.strerror or exc}"
        ) from exc
    except ValueError as exc:  # a NUL in the path
        raise ConfigFileError(f"Unable to read the configuration file `{name!r}`: {exc}") from exc
    if len(data) > max_size:
        raise ConfigFileError(
            f"The configuration file `{name}` is larger than {max_size} bytes"
        )
    try:
        return loads(data)
    except ConfigError as exc:
        raise exc.at(name) from exc.__cause__


def _read_cpu_config(value: object, path: str) -> CpuConfig | str:
    # Firecracker's CustomCpuTemplateOrPath: a file path, or the template itself.
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return CpuConfig.from_json(value, path=path)
    raise InvalidType(
        f"invalid type: {describe(value)}, expected a path string or struct "
        "CustomCpuTemplate",
        path=path,
    )


def _read_machine_config(value: object, path: str) -> MachineConfig:
    # `null` means "not configured": Firecracker's defaults.
    return MachineConfig() if value is None else MachineConfig.from_json(value, path=path)


def _read_no_pmem(value: object, path: str) -> None:
    if not isinstance(value, list):
        raise InvalidType(f"invalid type: {describe(value)}, expected a sequence", path=path)
    if value:
        raise UnsupportedConfig("virtio-pmem devices are not supported by Ember", path=path)


def _read_no_memory_hotplug(value: object, path: str) -> None:
    if value is not None:
        raise UnsupportedConfig(
            "memory hotplug (virtio-mem) is not supported by Ember", path=path
        )


@dataclass(frozen=True)
class VmConfig(ConfigType):
    """Spec `FullVmConfiguration`: every resource of one microVM."""

    boot_source: BootSourceConfig
    machine_config: MachineConfig = MachineConfig()
    drives: tuple[DriveConfig, ...] = ()
    network_interfaces: tuple[NetworkInterfaceConfig, ...] = ()
    vsock: VsockConfig | None = None
    balloon: BalloonConfig | None = None
    entropy: EntropyConfig | None = None
    mmds_config: MmdsConfig | None = None
    logger: LoggerConfig | None = None
    metrics: MetricsConfig | None = None
    # A template, or the path of a JSON file holding one (`load_cpu_config_file`).
    cpu_config: CpuConfig | str | None = None

    SCHEMA = Schema(
        "VmmConfig",
        [
            Field.option("balloon", nested(BalloonConfig)),
            Field("drives", sequence_of(nested(DriveConfig)), default=()),
            Field("boot-source", nested(BootSourceConfig)),
            Field.option("cpu-config", _read_cpu_config),
            Field.option("logger", nested(LoggerConfig)),
            Field("machine-config", _read_machine_config, default=MachineConfig()),
            Field.option("metrics", nested(MetricsConfig)),
            Field.option("mmds-config", nested(MmdsConfig)),
            Field(
                "network-interfaces",
                sequence_of(nested(NetworkInterfaceConfig)),
                default=(),
            ),
            Field.option("vsock", nested(VsockConfig)),
            Field.option("entropy", nested(EntropyConfig)),
            Field("pmem", _read_no_pmem, default=(), stored=False),
            Field("memory-hotplug", _read_no_memory_hotplug, default=None, stored=False),
        ],
    )

    def __post_init__(self) -> None:
        for name in ("drives", "network_interfaces"):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))

    # --- loading ---------------------------------------------------------------

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], *, max_size: int = MAX_CONFIG_FILE_SIZE
    ) -> VmConfig:
        """Read, parse and validate a configuration file (``--config-file``).

        A ``cpu-config`` given as a path is loaded (relative paths are
        relative to the working directory, as in Firecracker).
        """
        config = cls.from_json(read_json_file(path, max_size=max_size))
        config = config.load_cpu_config_file(max_size=max_size)
        config.validate()
        return config

    def load_cpu_config_file(self, *, max_size: int = MAX_CONFIG_FILE_SIZE) -> VmConfig:
        """This config with a ``cpu-config`` path replaced by the template it names."""
        if not isinstance(self.cpu_config, str):
            return self
        template = _located(
            "cpu-config",
            lambda: CpuConfig.from_json(read_json_file(self.cpu_config, max_size=max_size)),
        )
        return replace(self, cpu_config=template)

    # --- views ------------------------------------------------------------------

    @property
    def root_drive(self) -> DriveConfig | None:
        return next((d for d in self.drives if d.is_root_device), None)

    @property
    def drives_in_device_order(self) -> tuple[DriveConfig, ...]:
        """Root drive first (it becomes /dev/vda), then the others in order."""
        root = [d for d in self.drives if d.is_root_device]
        return tuple(root + [d for d in self.drives if not d.is_root_device])

    # --- checks -----------------------------------------------------------------

    def validate(self) -> None:
        """Validate every section and the rules that span sections."""
        _located("boot-source", self.boot_source.validate)
        _located("machine-config", self.machine_config.validate)
        self._validate_drives()
        self._validate_network_interfaces()
        for key, section in (
            ("vsock", self.vsock),
            ("balloon", self.balloon),
            ("entropy", self.entropy),
            ("mmds-config", self.mmds_config),
            ("logger", self.logger),
            ("metrics", self.metrics),
        ):
            if section is not None:
                _located(key, section.validate)
        if isinstance(self.cpu_config, CpuConfig):
            _located("cpu-config", self.cpu_config.validate)
        if self.balloon is not None and self.balloon.amount_mib > self.machine_config.mem_size_mib:
            raise TooManyPagesRequested(
                f"Amount of pages requested is too large: the balloon target "
                f"({self.balloon.amount_mib} MiB) exceeds guest memory "
                f"({self.machine_config.mem_size_mib} MiB).",
                path="balloon",
            )
        if self.mmds_config is not None:
            known = {iface.iface_id for iface in self.network_interfaces}
            for index, iface_id in enumerate(self.mmds_config.network_interfaces):
                if iface_id not in known:
                    raise InvalidNetworkInterfaceId(
                        path=f"mmds-config.network_interfaces[{index}]"
                    )

    def _validate_drives(self) -> None:
        seen: set[str] = set()
        root: str | None = None
        for index, drive in enumerate(self.drives):
            where = f"drives[{index}]"
            _located(where, drive.validate)
            if drive.drive_id in seen:
                raise DuplicateDeviceId(
                    f"Duplicate drive_id `{drive.drive_id}`: drive IDs must be unique.",
                    path=where,
                )
            seen.add(drive.drive_id)
            if drive.is_root_device:
                if root is not None:
                    raise RootBlockDeviceAlreadyAdded(
                        f"A root block device already exists! (`{root}`)", path=where
                    )
                root = drive.drive_id

    def _validate_network_interfaces(self) -> None:
        ids: set[str] = set()
        taps: set[str] = set()
        macs: set[str] = set()
        for index, iface in enumerate(self.network_interfaces):
            where = f"network-interfaces[{index}]"
            _located(where, iface.validate)
            if iface.iface_id in ids:
                raise DuplicateDeviceId(
                    f"Duplicate iface_id `{iface.iface_id}`: network interface IDs "
                    "must be unique.",
                    path=where,
                )
            ids.add(iface.iface_id)
            if iface.host_dev_name in taps:
                raise DuplicateDeviceId(
                    f"The TAP device `{iface.host_dev_name}` is used by more than one "
                    "network interface.",
                    path=where,
                )
            taps.add(iface.host_dev_name)
            if iface.guest_mac is not None:
                mac = str(iface.guest_mac)
                if mac in macs:
                    raise GuestMacAddressInUse(
                        f"The MAC address is already in use: {mac}", path=where
                    )
                macs.add(mac)


def _located(prefix: str, action: Callable[[], _T]) -> _T:
    """Run `action`, locating any `ConfigError` it raises under `prefix`."""
    try:
        return action()
    except ConfigError as exc:
        raise exc.at(prefix) from exc.__cause__

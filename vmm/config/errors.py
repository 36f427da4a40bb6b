"""The one error family of `vmm.config`.

Every error raised while parsing or validating a configuration is a
`ConfigError`; its `str()` is the `fault_message` the API answers with.

Two branches:

* `ConfigParseError` — the JSON did not have the shape of the type
  (Firecracker reports these as serde errors, and its API wraps them as
  "An error occurred when deserializing the json body of a request: ...").
  Messages use serde's wording so a Firecracker user recognises them:
  ``unknown field `foo`, expected one of `vcpu_count`, ...``,
  ``missing field `drive_id```, ``invalid type: boolean `true`, expected u8``.
* every other subclass — the value is well-formed but makes no sense
  (Firecracker's `MachineConfigError`, `DriveError`, ... messages).

An error found inside a nested value carries a `path` (``drives[1].rate_limiter``)
that prefixes the message, so an error in a large config file points at the
right spot.
"""

from __future__ import annotations

from typing import Self

__all__ = [
    "ConfigError",
    "ConfigParseError",
    "InvalidJson",
    "UnknownField",
    "MissingField",
    "DuplicateField",
    "InvalidType",
    "InvalidValue",
    "UnknownVariant",
    "ConfigFileError",
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
]


class ConfigError(ValueError):
    """The configuration is invalid."""

    def __init__(self, message: str | None = None, *, path: str = "") -> None:
        self.message = message if message is not None else _docstring(type(self))
        self.path = path
        super().__init__(self.fault_message)

    @property
    def fault_message(self) -> str:
        """The text for the API's `fault_message` (also `str(self)`)."""
        return f"{self.path}: {self.message}" if self.path else self.message

    def at(self, prefix: str) -> Self:
        """The same error located under `prefix` (e.g. ``drives[0]``)."""
        if not prefix:
            return self
        moved = type(self).__new__(type(self))
        moved.__dict__.update(self.__dict__)
        moved.path = join_path(prefix, self.path)
        moved.args = (moved.fault_message,)
        moved.__cause__ = self.__cause__
        return moved

    def __str__(self) -> str:
        return self.fault_message


def _docstring(cls: type) -> str:
    return " ".join((cls.__doc__ or cls.__name__).split())


def join_path(prefix: str, rest: str) -> str:
    """``join_path("drives[0]", "rate_limiter") == "drives[0].rate_limiter"``."""
    if not prefix:
        return rest
    if not rest:
        return prefix
    return prefix + rest if rest.startswith("[") else f"{prefix}.{rest}"


# --- the JSON does not have the type's shape (serde's errors) ---------------


class ConfigParseError(ConfigError):
    """The JSON value does not have the expected shape."""


class InvalidJson(ConfigParseError):
    """Invalid JSON."""


class UnknownField(ConfigParseError):
    """An object has a field the type does not know."""


class MissingField(ConfigParseError):
    """An object lacks a required field."""


class DuplicateField(ConfigParseError):
    """An object has the same field twice."""


class InvalidType(ConfigParseError):
    """A value has the wrong JSON type."""


class InvalidValue(ConfigParseError):
    """A value has the right JSON type but is out of range or malformed."""


class UnknownVariant(ConfigParseError):
    """A string is not one of the values an enumeration allows."""


class ConfigFileError(ConfigError):
    """The configuration file cannot be read."""


# --- well-formed but meaningless values (Firecracker's semantic errors) ------


class InvalidKernelCommandLine(ConfigError):
    """The kernel command line is invalid."""


class InvalidKernelPath(ConfigError):
    """The kernel file cannot be opened: the path is empty."""


class InvalidVcpuCount(ConfigError):
    """The number of vCPUs must be greater than 0, less than 32 and must be 1
    or an even number if SMT is enabled."""


class InvalidMemorySize(ConfigError):
    """The memory size (MiB) is either 0, or not a multiple of the configured
    page size."""


class InvalidResourceId(ConfigError):
    """API Resource IDs can only contain alphanumeric characters and underscores."""


class InvalidBlockConfig(ConfigError):
    """Unable to create the virtio block device: Invalid block config."""


class RootBlockDeviceAlreadyAdded(ConfigError):
    """A root block device already exists!"""


class DuplicateDeviceId(ConfigError):
    """Two devices of the same kind have the same ID."""


class GuestMacAddressInUse(ConfigError):
    """The MAC address is already in use."""


class InvalidInterfaceName(ConfigError):
    """Invalid interface name."""


class InvalidMtu(ConfigError):
    """MTU is out of range [68, 65535]."""


class InvalidGuestCid(ConfigError):
    """Invalid guest CID: CIDs 0, 1, 2 and 4294967295 are reserved."""


class InvalidUdsPath(ConfigError):
    """The vsock Unix domain socket path is empty."""


class EmptyNetworkIfaceList(ConfigError):
    """The list of network interface IDs that allow forwarding MMDS requests is empty."""


class InvalidIpv4Addr(ConfigError):
    """The MMDS IPv4 address is not link local."""


class InvalidNetworkInterfaceId(ConfigError):
    """The list of network interface IDs provided contains at least one ID
    that does not correspond to any existing network interface."""


class TooManyPagesRequested(ConfigError):
    """Amount of pages requested is too large."""


class UnsupportedConfig(ConfigError):
    """This configuration is valid for Firecracker but not supported by Ember."""

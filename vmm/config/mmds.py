"""MMDS (microVM metadata service) configuration.

Spec: `MmdsConfig` (PUT /mmds/config, ``mmds-config`` in the config file).
The listed network interfaces intercept ARP and TCP traffic for
`ipv4_address` and answer it from the metadata store. Which interfaces exist
is checked where all devices are known (`VmConfig.validate`, or the API's
resource store).
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

from .errors import EmptyNetworkIfaceList, InvalidIpv4Addr, InvalidValue
from .schema import ConfigType, Field, Schema, enum_of, read_bool, read_str, sequence_of

__all__ = ["MmdsVersion", "MmdsConfig", "DEFAULT_MMDS_IPV4", "is_link_local_valid"]

# Spec `MmdsConfig.ipv4_address` default.
DEFAULT_MMDS_IPV4 = ipaddress.IPv4Address("169.254.169.254")


class MmdsVersion(enum.StrEnum):
    """Spec `MmdsConfig.version`: V2 requires session tokens (PUT /latest/api/token)."""

    V1 = "V1"
    V2 = "V2"


def is_link_local_valid(address: ipaddress.IPv4Address) -> bool:
    """169.254.0.0/16 minus its first and last /24 (RFC 3927 §2.1 reserves them)."""
    a, b, c, _ = address.packed
    return a == 169 and b == 254 and c not in (0, 255)


def read_ipv4(value: object, path: str) -> ipaddress.IPv4Address:
    text = read_str(value, path)
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        # Rust's Ipv4Addr parser reports only this.
        raise InvalidValue("invalid IPv4 address syntax", path=path) from None


@dataclass(frozen=True)
class MmdsConfig(ConfigType):
    """Spec `MmdsConfig`."""

    network_interfaces: tuple[str, ...]
    version: MmdsVersion = MmdsVersion.V1
    ipv4_address: ipaddress.IPv4Address | None = None
    imds_compat: bool = False

    SCHEMA = Schema(
        "MmdsConfig",
        [
            Field("version", enum_of(MmdsVersion), default=MmdsVersion.V1),
            Field("network_interfaces", sequence_of(read_str)),
            Field.option("ipv4_address", read_ipv4),
            Field("imds_compat", read_bool, default=False),
        ],
    )

    def __post_init__(self) -> None:
        if not isinstance(self.network_interfaces, tuple):
            object.__setattr__(self, "network_interfaces", tuple(self.network_interfaces))
        if isinstance(self.ipv4_address, str):
            object.__setattr__(self, "ipv4_address", ipaddress.IPv4Address(self.ipv4_address))

    @property
    def effective_ipv4_address(self) -> ipaddress.IPv4Address:
        return self.ipv4_address or DEFAULT_MMDS_IPV4

    def validate(self) -> None:
        if self.ipv4_address is not None and not is_link_local_valid(self.ipv4_address):
            raise InvalidIpv4Addr()
        if not self.network_interfaces:
            raise EmptyNetworkIfaceList()

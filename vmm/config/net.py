"""Network interfaces: a virtio-net device backed by a host TAP device.

Spec: `NetworkInterface` (PUT /network-interfaces/{iface_id},
``network-interfaces`` in the config file) and `PartialNetworkInterface`
(PATCH, post-boot: only the rate limiters change).
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from .errors import InvalidInterfaceName, InvalidMtu, InvalidValue
from .ids import check_resource_id
from .rate_limiter import RateLimiterConfig
from .schema import U16, ConfigType, Field, Schema, nested, read_str

__all__ = [
    "MacAddr",
    "NetworkInterfaceConfig",
    "NetworkInterfacePatch",
    "IFNAMSIZ",
    "MTU_MIN",
    "MTU_MAX",
]

# linux/if.h: interface names are at most IFNAMSIZ bytes, terminating NUL included.
IFNAMSIZ = 16
# Firecracker devices/virtio/net/device.rs: the MTU range advertised with
# VIRTIO_NET_F_MTU (68 is the IPv4 minimum, RFC 791).
MTU_MIN = 68
MTU_MAX = 65535

_MAC_LEN = 6


@dataclass(frozen=True)
class MacAddr:
    """A 6-byte Ethernet address, written ``aa:bb:cc:dd:ee:ff`` (lowercase)."""

    octets: bytes

    def __post_init__(self) -> None:
        if len(self.octets) != _MAC_LEN:
            raise ValueError(f"a MAC address has {_MAC_LEN} octets, not {len(self.octets)}")

    @classmethod
    def parse(cls, text: str) -> MacAddr | None:
        """Six colon-separated two-digit hex groups, or None if `text` is not that."""
        groups = text.split(":")
        if len(groups) != _MAC_LEN:
            return None
        if not all(len(g) == 2 and all(c in string.hexdigits for c in g) for g in groups):
            return None
        return cls(bytes(int(g, 16) for g in groups))

    @property
    def is_multicast(self) -> bool:
        """The I/G bit: a multicast (or broadcast) address, not a unicast NIC address."""
        return bool(self.octets[0] & 1)

    def to_json(self) -> str:
        return str(self)

    def __str__(self) -> str:
        return ":".join(f"{b:02x}" for b in self.octets)

    def __repr__(self) -> str:
        return f"MacAddr('{self}')"


def read_mac(value: object, path: str) -> MacAddr:
    mac = MacAddr.parse(read_str(value, path))
    if mac is None:
        # Firecracker's MacAddr deserializer reports only this sentence.
        raise InvalidValue("The provided MAC address is invalid.", path=path)
    return mac


def check_tap_name(name: str) -> None:
    """Raise `InvalidInterfaceName` unless Linux would accept `name` (dev_valid_name)."""
    encoded = name.encode("utf-8", "surrogatepass")
    if (
        not encoded
        or len(encoded) >= IFNAMSIZ
        or name in (".", "..")
        or any(ch == "/" or ch == ":" or ch.isspace() for ch in name)
    ):
        raise InvalidInterfaceName(
            f"Invalid interface name `{name}`: a TAP device name has 1 to "
            f"{IFNAMSIZ - 1} bytes and no '/', ':' or whitespace."
        )


@dataclass(frozen=True)
class NetworkInterfaceConfig(ConfigType):
    """Spec `NetworkInterface`."""

    iface_id: str
    host_dev_name: str
    guest_mac: MacAddr | None = None
    mtu: int | None = None
    rx_rate_limiter: RateLimiterConfig | None = None
    tx_rate_limiter: RateLimiterConfig | None = None

    SCHEMA = Schema(
        "NetworkInterfaceConfig",
        [
            Field("iface_id", read_str),
            Field("host_dev_name", read_str),
            Field.option("guest_mac", read_mac),
            Field.option("mtu", U16),
            Field.option("rx_rate_limiter", nested(RateLimiterConfig)),
            Field.option("tx_rate_limiter", nested(RateLimiterConfig)),
        ],
    )

    def validate(self) -> None:
        check_resource_id(self.iface_id)
        check_tap_name(self.host_dev_name)
        if self.mtu is not None and not MTU_MIN <= self.mtu <= MTU_MAX:
            raise InvalidMtu(f"MTU {self.mtu} is out of range [{MTU_MIN}, {MTU_MAX}]")


@dataclass(frozen=True)
class NetworkInterfacePatch(ConfigType):
    """Spec `PartialNetworkInterface`: new RX/TX rate limiters (absent = unchanged)."""

    iface_id: str
    rx_rate_limiter: RateLimiterConfig | None = None
    tx_rate_limiter: RateLimiterConfig | None = None

    SCHEMA = Schema(
        "NetworkInterfaceUpdateConfig",
        [
            Field("iface_id", read_str),
            Field.option("rx_rate_limiter", nested(RateLimiterConfig), skip_none=True),
            Field.option("tx_rate_limiter", nested(RateLimiterConfig), skip_none=True),
        ],
    )

    def validate(self) -> None:
        check_resource_id(self.iface_id)

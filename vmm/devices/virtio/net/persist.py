"""The saved state of a virtio-net device, and its checks as untrusted input.

The state names the TAP rather than holding it: a restore reopens the
interface by name (the operator recreates it on the restore host, as with
Firecracker). TX chains are never in flight across a save (each is
finished, or given back to the ring when throttled, under the device lock),
and RX chains are only held while a frame is written; the one thing in
flight is the *pending* RX frame (read from the TAP or the MMDS, waiting for
guest buffers or tokens), which is saved so no frame is lost. The rate
limiters' buckets are saved; their blocked state is not (a restored limiter
starts unblocked). The MMDS network stack belongs to the MMDS and is saved
there: `mmds_attached` records that the device had one.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmm.config.net import IFNAMSIZ, MTU_MAX, MTU_MIN, MacAddr
from vmm.devices.virtio.device import VirtioDeviceState
from vmm.devices.virtio.net.header import ETH_HLEN, MAX_BUFFER_SIZE, VNET_HDR_LEN
from vmm.devices.virtio.queue import MAX_QUEUE_SIZE
from vmm.rate_limiter import RateLimiterState

__all__ = ["NetPersistError", "NetStateInvalid", "NetState", "validate_net_state"]


class NetPersistError(Exception):
    """A virtio-net device could not be saved or restored."""


class NetStateInvalid(NetPersistError):
    """A saved virtio-net state has fields of the wrong type or out of range."""


@dataclass(frozen=True)
class NetState:
    """Everything needed to rebuild a `Net` once its TAP is reopened."""

    iface_id: str
    host_dev_name: str
    guest_mac: str | None  # "aa:bb:cc:dd:ee:ff"
    mtu: int | None
    queue_size: int
    rx_rate_limiter: RateLimiterState
    tx_rate_limiter: RateLimiterState
    mmds_attached: bool
    pending_rx_frame: bytes | None  # vnet header + frame
    virtio: VirtioDeviceState


def validate_net_state(state: NetState) -> None:
    """Type and range checks; the device checks the rest (features, queues, limiters) as it loads."""
    if not isinstance(state, NetState):
        raise NetStateInvalid(f"expected NetState, got {type(state).__name__}")
    if not isinstance(state.iface_id, str) or not state.iface_id:
        raise NetStateInvalid("iface_id must be a non-empty string")
    name = state.host_dev_name
    if (not isinstance(name, str) or not name or len(name.encode("utf-8", "surrogatepass")) >= IFNAMSIZ
            or any(c in name for c in "/:\0") or any(c.isspace() for c in name)):
        raise NetStateInvalid(f"host_dev_name {name!r} is not an interface name")
    if state.guest_mac is not None and (not isinstance(state.guest_mac, str) or MacAddr.parse(state.guest_mac) is None):
        raise NetStateInvalid(f"guest_mac {state.guest_mac!r} is not a MAC address")
    if state.mtu is not None and (type(state.mtu) is not int or not MTU_MIN <= state.mtu <= MTU_MAX):
        raise NetStateInvalid(f"mtu {state.mtu!r} is out of range [{MTU_MIN}, {MTU_MAX}]")
    size = state.queue_size
    if type(size) is not int or not 2 <= size <= MAX_QUEUE_SIZE or size & (size - 1):
        raise NetStateInvalid(f"queue_size {size!r} is not a power of two in 2..{MAX_QUEUE_SIZE}")
    for name in ("rx_rate_limiter", "tx_rate_limiter"):
        if not isinstance(getattr(state, name), RateLimiterState):
            raise NetStateInvalid(f"{name} must be a RateLimiterState")
    if not isinstance(state.mmds_attached, bool):
        raise NetStateInvalid("mmds_attached must be a bool")
    frame = state.pending_rx_frame
    if frame is not None and (not isinstance(frame, bytes)
                              or not VNET_HDR_LEN + ETH_HLEN <= len(frame) <= MAX_BUFFER_SIZE):
        raise NetStateInvalid(f"pending_rx_frame must be None or {VNET_HDR_LEN + ETH_HLEN}..{MAX_BUFFER_SIZE} bytes")
    if not isinstance(state.virtio, VirtioDeviceState):
        raise NetStateInvalid("virtio must be a VirtioDeviceState")

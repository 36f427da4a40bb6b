"""The saved state of a virtio vsock device, and its checks as untrusted input.

Only configuration, queues and the last host-side port are saved.
Connections are not (as in Firecracker: the vsock protocol cannot survive
lost packets, and the host sockets belong to the old process); the restored
device sends VIRTIO_VSOCK_EVENT_TRANSPORT_RESET so the guest drops them, and
allocates host-side ports after the saved one, so that no new connection
looks like one the guest still holds (`Muxer.resume_local_ports`).
"""

from __future__ import annotations

from dataclasses import dataclass

from vmm.devices.virtio.device import VirtioDeviceState
from vmm.devices.virtio.queue import MAX_QUEUE_SIZE
from vmm.devices.virtio.vsock.muxer import LOCAL_PORT_FIRST, LOCAL_PORT_LIMIT

__all__ = ["VsockPersistError", "VsockStateInvalid", "VsockState", "validate_vsock_state"]

# linux/vm_sockets.h: CIDs 0-2 are reserved, 0xFFFFFFFF is VMADDR_CID_ANY.
_CID_MIN, _CID_LIMIT = 3, 0xFFFF_FFFF
# linux/un.h: sizeof(sockaddr_un.sun_path), terminating NUL included.
_UNIX_PATH_MAX = 108


class VsockPersistError(Exception):
    """A virtio vsock device could not be saved or restored."""


class VsockStateInvalid(VsockPersistError):
    """A saved virtio vsock state has fields of the wrong type or out of range."""


@dataclass(frozen=True)
class VsockState:
    """Everything needed to rebuild a `Vsock` (it binds `uds_path` again, or an override)."""

    guest_cid: int
    uds_path: str
    queue_size: int
    virtio: VirtioDeviceState
    #: The host-side port of the last host-initiated connection (absent in snapshots of format 1.0).
    local_port_last: int | None = None


def validate_vsock_state(state: VsockState) -> None:
    """Type and range checks; the device checks the rest (features, queues) when it loads the state."""
    if not isinstance(state, VsockState):
        raise VsockStateInvalid(f"expected VsockState, got {type(state).__name__}")
    if type(state.guest_cid) is not int or not _CID_MIN <= state.guest_cid < _CID_LIMIT:
        raise VsockStateInvalid(f"guest_cid {state.guest_cid!r} is outside {_CID_MIN}..{_CID_LIMIT - 1}")
    if not isinstance(state.uds_path, str) or not state.uds_path or "\0" in state.uds_path:
        raise VsockStateInvalid("uds_path must be a non-empty string without NUL bytes")
    if len(state.uds_path.encode("utf-8", "surrogatepass")) >= _UNIX_PATH_MAX:
        raise VsockStateInvalid(f"uds_path is longer than {_UNIX_PATH_MAX - 1} bytes")
    if (type(state.queue_size) is not int or not 2 <= state.queue_size <= MAX_QUEUE_SIZE
            or state.queue_size & (state.queue_size - 1)):
        raise VsockStateInvalid(f"queue_size {state.queue_size!r} is not a power of two in 2..{MAX_QUEUE_SIZE}")
    if not isinstance(state.virtio, VirtioDeviceState):
        raise VsockStateInvalid("virtio must be a VirtioDeviceState")
    if state.local_port_last is not None and (
            type(state.local_port_last) is not int
            or not LOCAL_PORT_FIRST - 1 <= state.local_port_last < LOCAL_PORT_LIMIT):
        raise VsockStateInvalid(f"local_port_last {state.local_port_last!r} is outside "
                                f"{LOCAL_PORT_FIRST - 1}..{LOCAL_PORT_LIMIT - 1}")

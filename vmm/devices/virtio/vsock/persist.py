"""The saved state of a virtio vsock device, and its checks as untrusted input.

Only configuration and queues are saved. Connections are not (as in
Firecracker: the vsock protocol cannot survive lost packets, and the host
sockets belong to the old process); the restored device sends
VIRTIO_VSOCK_EVENT_TRANSPORT_RESET so the guest drops them.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmm.devices.virtio.device import VirtioDeviceState
from vmm.devices.virtio.queue import MAX_QUEUE_SIZE

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

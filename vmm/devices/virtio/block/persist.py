"""The saved state of a virtio block device, and its checks as untrusted input.

The state names the backing file rather than holding its data: a snapshot
restores onto the same (or an identical) file, as Firecracker does. Requests
are never in flight across a save (the device completes each one while it
holds its lock, and gives throttled ones back to the available ring), so
none are saved.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmm.config.drive import CacheType
from vmm.devices.virtio.device import VirtioDeviceState
from vmm.devices.virtio.queue import MAX_QUEUE_SIZE

__all__ = ["BlockPersistError", "BlockStateInvalid", "BlockState", "validate_block_state"]


class BlockPersistError(Exception):
    """A virtio block device could not be saved or restored."""


class BlockStateInvalid(BlockPersistError):
    """A saved virtio block state has fields of the wrong type or out of range."""


@dataclass(frozen=True)
class BlockState:
    """Everything needed to rebuild a `Block` (the rate limiter is passed in again)."""

    drive_id: str
    path: str
    read_only: bool
    is_root: bool
    cache_type: str
    partuuid: str | None
    queue_size: int
    virtio: VirtioDeviceState


def validate_block_state(state: BlockState) -> None:
    """Type and range checks; the device checks the rest (features, queues) when it loads the state."""
    if not isinstance(state, BlockState):
        raise BlockStateInvalid(f"expected BlockState, got {type(state).__name__}")
    for name in ("drive_id", "path", "cache_type"):
        if not isinstance(getattr(state, name), str) or not getattr(state, name):
            raise BlockStateInvalid(f"{name} must be a non-empty string")
    if "\0" in state.path:
        raise BlockStateInvalid("path contains a NUL byte")
    for name in ("read_only", "is_root"):
        if not isinstance(getattr(state, name), bool):
            raise BlockStateInvalid(f"{name} must be a bool")
    if state.partuuid is not None and not isinstance(state.partuuid, str):
        raise BlockStateInvalid("partuuid must be a string or None")
    if state.cache_type not in {c.value for c in CacheType}:
        raise BlockStateInvalid(f"unknown cache_type {state.cache_type!r}")
    if (type(state.queue_size) is not int or not 4 <= state.queue_size <= MAX_QUEUE_SIZE
            or state.queue_size & (state.queue_size - 1)):
        raise BlockStateInvalid(f"queue_size {state.queue_size!r} is not a power of two in 4..{MAX_QUEUE_SIZE}")
    if not isinstance(state.virtio, VirtioDeviceState):
        raise BlockStateInvalid("virtio must be a VirtioDeviceState")

"""Virtio devices (virtio 1.1): the split virtqueue, the device base, the MMIO transport.

`queue` is the device side of a split virtqueue (§2.6), `device` the
`VirtioDevice` base and its interrupt line, `transport` the virtio-mmio
register map (§4.2). Concrete devices live in subpackages imported
explicitly (`from vmm.devices.virtio.block import Block`), so the transport
and the core never pull a device in.
"""

from vmm.devices.virtio.device import (
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_BALLOON,
    VIRTIO_ID_BLOCK,
    VIRTIO_ID_NET,
    VIRTIO_ID_RNG,
    VIRTIO_ID_VSOCK,
    VIRTIO_MMIO_INT_CONFIG,
    VIRTIO_MMIO_INT_VRING,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    ActivateError,
    InterruptKind,
    RateLimiter,
    TokenKind,
    VirtioDevice,
    VirtioDeviceError,
    VirtioDeviceState,
    VirtioDeviceStateInvalid,
    VirtioInterrupt,
    feature,
)
from vmm.devices.virtio.queue import (
    MAX_QUEUE_SIZE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Descriptor,
    DescriptorChain,
    DescriptorChainError,
    Queue,
    QueueError,
    QueueState,
    QueueStateInvalid,
)
from vmm.devices.virtio.transport import MMIO_LEN, MmioTransport, MmioTransportState

__all__ = [
    "VIRTIO_F_VERSION_1",
    "VIRTIO_ID_BALLOON",
    "VIRTIO_ID_BLOCK",
    "VIRTIO_ID_NET",
    "VIRTIO_ID_RNG",
    "VIRTIO_ID_VSOCK",
    "VIRTIO_MMIO_INT_CONFIG",
    "VIRTIO_MMIO_INT_VRING",
    "VIRTIO_RING_F_EVENT_IDX",
    "VIRTIO_RING_F_INDIRECT_DESC",
    "ActivateError",
    "InterruptKind",
    "RateLimiter",
    "TokenKind",
    "VirtioDevice",
    "VirtioDeviceError",
    "VirtioDeviceState",
    "VirtioDeviceStateInvalid",
    "VirtioInterrupt",
    "feature",
    "MAX_QUEUE_SIZE",
    "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_DESC_F_NEXT",
    "VIRTQ_DESC_F_WRITE",
    "Descriptor",
    "DescriptorChain",
    "DescriptorChainError",
    "Queue",
    "QueueError",
    "QueueState",
    "QueueStateInvalid",
    "MMIO_LEN",
    "MmioTransport",
    "MmioTransportState",
]

"""Virtio transports: how a driver reaches a device. Ember has virtio-mmio (virtio 1.1 §4.2)."""

from vmm.devices.virtio.transport.mmio import (
    CONFIG_SPACE,
    DEVICE_STATUS_ACKNOWLEDGE,
    DEVICE_STATUS_DRIVER,
    DEVICE_STATUS_DRIVER_OK,
    DEVICE_STATUS_FAILED,
    DEVICE_STATUS_FEATURES_OK,
    DEVICE_STATUS_NEEDS_RESET,
    MMIO_LEN,
    MMIO_MAGIC_VALUE,
    MMIO_VERSION,
    QUEUE_NOTIFY,
    VENDOR_ID,
    MmioTransport,
    MmioTransportError,
    MmioTransportState,
    MmioTransportStateInvalid,
)

__all__ = [
    "CONFIG_SPACE",
    "DEVICE_STATUS_ACKNOWLEDGE",
    "DEVICE_STATUS_DRIVER",
    "DEVICE_STATUS_DRIVER_OK",
    "DEVICE_STATUS_FAILED",
    "DEVICE_STATUS_FEATURES_OK",
    "DEVICE_STATUS_NEEDS_RESET",
    "MMIO_LEN",
    "MMIO_MAGIC_VALUE",
    "MMIO_VERSION",
    "QUEUE_NOTIFY",
    "VENDOR_ID",
    "MmioTransport",
    "MmioTransportError",
    "MmioTransportState",
    "MmioTransportStateInvalid",
]

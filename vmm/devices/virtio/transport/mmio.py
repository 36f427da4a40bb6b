"""The virtio-mmio transport, version 2 (virtio 1.1 §4.2).

Primer. A virtio-mmio device is a 4 KiB MMIO window: 32-bit little-endian
control registers below 0x100, the device's configuration space from 0x100
(§4.2.2). The driver brings the device up in the order of §3.1.1, writing the
cumulative status each time:

    Status = ACKNOWLEDGE                 "I found you"
    Status |= DRIVER                     "I can drive you"
    DeviceFeaturesSel/DeviceFeatures     read the offer, 32 bits per page
    DriverFeaturesSel/DriverFeatures     write the subset it accepts
    Status |= FEATURES_OK                re-read: the device may refuse
    per queue: QueueSel, QueueNumMax, QueueNum, QueueDesc/Driver/Device Low/High, QueueReady=1
    Status |= DRIVER_OK                  the device goes live

After that a write of a queue index to QueueNotify says "buffers are
available"; the device raises its interrupt with InterruptStatus bits that
the driver clears through InterruptACK. Writing 0 to Status resets.

The guest is hostile: an access that is not 32-bit and aligned (control
registers) or naturally aligned 1/2/4/8 bytes (config space) reads as zeros
and its writes are dropped; status writes out of the §3.1.1 order are
ignored; FEATURES_OK is refused unless the features are acceptable (e.g.
VIRTIO_F_VERSION_1 missing); queue registers are writable only between
FEATURES_OK and DRIVER_OK; a queue notify with a bad index is dropped; if a
ready queue is invalid at DRIVER_OK, or a queue is stopped later for a
hostile ring, the device gets DEVICE_NEEDS_RESET and a configuration-change
interrupt (§2.1.2). Everything rejected is counted (`rejected`) and logged
once per kind.

The transport knows devices only through `VirtioDevice`; it never imports
a concrete one. It runs every access under the device's lock.
"""

from __future__ import annotations

import collections
import struct
from dataclasses import dataclass, fields

import structlog

from vmm.devices.virtio.device import ActivateError, InterruptKind, VirtioDevice, VirtioInterrupt
from vmm.devices.virtio.queue import Queue
from vmm.memory import GuestMemory

__all__ = [
    "MMIO_LEN",
    "MMIO_MAGIC_VALUE",
    "MMIO_VERSION",
    "VENDOR_ID",
    "MAGIC_VALUE",
    "VERSION",
    "DEVICE_ID",
    "VENDOR_ID_REG",
    "DEVICE_FEATURES",
    "DEVICE_FEATURES_SEL",
    "DRIVER_FEATURES",
    "DRIVER_FEATURES_SEL",
    "QUEUE_SEL",
    "QUEUE_NUM_MAX",
    "QUEUE_NUM",
    "QUEUE_READY",
    "QUEUE_NOTIFY",
    "INTERRUPT_STATUS",
    "INTERRUPT_ACK",
    "STATUS",
    "QUEUE_DESC_LOW",
    "QUEUE_DESC_HIGH",
    "QUEUE_DRIVER_LOW",
    "QUEUE_DRIVER_HIGH",
    "QUEUE_DEVICE_LOW",
    "QUEUE_DEVICE_HIGH",
    "CONFIG_GENERATION",
    "CONFIG_SPACE",
    "DEVICE_STATUS_ACKNOWLEDGE",
    "DEVICE_STATUS_DRIVER",
    "DEVICE_STATUS_DRIVER_OK",
    "DEVICE_STATUS_FEATURES_OK",
    "DEVICE_STATUS_NEEDS_RESET",
    "DEVICE_STATUS_FAILED",
    "MmioTransportError",
    "MmioTransportStateInvalid",
    "MmioTransportState",
    "MmioTransport",
]

log = structlog.get_logger("vmm.devices.virtio.transport.mmio")

# The size of one device's MMIO window (Linux's `virtio_mmio.device=4K@...`).
MMIO_LEN = 0x1000

# virtio 1.1 §4.2.2 "MMIO Device Register Layout".
MAGIC_VALUE = 0x000
VERSION = 0x004
DEVICE_ID = 0x008
VENDOR_ID_REG = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
QUEUE_READY = 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW = 0x080
QUEUE_DESC_HIGH = 0x084
QUEUE_DRIVER_LOW = 0x090
QUEUE_DRIVER_HIGH = 0x094
QUEUE_DEVICE_LOW = 0x0A0
QUEUE_DEVICE_HIGH = 0x0A4
CONFIG_GENERATION = 0x0FC
CONFIG_SPACE = 0x100

# virtio 1.1 §4.2.2: MagicValue is "virt" in little-endian; Version 2 is the non-legacy layout.
MMIO_MAGIC_VALUE = 0x74726976
MMIO_VERSION = 2
# "EMBR" in little-endian; the spec leaves the vendor ID to the implementation.
VENDOR_ID = int.from_bytes(b"EMBR", "little")

# virtio 1.1 §2.1 "Device Status Field".
DEVICE_STATUS_ACKNOWLEDGE = 1
DEVICE_STATUS_DRIVER = 2
DEVICE_STATUS_DRIVER_OK = 4
DEVICE_STATUS_FEATURES_OK = 8
DEVICE_STATUS_NEEDS_RESET = 64
DEVICE_STATUS_FAILED = 128

_S_ACK = DEVICE_STATUS_ACKNOWLEDGE
_S_DRV = _S_ACK | DEVICE_STATUS_DRIVER
_S_FOK = _S_DRV | DEVICE_STATUS_FEATURES_OK
_S_LIVE = _S_FOK | DEVICE_STATUS_DRIVER_OK
# §3.1.1: each step adds exactly the next bit.
_NEXT_STATUS = {0: _S_ACK, _S_ACK: _S_DRV, _S_DRV: _S_FOK, _S_FOK: _S_LIVE}
_STATUS_STEPS = (0, _S_ACK, _S_DRV, _S_FOK, _S_LIVE)

_U32 = struct.Struct("<I")
_U32_MASK = 0xFFFF_FFFF
_CONFIG_ACCESS_SIZES = (1, 2, 4, 8)
_INT_BITS = 0x3


class MmioTransportError(Exception):
    """The virtio-mmio transport could not be restored."""


class MmioTransportStateInvalid(MmioTransportError):
    """A saved virtio-mmio transport state is out of range or does not match its device."""


@dataclass(frozen=True)
class MmioTransportState:
    """The transport's registers (untrusted on restore). The device saves its own state."""

    status: int
    device_features_select: int
    driver_features_select: int
    driver_features: int
    queue_select: int
    interrupt_status: int


class MmioTransport:
    """A virtio device behind the virtio-mmio v2 register map; a bus device for its `MMIO_LEN` window.

    `interrupt` is the device's line: the VMM connects it to an irqfd
    (`transport.interrupt.connect(...)`) or passes one in. `notify(i)` is the
    QueueNotify path for an ioeventfd handler (`notify_addresses()` says
    where to register them).
    """

    def __init__(self, device: VirtioDevice, mem: GuestMemory, *, interrupt: VirtioInterrupt | None = None):
        self.device = device
        self.mem = mem
        self.interrupt = interrupt if interrupt is not None else VirtioInterrupt()
        self.lock = device.lock
        self.status = 0
        self.device_features_select = 0
        self.driver_features_select = 0
        self.driver_features = 0
        self.queue_select = 0
        # Rejected guest actions by kind ("unaligned_read", "status_order", ...).
        self.rejected: collections.Counter[str] = collections.Counter()

    # --- bus device ------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        with self.lock:
            if offset >= CONFIG_SPACE:
                if not self._config_access_ok(offset, size):
                    self._reject("bad_config_read", offset=offset, size=size)
                    return bytes(size)
                return self.device.read_config(offset - CONFIG_SPACE, size)
            if size != 4 or offset % 4:
                self._reject("bad_register_read", offset=offset, size=size)
                return bytes(size)
            return _U32.pack(self._read_register(offset))

    def write(self, offset: int, data: bytes) -> None:
        with self.lock:
            size = len(data)
            if offset >= CONFIG_SPACE:
                if not self._config_access_ok(offset, size):
                    self._reject("bad_config_write", offset=offset, size=size)
                elif not self.status & DEVICE_STATUS_DRIVER or self.status & (
                        DEVICE_STATUS_FAILED | DEVICE_STATUS_NEEDS_RESET):
                    self._reject("config_write_state", offset=offset, status=self.status)
                else:
                    self.device.write_config(offset - CONFIG_SPACE, bytes(data))
                return
            if size != 4 or offset % 4:
                self._reject("bad_register_write", offset=offset, size=size)
                return
            self._write_register(offset, _U32.unpack(data)[0])

    @staticmethod
    def _config_access_ok(offset: int, size: int) -> bool:
        return size in _CONFIG_ACCESS_SIZES and offset % size == 0 and offset + size <= MMIO_LEN

    # --- registers -----------------------------------------------------------------------------

    def _selected_queue(self) -> Queue | None:
        queues = self.device.queues
        return queues[self.queue_select] if self.queue_select < len(queues) else None

    def _read_register(self, offset: int) -> int:
        if offset == MAGIC_VALUE:
            return MMIO_MAGIC_VALUE
        if offset == VERSION:
            return MMIO_VERSION
        if offset == DEVICE_ID:
            return self.device.device_type
        if offset == VENDOR_ID_REG:
            return VENDOR_ID
        if offset == DEVICE_FEATURES:
            return self.device.avail_features_page(self.device_features_select)
        if offset == QUEUE_NUM_MAX:
            queue = self._selected_queue()
            return queue.max_size if queue is not None else 0
        if offset == QUEUE_READY:
            queue = self._selected_queue()
            return int(queue is not None and queue.ready)
        if offset == INTERRUPT_STATUS:
            return self.interrupt.status
        if offset == STATUS:
            return self.status
        if offset == CONFIG_GENERATION:
            return self.device.config_generation
        # Write-only and reserved registers read as zero.
        self._reject("unreadable_register", offset=offset)
        return 0

    def _write_register(self, offset: int, value: int) -> None:
        if offset == DEVICE_FEATURES_SEL:
            self.device_features_select = value
        elif offset == DRIVER_FEATURES:
            self._write_driver_features(value)
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_select = value
        elif offset == QUEUE_SEL:
            self.queue_select = value
        elif offset in _QUEUE_FIELDS:
            self._write_queue_field(offset, value)
        elif offset == QUEUE_NOTIFY:
            self._notify(value)
        elif offset == INTERRUPT_ACK:
            self.interrupt.ack(value)
        elif offset == STATUS:
            self._write_status(value)
        else:
            self._reject("unwritable_register", offset=offset)

    def _write_driver_features(self, value: int) -> None:
        if self.status & (DEVICE_STATUS_FEATURES_OK | DEVICE_STATUS_FAILED) or not self.status & DEVICE_STATUS_DRIVER:
            self._reject("features_state", status=self.status)
            return
        page = self.driver_features_select
        if page not in (0, 1):
            # No feature bits exist above 63: nothing to accept there.
            if value:
                self._reject("features_page", page=page, value=value)
            return
        shift = 32 * page
        self.driver_features = (self.driver_features & ~(_U32_MASK << shift)) | (value << shift)

    def _write_queue_field(self, offset: int, value: int) -> None:
        if (self.status & (DEVICE_STATUS_FEATURES_OK | DEVICE_STATUS_DRIVER_OK | DEVICE_STATUS_FAILED)
                != DEVICE_STATUS_FEATURES_OK):
            self._reject("queue_state", offset=offset, status=self.status)
            return
        queue = self._selected_queue()
        if queue is None:
            self._reject("queue_select", queue_select=self.queue_select)
            return
        if offset == QUEUE_NUM:
            queue.size = value
        elif offset == QUEUE_READY:
            queue.ready = value == 1
        else:
            attr, high = _QUEUE_FIELDS[offset]
            current = getattr(queue, attr)
            if high:
                setattr(queue, attr, (current & _U32_MASK) | (value << 32))
            else:
                setattr(queue, attr, (current & ~_U32_MASK) | value)

    # --- status (§2.1, §3.1) -------------------------------------------------------------

    def _write_status(self, value: int) -> None:
        if value == 0:
            self._reset()
            return
        if value & ~0xFF:
            self._reject("status_bits", value=value)
            return
        if value & DEVICE_STATUS_FAILED:
            # The driver gave up (§2.1): remember it; only a reset brings the device back.
            self.status |= DEVICE_STATUS_FAILED
            log.warning("virtio driver set FAILED", device_type=self.device.device_type, status=value)
            return
        sticky = self.status & DEVICE_STATUS_NEEDS_RESET
        current = self.status & ~DEVICE_STATUS_NEEDS_RESET
        requested = value & ~DEVICE_STATUS_NEEDS_RESET
        if requested == current:
            return
        if self.status & DEVICE_STATUS_FAILED or _NEXT_STATUS.get(current) != requested:
            self._reject("status_order", current=self.status, requested=value)
            return
        if requested == _S_FOK:
            if not self.device.features_acceptable(self.driver_features):
                self._reject("features_refused", features=self.driver_features,
                             offered=self.device.avail_features)
                return
            self.device.set_acked_features(self.driver_features)
        self.status = requested | sticky
        if requested == _S_LIVE:
            self._activate()

    def _activate(self) -> None:
        try:
            self.device.activate(self.mem, self.interrupt)
        except ActivateError as exc:
            log.error("virtio device activation failed; DEVICE_NEEDS_RESET", device_type=self.device.device_type,
                      error=str(exc))
            self._set_needs_reset()
            return
        # Buffers made available before DRIVER_OK (and EVENT_IDX's first avail_event) are handled now.
        self.device.kick()
        self._check_needs_reset()

    def _set_needs_reset(self) -> None:
        if self.status & DEVICE_STATUS_NEEDS_RESET:
            return
        self.status |= DEVICE_STATUS_NEEDS_RESET
        if self.status & DEVICE_STATUS_DRIVER_OK:
            # §2.1.2: with DRIVER_OK set, the device MUST send a configuration change notification.
            self.interrupt.trigger(InterruptKind.CONFIG)

    def _check_needs_reset(self) -> None:
        if self.device.needs_reset:
            self._set_needs_reset()

    def _reset(self) -> None:
        """Status 0: the device and every queue back to their initial state (§2.1.1, §4.2.3.1)."""
        self.device.reset()
        self.status = 0
        self.device_features_select = 0
        self.driver_features_select = 0
        self.driver_features = 0
        self.queue_select = 0
        self.interrupt.clear()

    # --- notifications -----------------------------------------------------------------------

    def _notify(self, index: int) -> None:
        if index >= len(self.device.queues):
            self._reject("notify_index", index=index)
            return
        if not self.device.is_activated or not self.device.queues[index].ready:
            self._reject("notify_inactive", index=index)
            return
        self.device.process_queue(index)
        self._check_needs_reset()

    def notify(self, queue_index: int) -> None:
        """QueueNotify from outside a vCPU exit (an ioeventfd fired for `queue_index`)."""
        with self.lock:
            self._notify(queue_index)

    def notify_addresses(self) -> list[tuple[int, int]]:
        """`(offset, queue_index)` per queue: register an ioeventfd at base+offset, 4 bytes, datamatch=index."""
        return [(QUEUE_NOTIFY, i) for i in range(len(self.device.queues))]

    def _reject(self, kind: str, **details: int) -> None:
        self.rejected[kind] += 1
        if self.rejected[kind] == 1:
            log.warning("virtio-mmio access rejected; further ones of this kind are counted",
                        kind=kind, device_type=self.device.device_type,
                        **{k: hex(v) if isinstance(v, int) else v for k, v in details.items()})

    # --- persistence ---------------------------------------------------------------------------

    def state(self) -> MmioTransportState:
        with self.lock:
            return MmioTransportState(
                status=self.status, device_features_select=self.device_features_select,
                driver_features_select=self.driver_features_select, driver_features=self.driver_features,
                queue_select=self.queue_select, interrupt_status=self.interrupt.status,
            )

    @classmethod
    def from_state(cls, state: MmioTransportState, device: VirtioDevice, mem: GuestMemory, *,
                   interrupt: VirtioInterrupt) -> MmioTransport:
        """Rebuild around an already restored `device` (which got the same `interrupt`).

        `MmioTransportStateInvalid` if the registers are out of range or do
        not match the device (activated iff DRIVER_OK, acked features). A
        pending interrupt status pulses the line once.
        """
        _validate_state(state)
        base = state.status & ~(DEVICE_STATUS_NEEDS_RESET | DEVICE_STATUS_FAILED)
        if device.is_activated and base != _S_LIVE:
            raise MmioTransportStateInvalid(f"device is activated but status is {state.status:#x}")
        if base == _S_LIVE and not device.is_activated and not state.status & DEVICE_STATUS_NEEDS_RESET:
            raise MmioTransportStateInvalid("status has DRIVER_OK but the device is not activated")
        if base & DEVICE_STATUS_FEATURES_OK and device.acked_features != state.driver_features:
            raise MmioTransportStateInvalid(
                f"driver features {state.driver_features:#x} differ from the device's acked "
                f"{device.acked_features:#x}")
        if device.is_activated and device.interrupt is not interrupt:
            raise MmioTransportStateInvalid("the device was restored with a different interrupt")
        transport = cls(device, mem, interrupt=interrupt)
        transport.status = state.status
        transport.device_features_select = state.device_features_select
        transport.driver_features_select = state.driver_features_select
        transport.driver_features = state.driver_features
        transport.queue_select = state.queue_select
        interrupt.restore_status(state.interrupt_status)
        return transport

    def __repr__(self) -> str:
        return (f"<MmioTransport {type(self.device).__name__} status={self.status:#x} "
                f"int={self.interrupt.status:#x} rejected={sum(self.rejected.values())}>")


# Queue address registers: attribute of `Queue` and whether the register is the high word.
_QUEUE_FIELDS: dict[int, tuple[str, bool]] = {
    QUEUE_NUM: ("size", False),
    QUEUE_READY: ("ready", False),
    QUEUE_DESC_LOW: ("desc_table", False),
    QUEUE_DESC_HIGH: ("desc_table", True),
    QUEUE_DRIVER_LOW: ("avail_ring", False),
    QUEUE_DRIVER_HIGH: ("avail_ring", True),
    QUEUE_DEVICE_LOW: ("used_ring", False),
    QUEUE_DEVICE_HIGH: ("used_ring", True),
}


def _validate_state(state: MmioTransportState) -> None:
    if not isinstance(state, MmioTransportState):
        raise MmioTransportStateInvalid(f"expected MmioTransportState, got {type(state).__name__}")
    for f in fields(MmioTransportState):
        value = getattr(state, f.name)
        limit = (1 << 64) if f.name == "driver_features" else (1 << 32)
        if type(value) is not int or not 0 <= value < limit:
            raise MmioTransportStateInvalid(f"{f.name} out of range: {value!r}")
    base = state.status & ~(DEVICE_STATUS_NEEDS_RESET | DEVICE_STATUS_FAILED)
    if base not in _STATUS_STEPS or state.status & ~0xFF:
        raise MmioTransportStateInvalid(f"status {state.status:#x} is not reachable")
    if state.interrupt_status & ~_INT_BITS:
        raise MmioTransportStateInvalid(f"interrupt_status {state.interrupt_status:#x} has unknown bits")

"""What every virtio device is, whatever its transport (virtio 1.1 §2).

A device offers feature bits, a set of virtqueues and a device-specific
configuration space, and does its work when the driver notifies a queue.
The transport (`transport/mmio.py`) owns the register map and the status
negotiation and drives the device through this interface:

    features_acceptable(f) / set_acked_features(f)   at FEATURES_OK (§2.2, §3.1.1)
    read_config / write_config                       config space accesses (§2.4)
    activate(mem, interrupt)                         at DRIVER_OK
    process_queue(i)                                 on a queue notification
    reset()                                          the driver wrote 0 to Status

Threading: `lock` (re-entrant) serialises everything that touches the device
and its queues. The transport takes it around every register access and
notification; host-side entry points of a device (rate-limiter wake-ups,
backing-file swaps, `kick`) take it themselves. A device never raises for
anything the guest did: malformed chains become error completions.
"""

from __future__ import annotations

import abc
import enum
import threading
from dataclasses import dataclass, fields
from typing import Callable, ClassVar, Literal, Protocol, Sequence

import structlog

from vmm.devices.virtio.queue import Queue, QueueError, QueueState
from vmm.memory import GuestMemory

__all__ = [
    "VIRTIO_ID_NET",
    "VIRTIO_ID_BLOCK",
    "VIRTIO_ID_RNG",
    "VIRTIO_ID_BALLOON",
    "VIRTIO_ID_VSOCK",
    "VIRTIO_RING_F_INDIRECT_DESC",
    "VIRTIO_RING_F_EVENT_IDX",
    "VIRTIO_F_VERSION_1",
    "VIRTIO_MMIO_INT_VRING",
    "VIRTIO_MMIO_INT_CONFIG",
    "InterruptKind",
    "VirtioInterrupt",
    "RateLimiter",
    "TokenKind",
    "VirtioDeviceError",
    "ActivateError",
    "VirtioDeviceStateInvalid",
    "VirtioDeviceState",
    "VirtioDevice",
    "feature",
]

log = structlog.get_logger("vmm.devices.virtio.device")

# virtio 1.1 §5 "Device Types": device IDs.
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_RNG = 4
VIRTIO_ID_BALLOON = 5
VIRTIO_ID_VSOCK = 19

# virtio 1.1 §6 "Reserved Feature Bits" (bit numbers).
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32

# virtio 1.1 §4.2.2 "MMIO Device Register Layout", InterruptStatus bits.
VIRTIO_MMIO_INT_VRING = 0x1
VIRTIO_MMIO_INT_CONFIG = 0x2

_U32_MASK = 0xFFFF_FFFF
_U64_MASK = (1 << 64) - 1


def feature(bit: int) -> int:
    """The mask of feature bit number `bit`."""
    return 1 << bit


class InterruptKind(enum.IntEnum):
    """Why the device interrupts: its value is the InterruptStatus bit (§4.2.2)."""

    VRING = VIRTIO_MMIO_INT_VRING  # used buffers were added to a queue
    CONFIG = VIRTIO_MMIO_INT_CONFIG  # the configuration space changed


class VirtioInterrupt:
    """The device's interrupt line: status bits plus an injected edge trigger.

    `trigger(kind)` sets the kind's InterruptStatus bit and calls the edge
    trigger (the VMM wires it to an irqfd write; `connect` may come after
    construction). The driver reads the bits and clears them through
    InterruptACK. A trigger that fails with OSError is counted and logged
    once: the status bit stays set, so the driver sees it on its next
    interrupt. Thread-safe.
    """

    def __init__(self, trigger: Callable[[], None] | None = None):
        self._trigger = trigger
        self._status = 0
        self._lock = threading.Lock()
        self.triggered = 0  # edges delivered
        self.failed = 0  # edges the trigger could not deliver

    def connect(self, trigger: Callable[[], None]) -> None:
        """Wire the edge trigger (e.g. `lambda: os.eventfd_write(irqfd, 1)`)."""
        self._trigger = trigger

    @property
    def status(self) -> int:
        """The InterruptStatus register (VIRTIO_MMIO_INT_* bits)."""
        with self._lock:
            return self._status

    def trigger(self, kind: InterruptKind) -> None:
        with self._lock:
            self._status |= int(kind)
        self._edge()

    def _edge(self) -> None:
        if self._trigger is None:
            return
        try:
            self._trigger()
        except OSError as exc:
            self.failed += 1
            if self.failed == 1:
                log.error("virtio interrupt trigger failed; further failures are counted", exc_info=exc)
            return
        self.triggered += 1

    def ack(self, bits: int) -> None:
        """InterruptACK: clear `bits` of the status."""
        with self._lock:
            self._status &= ~bits & (VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG)

    def clear(self) -> None:
        with self._lock:
            self._status = 0

    def restore_status(self, bits: int) -> None:
        """Set the status from a snapshot; pulses the line if anything is pending (an edge may have been lost)."""
        with self._lock:
            self._status = bits & (VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG)
            pending = self._status != 0
        if pending:
            self._edge()

    def __repr__(self) -> str:
        return f"<VirtioInterrupt status={self.status:#x} triggered={self.triggered} failed={self.failed}>"


TokenKind = Literal["bytes", "ops"]


class RateLimiter(Protocol):
    """What a device needs of a rate limiter (two token buckets: "bytes" and "ops").

    `consume` takes `tokens` from the bucket of `kind` and returns False if
    it cannot (the device stops and waits for `on_rate_limiter_ready()`).
    A limiter may also offer `manual_replenish(tokens, kind)`: a device that
    got the "ops" token but not the "bytes" gives the op back through it.
    """

    def consume(self, tokens: int, kind: TokenKind) -> bool: ...


class VirtioDeviceError(Exception):
    """A virtio device could not be activated or restored."""


class ActivateError(VirtioDeviceError):
    """The device cannot be activated with the queues the driver set up."""


class VirtioDeviceStateInvalid(VirtioDeviceError):
    """A saved virtio device state does not fit this device or is out of range."""


@dataclass(frozen=True)
class VirtioDeviceState:
    """The transport-independent part of a device's state (untrusted on restore)."""

    device_type: int
    avail_features: int
    acked_features: int
    queues: tuple[QueueState, ...]
    activated: bool
    config_generation: int = 0


class VirtioDevice(abc.ABC):
    """Base of every virtio device: features, queues, config space, activation, reset.

    A subclass sets `device_type`, passes its queue sizes and offered
    features, and implements `config_bytes()` and `process_queue(i)`; it may
    extend `features_acceptable`, `write_config`, `_on_activate` and
    `_on_reset`.
    """

    device_type: ClassVar[int]

    def __init__(self, *, queue_sizes: Sequence[int], avail_features: int):
        if not queue_sizes:
            raise ValueError("a virtio device has at least one queue")
        if not avail_features & feature(VIRTIO_F_VERSION_1) or avail_features & ~_U64_MASK:
            raise ValueError("a virtio 1.x device offers VIRTIO_F_VERSION_1 and only 64 feature bits")
        self.avail_features = avail_features
        self.acked_features = 0
        self.queues = [Queue(size) for size in queue_sizes]
        self.mem: GuestMemory | None = None
        self.interrupt: VirtioInterrupt | None = None
        self.config_generation = 0
        self.config_writes_ignored = 0
        self.lock = threading.RLock()

    # --- features (§2.2) --------------------------------------------------------------------

    @property
    def is_activated(self) -> bool:
        return self.mem is not None

    def has_feature(self, bit: int) -> bool:
        """Whether feature `bit` was negotiated."""
        return bool(self.acked_features & feature(bit))

    def avail_features_page(self, page: int) -> int:
        """DeviceFeatures for DeviceFeaturesSel `page`: bits 32*page .. 32*page+31."""
        if page not in (0, 1):
            return 0
        return (self.avail_features >> (32 * page)) & _U32_MASK

    def features_acceptable(self, features: int) -> bool:
        """Whether the driver's feature set can be accepted at FEATURES_OK (§3.1.1 step 5).

        The base rule: only offered bits, and VIRTIO_F_VERSION_1 (no legacy
        drivers, §6). A device may add its own dependencies.
        """
        return features & ~self.avail_features == 0 and bool(features & feature(VIRTIO_F_VERSION_1))

    def set_acked_features(self, features: int) -> None:
        """Record the negotiated features (the transport calls this once it accepted them)."""
        self.acked_features = features & self.avail_features

    # --- configuration space (§2.4) ----------------------------------------------------

    @abc.abstractmethod
    def config_bytes(self) -> bytes:
        """The device-specific configuration space as the guest reads it."""

    def read_config(self, offset: int, n: int) -> bytes:
        """`n` bytes at `offset`; bytes past the end of the config space read as zero."""
        config = self.config_bytes()
        chunk = config[offset:offset + n] if 0 <= offset < len(config) else b""
        return chunk + bytes(n - len(chunk))

    def write_config(self, offset: int, data: bytes) -> None:
        """A driver write to the config space; read-only by default (ignored, counted, logged once)."""
        self.config_writes_ignored += 1
        if self.config_writes_ignored == 1:
            log.warning("write to a read-only virtio config space ignored; further ones are counted",
                        device_type=self.device_type, offset=offset, size=len(data))

    def config_changed(self) -> None:
        """The config space changed: new generation (§2.4.1) and a CONFIG interrupt if activated."""
        self.config_generation = (self.config_generation + 1) & _U32_MASK
        if self.interrupt is not None and self.is_activated:
            self.interrupt.trigger(InterruptKind.CONFIG)

    # --- lifecycle ------------------------------------------------------------------------

    def activate(self, mem: GuestMemory, interrupt: VirtioInterrupt) -> None:
        """Start the device (DRIVER_OK): every ready queue must be valid in `mem`, else `ActivateError`."""
        with self.lock:
            if self.is_activated:
                raise ActivateError("the device is already activated")
            for i, queue in enumerate(self.queues):
                if queue.ready and not queue.is_valid(mem):
                    raise ActivateError(f"queue {i} is not valid: {queue!r}")
            for queue in self.queues:
                queue.event_idx = self.has_feature(VIRTIO_RING_F_EVENT_IDX)
                queue.indirect = self.has_feature(VIRTIO_RING_F_INDIRECT_DESC)
            self.mem, self.interrupt = mem, interrupt
            try:
                self._on_activate()
            except ActivateError:
                self.mem = self.interrupt = None
                raise

    def _on_activate(self) -> None:
        """Device-specific activation; may raise `ActivateError`."""

    def reset(self) -> None:
        """Back to the initial state (§2.1.1: the driver wrote 0 to Status)."""
        with self.lock:
            self._on_reset()
            self.mem = self.interrupt = None
            self.acked_features = 0
            for queue in self.queues:
                queue.reset()

    def _on_reset(self) -> None:
        """Device-specific reset (drop in-flight work, wake-ups...)."""

    @property
    def needs_reset(self) -> bool:
        """True once a queue was stopped for a hostile driver (the transport sets DEVICE_NEEDS_RESET)."""
        return any(queue.broken for queue in self.queues)

    @abc.abstractmethod
    def process_queue(self, index: int) -> None:
        """The driver notified queue `index` (already bounds-checked). Must not raise for guest input."""

    def kick(self) -> None:
        """Process every ready queue (after a restore, or to pick up buffers added before activation)."""
        with self.lock:
            if not self.is_activated:
                return
            for i, queue in enumerate(self.queues):
                if queue.ready:
                    self.process_queue(i)

    def signal_used(self, queue: Queue) -> None:
        """Interrupt the driver for a batch of used entries, if it wants one (EVENT_IDX aware)."""
        if self.mem is None or self.interrupt is None:
            return
        try:
            wanted = queue.needs_notification(self.mem)
        except QueueError:
            wanted = True
        if wanted:
            self.interrupt.trigger(InterruptKind.VRING)

    # --- persistence ---------------------------------------------------------------------

    def virtio_state(self) -> VirtioDeviceState:
        return VirtioDeviceState(
            device_type=self.device_type, avail_features=self.avail_features,
            acked_features=self.acked_features, queues=tuple(q.state() for q in self.queues),
            activated=self.is_activated, config_generation=self.config_generation,
        )

    def restore_virtio_state(self, state: VirtioDeviceState, mem: GuestMemory, interrupt: VirtioInterrupt) -> None:
        """Load untrusted `state` into this fresh device, re-activating it if it was active.

        `VirtioDeviceStateInvalid` if the state was not saved from a device
        configured like this one, or its queues do not fit `mem`.
        """
        self._validate_virtio_state(state)
        with self.lock:
            try:
                queues = [Queue.from_state(qs) for qs in state.queues]
            except QueueError as exc:
                raise VirtioDeviceStateInvalid(f"bad queue state: {exc}") from exc
            self.queues = queues
            self.acked_features = state.acked_features
            self.config_generation = state.config_generation
            if state.activated:
                try:
                    self.activate(mem, interrupt)
                except ActivateError as exc:
                    raise VirtioDeviceStateInvalid(f"saved queues do not fit guest memory: {exc}") from exc

    def _validate_virtio_state(self, state: VirtioDeviceState) -> None:
        if not isinstance(state, VirtioDeviceState):
            raise VirtioDeviceStateInvalid(f"expected VirtioDeviceState, got {type(state).__name__}")
        for f in fields(VirtioDeviceState):
            value = getattr(state, f.name)
            if f.name == "activated":
                if not isinstance(value, bool):
                    raise VirtioDeviceStateInvalid("activated must be a bool")
            elif f.name == "queues":
                if not isinstance(value, tuple) or not all(isinstance(q, QueueState) for q in value):
                    raise VirtioDeviceStateInvalid("queues must be a tuple of QueueState")
            elif type(value) is not int or value < 0:
                raise VirtioDeviceStateInvalid(f"{f.name} must be a non-negative int, got {value!r}")
        if state.device_type != self.device_type:
            raise VirtioDeviceStateInvalid(f"state is for device type {state.device_type}, not {self.device_type}")
        if state.avail_features != self.avail_features:
            raise VirtioDeviceStateInvalid(
                f"saved features {state.avail_features:#x} differ from this device's {self.avail_features:#x}")
        if state.acked_features & ~state.avail_features:
            raise VirtioDeviceStateInvalid("acked features include bits the device did not offer")
        if state.activated and not self.features_acceptable(state.acked_features):
            raise VirtioDeviceStateInvalid(f"acked features {state.acked_features:#x} are not acceptable")
        if len(state.queues) != len(self.queues):
            raise VirtioDeviceStateInvalid(f"state has {len(state.queues)} queues, the device {len(self.queues)}")
        for i, (qs, q) in enumerate(zip(state.queues, self.queues)):
            if qs.max_size != q.max_size:
                raise VirtioDeviceStateInvalid(f"queue {i} max size {qs.max_size} != {q.max_size}")
        if state.config_generation > _U32_MASK:
            raise VirtioDeviceStateInvalid("config_generation does not fit 32 bits")

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} type={self.device_type} queues={len(self.queues)} "
                f"acked={self.acked_features:#x} {'active' if self.is_activated else 'inactive'}>")

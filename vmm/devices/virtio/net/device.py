"""The virtio network device (virtio 1.1 §5.1): a receive and a transmit queue over a host TAP.

Queues (§5.1.2): 0 is receiveq1 (RX, device -> driver), 1 is transmitq1
(TX). Every packet on either carries the 12-byte virtio-net header
(`header.py`) before its Ethernet frame.

Offered features (§5.1.3, §6), as Firecracker: VERSION_1, EVENT_IDX,
INDIRECT_DESC, MRG_RXBUF, STATUS, checksum and segmentation offloads both
ways (CSUM, GUEST_CSUM, HOST_TSO4/TSO6/UFO, GUEST_TSO4/TSO6/UFO), MAC when
a guest MAC is configured and MTU when an MTU is. FEATURES_OK is refused
for a set that breaks §5.1.3.1's dependencies (e.g. TSO without CSUM). At
activation the TAP is told which offloads the guest takes (TUNSETOFFLOAD).

Config space (§5.1.4): mac[6], le16 status (VIRTIO_NET_S_LINK_UP),
le16 max_virtqueue_pairs (0: no MQ), le16 mtu. Read-only: driver writes are
ignored and counted (cfg_fails).

TX (`process_queue(1)`): pop chains until the ring is empty; each chain is
walked and validated, must be device-readable only, between the two
headers' 26 bytes and MAX_BUFFER_SIZE (65562) bytes long, and have a header
asking only for negotiated offloads. The bytes are copied out of guest
memory once (so the guest cannot change a frame between the checks and the
send), offered to the MMDS stack if one is attached, else written to the
TAP. A chain that fails a check is dropped and counted; every chain goes
back to the driver with used length 0. The TX rate limiter is asked for one
op and the chain's bytes before the frame is sent; when it refuses, the
chain goes back to the ring and TX waits for `on_tx_rate_limiter_event()`.

RX: a frame comes from the MMDS stack (first) or the TAP (a bounded read
of one frame) and becomes the *pending* frame. It is written into the next
RX chain (device-writable descriptors only; without MRG_RXBUF one chain of
at least 1526 bytes, §5.1.6.3.1, or 65562 with guest TSO/UFO; with
MRG_RXBUF as many chains as it takes, `num_buffers` telling the driver how
many). While a frame is pending (no buffer yet, or the RX rate limiter
refused it) nothing more is read: the device asks the event loop to stop
polling the TAP and resumes when the driver adds buffers
(`process_queue(0)`) or the limiter's timer fires
(`on_rx_rate_limiter_event()`). A frame that cannot fit what the driver
can ever offer, or whose header asks for an offload the guest lacks, is
dropped and counted.

Wiring (the event loop knows nothing else): `fds()` lists the host fds to
watch and their handlers; `connect_poller(set_enabled)` gives the device
the loop's `set_enabled(fd, bool)` so it can pause and resume polling the
TAP (the loop is level-triggered: a readable TAP the device cannot drain
would otherwise spin).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Callable, Protocol

import structlog

from vmm.config.net import MTU_MAX, MTU_MIN, MacAddr, NetworkInterfaceConfig
from vmm.config.rate_limiter import RateLimiterConfig
from vmm.devices.virtio.device import (
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_NET,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    ActivateError,
    VirtioDevice,
    VirtioDeviceError,
    VirtioInterrupt,
    feature,
)
from vmm.devices.virtio.net.header import (
    ETH_HLEN,
    MAX_BUFFER_SIZE,
    MAX_FRAME_LEN,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP,
    VNET_HDR_LEN,
    HeaderError,
    OffloadPolicy,
    check_rx_header,
    check_tx_header,
    finish_checksum,
    set_num_buffers,
)
from vmm.devices.virtio.net.persist import NetState, NetStateInvalid, validate_net_state
from vmm.devices.virtio.net.tap import (
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_UFO,
    Tap,
    TapBackend,
    TapError,
)
from vmm.devices.virtio.queue import Descriptor, DescriptorChain, DescriptorChainError, Queue, QueueError
from vmm.memory import GuestMemory, GuestMemoryError
from vmm.rate_limiter import RateLimiter, RateLimiterError, RateLimiterState, TokenType

__all__ = [
    "VIRTIO_NET_F_CSUM",
    "VIRTIO_NET_F_GUEST_CSUM",
    "VIRTIO_NET_F_MTU",
    "VIRTIO_NET_F_MAC",
    "VIRTIO_NET_F_GUEST_TSO4",
    "VIRTIO_NET_F_GUEST_TSO6",
    "VIRTIO_NET_F_GUEST_ECN",
    "VIRTIO_NET_F_GUEST_UFO",
    "VIRTIO_NET_F_HOST_TSO4",
    "VIRTIO_NET_F_HOST_TSO6",
    "VIRTIO_NET_F_HOST_ECN",
    "VIRTIO_NET_F_HOST_UFO",
    "VIRTIO_NET_F_MRG_RXBUF",
    "VIRTIO_NET_F_STATUS",
    "VIRTIO_NET_S_LINK_UP",
    "RX_INDEX",
    "TX_INDEX",
    "NET_QUEUE_SIZE",
    "MIN_RX_BUFFER_SIZE",
    "CONFIG_SPACE_SIZE",
    "NetError",
    "MmdsStack",
    "NetEventSource",
    "NetMetrics",
    "Net",
    "tap_offload_flags",
]

log = structlog.get_logger("vmm.devices.virtio.net")

# virtio 1.1 §5.1.3 "Feature bits".
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_GUEST_UFO = 10
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_HOST_UFO = 14
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16

# virtio 1.1 §5.1.4: status bits.
VIRTIO_NET_S_LINK_UP = 1

# virtio 1.1 §5.1.2: receiveq1, transmitq1.
RX_INDEX = 0
TX_INDEX = 1
# Firecracker devices/virtio/net/mod.rs NET_QUEUE_MAX_SIZE.
NET_QUEUE_SIZE = 256

# virtio 1.1 §5.1.6.3.1: without MRG_RXBUF or guest TSO/UFO every receive buffer holds
# at least 1526 bytes (header + 1514-byte frame); with TSO/UFO, a 64 KiB super-packet.
MIN_RX_BUFFER_SIZE = 1526

# virtio 1.1 §5.1.4: u8 mac[6]; le16 status; le16 max_virtqueue_pairs; le16 mtu.
_CONFIG = struct.Struct("<6sHHH")
CONFIG_SPACE_SIZE = _CONFIG.size

# virtio 1.1 §5.1.3.1 "Feature bit requirements": feature -> features it needs (any of).
_FEATURE_NEEDS: dict[int, tuple[int, ...]] = {
    VIRTIO_NET_F_GUEST_TSO4: (VIRTIO_NET_F_GUEST_CSUM,),
    VIRTIO_NET_F_GUEST_TSO6: (VIRTIO_NET_F_GUEST_CSUM,),
    VIRTIO_NET_F_GUEST_UFO: (VIRTIO_NET_F_GUEST_CSUM,),
    VIRTIO_NET_F_GUEST_ECN: (VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6),
    VIRTIO_NET_F_HOST_TSO4: (VIRTIO_NET_F_CSUM,),
    VIRTIO_NET_F_HOST_TSO6: (VIRTIO_NET_F_CSUM,),
    VIRTIO_NET_F_HOST_UFO: (VIRTIO_NET_F_CSUM,),
    VIRTIO_NET_F_HOST_ECN: (VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6),
}

_OFFLOAD_FEATURES = (VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
                     VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO)


class NetError(VirtioDeviceError):
    """The virtio-net device could not be built, updated or restored."""


class MmdsStack(Protocol):
    """The MMDS network stack as the device sees it (an Ethernet peer inside the VMM).

    `detour_frame(frame)` gets every Ethernet frame the guest transmits
    (vnet header stripped, a partial checksum already completed) and
    returns True if it was for the MMDS and consumed (it then never reaches
    the TAP). `write_next_frame(max_len)` returns the next frame the stack
    wants delivered to the guest (at most `max_len` bytes, no vnet header),
    or None. Neither may raise for guest input; both run under the device
    lock, on whichever thread runs the device.
    """

    def detour_frame(self, frame: bytes) -> bool: ...

    def write_next_frame(self, max_len: int) -> bytes | None: ...


@dataclass(frozen=True)
class NetEventSource:
    """A host fd the VMM event loop watches for input, and what to call when it is readable."""

    name: str  # "tap", "rx_rate_limiter" or "tx_rate_limiter"
    fd: int
    on_readable: Callable[[], None]


@dataclass
class NetMetrics:
    """Counters for the metrics endpoint: Firecracker's `net` metrics by name, plus Ember's own.

    Ember's: `rx_dropped` (frames read from the TAP or the MMDS that the
    guest could not be given), `tx_dropped` (chains dropped, whatever the
    reason), and the MMDS frame counts (Firecracker keeps them in its `mmds`
    section: rx_accepted, tx_frames, tx_bytes).
    """

    activate_fails: int = 0
    cfg_fails: int = 0
    no_rx_avail_buffer: int = 0
    no_tx_avail_buffer: int = 0
    event_fails: int = 0
    rx_queue_event_count: int = 0
    rx_event_rate_limiter_count: int = 0
    rx_rate_limiter_throttled: int = 0
    rx_tap_event_count: int = 0
    rx_bytes_count: int = 0
    rx_packets_count: int = 0
    rx_fails: int = 0  # RX chains the guest got wrong (completed with length 0)
    rx_count: int = 0
    tap_read_fails: int = 0
    tap_write_fails: int = 0
    tx_bytes_count: int = 0
    tx_malformed_frames: int = 0  # well-formed chains holding a bad packet (size, header)
    tx_fails: int = 0  # TX chains the guest got wrong (descriptors)
    tx_count: int = 0
    tx_packets_count: int = 0
    tx_queue_event_count: int = 0
    tx_rate_limiter_event_count: int = 0
    tx_rate_limiter_throttled: int = 0
    tx_spoofed_mac_count: int = 0
    tx_remaining_reqs_count: int = 0
    rx_dropped: int = 0
    tx_dropped: int = 0
    mmds_rx_accepted: int = 0
    mmds_tx_frames: int = 0
    mmds_tx_bytes: int = 0


class _Rx(enum.Enum):
    """What became of the pending RX frame."""

    DELIVERED = "delivered"
    DROPPED = "dropped"
    NO_BUFFER = "no buffer"
    THROTTLED = "throttled"


def tap_offload_flags(acked_features: int) -> int:
    """The TUN_F_* offloads to set on the TAP for a guest that negotiated `acked_features`."""
    mapping = ((VIRTIO_NET_F_GUEST_CSUM, TUN_F_CSUM), (VIRTIO_NET_F_GUEST_TSO4, TUN_F_TSO4),
               (VIRTIO_NET_F_GUEST_TSO6, TUN_F_TSO6), (VIRTIO_NET_F_GUEST_UFO, TUN_F_UFO))
    return sum(flag for bit, flag in mapping if acked_features & feature(bit))


def _policy(acked: int, csum_bit: int, gso_bits: tuple[tuple[int, int], ...]) -> OffloadPolicy:
    return OffloadPolicy(csum=bool(acked & feature(csum_bit)),
                         gso_types=frozenset(gso for bit, gso in gso_bits if acked & feature(bit)))


class Net(VirtioDevice):
    """A virtio-net device over an opened TAP (`tap.Tap`, or any `TapBackend`).

    `rx_rate_limiter` / `tx_rate_limiter` default to limiters that limit
    nothing but own a timer fd, so a later `update_rate_limiters` (PATCH)
    can enable limiting without new fds for the event loop (as Firecracker).
    The device owns the TAP and the limiters: `close()` closes them.
    """

    device_type = VIRTIO_ID_NET

    def __init__(self, iface_id: str, tap: TapBackend, guest_mac: MacAddr | None = None,
                 rx_rate_limiter: RateLimiter | None = None, tx_rate_limiter: RateLimiter | None = None,
                 *, mtu: int | None = None, queue_size: int = NET_QUEUE_SIZE):
        if mtu is not None and not MTU_MIN <= mtu <= MTU_MAX:
            raise NetError(f"MTU {mtu} is out of range [{MTU_MIN}, {MTU_MAX}]")
        features = (feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_RING_F_EVENT_IDX)
                    | feature(VIRTIO_RING_F_INDIRECT_DESC) | feature(VIRTIO_NET_F_MRG_RXBUF)
                    | feature(VIRTIO_NET_F_STATUS))
        for bit in _OFFLOAD_FEATURES:
            features |= feature(bit)
        if guest_mac is not None:
            features |= feature(VIRTIO_NET_F_MAC)
        if mtu is not None:
            features |= feature(VIRTIO_NET_F_MTU)
        super().__init__(queue_sizes=[queue_size, queue_size], avail_features=features)
        self.iface_id = iface_id
        self.tap = tap
        self.guest_mac = guest_mac
        self.mtu = mtu
        self.rx_rate_limiter = rx_rate_limiter if rx_rate_limiter is not None else RateLimiter()
        self.tx_rate_limiter = tx_rate_limiter if tx_rate_limiter is not None else RateLimiter()
        self.metrics = NetMetrics()
        self.mmds: MmdsStack | None = None
        self._rx_buf = bytearray(MAX_BUFFER_SIZE)
        # One RX packet (vnet header included, num_buffers still to set) waiting for guest buffers or tokens.
        self._pending: bytes | None = None
        self._tap_failed = False  # the last TAP read failed hard: stop polling until a read succeeds
        self._poller: Callable[[int, bool], None] | None = None
        self._tap_polled: bool | None = None  # what the poller was last told
        self._tx_policy = OffloadPolicy()
        self._rx_policy = OffloadPolicy()
        self._min_rx_buffer = MIN_RX_BUFFER_SIZE
        self._logged: set[str] = set()

    @classmethod
    def from_config(cls, config: NetworkInterfaceConfig, *,
                    open_tap: Callable[[str], TapBackend] = Tap.open) -> Net:
        """Open `config.host_dev_name` and build the device with the configured limiters.

        `NetError` if the TAP cannot be opened (the message says why).
        """
        try:
            tap = open_tap(config.host_dev_name)
        except TapError as exc:
            raise NetError(str(exc)) from exc
        try:
            return cls(config.iface_id, tap, config.guest_mac, RateLimiter.from_config(config.rx_rate_limiter),
                       RateLimiter.from_config(config.tx_rate_limiter), mtu=config.mtu)
        except BaseException:
            tap.close()
            raise

    # --- features and config space ------------------------------------------------------------

    def features_acceptable(self, features: int) -> bool:
        """The base rules plus §5.1.3.1's dependencies between offload features."""
        if not super().features_acceptable(features):
            return False
        return all(any(features & feature(n) for n in needs)
                   for bit, needs in _FEATURE_NEEDS.items() if features & feature(bit))

    def config_bytes(self) -> bytes:
        mac = self.guest_mac.octets if self.guest_mac is not None else bytes(6)
        return _CONFIG.pack(mac, VIRTIO_NET_S_LINK_UP, 0, self.mtu or 0)

    def write_config(self, offset: int, data: bytes) -> None:
        """§5.1.4.2: the driver MUST NOT write the config space; ignored and counted."""
        self.metrics.cfg_fails += 1
        self._log_once("cfg", "virtio-net driver wrote the read-only config space; ignored",
                       offset=offset, size=len(data))

    @property
    def tap_name(self) -> str:
        return self.tap.name

    # --- event-loop wiring ----------------------------------------------------------------------

    def fds(self) -> list[NetEventSource]:
        """The host fds to watch for input and their handlers (the handlers never raise).

        Always the TAP; each rate limiter's timer fd when it has one (a
        limiter on a `ManualTimer` has none and is driven by calling
        `on_rx_rate_limiter_event` / `on_tx_rate_limiter_event` directly).
        """
        sources = [NetEventSource("tap", self.tap.fileno(), self.on_tap_readable)]
        for name, limiter, handler in (("rx_rate_limiter", self.rx_rate_limiter, self.on_rx_rate_limiter_event),
                                       ("tx_rate_limiter", self.tx_rate_limiter, self.on_tx_rate_limiter_event)):
            try:
                fd = limiter.fd
            except RateLimiterError:
                continue
            sources.append(NetEventSource(name, fd, handler))
        return sources

    def connect_poller(self, set_enabled: Callable[[int, bool], None]) -> None:
        """Let the device pause/resume the event loop's polling of the TAP fd.

        `set_enabled(fd, enabled)` (the VMM's `Vmm.set_source_enabled`) is
        called at once with the current wish and then whenever it changes.
        It must not call back into the device. Polling is wanted while the
        device is active, no RX frame is pending, and the TAP is healthy.
        """
        with self.lock:
            self._poller = set_enabled
            self._tap_polled = None
            self._sync_tap_polling()

    @property
    def wants_tap_polling(self) -> bool:
        return self.is_activated and self._pending is None and not self._tap_failed

    def _sync_tap_polling(self) -> None:
        want = self.wants_tap_polling
        if self._poller is not None and want != self._tap_polled:
            self._tap_polled = want
            self._poller(self.tap.fileno(), want)

    # --- host-side entry points ---------------------------------------------------------------

    def on_tap_readable(self) -> None:
        """The TAP fd is readable: move frames to the guest until it is drained or the guest is full."""
        with self.lock:
            self.metrics.rx_tap_event_count += 1
            if self.is_activated:
                self._process_rx()
            else:
                self._sync_tap_polling()

    def on_rx_rate_limiter_event(self) -> None:
        """The RX limiter's timer fired: unblock it and deliver what was held back."""
        with self.lock:
            self.metrics.rx_event_rate_limiter_count += 1
            if not self._limiter_event(self.rx_rate_limiter):
                return
            if self.is_activated:
                self._process_rx()

    def on_tx_rate_limiter_event(self) -> None:
        """The TX limiter's timer fired: unblock it and resume transmitting."""
        with self.lock:
            self.metrics.tx_rate_limiter_event_count += 1
            if not self._limiter_event(self.tx_rate_limiter):
                return
            if self.is_activated:
                self._process_tx()

    def _limiter_event(self, limiter: RateLimiter) -> bool:
        try:
            limiter.event_handler()
        except RateLimiterError as exc:
            self.metrics.event_fails += 1
            self._log_once("limiter", "spurious rate limiter event", error=str(exc))
            return False
        return True

    def set_mmds(self, stack: MmdsStack | None) -> None:
        """Attach (or detach, None) the MMDS network stack; frames it has queued go to the guest."""
        with self.lock:
            self.mmds = stack
            if stack is not None and self.is_activated:
                self._process_rx()

    def update_rate_limiters(self, rx: RateLimiterConfig | None = None, tx: RateLimiterConfig | None = None) -> None:
        """PATCH /network-interfaces: new buckets for either direction (None: unchanged).

        The limiters are updated in place, so their fds stay the same.
        """
        with self.lock:
            self.rx_rate_limiter.update_from_config(rx)
            self.tx_rate_limiter.update_from_config(tx)

    def close(self) -> None:
        """Close the TAP and the limiters' timers."""
        with self.lock:
            self.tap.close()
            self.rx_rate_limiter.close()
            self.tx_rate_limiter.close()

    # --- lifecycle --------------------------------------------------------------------------------

    def _on_activate(self) -> None:
        acked = self.acked_features
        try:
            self.tap.set_offload(tap_offload_flags(acked))
        except (TapError, OSError) as exc:
            self.metrics.activate_fails += 1
            raise ActivateError(f"cannot set the offloads of TAP {self.tap.name}: {exc}") from exc
        self._tx_policy = _policy(acked, VIRTIO_NET_F_CSUM, ((VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_HDR_GSO_TCPV4),
                                                             (VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_HDR_GSO_TCPV6),
                                                             (VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_HDR_GSO_UDP)))
        self._rx_policy = _policy(acked, VIRTIO_NET_F_GUEST_CSUM,
                                  ((VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_HDR_GSO_TCPV4),
                                   (VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_HDR_GSO_TCPV6),
                                   (VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_HDR_GSO_UDP)))
        if self.has_feature(VIRTIO_NET_F_MRG_RXBUF):
            self._min_rx_buffer = VNET_HDR_LEN
        elif self._rx_policy.gso_types:
            self._min_rx_buffer = MAX_BUFFER_SIZE
        else:
            self._min_rx_buffer = MIN_RX_BUFFER_SIZE
        self._sync_tap_polling()

    def _on_reset(self) -> None:
        self._pending = None
        self._tap_failed = False
        self._tx_policy = self._rx_policy = OffloadPolicy()

    def reset(self) -> None:
        with self.lock:
            super().reset()
            self._sync_tap_polling()

    # --- queues -----------------------------------------------------------------------------------

    def process_queue(self, index: int) -> None:
        with self.lock:
            if self.mem is None:
                return
            if index == RX_INDEX:
                self.metrics.rx_queue_event_count += 1
                self._process_rx()
            elif index == TX_INDEX:
                self.metrics.tx_queue_event_count += 1
                if self.tx_rate_limiter.is_blocked:
                    self.metrics.tx_rate_limiter_throttled += 1
                else:
                    self._process_tx()

    # --- TX ---------------------------------------------------------------------------------------

    def _process_tx(self) -> None:
        mem, queue = self.mem, self.queues[TX_INDEX]
        assert mem is not None
        used_any = popped_any = mmds_consumed = False
        while (chain := queue.pop(mem)) is not None:
            popped_any = True
            self.metrics.tx_remaining_reqs_count += queue.pending(mem)
            packet = self._gather_tx(mem, chain)
            if packet is not None:
                header, frame = packet
                if not self._consume(self.tx_rate_limiter, VNET_HDR_LEN + len(frame)):
                    queue.undo_pop()
                    self.metrics.tx_rate_limiter_throttled += 1
                    break
                mmds_consumed |= self._transmit(header, frame)
            self._complete(mem, queue, chain.head_index, 0)
            used_any = True
        if used_any:
            self.signal_used(queue)
        if not popped_any:
            self.metrics.no_tx_avail_buffer += 1
        if mmds_consumed:
            # The MMDS answers synchronously: its reply frames are ready now.
            self._process_rx()

    def _gather_tx(self, mem: GuestMemory, chain: DescriptorChain) -> tuple[bytes, memoryview] | None:
        """Copy a TX chain's packet out of guest memory: (header for the TAP, frame), or None if dropped."""
        try:
            descriptors = chain.descriptors()
        except DescriptorChainError as exc:
            return self._drop_tx("tx_fails", chain, exc)
        if any(d.is_write_only for d in descriptors):
            return self._drop_tx("tx_fails", chain, "a TX descriptor is device-writable")
        total = sum(d.length for d in descriptors)
        if total > MAX_BUFFER_SIZE:
            return self._drop_tx("tx_malformed_frames", chain, f"{total}-byte packet exceeds {MAX_BUFFER_SIZE}")
        try:
            packet = b"".join(mem.read(d.addr, d.length) for d in descriptors)
        except GuestMemoryError as exc:  # validated descriptors: only a shrinking memory map gets here
            return self._drop_tx("tx_fails", chain, exc)
        try:
            header = check_tx_header(packet, self._tx_policy)
        except HeaderError as exc:
            return self._drop_tx("tx_malformed_frames", chain, exc)
        return header, memoryview(packet)[VNET_HDR_LEN:]

    def _drop_tx(self, counter: str, chain: DescriptorChain, why: object) -> None:
        setattr(self.metrics, counter, getattr(self.metrics, counter) + 1)
        self.metrics.tx_dropped += 1
        self._log_once(counter, "virtio-net TX chain dropped; further ones are counted", iface_id=self.iface_id,
                       head=chain.head_index, error=f"{type(why).__name__}: {why}" if isinstance(why, Exception)
                       else str(why))
        return None

    def _transmit(self, header: bytes, frame: memoryview) -> bool:
        """Give one frame to the MMDS or the TAP; True if the MMDS consumed it."""
        if self.mmds is not None and self.mmds.detour_frame(finish_checksum(header, frame)):
            self.metrics.mmds_rx_accepted += 1
            # MMDS traffic is not rate limited (as Firecracker): give the tokens back.
            self.tx_rate_limiter.manual_replenish(1, TokenType.OPS)
            self.tx_rate_limiter.manual_replenish(VNET_HDR_LEN + len(frame), TokenType.BYTES)
            return True
        if self.guest_mac is not None and frame[6:12] != self.guest_mac.octets:
            self.metrics.tx_spoofed_mac_count += 1
        try:
            self.tap.write_frame((header, frame))
        except OSError as exc:
            self.metrics.tap_write_fails += 1
            self.metrics.tx_dropped += 1
            self._log_once("tap_write", "cannot write to the TAP; further failures are counted",
                           tap=self.tap.name, error=str(exc))
            return False
        self.metrics.tx_bytes_count += VNET_HDR_LEN + len(frame)
        self.metrics.tx_packets_count += 1
        self.metrics.tx_count += 1
        return False

    # --- RX ---------------------------------------------------------------------------------------

    def _process_rx(self) -> None:
        """Deliver the pending frame, then pull and deliver more, until the guest or the sources run dry."""
        mem, queue = self.mem, self.queues[RX_INDEX]
        assert mem is not None
        used_before = queue.next_used
        # Every delivered frame takes a chain; dropped ones are bounded too, so a flooded
        # TAP cannot hold the device here: the loop's level-triggered poll calls again.
        for _ in range(2 * queue.size):
            if self._pending is None:
                self._pending = self._pull_frame()
                if self._pending is None:
                    break
            outcome = self._deliver(mem, queue, self._pending)
            if outcome is _Rx.NO_BUFFER:
                self.metrics.no_rx_avail_buffer += 1
                break
            if outcome is _Rx.THROTTLED:
                self.metrics.rx_rate_limiter_throttled += 1
                break
            self._pending = None
        if queue.next_used != used_before:
            self.signal_used(queue)
        self._sync_tap_polling()

    def _pull_frame(self) -> bytes | None:
        """The next RX packet (vnet header + frame): the MMDS's first, else one from the TAP."""
        if self.mmds is not None:
            frame = self.mmds.write_next_frame(MAX_FRAME_LEN)
            if frame is not None and ETH_HLEN <= len(frame) <= MAX_FRAME_LEN:
                self.metrics.mmds_tx_frames += 1
                self.metrics.mmds_tx_bytes += len(frame)
                return bytes(VNET_HDR_LEN) + bytes(frame)
            if frame is not None:
                self.metrics.rx_dropped += 1
                self._log_once("mmds_len", "MMDS frame of a bad length dropped", length=len(frame))
        while True:  # bounded: each pass consumes one queued frame, or returns
            try:
                n = self.tap.read_frame(self._rx_buf)
            except BlockingIOError:
                return None
            except OSError as exc:
                self.metrics.tap_read_fails += 1
                self._tap_failed = True
                self._log_once("tap_read", "cannot read the TAP; polling it stops until a read succeeds",
                               tap=self.tap.name, error=str(exc))
                return None
            self._tap_failed = False
            packet = memoryview(self._rx_buf)[:n]
            try:
                header = check_rx_header(packet, self._rx_policy, 0)
            except HeaderError as exc:
                self.metrics.rx_dropped += 1
                self._log_once("rx_header", "TAP frame with an unusable header dropped", error=str(exc))
                continue
            return header + bytes(packet[VNET_HDR_LEN:])

    def _deliver(self, mem: GuestMemory, queue: Queue, packet: bytes) -> _Rx:
        """Write `packet` into RX chains, asking the limiter first; the outcome."""
        if self.rx_rate_limiter.is_blocked:
            return _Rx.THROTTLED
        taken = self._take_rx_chains(mem, queue, len(packet))
        if isinstance(taken, _Rx):
            return taken
        chains, clean = taken
        if not self._consume(self.rx_rate_limiter, len(packet)):
            self._give_back(mem, queue, chains, clean)
            return _Rx.THROTTLED
        header = bytearray(packet[:VNET_HDR_LEN])
        set_num_buffers(header, len(chains))
        data = memoryview(bytes(header) + packet[VNET_HDR_LEN:])
        offset = 0
        for head, descriptors in chains:
            written = 0
            for d in descriptors:
                if offset == len(data):
                    break
                chunk = data[offset:offset + d.length]
                mem.write(d.addr, chunk)
                offset += len(chunk)
                written += len(chunk)
            self._complete(mem, queue, head, written)
        self.metrics.rx_bytes_count += len(packet)
        self.metrics.rx_packets_count += 1
        self.metrics.rx_count += 1
        return _Rx.DELIVERED

    def _take_rx_chains(self, mem: GuestMemory, queue: Queue,
                        need: int) -> tuple[list[tuple[int, list[Descriptor]]], bool] | _Rx:
        """Pop RX chains until they hold `need` bytes: ((head, descriptors) list, clean) or an outcome.

        Broken chains are completed with length 0 on the way. `clean` is
        False once that happened after a chain was taken: the chains taken
        can then no longer be given back by rewinding the ring, which would
        pop the completed one again.
        """
        mrg = self.has_feature(VIRTIO_NET_F_MRG_RXBUF)
        chains: list[tuple[int, list[Descriptor]]] = []
        capacity = 0
        clean = True
        for _ in range(queue.size):  # no more chains can be outstanding than ring slots
            chain = queue.pop(mem)
            if chain is None:
                self._give_back(mem, queue, chains, clean)
                return _Rx.NO_BUFFER
            descriptors = self._rx_descriptors(chain)
            size = sum(d.length for d in descriptors) if descriptors is not None else 0
            if descriptors is None or size < self._min_rx_buffer:
                self._drop_rx_chain(mem, queue, chain.head_index, "broken chain" if descriptors is None
                                    else f"{size}-byte buffer is smaller than {self._min_rx_buffer}")
                clean = not chains  # rewinding can still stop short of it while nothing is held
                continue
            if not mrg and size < need:
                # The buffer is fine, the frame is too big for any buffer this guest gives.
                queue.undo_pop()
                return self._drop_rx_frame(need, f"{need}-byte packet does not fit a {size}-byte buffer")
            chains.append((chain.head_index, descriptors))
            capacity += size
            if capacity >= need:
                return chains, clean
        self._give_back(mem, queue, chains, clean)
        return self._drop_rx_frame(need, f"{need}-byte packet does not fit the whole receive ring")

    def _rx_descriptors(self, chain: DescriptorChain) -> list[Descriptor] | None:
        try:
            descriptors = chain.descriptors()
        except DescriptorChainError:
            return None
        if not all(d.is_write_only for d in descriptors):
            return None
        return descriptors

    def _drop_rx_chain(self, mem: GuestMemory, queue: Queue, head: int, why: str) -> None:
        self.metrics.rx_fails += 1
        self._log_once("rx_fails", "invalid virtio-net RX chain returned unused; further ones are counted",
                       iface_id=self.iface_id, head=head, error=why)
        self._complete(mem, queue, head, 0)

    def _drop_rx_frame(self, length: int, why: str) -> _Rx:
        self.metrics.rx_dropped += 1
        self._log_once("rx_dropped", "RX frame dropped; further ones are counted", iface_id=self.iface_id,
                       length=length, error=why)
        return _Rx.DROPPED

    def _give_back(self, mem: GuestMemory, queue: Queue, chains: list[tuple[int, list[Descriptor]]],
                   clean: bool) -> None:
        """Return chains taken for a frame that will not go into them now."""
        if clean:
            for _ in chains:
                queue.undo_pop()
            return
        # A broken chain was completed after these were popped: rewinding would pop it again.
        for head, _ in chains:
            self._drop_rx_chain(mem, queue, head, "returned unused after a broken chain")

    # --- helpers ----------------------------------------------------------------------------------

    @staticmethod
    def _consume(limiter: RateLimiter, size: int) -> bool:
        """One op and `size` bytes, or neither."""
        if not limiter.consume(1, TokenType.OPS):
            return False
        if not limiter.consume(size, TokenType.BYTES):
            limiter.manual_replenish(1, TokenType.OPS)
            return False
        return True

    def _complete(self, mem: GuestMemory, queue: Queue, head: int, length: int) -> None:
        try:
            queue.add_used(mem, head, length)
        except QueueError as exc:  # pop only returns heads < size: a bug, not the guest
            log.error("cannot complete a virtio-net chain", head=head, error=str(exc))

    def _log_once(self, key: str, message: str, **fields: object) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.warning(message, **fields)

    # --- persistence ------------------------------------------------------------------------------

    def state(self) -> NetState:
        with self.lock:
            return NetState(
                iface_id=self.iface_id, host_dev_name=self.tap.name,
                guest_mac=str(self.guest_mac) if self.guest_mac is not None else None, mtu=self.mtu,
                queue_size=self.queues[RX_INDEX].max_size, rx_rate_limiter=self.rx_rate_limiter.state(),
                tx_rate_limiter=self.tx_rate_limiter.state(), mmds_attached=self.mmds is not None,
                pending_rx_frame=self._pending, virtio=self.virtio_state(),
            )

    @classmethod
    def from_state(cls, state: NetState, mem: GuestMemory, interrupt: VirtioInterrupt, *,
                   open_tap: Callable[[str], TapBackend] = Tap.open,
                   restore_limiter: Callable[[RateLimiterState], RateLimiter] = RateLimiter.from_state) -> Net:
        """Reopen the TAP by name and reload untrusted `state`, re-activating the device if it was.

        `NetStateInvalid` for a bad state, `NetError` if the TAP cannot be
        opened. The MMDS stack is not part of the device's state: if
        `state.mmds_attached`, attach the restored stack with `set_mmds`.
        Call `kick()` once the VM runs again.
        """
        validate_net_state(state)
        try:
            rx_limiter = restore_limiter(state.rx_rate_limiter)
            tx_limiter = restore_limiter(state.tx_rate_limiter)
        except RateLimiterError as exc:
            raise NetStateInvalid(f"bad rate limiter state: {exc}") from exc
        try:
            tap = open_tap(state.host_dev_name)
        except TapError as exc:
            rx_limiter.close()
            tx_limiter.close()
            raise NetError(str(exc)) from exc
        mac = MacAddr.parse(state.guest_mac) if state.guest_mac is not None else None
        net = cls(state.iface_id, tap, mac, rx_limiter, tx_limiter, mtu=state.mtu, queue_size=state.queue_size)
        try:
            net.restore_virtio_state(state.virtio, mem, interrupt)
        except VirtioDeviceError as exc:
            net.close()
            raise NetStateInvalid(str(exc)) from exc
        with net.lock:
            pending = state.pending_rx_frame if state.virtio.activated else None
            if pending is not None:
                try:
                    check_rx_header(pending, net._rx_policy, 0)
                except HeaderError as exc:
                    net.close()
                    raise NetStateInvalid(f"the pending RX frame does not fit the negotiated features: {exc}") from exc
            net._pending = pending
            net._sync_tap_polling()
        return net

    def __repr__(self) -> str:
        flags = "".join(f" {name}" for name, on in (
            ("active", self.is_activated), ("pending", self._pending is not None),
            ("mmds", self.mmds is not None), ("rx_blocked", self.rx_rate_limiter.is_blocked),
            ("tx_blocked", self.tx_rate_limiter.is_blocked)) if on)
        mac = f" mac={self.guest_mac}" if self.guest_mac is not None else ""
        return f"<Net {self.iface_id} tap={self.tap.name}{mac}{flags}>"

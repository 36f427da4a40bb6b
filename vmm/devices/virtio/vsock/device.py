"""The virtio vsock device (virtio 1.1 §5.10) over Unix sockets on the host (Firecracker's "hybrid vsock").

Queues (§5.10.2): 0 RX (device → driver packets, into buffers the driver
posts), 1 TX (driver → device packets), 2 EVENT (device → driver events).
Features: VIRTIO_F_VERSION_1 and VIRTIO_RING_F_EVENT_IDX (Firecracker also
offers IN_ORDER; completions here are in order anyway). Config space
(§5.10.4): ``le64 guest_cid``, read-only.

Processing. A TX notification pops every TX chain, parses it
(`packet.parse_tx_packet`) and hands the packet to the `Muxer`, then
returns the chain with length 0; a malformed chain is dropped, counted, and
the connection it names (if its header was readable) is reset. Packets for
the guest are pulled from the muxer only while the driver has RX buffers
posted: each RX chain gets one packet, used length 44 + payload. RX is
refilled after TX processing, after host socket events, and when the driver
posts RX buffers. One interrupt per queue per batch (EVENT_IDX aware).

Host sockets. The muxer keeps every host fd in its own epoll set; the VMM
event loop watches `fds()` — one fd, handled by `on_host_events()` — which
takes the device lock, serves the sockets and refills RX.

Transport reset (§5.10.6.6, Firecracker's snapshot handling). Connections
do not survive a snapshot: `send_transport_reset()` forgets every host-side
connection and puts VIRTIO_VSOCK_EVENT_TRANSPORT_RESET in an EVENT buffer;
the guest then resets its sockets, re-reads guest_cid and kicks the event
queue after re-posting the buffer. Until that kick, RX is held back, so a
new connection's REQUEST cannot be caught by the guest's reset (Firecracker
`pending_event_ack`). A device restored with `from_state` sends the reset on
its first `kick()`.
"""

from __future__ import annotations

import struct
import time
from typing import Callable

import structlog

from vmm.config.vsock import VsockConfig
from vmm.devices.virtio.device import (
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_VSOCK,
    VIRTIO_RING_F_EVENT_IDX,
    ActivateError,
    VirtioDevice,
    VirtioDeviceError,
    VirtioInterrupt,
    feature,
)
from vmm.devices.virtio.queue import DescriptorChainError, Queue, QueueError
from vmm.devices.virtio.vsock.metrics import VsockMetrics
from vmm.devices.virtio.vsock.muxer import Muxer, MuxerError
from vmm.devices.virtio.vsock.packet import PacketError, parse_rx_buffer, parse_tx_packet
from vmm.devices.virtio.vsock.persist import VsockState, VsockStateInvalid, validate_vsock_state
from vmm.memory import GuestMemory, GuestMemoryError

__all__ = [
    "RXQ_INDEX",
    "TXQ_INDEX",
    "EVQ_INDEX",
    "VSOCK_QUEUE_SIZE",
    "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET",
    "CONFIG_SPACE_SIZE",
    "VsockError",
    "Vsock",
]

log = structlog.get_logger("vmm.devices.virtio.vsock")

# virtio 1.1 §5.10.2 "Virtqueues".
RXQ_INDEX = 0
TXQ_INDEX = 1
EVQ_INDEX = 2

# Firecracker's FIRECRACKER_MAX_QUEUE_SIZE, for each of the three queues.
VSOCK_QUEUE_SIZE = 256

# virtio 1.1 §5.10.6.6 "Device Events": struct virtio_vsock_event { le32 id; }.
VIRTIO_VSOCK_EVENT_TRANSPORT_RESET = 0
_EVENT = struct.Struct("<I")

# virtio 1.1 §5.10.4 "Device configuration layout": le64 guest_cid.
_CONFIG = struct.Struct("<Q")
CONFIG_SPACE_SIZE = _CONFIG.size

# linux/vm_sockets.h: CIDs 0-2 are reserved, 0xFFFFFFFF is VMADDR_CID_ANY.
_CID_MIN, _CID_LIMIT = 3, 0xFFFF_FFFF


class VsockError(VirtioDeviceError):
    """The virtio vsock device could not be built or restored."""


class Vsock(VirtioDevice):
    """A virtio-vsock device for guest CID `guest_cid`, its host side listening at `uds_path`.

    Raises `VsockError` if the CID is out of range or the socket cannot be
    bound (it must not exist yet). `clock` gives monotonic seconds for
    connection timeouts. Call `close()` when the VM goes away.
    """

    device_type = VIRTIO_ID_VSOCK

    def __init__(self, guest_cid: int, uds_path: str, *, queue_size: int = VSOCK_QUEUE_SIZE,
                 clock: Callable[[], float] = time.monotonic):
        if type(guest_cid) is not int or not _CID_MIN <= guest_cid < _CID_LIMIT:
            raise VsockError(f"guest CID {guest_cid!r} is outside {_CID_MIN}..{_CID_LIMIT - 1}")
        super().__init__(queue_sizes=[queue_size] * 3,
                         avail_features=feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_RING_F_EVENT_IDX))
        self.guest_cid = guest_cid
        self.metrics = VsockMetrics()
        try:
            self.muxer = Muxer(guest_cid, uds_path, metrics=self.metrics, clock=clock)
        except MuxerError as exc:
            raise VsockError(str(exc)) from exc
        self.pending_event_ack = False  # RX held back until the guest acknowledges a TRANSPORT_RESET
        self.transport_reset_due = False  # send a TRANSPORT_RESET at the next kick() (after a restore)

    @classmethod
    def from_config(cls, config: VsockConfig) -> Vsock:
        """Build from the API's `VsockConfig`."""
        return cls(config.guest_cid, config.uds_path)

    @property
    def uds_path(self) -> str:
        return self.muxer.uds_path

    # --- config space ------------------------------------------------------------------------

    def config_bytes(self) -> bytes:
        return _CONFIG.pack(self.guest_cid)

    def write_config(self, offset: int, data: bytes) -> None:
        self.metrics.cfg_fails += 1
        super().write_config(offset, data)

    # --- host side -----------------------------------------------------------------------------

    def fds(self) -> list[tuple[int, Callable[[], None]]]:
        """What the VMM event loop watches for readability, with the handler to call: one muxer fd.

        The fd is fixed for the device's life (until `close()`); host
        connections come and go inside it.
        """
        return [(self.muxer.fd, self.on_host_events)]

    def on_host_events(self) -> None:
        """The muxer fd is readable: serve the host sockets, then move packets to the guest."""
        with self.lock:
            if self.muxer.closed:
                return
            self.muxer.process_events()
            if self.mem is not None:
                self._process_rx()

    def close(self) -> None:
        """Close every host socket and remove the socket file."""
        with self.lock:
            self.muxer.close()

    # --- lifecycle -------------------------------------------------------------------------------

    def _on_activate(self) -> None:
        try:
            self.muxer.activate()
        except (OSError, ValueError) as exc:  # ValueError: the muxer was closed
            self.metrics.activate_fails += 1
            raise ActivateError(f"cannot listen on the vsock socket: {exc}") from exc

    def _on_reset(self) -> None:
        self.muxer.deactivate()
        self.pending_event_ack = False
        self.transport_reset_due = False

    def kick(self) -> None:
        """Resume processing (after activation or a restore): send a due TRANSPORT_RESET, replay TX, refill RX.

        The event queue is not processed: a kick there means "reset acknowledged" and only the guest may say so.
        """
        with self.lock:
            if self.mem is None:
                return
            if self.transport_reset_due:
                self.transport_reset_due = False
                self.send_transport_reset()
            if self.queues[TXQ_INDEX].ready:
                self._process_tx()
            self._process_rx()

    def process_queue(self, index: int) -> None:
        with self.lock:
            if self.mem is None or self.muxer.closed:
                return
            if index == TXQ_INDEX:
                self.metrics.tx_queue_event_count += 1
                self._process_tx()
                self._process_rx()
            elif index == RXQ_INDEX:
                self.metrics.rx_queue_event_count += 1
                self._process_rx()
            elif index == EVQ_INDEX:
                # The driver handled the event(s) and re-posted the buffer(s): the reset is acknowledged.
                self.pending_event_ack = False
                self._process_rx()

    # --- TX: driver → device --------------------------------------------------------------------

    def _process_tx(self) -> None:
        mem, queue = self.mem, self.queues[TXQ_INDEX]
        assert mem is not None
        used_any = False
        while (chain := queue.pop(mem)) is not None:
            try:
                packet = parse_tx_packet(chain.descriptors(), mem)
            except (DescriptorChainError, PacketError) as exc:
                self.metrics.tx_malformed_packets += 1
                header = getattr(exc, "header", None)
                log.warning("vsock: dropping a malformed TX packet", error=str(exc), header=repr(header))
                if header is not None:
                    self.muxer.reset_connection(header)
            else:
                self.muxer.send_packet(packet.header, packet.data)
            used_any |= self._complete(queue, chain.head_index, 0)
        if used_any:
            self.signal_used(queue)

    # --- RX: device → driver ---------------------------------------------------------------------

    def _process_rx(self) -> None:
        """Fill posted RX buffers with whatever the muxer has for the guest (unless a reset is unacknowledged)."""
        if self.pending_event_ack or not self.muxer.has_pending_rx:
            return
        mem, queue = self.mem, self.queues[RXQ_INDEX]
        assert mem is not None
        used_any = False
        while self.muxer.has_pending_rx and (chain := queue.pop(mem)) is not None:
            try:
                buffer = parse_rx_buffer(chain.descriptors())
            except (DescriptorChainError, PacketError) as exc:
                self.metrics.rx_malformed_buffers += 1
                log.warning("vsock: returning a malformed RX buffer unused", error=str(exc))
                used_any |= self._complete(queue, chain.head_index, 0)
                continue
            packet = self.muxer.next_packet(buffer.capacity)
            if packet is None:
                queue.undo_pop()
                break
            header, data = packet
            try:
                used_len = buffer.write(mem, header, data)
            except PacketError as exc:  # only a changed memory map: the queue checked the buffers
                log.error("vsock: cannot write an RX packet; it is lost", error=str(exc))
                used_len = 0
            used_any |= self._complete(queue, chain.head_index, used_len)
        if used_any:
            self.signal_used(queue)

    def _complete(self, queue: Queue, head_index: int, length: int) -> bool:
        assert self.mem is not None
        try:
            queue.add_used(self.mem, head_index, length)
        except (QueueError, GuestMemoryError) as exc:  # pop only returns heads < size: a bug, not the guest
            log.error("vsock: cannot complete a chain", head=head_index, error=str(exc))
            return False
        return True

    # --- EVENT: transport reset -----------------------------------------------------------------

    def send_transport_reset(self) -> bool:
        """Forget all connections and tell the guest (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET); False if it could not.

        Without an event buffer from the driver the event cannot be sent
        (counted in `ev_queue_event_fails`); the connections are dropped anyway.
        """
        with self.lock:
            self.muxer.close_connections()
            mem, queue = self.mem, self.queues[EVQ_INDEX]
            if mem is None:
                return False  # no driver: nothing to tell
            if not queue.ready:
                self.metrics.ev_queue_event_fails += 1
                return False
            chain = queue.pop(mem)
            if chain is None:
                self.metrics.ev_queue_event_fails += 1
                log.warning("vsock: no event buffer for a TRANSPORT_RESET; the guest keeps stale connections")
                return False
            try:
                first = chain.descriptors()[0]
                usable = first.is_write_only and first.length >= _EVENT.size
                if usable:
                    mem.write(first.addr, _EVENT.pack(VIRTIO_VSOCK_EVENT_TRANSPORT_RESET))
            except (DescriptorChainError, GuestMemoryError) as exc:
                log.warning("vsock: the event buffer chain is malformed", error=str(exc))
                usable = False
            if not usable:
                self.metrics.ev_queue_event_fails += 1
                log.warning("vsock: the event buffer is read-only or shorter than 4 bytes; event not sent")
                self._complete(queue, chain.head_index, 0)
                self.signal_used(queue)
                return False
            if queue.event_idx:
                # Ask for a kick as soon as the driver re-posts a buffer: that kick is the acknowledgement.
                queue.set_avail_event(mem, queue.avail_idx(mem))
            self._complete(queue, chain.head_index, _EVENT.size)
            self.pending_event_ack = True
            self.metrics.transport_resets += 1
            self.signal_used(queue)
            return True

    # --- persistence -----------------------------------------------------------------------------

    def state(self) -> VsockState:
        """Config, queues and the last host-side port; not the connections (a restored device resets them)."""
        with self.lock:
            return VsockState(guest_cid=self.guest_cid, uds_path=self.uds_path,
                              queue_size=self.queues[0].max_size, virtio=self.virtio_state(),
                              local_port_last=self.muxer.local_port_last)

    @classmethod
    def from_state(cls, state: VsockState, mem: GuestMemory, interrupt: VirtioInterrupt, *,
                   uds_path: str | None = None, clock: Callable[[], float] = time.monotonic) -> Vsock:
        """Rebuild from untrusted `state`, listening at `uds_path` if given (Firecracker's `vsock_override`).

        `VsockStateInvalid` for a bad state, `VsockError` if the socket cannot
        be bound. If the device was active, its first `kick()` (once the VM
        runs) sends a TRANSPORT_RESET so the guest drops the connections the
        snapshot remembers; host-initiated connections take ports after the
        snapshot's last one.
        """
        validate_vsock_state(state)
        vsock = cls(state.guest_cid, uds_path if uds_path is not None else state.uds_path,
                    queue_size=state.queue_size, clock=clock)
        try:
            vsock.restore_virtio_state(state.virtio, mem, interrupt)
        except VirtioDeviceError as exc:
            vsock.close()
            raise VsockStateInvalid(str(exc)) from exc
        vsock.muxer.resume_local_ports(state.local_port_last)  # in range: validate_vsock_state
        vsock.transport_reset_due = vsock.is_activated
        return vsock

    def __repr__(self) -> str:
        flags = "".join(f" {name}" for name, on in (("active", self.is_activated),
                                                     ("reset-unacked", self.pending_event_ack)) if on)
        return (f"<Vsock cid={self.guest_cid} {self.uds_path!r} conns={self.muxer.connection_count}{flags}>")

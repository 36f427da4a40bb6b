"""The MMDS network stack: the guest-facing side of the metadata service.

One `MmdsNetworkStack` sits on the data path of each virtio-net device that
MMDS is enabled for (Firecracker's ``MmdsNetworkStack``, `docs/mmds/mmds-design.md`):

* TX path: the device hands every guest frame to `detour_frame`. A frame
  that looks addressed to the MMDS IPv4 address (an ARP packet whose target
  is that address, or an IPv4 packet to it) is consumed — it never reaches
  the tap, even if it turns out to be malformed — and True is returned;
  any other frame returns False and goes to the tap as usual.
* RX path: whenever the guest has room, the device first calls
  `write_next_frame`; a frame (an ARP reply, then TCP segments: SYN-ACK,
  ACK, response data, FIN, RST) goes to the guest, None means "nothing from
  MMDS, read the tap".

What is consumed and answered:

* ARP request (IPv4 over Ethernet) for the MMDS address: the most recent one
  is remembered and answered with our MAC.
* IPv4 to the MMDS address: the header checksum must verify, options and
  fragments are dropped (MMDS traffic needs neither), other protocols are
  dropped; TCP goes to the `TcpHandler` on port 80 after its checksum is
  verified (skipped when the device says the guest left it for offload,
  ``csum_partial=True``: virtio-net ``VIRTIO_NET_HDR_F_NEEDS_CSUM``).

Outgoing IPv4 packets have TTL 1 (they never leave the link) and Don't
Fragment set. Frames go to the guest's MAC, learned from the frames it sends.
No Ethernet 802.1Q tags.

Nothing a guest sends can raise out of `detour_frame`; an internal failure
is logged, counted in ``metrics.internal_errors`` and the frame dropped.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from vmm.config.mmds import DEFAULT_MMDS_IPV4

from .data_store import MmdsStore
from .handler import RecvEvent, TcpHandler
from .http import MmdsHttp, MmdsHttpMetrics
from .pdu import (
    ARP_ETH_IPV4_LEN,
    ARP_OPER_REPLY,
    ARP_OPER_REQUEST,
    ETH_HLEN,
    ETHERTYPE_ARP,
    ETHERTYPE_IPV4,
    IPPROTO_TCP,
    IPV4_MIN_HEADER_LEN,
    ArpPacket,
    EthernetFrame,
    Ipv4Packet,
    MacAddr,
    PduError,
    TcpSegment,
    build_ethernet,
    build_ipv4,
    is_frame_to,
)

__all__ = [
    "MmdsNetworkStack",
    "MmdsNetworkStackState",
    "MmdsMetrics",
    "DEFAULT_MAC_ADDR",
    "DEFAULT_TCP_PORT",
    "MMDS_TTL",
]

log = logging.getLogger(__name__)

# Firecracker `mmds/ns.rs`.
DEFAULT_MAC_ADDR = MacAddr("06:01:23:45:67:01")
DEFAULT_TCP_PORT = 80
# `docs/mmds/mmds-design.md`: "All packets coming from MMDS have the TTL value set to 1".
MMDS_TTL = 1

ARP_FRAME_LEN = ETH_HLEN + ARP_ETH_IPV4_LEN


@dataclass
class MmdsMetrics(MmdsHttpMetrics):
    """Counters, with Firecracker's `mmds` metric names where it has them."""

    rx_accepted: int = 0
    rx_accepted_err: int = 0
    rx_accepted_unusual: int = 0
    rx_bad_eth: int = 0
    rx_count: int = 0
    tx_count: int = 0
    tx_bytes: int = 0
    tx_errors: int = 0
    connections_created: int = 0
    connections_destroyed: int = 0
    internal_errors: int = 0


@dataclass(frozen=True)
class MmdsNetworkStackState:
    """Persisted network stack settings (Firecracker's `MmdsNetworkStackState`)."""

    mac_addr: str
    ipv4_addr: str
    tcp_port: int


class MmdsNetworkStack:
    """The dumbo responder for one network interface; `clock` is monotonic seconds."""

    def __init__(
        self,
        store: MmdsStore,
        *,
        mac: MacAddr | bytes | str = DEFAULT_MAC_ADDR,
        ipv4_addr: ipaddress.IPv4Address | str = DEFAULT_MMDS_IPV4,
        clock: Callable[[], float] = time.monotonic,
        tcp_port: int = DEFAULT_TCP_PORT,
        metrics: MmdsMetrics | None = None,
    ) -> None:
        self.store = store
        self.mac = MacAddr(mac)
        self.ipv4_addr = ipaddress.IPv4Address(ipv4_addr)
        self.clock = clock
        self.metrics = metrics if metrics is not None else MmdsMetrics()
        self.tcp = TcpHandler(self.ipv4_addr, tcp_port, MmdsHttp(store, self.metrics))
        self._remote_mac: MacAddr | None = None
        self._pending_arp: tuple[MacAddr, ipaddress.IPv4Address] | None = None

    def __repr__(self) -> str:
        arp = " arp-reply-pending" if self._pending_arp else ""
        return f"<MmdsNetworkStack {self.mac} {self.ipv4_addr}:{self.tcp.local_port} {self.tcp!r}{arp}>"

    # --- device interface ------------------------------------------------------------

    def is_mmds_frame(self, frame: bytes | bytearray | memoryview) -> bool:
        """Would `detour_frame` consume `frame`? (No side effects.)"""
        return is_frame_to(frame, self.ipv4_addr)

    def detour_frame(self, frame: bytes | bytearray | memoryview, *, csum_partial: bool = False) -> bool:
        """Take a guest TX frame if it is for MMDS; True if consumed (do not send it to the tap)."""
        try:
            if not is_frame_to(frame, self.ipv4_addr):
                return False
            self.metrics.rx_accepted += 1
            self._detour(bytes(frame), csum_partial)
        except PduError:
            self.metrics.rx_accepted_err += 1
        except Exception:  # a bug must not let the guest kill the VMM
            self.metrics.internal_errors += 1
            log.exception("MMDS dropped a frame after an internal error")
        return True

    def write_next_frame(self, buf_size: int) -> bytes | None:
        """The next frame for the guest, at most `buf_size` bytes, or None."""
        try:
            return self._write_next_frame(buf_size)
        except Exception:
            self.metrics.internal_errors += 1
            self.metrics.tx_errors += 1
            log.exception("MMDS failed to write a frame")
            return None

    def next_timeout(self) -> float | None:
        """When (on `clock`) a retransmission becomes due, if one is armed.

        A device that wants retransmissions without guest traffic can arm a
        timer for this instant and then call `write_next_frame`.
        """
        return self.tcp.next_timeout()

    # --- persistence -----------------------------------------------------------------

    def state(self) -> MmdsNetworkStackState:
        return MmdsNetworkStackState(str(self.mac), str(self.ipv4_addr), self.tcp.local_port)

    @classmethod
    def from_state(
        cls,
        state: MmdsNetworkStackState,
        store: MmdsStore,
        *,
        clock: Callable[[], float] = time.monotonic,
        metrics: MmdsMetrics | None = None,
    ) -> MmdsNetworkStack:
        """Rebuild from saved settings (connections are not saved); ValueError if invalid."""
        if not isinstance(state.tcp_port, int) or not 0 < state.tcp_port <= 0xFFFF:
            raise ValueError(f"invalid MMDS TCP port {state.tcp_port!r}")
        return cls(
            store,
            mac=state.mac_addr,
            ipv4_addr=state.ipv4_addr,
            clock=clock,
            tcp_port=state.tcp_port,
            metrics=metrics,
        )

    # --- receive ---------------------------------------------------------------------

    def _detour(self, frame: bytes, csum_partial: bool) -> None:
        eth = EthernetFrame.parse(frame)
        if eth.ethertype == ETHERTYPE_ARP:
            arp = ArpPacket.parse(eth.payload)
            if arp.oper == ARP_OPER_REQUEST and arp.tpa == self.ipv4_addr:
                self._remote_mac = arp.sha
                self._pending_arp = (arp.sha, arp.spa)
            else:
                self.metrics.rx_accepted_unusual += 1
            return
        if eth.ethertype != ETHERTYPE_IPV4:
            self.metrics.rx_bad_eth += 1
            return
        ip = Ipv4Packet.parse(eth.payload)
        if ip.dst != self.ipv4_addr or ip.has_options or ip.is_fragment or ip.protocol != IPPROTO_TCP:
            self.metrics.rx_accepted_unusual += 1
            return
        segment = TcpSegment.parse(ip.payload, ip.src, ip.dst, verify_checksum=not csum_partial)
        self._remote_mac = eth.src
        event = self.tcp.receive(ip.src, segment, self.clock())
        self.metrics.rx_count += 1
        if event in (RecvEvent.NEW_CONNECTION, RecvEvent.NEW_CONNECTION_REPLACING):
            self.metrics.connections_created += 1
        if event in (RecvEvent.NEW_CONNECTION_REPLACING, RecvEvent.ENDPOINT_DONE):
            self.metrics.connections_destroyed += 1
        if event in (RecvEvent.UNUSUAL, RecvEvent.INVALID_PORT, RecvEvent.FAILED_NEW_CONNECTION):
            self.metrics.rx_accepted_unusual += 1

    # --- send ------------------------------------------------------------------------

    def _write_next_frame(self, buf_size: int) -> bytes | None:
        if self._pending_arp is not None:
            if buf_size < ARP_FRAME_LEN:
                return None
            sha, spa = self._pending_arp
            self._pending_arp = None
            reply = ArpPacket(ARP_OPER_REPLY, self.mac, self.ipv4_addr, sha, spa)
            return self._sent(build_ethernet(sha, self.mac, ETHERTYPE_ARP, reply.to_bytes()))
        if self._remote_mac is None:
            return None
        out = self.tcp.next_segment(self.clock(), buf_size - ETH_HLEN - IPV4_MIN_HEADER_LEN)
        if out is None:
            return None
        dst, segment, done = out
        if done:
            self.metrics.connections_destroyed += 1
        packet = build_ipv4(self.ipv4_addr, dst, IPPROTO_TCP, segment, ttl=MMDS_TTL)
        return self._sent(build_ethernet(self._remote_mac, self.mac, ETHERTYPE_IPV4, packet))

    def _sent(self, frame: bytes) -> bytes:
        self.metrics.tx_count += 1
        self.metrics.tx_bytes += len(frame)
        return frame

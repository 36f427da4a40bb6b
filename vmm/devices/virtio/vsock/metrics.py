"""The vsock device's counters, named as Firecracker's `VsockDeviceMetrics` where one exists.

One `VsockMetrics` is shared by the device and its muxer (both run under
the device lock). `as_dict()` is a cumulative source for the ``vsock``
section of the metrics registry (`Metrics.register_counters`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["VsockMetrics"]


@dataclass
class VsockMetrics:
    """Cumulative counters; "rx" is host → guest, "tx" is guest → host (the virtqueue names)."""

    activate_fails: int = 0
    cfg_fails: int = 0  # driver writes to the read-only config space
    rx_queue_event_count: int = 0
    tx_queue_event_count: int = 0
    ev_queue_event_fails: int = 0  # a TRANSPORT_RESET found no event buffer
    muxer_event_fails: int = 0  # the muxer's epoll or an accept failed
    conn_event_fails: int = 0  # a host connection's socket could not be (re)registered
    rx_bytes_count: int = 0  # payload bytes delivered to the guest
    tx_bytes_count: int = 0  # payload bytes written to host sockets
    rx_packets_count: int = 0  # packets delivered to the guest
    tx_packets_count: int = 0  # well-formed packets taken from the guest
    conns_added: int = 0
    conns_killed: int = 0  # connections reset by the device (timeouts, errors, protocol violations)
    conns_removed: int = 0
    tx_flush_fails: int = 0  # writing buffered guest data to a host socket failed
    tx_write_fails: int = 0  # shutting down or writing the host socket failed
    rx_read_fails: int = 0  # reading a host socket failed
    tx_malformed_packets: int = 0  # TX chains dropped as malformed (bad chain, header, length, direction)
    rx_malformed_buffers: int = 0  # RX chains returned unused (read-only or too short for a header)
    tx_dropped_packets: int = 0  # well-formed packets ignored (wrong CID, invalid for the connection's state)
    rst_sent_unknown: int = 0  # RSTs for packets that matched no connection (or a refused REQUEST)
    rst_queue_full: int = 0  # such RSTs dropped because the muxer's RST queue was full
    host_connects_refused: int = 0  # guest REQUESTs whose <uds_path>_<port> could not be connected
    host_requests_invalid: int = 0  # host sockets closed for a bad or missing CONNECT line
    conns_refused_limit: int = 0  # connections refused at the connection limit
    transport_resets: int = 0  # VIRTIO_VSOCK_EVENT_TRANSPORT_RESET events delivered

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

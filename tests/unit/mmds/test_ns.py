"""MmdsNetworkStack end to end: guest frames in, checked frames out."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from vmm.mmds import MmdsNetworkStack, MmdsNetworkStackState, MmdsStore, MmdsVersion
from vmm.mmds.handler import EVICTION_THRESHOLD, MAX_CONNECTIONS, MAX_PENDING_RESETS
from vmm.mmds.tcp import RCV_BUF_MAX_SIZE, RTO_PERIOD

from . import packets as p
from .packets import ACK, FIN, PSH, RST, SYN, FakeClock, GuestTcp, drain, http_request, parse_response, parse_responses

DATA = {"latest": {"meta-data": {"ami-id": "ami-12345678", "reservation-id": "r-fea54097"}}, "age": 43}


def make_ns(version: MmdsVersion = MmdsVersion.V1, data: dict | None = None) -> tuple[MmdsNetworkStack, FakeClock]:
    clock = FakeClock()
    store = MmdsStore(version=version, clock=clock)
    store.put(DATA if data is None else data)
    return MmdsNetworkStack(store, clock=clock), clock


# --- ARP ------------------------------------------------------------------------------


def test_arp_request_gets_a_reply() -> None:
    ns, _ = make_ns()
    assert ns.detour_frame(p.arp_request_frame())
    (reply,) = drain(ns)
    assert (reply.dst, reply.src, reply.ethertype) == (p.GUEST_MAC, p.MMDS_MAC, 0x0806)
    assert reply.arp == (2, p.MMDS_MAC, p.MMDS_IP, p.GUEST_MAC, p.GUEST_IP)


def test_arp_reply_waits_for_a_big_enough_buffer() -> None:
    ns, _ = make_ns()
    ns.detour_frame(p.arp_request_frame())
    assert ns.write_next_frame(41) is None
    assert len(ns.write_next_frame(42)) == 42
    assert ns.write_next_frame(42) is None


def test_only_the_latest_arp_request_is_answered() -> None:
    ns, _ = make_ns()
    ns.detour_frame(p.arp_request_frame())
    other = p.eth(p.arp(1, b"\x02" * 6, bytes([10, 0, 0, 9]), b"\0" * 6, p.MMDS_IP), ethertype=0x0806)
    ns.detour_frame(other)
    (reply,) = drain(ns)
    assert reply.arp[3:] == (b"\x02" * 6, bytes([10, 0, 0, 9]))


def test_arp_for_another_address_is_not_ours() -> None:
    ns, _ = make_ns()
    assert not ns.detour_frame(p.arp_request_frame(tpa=bytes([192, 168, 0, 1])))
    assert drain(ns) == []


def test_arp_reply_to_mmds_address_is_consumed_silently() -> None:
    ns, _ = make_ns()
    frame = p.eth(p.arp(2, p.GUEST_MAC, p.GUEST_IP, p.MMDS_MAC, p.MMDS_IP), ethertype=0x0806)
    assert ns.detour_frame(frame)
    assert drain(ns) == []


# --- TCP + HTTP -----------------------------------------------------------------------


def test_handshake_get_and_close() -> None:
    ns, _ = make_ns()
    guest = GuestTcp(ns)
    synack = guest.handshake()
    assert synack.mss == 1460 and synack.window == RCV_BUF_MAX_SIZE
    assert ns.tcp.connection_count == 1 and ns.metrics.connections_created == 1

    raw = guest.exchange(http_request("GET", "/latest/meta-data"))
    response = parse_response(raw)
    assert (response.status, response.body) == (200, b"ami-id\nreservation-id")
    assert response.headers["content-type"] == "text/plain"
    assert not guest.fin_received  # HTTP/1.1 keep-alive: the server waits for the guest

    guest.send(ACK | FIN)
    frames = guest.pull()
    assert [f.flags for f in frames] == [ACK | FIN]
    assert frames[0].ack == guest.snd_nxt
    assert guest.fin_received
    guest.send(ACK)
    assert ns.tcp.connection_count == 0
    assert ns.metrics.connections_destroyed == 1
    assert drain(ns) == []
    assert ns.metrics.internal_errors == 0


def test_keep_alive_serves_several_requests_and_pipelining() -> None:
    ns, _ = make_ns()
    guest = GuestTcp(ns)
    guest.handshake()
    assert parse_response(guest.exchange(http_request("GET", "/age", [("Accept", "application/json")]))).body == b"43"
    both = guest.exchange(http_request("GET", "/latest/meta-data/ami-id") + http_request("GET", "/missing"))
    first, second = parse_responses(both, count=2)
    assert first.body == b"ami-12345678"
    assert (second.status, second.body) == (404, b"Resource not found: /missing.")


def test_v2_token_then_get_over_tcp() -> None:
    ns, clock = make_ns(MmdsVersion.V2)
    guest = GuestTcp(ns)
    guest.handshake()
    denied = parse_response(guest.exchange(http_request("GET", "/latest/meta-data/ami-id")))
    assert denied.status == 401
    put = http_request("PUT", "/latest/api/token", [("X-metadata-token-ttl-seconds", "1")])
    token = parse_response(guest.exchange(put), "PUT").body.decode()
    get = http_request("GET", "/latest/meta-data/ami-id", [("X-metadata-token", token)])
    assert parse_response(guest.exchange(get)).body == b"ami-12345678"
    clock.advance(1.0)
    assert parse_response(guest.exchange(get)).status == 401


def test_http10_request_is_closed_by_the_server() -> None:
    ns, _ = make_ns()
    guest = GuestTcp(ns)
    guest.handshake()
    raw = guest.exchange(b"GET http://169.254.169.254/age HTTP/1.0\r\nAccept: application/json\r\n\r\n")
    assert guest.fin_received
    assert parse_response(raw).body == b"43"
    guest.send(ACK | FIN)
    frames = guest.pull()
    assert [f.flags for f in frames] == [ACK]  # our last ACK, then the connection is gone
    assert ns.tcp.connection_count == 0


def test_large_response_in_mss_sized_segments_within_the_window() -> None:
    blob = "x" * 20000
    ns, _ = make_ns(data={"blob": blob})
    guest = GuestTcp(ns, mss=536, window=3000)
    guest.handshake()
    guest.send(ACK | PSH, http_request("GET", "/blob"))
    frames = guest.pull()
    sizes = [len(f.payload) for f in frames if f.payload]
    assert max(sizes) <= 536 and sum(sizes) <= 3000  # nothing beyond the advertised window
    assert guest.pull() == []  # window full: the server waits for an ACK
    guest.send(ACK)
    guest.exchange(b"")
    assert parse_response(bytes(guest.received)).body == blob.encode()


def test_small_rx_buffers_limit_frame_size() -> None:
    ns, _ = make_ns(data={"blob": "y" * 3000})
    guest = GuestTcp(ns)
    guest.handshake()
    guest.send(ACK | PSH, http_request("GET", "/blob"))
    frames = guest.pull(buf_size=300)
    assert frames and all(14 + 20 + 20 + len(f.payload) <= 300 for f in frames)
    assert ns.write_next_frame(14 + 20 + 19) is None  # not even a bare header fits


def test_lost_segment_is_retransmitted_after_the_timeout() -> None:
    ns, clock = make_ns()
    guest = GuestTcp(ns)
    guest.handshake()
    guest.send(ACK | PSH, http_request("GET", "/age", [("Accept", "application/json")]))
    first = [f for f in drain(ns) if f.payload]  # "lost": the guest does not see it
    assert first
    assert ns.next_timeout() == pytest.approx(clock.now + RTO_PERIOD)
    assert drain(ns) == []
    clock.advance(RTO_PERIOD)
    again = [f for f in guest.pull() if f.payload]
    assert [(f.seq, f.payload) for f in again] == [(f.seq, f.payload) for f in first]
    guest.send(ACK)
    assert ns.next_timeout() is None


def test_duplicate_ack_triggers_fast_retransmit() -> None:
    ns, _ = make_ns(data={"blob": "z" * 4000})
    guest = GuestTcp(ns, mss=1000)
    guest.handshake()
    guest.send(ACK | PSH, http_request("GET", "/blob"))
    sent = [f for f in drain(ns) if f.payload]
    assert len(sent) >= 2
    guest.send(ACK)  # acknowledges nothing new: a duplicate ACK
    resent = [f for f in guest.pull() if f.payload]
    assert resent[0].seq == sent[0].seq


def test_guest_rst_removes_the_connection() -> None:
    ns, _ = make_ns()
    guest = GuestTcp(ns)
    guest.handshake()
    guest.send(RST)
    assert ns.tcp.connection_count == 0
    assert drain(ns) == []


def test_unexpected_segment_gets_a_rst() -> None:
    ns, _ = make_ns()
    assert ns.detour_frame(p.tcp_frame(5555, 100, 777, ACK))
    (rst,) = drain(ns)
    assert (rst.flags, rst.seq, rst.dport) == (RST, 777, 5555)
    ns.detour_frame(p.tcp_frame(5555, 100, 0, FIN, b"abc"))
    (rst,) = drain(ns)
    assert (rst.flags, rst.seq, rst.ack) == (RST | ACK, 0, 104)
    ns.detour_frame(p.tcp_frame(5555, 100, 0, RST))  # never answer a RST
    assert drain(ns) == []


def test_other_ports_are_consumed_and_ignored() -> None:
    ns, _ = make_ns()
    assert ns.detour_frame(p.tcp_frame(4000, 1, 0, SYN, dport=81))
    assert drain(ns) == []


def test_request_too_large_resets_the_connection() -> None:
    ns, _ = make_ns()
    guest = GuestTcp(ns, mss=1400)
    guest.handshake()
    endless = b"GET /" + b"a" * (RCV_BUF_MAX_SIZE + 100)
    for i in range(0, len(endless), 1000):
        guest.send(ACK, endless[i : i + 1000])
    guest.pull()
    assert guest.rst_received
    assert ns.tcp.connection_count == 0


def test_connection_limit_and_eviction() -> None:
    ns, clock = make_ns()
    guests = [GuestTcp(ns, sport=10000 + i) for i in range(MAX_CONNECTIONS)]
    for g in guests:
        g.handshake()
    assert ns.tcp.connection_count == MAX_CONNECTIONS
    late = GuestTcp(ns, sport=20000)
    late.send(SYN, options=p.mss_option(1460))
    (refused,) = drain(ns)
    assert (refused.dport, refused.flags) == (20000, RST | ACK)
    assert ns.tcp.connection_count == MAX_CONNECTIONS

    clock.advance(EVICTION_THRESHOLD + 1)
    for g in guests[1:]:
        g.send(ACK)  # every connection but the first shows signs of life
    late.send(SYN, options=p.mss_option(1460), seq=late.isn)
    frames = drain(ns)
    assert {(f.dport, f.flags) for f in frames} == {(10000, RST | ACK), (20000, SYN | ACK)}
    assert ns.tcp.connection_count == MAX_CONNECTIONS


def test_rst_queue_is_bounded() -> None:
    ns, _ = make_ns()
    for port in range(1, 3 * MAX_PENDING_RESETS):
        ns.detour_frame(p.tcp_frame(port, 0, 0, ACK))
    assert ns.tcp.pending_resets == MAX_PENDING_RESETS
    assert len(drain(ns)) == MAX_PENDING_RESETS


# --- what is consumed, what is not -----------------------------------------------------


def syn_frame(**kw) -> bytes:
    return p.tcp_frame(4242, 1, 0, SYN, **kw)


def refresh_ip_checksum(frame: bytes) -> bytes:
    ip = bytearray(frame[14:])
    hlen = (ip[0] & 0x0F) * 4
    ip[10:12] = b"\0\0"
    ip[10:12] = struct.pack("!H", p.csum(bytes(ip[:hlen])))
    return frame[:14] + bytes(ip)


SYN_SEGMENT = p.tcp(4242, 80, 1, 0, SYN)
ARP_REQUEST = p.arp(1, p.GUEST_MAC, p.GUEST_IP, b"\0" * 6, p.MMDS_IP)

MALFORMED = {
    "bad tcp checksum": syn_frame()[:-1] + bytes([syn_frame()[-1] ^ 0xFF]),
    "bad ip checksum": syn_frame()[:24] + bytes([syn_frame()[24] ^ 0xFF]) + syn_frame()[25:],
    "ip total length too long": p.eth(p.ipv4(p.tcp(4242, 80, 1, 0, SYN), total_len=200)),
    "ip total length below header": p.eth(p.ipv4(p.tcp(4242, 80, 1, 0, SYN), total_len=19)),
    "truncated tcp header": p.eth(p.ipv4(p.tcp(4242, 80, 1, 0, SYN)[:12])),
    "ip options": p.eth(p.ipv4(p.tcp(4242, 80, 1, 0, SYN), options=b"\x01\x01\x01\x00")),
    "more fragments": p.eth(p.ipv4(p.tcp(4242, 80, 1, 0, SYN), flags_frag=0x2000)),
    "fragment offset": p.eth(p.ipv4(p.tcp(4242, 80, 1, 0, SYN), flags_frag=0x0010)),
    "udp": p.eth(p.ipv4(b"\x00" * 8, proto=17)),
    "ipv6 version nibble": refresh_ip_checksum(p.eth(b"\x65" + p.ipv4(b"")[1:])),
    "syn with bad mss": syn_frame(options=b"\x02\x04\x00\x10"),
    "tcp data offset past the end": p.eth(p.ipv4(SYN_SEGMENT[:12] + b"\xf0" + SYN_SEGMENT[13:])),
    "arp not ipv4/ethernet": p.eth(struct.pack("!H", 6) + ARP_REQUEST[2:], ethertype=0x0806),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_frames_for_mmds_are_consumed_and_ignored(name: str) -> None:
    ns, _ = make_ns()
    assert ns.detour_frame(MALFORMED[name])
    frames = drain(ns)
    if name == "syn with bad mss":
        assert [f.flags for f in frames] == [RST | ACK]  # a refused connection is told so
    else:
        assert frames == []
    assert ns.tcp.connection_count == 0
    assert ns.metrics.internal_errors == 0


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\x00" * 13,
        p.eth(p.ipv4(b"")[:19]),
        p.eth(p.ipv4(b"", dst=bytes([8, 8, 8, 8]))),
        p.eth(p.ipv4(b""), ethertype=0x8100),  # VLAN tagged: not for us
        p.eth(b"\x00" * 40, ethertype=0x86DD),
    ],
)
def test_frames_not_for_mmds_pass_through(frame: bytes) -> None:
    ns, _ = make_ns()
    assert not ns.detour_frame(frame)
    assert drain(ns) == []


def test_partial_checksum_from_offload_is_accepted() -> None:
    ns, _ = make_ns()
    frame = syn_frame(options=p.mss_option(1460))
    broken = frame[:50] + b"\x00\x00" + frame[52:]  # checksum field left for offload
    assert ns.detour_frame(broken)
    assert drain(ns) == []
    assert ns.detour_frame(broken, csum_partial=True)
    (synack,) = drain(ns)
    assert synack.flags == SYN | ACK


def test_ethernet_padding_is_tolerated() -> None:
    ns, _ = make_ns()
    frame = syn_frame(options=p.mss_option(1460))
    assert len(frame) < 60
    assert ns.detour_frame(frame + b"\0" * (60 - len(frame)))
    assert [f.flags for f in drain(ns)] == [SYN | ACK]


def test_mac_is_learned_from_the_guest() -> None:
    ns, _ = make_ns()
    other_mac = bytes.fromhex("020000000099")
    ns.detour_frame(p.eth(p.ipv4(p.tcp(4242, 80, 1, 0, SYN)), src=other_mac))
    raw = ns.write_next_frame(2048)
    assert raw is not None and raw[:6] == other_mac


def test_nothing_to_send_before_any_guest_frame() -> None:
    ns, _ = make_ns()
    assert ns.write_next_frame(2048) is None
    assert ns.next_timeout() is None


# --- configuration and persistence ----------------------------------------------------


def test_custom_address_and_mac() -> None:
    clock = FakeClock()
    store = MmdsStore(clock=clock)
    ns = MmdsNetworkStack(store, mac="02:00:00:00:00:01", ipv4_addr="169.254.170.2", clock=clock)
    assert ns.detour_frame(p.arp_request_frame(tpa=bytes([169, 254, 170, 2])))
    assert not ns.detour_frame(p.arp_request_frame())
    (reply,) = drain(ns)
    assert reply.src == bytes.fromhex("020000000001") and reply.arp[2] == bytes([169, 254, 170, 2])


def test_state_round_trip() -> None:
    ns, clock = make_ns()
    state = ns.state()
    assert state == MmdsNetworkStackState("06:01:23:45:67:01", "169.254.169.254", 80)
    restored = MmdsNetworkStack.from_state(state, ns.store, clock=clock)
    assert (restored.mac, restored.ipv4_addr, restored.tcp.local_port) == (ns.mac, ns.ipv4_addr, 80)
    assert restored.ipv4_addr == ipaddress.IPv4Address("169.254.169.254")
    for bad in (MmdsNetworkStackState("zz", "169.254.169.254", 80), MmdsNetworkStackState("06:01:23:45:67:01", "x", 80),
                MmdsNetworkStackState("06:01:23:45:67:01", "169.254.169.254", 0)):
        with pytest.raises(ValueError):
            MmdsNetworkStack.from_state(bad, ns.store)


def test_repr_is_one_line() -> None:
    ns, _ = make_ns()
    ns.detour_frame(p.arp_request_frame())
    text = repr(ns)
    assert "\n" not in text and "169.254.169.254:80" in text and "arp-reply-pending" in text

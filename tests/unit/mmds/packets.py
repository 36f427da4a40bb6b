"""A guest's view of the MMDS: a tiny frame builder/parser and a TCP+HTTP peer.

Written independently of `vmm.mmds.pdu` (plain `struct`, its own checksum)
so the tests check the stack against a second implementation. Every frame
the stack emits is parsed with `parse_frame`, which asserts that lengths
and checksums are right.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import h11

from vmm.mmds import MmdsNetworkStack

GUEST_MAC = bytes.fromhex("aafc00000001")
GUEST_IP = bytes([192, 168, 0, 2])
MMDS_IP = bytes([169, 254, 169, 254])
MMDS_MAC = bytes.fromhex("060123456701")
BROADCAST = b"\xff" * 6

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
RX_BUF = 2048


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = 0
    for (word,) in struct.iter_unpack("!H", data):
        total += word
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def eth(payload: bytes, *, ethertype: int = 0x0800, dst: bytes = MMDS_MAC, src: bytes = GUEST_MAC) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def arp(oper: int, sha: bytes, spa: bytes, tha: bytes, tpa: bytes) -> bytes:
    return struct.pack("!HHBBH", 1, 0x0800, 6, 4, oper) + sha + spa + tha + tpa


def arp_request_frame(tpa: bytes = MMDS_IP) -> bytes:
    return eth(arp(1, GUEST_MAC, GUEST_IP, b"\0" * 6, tpa), ethertype=0x0806, dst=BROADCAST)


def ipv4(
    payload: bytes,
    *,
    src: bytes = GUEST_IP,
    dst: bytes = MMDS_IP,
    proto: int = 6,
    ttl: int = 64,
    flags_frag: int = 0,
    options: bytes = b"",
    total_len: int | None = None,
) -> bytes:
    ihl = 5 + len(options) // 4
    length = total_len if total_len is not None else ihl * 4 + len(payload)
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, length, 0x1234, flags_frag, ttl, proto, 0, src, dst) + options
    header = header[:10] + struct.pack("!H", csum(header)) + header[12:]
    return header + payload


def tcp(
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    payload: bytes = b"",
    *,
    window: int = 65535,
    options: bytes = b"",
    src: bytes = GUEST_IP,
    dst: bytes = MMDS_IP,
) -> bytes:
    offset = (20 + len(options)) // 4
    seq, ack = seq & 0xFFFFFFFF, ack & 0xFFFFFFFF
    header = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, offset << 4, flags, window, 0, 0)
    segment = header + options + payload
    pseudo = src + dst + struct.pack("!BBH", 0, 6, len(segment))
    check = csum(pseudo + segment)
    return segment[:16] + struct.pack("!H", check) + segment[18:]


def mss_option(mss: int) -> bytes:
    return struct.pack("!BBH", 2, 4, mss)


def tcp_frame(sport: int, seq: int, ack: int, flags: int, payload: bytes = b"", *, dport: int = 80, **kw) -> bytes:
    return eth(ipv4(tcp(sport, dport, seq, ack, flags, payload, **kw)))


@dataclass
class Frame:
    """A frame from the MMDS, checked on the way."""

    dst: bytes
    src: bytes
    ethertype: int
    arp: tuple[int, bytes, bytes, bytes, bytes] | None = None
    ip_src: bytes = b""
    ip_dst: bytes = b""
    ttl: int = 0
    sport: int = 0
    dport: int = 0
    seq: int = 0
    ack: int = 0
    flags: int = 0
    window: int = 0
    options: bytes = b""
    payload: bytes = b""

    @property
    def mss(self) -> int | None:
        if len(self.options) >= 4 and self.options[0] == 2 and self.options[1] == 4:
            return struct.unpack("!H", self.options[2:4])[0]
        return None


def parse_frame(frame: bytes) -> Frame:
    """Parse a frame the stack sent, asserting every length and checksum."""
    assert len(frame) >= 14
    dst, src, ethertype = frame[:6], frame[6:12], struct.unpack("!H", frame[12:14])[0]
    body = frame[14:]
    if ethertype == 0x0806:
        assert len(body) == 28
        htype, ptype, hlen, plen, oper = struct.unpack("!HHBBH", body[:8])
        assert (htype, ptype, hlen, plen) == (1, 0x0800, 6, 4)
        return Frame(dst, src, ethertype, arp=(oper, body[8:14], body[14:18], body[18:24], body[24:28]))
    assert ethertype == 0x0800
    vihl, _tos, total, _ident, flags_frag, ttl, proto = struct.unpack("!BBHHHBB", body[:10])
    assert vihl == 0x45, "the MMDS sends no IP options"
    assert total == len(body), "IPv4 total length must match the frame"
    assert csum(body[:20]) == 0, "IPv4 header checksum"
    assert flags_frag & 0x3FFF == 0, "never fragmented"
    assert proto == 6
    ip_src, ip_dst = body[12:16], body[16:20]
    seg = body[20:]
    assert csum(ip_src + ip_dst + struct.pack("!BBH", 0, 6, len(seg)) + seg) == 0, "TCP checksum"
    sport, dport, seq, ack, off, flags, window = struct.unpack("!HHIIBBH", seg[:16])
    hlen = (off >> 4) * 4
    assert 20 <= hlen <= len(seg)
    return Frame(
        dst, src, ethertype, None, ip_src, ip_dst, ttl, sport, dport, seq, ack, flags, window, seg[20:hlen], seg[hlen:]
    )


def drain(ns: MmdsNetworkStack, buf_size: int = RX_BUF, limit: int = 1000) -> list[Frame]:
    """Every frame the stack has for the guest right now, parsed and checked."""
    frames = []
    for _ in range(limit):
        raw = ns.write_next_frame(buf_size)
        if raw is None:
            return frames
        assert len(raw) <= buf_size
        frames.append(parse_frame(raw))
    raise AssertionError("the stack never stops sending")


@dataclass
class GuestTcp:
    """The guest end of one TCP connection to the MMDS, driven by the test."""

    ns: MmdsNetworkStack
    sport: int = 40000
    isn: int = 1000
    mss: int = 1460
    window: int = 65535
    snd_nxt: int = 0
    rcv_nxt: int = 0
    received: bytearray = field(default_factory=bytearray)
    fin_received: bool = False
    rst_received: bool = False

    def send(self, flags: int, payload: bytes = b"", *, seq: int | None = None, ack: int | None = None, **kw) -> bool:
        seq = self.snd_nxt if seq is None else seq
        ack = self.rcv_nxt if ack is None else ack
        kw.setdefault("window", self.window)
        consumed = self.ns.detour_frame(tcp_frame(self.sport, seq, ack, flags, payload, **kw))
        self.snd_nxt = (seq + len(payload) + bool(flags & (SYN | FIN))) & 0xFFFFFFFF
        return consumed

    def handshake(self) -> Frame:
        self.snd_nxt = self.isn
        assert self.send(SYN, options=mss_option(self.mss), ack=0)
        frames = self.pull()
        assert len(frames) == 1
        synack = frames[0]
        assert synack.flags == SYN | ACK
        assert synack.ack == self.isn + 1
        assert synack.mss is not None
        self.rcv_nxt = (synack.seq + 1) & 0xFFFFFFFF
        self.send(ACK)
        return synack

    def pull(self, buf_size: int = RX_BUF) -> list[Frame]:
        """Frames for this connection; data must arrive in order (the link never reorders)."""
        frames = [f for f in drain(self.ns, buf_size) if f.dport == self.sport]
        for f in frames:
            assert f.ip_src == MMDS_IP and f.ip_dst == GUEST_IP and f.ttl == 1
            assert f.dst == GUEST_MAC and f.src == MMDS_MAC
            if f.flags & RST:
                self.rst_received = True
            if f.seq == self.rcv_nxt and (f.payload or f.flags & FIN):
                self.received += f.payload
                self.rcv_nxt = (self.rcv_nxt + len(f.payload) + bool(f.flags & FIN)) & 0xFFFFFFFF
                if f.flags & FIN:
                    self.fin_received = True
        return frames

    def exchange(self, request: bytes, *, max_rounds: int = 200) -> bytes:
        """Send `request` (in MSS-sized pieces), ACK everything until the answer stops coming."""
        for i in range(0, len(request), self.mss):
            self.send(ACK | PSH, request[i : i + self.mss])
        start = len(self.received)
        for _ in range(max_rounds):
            frames = self.pull()
            if not frames:
                break
            if any(f.payload or f.flags & FIN for f in frames):
                self.send(ACK)
        return bytes(self.received[start:])


def http_request(
    method: str, target: str, headers: list[tuple[str, str]] | None = None, *, body: bytes = b""
) -> bytes:
    """Request bytes as an h11 client writes them."""
    client = h11.Connection(h11.CLIENT)
    hdrs = [("Host", "169.254.169.254"), *(headers or [])]
    if body:
        hdrs.append(("Content-Length", str(len(body))))
    out = client.send(h11.Request(method=method, target=target, headers=hdrs))
    if body:
        out += client.send(h11.Data(data=body))
    out += client.send(h11.EndOfMessage())
    return out


@dataclass
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: bytes


def parse_responses(data: bytes, method: str = "GET", count: int = 1) -> list[HttpResponse]:
    """Parse `count` responses with an h11 client (the peer the server talks to)."""
    client = h11.Connection(h11.CLIENT)
    responses = []
    client.receive_data(data)
    for _ in range(count):
        client.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
        client.send(h11.EndOfMessage())
        status, headers, body = 0, {}, bytearray()
        while True:
            event = client.next_event()
            assert event is not h11.NEED_DATA, "incomplete response"
            if isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode().lower(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        responses.append(HttpResponse(status, headers, bytes(body)))
        if client.our_state is h11.MUST_CLOSE:
            break
        client.start_next_cycle()
    return responses


def parse_response(data: bytes, method: str = "GET") -> HttpResponse:
    (response,) = parse_responses(data, method)
    return response

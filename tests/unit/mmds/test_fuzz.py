"""Hostile guest: `detour_frame` never raises, answers stay well-formed, memory stays bounded."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmm.mmds import MmdsNetworkStack, MmdsStore, MmdsVersion
from vmm.mmds.handler import MAX_CONNECTIONS, MAX_PENDING_RESETS
from vmm.mmds.tcp import RCV_BUF_MAX_SIZE

from . import packets as p
from .packets import ACK, FIN, PSH, SYN, FakeClock, drain, http_request

DATA = {"latest": {"meta-data": {"ami-id": "ami-12345678", "blob": "b" * 4000}}}
# One response: the largest body the store can produce, plus headers.
MAX_RESPONSE = 51200 + 512

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_ns(version: MmdsVersion = MmdsVersion.V1) -> tuple[MmdsNetworkStack, FakeClock]:
    clock = FakeClock()
    store = MmdsStore(version=version, clock=clock)
    store.put(DATA)
    return MmdsNetworkStack(store, clock=clock), clock


def check_invariants(ns: MmdsNetworkStack) -> None:
    assert ns.metrics.internal_errors == 0
    assert ns.tcp.connection_count <= MAX_CONNECTIONS
    assert ns.tcp.pending_resets <= MAX_PENDING_RESETS
    for endpoint in ns.tcp.endpoints():
        assert len(endpoint.conn.rx) <= RCV_BUF_MAX_SIZE
        assert len(endpoint.conn.tx) <= MAX_RESPONSE


def feed(ns: MmdsNetworkStack, frame: bytes, buf_size: int = p.RX_BUF) -> None:
    ns.detour_frame(frame)
    drain(ns, buf_size)  # every answer must parse, with good lengths and checksums
    check_invariants(ns)


@FUZZ
@given(st.lists(st.binary(max_size=200), max_size=20))
def test_random_bytes(frames: list[bytes]) -> None:
    ns, _ = make_ns()
    for frame in frames:
        feed(ns, frame)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from([0x0800, 0x0806]), st.binary(max_size=120)), max_size=20))
def test_random_payloads_addressed_to_mmds(frames: list[tuple[int, bytes]]) -> None:
    """Fixed offsets point at the MMDS address, so every frame goes down the deep path."""
    ns, _ = make_ns()
    for ethertype, body in frames:
        body = bytearray(body.ljust(28, b"\0"))
        if ethertype == 0x0800:
            body[16:20] = p.MMDS_IP
        else:
            body[24:28] = p.MMDS_IP
        feed(ns, p.eth(bytes(body), ethertype=ethertype))


def valid_session() -> list[bytes]:
    """The frames of a normal exchange (the server's numbers are guessed, as an attacker would)."""
    sport, isn = 40000, 1000
    request = http_request("GET", "/latest/meta-data/ami-id")
    return [
        p.arp_request_frame(),
        p.tcp_frame(sport, isn, 0, SYN, options=p.mss_option(1460)),
        p.tcp_frame(sport, isn + 1, 1, ACK),
        p.tcp_frame(sport, isn + 1, 1, ACK | PSH, request),
        p.tcp_frame(sport, isn + 1 + len(request), 1, ACK | FIN),
    ]


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2000), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 2000), st.just(0)),
    st.tuples(st.just("extend"), st.integers(0, 64), st.integers(0, 255)),
)


def mutate(frame: bytes, op: tuple[str, int, int]) -> bytes:
    kind, where, value = op
    if kind == "flip" and frame:
        i = where % len(frame)
        return frame[:i] + bytes([frame[i] ^ value]) + frame[i + 1 :]
    if kind == "truncate":
        return frame[: where % (len(frame) + 1)]
    return frame + bytes([value]) * where


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 4), st.lists(mutation, max_size=3)), max_size=25))
def test_mutated_valid_frames(steps: list[tuple[int, list[tuple[str, int, int]]]]) -> None:
    ns, clock = make_ns()
    session = valid_session()
    for index, ops in steps:
        frame = session[index]
        for op in ops:
            frame = mutate(frame, op)
        feed(ns, frame)
        clock.advance(0.1)


# A stateful TCP fuzz: checksums are right, so segments reach the connection logic. The guest
# may track the sequence numbers it has seen (like a real peer) or send arbitrary ones.
segment = st.fixed_dictionaries(
    {
        "port": st.one_of(st.just(1000), st.just(1000), st.sampled_from([1001, 1002]), st.integers(1, 65535)),
        "seq": st.one_of(st.just("track"), st.just("track"), st.just("old"), st.integers(0, 2**32 - 1)),
        "ack": st.one_of(st.just("track"), st.just("track"), st.just("zero"), st.integers(0, 2**32 - 1)),
        # Mostly plausible values (so handshakes complete), sometimes anything.
        "flags": st.one_of(
            st.sampled_from([SYN, SYN, ACK, ACK, ACK | PSH, ACK | FIN, FIN, 0x04, 0x14]),
            st.sampled_from([SYN, ACK, ACK | PSH]),
            st.integers(0, 255),
        ),
        "window": st.sampled_from([0, 1, 100, 65535, 65535]) | st.integers(0, 65535),
        "payload": st.one_of(
            st.just(b""),
            st.just(b""),
            st.sampled_from([http_request("GET", "/latest/meta-data/blob"), b"GET / HTTP/1.1\r\n"]),
            st.binary(max_size=1500),
        ),
        "mss": st.none() | st.none() | st.integers(0, 65535),
        "advance": st.sampled_from([0.0, 0.0, 0.3, 11.0]),
        "buf": st.sampled_from([60, 200, p.RX_BUF, p.RX_BUF]),
    }
)


class Peer:
    """What a guest port has seen: the next sequence numbers of both sides."""

    def __init__(self) -> None:
        self.guest_next: dict[int, int] = {}
        self.server_next: dict[int, int] = {}

    def frame(self, s: dict) -> bytes:
        port = s["port"]
        tracked_seq = self.guest_next.get(port, 1000)
        seq = {"track": tracked_seq, "old": tracked_seq - 5}.get(s["seq"], s["seq"])
        ack = {"track": self.server_next.get(port, 0), "zero": 0}.get(s["ack"], s["ack"])
        options = p.mss_option(s["mss"]) if s["mss"] is not None else b""
        flags, payload = s["flags"], s["payload"]
        self.guest_next[port] = (seq + len(payload) + bool(flags & (SYN | FIN))) & 0xFFFFFFFF
        return p.tcp_frame(port, seq, ack, flags, payload, window=s["window"], options=options)

    def saw(self, frames: list[p.Frame]) -> None:
        for f in frames:
            if f.ethertype == 0x0800:
                end = (f.seq + len(f.payload) + bool(f.flags & (SYN | FIN))) & 0xFFFFFFFF
                self.server_next[f.dport] = end


def plain(flags: int, payload: bytes = b"", **kw) -> dict:
    return {"port": 1000, "seq": "track", "ack": "track", "flags": flags, "payload": payload,
            "window": 65535, "mss": None, "advance": 0.0, "buf": p.RX_BUF, **kw}


# Scripted openings, so the random segments that follow start deep in the state machine.
PREFIXES = {
    "none": [],
    "handshake": [plain(SYN, ack="zero"), plain(ACK)],
    "request": [plain(SYN, ack="zero"), plain(ACK), plain(ACK | PSH, http_request("GET", "/latest/meta-data/blob"))],
    "request-close": [plain(SYN, ack="zero"), plain(ACK),
                      plain(ACK | PSH, http_request("GET", "/latest/meta-data/blob")), plain(ACK | FIN)],
}

REACHED: set[str] = set()


@FUZZ
@given(
    st.sampled_from(sorted(PREFIXES)),
    st.lists(segment, min_size=1, max_size=40),
    st.sampled_from([MmdsVersion.V1, MmdsVersion.V2]),
)
def test_valid_checksum_segments(prefix: str, segments: list[dict], version: MmdsVersion) -> None:
    ns, clock = make_ns(version)
    peer = Peer()
    for s in PREFIXES[prefix] + segments:
        clock.advance(s["advance"])
        ns.detour_frame(peer.frame(s))
        if any(ep.conn.is_established for ep in ns.tcp.endpoints()):
            REACHED.add("established")
        frames = drain(ns, s["buf"])
        if any(f.payload for f in frames):
            REACHED.add("data")
        if any(f.flags & FIN for f in frames):
            REACHED.add("fin")
        peer.saw(frames)
        check_invariants(ns)


def test_the_stateful_fuzz_goes_deep() -> None:
    """Guard against a fuzz that only ever bounces off the handshake."""
    REACHED.clear()
    test_valid_checksum_segments()
    assert REACHED == {"established", "data", "fin"}


def test_syn_flood_is_bounded() -> None:
    ns, clock = make_ns()
    for port in range(1, 2000):
        ns.detour_frame(p.tcp_frame(port, port * 7, 0, SYN, options=p.mss_option(1460)))
        if port % 50 == 0:
            clock.advance(5.0)
        check_invariants(ns)
    frames = drain(ns)
    assert frames and len(frames) <= MAX_CONNECTIONS + MAX_PENDING_RESETS
    check_invariants(ns)

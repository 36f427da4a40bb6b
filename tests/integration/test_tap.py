"""`tap.py` against a real kernel TAP, no VM: frames both ways, offloads, and the open errors.

Each test run makes its own network namespace (`ember-test-<random>`), with
`tap0` inside it (up, 10.200.0.1/24: an address that exists only in that
namespace and is routed nowhere), and deletes the namespace afterwards even
if the test fails. The code under test runs in a child process started with
`ip netns exec` (Python 3.11 has no `os.setns`), which prints what it saw as
JSON. Needs root and /dev/net/tun; no KVM.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or shutil.which("ip") is None,
    reason="needs root, /dev/net/tun and iproute2",
)

# Runs inside the namespace. The "guest" is this process writing and reading the TAP fd;
# the "host" is the namespace's kernel, seen through an AF_PACKET socket on tap0.
HELPER = r'''
import json, select, socket, struct, time

from vmm.devices.virtio.net.header import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VNET_HDR_LEN, NetHeader, finish_checksum)
from vmm.devices.virtio.net.tap import (
    TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, NotATap, Tap, TapBusy, TapNotFound)

GUEST_MAC = bytes.fromhex("02eeeeeeee01")
GUEST_IP, HOST_IP = bytes([10, 200, 0, 2]), bytes([10, 200, 0, 1])
ETH_P_ALL, PACKET_OUTGOING = 0x0003, 4
out = {}


def wait_for(sock_or_tap, match, timeout=5.0):
    """The first frame read within `timeout` for which match(frame) holds, else None."""
    deadline = time.monotonic() + timeout
    buf = bytearray(70000)
    while (left := deadline - time.monotonic()) > 0:
        fd = sock_or_tap.fileno()
        if not select.select([fd], [], [], left)[0]:
            break
        if isinstance(sock_or_tap, Tap):
            n = sock_or_tap.read_frame(buf)
            data, incoming = bytes(buf[:n]), True
        else:
            data, addr = sock_or_tap.recvfrom(70000)
            incoming = addr[2] != PACKET_OUTGOING
        if incoming and match(data):
            return data
    return None


def is_arp_reply(p):
    """A vnet header + frame that is an ARP reply."""
    eth = p[VNET_HDR_LEN:]
    return eth[12:14] == b"\x08\x06" and eth[20:22] == b"\x00\x02"


def ones_sum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f">{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


tap = Tap.open("tap0")
out["name"] = tap.name
host_mac = bytes.fromhex(open("/sys/class/net/tap0/address").read().strip().replace(":", ""))
sniff = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
sniff.bind(("tap0", 0))

# Guest -> host: a frame written to the TAP arrives on tap0.
to_host = b"\xff" * 6 + GUEST_MAC + b"\x88\xb5" + b"EMBER-TAP guest->host".ljust(46, b"\0")
out["written"] = tap.write_frame([NetHeader().pack(), to_host])
got = wait_for(sniff, lambda f: f[12:] == to_host[12:])
out["host_got"] = got == to_host

# Host -> guest: a frame sent out of tap0 is read from the TAP, after a vnet header.
to_guest = GUEST_MAC + host_mac + b"\x88\xb5" + b"EMBER-TAP host->guest".ljust(46, b"\0")
sniff.send(to_guest)
got = wait_for(tap, lambda p: p[VNET_HDR_LEN:] == to_guest)
out["guest_got"] = got is not None
out["guest_hdr"] = list(struct.unpack("<BBHHHH", got[:10])) if got else None

# The namespace's own stack answers an ARP request written to the TAP.
arp = (b"\xff" * 6 + GUEST_MAC + b"\x08\x06" + struct.pack(">HHBBH", 1, 0x0800, 6, 4, 1)
       + GUEST_MAC + GUEST_IP + bytes(6) + HOST_IP).ljust(60, b"\0")
tap.write_frame([NetHeader().pack(), arp])
reply = wait_for(tap, is_arp_reply)
if reply:
    a = reply[VNET_HDR_LEN + 14:]
    out["arp_reply"] = {"sender_mac": a[8:14].hex(), "sender_ip": list(a[14:18]), "target_mac": a[18:24].hex()}
out["host_mac"] = host_mac.hex()


def udp_to_guest(payload):
    """A datagram from the namespace to 10.200.0.2, as read from the TAP: (header, frame)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("10.200.0.1", 0))
    s.sendto(payload, ("10.200.0.2", 9999))
    s.close()
    got = wait_for(tap, lambda p: p[VNET_HDR_LEN + 12:VNET_HDR_LEN + 14] == b"\x08\x00" and p.endswith(payload))
    return (got[:VNET_HDR_LEN], got[VNET_HDR_LEN:]) if got else (None, None)


def udp_checksum_ok(frame):
    ip = frame[14:34]
    udp = frame[34:]
    pseudo = ip[12:20] + struct.pack(">BBH", 0, 17, len(udp))
    return ones_sum(pseudo + udp) == 0xFFFF


# Without offloads the kernel finishes checksums before the guest sees them.
hdr, frame = udp_to_guest(b"no offload please")
out["plain_flags"] = NetHeader.unpack(hdr).flags if hdr else None
out["plain_csum_ok"] = udp_checksum_ok(frame) if frame else None

# With TUN_F_CSUM it may hand over a partial checksum, which finish_checksum completes.
tap.set_offload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
out["offload"] = tap.offload_flags
hdr, frame = udp_to_guest(b"partial checksum please")
if hdr:
    h = NetHeader.unpack(hdr)
    out["offload_hdr"] = [h.flags, h.csum_start, h.csum_offset]
    out["offload_csum_ok"] = udp_checksum_ok(finish_checksum(hdr, frame))

# The open errors.
for name, expected in (("tap0", TapBusy), ("embr-nosuch0", TapNotFound), ("lo", NotATap)):
    try:
        Tap.open(name).close()
        out[f"open_{name}"] = "opened"
    except expected as exc:
        out[f"open_{name}"] = str(exc)
try:
    socket.if_nametoindex("embr-nosuch0")
    out["nosuch_created"] = True
except OSError:
    out["nosuch_created"] = False
tap.close()

# The whole device on the real TAP: a driver-side ring in guest memory, every offered feature
# negotiated (MRG_RXBUF, offloads); the guest ARPs for the host and receives the answer.
from tests.unit.devices.virtio.mock import Arena, Buf, MmioDriver, VirtQueue, new_interrupt
from vmm.config.net import MacAddr, NetworkInterfaceConfig
from vmm.devices.virtio.net import Net
from vmm.devices.virtio.transport import MmioTransport
from vmm.memory import GuestMemory

mem = GuestMemory.anonymous([(0, 4 << 20)])
net = Net.from_config(NetworkInterfaceConfig("eth0", "tap0", MacAddr(GUEST_MAC)))
irq, edges = new_interrupt()
driver = MmioDriver(MmioTransport(net, mem, interrupt=irq))
rxq, txq = VirtQueue(mem, 0x1000, 16), VirtQueue(mem, 0x8000, 16)
driver.init({0: rxq, 1: txq})
out["device_offload"] = net.tap.offload_flags
arena = Arena(mem, 0x10_0000, 4 << 20)
rx_bufs = {}
for _ in range(8):
    buf = Buf(arena.alloc(2048), 2048, True)
    rx_bufs[rxq.add_chain([buf])] = buf
driver.notify(0)
hdr_addr, frame_addr = arena.alloc(12), arena.alloc(len(arp))
mem.write(hdr_addr, bytes(12))
mem.write(frame_addr, arp)
txq.add_chain([Buf(hdr_addr, 12), Buf(frame_addr, len(arp))])
driver.notify(1)
out["device_tx_used"] = txq.take_used()
deadline, answer = time.monotonic() + 5, None
while answer is None and time.monotonic() < deadline:
    if select.select([net.tap.fileno()], [], [], 0.2)[0]:
        net.on_tap_readable()
    for head, n in rxq.take_used():
        data = mem.read(rx_bufs[head].addr, n)
        if is_arp_reply(data):
            answer = data
if answer is not None:
    out["device_rx_num_buffers"] = NetHeader.unpack(answer).num_buffers
    out["device_arp_sender_ip"] = list(answer[VNET_HDR_LEN + 28:VNET_HDR_LEN + 32])
out["device_irqs"] = edges.count
out["device_tx_packets"] = net.metrics.tx_packets_count
net.close()
print(json.dumps(out))
'''


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def tap_namespace() -> Iterator[str]:
    """A fresh network namespace with an up `tap0` at 10.200.0.1/24; deleted on the way out, whatever happens."""
    name = f"ember-test-{secrets.token_hex(4)}"
    _ip("netns", "add", name)
    try:
        _ip("netns", "exec", name, "ip", "tuntap", "add", "dev", "tap0", "mode", "tap")
        # Quiet the TAP (no IPv6 router solicitations); not fatal where IPv6 is off.
        _ip("netns", "exec", name, "sysctl", "-qw", "net.ipv6.conf.tap0.disable_ipv6=1", check=False)
        _ip("netns", "exec", name, "ip", "link", "set", "tap0", "up")
        _ip("netns", "exec", name, "ip", "addr", "add", "10.200.0.1/24", "dev", "tap0")
        yield name
    finally:
        _ip("netns", "del", name, check=False)


@pytest.fixture(scope="module")
def out() -> dict:
    """What the helper saw, run once in a fresh namespace."""
    with tap_namespace() as ns:
        return run_helper(ns)


def run_helper(ns: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", HELPER], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_frames_cross_a_real_tap_both_ways(out):
    assert out["name"] == "tap0"
    assert out["written"] == 12 + 60
    assert out["host_got"] is True
    assert out["guest_got"] is True
    assert out["guest_hdr"] == [0, 0, 0, 0, 0, 0]  # no offloads: flags, gso, lengths all zero
    assert out["arp_reply"] == {"sender_mac": out["host_mac"], "sender_ip": [10, 200, 0, 1],
                                "target_mac": "02eeeeeeee01"}


def test_offloads_follow_tunsetoffload(out):
    assert out["plain_flags"] == 0 and out["plain_csum_ok"] is True
    assert out["offload"] == 0x07
    flags, csum_start, csum_offset = out["offload_hdr"]
    assert flags & 1, "the kernel handed over a complete checksum despite TUN_F_CSUM"
    assert (csum_start, csum_offset) == (34, 6)  # UDP's checksum field, after Ethernet + IPv4
    assert out["offload_csum_ok"] is True


def test_the_device_talks_to_the_kernel_through_the_tap(out):
    assert out["device_offload"] == 0x17  # CSUM | TSO4 | TSO6 | UFO: the guest took every offload
    assert out["device_tx_used"] == [[0, 0]]
    assert out["device_tx_packets"] == 1
    assert out["device_arp_sender_ip"] == [10, 200, 0, 1]
    assert out["device_rx_num_buffers"] == 1
    assert out["device_irqs"] >= 2


def test_open_errors_are_clear_and_nothing_is_created(out):
    assert out["open_tap0"].startswith("cannot open TAP tap0: it is attached to another file descriptor")
    assert out["open_embr-nosuch0"].startswith("cannot open TAP embr-nosuch0: no such network interface")
    assert out["open_lo"].startswith("cannot open TAP lo:") and "not a TAP" in out["open_lo"]
    assert out["nosuch_created"] is False


def test_the_namespace_is_deleted_even_when_the_test_fails():
    seen = []
    with pytest.raises(RuntimeError, match="boom"):
        with tap_namespace() as ns:
            seen.append(ns)
            assert ns in _ip("netns", "list").stdout
            raise RuntimeError("boom")
    assert seen and seen[0] not in _ip("netns", "list").stdout

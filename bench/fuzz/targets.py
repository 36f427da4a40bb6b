"""The fuzz targets: each one a `Harness` over a parser or device that reads untrusted bytes.

| target     | family    | code under test                                     | may raise (documented)              |
|------------|-----------|-----------------------------------------------------|-------------------------------------|
| virtqueue  | virtqueue | `Queue.pop`/`DescriptorChain` over hostile rings,   | DescriptorChainError,               |
|            |           | `add_used`, `needs_notification`, `Queue.from_state`| QueueStateInvalid                   |
| block      | devices   | `parse_request` on every chain, then the whole      | DescriptorChainError, RequestError  |
|            |           | `Block` device through virtio-mmio (must not raise) | (the device: nothing)               |
| net        | devices   | `check_tx_header`/`check_rx_header`, then `Net`     | HeaderError (the device: nothing)   |
|            |           | TX + RX (TAP on a socketpair, MMDS attached)        |                                     |
| vsock      | devices   | `parse_tx_packet`/`parse_rx_buffer`, then `Vsock`   | DescriptorChainError, PacketError   |
|            |           | with its muxer and a host listener                  | (the device: nothing)               |
| snapshot   | snapshot  | `decode_state` (whole file), `decode_value` +       | SnapshotFormatError, SnapshotLoad-  |
|            |           | `MicrovmState.from_tree`, tree mutations of a real  | Error's causes (StateTreeError, ...)|
|            |           | state file                                          |                                     |
| mmds       | mmds      | `MmdsHttp.next_exchange` (V1/V2), `TokenAuthority`, | MmdsError, MmdsTokenError           |
|            |           | `MmdsNetworkStack.detour_frame`, the data store     | (HTTP and the stack: nothing)       |
| api        | api       | `ApiHandler` (routes + a real `VmmController`) and  | nothing: every answer < 500 and a   |
|            |           | the `ApiServer` HTTP parser on a real Unix socket   | 4xx carries `fault_message`         |

Every target builds its objects in `make_<name>()` (imports included), so
atheris can instrument the modules as they are imported. `TARGETS` maps
names to makers, `FAMILIES` names to the targets in each family.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import socket
import struct
import tempfile
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

from .engine import Harness

__all__ = ["TARGETS", "FAMILIES", "make", "HarnessBug"]

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"


class HarnessBug(AssertionError):
    """An invariant the code under test promises did not hold (reported as a crash)."""

    def __init__(self, message: str, signature: str | None = None) -> None:
        super().__init__(message)
        if signature is not None:
            self.fuzz_signature = signature


# --- virtqueue --------------------------------------------------------------------------------


class VirtqueueHarness:
    """Hostile rings under `Queue`: pop every chain, walk it, complete it, decide on interrupts.

    Input: the `guest` control block (flags bit 0 EVENT_IDX, bit 1 indirect,
    bit 2: 4 extra bytes give next_avail/next_used start values) and image.
    The last 40 bytes also drive a `Queue.from_state` round.
    """

    name = "virtqueue"

    def __init__(self) -> None:
        from vmm.devices.virtio import queue as q

        from . import guest as g

        self.q, self.g = q, g
        self.guest = g.FuzzGuest()
        self.allowed = (q.DescriptorChainError, q.QueueStateInvalid)

    def seeds(self) -> list[bytes]:
        g = self.g
        out = []
        for flags in (0, 1, 2, 3):
            b = g.ImageBuilder(flags=flags)
            for n in (1, 2, 3):
                bufs = [(b.buffer(bytes(64)), 64, i == n - 1) for i in range(n)]
                b.chain(0, bufs)
            if flags & 2:  # an indirect table of two buffers
                table = b.buffer(struct.pack("<QIHHQIHH", 0x700, 32, 1, 1, 0x800, 32, 2, 0))
                off = 16 * 6
                b.image[off:off + 16] = struct.pack("<QIHH", table, 32, 4, 0)
                b.image[0x100 + 4 + 6:0x100 + 4 + 8] = struct.pack("<H", 6)
                b.image[0x102:0x104] = struct.pack("<H", 4)
            out.append(b.build())
        return out

    def one_input(self, data: bytes) -> Hashable:
        q, g = self.q, self.g
        control = g.Control.parse(data)
        image = data[g.CONTROL_SIZE:]
        self.guest.load(image)
        mem = self.guest.mem
        queue = self.guest.raw_queue(0, control, event_idx=bool(control.flags & 1),
                                     indirect=bool(control.flags & 2))
        if control.flags & 4 and len(image) >= 4:
            queue.next_avail, queue.next_used = struct.unpack_from("<HH", image, len(image) - 4)
        outcome: list[str] = []
        if queue.is_valid(mem):
            pops = 0
            while (chain := queue.pop(mem)) is not None:
                pops += 1
                if pops > queue.size:
                    raise HarnessBug(f"pop returned {pops} chains from a ring of {queue.size}")
                try:
                    descs = chain.descriptors()
                except q.DescriptorChainError as exc:
                    outcome.append(type(exc).__name__)
                    queue.add_used(mem, chain.head_index, 0)
                    continue
                if not 0 < len(descs) <= queue.size:
                    raise HarnessBug(f"a chain of {len(descs)} descriptors from a ring of {queue.size}")
                for d in descs:
                    if d.length == 0 or not mem.check_range(d.addr, d.length):
                        raise HarnessBug(f"descriptor {d} escapes guest memory")
                written = sum(d.length for d in descs if d.is_write_only)
                queue.add_used(mem, chain.head_index, written)
                outcome.append(f"ok{len(descs)}")
            queue.needs_notification(mem)
            outcome.append("broken" if queue.broken else "")
        else:
            outcome.append("invalid")
        self._state_round(image[-40:])
        return tuple(outcome[:6])

    def _state_round(self, raw: bytes) -> None:
        q = self.q
        raw = raw.ljust(40, b"\0")
        max_exp, size, ready, desc, avail, used, na, nu, added, broken = struct.unpack("<BHBQQQHHHB", raw[:35])
        state = q.QueueState(max_size=1 << (max_exp % 17), size=size, ready=bool(ready & 1),
                             desc_table=desc, avail_ring=avail, used_ring=used, next_avail=na, next_used=nu,
                             num_added=added, broken=bool(broken & 1))
        restored = q.Queue.from_state(state)
        if restored.state() != state:
            raise HarnessBug("Queue.from_state(state).state() != state")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    def close(self) -> None:
        self.guest.close()


# --- devices --------------------------------------------------------------------------------


class _DeviceHarness:
    """Shared: a parse pass over raw queues (documented errors only), then the device via MMIO."""

    name = "device"
    queues = 1

    def __init__(self) -> None:
        from vmm.devices.virtio import VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC
        from vmm.devices.virtio import queue as q

        from . import guest as g

        self.q, self.g = q, g
        self.guest = g.FuzzGuest()
        self._event_bit = 1 << VIRTIO_RING_F_EVENT_IDX
        self._indirect_bit = 1 << VIRTIO_RING_F_INDIRECT_DESC
        self.tmp = Path(tempfile.mkdtemp(prefix="emberfz"))

    def chains(self, control: Any, index: int) -> list[list[Any]]:
        """Walk queue `index`'s available chains with a raw Queue; chain errors are documented."""
        queue = self.guest.raw_queue(index, control, event_idx=bool(control.feature_mask & self._event_bit),
                                     indirect=bool(control.feature_mask & self._indirect_bit))
        out: list[list[Any]] = []
        if not queue.is_valid(self.guest.mem):
            return out
        while (chain := queue.pop(self.guest.mem)) is not None:
            try:
                out.append(chain.descriptors())
            except self.q.DescriptorChainError:
                continue
        return out

    def split(self, data: bytes) -> tuple[Any, bytes, bytes]:
        g = self.g
        control = g.Control.parse(data)
        body = data[g.CONTROL_SIZE:]
        host = body[len(body) - control.host_len:] if control.host_len else b""
        return control, body, host

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    def close(self) -> None:
        self.guest.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


class BlockHarness(_DeviceHarness):
    """virtio-blk: `parse_request` over each chain, then the `Block` device on a 64-sector file.

    Control flags bit 0: the read-only variant of the device.
    """

    name = "block"
    DISK_SECTORS = 64

    def __init__(self) -> None:
        super().__init__()
        from vmm.devices.virtio.block import Block, RequestError, parse_request

        from .guest import new_transport

        self.parse_request = parse_request
        self.allowed = (self.q.DescriptorChainError, RequestError)
        disk = self.tmp / "disk.img"
        disk.write_bytes(bytes(range(256)) * (self.DISK_SECTORS * 2))
        self.disk = disk
        self.devices = [Block("fuzz", str(disk), read_only=ro, queue_size=self.g.MAX_QUEUE) for ro in (False, True)]
        self.transports = [new_transport(d, self.guest) for d in self.devices]

    def seeds(self) -> list[bytes]:
        g = self.g
        out = []
        for rtype, sector, data_len, writable in ((0, 0, 512, True), (1, 3, 1024, False), (4, 0, 0, False),
                                                   (8, 0, 20, True), (0, 63, 512, True), (1, 0, 4096, False)):
            for flags in (0, 1):
                b = g.ImageBuilder(flags=flags)
                for _ in range(2):
                    hdr = b.buffer(struct.pack("<IIQ", rtype, 0, sector))
                    bufs = [(hdr, 16, False)]
                    if data_len:
                        bufs.append((b.buffer(b"\xab" * data_len, align=512), data_len, writable))
                    bufs.append((b.buffer(b"\xee"), 1, True))
                    b.chain(0, bufs)
                out.append(b.build())
        return out

    def one_input(self, data: bytes) -> Hashable:
        control, body, _ = self.split(data)
        self.guest.load(body)
        device = self.devices[control.flags & 1]
        outcome = []
        for descs in self.chains(control, 0):
            try:
                req = self.parse_request(descs, self.guest.mem, device.capacity, seg_max=device.seg_max,
                                         size_max=device.size_max)
                outcome.append(req.type.name)
            except self.allowed[1] as exc:
                outcome.append(type(exc).__name__)
        self.guest.load(body)
        transport = self.transports[control.flags & 1]
        if self.guest.bring_up(transport, 1, control):
            self.g.FuzzGuest.notify(transport, 0)
            outcome.append("live")
        if device.capacity != self.DISK_SECTORS:
            raise HarnessBug(f"the disk changed size: {device.capacity} sectors")
        return tuple(outcome[:4]) + (("live",) if "live" in outcome else ())

    def close(self) -> None:
        for d in self.devices:
            d.close() if hasattr(d, "close") else d.backend.close()
        super().close()


class _SeqpacketTap:
    """A TAP stand-in on an AF_UNIX SOCK_SEQPACKET socketpair (frame boundaries kept, as a TAP)."""

    def __init__(self) -> None:
        self.end, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (self.end, self.peer):
            s.setblocking(False)

    @property
    def name(self) -> str:
        return "fuzztap0"

    def fileno(self) -> int:
        return self.end.fileno()

    def read_frame(self, buf: bytearray | memoryview) -> int:
        return os.readv(self.end.fileno(), [buf])

    def write_frame(self, parts: Any) -> int:
        return os.writev(self.end.fileno(), parts)

    def set_offload(self, flags: int) -> None:
        pass

    def drain(self) -> int:
        n = 0
        while True:
            try:
                self.peer.recv(70000)
                n += 1
            except BlockingIOError:
                return n

    def close(self) -> None:
        self.end.close()
        self.peer.close()


class NetHarness(_DeviceHarness):
    """virtio-net: header checks on every TX chain, then `Net` TX and RX with MMDS attached.

    Control: flags bit 0 offers a checksum/GSO policy to the header checks;
    the last `host_len` bytes are a frame (with vnet header) the host sends.
    """

    name = "net"

    def __init__(self) -> None:
        super().__init__()
        from vmm.config.net import MacAddr
        from vmm.devices.virtio.net import Net, header
        from vmm.mmds import MmdsNetworkStack, MmdsStore

        from .guest import new_transport

        self.header = header
        self.allowed = (header.HeaderError,)
        self.now = [1000.0]
        clock = lambda: self.now[0]  # noqa: E731
        store = MmdsStore(clock=clock)
        store.put({"latest": {"meta-data": {"ami-id": "ami-1234", "x": "y" * 100}}})
        self.tap = _SeqpacketTap()
        self.net = Net("eth0", self.tap, guest_mac=MacAddr(bytes.fromhex("06000ac00002")), queue_size=self.g.MAX_QUEUE)
        self.net.set_mmds(MmdsNetworkStack(store, clock=clock))
        self.transport = new_transport(self.net, self.guest)
        self.policies = [header.OffloadPolicy(), header.OffloadPolicy(csum=True, gso_types=frozenset({1, 3, 4}))]

    def seeds(self) -> list[bytes]:
        from vmm.mmds import pdu

        g = self.g
        guest_mac, mmds_mac = bytes.fromhex("06000ac00002"), bytes.fromhex("060123456701")
        gip, mip = ipaddress.IPv4Address("10.0.0.2"), ipaddress.IPv4Address("169.254.169.254")
        arp = pdu.build_ethernet(b"\xff" * 6, guest_mac, 0x0806, pdu.ArpPacket(
            1, pdu.MacAddr(guest_mac), gip, pdu.MacAddr(bytes(6)), mip).to_bytes())
        syn = pdu.build_ethernet(mmds_mac, guest_mac, 0x0800, pdu.build_ipv4(
            gip, mip, 6, pdu.build_tcp(gip, mip, 40000, 80, 1000, 0, pdu.TcpFlags.SYN, 65535, mss=1460), ttl=64))
        get = b"GET /latest/meta-data/ami-id HTTP/1.1\r\nHost: x\r\n\r\n"
        data = pdu.build_ethernet(mmds_mac, guest_mac, 0x0800, pdu.build_ipv4(
            gip, mip, 6, pdu.build_tcp(gip, mip, 40000, 80, 1001, 1, pdu.TcpFlags.ACK | pdu.TcpFlags.PSH, 65535,
                                       get), ttl=64))
        plain = b"\xff" * 6 + guest_mac + b"\x88\xb5" + b"hello fuzz"
        vhdr = bytes(12)
        csum_hdr = struct.pack("<BBHHHHH", 1, 0, 0, 0, 34, 16, 0)
        out = []
        for frames in ((arp, syn, data), (plain,), (plain, arp)):
            for flags, host in ((0, b""), (1, vhdr + plain), (0, csum_hdr + syn)):
                b = g.ImageBuilder(flags=flags, host=host)
                for frame in frames:
                    pkt = (csum_hdr if flags and frame is syn else vhdr) + frame
                    b.chain(1, [(b.buffer(pkt), len(pkt), False)])
                for _ in range(3):
                    b.chain(0, [(b.buffer(bytes(1526)), 1526, True)])
                out.append(b.build())
        return out

    def one_input(self, data: bytes) -> Hashable:
        control, body, host = self.split(data)
        self.guest.load(body)
        policy = self.policies[control.flags & 1]
        outcome = []
        for descs in self.chains(control, 1):
            packet = b"".join(self.guest.mem.read(d.addr, d.length) for d in descs if not d.is_write_only)
            for check in (lambda p: self.header.check_tx_header(p, policy),
                          lambda p: self.header.check_rx_header(p, policy, 1)):
                try:
                    hdr = check(packet)
                    self.header.finish_checksum(hdr, packet[len(hdr):])
                    outcome.append("ok")
                except self.allowed[0] as exc:
                    outcome.append(type(exc).__name__)
        self.guest.load(body)
        self.now[0] += 1.0
        if self.guest.bring_up(self.transport, 2, control):
            self.g.FuzzGuest.notify(self.transport, 1)
            if host:
                try:
                    self.tap.peer.send(host)
                except OSError:
                    pass
            self.g.FuzzGuest.notify(self.transport, 0)
            self.net.on_tap_readable()
            outcome.append("live")
        self.tap.drain()
        return tuple(outcome[:4]) + (("live",) if "live" in outcome else ())

    def close(self) -> None:
        self.net.close()
        super().close()


class VsockHarness(_DeviceHarness):
    """virtio-vsock: packet parsing on every chain, then `Vsock` with its muxer and a host listener.

    Host port 1234 has a listener (connections from the guest succeed);
    the last `host_len` bytes are written into every accepted connection.
    """

    name = "vsock"
    queues = 3

    def __init__(self) -> None:
        super().__init__()
        from vmm.devices.virtio.vsock import Vsock, packet

        from .guest import new_transport

        self.packet = packet
        self.allowed = (self.q.DescriptorChainError, packet.PacketError)
        uds = str(self.tmp / "v.sock")
        self.vsock = Vsock(3, uds)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(f"{uds}_1234")
        self.listener.listen(64)
        self.listener.setblocking(False)
        self.transport = new_transport(self.vsock, self.guest)

    def seeds(self) -> list[bytes]:
        g, p = self.g, self.packet
        hdr = lambda op, length=0, flags=0: p.PacketHeader(  # noqa: E731
            src_cid=3, dst_cid=2, src_port=1000, dst_port=1234, len=length, type=1, op=op, flags=flags,
            buf_alloc=65536, fwd_cnt=0).pack()
        out = []
        scripts = [
            [hdr(p.VIRTIO_VSOCK_OP_REQUEST)],
            [hdr(p.VIRTIO_VSOCK_OP_REQUEST), hdr(p.VIRTIO_VSOCK_OP_RW, 5) + b"hello"],
            [hdr(p.VIRTIO_VSOCK_OP_REQUEST), hdr(p.VIRTIO_VSOCK_OP_CREDIT_REQUEST),
             hdr(p.VIRTIO_VSOCK_OP_SHUTDOWN, 0, 3), hdr(p.VIRTIO_VSOCK_OP_RST)],
            [hdr(p.VIRTIO_VSOCK_OP_RW, 4) + b"data"],
        ]
        for script in scripts:
            for split, host in ((False, b""), (True, b"host says hi\n")):
                b = g.ImageBuilder(host=host)
                for pkt in script:
                    if split and len(pkt) > 44:
                        b.chain(1, [(b.buffer(pkt[:44]), 44, False), (b.buffer(pkt[44:]), len(pkt) - 44, False)])
                    else:
                        b.chain(1, [(b.buffer(pkt), len(pkt), False)])
                for _ in range(4):
                    b.chain(0, [(b.buffer(bytes(300)), 300, True)])
                b.chain(2, [(b.buffer(bytes(8)), 8, True)])
                out.append(b.build())
        return out

    def one_input(self, data: bytes) -> Hashable:
        control, body, host = self.split(data)
        self.guest.load(body)
        outcome = []
        for descs in self.chains(control, 1):
            try:
                outcome.append(self.packet.parse_tx_packet(descs, self.guest.mem).header.op)
            except self.packet.PacketError as exc:
                outcome.append(type(exc).__name__)
        for descs in self.chains(control, 0):
            try:
                self.packet.parse_rx_buffer(descs)
            except self.packet.PacketError as exc:
                outcome.append(type(exc).__name__)
        self.guest.load(body)
        if self.guest.bring_up(self.transport, 3, control):
            self.g.FuzzGuest.notify(self.transport, 1)
            accepted = self._accept()
            for s in accepted:
                if host:
                    try:
                        s.send(host)
                    except OSError:
                        pass
            self.vsock.on_host_events()
            self.g.FuzzGuest.notify(self.transport, 0)
            self.g.FuzzGuest.notify(self.transport, 2)
            for s in accepted:
                s.close()
            self.vsock.on_host_events()
            outcome.append("live")
        return tuple(str(o) for o in outcome[:4]) + (("live",) if "live" in outcome else ())

    def _accept(self) -> list[socket.socket]:
        out = []
        while len(out) < 64:
            try:
                s, _ = self.listener.accept()
            except BlockingIOError:
                break
            s.setblocking(False)
            out.append(s)
        return out

    def close(self) -> None:
        self.vsock.close()
        self.listener.close()
        super().close()


# --- snapshot state file ----------------------------------------------------------------------


class SnapshotHarness:
    """The state file as untrusted input.

    First byte selects: 0 the whole file (`decode_state`: header, checksum,
    payload) then `MicrovmState.from_tree`; 1 a bare payload (`decode_value`,
    checksum skipped) then `from_tree`; 2 a mutation script applied to the
    tree of a real state file (bench/fuzz/corpus/microvm.state) then
    `from_tree`. Allowed: what `MicrovmState.read` turns into
    SnapshotLoadError.
    """

    name = "snapshot"

    def __init__(self) -> None:
        from snapshot import format as fmt
        from vmm import persist
        from vmm.config import ConfigError
        from vmm.state_tree import StateTreeError
        from vmm.vstate.persist import VstatePersistError

        self.fmt, self.persist = fmt, persist
        self.allowed = (fmt.SnapshotFormatError, StateTreeError, VstatePersistError, ConfigError, ValueError)
        self.seed_file = (CORPUS_DIR / "microvm.state").read_bytes()
        self.tree = fmt.decode_state(self.seed_file)
        self._paths = list(self._walk(self.tree, ()))

    def _walk(self, node: Any, path: tuple) -> Any:
        yield path
        if isinstance(node, dict):
            for k, v in node.items():
                yield from self._walk(v, path + (k,))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield from self._walk(v, path + (i,))

    def seeds(self) -> list[bytes]:
        payload = self.seed_file[56:]
        return [b"\x00" + self.seed_file, b"\x01" + payload, b"\x02" + bytes(range(64)),
                b"\x02" + bytes([7, 3, 0, 0]) * 8, b"\x01" + self.fmt.encode_value({"a": [1, -2, b"x", None]})]

    def one_input(self, data: bytes) -> Hashable:
        if not data:
            return "empty"
        mode, rest = data[0] % 3, data[1:]
        if mode == 0:
            tree = self.fmt.decode_state(rest)
        elif mode == 1:
            tree = self.fmt.decode_value(rest)
        else:
            tree = self._mutate(rest)
        state = self.persist.MicrovmState.from_tree(tree)
        return ("state", mode, len(state.virtio))

    def _mutate(self, script: bytes) -> Any:
        """Apply (path, replacement) edits to a copy of the real tree, 4 bytes an edit (at most 64)."""
        tree = dict(self.tree)  # copy-on-write: containers on an edited path are copied, the rest shared
        paths = self._paths
        for i in range(0, min(len(script), 256) - 3, 4):
            idx, kind, arg = struct.unpack_from("<HBB", script, i)
            path = paths[idx % len(paths)]
            if not path:
                continue
            parent: Any = tree
            try:
                for key in path[:-1]:
                    child = parent[key]
                    if not isinstance(child, (dict, list)):
                        raise TypeError("an earlier edit changed the shape")
                    parent[key] = child = type(child)(child)
                    parent = child
                old = parent[path[-1]]
            except (KeyError, IndexError, TypeError):
                continue
            parent[path[-1]] = _replacement(kind, arg, old)
        return tree

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    def close(self) -> None:
        pass


_INTS = (0, 1, -1, 2, 255, 256, 4095, 4096, 0xFFFF, 0x10000, 0xFFFF_FFFF, 1 << 32, (1 << 63) - 1, 1 << 63,
         (1 << 64) - 1, -(1 << 63), -(1 << 64))


def _replacement(kind: int, arg: int, old: Any) -> Any:
    """A hostile value for one node of a state tree (kind picks the shape, arg the value)."""
    k = kind % 12
    if k == 0:
        return _INTS[arg % len(_INTS)]
    if k == 1:
        return None
    if k == 2:
        return bool(arg & 1)
    if k == 3:
        return bytes([arg]) * (arg % 9) if arg % 5 else b""
    if k == 4:
        return ["", "full", "diff", "block", "net", "vsock", "x" * 300, "\udcff", "1.0", "{}"][arg % 10]
    if k == 5:
        return []
    if k == 6:
        return {}
    if k == 7 and isinstance(old, int) and not isinstance(old, bool):
        return old + (arg - 128)
    if k == 8 and isinstance(old, (bytes, str, list)):
        return old[: arg % (len(old) + 1)]
    if k == 9 and isinstance(old, (bytes, str, list)) and len(old) <= 8192:
        return old * 2
    if k == 10 and isinstance(old, dict) and old:
        d = dict(old)
        d.pop(sorted(d)[arg % len(d)])
        return d
    if k == 11 and isinstance(old, dict):
        return {**old, f"extra{arg}": arg}
    return old


# --- MMDS ---------------------------------------------------------------------------------------


class MmdsHarness:
    """The guest-facing MMDS: HTTP requests, session tokens, the dumbo stack, the data store.

    First byte selects: 0 HTTP (V1), 1 HTTP (V2, a valid token for
    ``X-metadata-token: @``), 2 token checks, 3 Ethernet frames (u16 length
    prefixed) through `MmdsNetworkStack`, 4 data store put/patch/get_path.
    """

    name = "mmds"

    def __init__(self) -> None:
        from vmm.mmds import MmdsError, MmdsNetworkStack, MmdsStore, MmdsVersion
        from vmm.mmds.http import MmdsHttp
        from vmm.mmds.token import MmdsTokenError, TokenAuthority

        self.allowed = (MmdsError, MmdsTokenError)
        self.now = [1000.0]
        clock = lambda: self.now[0]  # noqa: E731
        self.data = {"latest": {"meta-data": {"ami-id": "ami-12345678", "list": [1, "two", {"3": 4}],
                                              "nested": {"a": {"b": "c"}}, "blob": "b" * 2000}}}
        self.stores = []
        for version in (MmdsVersion.V1, MmdsVersion.V2):
            s = MmdsStore(version=version, clock=clock)
            s.put(self.data)
            self.stores.append(s)
        self.token = self.stores[1].generate_token(60)
        self.http = [MmdsHttp(s) for s in self.stores]
        self.authority = TokenAuthority(clock, key=bytes(32))
        self.good_token = self.authority.generate(100)
        self.MmdsNetworkStack, self.MmdsStore, self.clock = MmdsNetworkStack, MmdsStore, clock
        self.ns = MmdsNetworkStack(self.stores[0], clock=clock)
        self.inputs = 0

    def seeds(self) -> list[bytes]:
        from vmm.mmds import pdu

        reqs = [b"GET /latest/meta-data/ami-id HTTP/1.1\r\nHost: x\r\n\r\n",
                b"GET /latest/meta-data/ HTTP/1.1\r\nAccept: application/json\r\n\r\n",
                b"PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n",
                b"GET /latest/meta-data/list/2 HTTP/1.1\r\nX-metadata-token: @\r\n\r\n"
                b"GET / HTTP/1.0\r\n\r\n",
                b"PATCH /x HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /latest HTTP/1.1\r\n\r\n"]
        out = [bytes([m]) + r for r in reqs for m in (0, 1)]
        out += [b"\x02" + self.good_token.encode(), b"\x02" + b"A" * 60, b"\x02\xff\x00"]
        guest_mac = bytes.fromhex("06000ac00002")
        mmds_mac = bytes.fromhex("060123456701")
        gip, mip = ipaddress.IPv4Address("10.0.0.2"), ipaddress.IPv4Address("169.254.169.254")
        arp = pdu.build_ethernet(b"\xff" * 6, guest_mac, 0x0806, pdu.ArpPacket(
            1, pdu.MacAddr(guest_mac), gip, pdu.MacAddr(bytes(6)), mip).to_bytes())

        def tcp(seq: int, ack: int, flags: Any, payload: bytes = b"", mss: int | None = None) -> bytes:
            return pdu.build_ethernet(mmds_mac, guest_mac, 0x0800, pdu.build_ipv4(
                gip, mip, 6, pdu.build_tcp(gip, mip, 40000, 80, seq, ack, flags, 65535, payload, mss=mss), ttl=64))

        F = pdu.TcpFlags
        frames = [arp, tcp(1000, 0, F.SYN, mss=1460), tcp(1001, 1, F.ACK),
                  tcp(1001, 1, F.ACK | F.PSH, reqs[0]), tcp(1001 + len(reqs[0]), 1, F.ACK | F.FIN)]
        out.append(b"\x03" + b"".join(struct.pack("<H", len(f)) + f for f in frames))
        out.append(b"\x03" + struct.pack("<H", len(frames[1])) + frames[1])
        out += [b"\x04" + json.dumps({"latest": {"x": [1, 2]}}).encode() + b"\0/latest/x/1",
                b"\x04" + b'{"a": null}' + b"\0/a"]
        return out

    def one_input(self, data: bytes) -> Hashable:
        if not data:
            return "empty"
        mode, rest = data[0] % 5, data[1:]
        self.now[0] += 0.5
        if mode in (0, 1):
            http = self.http[mode]
            stream = rest.replace(b"@", self.token.encode()) if mode == 1 else rest
            statuses = []
            for _ in range(64):
                exchange = http.next_exchange(stream)
                if exchange is None:
                    break
                if not exchange.response.startswith(b"HTTP/1.1 "):
                    raise HarnessBug(f"a response that is not HTTP/1.1: {exchange.response[:40]!r}")
                statuses.append(exchange.response[9:12])
                if exchange.close or exchange.consumed == 0:
                    break
                stream = stream[exchange.consumed:]
            return ("http", mode, tuple(statuses[:3]))
        if mode == 2:
            text = rest.decode("utf-8", "surrogateescape")
            valid = self.authority.is_valid(text)
            if len(rest) >= 2:
                self.authority.generate(struct.unpack_from("<h", rest)[0])
            return ("token", valid)
        if mode == 3:
            self.inputs += 1
            if self.inputs % 64 == 0:  # a fresh stack now and then: state does not pile up forever
                self.ns = self.MmdsNetworkStack(self.stores[0], clock=self.clock)
            out = 0
            i = 0
            while i + 2 <= len(rest):
                (n,) = struct.unpack_from("<H", rest, i)
                frame = rest[i + 2:i + 2 + n]
                i += 2 + n
                self.ns.detour_frame(frame, csum_partial=bool(n & 0x8000))
                for _ in range(1000):
                    reply = self.ns.write_next_frame(1514 if n & 1 else 60)
                    if reply is None:
                        break
                    out += 1
                    if len(reply) > (1514 if n & 1 else 60):
                        raise HarnessBug(f"write_next_frame gave {len(reply)} bytes for a smaller buffer")
                else:
                    raise HarnessBug("write_next_frame never ran dry")
                self.now[0] += 0.1
            if self.ns.metrics.internal_errors:
                raise HarnessBug("the MMDS stack counted an internal error",
                                 "MMDS internal_errors counter moved")
            return ("ns", min(out, 4))
        doc, _, path = rest.partition(b"\0")
        try:
            obj = json.loads(doc)
        except (ValueError, RecursionError):
            return "badjson"
        store = self.MmdsStore(size_limit=4096, clock=self.clock)
        if isinstance(obj, dict):
            store.put(obj)
            store.patch(obj)
        else:
            store.put(obj)  # not an object: the store refuses with NotAJsonObject
        store.get_path(path.decode("utf-8", "replace"))
        return "store"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    def close(self) -> None:
        pass


# --- the API ----------------------------------------------------------------------------------

# Actions the in-process API target answers without executing: they open files, sockets or
# TAP devices at paths the fuzzer chose, or need a VMM (the schemathesis run covers them live).
_SIDE_EFFECT_ACTIONS = ("ConfigureLogger", "ConfigureMetrics", "InsertNetworkDevice", "SetVsockDevice",
                        "LoadSnapshot", "CreateSnapshot", "FlushMetrics", "SetEntropyDevice")
_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


class ApiServerError500(HarnessBug):
    """The API answered 5xx (or a 4xx without fault_message)."""


class ApiHarness:
    """The API: request parsing and routing to a real controller, and the HTTP server.

    First byte selects: 0 a request given as ``METHOD path\\nbody`` to
    `ApiHandler` over a real `VmmController` (boot refused); 1 raw bytes to
    the real `ApiServer` (its own thread, a Unix socket), every response
    read back and checked. Nothing may be raised; every answer must be
    < 500 and a 4xx must carry ``fault_message``.
    """

    name = "api"
    allowed: tuple[type[BaseException], ...] = ()

    def __init__(self) -> None:
        from vmm.api import VmmController
        from vmm.api.actions import ApiOk
        from vmm.api.handler import ApiHandler
        from vmm.api.server import ApiServer
        from vmm.builder import BuildError
        from vmm.metrics import Metrics

        self.ApiOk = ApiOk
        self._count = 0

        def refuse_boot(config: Any) -> Any:
            raise BuildError("boot is disabled in the fuzz harness")

        def new_controller() -> Any:
            return VmmController(boot=refuse_boot, instance_id="fuzz", metrics=Metrics("fuzz"))

        self.new_controller = new_controller
        self.controller = new_controller()

        def dispatch(action: Any) -> Any:
            if type(action).__name__ in _SIDE_EFFECT_ACTIONS:
                return ApiOk()
            return self.controller.handle(action)

        self.handler = ApiHandler(dispatch, Metrics("fuzz"))
        self.tmp = tempfile.mkdtemp(prefix="emberfz")
        self.sock_path = os.path.join(self.tmp, "api.sock")
        self.server = ApiServer(self.sock_path, self.handler, request_timeout=2.0, linger=0.05)
        self.server.start()

    def seeds(self) -> list[bytes]:
        reqs = [(b"GET", b"/", b""), (b"PUT", b"/machine-config", b'{"vcpu_count": 2, "mem_size_mib": 256}'),
                (b"PATCH", b"/machine-config", b'{"vcpu_count": 1}'),
                (b"PUT", b"/drives/rootfs", b'{"drive_id": "rootfs", "path_on_host": "/dev/null", '
                                             b'"is_root_device": true, "is_read_only": true}'),
                (b"PUT", b"/boot-source", b'{"kernel_image_path": "/nonexistent", "boot_args": "console=ttyS0"}'),
                (b"PUT", b"/actions", b'{"action_type": "InstanceStart"}'),
                (b"PUT", b"/mmds", b'{"latest": {"a": 1}}'), (b"PATCH", b"/mmds", b'{"latest": {"a": null}}'),
                (b"PUT", b"/mmds/config", b'{"network_interfaces": ["eth0"], "version": "V2"}'),
                (b"PATCH", b"/vm", b'{"state": "Paused"}'), (b"GET", b"/vm/config", b""),
                (b"PUT", b"/network-interfaces/eth0", b'{"iface_id": "eth0", "host_dev_name": "tap0"}'),
                (b"PUT", b"/entropy", b'{}'), (b"GET", b"/version", b"")]
        out = [b"\x00" + m + b" " + p + b"\n" + body for m, p, body in reqs]
        for m, p, body in reqs[:8]:
            head = m + b" " + p + b" HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n"
            if body:
                head += b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n"
            out.append(b"\x01" + head + b"\r\n" + body)
        out.append(b"\x01GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /version HTTP/1.1\r\nHost: a\r\n\r\n")
        out.append(b"\x01PUT /mmds HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n2\r\n1}\r\n0\r\n\r\n")
        return out

    def one_input(self, data: bytes) -> Hashable:
        if not data:
            return "empty"
        self._count += 1
        if self._count % 1000 == 0:
            self.controller = self.new_controller()
        if data[0] % 2 == 0:
            line, _, body = data[1:].partition(b"\n")
            method, _, path = line.decode("latin-1").partition(" ")
            reply = self.handler(method, path, body)
            self._check(reply.status, json.dumps(reply.body).encode() if reply.body is not None else b"",
                        f"{method} {path.split('/')[1] if '/' in path else path}")
            return ("route", reply.status)
        statuses = self._over_socket(data[1:])
        return ("http",) + tuple(statuses[:3])

    def _check(self, status: int, body: bytes, what: str) -> None:
        if status >= 500:
            message = body[:200].decode("utf-8", "replace")
            raise ApiServerError500(f"{status} for {what}: {message}",
                                    f"HTTP {status} for {what[:40]}: {re.sub(r'[0-9]+', 'N', message[:80])}")
        if status >= 400 and b"fault_message" not in body:
            raise ApiServerError500(f"{status} without fault_message for {what}: {body[:200]!r}",
                                    f"HTTP {status} without fault_message")

    def _over_socket(self, raw: bytes) -> list[int]:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(5.0)
            s.connect(self.sock_path)
            try:
                s.sendall(raw)
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the server may answer and close before taking everything: read what it said
            chunks = []
            while True:
                try:
                    chunk = s.recv(65536)
                except socket.timeout:
                    raise HarnessBug("the API server neither answered nor closed within 5 s",
                                     "API server stalled") from None
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            s.close()
        reply = b"".join(chunks)
        statuses = []
        matches = list(_STATUS.finditer(reply))
        for i, m in enumerate(matches):
            status = int(m.group(1))
            end = matches[i + 1].start() if i + 1 < len(matches) else len(reply)
            head, _, body = reply[m.end():end].partition(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            if status != 100 and not (body == b"" and length and int(length.group(1)) > 0):
                # (a response to HEAD announces the GET body's length and carries none)
                self._check(status, reply[m.end():end], "raw HTTP")
            statuses.append(status)
        if raw.strip() and not statuses:
            raise HarnessBug(f"no HTTP response to {raw[:60]!r}", "API server closed without answering")
        return statuses

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    def close(self) -> None:
        self.server.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


# --- registry -----------------------------------------------------------------------------------

TARGETS: dict[str, Callable[[], Harness]] = {
    "virtqueue": VirtqueueHarness,
    "block": BlockHarness,
    "net": NetHarness,
    "vsock": VsockHarness,
    "snapshot": SnapshotHarness,
    "mmds": MmdsHarness,
    "api": ApiHarness,
}

FAMILIES: dict[str, tuple[str, ...]] = {
    "virtqueue": ("virtqueue",),
    "devices": ("block", "net", "vsock"),
    "snapshot": ("snapshot",),
    "mmds": ("mmds",),
    "api": ("api",),
}


def make(name: str) -> Harness:
    """Build target `name` (imports the code under test); the VMM's log lines go to /dev/null.

    Hostile input makes the code under test log warnings and errors by
    design; the runner's books, not the log, are the result.
    """
    try:
        maker = TARGETS[name]
    except KeyError:
        raise ValueError(f"unknown target {name!r}; known: {', '.join(TARGETS)}") from None
    harness = maker()
    from vmm.logger import configure_logging

    configure_logging("Error", stream=_DEVNULL)
    return harness


_DEVNULL = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process


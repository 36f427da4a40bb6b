"""Network slots on the real host: namespaces, links, addresses, nftables rules, recycling, crash cleanup.

No guest is needed for most of this: a slot is plain host state. The last
tests run `ember serve --net-cidr` with the freestanding test guest (boots
in well under a second; it has a virtio-net device it never drives), so
they check the launch path: the template VMM and every clone's VMM run in
their slot's namespace and open its TAP there, Get reports the slot
address, and a restarted service removes what a crashed one left. The data
path through a real guest is in test_pool_linux.py.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from poolsvc import netslots
from poolsvc.netslots import GATEWAY_ADDR, TAP_MAC, NetConfig, NetSlots, SlotLayout, SlotLockHeld, SlotState

pytestmark = pytest.mark.skipif(netslots.missing_requirements() is not None,
                                reason=str(netslots.missing_requirements()))


def _sid() -> str:
    return f"nt{secrets.token_hex(3)}"


def _cidr() -> str:
    """A /24 nobody on this host uses (the service checks too)."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    while True:
        net = f"10.{secrets.randbelow(50) + 180}.{secrets.randbelow(250)}"
        if f" {net}." not in used:
            return f"{net}.0/24"


def _sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def _ns(slot, *argv: str) -> str:
    return _sh("nsenter", f"--net={slot.netns_path}", "--", *argv)


def _gone(layout: SlotLayout) -> bool:
    netns = [n for n in os.listdir(netslots.NETNS_DIR) if layout.netns_index(n) is not None] \
        if netslots.NETNS_DIR.exists() else []
    links = [n for n in os.listdir("/sys/class/net") if layout.host_if_index(n) is not None]
    return not netns and not links


def _wait(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture
def slots():
    made: list[NetSlots] = []

    def start(min_free: int = 0, max_slots: int = 8) -> NetSlots:
        ns = NetSlots(_sid(), NetConfig(cidr=_cidr(), min_free=min_free, max_slots=max_slots))
        ns.start()
        made.append(ns)
        return ns

    yield start
    for ns in made:
        ns.close()
        assert _gone(ns.layout)


def test_a_slot_has_its_namespace_links_addresses_and_rules(slots) -> None:
    ns = slots()
    slot = ns.acquire("vm-a")
    assert slot.netns_path.exists()
    # Host side: the veth end with the slot's host address, up.
    host = _sh("ip", "-4", "-o", "addr", "show", "dev", slot.host_if)
    assert f"{slot.host_addr}/30" in host
    assert "UP" in _sh("ip", "-o", "link", "show", "dev", slot.host_if)
    # Namespace side: veth0 with the slot address, tap0 at the guest's gateway with the fixed MAC.
    addrs = _ns(slot, "ip", "-4", "-o", "addr")
    assert f"veth0    inet {slot.address}/30" in addrs.replace("\\", "")
    assert f"tap0    inet {GATEWAY_ADDR}/30" in addrs.replace("\\", "")
    assert TAP_MAC in _ns(slot, "ip", "-o", "link", "show", "dev", "tap0")
    assert f"default via {slot.host_addr} dev veth0" in _ns(slot, "ip", "route")
    assert _ns(slot, "cat", "/proc/sys/net/ipv4/ip_forward").strip() == "1"
    assert _sh("cat", "/proc/sys/net/ipv4/ip_forward").strip() in ("0", "1")  # the host's is untouched
    rules = _ns(slot, "nft", "list", "ruleset")
    assert f"dnat to {slot.guest_addr}" in rules and f"snat to {slot.address}" in rules
    # The host reaches the namespace end through its own veth: the slot's /30 is routed there.
    assert f"dev {slot.host_if}" in _sh("ip", "route", "get", slot.address)
    # The host has none of this.
    assert "ember" not in _sh("nft", "list", "tables")


def test_slots_are_distinct_and_gone_after_close(slots) -> None:
    ns = slots(max_slots=3)
    got = [ns.acquire(f"vm{i}") for i in range(3)]
    assert len({s.address for s in got}) == 3 and len({s.netns for s in got}) == 3
    with pytest.raises(netslots.NetSlotsExhausted):
        ns.acquire("one-too-many")
    ns.close()
    assert _gone(ns.layout)
    assert not any(s.netns_path.exists() for s in got)


def test_recycling_flushes_the_previous_sandboxs_connection_state(slots) -> None:
    ns = slots()
    slot = ns.acquire("old")
    # Traffic to the slot address passes the DNAT rule: a conntrack entry now exists in the namespace.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"x", (slot.address, 9))
    entries = subprocess.run(["nsenter", f"--net={slot.netns_path}", "conntrack", "-L"], capture_output=True,
                             text=True).stdout
    assert slot.guest_addr in entries
    ns.release(slot)
    _wait(lambda: ns.allocator.states.get(slot.index) is SlotState.FREE)
    again = ns.acquire("new")
    assert again.index == slot.index  # reused, not made again
    entries = subprocess.run(["nsenter", f"--net={slot.netns_path}", "conntrack", "-L"], capture_output=True,
                             text=True).stdout
    assert slot.guest_addr not in entries


def test_min_free_slots_are_made_ahead(slots) -> None:
    ns = slots(min_free=3, max_slots=4)
    _wait(lambda: ns.allocator.counts()[SlotState.FREE] == 3)
    assert all(ns.layout.slot(i).netns_path.exists() for i in range(3))
    ns.acquire("a")
    _wait(lambda: ns.allocator.counts()[SlotState.FREE] == 3)  # refilled to min_free, capped at 4 slots
    ns.acquire("b")
    time.sleep(0.3)
    assert len(ns.allocator.states) == 4


def test_create_and_recycle_times(slots) -> None:
    ns = slots(max_slots=12)
    got = [ns.acquire(f"vm{i}") for i in range(10)]
    for s in got:
        ns.release(s)
    _wait(lambda: ns.allocator.counts()[SlotState.FREE] == 10)
    create = statistics.median(ns.timings.create_s) * 1000
    recycle = statistics.median(ns.timings.recycle_s) * 1000
    print(f"\n[netslots] slot create median {create:.1f} ms, recycle median {recycle:.1f} ms "
          f"(n={len(ns.timings.create_s)}, {len(ns.timings.recycle_s)})")
    assert recycle < create


def test_a_crashed_owners_slots_are_removed_by_the_next_start() -> None:
    sid, cidr = _sid(), _cidr()
    script = (f"import time; from poolsvc.netslots import NetSlots, NetConfig\n"
              f"ns = NetSlots({sid!r}, NetConfig(cidr={cidr!r}, min_free=0))\n"
              f"ns.start(); [ns.acquire(str(i)) for i in range(3)]\n"
              f"print('ready', flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    try:
        assert proc.stdout.readline().strip() == "ready"
        layout = SlotLayout(sid, NetConfig(cidr=cidr))
        assert not _gone(layout)
        assert netslots.cleanup_stale(sid) == []  # its owner still runs: hands off
        with pytest.raises(SlotLockHeld):
            NetSlots(sid, NetConfig(cidr=cidr)).start()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not _gone(layout)  # a crash leaves them behind
    successor = NetSlots(sid, NetConfig(cidr=cidr, min_free=0))
    removed = successor.start()
    try:
        assert sorted(removed) == sorted([f"ember-{sid}-{i}" for i in range(3)]
                                         + [layout.slot(i).host_if for i in range(3)])
        assert _gone(layout)
    finally:
        successor.close()


def test_a_block_in_use_is_refused() -> None:
    first = NetSlots(_sid(), NetConfig(cidr=_cidr(), min_free=0))
    first.start()
    try:
        first.acquire("a")
        with pytest.raises(netslots.NetSlotError, match="in use"):
            NetSlots(_sid(), NetConfig(cidr=first.config.cidr, min_free=0)).start()
    finally:
        first.close()


# --- the pool service with network slots (test guest) ---------------------------------------


def _netns_inode(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


@pytest.mark.kvm
def test_pool_sandboxes_run_in_their_own_slots(testguest) -> None:
    from tests.integration.pool_harness import Service, wait_dead

    home = Path(tempfile.mkdtemp(prefix="ens-"))
    sid, cidr = _sid(), _cidr()
    layout = SlotLayout(sid, NetConfig(cidr=cidr))
    args = ("--service-id", sid, "--net-cidr", cidr, "--net-min-free", "1")
    svc = Service(home, *args)
    try:
        pb2 = svc.pb2
        svc.stub.CreateTemplate(pb2.CreateTemplateRequest(name="tg", kernel=str(testguest), boot_args="mode=agent",
                                                          vcpus=1, mem_mib=64), timeout=120)
        tjson = next(home.rglob("tg/template.json")).read_text()
        assert '"network": true' in tjson and "ip=169.254.0.21::169.254.0.22:255.255.255.252::eth0:off" in tjson
        a = svc.stub.Acquire(pb2.AcquireRequest(template="tg"), timeout=60)
        b = svc.stub.Acquire(pb2.AcquireRequest(template="tg"), timeout=60)
        assert a.network.ip_address and b.network.ip_address and a.network.ip_address != b.network.ip_address
        assert a.network.tap == "tap0"
        assert svc.stub.Get(pb2.GetRequest(id=a.id)).network.ip_address == a.network.ip_address
        pids = svc.vmm_pids()
        root_ns = _netns_inode(os.getpid())
        for sb in (a, b):
            index = next(i for i in range(8) if layout.slot(i).address == sb.network.ip_address)
            slot_ns = os.stat(layout.slot(index).netns_path).st_ino
            assert _netns_inode(pids[sb.id]) == slot_ns != root_ns  # the VMM runs in its slot
            # Its VMM holds the slot's TAP open: the TAP has a carrier only while a reader is attached.
            assert "LOWER_UP" in _ns(layout.slot(index), "ip", "-o", "link", "show", "dev", "tap0")
        svc.stub.Release(pb2.ReleaseRequest(id=a.id))
        assert wait_dead(pids[a.id])
        c = svc.stub.Acquire(pb2.AcquireRequest(template="tg"), timeout=60)
        assert c.network.ip_address not in ("", b.network.ip_address)

        svc.kill()  # a crash: VMMs and slots stay behind
        before = {n: os.stat(netslots.NETNS_DIR / n).st_ino for n in os.listdir(netslots.NETNS_DIR)
                  if layout.netns_index(n) is not None}
        assert len(before) >= 3
        for pid in svc.vmm_pids().values():
            os.kill(pid, signal.SIGKILL)
        svc = Service(home, *args)
        for name, ino in before.items():  # each was removed (made anew at most: min_free)
            path = netslots.NETNS_DIR / name
            assert not path.exists() or os.stat(path).st_ino != ino, name
        svc.terminate()
        assert _gone(layout)  # a drained service removes its slots
    finally:
        svc.cleanup()
        netslots.cleanup_stale(sid)
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.kvm
@pytest.mark.parametrize("use_zygote", [True, False], ids=["zygote", "direct"])
def test_launcher_runs_each_vmm_in_its_slot(testguest, use_zygote: bool) -> None:
    from poolsvc.launcher import Launcher, TemplateStore

    home = Path(tempfile.mkdtemp(prefix="enl-"))
    ns = NetSlots(_sid(), NetConfig(cidr=_cidr(), min_free=0, max_slots=4))
    ns.start()
    try:
        store = TemplateStore(home, network=ns)
        info = store.create("echo", testguest, boot_args="mode=echo", vcpus=1, mem_mib=64, ready_marker="ECHO READY")
        assert info.network and netslots.guest_ip_boot_arg() in info.boot_args
        assert ns.leased() == {}  # the template's slot was given back
        with Launcher(store, home / "run", use_zygote=use_zygote, subreaper=False) as launcher:
            h = launcher.restore("echo", "vm1")
            assert h.net is not None and ns.leased() == {h.net.index: "vm1"}
            assert _netns_inode(h.pid) == os.stat(h.net.netns_path).st_ino
            launcher.resume(h)
            launcher.destroy(h)
            assert ns.leased() == {}  # returned, dirty, then recycled
            _wait(lambda: ns.allocator.states.get(h.net.index) is SlotState.FREE)
    finally:
        ns.close()
        shutil.rmtree(home, ignore_errors=True)

"""Network slots without the host: layout, the pure allocator, the ruleset, and `NetSlots` over fake I/O."""

from __future__ import annotations

import threading
import time

import pytest

from poolsvc import netslots
from poolsvc.netslots import (
    GATEWAY_ADDR,
    GUEST_ADDR,
    NetConfig,
    NetSlotError,
    NetSlots,
    NetSlotsExhausted,
    SlotAllocator,
    SlotCommandError,
    SlotLayout,
    SlotState,
    SlotStateError,
    guest_ip_boot_arg,
    nft_ruleset,
)

# --- layout ----------------------------------------------------------------------------------


def test_layout_gives_each_slot_its_own_30() -> None:
    layout = SlotLayout("svc", NetConfig(cidr="10.200.0.0/16"))
    s0, s1, last = layout.slot(0), layout.slot(1), layout.slot(1023)
    assert (s0.host_addr, s0.address) == ("10.200.0.1", "10.200.0.2")
    assert (s1.host_addr, s1.address) == ("10.200.0.5", "10.200.0.6")
    assert (last.host_addr, last.address) == ("10.200.15.253", "10.200.15.254")
    assert s0.netns == "ember-svc-0" and str(s0.netns_path) == "/run/netns/ember-svc-0"
    assert s0.tap == s1.tap == "tap0" and s0.guest_addr == GUEST_ADDR
    assert s0.host_if.startswith("emb") and s0.host_if.endswith("-0") and s0.host_if != s1.host_if
    assert len(layout.slot(1023).host_if) <= 15  # IFNAMSIZ - 1
    with pytest.raises(NetSlotError):
        layout.slot(1024)  # max_slots (default 1024)


def test_layout_names_differ_between_services_and_parse_back() -> None:
    a, b = SlotLayout("alpha", NetConfig()), SlotLayout("beta", NetConfig())
    assert a.slot(3).host_if != b.slot(3).host_if and a.slot(3).netns != b.slot(3).netns
    assert a.netns_index("ember-alpha-3") == 3 and a.netns_index("ember-alpha-03") is None
    assert a.netns_index("ember-alpha-x") is None and a.netns_index("ember-beta-3") is None
    assert a.netns_index("ember-alpha-3-x") is None
    assert a.host_if_index(a.slot(17).host_if) == 17 and b.host_if_index(a.slot(17).host_if) is None
    with pytest.raises(NetSlotError):
        SlotLayout("../evil", NetConfig())


def test_capacity_is_bounded_by_the_block_and_max_slots() -> None:
    assert NetConfig(cidr="10.9.0.0/24").capacity == 64
    assert NetConfig(cidr="10.9.0.0/16", max_slots=10).capacity == 10
    assert NetConfig(cidr="10.9.0.0/30").capacity == 1


@pytest.mark.parametrize("kwargs", [
    {"cidr": "10.9.0.1/24"},          # host bits set
    {"cidr": "10.9.0.0/31"},          # smaller than one /30
    {"cidr": "169.254.0.0/16"},       # holds the guests' own address
    {"cidr": "not-a-net"},
    {"max_slots": 0},
    {"min_free": -1},
])
def test_bad_configs_are_refused(kwargs: dict) -> None:
    with pytest.raises(NetSlotError):
        NetConfig(**kwargs)


def test_guest_boot_arg_and_ruleset() -> None:
    assert guest_ip_boot_arg() == f"ip={GUEST_ADDR}::{GATEWAY_ADDR}:255.255.255.252::eth0:off"
    slot = SlotLayout("svc", NetConfig(cidr="10.77.0.0/24")).slot(2)
    rules = nft_ruleset(slot)
    assert f'ip daddr {slot.address} dnat to {GUEST_ADDR}' in rules
    assert f'ip saddr {GUEST_ADDR} snat to {slot.address}' in rules
    assert "policy drop" in rules and f"ip daddr != {slot.block} accept" in rules
    assert f"ip daddr {slot.host_addr} accept" in rules


# --- the allocator ---------------------------------------------------------------------------


def test_allocator_life_of_a_slot() -> None:
    a = SlotAllocator(capacity=3, min_free=2)
    assert a.to_create() == 2 and a.lease("x") is None
    i = a.reserve_new()
    assert i == 0 and a.states[0] is SlotState.CREATING and a.to_create() == 1
    a.created(0)
    assert a.lease("vm1") == 0 and a.owners == {0: "vm1"}
    a.release(0)
    assert a.states[0] is SlotState.DIRTY and a.lease("vm2") is None  # dirty slots are never leased
    assert a.start_recycle() == 0
    a.recycled(0)
    assert a.lease("vm2") == 0 and a.owners[0] == "vm2"
    assert "leased=1" in repr(a)


def test_allocator_refuses_wrong_transitions() -> None:
    a = SlotAllocator(capacity=2, min_free=0)
    with pytest.raises(SlotStateError):
        a.release(0)  # absent
    a.reserve_new()
    with pytest.raises(SlotStateError):
        a.release(0)  # creating, not leased
    a.created(0, lease_to="vm")
    a.release(0)
    with pytest.raises(SlotStateError):
        a.release(0)  # twice
    with pytest.raises(SlotStateError):
        a.recycled(0)  # dirty, not recycling


def test_allocator_cap_reuse_and_failures() -> None:
    a = SlotAllocator(capacity=2, min_free=5)
    assert a.min_free == 2 and a.to_create() == 2
    assert [a.reserve_new(), a.reserve_new(), a.reserve_new()] == [0, 1, None]
    a.create_failed(0)
    assert a.reserve_new() == 0  # a failed index is made again
    a.created(0, lease_to="a")
    a.created(1, lease_to="b")
    assert a.to_create() == 0 and a.lease("c") is None
    a.release(1)
    assert a.start_recycle() == 1
    a.recycled(1, ok=False)  # destroyed instead
    assert 1 not in a.states and a.to_create() == 1
    assert a.reserve_new() == 1


def test_allocator_hands_out_lowest_free_first() -> None:
    a = SlotAllocator(capacity=4, min_free=0)
    for _ in range(4):
        a.created(a.reserve_new())
    assert [a.lease(str(n)) for n in range(2)] == [0, 1]
    a.release(0)
    a.recycled(a.start_recycle())
    assert a.lease("again") == 0


# --- NetSlots over fake I/O --------------------------------------------------------------------


class FakeHost:
    """Stands in for create/recycle/destroy_slot; records calls; can be told to fail."""

    def __init__(self) -> None:
        self.slots: set[int] = set()
        self.calls: list[tuple[str, int]] = []
        self.fail_create = False
        self.fail_recycle = False
        self.lock = threading.Lock()

    def create(self, slot) -> None:
        with self.lock:
            self.calls.append(("create", slot.index))
            if self.fail_create:
                raise SlotCommandError("fake create failure")
            assert slot.index not in self.slots
            self.slots.add(slot.index)

    def recycle(self, slot) -> None:
        with self.lock:
            self.calls.append(("recycle", slot.index))
            if self.fail_recycle:
                raise SlotCommandError("fake recycle failure")

    def destroy(self, slot) -> None:
        with self.lock:
            self.calls.append(("destroy", slot.index))
            self.slots.discard(slot.index)


@pytest.fixture
def fake(monkeypatch, tmp_path):
    host = FakeHost()
    monkeypatch.setattr(netslots, "create_slot", host.create)
    monkeypatch.setattr(netslots, "recycle_slot", host.recycle)
    monkeypatch.setattr(netslots, "destroy_slot", host.destroy)
    monkeypatch.setattr(netslots, "missing_requirements", lambda: None)
    monkeypatch.setattr(netslots, "_remove_stale", lambda layout: [])
    monkeypatch.setattr(NetSlots, "_check_block_unused", lambda self: None)
    monkeypatch.setattr(netslots, "LOCK_DIR", tmp_path / "locks")
    return host


def _wait(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_netslots_keeps_min_free_and_recycles(fake) -> None:
    ns = NetSlots("svc", NetConfig(cidr="10.50.0.0/24", min_free=2, max_slots=4))
    ns.start()
    try:
        _wait(lambda: ns.allocator.counts()[SlotState.FREE] == 2)
        s = ns.acquire("vm1")
        assert s.index == 0 and ns.leased() == {0: "vm1"}
        _wait(lambda: ns.allocator.counts()[SlotState.FREE] == 2)  # topped up again
        ns.release(s)
        _wait(lambda: ns.allocator.states[0] is SlotState.FREE)
        assert ("recycle", 0) in fake.calls
        assert ns.acquire("vm2").index == 0  # the recycled slot is reused
    finally:
        ns.close()
    assert fake.slots == set()  # close destroys every slot, leased ones too


def test_netslots_creates_on_demand_up_to_the_cap(fake) -> None:
    ns = NetSlots("svc", NetConfig(cidr="10.50.0.0/24", min_free=0, max_slots=2))
    ns.start()
    try:
        a, b = ns.acquire("a"), ns.acquire("b")
        assert {a.index, b.index} == {0, 1}
        with pytest.raises(NetSlotsExhausted):
            ns.acquire("c")
        ns.release(a)
        # Dirty and not yet recycled by the thread, or already free: either way "c" gets it.
        assert ns.acquire("c").index == a.index
    finally:
        ns.close()


def test_netslots_failed_recycle_makes_the_slot_again(fake) -> None:
    ns = NetSlots("svc", NetConfig(cidr="10.50.0.0/24", min_free=0, max_slots=1))
    ns.start()
    try:
        s = ns.acquire("a")
        fake.fail_recycle = True
        ns.release(s)
        _wait(lambda: 0 not in ns.allocator.states)  # destroyed by the refill thread
        assert ("destroy", 0) in fake.calls and 0 not in fake.slots
        assert ns.acquire("b").index == 0 and 0 in fake.slots
    finally:
        ns.close()


def test_netslots_failed_create_is_reported_and_leaves_nothing(fake) -> None:
    ns = NetSlots("svc", NetConfig(cidr="10.50.0.0/24", min_free=0, max_slots=2))
    ns.start()
    try:
        fake.fail_create = True
        with pytest.raises(SlotCommandError):
            ns.acquire("a")
        assert ns.allocator.states == {}
        fake.fail_create = False
        assert ns.acquire("a").index == 0
    finally:
        ns.close()


def test_a_second_service_with_the_same_id_is_refused(fake) -> None:
    first = NetSlots("same", NetConfig(cidr="10.50.0.0/24", min_free=0))
    first.start()
    try:
        with pytest.raises(netslots.SlotLockHeld):
            NetSlots("same", NetConfig(cidr="10.51.0.0/24", min_free=0)).start()
    finally:
        first.close()
    second = NetSlots("same", NetConfig(cidr="10.51.0.0/24", min_free=0))
    second.start()  # the lock is free again
    second.close()

"""vmm.state_tree: component state dataclasses to the state file's plain tree and back."""

from __future__ import annotations

import dataclasses
import enum

import pytest
from hypothesis import given, strategies as st

from snapshot.format import decode_state, encode_state
from vmm.devices.legacy.i8042 import I8042State
from vmm.devices.legacy.serial import SerialState
from vmm.devices.virtio.block import BlockState
from vmm.devices.virtio.device import VirtioDeviceState
from vmm.devices.virtio.net import NetState
from vmm.devices.virtio.queue import QueueState
from vmm.devices.virtio.transport.mmio import MmioTransportState
from vmm.memory import GuestMemory
from vmm.rate_limiter import RateLimiterState, TokenBucketState
from vmm.state_tree import MAX_SEQUENCE_LEN, StateTreeError, from_tree, to_tree


def _queue(i: int = 0) -> QueueState:
    return QueueState(max_size=256, size=128, ready=True, desc_table=0x1000 + i, avail_ring=0x2000,
                      used_ring=0x3000, next_avail=7, next_used=5, num_added=1)


def _net() -> NetState:
    virtio = VirtioDeviceState(device_type=1, avail_features=(1 << 32) | 1, acked_features=1 << 32,
                               queues=(_queue(0), _queue(1)), activated=True, config_generation=2)
    return NetState(iface_id="eth0", host_dev_name="tap0", guest_mac="06:00:00:00:00:01", mtu=None,
                    queue_size=256, rx_rate_limiter=RateLimiterState(TokenBucketState(1000, 0, 0, 100, 999, 12)),
                    tx_rate_limiter=RateLimiterState(), mmds_attached=True, pending_rx_frame=b"\x01\x02",
                    virtio=virtio)


@pytest.mark.parametrize("state", [
    SerialState(), SerialState(ier=0x3, rx_fifo=b"abc", thre_pending=True), I8042State(output=b"\xfa"),
    MmioTransportState(status=0xF, device_features_select=1, driver_features_select=0, driver_features=1 << 32,
                       queue_select=1, interrupt_status=1),
    _net(),
    BlockState(drive_id="root", path="/x.ext4", read_only=False, is_root=True, cache_type="Unsafe",
               partuuid=None, queue_size=256,
               virtio=VirtioDeviceState(2, 1 << 32, 1 << 32, (_queue(),), True)),
], ids=lambda s: type(s).__name__)
def test_round_trip_through_the_state_file_encoding(state) -> None:
    tree = to_tree(state)
    back = from_tree(type(state), decode_state(encode_state(tree)))
    assert back == state


def test_tuples_come_back_as_tuples() -> None:
    back = from_tree(NetState, decode_state(encode_state(to_tree(_net()))))
    assert isinstance(back.virtio.queues, tuple)


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t.pop("iface_id"), "missing field 'iface_id'"),
    (lambda t: t.update(extra=1), "unknown field 'extra'"),
    (lambda t: t.update(queue_size=True), "NetState.queue_size: expected an integer, got a bool"),
    (lambda t: t.update(mmds_attached=1), "expected a bool"),
    (lambda t: t.update(guest_mac=b"x"), "expected a string"),
    (lambda t: t.update(pending_rx_frame="x"), "expected bytes"),
    (lambda t: t["virtio"].update(queues={}), "NetState.virtio.queues: expected a list"),
    (lambda t: t["virtio"]["queues"][1].update(ready=None), "NetState.virtio.queues[1].ready"),
    (lambda t: t.update(rx_rate_limiter=[]), "expected an object"),
], ids=range(9))
def test_a_malformed_tree_is_refused_with_its_path(mutate, message) -> None:
    tree = to_tree(_net())
    mutate(tree)
    with pytest.raises(StateTreeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        from_tree(NetState, tree)


def test_sequences_are_bounded() -> None:
    tree = to_tree(_net())
    tree["virtio"]["queues"] = [to_tree(_queue())] * (MAX_SEQUENCE_LEN + 1)
    with pytest.raises(StateTreeError, match="items, at most"):
        from_tree(NetState, tree)


class Color(enum.Enum):
    RED = "red"


@dataclasses.dataclass(frozen=True)
class Paint:
    color: Color


def test_enums_are_stored_by_value() -> None:
    assert to_tree(Paint(Color.RED)) == {"color": "red"}
    assert from_tree(Paint, {"color": "red"}) == Paint(Color.RED)
    with pytest.raises(StateTreeError, match="is not a Color"):
        from_tree(Paint, {"color": "blue"})


def test_unsavable_values_are_refused() -> None:
    with pytest.raises(StateTreeError, match="cannot save a float"):
        to_tree(1.5)


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text() | st.binary(),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                    max_leaves=10))
def test_arbitrary_trees_never_raise_anything_but_state_tree_error(tree) -> None:
    try:
        from_tree(NetState, tree)
    except StateTreeError:
        pass


# --- GuestMemory's record of the pages the VMM wrote ------------------------------------------


def test_dirty_tracking_marks_written_and_viewed_pages_and_resets() -> None:
    mem = GuestMemory.anonymous([(0, 64 << 12), (1 << 32, 16 << 12)])
    assert mem.take_dirty_bitmaps() == [bytes(8), bytes(2)]
    mem.write(0x1000, b"x")  # not tracked yet
    mem.enable_dirty_tracking()
    mem.write(0x2FFF, b"ab")  # straddles pages 2 and 3
    mem.view((1 << 32) + 5 * 4096, 4096)  # page 5 of region 1
    mem.write_u32(0x3F000, 1)  # page 63
    maps = mem.take_dirty_bitmaps()
    assert maps[0] == bytes([0b1100, 0, 0, 0, 0, 0, 0, 0x80])
    assert maps[1] == bytes([0b100000, 0])
    assert mem.take_dirty_bitmaps() == [bytes(8), bytes(2)]


def test_warm_resolves_every_nested_state_type_once() -> None:
    from vmm import state_tree
    from vmm.persist import warm_state_types
    state_tree._hints.cache_clear()
    warm_state_types()
    cached = state_tree._hints.cache_info().currsize
    # NetState names VirtioDeviceState, QueueState, RateLimiterState and TokenBucketState: all resolved.
    for cls in (NetState, VirtioDeviceState, QueueState, RateLimiterState, TokenBucketState, SerialState):
        state_tree._hints(cls)
    info = state_tree._hints.cache_info()
    assert info.currsize == cached and info.misses == cached, info
    assert from_tree(NetState, to_tree(_net())) == _net()  # a restore after warming needs no new resolution
    assert state_tree._hints.cache_info().misses == cached

"""The device base and its interrupt line: features, config space, activation, reset, state."""

from __future__ import annotations

import dataclasses

import pytest

from tests.unit.devices.virtio.mock import Buf, DummyDevice, InterruptCounter, VirtQueue, new_interrupt
from vmm.devices.virtio import (
    VIRTIO_F_VERSION_1,
    VIRTIO_MMIO_INT_CONFIG,
    VIRTIO_MMIO_INT_VRING,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    ActivateError,
    InterruptKind,
    VirtioDeviceStateInvalid,
    VirtioInterrupt,
    feature,
)

V1 = feature(VIRTIO_F_VERSION_1)


# --- interrupt --------------------------------------------------------------------------------


def test_trigger_sets_the_status_bit_and_pulses_the_edge():
    irq, edges = new_interrupt()
    irq.trigger(InterruptKind.VRING)
    irq.trigger(InterruptKind.CONFIG)
    assert irq.status == VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG
    assert edges.count == 2 and irq.triggered == 2


def test_ack_clears_only_the_given_known_bits():
    irq, _ = new_interrupt()
    irq.trigger(InterruptKind.VRING)
    irq.trigger(InterruptKind.CONFIG)
    irq.ack(VIRTIO_MMIO_INT_VRING | 0xF0)
    assert irq.status == VIRTIO_MMIO_INT_CONFIG
    irq.ack(0xFFFF_FFFF)
    assert irq.status == 0


def test_an_unconnected_line_keeps_status_and_can_be_connected_later():
    irq = VirtioInterrupt()
    irq.trigger(InterruptKind.VRING)
    assert irq.status == VIRTIO_MMIO_INT_VRING and irq.triggered == 0
    edges = InterruptCounter()
    irq.connect(edges)
    irq.trigger(InterruptKind.VRING)
    assert edges.count == 1


def test_a_failing_trigger_is_counted_not_raised():
    def broken() -> None:
        raise OSError(9, "bad fd")

    irq = VirtioInterrupt(broken)
    irq.trigger(InterruptKind.VRING)
    irq.trigger(InterruptKind.VRING)
    assert irq.failed == 2 and irq.status == VIRTIO_MMIO_INT_VRING


def test_restore_status_pulses_only_when_something_is_pending():
    irq, edges = new_interrupt()
    irq.restore_status(0)
    assert edges.count == 0
    irq.restore_status(VIRTIO_MMIO_INT_CONFIG | 0x100)
    assert irq.status == VIRTIO_MMIO_INT_CONFIG and edges.count == 1
    assert "status=0x2" in repr(irq)


# --- features and config ------------------------------------------------------------------


def test_features_are_offered_by_32_bit_page():
    dev = DummyDevice(V1 | feature(3))
    assert dev.avail_features_page(0) == 1 << 3
    assert dev.avail_features_page(1) == 1
    assert dev.avail_features_page(2) == 0


def test_version_1_is_required_and_unoffered_bits_are_refused():
    dev = DummyDevice(V1 | feature(3))
    assert dev.features_acceptable(V1)
    assert dev.features_acceptable(V1 | feature(3))
    assert not dev.features_acceptable(feature(3))
    assert not dev.features_acceptable(V1 | feature(4))


def test_a_device_must_offer_version_1():
    with pytest.raises(ValueError):
        DummyDevice(feature(3))


def test_config_reads_past_the_end_are_zero():
    dev = DummyDevice()
    assert dev.read_config(0, 4) == b"\x01\x02\x03\x04"
    assert dev.read_config(6, 4) == b"\x07\x08\x00\x00"
    assert dev.read_config(100, 2) == b"\x00\x00"
    assert dev.read_config(-1, 1) == b"\x00"


def test_config_changed_bumps_generation_and_interrupts_only_when_active(mem):
    dev = DummyDevice()
    dev.config_changed()
    assert dev.config_generation == 1
    irq, edges = new_interrupt()
    dev.activate(mem, irq)
    dev.config_changed()
    assert dev.config_generation == 2 and irq.status == VIRTIO_MMIO_INT_CONFIG and edges.count == 1


# --- activation and reset --------------------------------------------------------------------


def ready(dev: DummyDevice, index: int, vq: VirtQueue) -> None:
    q = dev.queues[index]
    q.size, q.ready = vq.size, True
    q.desc_table, q.avail_ring, q.used_ring = vq.desc_table, vq.avail_ring, vq.used_ring


def test_activation_sets_ring_features_from_the_acked_ones(mem, vq):
    dev = DummyDevice(V1 | feature(VIRTIO_RING_F_EVENT_IDX) | feature(VIRTIO_RING_F_INDIRECT_DESC))
    dev.set_acked_features(V1 | feature(VIRTIO_RING_F_EVENT_IDX))
    ready(dev, 0, vq)
    irq, _ = new_interrupt()
    dev.activate(mem, irq)
    assert dev.is_activated and dev.queues[0].event_idx and not dev.queues[0].indirect


def test_activation_refuses_an_invalid_ready_queue_and_ignores_unready_ones(mem, vq):
    dev = DummyDevice()
    dev.queues[1].size = 3  # not ready: not checked
    ready(dev, 0, vq)
    dev.queues[0].used_ring += 1
    with pytest.raises(ActivateError):
        dev.activate(mem, new_interrupt()[0])
    assert not dev.is_activated
    dev.queues[0].used_ring -= 1
    dev.activate(mem, new_interrupt()[0])
    with pytest.raises(ActivateError):
        dev.activate(mem, new_interrupt()[0])


def test_a_failing_device_hook_leaves_the_device_inactive(mem):
    dev = DummyDevice()
    dev.fail_activation = True
    with pytest.raises(ActivateError):
        dev.activate(mem, new_interrupt()[0])
    assert not dev.is_activated and dev.interrupt is None


def test_reset_clears_features_queues_and_activation(mem, vq):
    dev = DummyDevice()
    dev.set_acked_features(V1)
    ready(dev, 0, vq)
    dev.activate(mem, new_interrupt()[0])
    dev.reset()
    assert not dev.is_activated and dev.acked_features == 0 and dev.resets == 1
    assert not dev.queues[0].ready and dev.queues[0].desc_table == 0


def test_kick_processes_ready_queues_of_an_active_device(mem, vq):
    dev = DummyDevice()
    dev.kick()
    assert dev.processed == []
    ready(dev, 1, vq)
    dev.activate(mem, new_interrupt()[0])
    dev.kick()
    assert dev.processed == [1]


def test_signal_used_interrupts_once_per_batch(mem, vq):
    dev = DummyDevice()
    ready(dev, 0, vq)
    irq, edges = new_interrupt()
    dev.activate(mem, irq)
    vq.add_chain([Buf(0x10_0000, 8)])
    vq.add_chain([Buf(0x10_0000, 8)])
    dev.process_queue(0)
    assert len(vq.take_used()) == 2 and edges.count == 1 and irq.status == VIRTIO_MMIO_INT_VRING


def test_needs_reset_follows_broken_queues(mem, vq):
    dev = DummyDevice()
    ready(dev, 0, vq)
    dev.activate(mem, new_interrupt()[0])
    vq.set_avail_idx(1000)
    dev.process_queue(0)
    assert dev.needs_reset


# --- state -------------------------------------------------------------------------------------


def test_virtio_state_round_trip_reactivates(mem, vq):
    dev = DummyDevice()
    dev.set_acked_features(V1)
    ready(dev, 0, vq)
    dev.activate(mem, new_interrupt()[0])
    dev.config_changed()
    state = dev.virtio_state()
    again = DummyDevice()
    irq, _ = new_interrupt()
    again.restore_virtio_state(state, mem, irq)
    assert again.virtio_state() == state
    assert again.is_activated and again.interrupt is irq
    vq.add_chain([Buf(0x10_0000, 8)])
    again.process_queue(0)
    assert vq.take_used() == [(0, 0)]


def test_an_inactive_state_restores_inactive(mem):
    dev = DummyDevice()
    again = DummyDevice()
    again.restore_virtio_state(dev.virtio_state(), mem, new_interrupt()[0])
    assert not again.is_activated


@pytest.mark.parametrize("change", [
    {"device_type": 1},
    {"avail_features": V1 | feature(4)},
    {"acked_features": V1 | feature(5)},
    {"activated": 1},
    {"queues": ()},
    {"queues": "nope"},
    {"config_generation": 1 << 32},
    {"config_generation": -1},
])
def test_bad_virtio_states_are_refused(mem, change):
    state = dataclasses.replace(DummyDevice().virtio_state(), **change)
    with pytest.raises(VirtioDeviceStateInvalid):
        DummyDevice().restore_virtio_state(state, mem, new_interrupt()[0])


def test_a_state_with_other_queue_sizes_is_refused(mem):
    state = DummyDevice().virtio_state()
    queues = (dataclasses.replace(state.queues[0], max_size=64, size=64), state.queues[1])
    with pytest.raises(VirtioDeviceStateInvalid):
        DummyDevice().restore_virtio_state(dataclasses.replace(state, queues=queues), mem, new_interrupt()[0])


def test_an_active_state_whose_queues_do_not_fit_memory_is_refused(mem, vq):
    dev = DummyDevice()
    dev.set_acked_features(V1)
    ready(dev, 0, vq)
    dev.activate(mem, new_interrupt()[0])
    state = dev.virtio_state()
    queues = (dataclasses.replace(state.queues[0], used_ring=1 << 40), state.queues[1])
    with pytest.raises(VirtioDeviceStateInvalid):
        DummyDevice().restore_virtio_state(dataclasses.replace(state, queues=queues), mem, new_interrupt()[0])


def test_an_active_state_without_version_1_is_refused(mem):
    state = dataclasses.replace(DummyDevice().virtio_state(), activated=True, acked_features=0)
    with pytest.raises(VirtioDeviceStateInvalid):
        DummyDevice().restore_virtio_state(state, mem, new_interrupt()[0])

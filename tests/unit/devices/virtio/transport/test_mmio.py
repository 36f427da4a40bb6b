"""The virtio-mmio v2 transport: registers, status machine, negotiation, queues, notify, state."""

from __future__ import annotations

import dataclasses
import struct

import pytest

from tests.unit.devices.virtio.mock import Buf, DummyDevice, MmioDriver, VirtQueue, new_interrupt
from vmm.devices import Bus
from vmm.devices.virtio import VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING, feature
from vmm.devices.virtio.transport import mmio
from vmm.devices.virtio.transport.mmio import DEVICE_STATUS_ACKNOWLEDGE as ACK
from vmm.devices.virtio.transport.mmio import DEVICE_STATUS_DRIVER as DRIVER
from vmm.devices.virtio.transport.mmio import DEVICE_STATUS_DRIVER_OK as DRIVER_OK
from vmm.devices.virtio.transport.mmio import DEVICE_STATUS_FAILED as FAILED
from vmm.devices.virtio.transport.mmio import DEVICE_STATUS_FEATURES_OK as FEATURES_OK
from vmm.devices.virtio.transport.mmio import DEVICE_STATUS_NEEDS_RESET as NEEDS_RESET
from vmm.devices.virtio.transport.mmio import MmioTransport, MmioTransportState, MmioTransportStateInvalid

V1 = feature(VIRTIO_F_VERSION_1)
F3 = feature(3)
DATA = 0x10_0000


@pytest.fixture
def dev():
    return DummyDevice(V1 | F3)


@pytest.fixture
def irq():
    return new_interrupt()


@pytest.fixture
def transport(dev, mem, irq):
    return MmioTransport(dev, mem, interrupt=irq[0])


@pytest.fixture
def drv(transport):
    return MmioDriver(transport)


@pytest.fixture
def vq2(mem):
    """A 32-entry queue for the dummy device's queue 1."""
    return VirtQueue(mem, 0x8000, 32)


# --- identity and access rules ---------------------------------------------------------------


def test_identity_registers(drv):
    assert drv.read32(mmio.MAGIC_VALUE) == 0x74726976
    assert drv.read32(mmio.VERSION) == 2
    assert drv.read32(mmio.DEVICE_ID) == DummyDevice.device_type
    assert drv.read32(mmio.VENDOR_ID_REG) == mmio.VENDOR_ID


def test_the_transport_works_behind_a_bus(transport):
    bus = Bus.mmio()
    bus.insert(transport, 0xD000_1000, mmio.MMIO_LEN)
    assert bus.read(0xD000_1000, 4) == b"virt"
    assert bus.read(0xD000_1000 + mmio.CONFIG_SPACE, 2) == b"\x01\x02"
    assert bus.device_errors == 0


@pytest.mark.parametrize("offset,size", [(0, 1), (0, 2), (0, 8), (2, 4), (1, 1), (mmio.STATUS + 1, 2)])
def test_odd_register_reads_return_zeros(transport, offset, size):
    assert transport.read(offset, size) == bytes(size)
    assert transport.rejected["bad_register_read"] == 1


def test_odd_register_writes_are_ignored_and_counted(drv, transport):
    transport.write(mmio.STATUS, b"\x01")
    transport.write(mmio.STATUS + 2, b"\x01\x00")
    transport.write(mmio.STATUS, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    assert drv.status == 0
    assert transport.rejected["bad_register_write"] == 3


def test_write_only_and_reserved_registers_read_zero(drv, transport):
    for offset in (mmio.QUEUE_NOTIFY, mmio.INTERRUPT_ACK, mmio.QUEUE_DESC_LOW, 0x0B0, 0x018):
        assert drv.read32(offset) == 0
    assert transport.rejected["unreadable_register"] == 5


def test_writes_to_read_only_registers_are_ignored(drv, transport):
    drv.write32(mmio.MAGIC_VALUE, 0)
    drv.write32(mmio.QUEUE_NUM_MAX, 0)
    assert drv.read32(mmio.MAGIC_VALUE) == mmio.MMIO_MAGIC_VALUE
    assert transport.rejected["unwritable_register"] == 2


# --- config space ---------------------------------------------------------------------------


@pytest.mark.parametrize("offset,size,expected", [
    (0, 1, b"\x01"), (1, 1, b"\x02"), (2, 2, b"\x03\x04"), (4, 4, b"\x05\x06\x07\x08"),
    (0, 8, bytes(range(1, 9))), (8, 4, bytes(4)), (0xEFC, 4, bytes(4)),
])
def test_config_reads_of_natural_size_and_alignment(transport, offset, size, expected):
    assert transport.read(mmio.CONFIG_SPACE + offset, size) == expected


@pytest.mark.parametrize("offset,size", [(1, 2), (2, 4), (4, 8), (0, 3), (0, 16)])
def test_misaligned_or_odd_config_accesses_read_zero_and_write_nothing(drv, transport, dev, offset, size):
    assert transport.read(mmio.CONFIG_SPACE + offset, size) == bytes(size)
    drv.negotiate()
    transport.write(mmio.CONFIG_SPACE + offset, b"\xff" * size)
    assert bytes(dev.config) == bytes(range(1, 9))


def test_config_writes_need_the_driver_status(drv, transport, dev):
    transport.write(mmio.CONFIG_SPACE, b"\xaa")
    assert dev.config[0] == 1 and transport.rejected["config_write_state"] == 1
    drv.add_status(ACK)
    drv.add_status(DRIVER)
    transport.write(mmio.CONFIG_SPACE, b"\xaa")
    assert dev.config[0] == 0xAA
    drv.add_status(FAILED)
    transport.write(mmio.CONFIG_SPACE, b"\xbb")
    assert dev.config[0] == 0xAA


def test_config_generation_follows_the_device(drv, dev):
    assert drv.read32(mmio.CONFIG_GENERATION) == 0
    dev.config_changed()
    assert drv.read32(mmio.CONFIG_GENERATION) == 1


# --- feature negotiation ---------------------------------------------------------------------


def test_device_features_by_select(drv):
    assert drv.device_features() == V1 | F3
    drv.write32(mmio.DEVICE_FEATURES_SEL, 7)
    assert drv.read32(mmio.DEVICE_FEATURES) == 0


def test_features_ok_sticks_for_an_acceptable_set(drv, dev):
    drv.negotiate(V1 | F3)
    assert drv.status == ACK | DRIVER | FEATURES_OK
    assert dev.acked_features == V1 | F3


@pytest.mark.parametrize("features", [F3, 0, V1 | feature(4), V1 | feature(63)])
def test_features_ok_is_refused_for_unacceptable_sets(drv, dev, transport, features):
    drv.negotiate(features)
    assert drv.status == ACK | DRIVER
    assert dev.acked_features == 0
    assert transport.rejected["features_refused"] == 1


def test_driver_features_are_ignored_outside_the_driver_phase(drv, transport):
    drv.write_driver_features(V1)  # before DRIVER
    assert transport.driver_features == 0
    drv.negotiate(V1)
    drv.write_driver_features(V1 | F3)  # after FEATURES_OK
    assert transport.driver_features == V1
    assert transport.rejected["features_state"] == 4


def test_driver_feature_pages_replace_their_32_bits(drv, transport):
    drv.add_status(ACK)
    drv.add_status(DRIVER)
    drv.write_driver_features(V1 | F3)
    drv.write32(mmio.DRIVER_FEATURES_SEL, 0)
    drv.write32(mmio.DRIVER_FEATURES, 0)
    assert transport.driver_features == V1


def test_driver_features_beyond_page_1_do_not_count(drv, transport, dev):
    drv.add_status(ACK)
    drv.add_status(DRIVER)
    drv.write_driver_features(V1)
    drv.write32(mmio.DRIVER_FEATURES_SEL, 1 << 31)
    drv.write32(mmio.DRIVER_FEATURES, 0xFFFF_FFFF)
    drv.add_status(FEATURES_OK)
    assert drv.status & FEATURES_OK and dev.acked_features == V1
    assert transport.rejected["features_page"] == 1


# --- status machine --------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [
    [DRIVER],
    [ACK | DRIVER],
    [ACK | DRIVER | FEATURES_OK],
    [ACK, ACK | FEATURES_OK],
    [ACK, ACK | DRIVER | DRIVER_OK],
    [ACK, ACK | DRIVER, ACK | DRIVER | DRIVER_OK],
    [ACK, ACK | DRIVER, ACK],  # clearing a bit
    [ACK, 0x100 | ACK],  # bits beyond the 8-bit status
])
def test_out_of_order_status_writes_are_ignored(drv, transport, steps):
    accepted = 0
    for value in steps:
        drv.write32(mmio.STATUS, value)
        if drv.status == value:
            accepted = value
    assert drv.status == accepted
    assert sum(transport.rejected[k] for k in ("status_order", "status_bits")) >= 1


def test_rewriting_the_same_status_is_harmless(drv, transport):
    drv.add_status(ACK)
    drv.write32(mmio.STATUS, ACK)
    assert drv.status == ACK and not transport.rejected


def test_failed_sticks_until_reset(drv, dev, mem, vq):
    drv.negotiate()
    drv.add_status(FAILED)
    assert drv.status & FAILED
    drv.write32(mmio.STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK)
    assert not drv.status & DRIVER_OK and not dev.is_activated
    drv.write32(mmio.STATUS, 0)
    assert drv.status == 0
    drv.init({0: vq})
    assert dev.is_activated


def test_driver_ok_activates_the_device_and_processes_early_buffers(drv, dev, vq, irq):
    drv.negotiate()
    drv.setup_queue(0, vq)
    vq.add_chain([Buf(DATA, 8)])  # made available before DRIVER_OK
    drv.add_status(DRIVER_OK)
    assert dev.is_activated and drv.status == ACK | DRIVER | FEATURES_OK | DRIVER_OK
    assert vq.take_used() == [(0, 0)] and irq[1].count == 1


def test_an_invalid_ready_queue_at_driver_ok_needs_reset(drv, dev, vq, irq):
    drv.negotiate()
    drv.setup_queue(0, vq)
    drv.write32(mmio.QUEUE_NUM, 3)
    drv.add_status(DRIVER_OK)
    assert not dev.is_activated
    assert drv.status == ACK | DRIVER | FEATURES_OK | DRIVER_OK | NEEDS_RESET
    assert drv.read32(mmio.INTERRUPT_STATUS) == VIRTIO_MMIO_INT_CONFIG and irq[1].count == 1


def test_a_failing_activation_needs_reset(drv, dev, vq):
    dev.fail_activation = True
    drv.init({0: vq})
    assert drv.status & NEEDS_RESET and not dev.is_activated
    # The driver sees NEEDS_RESET, gives up (its write carries the bit back) and resets.
    drv.add_status(FAILED)
    assert drv.status & FAILED
    drv.write32(mmio.STATUS, 0)
    dev.fail_activation = False
    drv.init({0: vq})
    assert dev.is_activated and drv.status == ACK | DRIVER | FEATURES_OK | DRIVER_OK


def test_reset_clears_device_queues_selects_and_interrupts(drv, transport, dev, vq, vq2):
    drv.init({0: vq, 1: vq2})
    vq.add_chain([Buf(DATA, 8)])
    drv.notify(0)
    drv.write32(mmio.QUEUE_SEL, 1)
    drv.write32(mmio.DEVICE_FEATURES_SEL, 1)
    assert drv.read32(mmio.INTERRUPT_STATUS) == VIRTIO_MMIO_INT_VRING
    resets = dev.resets
    drv.write32(mmio.STATUS, 0)
    assert drv.status == 0 and not dev.is_activated and dev.resets == resets + 1 and dev.acked_features == 0
    assert (transport.queue_select, transport.device_features_select, transport.driver_features) == (0, 0, 0)
    assert drv.read32(mmio.INTERRUPT_STATUS) == 0
    for q in dev.queues:
        assert not q.ready and q.desc_table == q.avail_ring == q.used_ring == 0 and q.size == q.max_size
    assert drv.read32(mmio.QUEUE_READY) == 0


# --- queue setup -------------------------------------------------------------------------------


def test_queue_registers_program_the_selected_queue(drv, dev, vq2):
    drv.negotiate()
    drv.write32(mmio.QUEUE_SEL, 1)
    assert drv.read32(mmio.QUEUE_NUM_MAX) == 32
    drv.write32(mmio.QUEUE_DESC_LOW, 0x1234_5000)
    drv.write32(mmio.QUEUE_DESC_HIGH, 0x1)
    drv.write32(mmio.QUEUE_DRIVER_LOW, 0x10)
    drv.write32(mmio.QUEUE_DRIVER_HIGH, 0x2)
    drv.write32(mmio.QUEUE_DEVICE_LOW, 0x20)
    drv.write32(mmio.QUEUE_DEVICE_HIGH, 0x3)
    drv.write32(mmio.QUEUE_NUM, 8)
    drv.write32(mmio.QUEUE_READY, 1)
    q = dev.queues[1]
    assert (q.desc_table, q.avail_ring, q.used_ring) == (0x1_1234_5000, 0x2_0000_0010, 0x3_0000_0020)
    assert q.size == 8 and q.ready and drv.read32(mmio.QUEUE_READY) == 1
    assert not dev.queues[0].ready
    drv.write32(mmio.QUEUE_DESC_LOW, 0x6000)
    assert q.desc_table == 0x1_0000_6000


def test_queue_registers_are_locked_before_features_ok(drv, transport, dev):
    drv.add_status(ACK)
    drv.add_status(DRIVER)
    drv.write32(mmio.QUEUE_NUM, 8)
    drv.write32(mmio.QUEUE_READY, 1)
    assert dev.queues[0].size == 16 and not dev.queues[0].ready
    assert transport.rejected["queue_state"] == 2


def test_queue_registers_are_locked_after_driver_ok(drv, transport, dev, vq):
    drv.init({0: vq})
    drv.write32(mmio.QUEUE_SEL, 0)
    drv.write32(mmio.QUEUE_DESC_LOW, 0x9000)
    drv.write32(mmio.QUEUE_READY, 0)
    assert dev.queues[0].desc_table == vq.desc_table and dev.queues[0].ready
    assert transport.rejected["queue_state"] == 2


def test_a_selected_queue_that_does_not_exist(drv, transport):
    drv.negotiate()
    drv.write32(mmio.QUEUE_SEL, 2)
    assert drv.read32(mmio.QUEUE_NUM_MAX) == 0
    assert drv.read32(mmio.QUEUE_READY) == 0
    drv.write32(mmio.QUEUE_NUM, 8)
    assert transport.rejected["queue_select"] == 1


# --- notifications and interrupts ----------------------------------------------------------


def test_notify_processes_the_queue_and_interrupts(drv, dev, vq, irq):
    drv.init({0: vq})
    vq.add_chain([Buf(DATA, 8)])
    drv.notify(0)
    assert dev.processed[-1] == 0 and vq.take_used() == [(0, 0)]
    assert drv.ack_interrupt() == VIRTIO_MMIO_INT_VRING
    assert drv.read32(mmio.INTERRUPT_STATUS) == 0


@pytest.mark.parametrize("index", [2, 0xFFFF, 0xFFFF_FFFF])
def test_notify_with_a_bad_index_is_dropped(drv, dev, transport, vq, index):
    drv.init({0: vq})
    before = list(dev.processed)
    drv.notify(index)
    assert dev.processed == before and transport.rejected["notify_index"] == 1


def test_notify_before_activation_or_on_an_unready_queue_is_dropped(drv, dev, transport, vq):
    drv.notify(0)
    drv.init({0: vq})
    before = list(dev.processed)
    drv.notify(1)
    assert dev.processed == before and transport.rejected["notify_inactive"] == 2


def test_the_ioeventfd_path(transport, drv, dev, vq):
    assert transport.notify_addresses() == [(mmio.QUEUE_NOTIFY, 0), (mmio.QUEUE_NOTIFY, 1)]
    drv.init({0: vq})
    vq.add_chain([Buf(DATA, 8)])
    transport.notify(0)
    transport.notify(5)
    assert vq.take_used() == [(0, 0)] and transport.rejected["notify_index"] == 1


def test_a_hostile_avail_index_sets_needs_reset_with_a_config_interrupt(drv, mem, vq, irq):
    drv.init({0: vq})
    vq.set_avail_idx(500)
    drv.notify(0)
    assert drv.status & NEEDS_RESET
    assert drv.read32(mmio.INTERRUPT_STATUS) == VIRTIO_MMIO_INT_CONFIG
    drv.write32(mmio.STATUS, 0)
    drv.init({0: VirtQueue(mem, vq.desc_table, vq.size)})  # fresh rings
    assert drv.status == ACK | DRIVER | FEATURES_OK | DRIVER_OK


def test_interrupt_ack_clears_only_acked_bits(drv, dev, vq):
    drv.init({0: vq})
    vq.add_chain([Buf(DATA, 8)])
    drv.notify(0)
    dev.config_changed()
    drv.write32(mmio.INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING)
    assert drv.read32(mmio.INTERRUPT_STATUS) == VIRTIO_MMIO_INT_CONFIG


# --- persistence ---------------------------------------------------------------------------


def test_state_round_trip_of_a_live_device(drv, transport, dev, mem, vq):
    drv.init({0: vq})
    drv.write32(mmio.QUEUE_SEL, 1)
    dev.config_changed()
    tstate, dstate = transport.state(), dev.virtio_state()
    irq2, edges2 = new_interrupt()
    dev2 = DummyDevice(V1 | F3)
    dev2.restore_virtio_state(dstate, mem, irq2)
    t2 = MmioTransport.from_state(tstate, dev2, mem, interrupt=irq2)
    assert t2.state() == tstate
    assert edges2.count == 1  # the pending CONFIG interrupt is pulsed again
    vq.add_chain([Buf(DATA, 8)])
    MmioDriver(t2).notify(0)
    assert vq.take_used() == [(0, 0)]


def test_state_round_trip_mid_negotiation(drv, transport, dev, mem):
    drv.negotiate()
    t2 = MmioTransport.from_state(transport.state(), dev, mem, interrupt=new_interrupt()[0])
    assert MmioDriver(t2).status == ACK | DRIVER | FEATURES_OK


def base_state(**change) -> MmioTransportState:
    state = MmioTransportState(status=0, device_features_select=0, driver_features_select=0,
                               driver_features=0, queue_select=0, interrupt_status=0)
    return dataclasses.replace(state, **change)


@pytest.mark.parametrize("change", [
    {"status": DRIVER}, {"status": ACK | FEATURES_OK}, {"status": 0x100}, {"status": -1},
    {"queue_select": 1 << 32}, {"driver_features": 1 << 64}, {"interrupt_status": 4},
    {"device_features_select": "0"},
])
def test_bad_transport_states_are_refused(dev, mem, change):
    with pytest.raises(MmioTransportStateInvalid):
        MmioTransport.from_state(base_state(**change), dev, mem, interrupt=new_interrupt()[0])


def test_transport_state_must_match_the_device(drv, dev, mem, vq):
    live = ACK | DRIVER | FEATURES_OK | DRIVER_OK
    with pytest.raises(MmioTransportStateInvalid):  # DRIVER_OK but the device is not active
        MmioTransport.from_state(base_state(status=live, driver_features=V1), dev, mem,
                                 interrupt=new_interrupt()[0])
    # ... unless activation had failed (NEEDS_RESET).
    MmioTransport.from_state(base_state(status=live | NEEDS_RESET, driver_features=0), dev, mem,
                             interrupt=new_interrupt()[0])
    drv.init({0: vq})
    with pytest.raises(MmioTransportStateInvalid):  # active device, status not live
        MmioTransport.from_state(base_state(status=ACK), dev, mem, interrupt=dev.interrupt)
    with pytest.raises(MmioTransportStateInvalid):  # acked features differ
        MmioTransport.from_state(base_state(status=live, driver_features=V1), dev, mem, interrupt=dev.interrupt)
    with pytest.raises(MmioTransportStateInvalid):  # another interrupt than the device's
        MmioTransport.from_state(base_state(status=live, driver_features=V1 | F3), dev, mem,
                                 interrupt=new_interrupt()[0])


def test_repr_is_one_line(transport):
    assert "\n" not in repr(transport) and "DummyDevice" in repr(transport)


def test_register_values_are_little_endian(transport):
    assert struct.unpack("<I", transport.read(mmio.VERSION, 4))[0] == 2

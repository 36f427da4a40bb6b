"""The i8042: Linux's probe, reset, keyboard commands, Ctrl-Alt-Del, persistence, fuzz."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmm.devices import Bus
from vmm.devices.legacy import (
    I8042,
    I8042_BASE,
    I8042_KBD_IRQ,
    I8042_PORT_COUNT,
    I8042PioAdapter,
    I8042State,
    I8042StateInvalid,
)

DATA, STATUS = 0, 4
# Linux drivers/input/serio/i8042.h
I8042_STR_OBF, I8042_STR_IBF, I8042_STR_CMDDAT, I8042_STR_KEYLOCK, I8042_STR_AUXDATA = 0x01, 0x02, 0x08, 0x10, 0x20
I8042_CTR_KBDINT, I8042_CTR_AUXINT, I8042_CTR_KBDDIS, I8042_CTR_AUXDIS, I8042_CTR_XLATE = 0x01, 0x02, 0x10, 0x20, 0x40
I8042_CMD_CTL_RCTR = 0x0120
I8042_CMD_CTL_WCTR = 0x1060
I8042_CMD_CTL_TEST = 0x01AA
I8042_CMD_KBD_DISABLE = 0x00AD
I8042_CMD_KBD_ENABLE = 0x00AE
I8042_CMD_KBD_TEST = 0x01AB
I8042_CMD_KBD_LOOP = 0x11D2
I8042_CMD_AUX_DISABLE = 0x00A7
I8042_CMD_AUX_ENABLE = 0x00A8
I8042_CMD_AUX_TEST = 0x01A9
I8042_CMD_AUX_LOOP = 0x11D3
I8042_RET_CTL_TEST = 0x55
I8042_BUFFER_SIZE = 16
I8042_CTL_TIMEOUT = 10000


class Harness:
    def __init__(self):
        self.resets = 0
        self.irqs = 0
        self.dev = I8042(self._reset, self._irq)
        self.status_reads = 0

    def _reset(self) -> None:
        self.resets += 1

    def _irq(self) -> None:
        self.irqs += 1

    def status(self) -> int:
        self.status_reads += 1
        return self.dev.read(STATUS)

    # Linux's i8042 helpers, re-enacted.

    def wait_write(self) -> None:
        for _ in range(I8042_CTL_TIMEOUT):
            if not self.status() & I8042_STR_IBF:
                return
        raise TimeoutError("i8042 input buffer never emptied")

    def wait_read(self) -> None:
        for _ in range(I8042_CTL_TIMEOUT):
            if self.status() & I8042_STR_OBF:
                return
        raise TimeoutError("i8042 never answered")

    def command(self, command: int, params: list[int] | None = None) -> list[int]:
        """__i8042_command(): the command byte, its parameters, then the reply bytes."""
        params = list(params or [])
        self.wait_write()
        self.dev.write(STATUS, command & 0xFF)
        for i in range((command >> 12) & 0xF):
            self.wait_write()
            self.dev.write(DATA, params[i])
        reply = []
        for _ in range((command >> 8) & 0xF):
            self.wait_read()
            if command == I8042_CMD_AUX_LOOP and not self.status() & I8042_STR_AUXDATA:
                raise IOError("auxerr")
            reply.append(self.dev.read(DATA))
        return reply

    def flush(self) -> int:
        """i8042_flush(): read until OBF clears; fails if more than the buffer size."""
        count = 0
        while self.status() & I8042_STR_OBF:
            if count == I8042_BUFFER_SIZE:
                raise IOError("flush: controller keeps producing data")
            self.dev.read(DATA)
            count += 1
        return count

    def drain(self) -> bytes:
        got = bytearray()
        while self.status() & I8042_STR_OBF:
            got.append(self.dev.read(DATA))
        return bytes(got)


@pytest.fixture
def h() -> Harness:
    return Harness()


def linux_probe(h: Harness) -> dict:
    """The i8042 register traffic of Linux's i8042_probe() on x86 (no AUX IRQ wired)."""
    found = {}
    h.flush()  # i8042_controller_check
    assert h.command(I8042_CMD_CTL_TEST) == [I8042_RET_CTL_TEST]  # i8042_controller_selftest
    # i8042_controller_init: a stable CTR read, keyboard disabled, XLATE decides "direct".
    ctr = [h.command(I8042_CMD_CTL_RCTR)[0], h.command(I8042_CMD_CTL_RCTR)[0]]
    assert ctr[0] == ctr[1]
    ctr = ctr[1]
    found["keylock_active"] = not h.status() & I8042_STR_KEYLOCK
    found["direct"] = not ctr & I8042_CTR_XLATE
    ctr |= I8042_CTR_KBDDIS
    ctr &= ~I8042_CTR_KBDINT
    if found["direct"]:
        ctr &= ~I8042_CTR_XLATE
    h.command(I8042_CMD_CTL_WCTR, [ctr])
    h.flush()
    # i8042_check_aux: loop test, then the AUXDIS bit must follow A7/A8.
    h.flush()
    found["aux_loop"] = h.command(I8042_CMD_AUX_LOOP, [0x5A]) == [0x5A]
    for on, cmd in ((False, I8042_CMD_AUX_DISABLE), (True, I8042_CMD_AUX_ENABLE)):
        h.command(cmd)
        found[f"aux_toggle_{on}"] = (not h.command(I8042_CMD_CTL_RCTR)[0] & I8042_CTR_AUXDIS) == on
    # i8042_setup_kbd -> i8042_enable_kbd_port.
    ctr &= ~I8042_CTR_KBDDIS
    ctr |= I8042_CTR_KBDINT
    h.command(I8042_CMD_CTL_WCTR, [ctr])
    found["ctr"] = h.command(I8042_CMD_CTL_RCTR)[0]
    return found


def test_linux_probe_succeeds_without_spinning(h):
    found = linux_probe(h)
    assert found == {
        "keylock_active": False,
        "direct": True,  # no XLATE: Linux talks scancode set 2 to the keyboard
        "aux_loop": True,
        "aux_toggle_False": True,
        "aux_toggle_True": True,
        "ctr": 0x05,
    }
    # Every wait was answered on the first status read after the command: no polling loops.
    assert h.status_reads < 60
    assert h.resets == 0


def test_self_test_and_interface_tests(h):
    assert h.command(I8042_CMD_CTL_TEST) == [0x55]
    assert h.command(I8042_CMD_KBD_TEST) == [0x00]
    assert h.command(I8042_CMD_AUX_TEST) == [0x00]


def test_ctr_read_write(h):
    assert h.command(I8042_CMD_CTL_RCTR) == [0x05]
    h.command(I8042_CMD_CTL_WCTR, [0x47])
    assert h.command(I8042_CMD_CTL_RCTR) == [0x47]
    h.command(I8042_CMD_CTL_WCTR, [0xFF])
    assert h.command(I8042_CMD_CTL_RCTR) == [0x7F]  # bit 7 is reserved


def test_kbd_and_aux_enable_disable_drive_the_ctr(h):
    h.command(I8042_CMD_KBD_DISABLE)
    assert h.command(I8042_CMD_CTL_RCTR)[0] & I8042_CTR_KBDDIS
    h.command(I8042_CMD_KBD_ENABLE)
    assert not h.command(I8042_CMD_CTL_RCTR)[0] & I8042_CTR_KBDDIS
    h.command(I8042_CMD_AUX_DISABLE)
    assert h.command(I8042_CMD_CTL_RCTR)[0] & I8042_CTR_AUXDIS
    h.command(I8042_CMD_AUX_ENABLE)
    assert not h.command(I8042_CMD_CTL_RCTR)[0] & I8042_CTR_AUXDIS


def test_aux_loop_flags_auxdata_and_raises_no_keyboard_irq(h):
    assert h.command(I8042_CMD_AUX_LOOP, [0xA5]) == [0xA5]
    assert h.irqs == 0
    assert not h.status() & (I8042_STR_OBF | I8042_STR_AUXDATA)


def test_kbd_loop_looks_like_keyboard_data(h):
    assert h.command(I8042_CMD_KBD_LOOP, [0x1C]) == [0x1C]
    assert h.irqs == 1


def test_status_register_bits(h):
    assert h.status() == I8042_STR_KEYLOCK | 0x04  # not inhibited, SYS flag (POST passed)
    h.dev.write(STATUS, 0x20)
    assert h.status() == I8042_STR_KEYLOCK | 0x04 | I8042_STR_CMDDAT | I8042_STR_OBF
    h.dev.read(DATA)
    h.dev.write(DATA, 0xF4)
    assert not h.status() & I8042_STR_CMDDAT


def test_empty_output_buffer_reads_zero(h):
    assert h.dev.read(DATA) == 0


def test_flush_never_exceeds_the_buffer_size(h):
    h.dev.trigger_ctrl_alt_del()
    assert h.flush() <= I8042_BUFFER_SIZE


# --- reset ------------------------------------------------------------------------------------


def test_reset_command_fe(h):
    h.dev.write(STATUS, 0xFE)
    assert h.resets == 1
    assert h.dev.reset_count == 1


@pytest.mark.parametrize("cmd,resets", [(0xF0, 1), (0xFC, 1), (0xFD, 0), (0xFF, 0), (0xFB, 0)])
def test_pulse_output_port_resets_only_when_bit_0_is_pulsed(h, cmd, resets):
    h.dev.write(STATUS, cmd)
    assert h.resets == resets


def test_write_output_port_with_reset_line_low_resets(h):
    assert h.command(0x01D0) == [0x03]  # read output port: running, A20 on
    h.command(0x10D1, [0x03])
    assert h.resets == 0
    h.command(0x10D1, [0xDE])
    assert h.resets == 1
    assert h.command(0x01D0) == [0xDE]


def test_reset_is_an_effect_not_a_device_reset(h):
    h.command(I8042_CMD_CTL_WCTR, [0x45])
    h.dev.write(STATUS, 0xFE)
    assert h.command(I8042_CMD_CTL_RCTR) == [0x45]


# --- keyboard ------------------------------------------------------------------------------------


def test_keyboard_commands_are_acknowledged_with_an_interrupt(h):
    h.dev.write(DATA, 0xF4)  # enable scanning
    assert h.irqs == 1
    assert h.drain() == b"\xfa"


def test_keyboard_get_id(h):
    h.dev.write(DATA, 0xF2)
    assert h.drain() == b"\xfa\xab\x83"
    h.command(I8042_CMD_CTL_WCTR, [0x45])  # translation on
    h.dev.write(DATA, 0xF2)
    assert h.drain() == b"\xfa\xab\x41"


def test_keyboard_reset_echo_leds_and_scancode_set(h):
    h.dev.write(DATA, 0xFF)
    assert h.drain() == b"\xfa\xaa"
    h.dev.write(DATA, 0xEE)
    assert h.drain() == b"\xee"
    h.dev.write(DATA, 0xED)  # set LEDs: ack, then the parameter is acked
    assert h.drain() == b"\xfa"
    h.dev.write(DATA, 0x07)
    assert h.drain() == b"\xfa"
    h.dev.write(DATA, 0xF0)
    h.dev.write(DATA, 0x00)  # which set?
    assert h.drain() == b"\xfa\x02"
    h.dev.write(DATA, 0xF0)
    h.dev.write(DATA, 0x03)
    h.dev.write(DATA, 0xF0)
    h.dev.write(DATA, 0x00)
    assert h.drain() == b"\xfa\x03"


def test_one_interrupt_per_byte_read(h):
    h.dev.write(DATA, 0xF2)
    assert h.irqs == 1
    h.dev.read(DATA)
    assert h.irqs == 2
    h.dev.read(DATA)
    assert h.irqs == 3
    h.dev.read(DATA)
    assert h.irqs == 3  # nothing left: no interrupt


def test_no_interrupt_while_kbdint_is_off(h):
    h.command(I8042_CMD_CTL_WCTR, [0x04])
    h.dev.write(DATA, 0xF2)
    assert h.irqs == 0
    assert h.drain() == b"\xfa\xab\x83"


def test_a_controller_command_aborts_a_pending_parameter(h):
    h.dev.write(STATUS, 0x60)
    h.dev.write(STATUS, 0xAA)
    assert h.dev.read(DATA) == 0x55
    h.dev.write(DATA, 0x00)  # goes to the keyboard now, not to the CTR
    assert h.drain() == b"\xfa"
    assert h.command(I8042_CMD_CTL_RCTR) == [0x05]


# --- Ctrl-Alt-Del --------------------------------------------------------------------------------

SET2 = bytes([0x14, 0x11, 0xE0, 0x71, 0xE0, 0xF0, 0x71, 0xF0, 0x11, 0xF0, 0x14])
SET1 = bytes([0x1D, 0x38, 0xE0, 0x53, 0xE0, 0xD3, 0xB8, 0x9D])


def test_ctrl_alt_del_set2_after_linux_probe(h):
    linux_probe(h)
    irqs = h.irqs
    assert h.dev.trigger_ctrl_alt_del() is True
    assert h.irqs == irqs + 1
    got = bytearray()
    while h.status() & I8042_STR_OBF:  # i8042_interrupt: one byte per IRQ
        got.append(h.dev.read(DATA))
    assert bytes(got) == SET2
    assert h.irqs == irqs + len(SET2)


def test_ctrl_alt_del_translated(h):
    h.command(I8042_CMD_CTL_WCTR, [0x05 | I8042_CTR_XLATE])
    assert h.dev.trigger_ctrl_alt_del()
    assert h.drain() == SET1


def test_ctrl_alt_del_in_set_3(h):
    h.dev.write(DATA, 0xF0)
    h.dev.write(DATA, 0x03)
    h.drain()
    assert h.dev.trigger_ctrl_alt_del()
    assert h.drain() == bytes([0x11, 0x19, 0x64, 0xF0, 0x64, 0xF0, 0x19, 0xF0, 0x11])


def test_ctrl_alt_del_refused_when_keyboard_disabled_or_buffer_full(h):
    h.command(I8042_CMD_KBD_DISABLE)
    assert h.dev.trigger_ctrl_alt_del() is False
    assert h.dev.output_len == 0
    h.command(I8042_CMD_KBD_ENABLE)
    assert h.dev.trigger_ctrl_alt_del() is True
    assert h.dev.trigger_ctrl_alt_del() is False  # 11 + 11 > 16: refused whole, not truncated
    assert h.dev.output_len == len(SET2)


def test_ctrl_alt_del_without_kbdint_queues_silently(h):
    h.command(I8042_CMD_CTL_WCTR, [0x04])
    assert h.dev.trigger_ctrl_alt_del()
    assert h.irqs == 0
    assert h.drain() == SET2


# --- persistence -----------------------------------------------------------------------------------


def test_state_round_trip(h):
    linux_probe(h)
    h.dev.write(DATA, 0xF0)  # a keyboard command waiting for its parameter
    h.dev.read(DATA)
    h.dev.trigger_ctrl_alt_del()
    h.dev.write(STATUS, 0xD1)  # a controller command waiting for its parameter
    state = h.dev.state()
    assert state.pending_command == 0xD1 and state.pending_kbd_command == 0xF0
    assert state.output == SET2
    twin = Harness()
    twin.dev = I8042.from_state(state, twin._reset, twin._irq)
    assert twin.dev.state() == state
    assert twin.irqs == 1  # keyboard bytes were waiting: the edge is delivered again
    for hh in (h, twin):
        hh.dev.write(DATA, 0x03)
        hh.seen = (hh.drain(), hh.command(0x01D0), hh.dev.state())
    assert h.seen == twin.seen


def test_restoring_a_quiet_controller_raises_nothing():
    dev = I8042.from_state(I8042State(), lambda: None, lambda: pytest.fail("no interrupt expected"))
    assert dev.state() == I8042(lambda: None, lambda: None).state()


@pytest.mark.parametrize("changes", [
    {"ctr": 0x80},
    {"ctr": 256},
    {"outp": -1},
    {"ctr": True},
    {"last_write_was_command": 1},
    {"pending_command": 0xAA},              # takes no parameter
    {"pending_kbd_command": 0xF4},
    {"scancode_set": 0},
    {"scancode_set": 4},
    {"output": b"\x00" * 17},
    {"output": [1, 2]},
    {"output_is_aux": True},                # AUX flag without a byte
    {"output": b"\x01\x02", "output_is_aux": True},
])
def test_bad_state_is_rejected(changes):
    with pytest.raises(I8042StateInvalid):
        I8042.from_state(dataclasses.replace(I8042State(), **changes), lambda: None, lambda: None)


# --- as a bus device ---------------------------------------------------------------------------------


def test_pio_adapter_on_the_bus():
    h = Harness()
    adapter = I8042PioAdapter(h.dev)
    bus = Bus.pio()
    bus.insert(adapter, I8042_BASE, I8042_PORT_COUNT)
    assert I8042_KBD_IRQ == 1
    assert bus.write(0x64, b"\xaa")
    assert bus.read(0x64, 1)[0] & I8042_STR_OBF
    assert bus.read(0x60, 1) == b"\x55"
    assert bus.read(0x61, 3) == b"\xff\xff\xff"  # not i8042 registers
    assert bus.write(0x61, b"\x00")
    assert adapter.trigger_ctrl_alt_del()
    assert adapter.state().output == SET2
    assert bus.write(0x64, b"\xfe")
    assert h.resets == 1
    assert "I8042" in repr(adapter) and "\n" not in repr(adapter)


# --- fuzz ----------------------------------------------------------------------------------------------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("r"), st.integers(-1, 6), st.just(0)),
        st.tuples(st.just("w"), st.integers(-1, 6), st.integers(0, 0x1FF)),
        st.tuples(st.just("cad"), st.just(0), st.just(0)),
    ),
    max_size=300,
)


@settings(max_examples=300, deadline=None)
@given(ops=ops)
def test_fuzz_register_interface_never_raises_and_stays_bounded(ops):
    h = Harness()
    for kind, off, value in ops:
        if kind == "r":
            assert 0 <= h.dev.read(off) <= 0xFF
        elif kind == "w":
            h.dev.write(off, value)
        else:
            h.dev.trigger_ctrl_alt_del()
        assert h.dev.output_len <= I8042_BUFFER_SIZE
    state = h.dev.state()
    assert I8042.from_state(state, lambda: None, lambda: None).state() == state

"""An i8042 keyboard controller: enough for Linux to probe it, reboot through it, and get Ctrl-Alt-Del.

Primer (IBM PC/AT Technical Reference, "Keyboard Controller"; Linux
drivers/input/serio/i8042.[ch]). Two ports: 0x60 is data (read: the output
buffer; write: a parameter for the pending controller command, else a byte
for the keyboard) and 0x64 is status (read) / controller command (write).
Status bits: OBF (output buffer full), IBF (input buffer full: never, we
consume instantly), SYS, CMD/DATA (last write went to 0x64), KEYLOCK (1 =
not inhibited), AUXDATA (the byte in the output buffer came from the AUX
port). The controller's RAM byte 0 is the command byte / CTR: keyboard and
AUX interrupt enables, SYS flag, keyboard and AUX interface disable, and
XLATE (translate keyboard scancode set 2 to set 1).

What Linux's i8042 driver does at probe, and what this answers:
flush (read status/data until OBF clears), read CTR (0x20) twice until
stable, write CTR (0x60) with the keyboard disabled, self test 0xAA -> 0x55,
keyboard interface test 0xAB -> 0x00, AUX loop 0xD3 (the byte comes back
flagged AUXDATA), AUX disable/enable 0xA7/0xA8 (CTR AUXDIS follows, which
the driver checks by reading CTR back), AUX test 0xA9 -> 0x00. There is no
AUX device and no IRQ 12, so the driver's AUX interrupt test times out (a
250 ms sleep, no polling) and it carries on with the keyboard only;
`i8042.noaux` skips that. Keyboard commands written to 0x60 are answered
like a PS/2 keyboard would (ACK 0xFA; reset -> 0xFA 0xAA; get ID -> 0xFA
0xAB 0x83; echo -> 0xEE; scancode-set query -> 0xFA 0xFA set), each byte
raising IRQ 1 when CTR.KBDINT is set; Linux's handler takes one byte per
interrupt, so after each data read that leaves keyboard bytes queued the
interrupt is raised again. Controller command responses raise no interrupt
(Linux polls for them with its lock held).

Reset: command 0xFE (pulse output-port bit 0, the CPU reset line; Linux's
`reboot=k`), any other 0xF0-0xFE pulse with bit 0 clear, or writing the
output port (0xD1) with bit 0 clear calls `reset()`.

Ctrl-Alt-Del: the CTR starts without XLATE (as Firecracker's), so Linux
sees a controller in "direct" mode and its atkbd driver reads raw scancode
set 2. `trigger_ctrl_alt_del` therefore queues set-2 make and break codes
(14 11 E0 71 then E0 F0 71, F0 11, F0 14). If the guest turned translation
on it gets the set-1 codes the controller would have produced (1D 38 E0 53
E0 D3 B8 9D); if it switched the keyboard to set 1 or 3, that set's codes.

Bounded: the output queue holds at most 16 bytes (Linux's I8042_BUFFER_SIZE);
a controller or keyboard command response first clears it (a PS/2 keyboard
clears its buffer when it gets a command).
"""

from __future__ import annotations

from collections import deque
from contextlib import AbstractContextManager
from dataclasses import dataclass, fields
from typing import Any, Callable

from vmm.devices.bus import ByteRegisterAdapter

__all__ = [
    "I8042_BASE",
    "I8042_PORT_COUNT",
    "I8042_KBD_IRQ",
    "I8042Error",
    "I8042StateInvalid",
    "I8042State",
    "I8042",
    "I8042PioAdapter",
]

# PC/AT I/O map: data port 0x60, status/command port 0x64; keyboard on IRQ 1.
I8042_BASE = 0x60
I8042_PORT_COUNT = 5
I8042_KBD_IRQ = 1
DATA = 0  # port 0x60
STATUS = COMMAND = 4  # port 0x64

# Status register (Linux i8042.h I8042_STR_*).
STR_OBF = 0x01
STR_IBF = 0x02
STR_SYS = 0x04
STR_CMDDAT = 0x08
STR_KEYLOCK = 0x10
STR_AUXDATA = 0x20

# Command byte / CTR (Linux i8042.h I8042_CTR_*, plus bit 2, the SYS flag).
CTR_KBDINT = 0x01
CTR_AUXINT = 0x02
CTR_SYS = 0x04
CTR_IGNKEYLOCK = 0x08
CTR_KBDDIS = 0x10
CTR_AUXDIS = 0x20
CTR_XLATE = 0x40
# Interrupts on, POST passed; no translation (Linux then drives the keyboard in set 2).
RESET_CTR = CTR_KBDINT | CTR_SYS

# Controller commands written to port 0x64 (PC/AT Technical Reference; Linux I8042_CMD_*).
CMD_READ_CTR = 0x20
CMD_WRITE_CTR = 0x60
CMD_AUX_DISABLE = 0xA7
CMD_AUX_ENABLE = 0xA8
CMD_AUX_TEST = 0xA9
CMD_CTL_TEST = 0xAA
CMD_KBD_TEST = 0xAB
CMD_KBD_DISABLE = 0xAD
CMD_KBD_ENABLE = 0xAE
CMD_READ_INPUT = 0xC0
CMD_READ_OUTP = 0xD0
CMD_WRITE_OUTP = 0xD1
CMD_KBD_LOOP = 0xD2
CMD_AUX_LOOP = 0xD3
CMD_AUX_SEND = 0xD4
CMD_PULSE_FIRST = 0xF0  # 0xF0-0xFF: pulse output-port bits 0-3 whose command bit is 0
CMD_RESET_CPU = 0xFE
# Commands whose parameter byte follows on port 0x60.
CMDS_WITH_PARAM = frozenset({CMD_WRITE_CTR, CMD_WRITE_OUTP, CMD_KBD_LOOP, CMD_AUX_LOOP, CMD_AUX_SEND})

RET_CTL_TEST = 0x55  # Linux I8042_RET_CTL_TEST
RET_KBD_TEST = 0x00  # interface test: no error
RET_AUX_TEST = 0x00
# Input port: bit 7 keyboard not inhibited, bit 5 no manufacturing jumper (AT reference).
INPUT_PORT = 0xA0
# Output port: bit 0 CPU reset (active low, so 1 = running), bit 1 A20 gate enabled.
OUTP_RESET_LINE = 0x01
RESET_OUTP = 0x03

# PS/2 keyboard commands and replies (IBM Keyboard Technical Reference; Linux atkbd.c).
KBD_CMD_SET_LEDS = 0xED
KBD_CMD_ECHO = 0xEE
KBD_CMD_SCANCODE_SET = 0xF0
KBD_CMD_GET_ID = 0xF2
KBD_CMD_SET_TYPEMATIC = 0xF3
KBD_CMD_RESET = 0xFF
KBD_CMDS_WITH_PARAM = frozenset({KBD_CMD_SET_LEDS, KBD_CMD_SCANCODE_SET, KBD_CMD_SET_TYPEMATIC})
KBD_ACK = 0xFA
KBD_BAT_OK = 0xAA
KBD_ECHO = 0xEE
KBD_ID = (0xAB, 0x83)  # MF2 keyboard
KBD_ID_TRANSLATED = (0xAB, 0x41)  # what the 8042 hands over for 0x83 with XLATE on
DEFAULT_SCANCODE_SET = 2

BUF_SIZE = 16  # Linux I8042_BUFFER_SIZE

# Ctrl (left), Alt (left), Delete pressed then released, per scancode set.
CTRL_ALT_DEL = {
    1: bytes((0x1D, 0x38, 0xE0, 0x53, 0xE0, 0xD3, 0xB8, 0x9D)),
    2: bytes((0x14, 0x11, 0xE0, 0x71, 0xE0, 0xF0, 0x71, 0xF0, 0x11, 0xF0, 0x14)),
    3: bytes((0x11, 0x19, 0x64, 0xF0, 0x64, 0xF0, 0x19, 0xF0, 0x11)),
}


class I8042Error(Exception):
    """The i8042 device could not be built or restored."""


class I8042StateInvalid(I8042Error):
    """A saved i8042 state is out of range or inconsistent."""


@dataclass(frozen=True)
class I8042State:
    """The controller's registers, its pending command and the output queue."""

    ctr: int = RESET_CTR
    outp: int = RESET_OUTP
    last_write_was_command: bool = False
    pending_command: int = 0  # a controller command waiting for its parameter on 0x60, or 0
    pending_kbd_command: int = 0  # a keyboard command waiting for its parameter, or 0
    scancode_set: int = DEFAULT_SCANCODE_SET
    output: bytes = b""
    output_is_aux: bool = False  # the (single) byte in `output` came through the AUX loop


class I8042:
    """The i8042 register model (byte registers at offsets 0 and 4). Not thread-safe: see `I8042PioAdapter`.

    `reset()` is called when the guest pulses the CPU reset line;
    `interrupt()` raises IRQ 1. Both run synchronously on the calling thread.
    """

    def __init__(self, reset: Callable[[], None], interrupt: Callable[[], None]):
        self.reset = reset
        self.interrupt = interrupt
        self._ctr = RESET_CTR
        self._outp = RESET_OUTP
        self._last_write_was_command = False
        self._pending_command = 0
        self._pending_kbd_command = 0
        self._scancode_set = DEFAULT_SCANCODE_SET
        self._out: deque[int] = deque()
        self._out_is_aux = False
        self.reset_count = 0

    # --- registers -----------------------------------------------------------------

    def _status(self) -> int:
        status = STR_KEYLOCK | (self._ctr & CTR_SYS)
        if self._out:
            status |= STR_OBF
            if self._out_is_aux:
                status |= STR_AUXDATA
        if self._last_write_was_command:
            status |= STR_CMDDAT
        return status

    @property
    def output_len(self) -> int:
        return len(self._out)

    def read(self, offset: int) -> int:
        """A guest read of port 0x60 (offset 0) or 0x64 (offset 4); other offsets read 0xff."""
        if offset == STATUS:
            return self._status()
        if offset != DATA:
            return 0xFF
        if not self._out:
            return 0x00
        value = self._out.popleft()
        self._out_is_aux = False
        if self._out and self._ctr & CTR_KBDINT:
            # One byte per interrupt: tell the guest there is another.
            self.interrupt()
        return value

    def write(self, offset: int, value: int) -> None:
        """A guest write of port 0x60 (offset 0) or 0x64 (offset 4); other offsets are ignored."""
        value &= 0xFF
        if offset == COMMAND:
            self._last_write_was_command = True
            self._pending_command = 0
            self._command(value)
        elif offset == DATA:
            self._last_write_was_command = False
            if self._pending_command:
                command, self._pending_command = self._pending_command, 0
                self._command_param(command, value)
            else:
                self._keyboard(value)

    # --- controller ------------------------------------------------------------------

    def _respond(self, value: int, *, aux: bool = False) -> None:
        """A controller response replaces whatever the output buffer held."""
        self._out.clear()
        self._out.append(value)
        self._out_is_aux = aux

    def _command(self, cmd: int) -> None:
        if cmd in CMDS_WITH_PARAM:
            self._pending_command = cmd
        elif cmd == CMD_READ_CTR:
            self._respond(self._ctr)
        elif CMD_READ_CTR < cmd < CMD_READ_CTR + 0x20:
            self._respond(0x00)  # controller RAM bytes 1-31: not used by anyone, read as 0
        elif CMD_WRITE_CTR < cmd < CMD_WRITE_CTR + 0x20:
            self._pending_command = cmd  # RAM bytes 1-31: the parameter is swallowed
        elif cmd == CMD_AUX_DISABLE:
            self._ctr |= CTR_AUXDIS
        elif cmd == CMD_AUX_ENABLE:
            self._ctr &= ~CTR_AUXDIS
        elif cmd == CMD_AUX_TEST:
            self._respond(RET_AUX_TEST)
        elif cmd == CMD_CTL_TEST:
            self._respond(RET_CTL_TEST)
        elif cmd == CMD_KBD_TEST:
            self._respond(RET_KBD_TEST)
        elif cmd == CMD_KBD_DISABLE:
            self._ctr |= CTR_KBDDIS
        elif cmd == CMD_KBD_ENABLE:
            self._ctr &= ~CTR_KBDDIS
        elif cmd == CMD_READ_INPUT:
            self._respond(INPUT_PORT)
        elif cmd == CMD_READ_OUTP:
            self._respond(self._outp)
        elif cmd >= CMD_PULSE_FIRST and not cmd & OUTP_RESET_LINE:
            self._pulse_reset()
        # Anything else: no such command on this controller; ignored.

    def _command_param(self, cmd: int, value: int) -> None:
        if cmd == CMD_WRITE_CTR:
            self._ctr = value & 0x7F  # bit 7 is reserved, reads 0
        elif cmd == CMD_WRITE_OUTP:
            self._outp = value
            if not value & OUTP_RESET_LINE:
                self._pulse_reset()
        elif cmd == CMD_KBD_LOOP:
            self._respond(value)
            if self._ctr & CTR_KBDINT:
                self.interrupt()
        elif cmd == CMD_AUX_LOOP:
            # No IRQ 12 is wired: the byte is there to be polled, flagged as AUX data.
            self._respond(value, aux=True)
        # CMD_AUX_SEND and RAM writes: no AUX device, nothing else to store.

    def _pulse_reset(self) -> None:
        self.reset_count += 1
        self.reset()

    # --- keyboard --------------------------------------------------------------------

    def _kbd_reply(self, data: bytes) -> None:
        # A PS/2 keyboard clears its buffer when it receives a command.
        self._out.clear()
        self._out_is_aux = False
        self._out.extend(data)
        if self._ctr & CTR_KBDINT:
            self.interrupt()

    def _keyboard(self, value: int) -> None:
        if self._pending_kbd_command:
            cmd, self._pending_kbd_command = self._pending_kbd_command, 0
            if cmd == KBD_CMD_SCANCODE_SET:
                if value == 0:
                    self._kbd_reply(bytes((KBD_ACK, self._scancode_set)))
                    return
                if value in CTRL_ALT_DEL:
                    self._scancode_set = value
            self._kbd_reply(bytes((KBD_ACK,)))
            return
        if value in KBD_CMDS_WITH_PARAM:
            self._pending_kbd_command = value
            self._kbd_reply(bytes((KBD_ACK,)))
        elif value == KBD_CMD_RESET:
            self._scancode_set = DEFAULT_SCANCODE_SET
            self._kbd_reply(bytes((KBD_ACK, KBD_BAT_OK)))
        elif value == KBD_CMD_GET_ID:
            ident = KBD_ID_TRANSLATED if self._ctr & CTR_XLATE else KBD_ID
            self._kbd_reply(bytes((KBD_ACK, *ident)))
        elif value == KBD_CMD_ECHO:
            self._kbd_reply(bytes((KBD_ECHO,)))
        else:
            # Enable/disable scanning, defaults, typematic modes, resend: all acknowledged.
            self._kbd_reply(bytes((KBD_ACK,)))

    def trigger_ctrl_alt_del(self) -> bool:
        """Press and release Ctrl+Alt+Del; False (nothing queued) if the keyboard is disabled or the queue lacks room."""
        if self._ctr & CTR_KBDDIS:
            return False
        if self._ctr & CTR_XLATE:
            seq = CTRL_ALT_DEL[1]
        else:
            seq = CTRL_ALT_DEL[self._scancode_set]
        if self._out_is_aux or BUF_SIZE - len(self._out) < len(seq):
            return False
        self._out.extend(seq)
        if self._ctr & CTR_KBDINT:
            self.interrupt()
        return True

    # --- persistence -------------------------------------------------------------------

    def state(self) -> I8042State:
        return I8042State(
            ctr=self._ctr, outp=self._outp, last_write_was_command=self._last_write_was_command,
            pending_command=self._pending_command, pending_kbd_command=self._pending_kbd_command,
            scancode_set=self._scancode_set, output=bytes(self._out), output_is_aux=self._out_is_aux,
        )

    @classmethod
    def from_state(cls, state: I8042State, reset: Callable[[], None],
                   interrupt: Callable[[], None]) -> I8042:
        """Rebuild the controller from untrusted saved state (`I8042StateInvalid` if impossible).

        If keyboard bytes are waiting and IRQ 1 is enabled, the interrupt is
        raised once so an edge lost across the snapshot is delivered again.
        """
        _validate(state)
        dev = cls(reset, interrupt)
        dev._ctr, dev._outp = state.ctr, state.outp
        dev._last_write_was_command = state.last_write_was_command
        dev._pending_command = state.pending_command
        dev._pending_kbd_command = state.pending_kbd_command
        dev._scancode_set = state.scancode_set
        dev._out = deque(state.output)
        dev._out_is_aux = state.output_is_aux
        if dev._out and not dev._out_is_aux and dev._ctr & CTR_KBDINT:
            dev.interrupt()
        return dev

    def __repr__(self) -> str:
        return (f"<I8042 ctr={self._ctr:#04x} status={self._status():#04x} "
                f"out={len(self._out)}/{BUF_SIZE} resets={self.reset_count}>")


def _validate(state: I8042State) -> None:
    if not isinstance(state, I8042State):
        raise I8042StateInvalid(f"expected I8042State, got {type(state).__name__}")
    for f in fields(I8042State):
        value = getattr(state, f.name)
        if f.name in ("last_write_was_command", "output_is_aux"):
            if not isinstance(value, bool):
                raise I8042StateInvalid(f"{f.name} must be a bool")
        elif f.name == "output":
            if not isinstance(value, bytes):
                raise I8042StateInvalid("output must be bytes")
        elif type(value) is not int or not 0 <= value <= 0xFF:
            raise I8042StateInvalid(f"{f.name} must be a byte, got {value!r}")
    if state.ctr & 0x80:
        raise I8042StateInvalid(f"ctr {state.ctr:#04x} has the reserved bit 7 set")
    param_cmds = CMDS_WITH_PARAM | set(range(CMD_WRITE_CTR + 1, CMD_WRITE_CTR + 0x20))
    if state.pending_command and state.pending_command not in param_cmds:
        raise I8042StateInvalid(f"pending_command {state.pending_command:#04x} takes no parameter")
    if state.pending_kbd_command and state.pending_kbd_command not in KBD_CMDS_WITH_PARAM:
        raise I8042StateInvalid(f"pending_kbd_command {state.pending_kbd_command:#04x} takes no parameter")
    if state.scancode_set not in CTRL_ALT_DEL:
        raise I8042StateInvalid(f"scancode_set {state.scancode_set} is not 1, 2 or 3")
    if len(state.output) > BUF_SIZE:
        raise I8042StateInvalid(f"output holds {len(state.output)} bytes, the queue only {BUF_SIZE}")
    if state.output_is_aux and len(state.output) != 1:
        raise I8042StateInvalid("output_is_aux needs exactly one byte of output")


class I8042PioAdapter(ByteRegisterAdapter):
    """The i8042 as a port-I/O bus device: `bus.insert(a, I8042_BASE, I8042_PORT_COUNT)`.

    Offsets 1-3 (ports 0x61-0x63) belong to no i8042 register: they read
    0xff and ignore writes, like unclaimed ports.
    """

    def __init__(self, i8042: I8042, *, lock: AbstractContextManager[Any] | None = None):
        super().__init__(i8042, lock=lock)
        self.i8042 = i8042

    def trigger_ctrl_alt_del(self) -> bool:
        with self.lock:
            return self.i8042.trigger_ctrl_alt_del()

    def state(self) -> I8042State:
        with self.lock:
            return self.i8042.state()

"""A 16550A UART: the guest's serial console (COM1, ports 0x3f8-0x3ff, IRQ 4).

Primer (National Semiconductor PC16550D datasheet, "Registers"). Eight byte
registers sit at consecutive ports; offset 0 and 1 have a second meaning
while the Divisor Latch Access Bit (LCR bit 7, DLAB) is set:

    off  read              write             DLAB=1
    0    RBR receive buf   THR transmit      DLL divisor low
    1    IER int. enable   IER               DLM divisor high
    2    IIR int. ident.   FCR FIFO control
    3    LCR line control  LCR
    4    MCR modem control MCR
    5    LSR line status   (factory test)
    6    MSR modem status  (factory test)
    7    SCR scratch       SCR

Four interrupt causes, highest priority first, each enabled by an IER bit:
receiver line status (an overrun), received data available, transmitter
holding register empty (THRE), modem status (a delta bit in MSR). IIR reports
the highest pending enabled cause (bit 0 clear = a cause is pending; bits 7:6
are set while the FIFOs are enabled). Each cause is cleared by its own
action: reading LSR, draining the receiver, reading IIR while it reports THRE
or writing THR, reading MSR.

The model transmits instantly: a byte written to THR leaves at once through
`out` (or, in loopback mode, arrives in the receive FIFO), so THR and the
transmitter are always empty (LSR THRE and TEMT always set) and the THRE
cause is raised again after every THR write while IER.ETBEI is set. The
received-data cause is raised whenever the receive FIFO holds data (the
FIFO trigger level and the character-timeout cause are not modelled; Linux
reads until LSR.DR clears either way).

Interrupt line. As on a PC, the UART's INTR output reaches the interrupt
controller only while MCR.OUT2 is set, and never in loopback mode (the
datasheet forces OUT2 inactive internally). The model computes that line
level after every access and calls `interrupt()` on each rising edge: the
VMM wires it to an irqfd / IRQ line pulse, which an edge-triggered ISA IRQ
turns into exactly the interrupts real hardware would raise. Linux's 8250
handler loops until IIR reports no cause, so the line is low whenever it
returns and the next cause makes a new edge.

Bounded everything: the receive FIFO holds at most 64 bytes (1 byte, the
RBR, while the FIFOs are disabled, as in the 16450 mode); `enqueue_input`
takes only what fits and a loopback overrun drops bytes and sets LSR.OE.
Output is handed to `out` one byte per THR write, never buffered here.

Linux's probe (drivers/tty/serial/8250/8250_port.c, `autoconfig`) is what
this must satisfy: IER keeps only its low four bits (the IER test and the
XScale UUE test); loopback reflects MCR DTR/RTS/OUT1/OUT2 into MSR
DSR/CTS/RI/DCD (status 0x90 for MCR=LOOP|OUT2|RTS); with FCR.FIFO enabled IIR
bits 7:6 read 11 (a 16550A); `size_fifo` counts 64 bytes looped back; at
startup enabling IER.ETBEI makes IIR report THRE at once, and again after
IER is cleared and set (else Linux assumes UART_BUG_THRE/TXEN and polls).
"""

from __future__ import annotations

from collections import deque
from contextlib import AbstractContextManager
from dataclasses import dataclass, fields
from typing import Any, Callable

from vmm.devices.bus import ByteRegisterAdapter

__all__ = [
    "COM1_BASE",
    "COM1_IRQ",
    "UART_PORT_COUNT",
    "FIFO_SIZE",
    "SerialError",
    "SerialStateInvalid",
    "SerialState",
    "Uart16550",
    "SerialPioAdapter",
]

# PC/AT standard COM1 resources (IBM PC/AT Technical Reference, I/O address map).
COM1_BASE = 0x3F8
COM1_IRQ = 4
UART_PORT_COUNT = 8

# PC16550D datasheet §8.4 "FIFO Control Register": 16-byte FIFOs on the real
# part; we offer 64 (as a 16750 or Linux's "U6_16550A" does) to cut exits.
FIFO_SIZE = 64

# Register offsets (PC16550D Table II "Summary of Registers").
RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

# IER bits (§8.5 "Interrupt Enable Register"); bits 4-7 are always 0.
IER_ERBFI = 0x01  # received data available
IER_ETBEI = 0x02  # transmitter holding register empty
IER_ELSI = 0x04  # receiver line status
IER_EDSSI = 0x08  # modem status
IER_MASK = 0x0F

# IIR (§8.6 "Interrupt Identification Register", Table IV).
IIR_NO_INT = 0x01
IIR_RLS = 0x06
IIR_RDA = 0x04
IIR_THRE = 0x02
IIR_MS = 0x00
IIR_FIFO_ENABLED = 0xC0

# FCR bits (§8.4 "FIFO Control Register").
FCR_FIFO_ENABLE = 0x01
FCR_RCVR_RESET = 0x02
FCR_XMIT_RESET = 0x04
FCR_DMA_MODE = 0x08
FCR_RCVR_TRIGGER = 0xC0
# What the register keeps (the reset bits self-clear, bits 4-5 are reserved).
FCR_STORED = FCR_FIFO_ENABLE | FCR_DMA_MODE | FCR_RCVR_TRIGGER

# LCR bit 7 (§8.1 "Line Control Register").
LCR_DLAB = 0x80

# MCR bits (§8.7 "Modem Control Register"); bits 5-7 are always 0.
MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

# LSR bits (§8.3 "Line Status Register").
LSR_DR = 0x01
LSR_OE = 0x02
LSR_THRE = 0x20
LSR_TEMT = 0x40

# MSR bits (§8.8 "Modem Status Register").
MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_DELTA_MASK = 0x0F
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80

# The virtual line outside loopback: a connected terminal (carrier, DSR,
# clear to send), no ring.
HOST_MODEM_LINES = MSR_CTS | MSR_DSR | MSR_DCD

# Reset values. IER/FCR/IIR/LSR/MSR deltas per the datasheet's reset table;
# DLL=12 (9600 baud), LCR=8N1 and MCR=OUT2 as PC firmware leaves the port.
RESET_DLL = 0x0C
RESET_DLM = 0x00
RESET_LCR = 0x03
RESET_MCR = MCR_OUT2


class SerialError(Exception):
    """The serial device could not be built or restored."""


class SerialStateInvalid(SerialError):
    """A saved serial state is out of range or inconsistent."""


@dataclass(frozen=True)
class SerialState:
    """Every 16550A register (as it would read, without side effects) plus the receive FIFO.

    `thre_pending` is the THRE interrupt latch, which IIR shows only when no
    higher cause is pending, so it is saved on its own.
    """

    dll: int = RESET_DLL
    dlm: int = RESET_DLM
    ier: int = 0
    iir: int = IIR_NO_INT
    fcr: int = 0
    lcr: int = RESET_LCR
    mcr: int = RESET_MCR
    lsr: int = LSR_THRE | LSR_TEMT
    msr: int = HOST_MODEM_LINES
    scr: int = 0
    thre_pending: bool = False
    rx_fifo: bytes = b""


def _modem_lines(mcr: int) -> int:
    """MSR bits 7:4 as the modem inputs currently drive them."""
    if not mcr & MCR_LOOP:
        return HOST_MODEM_LINES
    # Loopback (§8.7 bit 4): DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD.
    lines = 0
    if mcr & MCR_DTR:
        lines |= MSR_DSR
    if mcr & MCR_RTS:
        lines |= MSR_CTS
    if mcr & MCR_OUT1:
        lines |= MSR_RI
    if mcr & MCR_OUT2:
        lines |= MSR_DCD
    return lines


class Uart16550:
    """The 16550A register model. Not thread-safe: `SerialPioAdapter` serialises it.

    `interrupt()` is called on each rising edge of the interrupt line; `out(b)`
    receives each transmitted byte (None discards output); `on_rx_space()` is
    called when a guest access makes room in a receive FIFO that had none, so
    a paused input source can resume. All three run synchronously on the
    calling thread and must not call back into the UART.
    """

    def __init__(self, interrupt: Callable[[], None], out: Callable[[bytes], None] | None,
                 *, on_rx_space: Callable[[], None] | None = None):
        self.interrupt = interrupt
        self.out = out
        self.on_rx_space = on_rx_space
        self._dll = RESET_DLL
        self._dlm = RESET_DLM
        self._ier = 0
        self._fcr = 0
        self._lcr = RESET_LCR
        self._mcr = RESET_MCR
        self._scr = 0
        self._overrun = False
        self._msr_delta = 0
        self._thre_pending = False
        self._rx: deque[int] = deque()
        # Bytes `out` failed to take (it raised OSError); the byte is lost, the guest is not blocked.
        self.tx_lost = 0

    # --- derived registers -------------------------------------------------------

    @property
    def _rx_capacity(self) -> int:
        return FIFO_SIZE if self._fcr & FCR_FIFO_ENABLE else 1

    def rx_free(self) -> int:
        """How many bytes `enqueue_input` would take now (0 in loopback mode)."""
        if self._mcr & MCR_LOOP:
            return 0
        return self._rx_capacity - len(self._rx)

    def _lsr(self) -> int:
        lsr = LSR_THRE | LSR_TEMT
        if self._rx:
            lsr |= LSR_DR
        if self._overrun:
            lsr |= LSR_OE
        return lsr

    def _msr(self) -> int:
        return _modem_lines(self._mcr) | self._msr_delta

    def _cause(self) -> int | None:
        """The IIR code of the highest-priority enabled pending cause, if any."""
        if self._ier & IER_ELSI and self._overrun:
            return IIR_RLS
        if self._ier & IER_ERBFI and self._rx:
            return IIR_RDA
        if self._ier & IER_ETBEI and self._thre_pending:
            return IIR_THRE
        if self._ier & IER_EDSSI and self._msr_delta:
            return IIR_MS
        return None

    def _iir(self) -> int:
        cause = self._cause()
        iir = IIR_NO_INT if cause is None else cause
        if self._fcr & FCR_FIFO_ENABLE:
            iir |= IIR_FIFO_ENABLED
        return iir

    def _line(self) -> bool:
        """The interrupt line as the PC's interrupt controller sees it."""
        if self._mcr & MCR_LOOP or not self._mcr & MCR_OUT2:
            return False
        return self._cause() is not None

    @property
    def irq_line(self) -> bool:
        """True while the interrupt line is asserted."""
        return self._line()

    @property
    def rx_len(self) -> int:
        return len(self._rx)

    # --- guest access ----------------------------------------------------------------

    def read(self, offset: int) -> int:
        """A guest read of the register at `offset` (0..7); side effects as the datasheet says."""
        line, free = self._line(), self.rx_free()
        dlab = self._lcr & LCR_DLAB
        if offset == RBR and dlab:
            value = self._dll
        elif offset == RBR:
            value = self._rx.popleft() if self._rx else 0
        elif offset == IER and dlab:
            value = self._dlm
        elif offset == IER:
            value = self._ier
        elif offset == IIR:
            value = self._iir()
            # Reading IIR clears a THRE cause it reports (§8.6, Table IV).
            if value & 0x0F == IIR_THRE:
                self._thre_pending = False
        elif offset == LCR:
            value = self._lcr
        elif offset == MCR:
            value = self._mcr
        elif offset == LSR:
            value = self._lsr()
            self._overrun = False
        elif offset == MSR:
            value = self._msr()
            self._msr_delta = 0
        elif offset == SCR:
            value = self._scr
        else:
            return 0xFF
        self._after(line, free)
        return value

    def write(self, offset: int, value: int) -> None:
        """A guest write of `value` (its low byte) to the register at `offset` (0..7)."""
        value &= 0xFF
        line, free = self._line(), self.rx_free()
        dlab = self._lcr & LCR_DLAB
        tx: int | None = None
        if offset == THR and dlab:
            self._dll = value
        elif offset == THR:
            if self._mcr & MCR_LOOP:
                self._receive(value)
            else:
                tx = value
            # The byte left at once: THR is empty again.
            self._thre_pending = bool(self._ier & IER_ETBEI)
        elif offset == IER and dlab:
            self._dlm = value
        elif offset == IER:
            newly_thre = value & IER_ETBEI and not self._ier & IER_ETBEI
            self._ier = value & IER_MASK
            if newly_thre:
                # THR is empty, so enabling ETBEI raises THRE at once.
                self._thre_pending = True
            elif not self._ier & IER_ETBEI:
                self._thre_pending = False
        elif offset == FCR:
            self._write_fcr(value)
        elif offset == LCR:
            self._lcr = value
        elif offset == MCR:
            self._write_mcr(value)
        elif offset == SCR:
            self._scr = value
        else:
            # LSR and MSR writes are for factory testing only (§8.3, §8.8); ignored.
            return
        try:
            if tx is not None:
                self._transmit(tx)
        finally:
            self._after(line, free)

    def _write_fcr(self, value: int) -> None:
        enable = value & FCR_FIFO_ENABLE
        if enable != self._fcr & FCR_FIFO_ENABLE:
            # Switching between FIFO and 16450 mode clears the FIFOs (§8.4 bit 0).
            self._rx.clear()
        if enable:
            if value & FCR_RCVR_RESET:
                self._rx.clear()
            self._fcr = value & FCR_STORED
        else:
            # With bit 0 clear the other bits are not programmed.
            self._fcr = 0

    def _write_mcr(self, value: int) -> None:
        old = _modem_lines(self._mcr)
        self._mcr = value & MCR_MASK
        new = _modem_lines(self._mcr)
        changed = old ^ new
        if changed & MSR_CTS:
            self._msr_delta |= MSR_DCTS
        if changed & MSR_DSR:
            self._msr_delta |= MSR_DDSR
        if changed & MSR_DCD:
            self._msr_delta |= MSR_DDCD
        if old & MSR_RI and not new & MSR_RI:
            # TERI flags the trailing edge of RI only.
            self._msr_delta |= MSR_TERI

    def _receive(self, byte: int) -> None:
        """A byte arrives from the (looped-back) line."""
        if len(self._rx) < self._rx_capacity:
            self._rx.append(byte)
            return
        self._overrun = True
        if not self._fcr & FCR_FIFO_ENABLE:
            # 16450 mode: the new character overwrites the unread RBR (§8.3 bit 1).
            self._rx[-1] = byte

    def _transmit(self, byte: int) -> None:
        if self.out is None:
            return
        try:
            self.out(bytes((byte,)))
        except OSError:
            self.tx_lost += 1

    def _after(self, line_before: bool, free_before: int) -> None:
        if not line_before and self._line():
            self.interrupt()
        if free_before == 0 and self.rx_free() > 0 and self.on_rx_space is not None:
            self.on_rx_space()

    # --- host side -----------------------------------------------------------------------

    def enqueue_input(self, data: bytes) -> int:
        """Put host input into the receive FIFO; returns how many bytes were taken.

        Takes at most `rx_free()` bytes (none in loopback mode, where the
        serial input is disconnected); the caller keeps the rest.
        """
        n = min(self.rx_free(), len(data))
        if n <= 0:
            return 0
        line = self._line()
        self._rx.extend(data[:n])
        if not line and self._line():
            self.interrupt()
        return n

    # --- persistence -----------------------------------------------------------------------

    def state(self) -> SerialState:
        """The registers and FIFO as frozen data (no side effects)."""
        return SerialState(
            dll=self._dll, dlm=self._dlm, ier=self._ier, iir=self._iir(), fcr=self._fcr,
            lcr=self._lcr, mcr=self._mcr, lsr=self._lsr(), msr=self._msr(), scr=self._scr,
            thre_pending=self._thre_pending, rx_fifo=bytes(self._rx),
        )

    @classmethod
    def from_state(cls, state: SerialState, interrupt: Callable[[], None],
                   out: Callable[[bytes], None] | None, *,
                   on_rx_space: Callable[[], None] | None = None) -> Uart16550:
        """Rebuild a UART from untrusted saved state; `SerialStateInvalid` if it is not one a UART can be in.

        If the restored interrupt line is asserted, `interrupt()` is pulsed
        once, so an edge lost across the snapshot is delivered again.
        """
        _validate(state)
        uart = cls(interrupt, out, on_rx_space=on_rx_space)
        uart._dll, uart._dlm, uart._ier = state.dll, state.dlm, state.ier
        uart._fcr, uart._lcr, uart._mcr, uart._scr = state.fcr, state.lcr, state.mcr, state.scr
        uart._overrun = bool(state.lsr & LSR_OE)
        uart._msr_delta = state.msr & MSR_DELTA_MASK
        uart._thre_pending = state.thre_pending
        uart._rx = deque(state.rx_fifo)
        if uart._iir() != state.iir:
            raise SerialStateInvalid(f"iir {state.iir:#04x} does not match the other registers ({uart._iir():#04x})")
        if uart._line():
            uart.interrupt()
        return uart

    def __repr__(self) -> str:
        return (f"<Uart16550 ier={self._ier:#04x} lcr={self._lcr:#04x} mcr={self._mcr:#04x} "
                f"rx={len(self._rx)}/{self._rx_capacity} irq={'high' if self._line() else 'low'}>")


def _validate(state: SerialState) -> None:
    if not isinstance(state, SerialState):
        raise SerialStateInvalid(f"expected SerialState, got {type(state).__name__}")
    for f in fields(SerialState):
        value = getattr(state, f.name)
        if f.name == "thre_pending":
            if not isinstance(value, bool):
                raise SerialStateInvalid("thre_pending must be a bool")
        elif f.name == "rx_fifo":
            if not isinstance(value, bytes):
                raise SerialStateInvalid("rx_fifo must be bytes")
        elif type(value) is not int or not 0 <= value <= 0xFF:
            raise SerialStateInvalid(f"{f.name} must be a byte, got {value!r}")
    if state.ier & ~IER_MASK:
        raise SerialStateInvalid(f"ier {state.ier:#04x} has bits a 16550A does not have")
    if state.mcr & ~MCR_MASK:
        raise SerialStateInvalid(f"mcr {state.mcr:#04x} has bits a 16550A does not have")
    if state.fcr & ~FCR_STORED or (state.fcr and not state.fcr & FCR_FIFO_ENABLE):
        raise SerialStateInvalid(f"fcr {state.fcr:#04x} is not a value the register can hold")
    capacity = FIFO_SIZE if state.fcr & FCR_FIFO_ENABLE else 1
    if len(state.rx_fifo) > capacity:
        raise SerialStateInvalid(f"rx_fifo holds {len(state.rx_fifo)} bytes, the FIFO only {capacity}")
    expected_lsr = LSR_THRE | LSR_TEMT | (LSR_DR if state.rx_fifo else 0)
    if state.lsr & ~LSR_OE != expected_lsr:
        raise SerialStateInvalid(f"lsr {state.lsr:#04x} does not match the FIFO (expected {expected_lsr:#04x} +OE)")
    if state.msr & ~MSR_DELTA_MASK != _modem_lines(state.mcr):
        raise SerialStateInvalid(f"msr {state.msr:#04x} does not match the modem lines for mcr {state.mcr:#04x}")
    if state.thre_pending and not state.ier & IER_ETBEI:
        raise SerialStateInvalid("thre_pending is set while IER.ETBEI is clear")


class SerialPioAdapter(ByteRegisterAdapter):
    """The UART as a port-I/O bus device for its 8 ports (`bus.insert(a, COM1_BASE, UART_PORT_COUNT)`).

    All access to the UART goes through this adapter's lock: guest accesses
    from vCPU threads and host input from the event loop. The UART's effects
    run with the lock held.
    """

    def __init__(self, uart: Uart16550, *, lock: AbstractContextManager[Any] | None = None):
        super().__init__(uart, lock=lock)
        self.uart = uart

    def enqueue_input(self, data: bytes) -> int:
        with self.lock:
            return self.uart.enqueue_input(data)

    def rx_free(self) -> int:
        with self.lock:
            return self.uart.rx_free()

    def state(self) -> SerialState:
        with self.lock:
            return self.uart.state()

"""Console input: non-blocking, bounded, paused while the FIFO is full; raw terminal mode."""

from __future__ import annotations

import os
import pty
import termios

import pytest

from vmm.devices.legacy import FIFO_SIZE, SerialInput, SerialPioAdapter, Uart16550, raw_terminal

UART_RX, UART_FCR, UART_LSR = 0, 2, 5


class Console:
    """A UART behind its adapter, fed from a pipe by a SerialInput, with the event loop's view recorded."""

    def __init__(self, fifo: bool = True):
        self.rfd, self.wfd = os.pipe()
        os.set_blocking(self.rfd, False)
        self.wakes = 0
        self.reading_calls: list[bool] = []
        self.uart = Uart16550(lambda: None, None)
        if fifo:
            self.uart.write(UART_FCR, 0x01)
        self.adapter = SerialPioAdapter(self.uart)
        self.input = SerialInput(self.adapter, self._wake, set_reading=self.reading_calls.append)
        self.uart.on_rx_space = self.input.on_rx_space

    def _wake(self) -> None:
        self.wakes += 1

    def guest_read_all(self) -> bytes:
        got = bytearray()
        while self.adapter.read(UART_LSR, 1)[0] & 0x01:
            got += self.adapter.read(UART_RX, 1)
        return bytes(got)

    def close(self) -> None:
        for fd in (self.rfd, self.wfd):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def console():
    c = Console()
    yield c
    c.close()


def test_reads_at_most_the_free_fifo_space(console):
    os.write(console.wfd, b"a" * 200)
    assert console.input.on_readable(console.rfd) == FIFO_SIZE
    assert console.uart.rx_len == FIFO_SIZE
    assert console.input.on_readable(console.rfd) == 0  # full: nothing read, reading paused
    assert console.input.paused and not console.input.wants_read
    assert console.reading_calls == [False]
    # The rest is still in the pipe, not in the VMM.
    assert len(os.read(console.rfd, 1000)) == 200 - FIFO_SIZE


def test_guest_drain_wakes_the_loop_and_reading_resumes(console):
    data = bytes(range(256)) * 3
    os.write(console.wfd, data)
    received = bytearray()
    rounds = 0
    while len(received) < len(data):
        rounds += 1
        assert rounds < 100
        # The loop polls until the FIFO is full and the reader pauses itself.
        while console.input.wants_read and console.input.on_readable(console.rfd):
            pass
        assert console.input.paused
        wakes = console.wakes
        received += console.guest_read_all()
        assert console.wakes == wakes + 1  # the drain woke the loop once ...
        console.input.on_wake()  # ... which resumes reading
        assert console.input.wants_read
    assert bytes(received) == data
    assert console.reading_calls == [False, True] * rounds


def test_no_wake_while_not_paused(console):
    os.write(console.wfd, b"abc")
    console.input.on_readable(console.rfd)
    console.guest_read_all()
    assert console.wakes == 0


def test_flood_stays_bounded():
    c = Console()
    try:
        os.set_blocking(c.wfd, False)
        written = 0
        try:
            while written < 1 << 20:
                written += os.write(c.wfd, b"x" * 4096)
        except BlockingIOError:
            pass  # the pipe is full: the flood waits in the kernel
        delivered = 0
        for _ in range(written // FIFO_SIZE + 10):
            if c.input.wants_read:
                c.input.on_readable(c.rfd)
            assert c.uart.rx_len <= FIFO_SIZE
            assert len(c.input._pending) <= FIFO_SIZE
            delivered += len(c.guest_read_all())
            if c.input.paused:
                c.input.on_wake()
        assert delivered == written
    finally:
        c.close()


def test_eof_closes_input(console):
    os.close(console.wfd)
    assert console.input.on_readable(console.rfd) == 0
    assert console.input.closed and not console.input.wants_read
    assert console.reading_calls == [False]
    console.input.on_wake()
    assert console.input.on_readable(console.rfd) == 0


def test_a_read_error_closes_input_without_raising(console):
    def failing_read(fd: int, n: int) -> bytes:
        raise OSError(9, "Bad file descriptor")

    inp = SerialInput(console.adapter, lambda: None, read=failing_read)
    assert inp.on_readable(console.rfd) == 0
    assert inp.closed


def test_would_block_is_not_an_error(console):
    assert console.input.on_readable(console.rfd) == 0  # nothing written yet: EAGAIN
    assert not console.input.closed and console.input.wants_read


def test_bytes_the_fifo_refuses_are_held_and_delivered_in_order():
    """The FIFO shrinks between the size check and the enqueue (the guest switched to 16450 mode)."""

    class ShrinkingSink:
        def __init__(self, uart: Uart16550):
            self.uart = uart

        def rx_free(self) -> int:
            free = self.uart.rx_free()
            self.uart.write(UART_FCR, 0x00)  # the guest, on another vCPU, turns the FIFO off
            return free

        def enqueue_input(self, data: bytes) -> int:
            return self.uart.enqueue_input(data)

    uart = Uart16550(lambda: None, None)
    uart.write(UART_FCR, 0x01)
    wakes: list[int] = []
    inp = SerialInput(ShrinkingSink(uart), lambda: wakes.append(1))
    uart.on_rx_space = inp.on_rx_space
    rfd, wfd = os.pipe()
    try:
        os.write(wfd, b"hello")
        assert inp.on_readable(rfd) == 5
        assert uart.rx_len == 1 and not inp.wants_read  # four bytes held, reading paused
        got = bytearray()
        while len(got) < 4:
            got.append(uart.read(UART_RX))
            assert wakes == [1]  # the drain of the one-byte RBR woke the loop: bytes are held
            wakes.clear()
            inp.on_wake()
        got.append(uart.read(UART_RX))
        assert wakes == []  # nothing held, not paused: no wake needed
        assert bytes(got) == b"hello"
        assert inp.wants_read
    finally:
        os.close(rfd)
        os.close(wfd)


def test_drain_racing_the_pause_decision_is_not_lost():
    """The guest drains the FIFO right after the reader found it full: the wake must still happen."""
    uart = Uart16550(lambda: None, None)
    uart.write(UART_FCR, 0x01)
    uart.enqueue_input(b"z" * FIFO_SIZE)
    wakes: list[int] = []

    class RacingSink:
        def rx_free(self) -> int:
            free = uart.rx_free()
            uart.read(UART_RX)  # the vCPU drains a byte just after the answer was computed
            return free

        def enqueue_input(self, data: bytes) -> int:
            return uart.enqueue_input(data)

    inp = SerialInput(RacingSink(), lambda: wakes.append(1))
    uart.on_rx_space = inp.on_rx_space
    rfd, wfd = os.pipe()
    try:
        os.write(wfd, b"q")
        assert inp.on_readable(rfd) == 0
        assert inp.paused
        assert wakes == [1]  # not lost: the loop will come back
        inp.on_wake()
        assert inp.on_readable(rfd) == 1
    finally:
        os.close(rfd)
        os.close(wfd)


def test_repr_is_one_line(console):
    assert repr(console.input) == "<SerialInput reading pending=0 bytes_in=0>"


def test_raw_terminal_sets_and_restores_modes():
    master, slave = pty.openpty()
    try:
        before = termios.tcgetattr(slave)
        assert before[3] & termios.ICANON and before[3] & termios.ECHO
        with raw_terminal(slave) as is_tty:
            assert is_tty is True
            mode = termios.tcgetattr(slave)
            assert not mode[3] & (termios.ICANON | termios.ECHO | termios.ISIG | termios.IEXTEN)
            assert not mode[0] & (termios.IXON | termios.ICRNL)
            assert mode[1] == before[1]  # output processing untouched
            assert mode[6][termios.VMIN] == 1 and mode[6][termios.VTIME] == 0
        assert termios.tcgetattr(slave) == before
        with pytest.raises(RuntimeError):
            with raw_terminal(slave):
                raise RuntimeError("VMM crashed")
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


def test_raw_terminal_leaves_non_terminals_alone():
    rfd, wfd = os.pipe()
    try:
        with raw_terminal(rfd) as is_tty:
            assert is_tty is False
    finally:
        os.close(rfd)
        os.close(wfd)

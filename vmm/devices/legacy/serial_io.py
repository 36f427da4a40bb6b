"""The console's host side: feed an fd (stdin) into the UART without blocking the VMM.

`SerialInput` is driven by the VMM event loop: when the fd is readable the
loop calls `on_readable(fd)`, which reads at most as many bytes as the UART's
receive FIFO has room for. When the FIFO is full, reading pauses (the loop
stops polling the fd: `wants_read` is False and `set_reading(False)` is
called), so a flood of input waits in the kernel's pipe/tty buffer, not in
the VMM. When the guest drains the FIFO the UART calls `on_rx_space()` (on a
vCPU thread); that only calls `wake()`, which the VMM wires to an eventfd
the loop watches, and the loop then calls `on_wake()` to resume reading.

Lost-wakeup freedom without a lock shared with the vCPU: `on_readable` marks
itself paused *before* it asks the UART for free space. A vCPU that drains
the FIFO after that question sees the paused mark and wakes the loop; one
that drains it before is seen by the question itself. At worst a wake-up is
spurious, and `on_wake` copes with that.

`raw_terminal(fd)` puts a terminal into the mode a serial console needs
(no line editing, no local echo, no signals from ^C/^Z: those keys go to the
guest) and restores the saved settings on exit.
"""

from __future__ import annotations

import contextlib
import errno
import os
import termios
from typing import Callable, Iterator, Protocol

import structlog

__all__ = ["RxSink", "SerialInput", "raw_terminal"]

log = structlog.get_logger("vmm.devices.serial_io")


class RxSink(Protocol):
    """Where input goes: `SerialPioAdapter` (locked) or a bare `Uart16550`."""

    def rx_free(self) -> int: ...

    def enqueue_input(self, data: bytes) -> int: ...


class SerialInput:
    """Moves bytes from a host fd into a UART's receive FIFO, pausing while it is full.

    `on_readable`, `on_wake` and `set_reading` belong to the event-loop
    thread; `on_rx_space` may be called from any thread.
    """

    def __init__(self, sink: RxSink, wake: Callable[[], None], *,
                 set_reading: Callable[[bool], None] | None = None,
                 read: Callable[[int, int], bytes] = os.read):
        self.sink = sink
        self._wake = wake
        self._set_reading = set_reading
        self._read = read
        self._paused = False
        self._pending = b""  # read from the fd but not (yet) taken by the FIFO; never more than one read
        self._reading = True
        self.closed = False
        self.bytes_in = 0

    @property
    def wants_read(self) -> bool:
        """Whether the event loop should poll the fd for readability now."""
        return not self.closed and not self._paused and not self._pending

    @property
    def paused(self) -> bool:
        return self._paused

    def on_readable(self, fd: int) -> int:
        """The fd is readable: move what fits into the FIFO. Returns the bytes read."""
        if self.closed:
            return 0
        if self._pending and not self._flush_pending():
            self._sync_reading()
            return 0
        # Announce the pause before looking, so a concurrent drain cannot be missed.
        self._paused = True
        free = self.sink.rx_free()
        if free <= 0:
            self._sync_reading()
            return 0
        self._paused = False
        try:
            data = self._read(fd, free)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            # EIO: the terminal hung up. Anything else: the fd is unusable. Either way, stop.
            if exc.errno != errno.EIO:
                log.warning("console input failed; no more input", fd=fd, error=str(exc))
            self._close()
            return 0
        if not data:
            self._close()
            return 0
        self.bytes_in += len(data)
        self._pending = data
        self._flush_pending()
        self._sync_reading()
        return len(data)

    def on_rx_space(self) -> None:
        """UART callback: the guest made room in the FIFO (any thread)."""
        if self._paused or self._pending:
            self._wake()

    def on_wake(self) -> None:
        """Event loop: the UART has room again; deliver held bytes and resume reading."""
        if self.closed:
            return
        self._paused = False
        if self._pending:
            self._flush_pending()
        self._sync_reading()

    def _flush_pending(self) -> bool:
        """Offer held bytes to the FIFO; True once all are taken."""
        self._paused = True
        taken = self.sink.enqueue_input(self._pending)
        self._pending = self._pending[taken:]
        if not self._pending:
            self._paused = False
            return True
        return False

    def _close(self) -> None:
        self.closed = True
        self._paused = False
        self._sync_reading()

    def _sync_reading(self) -> None:
        want = self.wants_read
        if want != self._reading:
            self._reading = want
            if self._set_reading is not None:
                self._set_reading(want)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "paused" if not self.wants_read else "reading"
        return f"<SerialInput {state} pending={len(self._pending)} bytes_in={self.bytes_in}>"


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[bool]:
    """Raw console mode on `fd` for the duration; yields whether `fd` is a terminal.

    Clears ICANON (no line editing), ECHO, ISIG (^C, ^Z, ^\\ go to the guest)
    and IEXTEN, and IXON/ICRNL on input (^S/^Q and CR reach the guest
    unchanged); output processing is kept so the VMM's own log lines on the
    same terminal still render. Reads return as soon as one byte is there
    (VMIN=1, VTIME=0). The saved settings are restored however the block ends.
    A non-terminal fd is left alone.
    """
    if not os.isatty(fd):
        yield False
        return
    saved = termios.tcgetattr(fd)
    raw = termios.tcgetattr(fd)
    raw[0] &= ~(termios.IXON | termios.ICRNL)
    raw[3] &= ~(termios.ICANON | termios.ECHO | termios.ISIG | termios.IEXTEN)
    raw[6] = list(raw[6])
    raw[6][termios.VMIN] = 1
    raw[6][termios.VTIME] = 0
    termios.tcsetattr(fd, termios.TCSANOW, raw)
    try:
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)

"""Legacy PC devices: the 16550A serial console and the i8042 controller.

Each is a pure register model with its effects (interrupt, output, reset)
passed in, plus a port-I/O adapter that makes it a thread-safe bus device.
"""

from vmm.devices.legacy.i8042 import (
    I8042,
    I8042_BASE,
    I8042_KBD_IRQ,
    I8042_PORT_COUNT,
    I8042Error,
    I8042PioAdapter,
    I8042State,
    I8042StateInvalid,
)
from vmm.devices.legacy.serial import (
    COM1_BASE,
    COM1_IRQ,
    FIFO_SIZE,
    UART_PORT_COUNT,
    SerialError,
    SerialPioAdapter,
    SerialState,
    SerialStateInvalid,
    Uart16550,
)
from vmm.devices.legacy.serial_io import RxSink, SerialInput, raw_terminal

__all__ = [
    "COM1_BASE",
    "COM1_IRQ",
    "FIFO_SIZE",
    "UART_PORT_COUNT",
    "SerialError",
    "SerialStateInvalid",
    "SerialState",
    "Uart16550",
    "SerialPioAdapter",
    "RxSink",
    "SerialInput",
    "raw_terminal",
    "I8042",
    "I8042_BASE",
    "I8042_KBD_IRQ",
    "I8042_PORT_COUNT",
    "I8042Error",
    "I8042StateInvalid",
    "I8042State",
    "I8042PioAdapter",
]

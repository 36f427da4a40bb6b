"""Fixtures for the API unit tests: a fake `Vmm` built by a fake builder, and a controller over them.

The fake microVM has real legacy devices (16550A, i8042) on a real port-I/O
bus, so metrics and Ctrl+Alt+Del go through the same code as in a VMM;
only KVM and the vCPU threads are replaced.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from vmm.api import VmmController
from vmm.builder import BuildError
from vmm.config import VmConfig
from vmm.device_manager import AttachedDevice, MmioDeviceManager
from vmm.devices.bus import Bus
from vmm.devices.legacy import (
    COM1_BASE,
    I8042,
    I8042_BASE,
    I8042_PORT_COUNT,
    UART_PORT_COUNT,
    I8042PioAdapter,
    SerialPioAdapter,
    Uart16550,
)
from vmm.devices.virtio.block import Block
from vmm.devices.virtio.net import Net
from vmm.logger import LOGGER, Logger
from vmm.metrics import Metrics
from vmm.mmds import MmdsStore


@dataclass
class FakeVcpu:
    id: int
    exit_counts: dict[str, int] = field(default_factory=dict)


class FakeTap:
    """Just enough of a TAP for a `Net` that never moves a frame."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._sock, self._peer = socket.socketpair()

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()
        self._peer.close()


class FakeVmm:
    """What the controller uses of a `Vmm`: vCPUs, the PIO bus, devices, pause/resume.

    With `virtio`, drives and interfaces become real `Block` and `Net`
    devices (a fake TAP) in a device manager, as the builder attaches them.
    """

    def __init__(self, config: VmConfig, virtio: bool = False) -> None:
        self.config = config
        self.vcpus = [FakeVcpu(i) for i in range(config.machine_config.vcpu_count)]
        self.pio_bus = Bus.pio()
        self.console = bytearray()
        self.serial = SerialPioAdapter(Uart16550(lambda: None, self.console.extend))
        self.i8042 = I8042PioAdapter(I8042(reset=lambda: None, interrupt=lambda: None))
        self.pio_bus.insert(self.serial, COM1_BASE, UART_PORT_COUNT)
        self.pio_bus.insert(self.i8042, I8042_BASE, I8042_PORT_COUNT)
        self.devices: dict[str, object] = {"serial": self.serial, "i8042": self.i8042}
        self.sources: dict[int, object] = {}
        if virtio:
            manager = MmioDeviceManager(None, Bus.mmio(), None)  # type: ignore[arg-type]  # nothing is attached to a VM
            for drive in config.drives:
                block = Block(drive.drive_id, drive.path_on_host, read_only=bool(drive.is_read_only))
                manager.devices.append(AttachedDevice(f"drive:{drive.drive_id}", block, None, 0, 0, 0))
            for iface in config.network_interfaces:
                net = Net.from_config(iface, open_tap=FakeTap)
                manager.devices.append(AttachedDevice(f"net:{iface.iface_id}", net, None, 0, 0, 0))
            self.devices["virtio"] = manager
        self.calls: list[str] = []
        self.fail_pause = False

    def add_source(self, fd: int, handler) -> None:
        self.sources[fd] = handler

    def pause(self) -> None:
        if self.fail_pause:
            raise TimeoutError("vCPU 0 did not answer within 5.0s")
        self.calls.append("pause")

    def resume(self) -> None:
        self.calls.append("resume")

    def __repr__(self) -> str:
        return f"<FakeVmm vcpus={len(self.vcpus)} calls={self.calls}>"


class FakeBuilder:
    """`boot(config)`: records each configuration; refuses with `refusal` when set."""

    def __init__(self) -> None:
        self.configs: list[VmConfig] = []
        self.refusal: str | None = None
        self.crash: Exception | None = None
        self.virtio = False
        self.vmm: FakeVmm | None = None

    def __call__(self, config: VmConfig) -> FakeVmm:
        self.configs.append(config)
        if self.crash is not None:
            raise self.crash
        if self.refusal is not None:
            raise BuildError(self.refusal)
        self.vmm = FakeVmm(config, virtio=self.virtio)
        return self.vmm


@pytest.fixture
def builder() -> FakeBuilder:
    return FakeBuilder()


@pytest.fixture
def logger() -> Iterator[Logger]:
    """A separate `Logger`; the process logger's defaults are restored afterwards."""
    yield Logger()
    LOGGER.set_defaults()


@pytest.fixture
def kernel(tmp_path) -> str:
    path = tmp_path / "vmlinux"
    path.write_bytes(b"\x7fELF not really")
    return str(path)


@pytest.fixture
def controller(builder: FakeBuilder, logger: Logger) -> VmmController:
    return VmmController(boot=builder, instance_id="vm-1", metrics=Metrics("vm-1"), mmds=MmdsStore(1024),
                         logger=logger)

"""vCPU threads: one thread per vCPU, driven by messages, interruptible.

A vCPU thread owns its `VcpuFd`: nobody else issues ioctls on it while the
thread runs. Others talk to it through a mailbox of `VcpuEvent`s and wait for
`VcpuResponse`s. To get the thread out of KVM_RUN, `kick()` sets
`immediate_exit` in the kvm_run page (so a KVM_RUN that is about to start
returns at once) and then sends the thread `KICK_SIGNAL` (so one already
running returns with EINTR). The signal's handler does nothing: its only job
is to interrupt the ioctl, which ctypes does not restart.
"""

from __future__ import annotations

import enum
import queue
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import structlog

from vmm import seccomp
from vmm.kvm import VcpuFd, exits
from vmm.kvm import bindings as kb
from vmm.kvm.fd import KvmError

log = structlog.get_logger("vmm.vcpu")

KICK_SIGNAL = signal.SIGRTMIN


def install_kick_handler() -> None:
    """Install the no-op handler for the kick signal. Must run on the main thread."""
    signal.signal(KICK_SIGNAL, lambda signum, frame: None)
    # Let the signal interrupt system calls instead of restarting them.
    signal.siginterrupt(KICK_SIGNAL, True)


class IoBus(Protocol):
    def read(self, addr: int, size: int) -> bytes: ...
    def write(self, addr: int, data: bytes) -> Any: ...


class VcpuEvent(enum.Enum):
    PAUSE = "pause"
    RESUME = "resume"
    FINISH = "finish"


@dataclass(frozen=True)
class _Call:
    """Run `fn(fd)` on the vCPU thread while paused; the result goes into `box`."""
    fn: Callable[[VcpuFd], Any]
    box: list


class VcpuResponse(enum.Enum):
    PAUSED = "paused"
    RESUMED = "resumed"
    EXITED = "exited"
    CALLED = "called"
    NOT_ALLOWED = "not-allowed"


class ExitKind(enum.Enum):
    """Why a vCPU stopped the whole microVM."""
    RESET = "reset"          # guest reset (i8042 0xFE, triple fault, KVM reset event)
    SHUTDOWN = "shutdown"    # guest powered off
    ERROR = "error"          # the VMM could not continue (KVM error, unhandled exit)
    SIGNAL = "signal"        # the VMM process was told to stop (SIGTERM, SIGINT)


@dataclass(frozen=True)
class VmExit:
    kind: ExitKind
    reason: str
    vcpu: int
    signum: int = 0

    @property
    def exit_code(self) -> int:
        if self.kind is ExitKind.SIGNAL:
            return 128 + self.signum
        return 0 if self.kind in (ExitKind.RESET, ExitKind.SHUTDOWN) else 1


class VcpuState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    EXITED = "exited"


class Vcpu:
    """A vCPU and its thread; `on_exit` is called (from the thread) when the guest stops the VM."""

    def __init__(self, fd: VcpuFd, pio_bus: IoBus, mmio_bus: IoBus, on_exit: Callable[[VmExit], None]):
        self.fd = fd
        self.id = fd.id
        self.pio_bus = pio_bus
        self.mmio_bus = mmio_bus
        self.on_exit = on_exit
        self.state = VcpuState.CREATED
        self.exit_counts: dict[str, int] = {}
        # When set, each kick records the guest RIP here (boot profiling).
        self.rip_samples: list[int] | None = None
        self._mailbox: queue.SimpleQueue = queue.SimpleQueue()
        self._responses: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    # --- control (any thread) -----------------------------------------------------

    def start(self, paused: bool = False) -> None:
        self.state = VcpuState.PAUSED if paused else VcpuState.RUNNING
        self._thread = threading.Thread(target=self._main, name=f"fc_vcpu {self.id}", daemon=True)
        self._thread.start()

    def kick(self) -> None:
        self.fd.set_immediate_exit(True)
        t = self._thread
        if t is not None and t.is_alive() and t.ident is not None:
            try:
                signal.pthread_kill(t.ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    def send(self, event: "VcpuEvent | _Call") -> None:
        self._mailbox.put(event)
        self.kick()

    def wait_response(self, timeout: float = 5.0) -> VcpuResponse:
        try:
            return self._responses.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"vCPU {self.id} did not answer within {timeout}s") from None

    def pause(self, timeout: float = 5.0) -> None:
        self.send(VcpuEvent.PAUSE)
        resp = self.wait_response(timeout)
        if resp not in (VcpuResponse.PAUSED, VcpuResponse.EXITED):
            raise RuntimeError(f"vCPU {self.id}: unexpected answer {resp} to pause")

    def resume(self, timeout: float = 5.0) -> None:
        self.send(VcpuEvent.RESUME)
        resp = self.wait_response(timeout)
        if resp not in (VcpuResponse.RESUMED, VcpuResponse.EXITED):
            raise RuntimeError(f"vCPU {self.id}: unexpected answer {resp} to resume")

    def call(self, fn: Callable[[VcpuFd], Any], timeout: float = 5.0) -> Any:
        """Run `fn(fd)` on the vCPU thread while it is paused (e.g. to save its state)."""
        if self._thread is None or not self._thread.is_alive():
            return fn(self.fd)
        box: list = []
        self.send(_Call(fn, box))
        resp = self.wait_response(timeout)
        if resp is not VcpuResponse.CALLED:
            raise RuntimeError(f"vCPU {self.id}: cannot call while {self.state.value}")
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def finish(self, timeout: float = 5.0) -> None:
        t = self._thread
        if t is None or not t.is_alive():
            self.state = VcpuState.EXITED
            return
        self.send(VcpuEvent.FINISH)
        t.join(timeout)

    # --- the thread -----------------------------------------------------------------

    def _main(self) -> None:
        try:
            # Before the first KVM_RUN: this thread runs with the vcpu seccomp filter.
            seccomp.enter_thread(seccomp.Role.VCPU, f"fc_vcpu {self.id}")
            self._loop()
        except BaseException as exc:  # never let a vCPU thread die silently
            log.error("vcpu thread crashed", vcpu=self.id, error=repr(exc))
            self.state = VcpuState.EXITED
            self.on_exit(VmExit(ExitKind.ERROR, f"vCPU {self.id} failed: {exc}", self.id))

    def _handle_messages(self) -> bool:
        """Process mailbox messages (blocking while paused); False when the thread must end."""
        while True:
            if self.state is VcpuState.PAUSED:
                msg = self._mailbox.get()
            else:
                try:
                    msg = self._mailbox.get_nowait()
                except queue.Empty:
                    return True
            if isinstance(msg, _Call):
                if self.state is VcpuState.PAUSED:
                    try:
                        msg.box.append((True, msg.fn(self.fd)))
                    except BaseException as exc:
                        msg.box.append((False, exc))
                    self._responses.put(VcpuResponse.CALLED)
                else:
                    self._responses.put(VcpuResponse.NOT_ALLOWED)
            elif msg is VcpuEvent.PAUSE:
                if self.state is VcpuState.RUNNING:
                    self.state = VcpuState.PAUSED
                    try:
                        # Tell a kvmclock guest it was stopped, so it does not
                        # report soft lockups when it runs again.
                        self.fd.kvmclock_ctrl()
                    except KvmError:
                        pass  # EINVAL until the guest has enabled kvmclock
                self._responses.put(VcpuResponse.PAUSED)
            elif msg is VcpuEvent.RESUME:
                self.state = VcpuState.RUNNING
                self._responses.put(VcpuResponse.RESUMED)
            elif msg is VcpuEvent.FINISH:
                self.state = VcpuState.EXITED
                self._responses.put(VcpuResponse.EXITED)
                return False

    def _loop(self) -> None:
        fd = self.fd
        while True:
            if not self._handle_messages():
                return
            if self.state is not VcpuState.RUNNING:
                continue
            fd.set_immediate_exit(False)
            # Re-check: a kick that raced with clearing immediate_exit left a message.
            if not self._mailbox.empty():
                continue
            ex = fd.run()
            stop = self._dispatch(ex)
            if stop is not None:
                self.state = VcpuState.EXITED
                self.on_exit(stop)
                # Stay alive to answer messages until told to end.
                while True:
                    msg = self._mailbox.get()
                    self._responses.put(VcpuResponse.EXITED)
                    if msg is VcpuEvent.FINISH:
                        return

    def _count(self, name: str) -> None:
        self.exit_counts[name] = self.exit_counts.get(name, 0) + 1

    def _dispatch(self, ex: exits.VcpuExit) -> VmExit | None:
        """Handle one exit; returns a VmExit when the microVM must stop."""
        match ex:
            case exits.IoOut(port=port, size=size, data=data):
                self._count("io_out")
                for i in range(0, len(data), size):
                    self.pio_bus.write(port, data[i:i + size])
            case exits.IoIn(port=port, size=size, count=count):
                self._count("io_in")
                self.fd.set_io_in_data(b"".join(self.pio_bus.read(port, size) for _ in range(count)))
            case exits.MmioWrite(addr=addr, data=data):
                self._count("mmio_write")
                self.mmio_bus.write(addr, data)
            case exits.MmioRead(addr=addr, size=size):
                self._count("mmio_read")
                self.fd.set_mmio_read_data(self.mmio_bus.read(addr, size))
            case exits.Interrupted():
                self._count("interrupted")
                if self.rip_samples is not None:
                    self.rip_samples.append(self.fd.get_regs().rip)
            case exits.Hlt():
                self._count("hlt")
                time.sleep(0.001)  # only without an in-kernel LAPIC; Ember always has one
            case exits.Shutdown():
                return VmExit(ExitKind.RESET, "guest triple fault (KVM_EXIT_SHUTDOWN)", self.id)
            case exits.SystemEvent(type=t):
                if t == kb.KVM_SYSTEM_EVENT_RESET:
                    return VmExit(ExitKind.RESET, "guest reset (KVM system event)", self.id)
                if t == kb.KVM_SYSTEM_EVENT_SHUTDOWN:
                    return VmExit(ExitKind.SHUTDOWN, "guest shutdown (KVM system event)", self.id)
                return VmExit(ExitKind.ERROR, f"guest crash (KVM system event {t})", self.id)
            case exits.FailEntry(reason=r, cpu=c):
                return VmExit(ExitKind.ERROR, f"KVM_EXIT_FAIL_ENTRY reason={r:#x} cpu={c}", self.id)
            case exits.InternalError(suberror=s, data=d):
                rip = self._rip()
                return VmExit(ExitKind.ERROR,
                              f"KVM_EXIT_INTERNAL_ERROR suberror={s} rip={rip} data="
                              + ",".join(f"{x:#x}" for x in d[:4]), self.id)
            case exits.Unknown(reason=r):
                return VmExit(ExitKind.ERROR, f"unhandled KVM exit reason {r}", self.id)
        return None

    def _rip(self) -> str:
        try:
            return f"{self.fd.get_regs().rip:#x}"
        except KvmError:
            return "?"

    def __repr__(self) -> str:
        return f"<Vcpu {self.id} {self.state.value}>"

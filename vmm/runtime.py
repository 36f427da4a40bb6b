"""The running microVM: vCPU threads plus the VMM event loop on the main thread.

The event loop waits on a few file descriptors: the vCPUs' exit eventfd
(a vCPU stopped the VM), the console input, and later the API. Device
emulation happens on the vCPU threads (exits) or here (host-side input); no
thread ever blocks the others on guest input.
"""

from __future__ import annotations

import os
import queue
import selectors
import signal
import threading
from dataclasses import dataclass, field
from typing import Callable

import structlog

from vmm import seccomp
from vmm.kvm import Kvm
from vmm.vstate.vcpu import ExitKind, Vcpu, VmExit
from vmm.vstate.vm import Vm

log = structlog.get_logger("vmm")


@dataclass
class EventSource:
    """A file descriptor the event loop watches, with its handler."""
    fd: int
    on_readable: Callable[[], None]
    enabled: bool = True


class Vmm:
    """One microVM: its VM, vCPUs, buses and devices, and the loop that drives them."""

    def __init__(self, *, instance_id: str, kvm: Kvm, vm: Vm, vcpus: list[Vcpu], pio_bus, mmio_bus,
                 devices: dict[str, object]):
        self.instance_id = instance_id
        self.kvm = kvm
        self.vm = vm
        self.vcpus = vcpus
        self.pio_bus = pio_bus
        self.mmio_bus = mmio_bus
        self.devices = devices
        self.exit: VmExit | None = None
        self._exit_efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._exits: queue.SimpleQueue[VmExit] = queue.SimpleQueue()
        self._selector = selectors.DefaultSelector()
        self._sources: dict[int, EventSource] = {}
        self._sources_lock = threading.RLock()
        self._cleanups: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        # A restored microVM starts paused unless its load asked to resume it;
        # `on_first_run` hooks (kick the restored devices, announce the new
        # VMGenID) run once its vCPUs first run.
        self.start_paused = False
        self._first_run_hooks: list[Callable[[], None]] = []
        self.add_source(self._exit_efd, self._on_vcpu_exit)

    # --- wiring -------------------------------------------------------------------

    def request_exit(self, ex: VmExit) -> None:
        """Thread-safe: ask the event loop to stop the microVM."""
        self._exits.put(ex)
        os.eventfd_write(self._exit_efd, 1)

    def add_source(self, fd: int, on_readable: Callable[[], None]) -> None:
        with self._sources_lock:
            self._sources[fd] = EventSource(fd, on_readable)
            self._selector.register(fd, selectors.EVENT_READ)

    def set_source_enabled(self, fd: int, enabled: bool) -> None:
        """Start or stop watching `fd`. Thread-safe: devices call it from vCPU threads too."""
        with self._sources_lock:
            src = self._sources.get(fd)
            if src is None or src.enabled == enabled:
                return
            src.enabled = enabled
            if enabled:
                self._selector.register(fd, selectors.EVENT_READ)
            else:
                self._selector.unregister(fd)

    def remove_source(self, fd: int) -> None:
        with self._sources_lock:
            src = self._sources.pop(fd, None)
            if src is not None and src.enabled:
                self._selector.unregister(fd)

    def add_cleanup(self, fn: Callable[[], None]) -> None:
        self._cleanups.append(fn)

    def on_first_run(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the event loop once the vCPUs first run (start unpaused, or first resume)."""
        self._first_run_hooks.append(fn)

    def _run_first_run_hooks(self) -> None:
        hooks, self._first_run_hooks = self._first_run_hooks, []
        for fn in hooks:
            try:
                fn()
            except Exception as exc:  # a device that cannot be kicked must not stop the others
                log.error("post-restore hook failed", error=repr(exc))

    # --- lifecycle ------------------------------------------------------------------

    def start(self, paused: bool = False) -> None:
        for vcpu in self.vcpus:
            vcpu.start(paused=paused)
        if not paused:
            self._run_first_run_hooks()

    def start_rip_profiler(self, path: str, interval_s: float = 0.01) -> None:
        """Sample every vCPU's RIP each `interval_s` until the VM stops; write them to `path`.

        The sampler kicks each vCPU out of KVM_RUN (the same signal that pauses
        it) and the vCPU thread records its RIP; `bench/boot_profile.py` maps
        the samples to kernel symbols.
        """
        for vcpu in self.vcpus:
            vcpu.rip_samples = []
        stop = threading.Event()

        def sample() -> None:
            try:
                seccomp.enter_thread(seccomp.Role.VMM, "rip-profiler")
            except seccomp.SeccompError as exc:  # never run unfiltered
                log.error("the RIP profiler cannot install its seccomp filter", error=str(exc))
                return
            while not stop.wait(interval_s):
                for vcpu in list(self.vcpus):
                    vcpu.kick()

        thread = threading.Thread(target=sample, name="rip-profiler", daemon=True)
        thread.start()
        vcpus = list(self.vcpus)

        def finish() -> None:
            stop.set()
            thread.join()
            with open(path, "w") as f:
                for vcpu in vcpus:
                    for rip in vcpu.rip_samples or ():
                        f.write(f"{vcpu.id} {rip:#x}\n")
        self.add_cleanup(finish)

    def pause(self) -> None:
        for vcpu in self.vcpus:
            vcpu.pause()

    def resume(self) -> None:
        for vcpu in self.vcpus:
            vcpu.resume()
        self._run_first_run_hooks()

    def run(self) -> VmExit:
        """Start the vCPUs and serve events until the guest, an error or a signal stops the VM."""
        def on_signal(signum: int, frame) -> None:
            self.request_exit(VmExit(ExitKind.SIGNAL, f"stopped by {signal.Signals(signum).name}", -1, signum))

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        self.start(paused=self.start_paused)
        try:
            while self.exit is None:
                self.poll_once(timeout=None)
        finally:
            self.shutdown()
            for s, h in previous.items():
                signal.signal(s, h)
        if self.exit.kind in (ExitKind.ERROR, ExitKind.SIGNAL):
            from vmm.logger import fatal
            fatal(self.exit.reason)
        else:
            log.info("microVM stopped", reason=self.exit.reason)
        return self.exit

    def poll_once(self, timeout: float | None) -> None:
        for key, _ in self._selector.select(timeout):
            src = self._sources.get(key.fd)
            if src is None:
                continue
            try:
                src.on_readable()
            except Exception as exc:  # a host-side handler must not take the VMM down
                log.error("event handler failed", fd=key.fd, error=repr(exc))
                self.remove_source(key.fd)

    def _on_vcpu_exit(self) -> None:
        try:
            os.eventfd_read(self._exit_efd)
        except BlockingIOError:
            return
        while True:
            try:
                ex = self._exits.get_nowait()
            except queue.Empty:
                break
            if self.exit is None:
                self.exit = ex

    def shutdown(self) -> None:
        """Stop every vCPU and release host resources. Idempotent."""
        with self._lock:
            vcpus, self.vcpus = self.vcpus, []
            cleanups, self._cleanups = self._cleanups, []
        for vcpu in vcpus:
            try:
                vcpu.finish(timeout=2.0)
            except Exception as exc:
                log.warning("vcpu did not finish", vcpu=vcpu.id, error=repr(exc))
        for fn in reversed(cleanups):
            try:
                fn()
            except Exception as exc:
                log.warning("cleanup failed", error=repr(exc))

    def __repr__(self) -> str:
        state = "exited" if self.exit else "running"
        return f"<Vmm {self.instance_id} {state} vcpus={len(self.vcpus)} {self.vm!r}>"

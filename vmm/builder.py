"""Build a microVM from its configuration: `build_for_boot`.

The order follows what each step needs: memory before the kernel, the kernel
before boot parameters, devices before the ACPI tables that describe them,
vCPUs last. Every failure becomes a `BuildError` with a one-line message,
after releasing whatever was already created.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import structlog

from vmm.arch import x86_64 as arch
from vmm.arch.x86_64 import layout
from vmm.config import DriveConfig, VmConfig
from vmm.device_manager import MmioDeviceManager
from vmm.devices.acpi import VmGenId, VmGenIdError
from vmm.devices.bus import Bus
from vmm.devices.legacy.i8042 import I8042, I8042PioAdapter
from vmm.devices.legacy.serial import SerialPioAdapter, Uart16550
from vmm.devices.legacy.serial_io import SerialInput
from vmm.devices.pseudo.boot_timer import BootTimer
from vmm.devices.virtio.block import Block, BlockError
from vmm.devices.virtio.net import Net, NetError
from vmm.devices.virtio.vsock import Vsock, VsockError
from vmm.kvm import Kvm, KvmError
from vmm.kvm import bindings as kb
from vmm.loader import Cmdline, CmdlineError, LoaderError, load_initrd, load_kernel, parse_setup_header
from vmm.memory import GuestMemory, GuestMemoryError
from vmm.rate_limiter import RateLimiter, RateLimiterError
from vmm.runtime import Vmm
from vmm.vstate.vcpu import ExitKind, Vcpu, VmExit, install_kick_handler
from vmm.vstate.vm import Vm, VmError, take_shell

if TYPE_CHECKING:  # the restore path imports them lazily: a boot does not pay for the snapshot code
    from vmm.persist import FileBackend, MicrovmState, UffdBackend

log = structlog.get_logger("vmm.builder")

COM1_BASE, COM1_PORTS, COM1_IRQ = 0x3F8, 8, 4
I8042_BASE, I8042_PORTS, I8042_IRQ = 0x60, 5, 1

_pvm_notice_given = False


class BuildError(Exception):
    """The microVM could not be built."""


@dataclass
class ConsoleIo:
    """Where the serial console goes: host fds (None = none)."""
    input_fd: int | None
    output_fd: int | None


def _pvm_notice() -> None:
    global _pvm_notice_given
    if not _pvm_notice_given:
        _pvm_notice_given = True
        log.warning(
            "kvm_pvm host: the guest kernel's ring-0 code runs in KVM's instruction emulator "
            "(about 1000x slower than hardware KVM); applying the PVM compatibility profile "
            "(CX16, XSAVE and KVM's hypercall-based paravirt features hidden from CPUID; kernel args: "
            + arch.pvm_compat_cmdline() + ")")


def _console_writer(fd: int | None) -> Callable[[bytes], None] | None:
    if fd is None:
        return None

    def write(data: bytes, fd: int = fd) -> None:
        os.write(fd, data)
    return write


def build_for_boot(config: VmConfig, *, instance_id: str = "anonymous-instance", boot_timer: bool = False,
                   start_wall_ns: int = 0, start_cpu_ns: int = 0, pvm_compat: bool = True,
                   boot_protocol: str = "linux",
                   console_in: int | None = None, console_out: int | None = 1) -> Vmm:
    """Create a microVM ready to run `config`'s kernel; `Vmm.run()` starts it."""
    if config.boot_source is None:
        raise BuildError("no boot source: the configuration needs \"boot-source\" with \"kernel_image_path\"")
    if config.entropy is not None:
        raise BuildError("\"entropy\" (virtio-rng) is not supported yet")
    mc = config.machine_config
    vcpu_count, mem_mib = mc.vcpu_count, mc.mem_size_mib
    pvm = arch.is_pvm_host() and pvm_compat
    if pvm:
        _pvm_notice()

    prepared = take_shell()
    try:
        kvm = prepared[0] if prepared is not None else Kvm()
    except KvmError as exc:
        raise BuildError(f"cannot use KVM: {exc.strerror or exc}") from exc
    shell = prepared[1] if prepared is not None else None

    cleanups: list[Callable[[], None]] = []
    try:
        return _build(config, kvm, cleanups, shell=shell, instance_id=instance_id, boot_timer=boot_timer,
                      start_wall_ns=start_wall_ns, start_cpu_ns=start_cpu_ns, pvm=pvm,
                      boot_protocol=boot_protocol,
                      vcpu_count=vcpu_count, mem_mib=mem_mib,
                      console=ConsoleIo(console_in, console_out))
    except BaseException:
        for fn in reversed(cleanups):
            try:
                fn()
            except Exception:
                pass
        if shell is not None:
            shell.close()  # idempotent: the Vm may have closed it already
        kvm.close()
        raise


def _build(config: VmConfig, kvm: Kvm, cleanups: list, *, shell=None, instance_id: str, boot_timer: bool,
           start_wall_ns: int, start_cpu_ns: int, pvm: bool, boot_protocol: str, vcpu_count: int, mem_mib: int,
           console: ConsoleIo) -> Vmm:
    bs = config.boot_source
    # --- memory -------------------------------------------------------------------
    try:
        mem = GuestMemory.anonymous(arch.arch_memory_regions(mem_mib << 20))
    except (GuestMemoryError, ValueError, OSError) as exc:
        raise BuildError(f"cannot create {mem_mib} MiB of guest memory: {exc}") from exc
    cleanups.append(mem.close)

    # --- kernel, initrd, command line -----------------------------------------------
    try:
        kernel = load_kernel(mem, bs.kernel_image_path)
    except LoaderError as exc:
        raise BuildError(f"cannot load kernel: {exc}") from exc
    setup_header = parse_setup_header(kernel.setup_header) if kernel.setup_header else None
    if boot_protocol == "pvh" and kernel.pvh_entry is None:
        raise BuildError(f"cannot boot {bs.kernel_image_path} with PVH: the kernel has no PVH entry note")
    use_pvh = kernel.pvh_entry is not None and boot_protocol in ("pvh", "auto")

    initrd: tuple[int, int] | None = None
    if bs.initrd_path:
        first_region_end = mem.regions[0].end
        max_addr = min(first_region_end, setup_header.initrd_limit) if setup_header else first_region_end
        try:
            initrd = load_initrd(mem, bs.initrd_path, kernel_end=kernel.kernel_end, max_addr=max_addr)
        except LoaderError as exc:
            raise BuildError(f"cannot load initrd: {exc}") from exc


    # --- the VM and its devices -----------------------------------------------------
    install_kick_handler()
    try:
        vm = Vm(kvm, mem, track_dirty_pages=config.machine_config.track_dirty_pages, shell=shell)
    except VmError as exc:
        raise BuildError(str(exc)) from exc
    cleanups.append(vm.close)
    if config.machine_config.track_dirty_pages:
        mem.enable_dirty_tracking()

    pio_bus, mmio_bus = Bus.pio(), Bus.mmio()
    holder: dict[str, Vmm] = {}

    def request_exit(ex: VmExit) -> None:
        holder["vmm"].request_exit(ex)

    serial_input_box: list[SerialInput] = []
    serial, i8042 = _legacy_devices(vm, pio_bus, console, request_exit, serial_input_box)

    devices: dict[str, object] = {"serial": serial, "i8042": i8042}
    if boot_timer:
        timer = BootTimer(start_wall_ns, start_cpu_ns, _boot_time_log(instance_id))
        mmio_bus.insert(timer, layout.BOOT_TIMER_ADDR, layout.BOOT_TIMER_SIZE)
        devices["boot_timer"] = timer

    # --- virtio devices -----------------------------------------------------------------
    dm = MmioDeviceManager(vm, mmio_bus, mem)
    cleanups.append(dm.close)
    rate_limiters: list[tuple[RateLimiter, Callable[[], None]]] = []
    for drive in config.drives_in_device_order:
        block = _build_block(drive, rate_limiters)
        cleanups.append(block.backend.close)
        dm.attach(f"drive:{drive.drive_id}", block)
    nets: list[Net] = []
    for iface in config.network_interfaces:
        try:
            net = Net.from_config(iface)
        except NetError as exc:
            raise BuildError(f"network interface {iface.iface_id}: {exc}") from exc
        cleanups.append(net.close)
        dm.attach(f"net:{iface.iface_id}", net)
        nets.append(net)
    vsock: Vsock | None = None
    if config.vsock is not None:
        try:
            vsock = Vsock.from_config(config.vsock)
        except VsockError as exc:
            raise BuildError(f"vsock: {exc}") from exc
        cleanups.append(vsock.close)
        dm.attach("vsock", vsock)
    devices["virtio"] = dm

    # --- clone uniqueness: VMGenID, announced through the ACPI GED ---------------------
    vmgenid = None
    if "acpi=off" not in (bs.boot_args or ""):
        try:
            vmgenid = VmGenId.create(mem, layout.GED_IRQ, vm.interrupt_line(layout.GED_IRQ))
        except (VmGenIdError, KvmError, OSError) as exc:
            raise BuildError(f"cannot create the VMGenID device: {exc}") from exc
        devices["vmgenid"] = vmgenid

    # --- kernel command line -----------------------------------------------------------
    cmdline = Cmdline(layout.CMDLINE_MAX_SIZE)
    try:
        cmdline.extend(bs.boot_args if bs.boot_args is not None else DEFAULT_BOOT_ARGS)
        root = config.root_drive
        if root is not None and not cmdline.has("root"):
            cmdline.append(f"root=PARTUUID={root.partuuid}" if root.partuuid else "root=/dev/vda")
            cmdline.append("ro" if root.is_read_only else "rw")
        if cmdline.has("acpi") and "acpi=off" in cmdline.args:
            for arg in dm.cmdline_args():
                cmdline.append(arg)
        if pvm:
            for arg in arch.pvm_compat_cmdline().split():
                key = arg.split("=", 1)[0]
                if not cmdline.has(key):
                    cmdline.append(arg)
    except CmdlineError as exc:
        raise BuildError(f"invalid kernel command line: {exc}") from exc
    mem.write(layout.CMDLINE_START, cmdline.as_bytes())

    # --- firmware tables and boot parameters ------------------------------------
    try:
        rsdp = arch.create_acpi_tables(mem, vcpu_count, dm.acpi_devices(),
                                       extra_dsdt=vmgenid.acpi_nodes() if vmgenid is not None else ())
        arch.setup_mptable(mem, vcpu_count)
        e820 = arch.e820_map([(r.guest_addr, r.size) for r in mem.regions])
        if use_pvh:
            arch.PvhStartInfo(e820, cmdline_addr=layout.CMDLINE_START, modules=[initrd] if initrd else [],
                              rsdp_addr=rsdp).write(mem)
            boot_sregs = arch.setup_pvh_sregs(mem)
            boot_regs = arch.boot_regs_pvh(kernel.pvh_entry)
        else:
            arch.BootParams(e820, cmdline_addr=layout.CMDLINE_START, cmdline_len=len(str(cmdline)),
                            initrd=initrd, rsdp_addr=rsdp, setup_header=kernel.setup_header).write(mem)
            boot_sregs = arch.setup_long_mode(mem, mem.total_size)
            boot_regs = arch.boot_regs_linux64(kernel.entry_64)
    except (ValueError, GuestMemoryError, arch.BootParamsError) as exc:
        raise BuildError(f"cannot write boot tables: {exc}") from exc

    # --- vCPUs ------------------------------------------------------------------------
    supported = [arch.CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                 for e in kvm.get_supported_cpuid()]
    hidden = arch.PVM_HOST_HIDDEN if pvm else frozenset()
    tsc_deadline = bool(kvm.check_extension(kb.KVM_CAP_TSC_DEADLINE_TIMER))
    vcpus: list[Vcpu] = []
    try:
        for i in range(vcpu_count):
            fd = vm.fd.create_vcpu(i)
            cleanups.append(fd.close)
            fd.set_cpuid2(_to_kvm_cpuid(arch.build_cpuid(
                supported, i, vcpu_count, hide_features=hidden, tsc_deadline=tsc_deadline)))
            fd.set_msrs(arch.boot_msrs())
            fpu = kb.kvm_fpu()
            fpu.fcw, fpu.mxcsr = 0x37F, 0x1F80
            fd.set_fpu(fpu)
            fd.set_lapic(arch.set_lint(fd.get_lapic()))
            if i == 0:
                _apply_sregs(fd, boot_sregs)
                _apply_regs(fd, boot_regs)
            # APs stay in wait-for-SIPI (KVM's default with an in-kernel LAPIC):
            # the guest starts them with INIT-SIPI-SIPI.
            vcpus.append(Vcpu(fd, pio_bus, mmio_bus, request_exit))
    except KvmError as exc:
        raise BuildError(f"cannot configure vCPUs: {exc}") from exc

    vmm = _assemble(instance_id=instance_id, kvm=kvm, vm=vm, vcpus=vcpus, pio_bus=pio_bus, mmio_bus=mmio_bus,
                    devices=devices, holder=holder, cleanups=cleanups, dm=dm, rate_limiters=rate_limiters,
                    nets=nets, vsock=vsock, console=console, serial=serial, serial_input_box=serial_input_box)
    vmm.pvm_compat = pvm
    log.info("microVM built", id=instance_id, vcpus=vcpu_count, mem_mib=mem_mib, kernel=bs.kernel_image_path,
             entry="pvh" if use_pvh else "linux64", cmdline=str(cmdline))
    return vmm


DEFAULT_BOOT_ARGS = "console=ttyS0 reboot=k panic=1 pci=off"


def _legacy_devices(vm: Vm, pio_bus: Bus, console: ConsoleIo, request_exit: Callable[[VmExit], None],
                    serial_input_box: list, *, serial_state=None,
                    i8042_state=None) -> tuple[SerialPioAdapter, I8042PioAdapter]:
    """COM1 and the i8042 on the port bus: fresh, or from a snapshot's (untrusted) states."""
    uart_irq, writer = vm.interrupt_line(COM1_IRQ), _console_writer(console.output_fd)

    def on_rx_space() -> None:
        if serial_input_box:
            serial_input_box[0].on_rx_space()

    def reset() -> None:
        request_exit(VmExit(ExitKind.RESET, "guest reset through the i8042 (reboot)", -1))

    if serial_state is None:
        uart = Uart16550(uart_irq, writer, on_rx_space=on_rx_space)
    else:
        uart = Uart16550.from_state(serial_state, uart_irq, writer, on_rx_space=on_rx_space)
    if i8042_state is None:
        controller = I8042(reset=reset, interrupt=vm.interrupt_line(I8042_IRQ))
    else:
        controller = I8042.from_state(i8042_state, reset=reset, interrupt=vm.interrupt_line(I8042_IRQ))
    serial, i8042 = SerialPioAdapter(uart), I8042PioAdapter(controller)
    pio_bus.insert(serial, COM1_BASE, COM1_PORTS)
    pio_bus.insert(i8042, I8042_BASE, I8042_PORTS)
    return serial, i8042


def _assemble(*, instance_id: str, kvm: Kvm, vm: Vm, vcpus: list[Vcpu], pio_bus: Bus, mmio_bus: Bus,
              devices: dict[str, object], holder: dict, cleanups: list, dm: MmioDeviceManager,
              rate_limiters: list, nets: list[Net], vsock: Vsock | None, console: ConsoleIo,
              serial: SerialPioAdapter, serial_input_box: list) -> Vmm:
    """The `Vmm` around built (or restored) parts, with every host-side event source registered."""
    vmm = Vmm(instance_id=instance_id, kvm=kvm, vm=vm, vcpus=vcpus, pio_bus=pio_bus, mmio_bus=mmio_bus,
              devices=devices)
    holder["vmm"] = vmm
    for fn in cleanups:
        vmm.add_cleanup(fn)
    vmm.add_cleanup(kvm.close)
    cleanups.clear()
    for fd, handler in dm.event_sources():
        vmm.add_source(fd, handler)
    for limiter, on_ready in rate_limiters:
        vmm.add_source(limiter.fd, _rate_limiter_handler(limiter, on_ready))
    for net in nets:
        for src in net.fds():
            vmm.add_source(src.fd, src.on_readable)
        net.connect_poller(vmm.set_source_enabled)
    if vsock is not None:
        for fd, handler in vsock.fds():
            vmm.add_source(fd, handler)
    if console.input_fd is not None:
        _attach_console_input(vmm, serial, serial_input_box, console.input_fd)
    return vmm


def _build_block(drive: DriveConfig, rate_limiters: list) -> Block:
    if drive.is_vhost_user:
        raise BuildError(f"drive {drive.drive_id}: vhost-user block devices are not supported")
    limiter = None
    if drive.rate_limiter is not None and drive.rate_limiter.enabled:
        limiter = RateLimiter.from_config(drive.rate_limiter)
    try:
        block = Block(drive.drive_id, drive.path_on_host, read_only=bool(drive.is_read_only),
                      is_root=drive.is_root_device, cache_type=drive.cache_type.value,
                      rate_limiter=limiter, partuuid=drive.partuuid)
    except BlockError as exc:
        if limiter is not None:
            limiter.close()
        raise BuildError(f"drive {drive.drive_id}: {exc}") from exc
    if limiter is not None:
        rate_limiters.append((limiter, block.on_rate_limiter_ready))
    return block


def _rate_limiter_handler(limiter: RateLimiter, on_ready: Callable[[], None]) -> Callable[[], None]:
    def handle() -> None:
        try:
            limiter.event_handler()
        except RateLimiterError:
            return  # spurious wake-up: the timer had not expired
        on_ready()
    return handle


def _boot_time_log(instance_id: str) -> Callable[[str], None]:
    def emit(line: str) -> None:
        # Firecracker logs this line at info level; Ember prints it on stderr
        # whatever the level, since --boot-timer asked for it.
        print(f"[{instance_id}] {line}", file=sys.stderr, flush=True)
    return emit


def _attach_console_input(vmm: Vmm, serial: SerialPioAdapter, box: list, fd: int) -> None:
    wake_efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    vmm.add_cleanup(lambda: os.close(wake_efd))

    def wake() -> None:
        os.eventfd_write(wake_efd, 1)

    def on_wake() -> None:
        try:
            os.eventfd_read(wake_efd)
        except BlockingIOError:
            pass
        sin.on_wake()

    sin = SerialInput(serial, wake, set_reading=lambda on: vmm.set_source_enabled(fd, on))
    try:
        vmm.add_source(fd, lambda: sin.on_readable(fd))
    except PermissionError:
        # epoll refuses regular files and /dev/null: such an input has nothing to wait for.
        log.debug("console input is not pollable; the guest gets no console input", fd=fd)
        return
    box.append(sin)
    try:
        os.set_blocking(fd, False)
    except OSError:
        pass
    vmm.add_source(wake_efd, on_wake)


def _to_kvm_cpuid(entries) -> list[kb.kvm_cpuid_entry2]:
    return [kb.kvm_cpuid_entry2(function=e.function, index=e.index, flags=e.flags,
                                eax=e.eax, ebx=e.ebx, ecx=e.ecx, edx=e.edx) for e in entries]


def _apply_regs(fd, regs) -> None:
    r = kb.kvm_regs()
    for name, _ in kb.kvm_regs._fields_:
        setattr(r, name, getattr(regs, name))
    fd.set_regs(r)


def _apply_segment(dst: kb.kvm_segment, seg) -> None:
    for name in ("base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g", "avl"):
        setattr(dst, name, getattr(seg, name))
    dst.unusable = seg.unusable


def _apply_sregs(fd, sregs) -> None:
    s = fd.get_sregs()
    for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"):
        _apply_segment(getattr(s, name), getattr(sregs, name))
    s.gdt.base, s.gdt.limit = sregs.gdt.base, sregs.gdt.limit
    s.idt.base, s.idt.limit = sregs.idt.base, sregs.idt.limit
    for name in ("cr0", "cr3", "cr4", "efer"):
        setattr(s, name, getattr(sregs, name))
    fd.set_sregs(s)


# --- restore ---------------------------------------------------------------------------------


def build_from_snapshot(state: "MicrovmState", backend: "FileBackend | UffdBackend", *,
                        instance_id: str = "anonymous-instance", track_dirty_pages: bool = False,
                        resume_vm: bool = False, clock_realtime: bool = False,
                        console_in: int | None = None, console_out: int | None = 1) -> Vmm:
    """A microVM restored from `state` (already read, validated and overridden) with memory from `backend`.

    The vCPUs start paused unless `resume_vm`; restored devices are kicked
    and VMGenID announces its new generation when they first run.
    """
    from vmm.persist import SnapshotLoadError

    prepared = take_shell()
    try:
        kvm = prepared[0] if prepared is not None else Kvm()
    except KvmError as exc:
        raise BuildError(f"cannot use KVM: {exc.strerror or exc}") from exc
    shell = prepared[1] if prepared is not None else None
    cleanups: list[Callable[[], None]] = [backend.close] if hasattr(backend, "close") else []
    try:
        return _restore(state, backend, kvm, cleanups, shell=shell, instance_id=instance_id,
                        track_dirty_pages=track_dirty_pages, resume_vm=resume_vm, clock_realtime=clock_realtime,
                        console=ConsoleIo(console_in, console_out))
    except BaseException as exc:
        for fn in reversed(cleanups):
            try:
                fn()
            except Exception:
                pass
        if shell is not None:
            shell.close()  # idempotent: the Vm may have closed it already
        kvm.close()
        if isinstance(exc, SnapshotLoadError):
            raise BuildError(str(exc)) from exc
        raise


def _restore(state, backend, kvm: Kvm, cleanups: list, *, shell=None, instance_id: str, track_dirty_pages: bool,
             resume_vm: bool, clock_realtime: bool, console: ConsoleIo) -> Vmm:
    from vmm.devices.legacy.i8042 import I8042StateInvalid
    from vmm.devices.legacy.serial import SerialStateInvalid
    from vmm.devices.virtio.block import BlockState
    from vmm.devices.virtio.net import NetState
    from vmm.devices.virtio.transport.mmio import MmioTransport, MmioTransportError
    from vmm.devices.virtio.vsock import VsockState
    from vmm.persist import UffdBackend, open_memory
    from vmm.vstate.persist import VstatePersistError, restore_vcpu, restore_vm

    mem = open_memory(backend, state)
    cleanups.append(mem.close)
    install_kick_handler()
    try:
        vm = Vm(kvm, mem, track_dirty_pages=track_dirty_pages, shell=shell)
    except VmError as exc:
        raise BuildError(str(exc)) from exc
    cleanups.append(vm.close)
    if track_dirty_pages:
        mem.enable_dirty_tracking()

    pio_bus, mmio_bus = Bus.pio(), Bus.mmio()
    holder: dict[str, Vmm] = {}

    def request_exit(ex: VmExit) -> None:
        holder["vmm"].request_exit(ex)

    serial_input_box: list[SerialInput] = []
    try:
        serial, i8042 = _legacy_devices(vm, pio_bus, console, request_exit, serial_input_box,
                                        serial_state=state.serial, i8042_state=state.i8042)
    except (SerialStateInvalid, I8042StateInvalid) as exc:
        raise BuildError(f"invalid snapshot: {exc}") from exc
    devices: dict[str, object] = {"serial": serial, "i8042": i8042}

    dm = MmioDeviceManager(vm, mmio_bus, mem)
    cleanups.append(dm.close)
    rate_limiters: list = []
    nets: list[Net] = []
    vsock: Vsock | None = None
    drives = {d.drive_id: d for d in state.config.drives}
    for entry in state.virtio:
        dstate = entry.device

        def build(interrupt, dstate=dstate, entry=entry):
            if isinstance(dstate, BlockState):
                drive = drives.get(dstate.drive_id)
                limiter = None
                if drive is not None and drive.rate_limiter is not None and drive.rate_limiter.enabled:
                    limiter = RateLimiter.from_config(drive.rate_limiter)
                device = Block.from_state(dstate, mem, interrupt, rate_limiter=limiter)
                if limiter is not None:
                    rate_limiters.append((limiter, device.on_rate_limiter_ready))
                cleanups.append(device.backend.close)
            elif isinstance(dstate, NetState):
                device = Net.from_state(dstate, mem, interrupt)
                cleanups.append(device.close)
                nets.append(device)
            elif isinstance(dstate, VsockState):
                device = Vsock.from_state(dstate, mem, interrupt)
                cleanups.append(device.close)
            else:  # pragma: no cover - MicrovmState only builds the three kinds
                raise BuildError(f"unknown device state {type(dstate).__name__}")
            transport = MmioTransport.from_state(entry.transport, device, mem, interrupt=interrupt)
            return device, transport

        try:
            attached = dm.restore(entry.name, entry.slot, build)
        except (BlockError, NetError, VsockError) as exc:
            raise BuildError(f"cannot restore {entry.name}: {exc}") from exc
        except (MmioTransportError, ValueError, TypeError) as exc:
            raise BuildError(f"invalid snapshot: {entry.name}: {exc}") from exc
        except Exception as exc:
            # Each device's *StateInvalid; named by the device's own message.
            raise BuildError(f"cannot restore {entry.name}: {exc}") from exc
        if isinstance(attached.device, Vsock):
            vsock = attached.device
    devices["virtio"] = dm

    vmgenid = None
    if state.vmgenid is not None:
        try:
            vmgenid = VmGenId.restore(state.vmgenid, mem, vm.interrupt_line(state.vmgenid.gsi))
        except Exception as exc:
            raise BuildError(f"invalid snapshot: VMGenID: {exc}") from exc
        devices["vmgenid"] = vmgenid

    vcpus: list[Vcpu] = []
    try:
        for i, vstate in enumerate(state.vcpus):
            fd = vm.fd.create_vcpu(i)
            cleanups.append(fd.close)
            restore_vcpu(fd, vstate)
            vcpus.append(Vcpu(fd, pio_bus, mmio_bus, request_exit))
        restore_vm(vm.fd, state.vm, clock_realtime=clock_realtime)
    except (KvmError, VstatePersistError, OSError) as exc:
        raise BuildError(f"cannot restore the vCPU/VM state: {exc}") from exc

    vmm = _assemble(instance_id=instance_id, kvm=kvm, vm=vm, vcpus=vcpus, pio_bus=pio_bus, mmio_bus=mmio_bus,
                    devices=devices, holder=holder, cleanups=cleanups, dm=dm, rate_limiters=rate_limiters,
                    nets=nets, vsock=vsock, console=console, serial=serial, serial_input_box=serial_input_box)
    vmm.pvm_compat = state.pvm_compat
    vmm.start_paused = not resume_vm
    if isinstance(backend, UffdBackend) and backend.sock is not None:
        vmm.add_source(backend.sock.fileno(), lambda: backend.on_socket_readable(
            lambda reason: vmm.request_exit(VmExit(ExitKind.ERROR, reason, -1))))
    for attached in dm.devices:
        vmm.on_first_run(attached.device.kick)
    if vmgenid is not None:
        vmm.on_first_run(vmgenid.notify)
    log.info("microVM restored", id=instance_id, vcpus=len(vcpus), mem_mib=mem.total_size >> 20,
             backend=repr(backend), devices=[a.name for a in dm.devices])
    return vmm

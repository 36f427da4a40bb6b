"""Executes `VmmAction`s: before InstanceStart against the resources being
configured, after it against the running `Vmm`.

Firecracker splits this into a `PrebootApiController` and a
`RuntimeApiController` (src/vmm/src/rpc_interface.rs); here one
`VmmController` changes phase when InstanceStart builds the microVM.
`ALLOWED_PHASES` is the table of which action runs in which phase; an
action outside its phase is refused with Firecracker's message ("The
requested operation is not supported after starting the microVM.").

Every call runs on the VMM event loop's thread (the API thread hands
requests over through `channel.EventLoopChannel`), so the controller needs
no lock. It never raises for a bad request: every outcome is an `ApiOk` or
an `ApiError` whose message starts the way Firecracker's `VmmActionError`
does ("Machine config error: ...", "Start microvm error: ...").

Devices (drives, network interfaces, vsock, entropy) are accepted into the
configuration before boot after the checks that need no device (ids, TAP
names, MACs, one root drive); whether they can be built is the builder's
call at InstanceStart: if it refuses, InstanceStart answers 400 with its
reason and the controller stays before boot, ready for another try. After
boot, PATCH /drives and PATCH /network-interfaces reach the running virtio
devices (new backing file, new rate limiters), and each interface named in
``mmds-config`` gets its MMDS network stack over the shared `MmdsStore`
before the vCPUs first run.

A config file (``--config-file``) is the same thing as a batch of requests:
`actions_from_config` turns it into the actions the API would receive,
ending with InstanceStart, and `VmmController.apply` runs them in order.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from typing import TYPE_CHECKING

import structlog

from vmm import __version__
from vmm.builder import BuildError
from vmm.config import (
    BootSourceConfig,
    DrivePatch,
    NetworkInterfacePatch,
    RateLimiterConfig,
    ConfigError,
    DriveConfig,
    DuplicateDeviceId,
    EntropyConfig,
    GuestMacAddressInUse,
    InvalidKernelPath,
    InvalidNetworkInterfaceId,
    Json,
    MachineConfig,
    MachineConfigUpdate,
    MetricsConfig,
    MmdsConfig,
    NetworkInterfaceConfig,
    MemBackendType,
    RootBlockDeviceAlreadyAdded,
    SnapshotCreateParams,
    SnapshotLoadParams,
    SnapshotType,
    UnsupportedConfig,
    VmConfig,
    VsockConfig,
)
from vmm.device_manager import MmioDeviceManager
from vmm.devices.legacy import I8042PioAdapter, SerialPioAdapter
from vmm.devices.virtio.block import Block, BlockError
from vmm.devices.virtio.net import Net
from vmm.logger import LOGGER, Logger, LoggerError
from vmm.metrics import Metrics, MetricsError, count_bus_device
from vmm.mmds import DataStoreLimitExceeded, MmdsError, MmdsMetrics, MmdsNetworkStack, MmdsStore
from vmm.rate_limiter import RateLimiter, RateLimiterError
from vmm.runtime import Vmm

if TYPE_CHECKING:  # the snapshot package is imported only when a snapshot is used
    from snapshot.auth import SnapshotKey

from .actions import (
    ApiError,
    ApiOk,
    ApiResult,
    ConfigureBootSource,
    ConfigureLogger,
    CreateSnapshot,
    LoadSnapshot,
    ConfigureMetrics,
    FlushMetrics,
    GetFullVmConfig,
    GetInstanceInfo,
    GetMachineConfig,
    GetMmds,
    GetVmmVersion,
    InsertBlockDevice,
    InsertNetworkDevice,
    PatchMmds,
    Pause,
    PutMmds,
    Resume,
    SendCtrlAltDel,
    SetEntropyDevice,
    SetMmdsConfig,
    SetVsockDevice,
    StartMicroVm,
    UpdateBlockDevice,
    UpdateMachineConfig,
    UpdateNetworkInterface,
    VmmAction,
)

__all__ = [
    "APP_NAME",
    "FIRECRACKER_API_VERSION",
    "ALLOWED_PHASES",
    "InstanceState",
    "Phase",
    "VmResources",
    "VmmController",
    "actions_from_config",
]

log = structlog.get_logger("vmm.api.controller")

#: `InstanceInfo.app_name`.
APP_NAME = "Ember"
#: The Firecracker API version Ember implements (GET /version's `firecracker_version`),
#: from the contract ../shared/reference/firecracker-api-v1.17.yaml.
FIRECRACKER_API_VERSION = "1.17.0"

# Firecracker rpc_interface.rs VmmActionError.
NOT_SUPPORTED_POST_BOOT = "The requested operation is not supported after starting the microVM."
NOT_SUPPORTED_PRE_BOOT = "The requested operation is not supported before starting the microVM."
# Firecracker builder.rs StartMicrovmError::MissingKernelConfig.
MISSING_KERNEL_CONFIG = "Cannot start microvm without kernel configuration."


class Phase(enum.Enum):
    PRE_BOOT = "pre-boot"
    POST_BOOT = "post-boot"


class InstanceState(enum.StrEnum):
    """Spec `InstanceInfo.state`."""

    NOT_STARTED = "Not started"
    RUNNING = "Running"
    PAUSED = "Paused"


_PRE = frozenset({Phase.PRE_BOOT})
_POST = frozenset({Phase.POST_BOOT})
_ANY = _PRE | _POST

#: Which action runs in which phase (Firecracker's `handle_preboot_request`
#: and `RuntimeApiController::handle_request`, for the actions Ember has).
ALLOWED_PHASES: dict[type, frozenset[Phase]] = {
    ConfigureBootSource: _PRE,
    ConfigureLogger: _PRE,
    ConfigureMetrics: _PRE,
    InsertBlockDevice: _PRE,
    InsertNetworkDevice: _PRE,
    SetEntropyDevice: _PRE,
    SetMmdsConfig: _PRE,
    SetVsockDevice: _PRE,
    StartMicroVm: _PRE,
    LoadSnapshot: _PRE,
    CreateSnapshot: _POST,
    UpdateMachineConfig: _PRE,
    FlushMetrics: _POST,
    Pause: _POST,
    Resume: _POST,
    SendCtrlAltDel: _POST,
    UpdateBlockDevice: _POST,
    UpdateNetworkInterface: _POST,
    GetFullVmConfig: _ANY,
    GetInstanceInfo: _ANY,
    GetMachineConfig: _ANY,
    GetMmds: _ANY,
    GetVmmVersion: _ANY,
    PatchMmds: _ANY,
    PutMmds: _ANY,
}

# What GET /vm/config shows for a boot source never configured (Firecracker's default).
_NO_BOOT_SOURCE = BootSourceConfig(kernel_image_path="")


@dataclass
class VmResources:
    """The configuration being assembled before boot (Firecracker's `VmResources`).

    Devices are kept by id in the order they were first put; putting an
    existing id replaces its configuration.
    """

    boot_source: BootSourceConfig | None = None
    machine_config: MachineConfig = field(default_factory=MachineConfig)
    drives: dict[str, DriveConfig] = field(default_factory=dict)
    network_interfaces: dict[str, NetworkInterfaceConfig] = field(default_factory=dict)
    vsock: VsockConfig | None = None
    entropy: EntropyConfig | None = None
    mmds_config: MmdsConfig | None = None

    def vm_config(self) -> VmConfig:
        """The configuration to build (`boot_source` must be set)."""
        return VmConfig(
            boot_source=self.boot_source if self.boot_source is not None else _NO_BOOT_SOURCE,
            machine_config=self.machine_config,
            drives=tuple(self.drives.values()),
            network_interfaces=tuple(self.network_interfaces.values()),
            vsock=self.vsock,
            entropy=self.entropy,
            mmds_config=self.mmds_config,
        )

    def to_json(self) -> dict[str, Json]:
        """GET /vm/config: every key, ``null`` for absent sections (logger and
        metrics are not reported, as in Firecracker)."""
        return self.vm_config().to_json()

    def check_drive(self, drive: DriveConfig) -> None:
        """Raise the `ConfigError` that putting `drive` would cause."""
        drive.validate()
        if drive.is_root_device:
            for other in self.drives.values():
                if other.is_root_device and other.drive_id != drive.drive_id:
                    raise RootBlockDeviceAlreadyAdded(f"A root block device already exists! (`{other.drive_id}`)")

    def check_network_interface(self, iface: NetworkInterfaceConfig) -> None:
        """Raise the `ConfigError` that putting `iface` would cause."""
        iface.validate()
        for other in self.network_interfaces.values():
            if other.iface_id == iface.iface_id:
                continue
            if other.host_dev_name == iface.host_dev_name:
                raise DuplicateDeviceId(f"The TAP device `{iface.host_dev_name}` is already used by the "
                                        f"network interface `{other.iface_id}`.")
            if iface.guest_mac is not None and other.guest_mac == iface.guest_mac:
                raise GuestMacAddressInUse(f"The MAC address is already in use: {iface.guest_mac}")

    def check_mmds_config(self, config: MmdsConfig) -> None:
        config.validate()
        for iface_id in config.network_interfaces:
            if iface_id not in self.network_interfaces:
                raise InvalidNetworkInterfaceId(
                    "The list of network interface IDs provided contains at least one ID that does not "
                    f"correspond to any existing network interface: `{iface_id}`.")


class VmmController:
    """The one place `VmmAction`s are executed, before and after InstanceStart.

    `boot(config)` builds the microVM (``build_for_boot`` with the process's
    options) and raises `BuildError` when it cannot; its `Vmm` is then
    driven by the caller's event loop (`Vmm.run`). `mmds` is the metadata
    store (None: the MMDS endpoints answer that it is unavailable).
    """

    def __init__(self, *, boot: Callable[[VmConfig], Vmm], restore: Callable[..., Vmm] | None = None,
                 instance_id: str = "anonymous-instance",
                 metrics: Metrics | None = None, mmds: MmdsStore | None = None, logger: Logger = LOGGER,
                 vmm_version: str = __version__, clock: Callable[[], float] = time.monotonic,
                 snapshot_key: SnapshotKey | None = None) -> None:
        self.instance_id = instance_id
        # With a key, snapshots are signed on create and must be authentic on load (docs/snapshots.md).
        self.snapshot_key = snapshot_key
        self.vmm_version = vmm_version
        self.resources = VmResources()
        self.metrics = metrics if metrics is not None else Metrics(instance_id)
        self.mmds = mmds
        self._boot = boot
        self._restore = restore
        # Firecracker allows a snapshot load only into a fresh VMM: nothing configured but logger/metrics.
        self._configured = False
        self._msrs: list[int] | None = None
        self._logger = logger
        self._clock = clock
        self._vmm: Vmm | None = None
        self._paused = False

    # --- state ------------------------------------------------------------------------

    @property
    def vmm(self) -> Vmm | None:
        """The running microVM, once InstanceStart succeeded."""
        return self._vmm

    @property
    def phase(self) -> Phase:
        return Phase.PRE_BOOT if self._vmm is None else Phase.POST_BOOT

    @property
    def state(self) -> InstanceState:
        if self._vmm is None:
            return InstanceState.NOT_STARTED
        return InstanceState.PAUSED if self._paused else InstanceState.RUNNING

    # --- entry points -----------------------------------------------------------------------

    def handle(self, action: VmmAction) -> ApiResult:
        """Execute one action; never raises for a bad request."""
        allowed = ALLOWED_PHASES.get(type(action))
        if allowed is None:
            return ApiError(f"The requested operation is not supported: {type(action).__name__}",
                            HTTPStatus.BAD_REQUEST)
        if self.phase not in allowed:
            return ApiError(NOT_SUPPORTED_POST_BOOT if self.phase is Phase.POST_BOOT else NOT_SUPPORTED_PRE_BOOT)
        try:
            return self._execute(action)
        except Exception as exc:  # a bug must answer, not take the event loop down
            log.error("API action failed unexpectedly", action=type(action).__name__, error=repr(exc))
            return ApiError(f"Internal VMM error: {exc!r}", HTTPStatus.INTERNAL_SERVER_ERROR)

    def apply(self, actions: Iterable[VmmAction]) -> ApiError | None:
        """Run `actions` in order (a config file); the first error stops the batch and is returned."""
        for action in actions:
            result = self.handle(action)
            if isinstance(result, ApiError):
                return result
        return None

    # --- execution ------------------------------------------------------------------------

    def _execute(self, action: VmmAction) -> ApiResult:
        r = self.resources
        match action:
            case GetInstanceInfo():
                return ApiOk({"id": self.instance_id, "state": self.state.value,
                              "vmm_version": self.vmm_version, "app_name": APP_NAME})
            case GetVmmVersion():
                return ApiOk({"firecracker_version": FIRECRACKER_API_VERSION})
            case GetMachineConfig():
                return ApiOk(r.machine_config.to_json())
            case GetFullVmConfig():
                return ApiOk(r.to_json())
            case ConfigureBootSource(config=config):
                return self._configure(lambda: _check_boot_source(config), "Boot source error",
                                       lambda: setattr(r, "boot_source", config))
            case UpdateMachineConfig(update=update):
                return self._update_machine_config(update)
            case InsertBlockDevice(config=drive):
                return self._configure(lambda: r.check_drive(drive), "Drive config error",
                                       lambda: r.drives.__setitem__(drive.drive_id, drive))
            case InsertNetworkDevice(config=iface):
                return self._configure(lambda: r.check_network_interface(iface), "Network config error",
                                       lambda: r.network_interfaces.__setitem__(iface.iface_id, iface))
            case SetVsockDevice(config=vsock):
                return self._configure(vsock.validate, "Vsock config error", lambda: setattr(r, "vsock", vsock))
            case SetEntropyDevice(config=entropy):
                return self._configure(entropy.validate, "Entropy config error",
                                       lambda: setattr(r, "entropy", entropy))
            case SetMmdsConfig(config=mmds_config):
                return self._set_mmds_config(mmds_config)
            case ConfigureLogger(config=config):
                try:
                    self._logger.configure(config)
                except LoggerError as exc:
                    return ApiError(f"Logger error: {exc}")
                return ApiOk()
            case ConfigureMetrics(config=config):
                return self._configure_metrics(config)
            case PutMmds(data=data):
                return self._mmds_update(lambda store: store.put(data))
            case PatchMmds(data=data):
                return self._mmds_update(lambda store: store.patch(data))
            case GetMmds():
                if self.mmds is None:
                    return _mmds_unavailable()
                return ApiOk(self.mmds.get())
            case StartMicroVm():
                return self._start()
            case LoadSnapshot(params=params):
                return self._load_snapshot(params)
            case CreateSnapshot(params=cparams):
                return self._create_snapshot(cparams)
            case Pause():
                return self._pause_or_resume(pause=True)
            case Resume():
                return self._pause_or_resume(pause=False)
            case SendCtrlAltDel():
                return self._send_ctrl_alt_del()
            case FlushMetrics():
                self.metrics.flush()
                return ApiOk()
            case UpdateBlockDevice(patch=patch):
                return self._update_block_device(patch)
            case UpdateNetworkInterface(patch=ipatch):
                return self._update_network_interface(ipatch)
        return ApiError(f"The requested operation is not supported: {type(action).__name__}")

    def _configure(self, check: Callable[[], None], what: str, store: Callable[[], None]) -> ApiResult:
        try:
            check()
        except ConfigError as exc:
            return ApiError(f"{what}: {exc.fault_message}")
        store()
        self._configured = True
        return ApiOk()

    def _update_machine_config(self, update: MachineConfigUpdate) -> ApiResult:
        try:
            self.resources.machine_config = self.resources.machine_config.update(update)
        except ConfigError as exc:
            return ApiError(f"Machine config error: {exc.fault_message}")
        self._configured = True
        return ApiOk()

    def _set_mmds_config(self, config: MmdsConfig) -> ApiResult:
        try:
            self.resources.check_mmds_config(config)
        except ConfigError as exc:
            return ApiError(f"MMDS config error: {exc.fault_message}")
        self.resources.mmds_config = config
        self._configured = True
        if self.mmds is not None:
            self.mmds.version = config.version
            self.mmds.imds_compat = config.imds_compat
            self.mmds.set_aad(self.instance_id)
        return ApiOk()

    def _configure_metrics(self, config: MetricsConfig) -> ApiResult:
        try:
            self.metrics.configure(config)
        except MetricsError as exc:
            return ApiError(f"Metrics error: Cannot initialize the metrics system due to bad user input: {exc}")
        return ApiOk()

    def _mmds_update(self, change: Callable[[MmdsStore], None]) -> ApiResult:
        if self.mmds is None:
            return _mmds_unavailable()
        try:
            change(self.mmds)
        except DataStoreLimitExceeded as exc:
            return ApiError(f"MMDS limit exceeded error: {exc}", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        except MmdsError as exc:
            return ApiError(f"MMDS error: {exc}")
        return ApiOk()

    # --- lifecycle ------------------------------------------------------------------------

    def _start(self) -> ApiResult:
        r = self.resources
        if r.boot_source is None:
            return ApiError(f"Start microvm error: {MISSING_KERNEL_CONFIG}")
        config = r.vm_config()
        try:
            config.validate()
        except ConfigError as exc:
            return ApiError(f"Start microvm error: {exc.fault_message}")
        started = self._clock()
        try:
            vmm = self._boot(config)
        except BuildError as exc:
            log.info("InstanceStart refused", reason=str(exc))
            return ApiError(f"Start microvm error: {exc}")
        self._vmm = vmm
        self._attach_mmds()
        self._attach_metrics(vmm)
        log.info("microVM started", id=self.instance_id, build_ms=round((self._clock() - started) * 1000, 3))
        return ApiOk()

    # --- snapshots ---------------------------------------------------------------------------

    def _load_snapshot(self, params: SnapshotLoadParams) -> ApiResult:
        """PUT /snapshot/load: restore into this fresh VMM (Firecracker's `restore_from_snapshot`)."""
        from vmm.persist import FileBackend, MicrovmState, SnapshotLoadError, UffdBackend

        if self._configured:
            return ApiError("Loading a microVM snapshot not allowed after configuring boot-specific resources.")
        if self._restore is None:
            return ApiError("Load snapshot error: this VMM cannot restore snapshots.")
        try:
            params.validate()
        except ConfigError as exc:
            return ApiError(f"Load snapshot error: {exc.fault_message}")
        started = self._clock()
        key = self.snapshot_key
        try:
            state = MicrovmState.read(params.snapshot_path, key=key).with_overrides(
                network={o.iface_id: o.host_dev_name for o in params.network_overrides},
                drives={o.drive_id: o.path_on_host for o in params.drive_overrides},
                vsock_uds_path=params.vsock_override.uds_path if params.vsock_override is not None else None)
        except SnapshotLoadError as exc:
            return ApiError(f"Load snapshot error: {exc}")
        path = params.mem_backend.backend_path
        backend: FileBackend | UffdBackend
        if params.mem_backend.backend_type is MemBackendType.FILE:
            backend = FileBackend(path, key=key, signature=state.signature if key is not None else None)
        else:
            backend = UffdBackend(path)  # the page server checks each chunk against the signature
        try:
            vmm = self._restore(state, backend, track_dirty_pages=params.track_dirty_pages,
                                resume_vm=params.resume_vm, clock_realtime=params.clock_realtime)
        except BuildError as exc:
            log.info("snapshot load refused", reason=str(exc))
            return ApiError(f"Load snapshot error: {exc}")
        r = self.resources
        config = state.config
        r.boot_source = config.boot_source
        r.machine_config = replace(config.machine_config, track_dirty_pages=params.track_dirty_pages)
        r.drives = {d.drive_id: d for d in config.drives}
        r.network_interfaces = {n.iface_id: n for n in config.network_interfaces}
        r.vsock = config.vsock
        r.mmds_config = config.mmds_config
        self._vmm = vmm
        self._paused = not params.resume_vm
        self._attach_mmds()
        self._attach_metrics(vmm)
        elapsed_us = int((self._clock() - started) * 1_000_000)
        self.metrics.gauge("latencies_us", "load_snapshot").set(elapsed_us)
        log.info("snapshot loaded", path=params.snapshot_path, backend=repr(backend), took_us=elapsed_us,
                 resumed=params.resume_vm, signed=key is not None,
                 memory_verify_us=getattr(backend, "verify_us", 0))
        return ApiOk()

    def _create_snapshot(self, params: SnapshotCreateParams) -> ApiResult:
        """PUT /snapshot/create: the microVM must be paused (Firecracker's rule)."""
        from vmm.persist import SnapshotCreateError, create_snapshot
        from vmm.vstate.persist import msrs_to_save

        vmm = self._vmm
        assert vmm is not None
        if not self._paused:
            return ApiError("Create snapshot error: the microVM must be paused before creating a snapshot "
                            "(PATCH /vm {\"state\": \"Paused\"}).")
        try:
            params.validate()
        except ConfigError as exc:
            return ApiError(f"Create snapshot error: {exc.fault_message}")
        try:
            result = create_snapshot(vmm, snapshot_path=params.snapshot_path, mem_file_path=params.mem_file_path,
                                     diff=params.snapshot_type is SnapshotType.DIFF, config=self.resources.vm_config(),
                                     msr_indices=self._msr_indices(vmm, msrs_to_save), key=self.snapshot_key)
        except SnapshotCreateError as exc:
            return ApiError(f"Create snapshot error: {exc}")
        self.metrics.gauge("latencies_us", "full_create_snapshot" if params.snapshot_type is SnapshotType.FULL
                           else "diff_create_snapshot").set(result.duration_us)
        return ApiOk()

    def _msr_indices(self, vmm: Vmm, probe: Callable) -> list[int]:
        """The MSRs to save (probing costs a scratch VM, ~16 ms: once per process)."""
        if self._msrs is None:
            self._msrs = probe(vmm.kvm)
        return self._msrs

    def _attach_metrics(self, vmm: Vmm) -> None:
        vcpus = list(vmm.vcpus)

        def vcpu_exits() -> dict[str, int]:
            totals: dict[str, int] = {}
            for vcpu in vcpus:
                for name, count in dict(vcpu.exit_counts).items():
                    key = f"exit_{name}"
                    totals[key] = totals.get(key, 0) + count
            return totals

        self.metrics.register_counters("vcpu", vcpu_exits)
        for section, device in (("uart", vmm.devices.get("serial")), ("i8042", vmm.devices.get("i8042"))):
            if not isinstance(device, (SerialPioAdapter, I8042PioAdapter)):
                continue
            base = next((b for b, _, d in vmm.pio_bus.ranges() if d is device), None)
            if base is None:
                continue
            self.metrics.register_counters(section, count_bus_device(vmm.pio_bus, base).counts)
            if isinstance(device, I8042PioAdapter):
                i8042 = device.i8042
                self.metrics.register_counters(section, lambda: {"reset_count": i8042.reset_count})
        # Virtio devices keep Firecracker-named counters in `.metrics`: one section per
        # kind (the sum) and one per device, as Firecracker's block_<id> / net_<id>.
        manager = vmm.devices.get("virtio")
        for attached in manager.devices if isinstance(manager, MmioDeviceManager) else ():
            counters = getattr(attached.device, "metrics", None)
            if counters is None or not dataclasses.is_dataclass(counters):
                continue
            kind, _, ident = attached.name.partition(":")
            section = {"drive": "block", "net": "net"}.get(kind, kind)
            source = functools.partial(dataclasses.asdict, counters)
            self.metrics.register_counters(section, source)
            if ident:
                self.metrics.register_counters(f"{section}_{ident}", source)

    def _virtio_device(self, name: str) -> object | None:
        assert self._vmm is not None
        manager = self._vmm.devices.get("virtio")
        attached = manager.get(name) if isinstance(manager, MmioDeviceManager) else None
        return attached.device if attached is not None else None

    def _update_block_device(self, patch: DrivePatch) -> ApiResult:
        """PATCH /drives: a new backing file and/or rate limiter for a running drive."""
        drive = self.resources.drives.get(patch.drive_id)
        if drive is None:
            return ApiError(f"Drive config error: Invalid block device ID: `{patch.drive_id}`.")
        block = self._virtio_device(f"drive:{patch.drive_id}")
        if not isinstance(block, Block):
            return ApiError(f"Drive config error: the drive `{patch.drive_id}` has no virtio-block device.")
        try:
            if patch.path_on_host is not None:
                block.update_path(patch.path_on_host)
                drive = replace(drive, path_on_host=patch.path_on_host)
            if patch.rate_limiter is not None:
                self._update_block_rate_limiter(block, patch.rate_limiter)
                drive = replace(drive, rate_limiter=patch.rate_limiter)
        except (BlockError, RateLimiterError) as exc:
            return ApiError(f"Drive config error: {exc}")
        finally:
            self.resources.drives[patch.drive_id] = drive
        return ApiOk()

    def _update_block_rate_limiter(self, block: Block, config: RateLimiterConfig) -> None:
        if block.rate_limiter is not None:
            block.rate_limiter.update_from_config(config)
            return
        # The drive was built without a limiter: make one and wake the queue on its timer.
        assert self._vmm is not None
        limiter = RateLimiter.from_config(config)

        def on_timer() -> None:
            try:
                limiter.event_handler()
            except RateLimiterError:
                return  # spurious wake-up: the timer had not expired
            block.on_rate_limiter_ready()

        self._vmm.add_source(limiter.fd, on_timer)
        block.update_rate_limiter(limiter)

    def _update_network_interface(self, patch: NetworkInterfacePatch) -> ApiResult:
        """PATCH /network-interfaces: new RX/TX rate limiters for a running interface."""
        iface = self.resources.network_interfaces.get(patch.iface_id)
        if iface is None:
            return ApiError(f"Network config error: Invalid network interface ID: `{patch.iface_id}`.")
        net = self._virtio_device(f"net:{patch.iface_id}")
        if not isinstance(net, Net):
            return ApiError(f"Network config error: the interface `{patch.iface_id}` has no virtio-net device.")
        try:
            net.update_rate_limiters(patch.rx_rate_limiter, patch.tx_rate_limiter)
        except RateLimiterError as exc:
            return ApiError(f"Network config error: {exc}")
        self.resources.network_interfaces[patch.iface_id] = replace(
            iface,
            rx_rate_limiter=patch.rx_rate_limiter if patch.rx_rate_limiter is not None else iface.rx_rate_limiter,
            tx_rate_limiter=patch.tx_rate_limiter if patch.tx_rate_limiter is not None else iface.tx_rate_limiter)
        return ApiOk()

    def _attach_mmds(self) -> None:
        """Give each interface named in ``mmds-config`` its MMDS network stack (before the vCPUs run)."""
        config = self.resources.mmds_config
        if config is None or self.mmds is None:
            return
        metrics = MmdsMetrics()
        for iface_id in config.network_interfaces:
            net = self._virtio_device(f"net:{iface_id}")
            if isinstance(net, Net):
                net.set_mmds(MmdsNetworkStack(self.mmds, ipv4_addr=config.effective_ipv4_address,
                                              clock=self._clock, metrics=metrics))
        self.metrics.register_counters("mmds", lambda: dataclasses.asdict(metrics))

    def _pause_or_resume(self, *, pause: bool) -> ApiResult:
        vmm = self._vmm
        assert vmm is not None
        if self._paused == pause:
            return ApiOk()
        started = self._clock()
        try:
            vmm.pause() if pause else vmm.resume()
        except (TimeoutError, RuntimeError) as exc:
            return ApiError(f"Internal VMM error: cannot {'pause' if pause else 'resume'} the vCPUs: {exc}")
        self._paused = pause
        elapsed_us = int((self._clock() - started) * 1_000_000)
        self.metrics.gauge("latencies_us", "vmm_pause_vm" if pause else "vmm_resume_vm").set(elapsed_us)
        log.info("microVM paused" if pause else "microVM resumed", took_us=elapsed_us)
        return ApiOk()

    def _send_ctrl_alt_del(self) -> ApiResult:
        assert self._vmm is not None
        i8042 = self._vmm.devices.get("i8042")
        if not isinstance(i8042, I8042PioAdapter):
            return ApiError("Internal VMM error: this microVM has no i8042 controller.")
        if not i8042.trigger_ctrl_alt_del():
            return ApiError("Internal VMM error: the i8042 did not take Ctrl+Alt+Del: the guest disabled the "
                            "keyboard or has not read its buffer.")
        return ApiOk()

    def __repr__(self) -> str:
        r = self.resources
        return (f"<VmmController {self.instance_id} {self.state.value} drives={len(r.drives)} "
                f"ifaces={len(r.network_interfaces)} vmm={self._vmm!r}>")


def _check_boot_source(config: BootSourceConfig) -> None:
    """`validate`, then the files must open (Firecracker opens them at PUT /boot-source)."""
    config.validate()
    for what, path in (("kernel", config.kernel_image_path), ("initrd", config.initrd_path)):
        if path is None:
            continue
        try:
            with open(path, "rb"):
                pass
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            error = InvalidKernelPath if what == "kernel" else ConfigError
            raise error(f"The {what} file cannot be opened: {reason} ({path})") from exc


def _mmds_unavailable() -> ApiError:
    return ApiError("MMDS error: the MMDS data store is not available in this VMM.")


def actions_from_config(config: VmConfig) -> list[VmmAction]:
    """The requests a config file stands for, in the order Firecracker applies its
    sections, ending with InstanceStart.

    Raises `UnsupportedConfig` for sections Ember cannot honour (balloon,
    custom CPU template) rather than ignoring them.
    """
    if config.balloon is not None:
        raise UnsupportedConfig("The balloon device is not supported by Ember.", path="balloon")
    if config.cpu_config is not None:
        raise UnsupportedConfig("Custom CPU templates are not supported by Ember.", path="cpu-config")
    actions: list[VmmAction] = []
    if config.logger is not None:
        actions.append(ConfigureLogger(config.logger))
    if config.metrics is not None:
        actions.append(ConfigureMetrics(config.metrics))
    actions.append(UpdateMachineConfig(MachineConfigUpdate.from_machine_config(config.machine_config)))
    actions.append(ConfigureBootSource(config.boot_source))
    actions += [InsertBlockDevice(d) for d in config.drives]
    actions += [InsertNetworkDevice(n) for n in config.network_interfaces]
    if config.vsock is not None:
        actions.append(SetVsockDevice(config.vsock))
    if config.entropy is not None:
        actions.append(SetEntropyDevice(config.entropy))
    if config.mmds_config is not None:
        actions.append(SetMmdsConfig(config.mmds_config))
    actions.append(StartMicroVm())
    return actions

"""`ember-vmm`: one microVM per process, with Firecracker's command-line flags.

    ember-vmm --api-sock /tmp/vm.sock [--config-file vm.json] [--id ID] ...
    ember-vmm --config-file vm.json --no-api [--boot-timer] [--id ID]

With `--api-sock`, the VMM serves Firecracker's REST API on that Unix
socket; the microVM is configured by PUT requests and started by
InstanceStart. A `--config-file` is the same thing as a batch of those
requests, applied before the API serves (through the same controller), and
it always ends with InstanceStart; with `--no-api` the file alone boots the
microVM. Until InstanceStart, the main thread runs a small pre-boot loop
that only executes API requests; then it runs the microVM's event loop
(`Vmm.run`), which serves the API too.

Exit status: 0 when the guest reboots or powers off, 1 when the VMM fails
(with a one-line reason on stderr), 2 for bad command-line arguments, 143
on SIGTERM. A thread that makes a system call outside its seccomp filter
kills the process with SIGSYS (docs/seccomp.md; `--no-seccomp` runs
without filters).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
import time

from typing import TYPE_CHECKING

from vmm import __version__

if TYPE_CHECKING:
    import socket

    from jailer import ImportWatch, JailSpec
    from vmm.runtime import Vmm

# Captured as early as possible: --boot-timer measures from here unless the
# caller (a jailer, the pool service) passes its own start instants.
_START_WALL_NS = time.monotonic_ns()
_START_CPU_NS = time.process_time_ns()

DEFAULT_INSTANCE_ID = "anonymous-instance"
# Firecracker src/firecracker/src/main.rs HTTP_MAX_PAYLOAD_SIZE.
DEFAULT_HTTP_API_MAX_PAYLOAD_SIZE = 51200
_LOG_LEVELS = ("Error", "Warning", "Info", "Debug", "Trace", "Off")


def _log_level(text: str) -> str:
    for level in (*_LOG_LEVELS, "Warn"):
        if text.lower() == level.lower():
            return level
    raise argparse.ArgumentTypeError(f"invalid level {text!r}: expected one of {', '.join(_LOG_LEVELS)}")


def _size(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of bytes") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ember-vmm",
        description="Ember's virtual machine monitor: one microVM per process (Firecracker-compatible flags).")
    p.add_argument("--api-sock", metavar="PATH", help="path of the API Unix socket (must not exist)")
    p.add_argument("--config-file", metavar="PATH", help="boot from a Firecracker JSON configuration")
    p.add_argument("--no-api", action="store_true", help="do not start the API server (needs --config-file)")
    p.add_argument("--id", default=DEFAULT_INSTANCE_ID, help="microVM identifier (default: %(default)s)")
    p.add_argument("--http-api-max-payload-size", type=_size, default=DEFAULT_HTTP_API_MAX_PAYLOAD_SIZE,
                   metavar="BYTES", help="largest API request body (default: %(default)s)")
    p.add_argument("--mmds-size-limit", type=_size, metavar="BYTES",
                   help="largest MMDS data store (default: --http-api-max-payload-size)")
    p.add_argument("--metadata", metavar="PATH", help="JSON file whose object seeds the MMDS data store")
    p.add_argument("--log-path", metavar="PATH", help="file or named pipe for JSON log lines (default: stderr)")
    p.add_argument("--level", type=_log_level, default="Warning",
                   help="log level: Error, Warning, Info, Debug, Trace, Off (default: %(default)s)")
    p.add_argument("--module", help="log only events of loggers whose name starts with this (e.g. vmm.api)")
    p.add_argument("--show-level", action="store_true", help="put the level in each log line")
    p.add_argument("--show-log-origin", action="store_true", help="put the file and line in each log line")
    p.add_argument("--metrics-path", metavar="PATH", help="file or named pipe for JSON metrics lines")
    p.add_argument("--boot-timer", action="store_true",
                   help="log Guest-boot-time when the guest writes the boot-complete magic")
    seccomp_flags = p.add_mutually_exclusive_group()
    seccomp_flags.add_argument("--no-seccomp", action="store_true",
                               help="run without seccomp filters (not recommended)")
    seccomp_flags.add_argument("--seccomp-filter", metavar="FILE",
                               help="custom seccomp filters, a Firecracker seccompiler JSON file with the "
                                    "vmm, api and vcpu filters (default: Ember's built-in filters, see "
                                    "docs/seccomp.md)")
    p.add_argument("--start-time-us", type=int, help="process start, monotonic µs (from a jailer)")
    p.add_argument("--start-time-cpu-us", type=int, help="process start, CPU µs (from a jailer)")
    p.add_argument("--boot-protocol", choices=("auto", "linux", "pvh"), default="linux",
                   help="(Ember) how to enter an ELF kernel: Linux's 64-bit boot protocol, the PVH entry "
                        "(needs the kernel's Xen PVH note), or auto (PVH when the note is there, as "
                        "Firecracker does). Default: %(default)s")
    p.add_argument("--no-pvm-compat", action="store_true",
                   help="on kvm_pvm hosts, do not apply the guest compatibility profile")
    p.add_argument("--rip-profile", metavar="PATH",
                   help="(Ember) sample each vCPU's RIP every --rip-profile-interval-ms and write them to PATH")
    p.add_argument("--rip-profile-interval-ms", type=float, default=10.0)
    p.add_argument("--snapshot-key-file", metavar="PATH",
                   help="(Ember) 32-byte snapshot key, read at startup: snapshots are signed on create and "
                        "must be authentic on load (default: $EMBER_SNAPSHOT_KEY_FILE; none: unsigned, as "
                        "in Firecracker)")
    p.add_argument("--jail", metavar="SPEC",
                   help="(Ember, from ember-jailer) enter the jail described by this JSON file once everything "
                        "is imported and --log-path, --metrics-path and --snapshot-key-file are open; every "
                        "other path (API socket, config file, metadata, drives, snapshots) is inside the jail")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    return p


@functools.cache
def parser() -> argparse.ArgumentParser:
    """The parser `main` uses, built once (`preload` builds it in the zygote, before forking: ~2 ms of
    argparse and gettext work a forked VMM would otherwise repeat). Parsing does not change it."""
    return build_parser()


def _on_sigterm(signum: int, frame: object) -> None:
    # Unwind through the `finally` blocks: vCPUs stopped, API socket removed.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None, *, jail: JailSpec | None = None,
         api_listener: socket.socket | None = None) -> int:
    """Run the VMM with command-line `argv`; `jail`: enter that jail (as ``--jail`` does; the zygote).

    `api_listener` (the zygote): a socket already bound at ``--api-sock`` and
    listening, served instead of binding a new one.
    """
    args = parser().parse_args(argv)
    if args.version:
        print(f"ember-vmm v{__version__}")
        return 0
    from vmm.procname import name_process
    name_process(args.id, list(sys.argv[1:] if argv is None else argv))

    from vmm.logger import LOGGER, LoggerError, configure_logging, fatal
    LOGGER.instance_id = args.id
    configure_logging(args.level)

    if args.no_api and not args.config_file:
        fatal("--no-api needs --config-file")
        return 1
    if not args.no_api and not args.api_sock:
        fatal("the API server needs --api-sock PATH (or use --no-api with --config-file)")
        return 1

    from vmm.api import (
        ApiError,
        ApiHandler,
        ApiServer,
        ApiServerError,
        EventLoopChannel,
        PutMmds,
        VmmController,
        actions_from_config,
    )
    from vmm.builder import build_for_boot, build_from_snapshot
    from vmm.config import ConfigError, LoggerConfig, LogLevel, MetricsConfig, VmConfig, read_json_file
    from vmm.metrics import Metrics, MetricsError, PeriodicFlush
    from vmm.mmds import MmdsStore

    if args.log_path or args.show_level or args.show_log_origin or args.module:
        try:
            LOGGER.configure(LoggerConfig(
                log_path=args.log_path, level=LogLevel(args.level if args.level != "Warn" else "Warning"),
                show_level=True if args.show_level else None,
                show_log_origin=True if args.show_log_origin else None, module=args.module))
        except LoggerError as exc:
            fatal(f"cannot configure the logger: {exc}")
            return 1

    metrics = Metrics(args.id)
    if args.metrics_path:
        try:
            metrics.configure(MetricsConfig(metrics_path=args.metrics_path))
        except MetricsError as exc:
            fatal(f"cannot configure the metrics: {exc}")
            return 1

    mmds_limit = args.mmds_size_limit if args.mmds_size_limit is not None else args.http_api_max_payload_size
    mmds = MmdsStore(mmds_limit)
    mmds.set_aad(args.id)

    start_wall_ns = args.start_time_us * 1000 if args.start_time_us is not None else _START_WALL_NS
    start_cpu_ns = args.start_time_cpu_us * 1000 if args.start_time_cpu_us is not None else _START_CPU_NS
    boot = functools.partial(
        build_for_boot, instance_id=args.id, boot_timer=args.boot_timer, start_wall_ns=start_wall_ns,
        start_cpu_ns=start_cpu_ns, pvm_compat=not args.no_pvm_compat, boot_protocol=args.boot_protocol,
        console_in=sys.stdin.fileno() if _stdin_usable() else None, console_out=sys.stdout.fileno())
    restore = functools.partial(
        build_from_snapshot, instance_id=args.id,
        console_in=sys.stdin.fileno() if _stdin_usable() else None, console_out=sys.stdout.fileno())
    # Read now: the VMM may later run where the key file cannot be reached (a jail).
    snapshot_key = None
    key_file = args.snapshot_key_file or os.environ.get("EMBER_SNAPSHOT_KEY_FILE")
    if key_file:
        from snapshot.auth import KeyFileError, load_key_file
        try:
            snapshot_key = load_key_file(key_file)
        except KeyFileError as exc:
            fatal(f"cannot use the snapshot key: {exc}")
            return 1
    controller = VmmController(boot=boot, restore=restore, instance_id=args.id, metrics=metrics, mmds=mmds,
                               snapshot_key=snapshot_key)

    # Compiled (libseccomp) before a jail hides the library; installed by each thread.
    from vmm import seccomp
    try:
        seccomp_filters = seccomp.filters_from_flags(no_seccomp=args.no_seccomp, filter_file=args.seccomp_filter)
    except seccomp.SeccompError as exc:
        fatal(f"cannot use the seccomp filters: {exc}")
        return 1
    if seccomp_filters is not None:
        preload()  # a filtered thread cannot import: imports list directories and map code
    seccomp.configure(seccomp_filters)

    if jail is not None or args.jail:
        # Past this point only the jail's files can be opened, and nothing may be imported.
        if not enter_jail(jail if jail is not None else args.jail):
            return 1

    if args.metadata:
        try:
            data = read_json_file(args.metadata)
        except ConfigError as exc:
            fatal(f"invalid metadata file {args.metadata}: {exc}")
            return 1
        if not isinstance(data, dict):
            fatal(f"invalid metadata file {args.metadata}: the MMDS contents must be a JSON object")
            return 1
        result = controller.handle(PutMmds(data))
        if isinstance(result, ApiError):
            fatal(f"invalid metadata file {args.metadata}: {result.fault_message}")
            return 1

    actions = None
    if args.config_file:
        try:
            actions = actions_from_config(VmConfig.from_file(args.config_file))
        except ConfigError as exc:
            fatal(f"invalid configuration {args.config_file}: {exc}")
            return 1

    signal.signal(signal.SIGTERM, _on_sigterm)
    channel = EventLoopChannel()
    server: ApiServer | None = None
    flusher: PeriodicFlush | None = None
    try:
        if not args.no_api:
            server = ApiServer(args.api_sock, ApiHandler.through_channel(channel, controller.handle, metrics),
                               max_payload=args.http_api_max_payload_size)
            try:
                if api_listener is not None:
                    server.adopt(api_listener)
                server.start()
            except ApiServerError as exc:
                server = None
                fatal(str(exc))
                return 1
            metrics.gauge("api_server", "process_startup_time_us").set((time.monotonic_ns() - start_wall_ns) // 1000)
            metrics.gauge("api_server", "process_startup_time_cpu_us").set(
                (time.process_time_ns() - start_cpu_ns) // 1000)

        if actions is None:
            # Waiting for the API's first request: do now what a snapshot load (or a
            # boot) would otherwise pay for inside it — the snapshot modules' imports
            # (~50 ms) and a VM shell with its irqchip and PIT (~4 ms on nested hosts).
            from vmm.persist import prepare_uffd
            from vmm.vstate.vm import prepare_shell
            prepare_shell()
            prepare_uffd()
            if seccomp_filters is not None:
                probe_msrs()

        if actions is not None:
            error = controller.apply(actions)
            if error is not None:
                fatal(error.fault_message)
                return 1
        else:
            try:
                channel.run_until(lambda: controller.vmm is not None)
            except KeyboardInterrupt:
                fatal("interrupted before InstanceStart")
                return 1

        vmm = controller.vmm
        assert vmm is not None
        vmm.add_source(channel.fileno(), channel.serve)
        if args.rip_profile:
            vmm.start_rip_profiler(args.rip_profile, args.rip_profile_interval_ms / 1000)
        flusher = PeriodicFlush(metrics.flush, channel.post)
        flusher.start()
        if seccomp_filters is not None:
            probe_msrs()
            # Runs on the loop's first turn: `vmm.run()` has started the vCPU threads by then,
            # so they do not inherit the vmm filter (filters stack as an intersection).
            channel.post(functools.partial(_install_vmm_filter, vmm))
        exit_ = vmm.run()
        return exit_.exit_code
    finally:
        if flusher is not None:
            flusher.stop()
        channel.close()
        if server is not None:
            server.stop()
        metrics.flush()
        metrics.close()


def probe_msrs() -> None:
    """Probe (once per process) the MSRs a snapshot saves: it takes a scratch VM, which the
    vmm seccomp filter forbids (no KVM_CREATE_VM). Errors are left for the snapshot to report."""
    from vmm.kvm import Kvm, KvmError
    from vmm.vstate.persist import msrs_to_save
    try:
        kvm = Kvm()
    except KvmError:
        return
    try:
        msrs_to_save(kvm)
    except KvmError:
        pass
    finally:
        kvm.close()


def _install_vmm_filter(vmm: Vmm) -> None:
    """Put the main thread under the vmm seccomp filter; stop the microVM if that fails."""
    from vmm import seccomp
    from vmm.vstate.vcpu import ExitKind, VmExit
    try:
        seccomp.install_thread_filter(seccomp.Role.VMM)
    except seccomp.SeccompError as exc:
        vmm.request_exit(VmExit(ExitKind.ERROR, f"cannot install the vmm seccomp filter: {exc}", -1))


_PRELOADED = False


def preload() -> None:
    """Import every module a VMM may need while it runs (the zygote and a jailed VMM call this).

    `main` and the modules under it import some modules lazily (inside
    functions); in a jail the library directories are gone, so all of them
    must be loaded before `enter_jail`. The list is proven complete by
    tests/integration/test_jailer.py (a jailed VMM boots, snapshots and
    restores with `ImportWatch` on, and no import is seen).
    """
    global _PRELOADED
    if _PRELOADED:  # a zygote's child: done before the fork
        return
    import vmm.api  # noqa: F401
    import vmm.builder  # noqa: F401
    import vmm.config  # noqa: F401
    import vmm.logger  # noqa: F401
    import vmm.metrics  # noqa: F401
    import vmm.mmds  # noqa: F401
    import vmm.persist  # noqa: F401
    import vmm.procname  # noqa: F401
    import vmm.vstate.persist  # noqa: F401
    import vmm.vstate.vm  # noqa: F401
    vmm.persist.warm_state_types()  # filled once here, shared by every child the zygote forks
    parser()
    _PRELOADED = True


def _pin_host_facts() -> None:
    """Facts the VMM reads from the host's /sys at boot, read now: the jail has no /sys."""
    from vmm.arch import x86_64 as arch
    pvm_host = arch.is_pvm_host()

    def is_pvm_host(sysfs: str = "/sys") -> bool:
        return pvm_host
    arch.is_pvm_host = is_pvm_host  # type: ignore[assignment]


#: Watches for modules imported after the jail was entered (each one is also logged as an error).
LATE_IMPORTS: ImportWatch | None = None


def enter_jail(spec: JailSpec | str) -> bool:
    """Preload every module, enter the jail `spec` (or the spec file at that path), watch for late imports.

    False (with the reason logged) if the jail could not be entered.
    """
    global LATE_IMPORTS
    import structlog

    from jailer import ImportWatch, JailError, JailSpec, enter
    from vmm.logger import fatal
    try:
        if isinstance(spec, str):
            with open(spec) as f:
                spec = JailSpec.from_json(json.load(f))
        preload()
        _pin_host_facts()
        report = enter(spec)
    except (OSError, ValueError, JailError) as exc:
        fatal(f"cannot enter the jail: {exc}")
        return False
    log = structlog.get_logger("vmm.main")
    LATE_IMPORTS = ImportWatch(lambda name: log.error("module imported inside the jail", module=name))
    LATE_IMPORTS.start()
    log.info("jail entered", **report)
    return True


def _stdin_usable() -> bool:
    try:
        os.fstat(0)
        return True
    except OSError:
        return False


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()

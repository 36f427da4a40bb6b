"""`ember-vmm`: one microVM per process, with Firecracker's command-line flags.

    ember-vmm --config-file vm.json --no-api [--boot-timer] [--id ID]

Exit status: 0 when the guest reboots or powers off, 1 when the VMM fails
(with a one-line reason on stderr), 2 for bad command-line arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from vmm import __version__

# Captured as early as possible: --boot-timer measures from here unless the
# caller (a jailer, the pool service) passes its own start instants.
_START_WALL_NS = time.monotonic_ns()
_START_CPU_NS = time.process_time_ns()

DEFAULT_INSTANCE_ID = "anonymous-instance"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ember-vmm",
        description="Ember's virtual machine monitor: one microVM per process (Firecracker-compatible flags).")
    p.add_argument("--api-sock", metavar="PATH", help="path of the API Unix socket")
    p.add_argument("--config-file", metavar="PATH", help="boot from a Firecracker JSON configuration")
    p.add_argument("--no-api", action="store_true", help="do not start the API server (needs --config-file)")
    p.add_argument("--id", default=DEFAULT_INSTANCE_ID, help="microVM identifier (default: %(default)s)")
    p.add_argument("--boot-timer", action="store_true",
                   help="log Guest-boot-time when the guest writes the boot-complete magic")
    p.add_argument("--start-time-us", type=int, help="process start, monotonic µs (from a jailer)")
    p.add_argument("--start-time-cpu-us", type=int, help="process start, CPU µs (from a jailer)")
    p.add_argument("--level", default="Warning", help="log level: Error, Warning, Info, Debug, Trace, Off")
    p.add_argument("--no-pvm-compat", action="store_true",
                   help="on kvm_pvm hosts, do not apply the guest compatibility profile")
    p.add_argument("--rip-profile", metavar="PATH",
                   help="(Ember) sample each vCPU's RIP every --rip-profile-interval-ms and write them to PATH")
    p.add_argument("--rip-profile-interval-ms", type=float, default=10.0)
    p.add_argument("--version", action="store_true", help="print the version and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.version:
        print(f"ember-vmm v{__version__}")
        return 0

    from vmm.logger import configure_logging, fatal
    configure_logging(args.level)

    if args.no_api and not args.config_file:
        fatal("--no-api needs --config-file")
        return 1
    if not args.no_api:
        if not args.api_sock:
            fatal("the API server needs --api-sock PATH (or use --no-api with --config-file)")
            return 1
        fatal("the API server is not implemented yet: use --no-api with --config-file")
        return 1

    from vmm.builder import BuildError, build_for_boot
    from vmm.config import ConfigError, VmConfig

    try:
        config = VmConfig.from_file(args.config_file)
    except ConfigError as exc:
        fatal(f"invalid configuration {args.config_file}: {exc}")
        return 1

    start_wall_ns = args.start_time_us * 1000 if args.start_time_us is not None else _START_WALL_NS
    start_cpu_ns = args.start_time_cpu_us * 1000 if args.start_time_cpu_us is not None else _START_CPU_NS
    try:
        vmm = build_for_boot(
            config,
            instance_id=args.id,
            boot_timer=args.boot_timer,
            start_wall_ns=start_wall_ns,
            start_cpu_ns=start_cpu_ns,
            pvm_compat=not args.no_pvm_compat,
            console_in=sys.stdin.fileno() if _stdin_usable() else None,
            console_out=sys.stdout.fileno(),
        )
    except BuildError as exc:
        fatal(str(exc))
        return 1
    if args.rip_profile:
        vmm.start_rip_profiler(args.rip_profile, args.rip_profile_interval_ms / 1000)
    exit_ = vmm.run()
    return exit_.exit_code


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

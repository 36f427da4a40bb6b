"""`ember`: the operator CLI.

    ember run [--kernel K] [--initrd I] [--rootfs R] [--vcpus N] [--mem MIB] [--cmdline ARGS]
    ember images build | show [--json]

`ember run` boots a microVM with its serial console on this terminal, like
firectl: it writes a Firecracker configuration file and starts `ember-vmm`
with it (the CLI drives VMMs as processes; it never imports the VMM).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import client_cli, snapshot_cli
from .auth import AuthError


def _vmm_command() -> list[str]:
    """How to start a VMM: the installed console script, else this interpreter."""
    return [sys.executable, "-m", "vmm.main"]


def cmd_run(args: argparse.Namespace) -> int:
    kernel, initrd, rootfs, boot_args = args.kernel, args.initrd, args.rootfs, args.cmdline
    private_rootfs = False  # the built image is a shared cache: boot a copy of it
    if kernel is None:
        from guest.images import ImagesNotBuilt, show
        try:
            images = show()
        except ImagesNotBuilt as exc:
            print(f"ember: {exc}", file=sys.stderr)
            return 1
        kernel = images["kernel"]
        if boot_args is None:
            boot_args = images["boot_args"]
        if rootfs is None and initrd is None:
            if args.root == "initrd" or not images.get("rootfs"):
                initrd = images.get("initrd")
            else:
                rootfs, private_rootfs = images["rootfs"], True
    if boot_args is None:
        boot_args = "console=ttyS0 reboot=k panic=1"
    if args.cmdline_append:
        boot_args = f"{boot_args} {args.cmdline_append}"
    config: dict = {
        "boot-source": {"kernel_image_path": str(Path(kernel).resolve()), "boot_args": boot_args},
        "machine-config": {"vcpu_count": args.vcpus, "mem_size_mib": args.mem},
    }
    if initrd:
        config["boot-source"]["initrd_path"] = str(Path(initrd).resolve())
    with tempfile.TemporaryDirectory(prefix="ember-run-") as tmp:
        if rootfs:
            if private_rootfs:
                copy = Path(tmp) / "rootfs.ext4"
                shutil.copyfile(rootfs, copy)
                rootfs = copy
            config["drives"] = [{"drive_id": "rootfs", "path_on_host": str(Path(rootfs).resolve()),
                                 "is_root_device": True, "is_read_only": False}]
        cfg = Path(tmp) / "vm.json"
        cfg.write_text(json.dumps(config, indent=2))
        cmd = _vmm_command() + ["--no-api", "--config-file", str(cfg), "--id", args.id]
        if args.boot_timer:
            cmd.append("--boot-timer")
        if args.level:
            cmd += ["--level", args.level]
        try:
            return subprocess.call(cmd)
        except KeyboardInterrupt:
            return 130


def cmd_images(args: argparse.Namespace) -> int:
    from guest import images
    if args.images_cmd == "build":
        images.build_all(jobs=args.jobs)
        return 0
    try:
        info = images.show()
    except images.ImagesNotBuilt as exc:
        print(f"ember: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:14} {v}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import structlog

    from .netslots import NetConfig
    from .pool import HostBudget
    from .service import ServiceConfig, default_budget, serve_forever

    renderer = (structlog.processors.JSONRenderer() if args.log_format == "json"
                else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(processors=[structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso"),
                                    renderer], logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    budget = default_budget(max_vms=args.max_vms, oversubscription=args.oversubscription)
    if args.mem_budget_mib is not None:
        budget = HostBudget(mem_mib=args.mem_budget_mib, max_vms=args.max_vms, vcpus=None,
                            oversubscription=args.oversubscription)
    config = ServiceConfig(service_id=args.service_id, budget=budget, max_restoring=args.max_restoring,
                           metrics_listen=args.metrics_listen or None,
                           network=NetConfig(cidr=args.net_cidr, max_slots=args.net_max_slots,
                                             min_free=args.net_min_free) if args.net_cidr else None)
    try:
        config.auth, config.tls, config.mtls = serve_security(args, config.home)
    except AuthError as exc:
        print(f"ember serve: {exc}", file=sys.stderr)
        return 2
    if args.no_jail:
        config.jail = None
    return serve_forever(args.listen, config)


def serve_security(args: argparse.Namespace, home: Path) -> tuple[Any, Any, bool]:
    """``(authenticator or None, TLS server credentials or None, mtls)`` from `ember serve`'s flags.

    The tenants file is ``--tenants``, else ``$EMBER_HOME/tenants.json`` if it
    exists. Raises `auth.AuthError` for unreadable files and for a listen
    address others could reach without authentication (`auth.check_exposure`).
    """
    from .auth import TenantRegistry, TlsFileError, check_exposure, server_credentials

    tenants_file = args.tenants
    if tenants_file is None and (home / "tenants.json").exists():
        tenants_file = str(home / "tenants.json")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise TlsFileError("TLS needs both --tls-cert and --tls-key")
    if args.tls_client_ca is not None and args.tls_cert is None:
        raise TlsFileError("--tls-client-ca needs --tls-cert and --tls-key")
    check_exposure(args.listen, tls=args.tls_cert is not None, client_ca=args.tls_client_ca is not None,
                   tenants=tenants_file is not None, insecure=args.insecure)
    registry = TenantRegistry.load(tenants_file) if tenants_file is not None else None
    tls = (server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca)
           if args.tls_cert is not None else None)
    return registry, tls, args.tls_client_ca is not None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ember", description="Ember: snapshot-centric microVM pools.")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="boot a microVM with its console on this terminal")
    r.add_argument("--kernel", help="kernel image (vmlinux or bzImage); default: the built guest")
    r.add_argument("--initrd", help="initramfs image")
    r.add_argument("--rootfs", help="root filesystem image (virtio-block /dev/vda)")
    r.add_argument("--root", choices=("rootfs", "initrd"), default="initrd",
                   help="for the default guest: boot from its initramfs or its ext4 rootfs")
    r.add_argument("--vcpus", type=int, default=1)
    r.add_argument("--mem", type=int, default=128, help="guest memory in MiB")
    r.add_argument("--cmdline", help="kernel command line (default: the guest's)")
    r.add_argument("--cmdline-append", help="extra kernel arguments")
    r.add_argument("--id", default=f"ember-run-{os.getpid()}")
    r.add_argument("--boot-timer", action="store_true")
    r.add_argument("--level", help="VMM log level")
    r.set_defaults(func=cmd_run)

    im = sub.add_parser("images", help="build or show the default guest images")
    im_sub = im.add_subparsers(dest="images_cmd", required=True)
    b = im_sub.add_parser("build", help="build kernel, initramfs and rootfs (cached)")
    b.add_argument("--jobs", type=int, default=None)
    s = im_sub.add_parser("show", help="paths and boot arguments of the built images")
    s.add_argument("--json", action="store_true")
    im.set_defaults(func=cmd_images)

    sv = sub.add_parser("serve", help="run the gRPC warm-pool service")
    sv.add_argument("--listen", default=os.environ.get("EMBER_ADDR", "127.0.0.1:50051"),
                    help="address to listen on (default: $EMBER_ADDR or %(default)s)")
    sv.add_argument("--service-id", default="default", help="names the run directory $EMBER_HOME/run/<id>")
    sv.add_argument("--max-vms", type=int, default=512, help="most microVMs on this host")
    sv.add_argument("--mem-budget-mib", type=int, default=None,
                    help="guest memory the pools may commit (default: 80%% of host RAM)")
    sv.add_argument("--oversubscription", type=float, default=4.0,
                    help="memory oversubscription ratio (clones share template memory copy-on-write)")
    sv.add_argument("--max-restoring", type=int, default=4, help="concurrent pool refills")
    sv.add_argument("--no-jail", action="store_true",
                    help="run the VMMs unjailed (as root; by default each is jailed: docs/pool.md)")
    sv.add_argument("--log-format", choices=("json", "console"), default="console")
    sv.add_argument("--metrics-listen", default="127.0.0.1:9464", metavar="HOST:PORT",
                    help="Prometheus endpoint, GET /metrics (default %(default)s; port 0 picks one; '' turns it off)")
    sv.add_argument("--net-cidr", metavar="CIDR", default=None,
                    help="give each sandbox a network slot: a /30 of this block (e.g. 10.200.0.0/16; "
                         "see poolsvc/netslots.py); default: no networking")
    sv.add_argument("--net-min-free", type=int, default=2, help="network slots kept ready")
    sv.add_argument("--net-max-slots", type=int, default=1024, help="most network slots")
    sv.add_argument("--tenants", metavar="FILE", default=None,
                    help="tenants, their token hashes, client-certificate names and quotas (docs/pool.md, "
                         "Security; default: $EMBER_HOME/tenants.json if it exists, else one implicit tenant)")
    sv.add_argument("--tls-cert", metavar="PEM", default=None, help="serve TLS with this certificate (chain)")
    sv.add_argument("--tls-key", metavar="PEM", default=None, help="the private key of --tls-cert")
    sv.add_argument("--tls-client-ca", metavar="PEM", default=None,
                    help="require client certificates signed by this CA (mTLS)")
    sv.add_argument("--insecure", action="store_true",
                    help="listen off loopback without authentication or TLS anyway")
    sv.set_defaults(func=cmd_serve)

    snapshot_cli.add_parsers(sub)  # ember snapshot ..., ember page-server
    client_cli.add_parsers(sub)  # ember pool|sandbox|template|status|acquire (gRPC client)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

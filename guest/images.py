"""Ember's embedded default guest: build it, and say where it is.

``ember images build`` calls build_all(); ``ember images show --json`` calls
show(). Everything lives under ``$EMBER_HOME`` (default ~/.cache/ember):

    images.json              what show() returns (written by build_all)
    kernel/<key>/            vmlinux, System.map, config, build.json
    rootfs/<key>/            initramfs.cpio, rootfs.ext4, build.json
    src/linux-source-6.1_*/  the kernel source tree (reused by rebuilds)
    logs/                    full output of the long steps

The images are a shared cache: attach rootfs.ext4 read-only, or give each
microVM its own copy.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import host
from .errors import GuestImageError
from .kernel import KERNEL_BUILD_PACKAGES, KERNEL_SOURCE_PACKAGE, KernelImage, build_kernel
from .rootfs import ROOTFS_BUILD_PACKAGES, RootfsImages, build_rootfs

__all__ = [
    "ImagesError",
    "ImagesNotBuilt",
    "RunScriptTooLong",
    "DEFAULT_BOOT_ARGS",
    "ROOT_DEVICE_ARGS",
    "BUILD_PACKAGES",
    "ember_home",
    "build_all",
    "show",
    "run_arg",
]

# The default guest's kernel command line. The VMM adds its own parts: the
# virtio-mmio device list, root= for a root drive, and on hosts whose ring 0
# is emulated (kvm_pvm) the compatibility switches (noxsave, clearcpuid=...).
#   console=ttyS0   the one 16550 at 0x3f8 (the kernel probes only one)
#   reboot=k        reboot by pulsing the i8042 reset line: the VMM stops
#   panic=1         reboot (and so stop) one second after a panic
#   i8042.*         no AUX (mouse) or MUX probing, and a keyboard that is
#                   never sent commands: a short i8042 probe. The controller
#                   is found through the DSDT (PNP0303) or, failing that,
#                   the FADT's 8042 boot flag; docs/guest.md has the details.
DEFAULT_BOOT_ARGS = "console=ttyS0 reboot=k panic=1 i8042.noaux i8042.nomux i8042.dumbkbd"
# Added to the command line when rootfs.ext4 is the root drive (/dev/vda).
ROOT_DEVICE_ARGS = "root=/dev/vda ro"
BUILD_PACKAGES = tuple(dict.fromkeys(KERNEL_BUILD_PACKAGES + ROOTFS_BUILD_PACKAGES))
MANIFEST = "images.json"
LOCK = ".build.lock"
# x86 COMMAND_LINE_SIZE is 2048 bytes including everything else on the line.
RUN_ARG_MAX = 1024


class ImagesError(GuestImageError):
    """Ember's default guest images are not usable."""


class ImagesNotBuilt(ImagesError):
    """The default guest images are not built: run `ember images build`."""


class RunScriptTooLong(ImagesError):
    """An ember.run= script does not fit on the kernel command line."""


def ember_home() -> Path:
    """$EMBER_HOME, or ~/.cache/ember."""
    env = os.environ.get("EMBER_HOME")
    return Path(env).expanduser().resolve() if env else Path.home() / ".cache" / "ember"


def run_arg(script: str) -> str:
    """The ``ember.run=`` kernel argument that makes /init run ``script`` (sh).

    /init prints ``EMBER-RUN-EXIT=<status>`` after it, then does what
    ``ember.exit=`` says.
    """
    arg = "ember.run=" + base64.b64encode(script.encode()).decode()
    if len(arg) > RUN_ARG_MAX:
        raise RunScriptTooLong(f"ember.run= argument is {len(arg)} bytes, limit {RUN_ARG_MAX}")
    return arg


def _manifest(home: Path, kernel: KernelImage, rootfs: RootfsImages) -> dict[str, Any]:
    return {
        "kernel": str(kernel.vmlinux),
        "initrd": str(rootfs.initramfs),
        "rootfs": str(rootfs.rootfs),
        "boot_args": DEFAULT_BOOT_ARGS,
        "root_device_args": ROOT_DEVICE_ARGS,
        "system_map": str(kernel.system_map),
        "kernel_config": str(kernel.config),
        "kernel_key": kernel.key,
        "kernel_source": f"{KERNEL_SOURCE_PACKAGE} {kernel.source_version}",
        "rootfs_key": rootfs.key,
        "home": str(home),
    }


def build_all(
    home: Path | None = None,
    progress: Callable[[str], None] = print,
    jobs: int | None = None,
) -> dict[str, Any]:
    """Build the default guest (kernel, initramfs, ext4 root) unless cached.

    Installs missing Debian build packages first. Idempotent: with nothing
    changed a second call only checks the cache. Concurrent callers wait on
    a lock in the home directory. Returns what show() returns.
    """
    home = (home or ember_home()).resolve()
    home.mkdir(parents=True, exist_ok=True)
    jobs = jobs or os.cpu_count() or 1
    start = time.monotonic()
    with open(home / LOCK, "w") as lock:
        # SAFETY: flock on our own open file; released when it is closed.
        fcntl.flock(lock, fcntl.LOCK_EX)
        host.ensure_packages(BUILD_PACKAGES, progress)
        version = host.installed_version(KERNEL_SOURCE_PACKAGE)
        if version is None:
            raise ImagesError(f"{KERNEL_SOURCE_PACKAGE} is not installed")
        kernel = build_kernel(home, progress, jobs, version)
        rootfs = build_rootfs(home, progress)
        manifest = _manifest(home, kernel, rootfs)
        tmp = home / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, home / MANIFEST)
    progress(f"images: ready in {time.monotonic() - start:.0f}s ({home / MANIFEST})")
    return show(home)


def show(home: Path | None = None) -> dict[str, Any]:
    """Where the built default guest is: paths, boot args, cache keys (JSON-able).

    Raises ImagesNotBuilt if build_all() has not completed, or a file it
    produced has gone.
    """
    home = (home or ember_home()).resolve()
    path = home / MANIFEST
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise ImagesNotBuilt(f"{ImagesNotBuilt.__doc__} ({path} does not exist)") from None
    except (OSError, ValueError) as exc:
        raise ImagesNotBuilt(f"{ImagesNotBuilt.__doc__} ({path} is unreadable: {exc})") from exc
    for field in ("kernel", "initrd", "rootfs", "system_map", "kernel_config"):
        if not Path(manifest.get(field, "")).is_file():
            raise ImagesNotBuilt(f"{ImagesNotBuilt.__doc__} ({field} {manifest.get(field)!r} is missing)")
    return manifest

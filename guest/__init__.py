"""Ember's embedded default guest: kernel, initramfs and ext4 root images.

The images are built from Debian packages only (linux-source-6.1,
busybox-static, e2fsprogs) and cached under $EMBER_HOME; docs/guest.md
describes the guest and every emulator hole its kernel avoids.
"""

from .cpio import CpioEntry, CpioError, newc_archive, parse_newc
from .errors import GuestImageError
from .images import (
    DEFAULT_BOOT_ARGS,
    ROOT_DEVICE_ARGS,
    ImagesError,
    ImagesNotBuilt,
    build_all,
    ember_home,
    run_arg,
    show,
)
from .kconfig import ConfigMismatch, config_mismatches, parse_config
from .kernel import KernelBuildError, KernelImage, kernel_cache_key
from .rootfs import RootfsBuildError, RootfsImages, rootfs_cache_key

__all__ = [
    "GuestImageError",
    "ImagesError",
    "ImagesNotBuilt",
    "KernelBuildError",
    "RootfsBuildError",
    "CpioError",
    "DEFAULT_BOOT_ARGS",
    "ROOT_DEVICE_ARGS",
    "ember_home",
    "build_all",
    "show",
    "run_arg",
    "KernelImage",
    "RootfsImages",
    "kernel_cache_key",
    "rootfs_cache_key",
    "CpioEntry",
    "newc_archive",
    "parse_newc",
    "ConfigMismatch",
    "config_mismatches",
    "parse_config",
]

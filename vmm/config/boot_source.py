"""Boot source: the kernel image, optional initrd and kernel command line.

Spec: `BootSource` (PUT /boot-source, ``boot-source`` in the config file).
Opening the files is the builder's job; `validate` only checks what can be
checked without I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InvalidKernelCommandLine, InvalidKernelPath
from .schema import ConfigType, Field, Schema, read_str

__all__ = ["BootSourceConfig", "CMDLINE_MAX_SIZE", "DEFAULT_KERNEL_CMDLINE"]

# Firecracker arch/x86_64/layout.rs: CMDLINE_MAX_SIZE, the size of the buffer
# the command line is copied into, terminating NUL included.
CMDLINE_MAX_SIZE = 2048

# The command line Firecracker uses when `boot_args` is not given
# (vmm_config/boot_source.rs, DEFAULT_KERNEL_CMDLINE).
DEFAULT_KERNEL_CMDLINE = (
    "reboot=k panic=1 nomodule 8250.nr_uarts=0 i8042.noaux i8042.nomux "
    "i8042.dumbkbd swiotlb=noforce"
)


@dataclass(frozen=True)
class BootSourceConfig(ConfigType):
    """Spec `BootSource`: host paths of the kernel (required) and initrd, and boot args."""

    kernel_image_path: str
    initrd_path: str | None = None
    boot_args: str | None = None

    SCHEMA = Schema(
        "BootSourceConfig",
        [
            Field("kernel_image_path", read_str),
            Field.option("initrd_path", read_str),
            Field.option("boot_args", read_str),
        ],
    )

    @property
    def effective_boot_args(self) -> str:
        """The command line the guest gets: `boot_args`, or Firecracker's default."""
        return DEFAULT_KERNEL_CMDLINE if self.boot_args is None else self.boot_args

    def validate(self) -> None:
        if not self.kernel_image_path:
            raise InvalidKernelPath()
        if self.boot_args is not None:
            check_cmdline(self.boot_args)


def check_cmdline(cmdline: str) -> None:
    """Reject what linux-loader's `Cmdline` rejects: non-printable ASCII, too long."""
    text = cmdline.strip()
    if not all(" " <= ch <= "~" for ch in text):
        raise InvalidKernelCommandLine(
            "The kernel command line is invalid: "
            "String contains a non-printable ASCII character."
        )
    if len(text) + 1 > CMDLINE_MAX_SIZE:
        raise InvalidKernelCommandLine(
            "The kernel command line is invalid: "
            "Inserting string would make command line too long."
            f" ({len(text)} bytes, at most {CMDLINE_MAX_SIZE - 1})"
        )

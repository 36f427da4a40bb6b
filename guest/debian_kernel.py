"""Debian's cloud kernel, the kernel a Firecracker user typically brings.

Fetched with `apt-get download` (Debian's archive is the only source) and
unpacked with `dpkg-deb -x` into $EMBER_HOME/debian-cloud/<package>/, once.
Ember's tests boot its bzImage to check the VMM keeps working with kernels
it did not build.
"""

from __future__ import annotations

import glob
import subprocess
import tempfile
from pathlib import Path

from guest.errors import GuestImageError
from guest.images import ember_home

META_PACKAGE = "linux-image-cloud-amd64"


class DebianKernelUnavailable(GuestImageError):
    """Debian's cloud kernel package could not be fetched or unpacked."""


def _resolve_package() -> str:
    out = subprocess.run(["apt-cache", "depends", META_PACKAGE], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return line.split()[1]
    raise DebianKernelUnavailable(f"cannot resolve {META_PACKAGE} (run apt-get update?): {out.stderr.strip()}")


def debian_cloud_kernel(home: Path | None = None) -> Path:
    """Path of the Debian cloud kernel's bzImage (vmlinuz), fetching it the first time."""
    package = _resolve_package()
    dest = (home or ember_home()) / "debian-cloud" / package
    found = sorted(glob.glob(str(dest / "boot" / "vmlinuz-*")))
    if found:
        return Path(found[0])
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        got = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
        debs = glob.glob(str(Path(tmp) / "*.deb"))
        if got.returncode or not debs:
            raise DebianKernelUnavailable(f"apt-get download {package} failed: {got.stderr.strip()[-300:]}")
        subprocess.run(["dpkg-deb", "-x", debs[0], str(dest)], check=True)
    found = sorted(glob.glob(str(dest / "boot" / "vmlinuz-*")))
    if not found:
        raise DebianKernelUnavailable(f"{package} has no /boot/vmlinuz-*")
    return Path(found[0])

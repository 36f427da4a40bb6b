"""Ember's guest kernel: an uncompressed vmlinux built from Debian's linux-source-6.1.

Recipe (docs/guest.md explains each choice):

1. the source tarball of the Debian package ``linux-source-6.1`` is
   extracted once per package version under ``$EMBER_HOME/src``;
2. the patches in ``guest/kernel/patches`` are applied (those of an earlier
   build are reverted first, so one tree serves every build);
3. ``make tinyconfig``, ``merge_config.sh -m .config kvm_guest.config
   ember-microvm.config``, ``make olddefconfig``; then every line of the
   fragment is checked against the final .config;
4. ``make vmlinux``; vmlinux, System.map and .config are copied to
   ``$EMBER_HOME/kernel/<key>/``.

The cache key is the sha256 of the fragment, the patches, the source
package version and KERNEL_RECIPE_VERSION: a second build with the same
inputs only checks that the files are there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import host
from .errors import GuestImageError
from .kconfig import config_mismatches, parse_config

__all__ = [
    "KernelBuildError",
    "KernelConfigLost",
    "KernelSourceMissing",
    "PatchFailed",
    "KernelInputs",
    "KernelImage",
    "KERNEL_SOURCE_PACKAGE",
    "KERNEL_RECIPE_VERSION",
    "KERNEL_BUILD_PACKAGES",
    "FRAGMENT_PATH",
    "PATCH_DIR",
    "kernel_cache_key",
    "load_kernel_inputs",
    "sync_patches",
    "build_kernel",
]

KERNEL_SOURCE_PACKAGE = "linux-source-6.1"
# The tarball the package installs, and the directory it unpacks to.
KERNEL_SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
KERNEL_SOURCE_DIRNAME = "linux-source-6.1"
# Bump when the steps below change in a way that changes the vmlinux.
KERNEL_RECIPE_VERSION = 1
# What the kernel build needs: the source, a compiler and make
# (build-essential), Kconfig's parser generators (bison, flex), bc for
# kernel/time/timeconst.h, libelf-dev for objtool, xz-utils to unpack,
# patch for guest/kernel/patches.
KERNEL_BUILD_PACKAGES = (
    KERNEL_SOURCE_PACKAGE, "build-essential", "bc", "bison", "flex", "libelf-dev", "xz-utils",
    "patch",
)
FRAGMENT_PATH = Path(__file__).resolve().parent / "kernel" / "ember-microvm.config"
PATCH_DIR = Path(__file__).resolve().parent / "kernel" / "patches"
# Merged before Ember's fragment; Ember's fragment overrides it.
KVM_GUEST_FRAGMENT = "kernel/configs/kvm_guest.config"
MAKE = ("make", "ARCH=x86_64")
# Fixed build identity, so `uname -v` does not name the build machine.
BUILD_ENV = {"KBUILD_BUILD_USER": "ember", "KBUILD_BUILD_HOST": "ember"}
# Files in the source tree that record which patches are applied.
APPLIED_STATE = ".ember-patches.json"
APPLIED_DIR = ".ember-patches.d"
EXTRACTED_MARKER = ".ember-extracted"
# Files of a finished build, relative to its cache directory.
VMLINUX, SYSTEM_MAP, CONFIG, BUILD_INFO = "vmlinux", "System.map", "config", "build.json"


class KernelBuildError(GuestImageError):
    """The guest kernel could not be built."""


class KernelSourceMissing(KernelBuildError):
    """The linux-source-6.1 package is not installed (its tarball is missing)."""


class KernelConfigLost(KernelBuildError):
    """Options set by ember-microvm.config did not survive into the final .config."""


class PatchFailed(KernelBuildError):
    """A guest kernel patch did not apply (or revert) cleanly."""


@dataclass(frozen=True)
class KernelInputs:
    """Everything that decides the bytes of the vmlinux."""

    fragment: bytes
    patches: tuple[tuple[str, bytes], ...]
    source_version: str

    @property
    def key(self) -> str:
        return kernel_cache_key(self.fragment, self.patches, self.source_version)


@dataclass(frozen=True)
class KernelImage:
    """A built guest kernel in the cache."""

    key: str
    directory: Path
    source_version: str

    @property
    def vmlinux(self) -> Path:
        return self.directory / VMLINUX

    @property
    def system_map(self) -> Path:
        return self.directory / SYSTEM_MAP

    @property
    def config(self) -> Path:
        return self.directory / CONFIG

    def is_complete(self) -> bool:
        return all((self.directory / f).is_file() for f in (VMLINUX, SYSTEM_MAP, CONFIG, BUILD_INFO))

    def __repr__(self) -> str:
        return f"<KernelImage {self.key[:16]} linux-source {self.source_version} at {self.directory}>"


def _field(label: str, value: bytes) -> bytes:
    # Length-prefixed, so that no two different inputs give the same stream.
    return f"{label}:{len(value)}:".encode() + value


def kernel_cache_key(
    fragment: bytes,
    patches: Sequence[tuple[str, bytes]],
    source_version: str,
    recipe_version: int = KERNEL_RECIPE_VERSION,
) -> str:
    """sha256 (hex) of the build's inputs; patch order does not matter (applied by name)."""
    hasher = hashlib.sha256()
    hasher.update(_field("recipe", str(recipe_version).encode()))
    hasher.update(_field("source", f"{KERNEL_SOURCE_PACKAGE}={source_version}".encode()))
    hasher.update(_field("fragment", fragment))
    for name, data in sorted(patches):
        hasher.update(_field("patch-name", name.encode()))
        hasher.update(_field("patch", data))
    return hasher.hexdigest()


def load_patches(patch_dir: Path = PATCH_DIR) -> tuple[tuple[str, bytes], ...]:
    return tuple((p.name, p.read_bytes()) for p in sorted(patch_dir.glob("*.patch")))


def load_kernel_inputs(
    source_version: str, fragment_path: Path = FRAGMENT_PATH, patch_dir: Path = PATCH_DIR
) -> KernelInputs:
    return KernelInputs(fragment_path.read_bytes(), load_patches(patch_dir), source_version)


def _safe_version(version: str) -> str:
    return version.replace(":", "_").replace("/", "_")


def _extract_source(src_root: Path, version: str, progress: host.Progress) -> Path:
    """The pristine tree for ``version``, extracted now if it is not there yet."""
    tree = src_root / f"{KERNEL_SOURCE_DIRNAME}_{_safe_version(version)}"
    if (tree / EXTRACTED_MARKER).is_file():
        return tree
    if not KERNEL_SOURCE_TARBALL.is_file():
        raise KernelSourceMissing(f"{KERNEL_SOURCE_TARBALL} not found; install {KERNEL_SOURCE_PACKAGE}")
    shutil.rmtree(tree, ignore_errors=True)
    src_root.mkdir(parents=True, exist_ok=True)
    progress(f"kernel: extracting {KERNEL_SOURCE_TARBALL.name} ({version})")
    with tempfile.TemporaryDirectory(dir=src_root, prefix=".extract-") as tmp:
        host.run_checked(["tar", "-xf", KERNEL_SOURCE_TARBALL, "-C", tmp])
        os.replace(Path(tmp) / KERNEL_SOURCE_DIRNAME, tree)
    (tree / EXTRACTED_MARKER).write_text(f"{KERNEL_SOURCE_PACKAGE}={version}\n")
    return tree


def _patch(tree: Path, name: str, data: bytes, *, reverse: bool) -> None:
    base = ["patch", "-p1", "--batch", "--silent", "--no-backup-if-mismatch"]
    if reverse:
        base.append("--reverse")
    else:
        base.append("--forward")
    # Dry run first, so a failing patch leaves the tree untouched.
    for extra in (["--dry-run"], []):
        try:
            host.run_checked([*base, *extra], cwd=tree, input_data=data)
        except host.CommandFailed as exc:
            action = "revert" if reverse else "apply"
            raise PatchFailed(f"cannot {action} {name}: {exc}") from exc


def sync_patches(tree: Path, patches: Sequence[tuple[str, bytes]], progress: host.Progress) -> None:
    """Make the tree carry exactly ``patches``: revert what differs, apply the rest."""
    state_path = tree / APPLIED_STATE
    saved = tree / APPLIED_DIR
    applied: list[dict[str, str]] = json.loads(state_path.read_text()) if state_path.exists() else []
    wanted = [{"name": n, "sha256": hashlib.sha256(d).hexdigest()} for n, d in patches]
    if applied == wanted:
        return
    # Keep the common prefix (untouched files are not rebuilt), revert the rest.
    keep = 0
    while keep < min(len(applied), len(wanted)) and applied[keep] == wanted[keep]:
        keep += 1
    for entry in reversed(applied[keep:]):
        progress(f"kernel: reverting {entry['name']}")
        _patch(tree, entry["name"], (saved / entry["name"]).read_bytes(), reverse=True)
        (saved / entry["name"]).unlink()
        applied.pop()
        state_path.write_text(json.dumps(applied))
    saved.mkdir(exist_ok=True)
    for (name, data), entry in list(zip(patches, wanted))[keep:]:
        progress(f"kernel: applying {name}")
        _patch(tree, name, data, reverse=False)
        (saved / name).write_bytes(data)
        applied.append(entry)
        state_path.write_text(json.dumps(applied))


def _prepare_tree(src_root: Path, inputs: KernelInputs, progress: host.Progress) -> Path:
    tree = _extract_source(src_root, inputs.source_version, progress)
    try:
        sync_patches(tree, inputs.patches, progress)
    except PatchFailed as exc:
        # A tree we cannot bring back to a known state is thrown away once.
        progress(f"kernel: {exc}; re-extracting the source")
        shutil.rmtree(tree)
        tree = _extract_source(src_root, inputs.source_version, progress)
        sync_patches(tree, inputs.patches, progress)
    return tree


def _configure(tree: Path, fragment_path: Path, log: Path, progress: host.Progress, env: dict[str, str]) -> None:
    progress("kernel: configuring (tinyconfig + kvm_guest.config + ember-microvm.config)")
    host.run_logged([*MAKE, "tinyconfig"], cwd=tree, env=env, log_path=log, label="kernel config", progress=progress)
    host.run_logged(
        ["scripts/kconfig/merge_config.sh", "-m", ".config", KVM_GUEST_FRAGMENT, fragment_path],
        cwd=tree, env=env, log_path=log, label="kernel config", progress=progress,
    )
    host.run_logged([*MAKE, "olddefconfig"], cwd=tree, env=env, log_path=log, label="kernel config", progress=progress)
    wanted = parse_config(fragment_path.read_text())
    final = parse_config((tree / ".config").read_text())
    lost = config_mismatches(wanted, final)
    if lost:
        detail = "\n".join(f"  {m}" for m in lost)
        raise KernelConfigLost(f"{len(lost)} option(s) of {fragment_path.name} did not survive:\n{detail}")


def build_kernel(
    home: Path,
    progress: host.Progress,
    jobs: int,
    source_version: str,
    fragment_path: Path = FRAGMENT_PATH,
    patch_dir: Path = PATCH_DIR,
) -> KernelImage:
    """Build (or find in the cache) the guest kernel for these inputs."""
    inputs = load_kernel_inputs(source_version, fragment_path, patch_dir)
    key = inputs.key
    image = KernelImage(key, home / "kernel" / key[:16], source_version)
    if image.is_complete():
        info = json.loads((image.directory / BUILD_INFO).read_text())
        if info.get("key") == key:
            progress(f"kernel: cached {key[:16]} ({image.vmlinux})")
            return image
    log = home / "logs" / f"kernel-{key[:16]}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    env = {**os.environ, **BUILD_ENV}
    start = time.monotonic()
    tree = _prepare_tree(home / "src", inputs, progress)
    _configure(tree, fragment_path, log, progress, env)
    progress(f"kernel: make -j{jobs} vmlinux (nice; log: {log})")
    host.run_logged(
        ["nice", "-n", "10", *MAKE, f"-j{jobs}", "vmlinux"],
        cwd=tree, env=env, log_path=log, label="kernel build", progress=progress,
    )
    seconds = time.monotonic() - start
    image.directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=image.directory.parent, prefix=".build-"))
    try:
        shutil.copyfile(tree / "vmlinux", staging / VMLINUX)
        shutil.copyfile(tree / "System.map", staging / SYSTEM_MAP)
        shutil.copyfile(tree / ".config", staging / CONFIG)
        info = {
            "key": key,
            "source_package": KERNEL_SOURCE_PACKAGE,
            "source_version": source_version,
            "recipe_version": KERNEL_RECIPE_VERSION,
            "patches": [name for name, _ in inputs.patches],
            "build_seconds": round(seconds, 1),
            "vmlinux_bytes": (staging / VMLINUX).stat().st_size,
            "compiler": _compiler_version(),
        }
        (staging / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
        shutil.rmtree(image.directory, ignore_errors=True)
        os.replace(staging, image.directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    size_mib = image.vmlinux.stat().st_size / (1 << 20)
    progress(f"kernel: built {key[:16]} in {seconds:.0f}s, vmlinux {size_mib:.1f} MiB")
    return image


def _compiler_version() -> str:
    try:
        out = subprocess.run(["gcc", "--version"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return "unknown"
    return out.splitlines()[0] if out else "unknown"

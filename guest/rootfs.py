"""Ember's guest userspace: busybox-static and /init, as an initramfs and an ext4 image.

Both images hold the same tree:

    /init                 guest/rootfs/init (a busybox ash script)
    /sbin/init -> /init   so an ext4 root boots it without init=
    /bin/busybox          from Debian's busybox-static, and one symlink
                          per applet (busybox --list-full)
    /etc/passwd, /etc/group, /etc/ember/init.d/   (hooks for later services)
    /dev /proc /sys /tmp /run /root /mnt          mount points

The initramfs is an uncompressed newc cpio written by guest.cpio (plus a
/dev/console node, which the kernel opens for /init's stdio); the root
image is ext4 made with ``mkfs.ext4 -d`` (no mount, no root rights
needed), without a journal or metadata checksums, with inode tables
initialised at mkfs time: all of that is guest-kernel work avoided at
boot. Both are cached under ``$EMBER_HOME/rootfs/<key>/``; the key covers
the init script, the busybox binary and ROOTFS_RECIPE_VERSION.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from . import host
from .cpio import CpioEntry, entries_from_tree, newc_archive
from .errors import GuestImageError

__all__ = [
    "RootfsBuildError",
    "BusyboxMissingApplets",
    "RootfsImages",
    "ROOTFS_RECIPE_VERSION",
    "ROOTFS_BUILD_PACKAGES",
    "ROOTFS_SIZE_MIB",
    "INIT_SCRIPT_PATH",
    "REQUIRED_APPLETS",
    "rootfs_cache_key",
    "stage_tree",
    "initramfs_bytes",
    "build_rootfs",
]

# Bump when the tree layout or the image options below change.
ROOTFS_RECIPE_VERSION = 1
ROOTFS_BUILD_PACKAGES = ("busybox-static", "e2fsprogs")
ROOTFS_SIZE_MIB = 64
BUSYBOX = Path("/bin/busybox")
INIT_SCRIPT_PATH = Path(__file__).resolve().parent / "rootfs" / "init"
# Applets /init uses; a busybox without them cannot boot the guest.
REQUIRED_APPLETS = ("sh", "mount", "devmem", "setsid", "cttyhack", "reboot", "base64", "sleep")
# Names the busybox applet list may claim that belong to Ember's tree.
OWNED_PATHS = frozenset({"init", "sbin/init", "linuxrc"})
# devices.txt: "5 char ... 1 = /dev/console System console".
CONSOLE_MAJOR, CONSOLE_MINOR = 5, 1
INITRAMFS, ROOTFS, BUILD_INFO = "initramfs.cpio", "rootfs.ext4", "build.json"
# mkfs.ext4: 4 KiB blocks even though the image is "small"; features the
# guest would pay for at run time are off (journal, crc32c metadata
# checksums, the orphan file that needs a journal); no lazy inode-table
# zeroing left to the guest's ext4lazyinit thread.
MKFS_FEATURES = "^has_journal,^metadata_csum,^orphan_file"
# A fixed time for the superblock and the inodes mke2fs creates itself
# (lost+found); copied files keep their staged times, so the image is not
# byte-reproducible (the initramfs is).
MKFS_FAKE_TIME = "1"


class RootfsBuildError(GuestImageError):
    """The guest root filesystem images could not be built."""


class BusyboxMissingApplets(RootfsBuildError):
    """The installed busybox lacks applets that /init needs."""


@dataclass(frozen=True)
class RootfsImages:
    """The built initramfs and ext4 root image in the cache."""

    key: str
    directory: Path

    @property
    def initramfs(self) -> Path:
        return self.directory / INITRAMFS

    @property
    def rootfs(self) -> Path:
        return self.directory / ROOTFS

    def is_complete(self) -> bool:
        return all((self.directory / f).is_file() for f in (INITRAMFS, ROOTFS, BUILD_INFO))

    def __repr__(self) -> str:
        return f"<RootfsImages {self.key[:16]} at {self.directory}>"


def rootfs_cache_key(
    init_script: bytes, busybox: bytes, recipe_version: int = ROOTFS_RECIPE_VERSION
) -> str:
    hasher = hashlib.sha256()
    for label, value in (
        ("recipe", str(recipe_version).encode()),
        ("size-mib", str(ROOTFS_SIZE_MIB).encode()),
        ("init", init_script),
        ("busybox-sha256", hashlib.sha256(busybox).digest()),
    ):
        hasher.update(f"{label}:{len(value)}:".encode() + value)
    return hasher.hexdigest()


def busybox_applets(busybox: Path = BUSYBOX) -> list[str]:
    """Install paths of every applet, e.g. 'bin/sh', 'usr/sbin/chroot'."""
    listing = host.run_checked([busybox, "--list-full"])
    return [line.strip().lstrip("/") for line in listing.splitlines() if line.strip()]


def stage_tree(dest: Path, init_script: bytes, busybox: Path = BUSYBOX) -> None:
    """Lay out the guest's root tree in the empty directory ``dest``."""
    applets = busybox_applets(busybox)
    names = {path.rpartition("/")[2] for path in applets}
    missing = [a for a in REQUIRED_APPLETS if a not in names]
    if missing:
        raise BusyboxMissingApplets(f"{busybox} has no {', '.join(missing)}")
    for directory in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "run", "mnt",
                      "etc/ember/init.d"):
        (dest / directory).mkdir(parents=True, exist_ok=True)
    (dest / "tmp").mkdir()
    (dest / "tmp").chmod(0o1777)
    (dest / "root").mkdir()
    (dest / "root").chmod(0o700)
    shutil.copyfile(busybox, dest / "bin/busybox")
    (dest / "bin/busybox").chmod(0o755)
    for path in applets:
        if path in OWNED_PATHS or path == "bin/busybox":
            continue
        link = dest / path
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to("/bin/busybox")
    (dest / "init").write_bytes(init_script)
    (dest / "init").chmod(0o755)
    (dest / "sbin/init").symlink_to("/init")
    (dest / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (dest / "etc/group").write_text("root:x:0:\n")
    for path in (dest / "etc/passwd", dest / "etc/group"):
        path.chmod(0o644)


def initramfs_bytes(tree: Path) -> bytes:
    """The uncompressed newc initramfs of a staged tree, with /dev/console added."""
    entries = entries_from_tree(tree)
    if not any(e.name == "dev" and stat.S_ISDIR(e.mode) for e in entries):
        raise RootfsBuildError("staged tree has no /dev")
    entries.append(CpioEntry.char_device("dev/console", CONSOLE_MAJOR, CONSOLE_MINOR))
    return newc_archive(entries)


def _make_ext4(tree: Path, image: Path, key: str) -> None:
    fs_uuid = str(uuid.UUID(key[:32]))
    with open(image, "wb") as out:
        out.truncate(ROOTFS_SIZE_MIB << 20)
    host.run_checked(
        [
            "mkfs.ext4", "-q", "-F", "-t", "ext4", "-b", "4096", "-L", "ember-root",
            "-U", fs_uuid, "-O", MKFS_FEATURES,
            "-E", f"lazy_itable_init=0,root_owner=0:0,hash_seed={fs_uuid}",
            "-d", tree, image,
        ],
        env={**os.environ, "E2FSPROGS_FAKE_TIME": MKFS_FAKE_TIME},
    )


def build_rootfs(home: Path, progress: host.Progress) -> RootfsImages:
    """Build (or find in the cache) the initramfs and ext4 root image."""
    init_script = INIT_SCRIPT_PATH.read_bytes()
    key = rootfs_cache_key(init_script, BUSYBOX.read_bytes())
    images = RootfsImages(key, home / "rootfs" / key[:16])
    if images.is_complete():
        info = json.loads((images.directory / BUILD_INFO).read_text())
        if info.get("key") == key:
            progress(f"rootfs: cached {key[:16]} ({images.directory})")
            return images
    progress("rootfs: staging busybox tree")
    images.directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=images.directory.parent, prefix=".build-"))
    try:
        tree = staging / "tree"
        tree.mkdir()
        stage_tree(tree, init_script)
        (staging / INITRAMFS).write_bytes(initramfs_bytes(tree))
        progress(f"rootfs: mkfs.ext4 {ROOTFS_SIZE_MIB} MiB")
        _make_ext4(tree, staging / ROOTFS, key)
        shutil.rmtree(tree)
        info = {
            "key": key,
            "recipe_version": ROOTFS_RECIPE_VERSION,
            "busybox_version": host.installed_version("busybox-static"),
            "initramfs_bytes": (staging / INITRAMFS).stat().st_size,
            "rootfs_bytes": (staging / ROOTFS).stat().st_size,
        }
        (staging / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
        shutil.rmtree(images.directory, ignore_errors=True)
        os.replace(staging, images.directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    size_kib = images.initramfs.stat().st_size >> 10
    progress(f"rootfs: built {key[:16]} (initramfs {size_kib} KiB, ext4 {ROOTFS_SIZE_MIB} MiB)")
    return images

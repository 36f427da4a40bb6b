"""Ember's guest userspace: busybox-static and /init, as an initramfs and an ext4 image.

Both images hold the same tree:

    /init                 guest/rootfs/init (a busybox ash script)
    /sbin/init -> /init   so an ext4 root boots it without init=
    /bin/busybox          from Debian's busybox-static, and one symlink
                          per applet (busybox --list-full)
    /bin/ember-vsock      guest/tools/ember-vsock.c, and likewise every
                          guest/tools/<name>.c as /bin/<name>: static
                          binaries compiled here with the host's gcc and
                          glibc (libc.a)
    /etc/ember/init.d/<name>   guest/rootfs/init.d/<name>, mode 0755: hooks
                          /init runs in name order (50-agent starts ember-agent)
    /etc/passwd, /etc/group
    /dev /proc /sys /tmp /run /root /mnt          mount points

The initramfs is an uncompressed newc cpio written by guest.cpio (plus a
/dev/console node, which the kernel opens for /init's stdio); the root
image is ext4 made with ``mkfs.ext4 -d`` (no mount, no root rights
needed), without a journal or metadata checksums, with inode tables
initialised at mkfs time: all of that is guest-kernel work avoided at
boot. Both images are byte-reproducible. They are cached under
``$EMBER_HOME/rootfs/<key>/``; the key covers the init script, the init.d
hooks, the busybox binary, the guest tools' sources, their compiler flags and toolchain
(gcc, libc6-dev and linux-libc-dev versions) and ROOTFS_RECIPE_VERSION.
Nothing here is an input of the kernel's cache key.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import struct
import subprocess
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import host
from .cpio import CpioEntry, entries_from_tree, newc_archive
from .errors import GuestImageError

__all__ = [
    "RootfsBuildError",
    "BusyboxMissingApplets",
    "ToolBuildError",
    "RootfsImages",
    "ROOTFS_RECIPE_VERSION",
    "ROOTFS_BUILD_PACKAGES",
    "ROOTFS_SIZE_MIB",
    "INIT_SCRIPT_PATH",
    "INIT_D_DIR",
    "TOOLS_DIR",
    "TOOL_CC",
    "TOOL_CFLAGS",
    "REQUIRED_APPLETS",
    "rootfs_cache_key",
    "load_tools",
    "load_hooks",
    "toolchain_id",
    "compile_tool",
    "is_static_elf",
    "stage_tree",
    "initramfs_bytes",
    "make_ext4",
    "build_rootfs",
]

# Bump when the tree layout or the image options below change.
ROOTFS_RECIPE_VERSION = 2
# gcc and libc6-dev (glibc's libc.a) compile the guest tools statically;
# linux-libc-dev has linux/vm_sockets.h.
ROOTFS_BUILD_PACKAGES = ("busybox-static", "e2fsprogs", "gcc", "libc6-dev", "linux-libc-dev")
ROOTFS_SIZE_MIB = 64
BUSYBOX = Path("/bin/busybox")
INIT_SCRIPT_PATH = Path(__file__).resolve().parent / "rootfs" / "init"
# Every file here becomes /etc/ember/init.d/<name> (mode 0755) in both images.
INIT_D_DIR = Path(__file__).resolve().parent / "rootfs" / "init.d"
# Every <name>.c here becomes the static binary /bin/<name> in both images.
TOOLS_DIR = Path(__file__).resolve().parent / "tools"
TOOL_CC = "gcc"
# Static against glibc's libc.a, small (-Os, stripped), warnings are errors.
TOOL_CFLAGS = ("-static", "-Os", "-s", "-std=gnu11", "-Wall", "-Wextra", "-Werror")
# Packages whose versions decide the tools' bytes besides their sources.
TOOLCHAIN_PACKAGES = ("libc6-dev", "linux-libc-dev")
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
# The one timestamp in rootfs.ext4 (seconds since the epoch), for
# byte-reproducible images: E2FSPROGS_FAKE_TIME gives it to the superblock
# and to the inodes mke2fs creates itself (/, lost+found, every crtime);
# atime and mtime of the staged tree are set to it before ``mkfs -d``
# copies them; ctime, which only the kernel can set on the host, is
# rewritten afterwards with debugfs.
IMAGE_TIME = 1
# gABI: ELF identification, program header table and the PT_INTERP type.
ELF_MAGIC = b"\x7fELF"
ELFCLASS64, ELFDATA2LSB = 2, 1
PT_INTERP = 3


class RootfsBuildError(GuestImageError):
    """The guest root filesystem images could not be built."""


class BusyboxMissingApplets(RootfsBuildError):
    """The installed busybox lacks applets that /init needs."""


class ToolBuildError(RootfsBuildError):
    """A guest tool from guest/tools could not be built as a static binary."""


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
    init_script: bytes,
    busybox: bytes,
    tools: Sequence[tuple[str, bytes]] = (),
    toolchain: str = "",
    recipe_version: int = ROOTFS_RECIPE_VERSION,
    hooks: Sequence[tuple[str, bytes]] = (),
) -> str:
    """sha256 (hex) of everything that decides the images' bytes.

    ``tools`` are (name, C source) pairs, in any order; ``toolchain`` names
    the compiler and C library that build them (toolchain_id()); ``hooks``
    are the (name, content) pairs of /etc/ember/init.d.
    """
    fields = [
        ("recipe", str(recipe_version).encode()),
        ("size-mib", str(ROOTFS_SIZE_MIB).encode()),
        ("init", init_script),
        ("busybox-sha256", hashlib.sha256(busybox).digest()),
        ("tool-cc", " ".join((TOOL_CC, *TOOL_CFLAGS)).encode()),
        ("toolchain", toolchain.encode()),
    ]
    for name, source in sorted(tools):
        fields += [("tool-name", name.encode()), ("tool-source", source)]
    for name, content in sorted(hooks):
        fields += [("hook-name", name.encode()), ("hook", content)]
    hasher = hashlib.sha256()
    for label, value in fields:
        # Length-prefixed, so that no two different inputs give the same stream.
        hasher.update(f"{label}:{len(value)}:".encode() + value)
    return hasher.hexdigest()


def load_tools(tools_dir: Path = TOOLS_DIR) -> tuple[tuple[str, bytes], ...]:
    """(name, source) of every guest tool: ``<name>.c`` in ``tools_dir``, by name."""
    return tuple((p.stem, p.read_bytes()) for p in sorted(tools_dir.glob("*.c")))


def load_hooks(hooks_dir: Path = INIT_D_DIR) -> tuple[tuple[str, bytes], ...]:
    """(name, content) of every init.d hook in ``hooks_dir``, by name (none if it is missing)."""
    if not hooks_dir.is_dir():
        return ()
    return tuple((p.name, p.read_bytes()) for p in sorted(hooks_dir.iterdir())
                 if p.is_file() and not p.name.startswith("."))


def toolchain_id() -> str:
    """The compiler and C library versions that build the guest tools."""
    gcc = host.run_checked([TOOL_CC, "-dumpfullversion"]).strip()
    target = host.run_checked([TOOL_CC, "-dumpmachine"]).strip()
    packages = " ".join(f"{p}={host.installed_version(p)}" for p in TOOLCHAIN_PACKAGES)
    return f"{TOOL_CC} {gcc} {target} {packages}"


def is_static_elf(data: bytes) -> bool:
    """True for a 64-bit little-endian ELF with no program interpreter (PT_INTERP).

    A dynamically linked program names its loader (ld-linux) in PT_INTERP;
    a static one, which the guest can run without any shared library, has
    none.
    """
    # gABI ELF header: e_ident[16], e_type, e_machine, e_version, e_entry,
    # e_phoff (offset 32), ..., e_phentsize (54), e_phnum (56).
    if len(data) < 64 or data[:4] != ELF_MAGIC or data[4] != ELFCLASS64 or data[5] != ELFDATA2LSB:
        return False
    (phoff,) = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    if phentsize < 4 or phoff + phentsize * phnum > len(data):
        return False
    return all(
        struct.unpack_from("<I", data, phoff + i * phentsize)[0] != PT_INTERP for i in range(phnum)
    )


def compile_tool(name: str, source: bytes, workdir: Path) -> Path:
    """Compile one guest tool into ``workdir/<name>``, checked to be static.

    The source is written to ``workdir/<name>.c`` first, so the binary is
    built from exactly the bytes the cache key covers.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    src = workdir / f"{name}.c"
    out = workdir / name
    src.write_bytes(source)
    try:
        host.run_checked([TOOL_CC, *TOOL_CFLAGS, "-o", out, src])
    except host.CommandFailed as exc:
        raise ToolBuildError(f"{name}: {exc}") from exc
    if not is_static_elf(out.read_bytes()):
        raise ToolBuildError(f"{name}: {out} is not a static ELF executable (it has PT_INTERP)")
    out.chmod(0o755)
    return out


def busybox_applets(busybox: Path = BUSYBOX) -> list[str]:
    """Install paths of every applet, e.g. 'bin/sh', 'usr/sbin/chroot'."""
    listing = host.run_checked([busybox, "--list-full"])
    return [line.strip().lstrip("/") for line in listing.splitlines() if line.strip()]


def stage_tree(
    dest: Path, init_script: bytes, busybox: Path = BUSYBOX, tools: Mapping[str, Path] | None = None,
    hooks: Sequence[tuple[str, bytes]] = (),
) -> None:
    """Lay out the guest's root tree in the empty directory ``dest``.

    ``tools`` maps a guest tool's name to its built binary, installed as
    ``/bin/<name>``; ``hooks`` are (name, content) pairs installed as
    ``/etc/ember/init.d/<name>`` with mode 0755.
    """
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
    for name, binary in sorted((tools or {}).items()):
        target = dest / "bin" / name
        if target.is_symlink() or target.exists():
            raise ToolBuildError(f"guest tool {name!r} clashes with /bin/{name} of busybox")
        shutil.copyfile(binary, target)
        target.chmod(0o755)
    for name, content in sorted(hooks):
        if not name or "/" in name or name in (".", ".."):
            raise RootfsBuildError(f"init.d hook name {name!r} is not a plain file name")
        hook = dest / "etc/ember/init.d" / name
        hook.write_bytes(content)
        hook.chmod(0o755)
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


def _tree_paths(tree: Path) -> list[str]:
    """Every path under ``tree`` as the image will name it ("/", "/bin", ...)."""
    paths = ["/"]
    for root, dirs, files in os.walk(tree):
        dirs.sort()
        rel = Path(root).relative_to(tree)
        paths += [f"/{(rel / name).as_posix()}" for name in sorted(dirs + files)]
    return paths


def make_ext4(tree: Path, image: Path, key: str) -> None:
    """``image`` := a byte-reproducible ext4 file system holding ``tree``.

    UUID and directory hash seed come from ``key``; every timestamp is
    IMAGE_TIME (atime/mtime of ``tree`` are changed to it).
    """
    fs_uuid = str(uuid.UUID(key[:32]))
    paths = _tree_paths(tree)
    for path in paths:
        os.utime(tree / path.lstrip("/"), (IMAGE_TIME, IMAGE_TIME), follow_symlinks=False)
    # debugfs reads one command per line and takes "..."-quoted names.
    unsafe = [p for p in paths if '"' in p or "\n" in p or "\\" in p]
    if unsafe:
        raise RootfsBuildError(f"cannot name {unsafe[0]!r} in a debugfs command")
    env = {**os.environ, "E2FSPROGS_FAKE_TIME": str(IMAGE_TIME)}
    with open(image, "wb") as out:
        out.truncate(ROOTFS_SIZE_MIB << 20)
    host.run_checked(
        [
            "mkfs.ext4", "-q", "-F", "-t", "ext4", "-b", "4096", "-L", "ember-root",
            "-U", fs_uuid, "-O", MKFS_FEATURES,
            "-E", f"lazy_itable_init=0,root_owner=0:0,hash_seed={fs_uuid}",
            "-d", tree, image,
        ],
        env=env,
    )
    # set_inode_field names the link itself, not what a symlink points to.
    script = "".join(f'set_inode_field "{p}" ctime @{IMAGE_TIME}\n' for p in paths)
    result = subprocess.run(
        ["debugfs", "-w", "-f", "-", os.fspath(image)],
        input=script.encode(), capture_output=True, env=env, check=False,
    )
    # debugfs exits 0 even when a command fails; it says so on stderr,
    # where otherwise only its version banner is.
    complaints = [
        line for line in result.stderr.decode(errors="replace").splitlines()
        if line.strip() and not line.startswith("debugfs ")
    ]
    if result.returncode != 0 or complaints:
        raise RootfsBuildError(f"debugfs -w {image} exited {result.returncode}: {'; '.join(complaints[:3])}")


def build_rootfs(home: Path, progress: host.Progress) -> RootfsImages:
    """Build (or find in the cache) the initramfs and ext4 root image."""
    init_script = INIT_SCRIPT_PATH.read_bytes()
    tools = load_tools()
    hooks = load_hooks()
    toolchain = toolchain_id()
    key = rootfs_cache_key(init_script, BUSYBOX.read_bytes(), tools, toolchain, hooks=hooks)
    images = RootfsImages(key, home / "rootfs" / key[:16])
    if images.is_complete():
        info = json.loads((images.directory / BUILD_INFO).read_text())
        if info.get("key") == key:
            progress(f"rootfs: cached {key[:16]} ({images.directory})")
            return images
    images.directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=images.directory.parent, prefix=".build-"))
    try:
        binaries: dict[str, Path] = {}
        for name, source in tools:
            progress(f"rootfs: compiling {name} (static)")
            binaries[name] = compile_tool(name, source, staging / "tools")
        progress("rootfs: staging busybox tree")
        tree = staging / "tree"
        tree.mkdir()
        stage_tree(tree, init_script, tools=binaries, hooks=hooks)
        (staging / INITRAMFS).write_bytes(initramfs_bytes(tree))
        progress(f"rootfs: mkfs.ext4 {ROOTFS_SIZE_MIB} MiB")
        make_ext4(tree, staging / ROOTFS, key)
        shutil.rmtree(tree)
        info = {
            "key": key,
            "recipe_version": ROOTFS_RECIPE_VERSION,
            "busybox_version": host.installed_version("busybox-static"),
            "toolchain": toolchain,
            "tools": {
                name: {"bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
                for name, path in binaries.items()
            },
            "initramfs_bytes": (staging / INITRAMFS).stat().st_size,
            "rootfs_bytes": (staging / ROOTFS).stat().st_size,
        }
        (staging / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
        shutil.rmtree(staging / "tools", ignore_errors=True)
        shutil.rmtree(images.directory, ignore_errors=True)
        os.replace(staging, images.directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    size_kib = images.initramfs.stat().st_size >> 10
    progress(f"rootfs: built {key[:16]} (initramfs {size_kib} KiB, ext4 {ROOTFS_SIZE_MIB} MiB)")
    return images

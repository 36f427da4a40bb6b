"""Unit tests of the default guest's image recipe (no kernel build, no guest boot)."""

from __future__ import annotations

import array
import base64
import fcntl
import json
import os
import shutil
import socket
import stat
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from guest import images
from guest.cpio import (
    CpioEntry,
    CpioError,
    CpioFormatError,
    CpioNameError,
    entries_from_tree,
    newc_archive,
    parse_newc,
)
from guest.kconfig import FragmentSyntaxError, config_mismatches, parse_config
from guest.kernel import (
    FRAGMENT_PATH,
    PATCH_DIR,
    sync_patches,
    kernel_cache_key,
    load_kernel_inputs,
    load_patches,
)
from guest.rootfs import (
    INIT_SCRIPT_PATH,
    REQUIRED_APPLETS,
    ROOTFS_BUILD_PACKAGES,
    TOOL_CC,
    TOOL_CFLAGS,
    TOOLS_DIR,
    BusyboxMissingApplets,
    ToolBuildError,
    compile_tool,
    initramfs_bytes,
    is_static_elf,
    load_tools,
    make_ext4,
    rootfs_cache_key,
    stage_tree,
)

# --- kernel cache key ------------------------------------------------------

PATCHES = (("0001-a.patch", b"--- a/x\n+++ b/x\n"), ("0002-b.patch", b"--- a/y\n+++ b/y\n"))


def test_cache_key_is_stable_for_equal_inputs() -> None:
    assert kernel_cache_key(b"CONFIG_SMP=y\n", PATCHES, "6.1.1-1") == kernel_cache_key(
        b"CONFIG_SMP=y\n", tuple(PATCHES), "6.1.1-1"
    )


def test_cache_key_ignores_the_order_patches_are_listed_in() -> None:
    assert kernel_cache_key(b"f", PATCHES, "v") == kernel_cache_key(b"f", PATCHES[::-1], "v")


@pytest.mark.parametrize(
    "changed",
    [
        dict(fragment=b"CONFIG_SMP=n\n"),
        dict(patches=(PATCHES[0],)),
        dict(patches=(PATCHES[0], ("0002-b.patch", b"--- a/y\n+++ b/z\n"))),
        dict(patches=(PATCHES[0], ("0003-b.patch", PATCHES[1][1]))),
        dict(source_version="6.1.2-1"),
        dict(recipe_version=99),
    ],
    ids=["fragment", "patch-removed", "patch-content", "patch-renamed", "source-version", "recipe"],
)
def test_cache_key_changes_with_each_input(changed: dict) -> None:
    base = dict(fragment=b"CONFIG_SMP=y\n", patches=PATCHES, source_version="6.1.1-1")
    assert kernel_cache_key(**{**base, **changed}) != kernel_cache_key(**base)


def test_cache_key_fields_cannot_run_into_each_other() -> None:
    # The same bytes split differently between fragment and patch differ.
    a = kernel_cache_key(b"AB", (("p", b"C"),), "v")
    b = kernel_cache_key(b"A", (("p", b"BC"),), "v")
    assert a != b


def test_cache_key_of_the_shipped_inputs_follows_the_files(tmp_path: Path) -> None:
    frag = tmp_path / "frag.config"
    patches = tmp_path / "patches"
    shutil.copyfile(FRAGMENT_PATH, frag)
    shutil.copytree(PATCH_DIR, patches)
    first = load_kernel_inputs("6.1.192-3", frag, patches).key
    assert load_kernel_inputs("6.1.192-3", frag, patches).key == first
    (tmp_path / "unrelated.txt").write_text("not an input")
    (patches / "README").write_text("not a patch")
    assert load_kernel_inputs("6.1.192-3", frag, patches).key == first
    frag.write_text(frag.read_text() + "CONFIG_PRINTK=y\n")
    second = load_kernel_inputs("6.1.192-3", frag, patches).key
    assert second != first
    victim = sorted(patches.glob("*.patch"))[0]
    victim.write_bytes(victim.read_bytes() + b"\n")
    assert load_kernel_inputs("6.1.192-3", frag, patches).key not in (first, second)


def test_rootfs_key_follows_init_and_busybox() -> None:
    key = rootfs_cache_key(b"#!/bin/sh\n", b"busybox")
    assert rootfs_cache_key(b"#!/bin/sh\n", b"busybox") == key
    assert rootfs_cache_key(b"#!/bin/sh\necho\n", b"busybox") != key
    assert rootfs_cache_key(b"#!/bin/sh\n", b"busybox2") != key
    assert rootfs_cache_key(b"#!/bin/sh\n", b"busybox", recipe_version=99) != key


TOOLS = (("ember-vsock", b"int main(void) { return 0; }\n"), ("other", b"int main(void) { return 1; }\n"))


@pytest.mark.parametrize(
    "changed",
    [
        dict(tools=TOOLS[:1]),
        dict(tools=(TOOLS[0], ("other", b"int main(void) { return 2; }\n"))),
        dict(tools=(TOOLS[0], ("renamed", TOOLS[1][1]))),
        dict(toolchain="gcc 13.1.0 x86_64-linux-gnu libc6-dev=2.37"),
    ],
    ids=["tool-removed", "tool-source", "tool-renamed", "toolchain"],
)
def test_rootfs_key_follows_the_guest_tools(changed: dict) -> None:
    base = dict(tools=TOOLS, toolchain="gcc 12.2.0 x86_64-linux-gnu libc6-dev=2.36")
    key = rootfs_cache_key(b"init", b"busybox", **base)
    assert rootfs_cache_key(b"init", b"busybox", tools=TOOLS[::-1], toolchain=base["toolchain"]) == key
    assert rootfs_cache_key(b"init", b"busybox", **{**base, **changed}) != key


def test_rootfs_key_follows_the_tool_source_files(tmp_path: Path) -> None:
    tools = tmp_path / "tools"
    shutil.copytree(TOOLS_DIR, tools)
    first = rootfs_cache_key(b"init", b"busybox", load_tools(tools), "tc")
    assert "ember-vsock" in dict(load_tools(tools))
    (tools / "README").write_text("not a tool")
    assert rootfs_cache_key(b"init", b"busybox", load_tools(tools), "tc") == first
    source = tools / "ember-vsock.c"
    source.write_bytes(source.read_bytes() + b"\n")
    assert rootfs_cache_key(b"init", b"busybox", load_tools(tools), "tc") != first


def test_the_build_installs_the_static_toolchain() -> None:
    assert {"gcc", "libc6-dev", "linux-libc-dev"} <= set(images.BUILD_PACKAGES)
    assert {"gcc", "libc6-dev"} <= set(ROOTFS_BUILD_PACKAGES)


# --- kernel config fragment ------------------------------------------------

MUST_BE_SET = {
    "CONFIG_64BIT": "y", "CONFIG_SMP": "y", "CONFIG_ACPI": "y", "CONFIG_PVH": "y",
    "CONFIG_SERIAL_8250": "y", "CONFIG_SERIAL_8250_CONSOLE": "y",
    "CONFIG_SERIAL_8250_NR_UARTS": "1", "CONFIG_SERIAL_8250_RUNTIME_UARTS": "1",
    "CONFIG_SERIO_I8042": "y", "CONFIG_KEYBOARD_ATKBD": "y",
    "CONFIG_BLK_DEV_INITRD": "y", "CONFIG_DEVTMPFS": "y", "CONFIG_DEVTMPFS_MOUNT": "y",
    "CONFIG_PROC_FS": "y", "CONFIG_SYSFS": "y", "CONFIG_TMPFS": "y",
    "CONFIG_VIRTIO_MMIO": "y", "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES": "y",
    "CONFIG_VIRTIO_BLK": "y", "CONFIG_VIRTIO_NET": "y",
    "CONFIG_VSOCKETS": "y", "CONFIG_VIRTIO_VSOCKETS": "y",
    "CONFIG_EXT4_FS": "y", "CONFIG_UNIX": "y", "CONFIG_INET": "y",
    "CONFIG_VMGENID": "y", "CONFIG_DEVMEM": "y", "CONFIG_BINFMT_SCRIPT": "y",
    "CONFIG_NO_HZ_IDLE": "y", "CONFIG_HZ_100": "y", "CONFIG_PREEMPT_NONE": "y",
}
MUST_BE_UNSET = (
    "CONFIG_MODULES", "CONFIG_PCI", "CONFIG_RANDOMIZE_BASE", "CONFIG_JUMP_LABEL",
    "CONFIG_KPROBES", "CONFIG_FTRACE", "CONFIG_PREEMPT_DYNAMIC", "CONFIG_RETPOLINE",
    "CONFIG_RETHUNK", "CONFIG_CPU_MITIGATIONS", "CONFIG_PAGE_TABLE_ISOLATION",
    "CONFIG_RD_GZIP", "CONFIG_RD_XZ", "CONFIG_RD_ZSTD", "CONFIG_RD_LZ4", "CONFIG_RD_LZMA",
    "CONFIG_RD_BZIP2", "CONFIG_RD_LZO", "CONFIG_DEBUG_INFO",
)


def test_fragment_sets_every_must_have_option() -> None:
    fragment = parse_config(FRAGMENT_PATH.read_text())
    wrong = {k: fragment.get(k, "<absent>") for k, v in MUST_BE_SET.items() if fragment.get(k) != v}
    assert wrong == {}


def test_fragment_switches_off_patching_modules_and_mitigations() -> None:
    fragment = parse_config(FRAGMENT_PATH.read_text())
    assert [k for k in MUST_BE_UNSET if k not in fragment or fragment[k] is not None] == []


def test_parse_config_reads_values_unset_lines_and_comments() -> None:
    text = '# a comment\n\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_S="x y"\nCONFIG_A=n\n'
    assert parse_config(text) == {"CONFIG_A": "n", "CONFIG_B": None, "CONFIG_S": '"x y"'}


@pytest.mark.parametrize("line", ["CONFIG_A = y", "CONFIG_A", "# CONFIG_A is off", "SMP=y"])
def test_parse_config_rejects_typos(line: str) -> None:
    with pytest.raises(FragmentSyntaxError):
        parse_config(line + "\n")


def test_config_mismatches_finds_lost_and_unwanted_options() -> None:
    fragment = {"CONFIG_A": "y", "CONFIG_B": None, "CONFIG_C": "1", "CONFIG_D": None, "CONFIG_E": None}
    final = {"CONFIG_A": "y", "CONFIG_B": "y", "CONFIG_C": "4", "CONFIG_D": "n"}
    lost = config_mismatches(fragment, final)
    assert [m.symbol for m in lost] == ["CONFIG_B", "CONFIG_C"]
    assert "fragment wants =1, .config has =4" in str(lost[1])
    assert config_mismatches({"CONFIG_A": "y"}, {}) != []


def test_patches_are_documented_and_target_the_expected_files() -> None:
    patches = dict(load_patches())
    targets = {
        "alternative.c": "arch/x86/kernel/alternative.c",
        "fpu": "arch/x86/kernel/fpu/core.c",
        "fault": "arch/x86/mm/fault.c",
        "acpica": "drivers/acpi/acpica/evhandler.c",
        "acconfig": "include/acpi/acconfig.h",
    }
    assert len(patches) == 4
    for data in patches.values():
        text = data.decode()
        header, _, body = text.partition("\n--- a/")
        assert "Why:" in header and "inert on hardware KVM" in header
        assert body, "no diff after the header"
    joined = b"".join(patches.values()).decode()
    for path in targets.values():
        assert f"+++ b/{path}" in joined


def _unified_diff(path: str, old: str, new: str) -> bytes:
    import difflib

    lines = difflib.unified_diff(
        old.splitlines(keepends=True), new.splitlines(keepends=True), f"a/{path}", f"b/{path}"
    )
    return ("A header comment.\n\n" + "".join(lines)).encode()


@pytest.mark.skipif(shutil.which("patch") is None, reason="GNU patch not installed")
def testsync_patches_reverts_only_what_changed(tmp_path: Path) -> None:
    original = "one\ntwo\nthree\nfour\nfive\nsix\nseven\n"
    (tmp_path / "f.txt").write_text(original)
    with_a = original.replace("one", "ONE")
    with_ab = with_a.replace("seven", "SEVEN")
    patch_a = ("0001-a.patch", _unified_diff("f.txt", original, with_a))
    patch_b = ("0002-b.patch", _unified_diff("f.txt", with_a, with_ab))
    patch_b2 = ("0002-b.patch", _unified_diff("f.txt", with_a, with_a.replace("six", "SIX")))
    said: list[str] = []

    sync_patches(tmp_path, [patch_a, patch_b], said.append)
    assert (tmp_path / "f.txt").read_text() == with_ab
    said.clear()
    sync_patches(tmp_path, [patch_a, patch_b2], said.append)
    assert (tmp_path / "f.txt").read_text() == with_a.replace("six", "SIX")
    assert said == ["kernel: reverting 0002-b.patch", "kernel: applying 0002-b.patch"]
    said.clear()
    sync_patches(tmp_path, [patch_a, patch_b2], said.append)
    assert said == []
    sync_patches(tmp_path, [], said.append)
    assert (tmp_path / "f.txt").read_text() == original


# --- cpio writer -----------------------------------------------------------

def _sample_entries() -> list[CpioEntry]:
    return [
        CpioEntry.directory("bin"),
        CpioEntry.file("bin/busybox", b"\x7fELF" + bytes(range(7)), 0o755),
        CpioEntry.symlink("bin/sh", "/bin/busybox"),
        CpioEntry.directory("dev"),
        CpioEntry.char_device("dev/console", 5, 1),
        CpioEntry.file("init", b"#!/bin/sh\n", 0o755),
    ]


def test_newc_round_trip() -> None:
    entries = _sample_entries()
    assert parse_newc(newc_archive(entries)) == entries


def test_newc_layout_is_aligned_and_terminated() -> None:
    data = newc_archive(_sample_entries())
    assert data.startswith(b"070701")
    assert len(data) % 4 == 0
    offset, names = 0, []
    while True:
        assert offset % 4 == 0 and data[offset:offset + 6] == b"070701"
        size = int(data[offset + 54:offset + 62], 16)
        name_size = int(data[offset + 94:offset + 102], 16)
        name = data[offset + 110:offset + 110 + name_size - 1].decode()
        names.append(name)
        body = offset + 110 + name_size
        body += -body % 4
        offset = body + size + (-(body + size) % 4)
        if name == "TRAILER!!!":
            break
    assert offset == len(data)
    assert names[-1] == "TRAILER!!!" and names[0] == "bin"


def test_newc_is_reproducible() -> None:
    assert newc_archive(_sample_entries()) == newc_archive(_sample_entries())


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio not installed")
def test_newc_is_read_by_gnu_cpio(tmp_path: Path) -> None:
    data = newc_archive(_sample_entries())
    listing = subprocess.run(
        ["cpio", "-t", "-v", "--quiet", "-H", "newc"], input=data, capture_output=True, check=True
    ).stdout.decode()
    lines = listing.splitlines()
    assert [line.split()[-1] if "->" not in line else line.split()[-3] for line in lines] == [
        "bin", "bin/busybox", "bin/sh", "dev", "dev/console", "init",
    ]
    assert lines[4].startswith("crw-------") and "5," in lines[4]
    assert lines[2].startswith("lrwxrwxrwx") and lines[2].endswith("-> /bin/busybox")


def test_newc_rejects_children_before_parents_and_duplicates() -> None:
    with pytest.raises(CpioError, match="parent"):
        newc_archive([CpioEntry.file("bin/sh", b"")])
    with pytest.raises(CpioError, match="duplicate"):
        newc_archive([CpioEntry.file("init", b""), CpioEntry.file("init", b"")])


@pytest.mark.parametrize("name", ["", "/init", "a/../b", "a//b", ".."])
def test_newc_rejects_bad_names(name: str) -> None:
    with pytest.raises(CpioNameError):
        CpioEntry.file(name, b"")


@pytest.mark.parametrize("cut", [0, 50, 115, -20])
def test_parse_newc_rejects_truncated_archives(cut: int) -> None:
    data = newc_archive(_sample_entries())
    with pytest.raises(CpioFormatError):
        parse_newc(data[:cut])


def test_entries_from_tree_lists_parents_first(tmp_path: Path) -> None:
    (tmp_path / "b" / "c").mkdir(parents=True)
    (tmp_path / "b" / "c" / "f").write_bytes(b"x")
    (tmp_path / "a").symlink_to("b/c/f")
    names = [e.name for e in entries_from_tree(tmp_path)]
    assert names == ["a", "b", "b/c", "b/c/f"]


# --- staged tree and initramfs ----------------------------------------------

def _fake_busybox(tmp_path: Path, applets: list[str]) -> Path:
    fake = tmp_path / "busybox"
    fake.write_text("#!/bin/sh\n" + "".join(f"echo {a}\n" for a in applets))
    fake.chmod(0o755)
    return fake


APPLETS = ["bin/sh", "bin/mount", "sbin/devmem", "usr/bin/setsid", "bin/cttyhack",
           "sbin/reboot", "bin/base64", "bin/sleep", "sbin/init", "linuxrc", "usr/bin/[["]


def test_stage_tree_and_initramfs(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    stage_tree(tree, b"#!/bin/sh\necho hi\n", busybox=_fake_busybox(tmp_path, APPLETS))
    assert (tree / "sbin/init").readlink() == Path("/init")
    assert (tree / "bin/sh").readlink() == Path("/bin/busybox")
    assert not (tree / "linuxrc").exists()
    assert stat.S_IMODE((tree / "init").stat().st_mode) == 0o755
    entries = {e.name: e for e in parse_newc(initramfs_bytes(tree))}
    assert entries["init"].data == b"#!/bin/sh\necho hi\n"
    assert entries["sbin/init"].data == b"/init"
    console = entries["dev/console"]
    assert stat.S_ISCHR(console.mode) and (console.rdev_major, console.rdev_minor) == (5, 1)
    assert entries["bin/busybox"].data == (tmp_path / "busybox").read_bytes()
    for mount_point in ("proc", "sys", "dev", "tmp", "etc/ember/init.d"):
        assert entries[mount_point].is_dir


def test_stage_tree_refuses_a_busybox_without_needed_applets(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    with pytest.raises(BusyboxMissingApplets, match="devmem"):
        stage_tree(tree, b"", busybox=_fake_busybox(tmp_path, [a for a in APPLETS if "devmem" not in a]))


def test_stage_tree_installs_guest_tools_in_bin(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    binary = tmp_path / "ember-vsock"
    binary.write_bytes(b"\x7fELF tool")
    binary.chmod(0o600)
    stage_tree(tree, b"#!/bin/sh\n", busybox=_fake_busybox(tmp_path, APPLETS),
               tools={"ember-vsock": binary})
    assert stat.S_IMODE((tree / "bin/ember-vsock").stat().st_mode) == 0o755
    entries = {e.name: e for e in parse_newc(initramfs_bytes(tree))}
    assert entries["bin/ember-vsock"].data == b"\x7fELF tool"


def test_stage_tree_refuses_a_tool_named_like_an_applet(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    binary = tmp_path / "sh"
    binary.write_bytes(b"x")
    with pytest.raises(ToolBuildError, match="clashes"):
        stage_tree(tree, b"", busybox=_fake_busybox(tmp_path, APPLETS), tools={"sh": binary})


def _stage_small_tree(root: Path, mtime: int) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "tool").write_bytes(b"\x7fELF" + bytes(5000))
    (root / "bin" / "[[").symlink_to("tool")
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    for path in (root / "bin" / "tool", root / "etc" / "passwd", root / "bin", root / "etc", root):
        os.utime(path, (mtime, mtime))
    return root


@pytest.mark.skipif(shutil.which("mkfs.ext4") is None or shutil.which("debugfs") is None,
                    reason="e2fsprogs not installed")
def test_make_ext4_is_byte_reproducible(tmp_path: Path) -> None:
    key = "ab" * 32
    first, second, other = tmp_path / "1.ext4", tmp_path / "2.ext4", tmp_path / "3.ext4"
    make_ext4(_stage_small_tree(tmp_path / "t1", 1_000_000), first, key)
    # A different staging directory, other mtimes, a later ctime.
    make_ext4(_stage_small_tree(tmp_path / "t2", 2_000_000), second, key)
    assert first.read_bytes() == second.read_bytes()
    make_ext4(_stage_small_tree(tmp_path / "t3", 1_000_000), other, "cd" * 32)
    assert other.read_bytes() != first.read_bytes()
    listing = subprocess.run(["debugfs", "-R", "stat /bin/[[", str(first)],
                             capture_output=True, text=True, check=True).stdout
    assert "Type: symlink" in listing
    assert [line.split()[1] for line in listing.splitlines() if "time:" in line] == ["0x00000001:00000000"] * 4


# --- ember-vsock (guest/tools/ember-vsock.c) -------------------------------------

def _have_static_libc() -> bool:
    if shutil.which(TOOL_CC) is None:
        return False
    libc = subprocess.run([TOOL_CC, "-print-file-name=libc.a"], capture_output=True, text=True).stdout.strip()
    return os.path.isabs(libc) and Path(libc).is_file()


needs_static_cc = pytest.mark.skipif(not _have_static_libc(), reason="gcc or glibc's libc.a missing")
VSOCK_SOURCE = dict(load_tools())["ember-vsock"]
USAGE_START = "usage: ember-vsock listen PORT"


@pytest.fixture(scope="module")
def static_vsock(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not _have_static_libc():
        pytest.skip("gcc or glibc's libc.a missing")
    return compile_tool("ember-vsock", VSOCK_SOURCE, tmp_path_factory.mktemp("static"))


# An LD_PRELOAD library that turns AF_VSOCK into abstract AF_UNIX sockets
# named "<$EMBER_VSOCK_SHIM>-<port>" (the CID is ignored), so that the
# tool's stream handling runs on hosts without a vsock loopback transport.
# $EMBER_VSOCK_SHIM_SNDBUF, if set, is the sockets' SO_SNDBUF.
VSOCK_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <linux/vm_sockets.h>

static socklen_t to_unix(const struct sockaddr *addr, struct sockaddr_un *un)
{
	const struct sockaddr_vm *vm = (const struct sockaddr_vm *)addr;
	int n;
	memset(un, 0, sizeof(*un));
	un->sun_family = AF_UNIX;
	n = snprintf(un->sun_path + 1, sizeof(un->sun_path) - 1, "%s-%u",
		     getenv("EMBER_VSOCK_SHIM"), vm->svm_port);
	return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + n);
}

int socket(int domain, int type, int protocol)
{
	int (*real)(int, int, int) = (int (*)(int, int, int))dlsym(RTLD_NEXT, "socket");
	const char *sndbuf = getenv("EMBER_VSOCK_SHIM_SNDBUF");
	int fd, size;
	if (domain != AF_VSOCK)
		return real(domain, type, protocol);
	fd = real(AF_UNIX, type, 0);
	if (fd >= 0 && sndbuf) {
		size = atoi(sndbuf);
		setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof(size));
	}
	return fd;
}

int bind(int fd, const struct sockaddr *addr, socklen_t len)
{
	int (*real)(int, const struct sockaddr *, socklen_t) =
		(int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "bind");
	struct sockaddr_un un;
	if (addr->sa_family != AF_VSOCK)
		return real(fd, addr, len);
	return real(fd, (struct sockaddr *)&un, to_unix(addr, &un));
}

int connect(int fd, const struct sockaddr *addr, socklen_t len)
{
	int (*real)(int, const struct sockaddr *, socklen_t) =
		(int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "connect");
	struct sockaddr_un un;
	if (addr->sa_family != AF_VSOCK)
		return real(fd, addr, len);
	return real(fd, (struct sockaddr *)&un, to_unix(addr, &un));
}
"""


class ShimmedVsock:
    """ember-vsock built dynamically, run with AF_VSOCK mapped to AF_UNIX."""

    def __init__(self, tool: Path, shim: Path) -> None:
        self.tool = tool
        self.env = {**os.environ, "LD_PRELOAD": str(shim),
                    "EMBER_VSOCK_SHIM": f"ember-vsock-test-{os.getpid()}-{uuid.uuid4().hex[:12]}"}

    def address(self, port: int) -> bytes:
        return f"\0{self.env['EMBER_VSOCK_SHIM']}-{port}".encode()

    def run(self, *args: str, data: bytes = b"", timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([str(self.tool), *args], input=data, env=self.env,
                              capture_output=True, timeout=timeout)

    def popen(self, *args: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen([str(self.tool), *args], env=self.env, **kwargs)

    def __repr__(self) -> str:
        return f"<ShimmedVsock {self.env['EMBER_VSOCK_SHIM']}>"


@pytest.fixture(scope="module")
def shim_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which(TOOL_CC) is None:
        pytest.skip(f"{TOOL_CC} not installed")
    out = tmp_path_factory.mktemp("shim")
    (out / "shim.c").write_text(VSOCK_SHIM)
    (out / "ember-vsock.c").write_bytes(VSOCK_SOURCE)
    subprocess.run([TOOL_CC, "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o", out / "shim.so",
                    out / "shim.c", "-ldl"], check=True)
    dynamic_flags = [f for f in TOOL_CFLAGS if f != "-static"]
    subprocess.run([TOOL_CC, *dynamic_flags, "-o", out / "ember-vsock", out / "ember-vsock.c"], check=True)
    return out / "ember-vsock", out / "shim.so"


@pytest.fixture
def shimmed(shim_build: tuple[Path, Path]) -> ShimmedVsock:
    return ShimmedVsock(*shim_build)


@pytest.fixture
def echo_server(shimmed: ShimmedVsock) -> Iterator[subprocess.Popen[bytes]]:
    """`ember-vsock listen 5000` (no --once), ready to accept."""
    server = shimmed.popen("listen", "5000", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert server.stdout is not None
    assert server.stdout.readline() == b"listening on vsock port 5000\n"
    yield server
    server.kill()
    server.wait()
    server.stdout.close()
    assert server.stderr is not None
    server.stderr.close()


def test_ember_vsock_links_statically(static_vsock: Path) -> None:
    assert is_static_elf(static_vsock.read_bytes())
    # The binary is small: glibc's static floor plus a little.
    assert static_vsock.stat().st_size < 1 << 20


@needs_static_cc
def test_is_static_elf_tells_dynamic_from_static(shim_build: tuple[Path, Path]) -> None:
    tool, shim = shim_build
    assert not is_static_elf(tool.read_bytes())
    assert not is_static_elf(b"#!/bin/sh\n")
    assert not is_static_elf(b"\x7fELF" + bytes(60))


@pytest.mark.parametrize(
    "args",
    [(), ("frob",), ("listen",), ("listen", "x"), ("listen", "1", "--twice"), ("listen", "4294967296"),
     ("connect", "2"), ("connect", "2", "-5"), ("connect", "2", "5000", "extra"), ("cid", "x")],
    ids=lambda a: " ".join(a) or "no-args",
)
def test_ember_vsock_prints_usage_for_bad_arguments(static_vsock: Path, args: tuple[str, ...]) -> None:
    result = subprocess.run([str(static_vsock), *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(USAGE_START)
    assert "connect CID PORT" in result.stderr and "cid" in result.stderr


@needs_static_cc
def test_compile_tool_names_the_tool_that_fails(tmp_path: Path) -> None:
    with pytest.raises(ToolBuildError, match="(?s)broken.*undeclared"):
        compile_tool("broken", b"int main(void) { return nope; }\n", tmp_path)


def test_connect_streams_16_mib_through_an_echo_server(shimmed: ShimmedVsock) -> None:
    server = shimmed.popen("listen", "5000", "--once", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert server.stdout is not None
    assert server.stdout.readline() == b"listening on vsock port 5000\n"
    data = os.urandom(16 << 20)
    result = shimmed.run("connect", "2", "5000", data=data)
    assert result.returncode == 0, result.stderr
    assert result.stdout == data
    _, err = server.communicate(timeout=30)
    assert server.returncode == 0, err
    server.stdout.close()


def test_connect_prints_the_echo_of_a_line(shimmed: ShimmedVsock, echo_server: subprocess.Popen[bytes]) -> None:
    result = shimmed.run("connect", "2", "5000", data=b"hi\n")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"hi\n", b"")
    empty = shimmed.run("connect", "2", "5000", data=b"")
    assert (empty.returncode, empty.stdout) == (0, b"")


def test_listen_serves_connections_concurrently(
    shimmed: ShimmedVsock, echo_server: subprocess.Popen[bytes]
) -> None:
    slow = shimmed.popen("connect", "2", "5000", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert slow.stdin is not None and slow.stdout is not None
    slow.stdin.write(b"first\n")
    slow.stdin.flush()
    assert slow.stdout.readline() == b"first\n"
    # The first connection is still open; a second one is served meanwhile.
    assert shimmed.run("connect", "2", "5000", data=b"second\n", timeout=30).stdout == b"second\n"
    slow.stdin.close()
    assert slow.stdout.read() == b""
    assert slow.wait(timeout=30) == 0
    slow.stdout.close()


def test_connect_exits_when_the_peer_closes(shimmed: ShimmedVsock) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(shimmed.address(6000))
        listener.listen(1)
        client = shimmed.popen("connect", "2", "6000", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"bye\n")
    # stdin stays open: the client must leave on the peer's end of stream.
    assert client.stdout is not None and client.stdin is not None
    assert client.stdout.read() == b"bye\n"
    assert client.wait(timeout=30) == 0
    client.stdin.close()
    client.stdout.close()


def test_connect_half_closes_at_end_of_stdin(shimmed: ShimmedVsock) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(shimmed.address(6001))
        listener.listen(1)
        client = shimmed.popen("connect", "2", "6001", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert client.stdin is not None and client.stdout is not None
        client.stdin.write(b"x" * 100_000)
        client.stdin.close()
        conn, _ = listener.accept()
        with conn:
            received = b""
            while chunk := conn.recv(65536):
                received += chunk
            # The client's end of stream came while it still reads from us.
            conn.sendall(f"got {len(received)}\n".encode())
    assert client.stdout.read() == b"got 100000\n"
    assert client.wait(timeout=30) == 0
    client.stdout.close()


def test_connect_keeps_reading_while_its_sends_wait(shimmed: ShimmedVsock) -> None:
    # A peer that talks before it listens: a client blocked in send() would
    # never read, and both sides would wait on full buffers forever.
    spoken = os.urandom(4 << 20)
    heard = bytearray()

    def talk_then_listen(listener: socket.socket) -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(spoken)
            while chunk := conn.recv(65536):
                heard.extend(chunk)

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(shimmed.address(6002))
        listener.listen(1)
        peer = threading.Thread(target=talk_then_listen, args=(listener,), daemon=True)
        peer.start()
        said = os.urandom(4 << 20)
        # A small send buffer, so that a blocking send() really would block.
        shimmed.env["EMBER_VSOCK_SHIM_SNDBUF"] = "4096"
        result = shimmed.run("connect", "2", "6002", data=said, timeout=60)
        peer.join(timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout == spoken
    assert bytes(heard) == said


def test_connect_refused_is_one_line_and_exit_1(shimmed: ShimmedVsock) -> None:
    result = shimmed.run("connect", "2", "6999", timeout=30)
    assert result.returncode == 1
    assert result.stdout == b""
    assert result.stderr.decode().splitlines() == ["ember-vsock: connect to 2:6999: Connection refused"]


def _host_vsock() -> socket.socket | None:
    try:
        return socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    except (AttributeError, OSError):
        return None


def test_listen_on_a_vsock_port_in_use_fails_with_one_line(static_vsock: Path) -> None:
    sock = _host_vsock()
    if sock is None:
        pytest.skip("no AF_VSOCK on this host")
    with sock:
        sock.bind((socket.VMADDR_CID_ANY, socket.VMADDR_PORT_ANY))
        sock.listen(1)
        port = sock.getsockname()[1]
        result = subprocess.run([str(static_vsock), "listen", str(port), "--once"],
                                capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"ember-vsock: bind to port {port}: Address already in use"]


def test_cid_prints_the_local_cid(static_vsock: Path) -> None:
    if not Path("/dev/vsock").exists():
        pytest.skip("no /dev/vsock on this host")
    buf = array.array("I", [0])
    with open("/dev/vsock", "rb") as dev:
        # SAFETY: the ioctl writes one unsigned int into buf, which is that size and outlives the call.
        fcntl.ioctl(dev, socket.IOCTL_VM_SOCKETS_GET_LOCAL_CID, buf)
    result = subprocess.run([str(static_vsock), "cid"], capture_output=True, text=True, timeout=30)
    if buf[0] == socket.VMADDR_CID_ANY:
        assert result.returncode == 1 and "no vsock transport" in result.stderr
    else:
        assert (result.returncode, result.stdout, result.stderr) == (0, f"{buf[0]}\n", "")


# --- /init ---------------------------------------------------------------------

@pytest.mark.parametrize("shell", ["sh", "busybox"])
def test_init_script_parses(shell: str) -> None:
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} not installed")
    argv = [shell, "sh", "-n"] if shell == "busybox" else [shell, "-n"]
    result = subprocess.run([*argv, str(INIT_SCRIPT_PATH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_init_script_uses_only_required_applets_it_checks_for() -> None:
    text = INIT_SCRIPT_PATH.read_text()
    assert text.startswith("#!/bin/sh\n")
    for applet in ("devmem", "setsid", "cttyhack", "reboot", "base64", "mount"):
        assert applet in REQUIRED_APPLETS and applet in text
    markers = ["EMBER-INIT-OK", "EMBER-CPUS=", "EMBER-MEMTOTAL-KB=", "EMBER-RUN-EXIT="]
    positions = [text.index(f'echo "{m}') for m in markers]
    assert positions == sorted(positions)


# --- images API ------------------------------------------------------------------

def test_run_arg_is_base64_of_the_script() -> None:
    arg = images.run_arg("echo hi; exit 3\n")
    assert arg.startswith("ember.run=") and " " not in arg
    assert base64.b64decode(arg.removeprefix("ember.run=")) == b"echo hi; exit 3\n"
    with pytest.raises(images.RunScriptTooLong):
        images.run_arg("x" * 2000)


def test_ember_home_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EMBER_HOME", str(tmp_path))
    assert images.ember_home() == tmp_path.resolve()
    monkeypatch.delenv("EMBER_HOME")
    assert images.ember_home() == Path.home() / ".cache" / "ember"


def test_show_without_a_build_says_how_to_build(tmp_path: Path) -> None:
    with pytest.raises(images.ImagesNotBuilt, match="ember images build"):
        images.show(tmp_path)


def test_show_returns_the_manifest_and_notices_missing_files(tmp_path: Path) -> None:
    manifest = {"boot_args": images.DEFAULT_BOOT_ARGS}
    for field in ("kernel", "initrd", "rootfs", "system_map", "kernel_config"):
        path = tmp_path / field
        path.write_bytes(b"x")
        manifest[field] = str(path)
    (tmp_path / "images.json").write_text(json.dumps(manifest))
    shown = images.show(tmp_path)
    assert shown == manifest
    json.dumps(shown)
    (tmp_path / "rootfs").unlink()
    with pytest.raises(images.ImagesNotBuilt, match="rootfs"):
        images.show(tmp_path)


def test_default_boot_args_leave_host_compatibility_to_the_vmm() -> None:
    args = images.DEFAULT_BOOT_ARGS.split()
    assert {"console=ttyS0", "reboot=k", "panic=1"} <= set(args)
    assert not [a for a in args if a.startswith(("clearcpuid", "noxsave", "root="))]


# --- host helpers -------------------------------------------------------------------

def test_run_logged_keeps_the_output_and_quotes_it_on_failure(tmp_path: Path) -> None:
    from guest.host import CommandFailed, run_logged

    log = tmp_path / "logs" / "step.log"
    said: list[str] = []
    run_logged(["sh", "-c", "echo one; echo two"], log_path=log, label="step", progress=said.append,
               heartbeat=0.0)
    assert "one\ntwo\n" in log.read_text()
    assert said and said[-1].startswith("step: ")
    with pytest.raises(CommandFailed, match="(?s)exited 3.*boom"):
        run_logged(["sh", "-c", "echo boom; exit 3"], log_path=log, label="step", progress=said.append)
    assert "boom" in log.read_text()


@pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="not a Debian host")
def test_missing_packages_asks_dpkg() -> None:
    from guest.host import missing_packages

    assert missing_packages(["dpkg", "ember-surely-not-a-package"]) == ["ember-surely-not-a-package"]

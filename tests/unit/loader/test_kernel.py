"""load_kernel: format detection and file-level errors."""

from __future__ import annotations

import io
import os

import pytest

from vmm.loader import (
    ElfBadMagic,
    ImageEmpty,
    ImageNotFound,
    ImageTruncated,
    ImageUnreadable,
    LoaderError,
    UnknownImageFormat,
    load_kernel,
)
from vmm.memory import GuestMemory

from tests.unit.loader._images import build_bzimage, simple_elf


@pytest.fixture
def mem():
    m = GuestMemory.anonymous([(0, 32 << 20)])
    yield m
    m.close()


def test_detects_elf(mem, tmp_path):
    path = tmp_path / "vmlinux"
    path.write_bytes(simple_elf())
    result = load_kernel(mem, path)  # a PathLike works too
    assert result.pvh_entry == 0x100020
    assert result.setup_header is None


def test_detects_bzimage(mem, tmp_path):
    path = tmp_path / "bzImage"
    path.write_bytes(build_bzimage())
    result = load_kernel(mem, str(path))
    assert result.entry_64 == 0x100200
    assert result.setup_header is not None


def test_accepts_file_objects(mem, tmp_path):
    path = tmp_path / "bzImage"
    path.write_bytes(build_bzimage())
    with open(path, "rb") as f:
        assert load_kernel(mem, f).entry_64 == 0x100200
    assert load_kernel(mem, io.BytesIO(simple_elf())).entry_64 == 0x100010


def _message(exc: LoaderError) -> str:
    text = str(exc)
    assert "\n" not in text
    return text


def test_missing_file(mem, tmp_path):
    path = tmp_path / "nope"
    with pytest.raises(ImageNotFound) as info:
        load_kernel(mem, str(path))
    assert _message(info.value) == f"{path}: File not found"


def test_empty_file(mem, tmp_path):
    path = tmp_path / "empty"
    path.write_bytes(b"")
    with pytest.raises(ImageEmpty) as info:
        load_kernel(mem, str(path))
    assert _message(info.value) == f"{path}: File is empty"


def test_directory(mem, tmp_path):
    with pytest.raises(ImageUnreadable) as info:
        load_kernel(mem, str(tmp_path))
    assert _message(info.value).startswith(f"{tmp_path}: File cannot be read")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads anything")
def test_unreadable(mem, tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(simple_elf())
    path.chmod(0)
    with pytest.raises(ImageUnreadable):
        load_kernel(mem, str(path))


def test_device_file_is_refused(mem):
    with pytest.raises(ImageUnreadable, match="not a regular file"):
        load_kernel(mem, "/dev/zero")


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b"hello world, not a kernel", "68656c6c6f20776f"),
        (b"\x1f\x8b\x08\x00" + bytes(100), "gzip"),
        (b"\x28\xb5\x2f\xfd" + bytes(100), "zstd"),
        (b"MZ" + bytes(0x300), "PE/EFI"),
    ],
)
def test_garbage(mem, tmp_path, data, fragment):
    path = tmp_path / "junk"
    path.write_bytes(data)
    with pytest.raises(UnknownImageFormat) as info:
        load_kernel(mem, str(path))
    text = _message(info.value)
    assert text.startswith(f"{path}: Not a kernel image")
    assert fragment in text


def test_truncated_elf(mem, tmp_path):
    for cut in (2, 30):
        path = tmp_path / f"cut{cut}"
        path.write_bytes(simple_elf()[:cut])
        with pytest.raises(ImageTruncated) as info:
            load_kernel(mem, str(path))
        assert _message(info.value).startswith(f"{path}: File is truncated")


def test_corrupt_elf_message_names_file_and_problem(mem, tmp_path):
    path = tmp_path / "vmlinux"
    image = bytearray(simple_elf())
    image[18] = 183  # EM_AARCH64
    path.write_bytes(bytes(image))
    with pytest.raises(LoaderError) as info:
        load_kernel(mem, str(path))
    assert _message(info.value) == (
        f"{path}: Not a 64-bit little-endian x86_64 ELF executable: e_machine is 183, expected EM_X86_64 (62)"
    )


def test_error_carries_path_attribute(mem, tmp_path):
    path = tmp_path / "junk"
    path.write_bytes(b"x" * 10)
    with pytest.raises(UnknownImageFormat) as info:
        load_kernel(mem, str(path))
    assert info.value.path == str(path)
    assert not isinstance(info.value, ElfBadMagic)

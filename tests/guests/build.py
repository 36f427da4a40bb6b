"""Build Ember's test guest, `testguest.elf`, with gcc.

The guest is a freestanding x86_64 ELF (C and GNU assembly under this
directory, see docs/test-guests.md). The build is cached: the output lives in
`<out_dir>/<key>/testguest.elf`, where the key hashes every source file, the
compiler flags and the compiler's version, so an unchanged tree is never
rebuilt and a changed one never reuses a stale image.

    python tests/guests/build.py [--out DIR]     # prints the ELF's path
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["GUEST_DIR", "DEFAULT_OUT_DIR", "GuestBuildError", "build_testguest", "guest_sources"]

GUEST_DIR = Path(__file__).resolve().parent
DEFAULT_OUT_DIR = GUEST_DIR / "out"
IMAGE_NAME = "testguest.elf"
LINKER_SCRIPT = GUEST_DIR / "linker.ld"
INCLUDE_DIR = GUEST_DIR / "include"
SOURCE_DIRS = ("arch", "kernel", "lib", "core", "modes")
# Every file whose content changes the image: sources, headers, the mode table, the linker script.
HASHED_SUFFIXES = (".c", ".S", ".h", ".def", ".ld")
KEEP_BUILDS = 4

# The boot contract: the VMM loads PT_LOAD at p_paddr and enters e_entry.
LOAD_ADDR = 0x200000
MAX_IMAGE_BYTES = 1 << 20

CFLAGS = (
    "-std=gnu11", "-O2", "-g",
    "-ffreestanding", "-fno-pic", "-fno-pie", "-mcmodel=small", "-march=x86-64", "-mtune=generic",
    # Ring-0 code runs in the host's instruction emulator on PVM: no SSE/AVX state,
    # no CET endbr64, no red zone (interrupts use the same stack in ring 0).
    "-mno-red-zone", "-mgeneral-regs-only", "-fcf-protection=none",
    "-fno-stack-protector", "-fno-asynchronous-unwind-tables", "-fno-common",
    # Keep gcc from turning memset/memcpy loops into calls to themselves.
    "-fno-tree-loop-distribute-patterns",
    "-Wall", "-Wextra", "-Werror",
)
LDFLAGS = (
    "-nostdlib", "-static", "-no-pie",
    "-Wl,--build-id=none", "-Wl,-z,max-page-size=0x1000", "-Wl,-z,noexecstack",
)


class GuestBuildError(RuntimeError):
    """The test guest could not be built."""


def guest_sources() -> list[Path]:
    """The C and assembly files compiled into the guest, in a stable order."""
    files: list[Path] = []
    for sub in SOURCE_DIRS:
        files.extend(sorted((GUEST_DIR / sub).glob("*.c")))
        files.extend(sorted((GUEST_DIR / sub).glob("*.S")))
    return files


def _hashed_files() -> list[Path]:
    return sorted(p for p in GUEST_DIR.rglob("*")
                  if p.is_file() and p.suffix in HASHED_SUFFIXES and DEFAULT_OUT_DIR not in p.parents)


def _compiler_version(gcc: str) -> str:
    try:
        proc = subprocess.run([gcc, "--version"], capture_output=True, text=True, check=False)
    except OSError as exc:
        raise GuestBuildError(f"cannot run {gcc}: {exc}") from exc
    if proc.returncode != 0:
        raise GuestBuildError(f"{gcc} --version failed: {proc.stderr.strip()}")
    return proc.stdout.splitlines()[0] if proc.stdout else ""


def _build_key(gcc: str) -> str:
    h = hashlib.sha256()
    h.update(_compiler_version(gcc).encode())
    h.update("\0".join(CFLAGS + LDFLAGS).encode())
    for path in _hashed_files():
        h.update(str(path.relative_to(GUEST_DIR)).encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _check_image(path: Path) -> None:
    """Refuse an ELF that would break the boot contract (wrong class, entry or load address, too big)."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise GuestBuildError(f"{path}: not a little-endian ELF64 file")
    (e_type, e_machine, _, e_entry, e_phoff, _, _, _, e_phentsize, e_phnum) = struct.unpack_from(
        "<HHIQQQIHHH", data, 16)
    if e_type != 2 or e_machine != 62:
        raise GuestBuildError(f"{path}: not an x86_64 executable (type {e_type}, machine {e_machine})")
    loads = []
    for i in range(e_phnum):
        p_type, _, _, _, p_paddr, _, p_memsz, _ = struct.unpack_from("<IIQQQQQQ", data, e_phoff + i * e_phentsize)
        if p_type == 1:
            loads.append((p_paddr, p_memsz))
    if not loads:
        raise GuestBuildError(f"{path}: no PT_LOAD segment")
    low = min(a for a, _ in loads)
    high = max(a + n for a, n in loads)
    if low != LOAD_ADDR or e_entry != LOAD_ADDR:
        raise GuestBuildError(f"{path}: loads at {low:#x}, entry {e_entry:#x}; both must be {LOAD_ADDR:#x}")
    if high - low > MAX_IMAGE_BYTES:
        raise GuestBuildError(f"{path}: image spans {high - low} bytes, over {MAX_IMAGE_BYTES}")


def _prune(out_dir: Path, keep: Path) -> None:
    builds = [d for d in out_dir.iterdir() if d.is_dir() and (d / IMAGE_NAME).exists() and d != keep]
    builds.sort(key=lambda d: d.stat().st_mtime, reverse=True)
    for old in builds[KEEP_BUILDS - 1:]:
        shutil.rmtree(old, ignore_errors=True)


def build_testguest(out_dir: Path | None = None, *, gcc: str = "gcc") -> Path:
    """Build (or reuse) testguest.elf and return its path.

    Raises GuestBuildError with gcc's output when compilation or linking fails.
    """
    out_dir = Path(out_dir) if out_dir is not None else DEFAULT_OUT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    key = _build_key(gcc)
    target_dir = out_dir / key
    target = target_dir / IMAGE_NAME
    if target.exists():
        return target

    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as tmp:
        tmp_elf = Path(tmp) / IMAGE_NAME
        cmd = [gcc, *CFLAGS, "-I", str(INCLUDE_DIR), *LDFLAGS, "-T", str(LINKER_SCRIPT),
               "-o", str(tmp_elf), *(str(s) for s in guest_sources())]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=GUEST_DIR)
        except OSError as exc:
            raise GuestBuildError(f"cannot run {gcc}: {exc}") from exc
        if proc.returncode != 0:
            raise GuestBuildError(
                f"building the test guest failed (gcc exit {proc.returncode}):\n"
                f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
        _check_image(tmp_elf)
        # Publish atomically: a concurrent build of the same key ends with the same bytes.
        staged = Path(tmp) / key
        staged.mkdir()
        os.replace(tmp_elf, staged / IMAGE_NAME)
        try:
            os.replace(staged, target_dir)
        except OSError:
            if not target.exists():
                raise
    _prune(out_dir, target_dir)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help=f"output directory (default {DEFAULT_OUT_DIR})")
    args = parser.parse_args(argv)
    try:
        print(build_testguest(args.out))
    except GuestBuildError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

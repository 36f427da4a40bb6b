"""Helpers for the snapshot tests: guest-like memory contents, saving a guest."""

from __future__ import annotations

import os
import random
import sys
import sysconfig
from pathlib import Path

from snapshot import MemoryFileLayout, write_memory_file, write_state
from vmm.memory import GuestMemory

PAGE = 4096
MiB = 1 << 20


def _corpus_files() -> list[Path]:
    """Files whose bytes look like what a guest keeps in RAM: ELF code, text, bytecode."""
    stdlib = Path(os.path.dirname(os.__file__))
    files = [Path(sys.executable).resolve()]
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        files += sorted(Path(libdir).glob("libpython*.so*"))
    files += sorted(stdlib.glob("*.py"))
    files += sorted(stdlib.glob("__pycache__/*.pyc"))
    return [f for f in files if f.is_file()]


_CORPUS: bytes | None = None


def corpus(size: int) -> bytes:
    """`size` bytes (page multiple) of guest-like content: code, text, bytecode,
    plus 1/8 random pages (already-compressed or encrypted data)."""
    global _CORPUS
    if _CORPUS is None:
        parts = []
        total = 0
        for f in _corpus_files():
            data = f.read_bytes()
            data += bytes(-len(data) % PAGE)  # files sit page-aligned in a page cache
            parts.append(data)
            total += len(data)
            if total > 96 * MiB:
                break
        _CORPUS = b"".join(parts)
    rng = random.Random(size)
    out = bytearray()
    pos = 0
    while len(out) < size:
        if rng.random() < 0.125:
            out += rng.randbytes(PAGE)
        else:
            out += _CORPUS[pos:pos + PAGE]
            pos = (pos + PAGE) % (len(_CORPUS) - PAGE)
    return bytes(out[:size])


def pattern_page(index: int) -> bytes:
    """A recognisable, non-zero, per-page pattern."""
    return (index.to_bytes(8, "little") + b"EMBERPG!") * (PAGE // 16)


def layout_of(mem: GuestMemory) -> MemoryFileLayout:
    return MemoryFileLayout.contiguous([(r.guest_addr, r.size) for r in mem.regions])


def save_guest(mem: GuestMemory, directory: Path, name: str = "vm", tree: object = None) -> tuple[Path, Path]:
    """Write a state file and a full memory file for `mem`; returns (state, memory)."""
    layout = layout_of(mem)
    state = directory / f"{name}.state"
    memory = directory / f"{name}.mem"
    write_state(state, tree if tree is not None else {"name": name, "memory": layout.to_tree()})
    write_memory_file(memory, layout, [r.mapping for r in mem.regions])
    return state, memory

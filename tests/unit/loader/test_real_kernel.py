"""Load real Linux kernels when the machine has some; skip otherwise.

Looked for: /boot/vmlinuz-*, the kernels Ember built ($EMBER_HOME/kernel/*/vmlinux),
and any paths in $EMBER_TEST_KERNELS (os.pathsep-separated).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from vmm.loader import HIMEM_START, load_kernel, parse_setup_header
from vmm.memory import GuestMemory


def _candidates() -> list[Path]:
    found: list[Path] = []
    found += sorted(Path("/boot").glob("vmlinuz-*"))
    cache = Path(os.environ.get("EMBER_HOME") or Path.home() / ".cache" / "ember")
    found += sorted(cache.glob("kernel/*/vmlinux"))
    for entry in os.environ.get("EMBER_TEST_KERNELS", "").split(os.pathsep):
        if entry:
            found.append(Path(entry))
    return [p for p in found if p.is_file() and os.access(p, os.R_OK) and p.stat().st_size > 0x1000]


KERNELS = _candidates()


@pytest.mark.skipif(not KERNELS, reason="no Linux kernel image on this machine")
@pytest.mark.parametrize("path", KERNELS, ids=lambda p: p.name)
def test_loads_real_kernel(path):
    mem = GuestMemory.anonymous([(0, 512 << 20)])
    try:
        result = load_kernel(mem, str(path))
        with open(path, "rb") as f:
            head = f.read(0x290)
            if head[:4] == b"\x7fELF":
                # First PT_LOAD's first bytes must be at the reported load address.
                (phoff,) = struct.unpack_from("<Q", head, 32)
                f.seek(phoff)
                p_type, _, p_offset, _, p_paddr, *_ = struct.unpack("<IIQQQQQQ", f.read(56))
                assert p_type == 1
                assert result.kernel_load == p_paddr >= HIMEM_START
                f.seek(p_offset)
                assert mem.read(p_paddr, 4096) == f.read(4096)
                assert result.kernel_load <= result.entry_64 < result.kernel_end
                if result.pvh_entry is not None:
                    assert result.kernel_load <= result.pvh_entry < result.kernel_end
            else:
                hdr = parse_setup_header(result.setup_header)
                assert result.kernel_load == HIMEM_START
                assert result.entry_64 == HIMEM_START + 0x200
                assert result.kernel_end >= hdr.pref_address + hdr.init_size
                f.seek(hdr.setup_size)
                assert mem.read(HIMEM_START, 4096) == f.read(4096)
    finally:
        mem.close()

"""Two-instruction guests for benchmarks, assembled with gcc at run time.

`first`: its very first instruction writes the boot-timer magic (so the
VMM's Guest-boot-time is "VMM start -> first guest instruction"), then it
resets the machine through the i8042. `idle`: halts with interrupts on and
never wakes (no interrupt source is armed), so the VMM sits idle for memory
measurements.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"

SOURCES = {
    "first": r"""
        .code64
        .globl _start
    _start:
        movabs $0xd0000000, %rax   /* boot timer (Firecracker's magic 123) */
        movb $123, (%rax)
        mov $0xfe, %al             /* i8042 reset: the VMM exits 0 */
        out %al, $0x64
    1:  hlt
        jmp 1b
    """,
    "idle": r"""
        .code64
        .globl _start
    _start:
        movabs $0xd0000000, %rax
        movb $123, (%rax)
        sti
    1:  hlt
        jmp 1b
    """,
}


def build(name: str) -> Path:
    src = SOURCES[name]
    key = hashlib.sha256(src.encode()).hexdigest()[:12]
    out = OUT / f"{name}-{key}.elf"
    if out.exists():
        return out
    OUT.mkdir(parents=True, exist_ok=True)
    s = OUT / f"{name}-{key}.S"
    s.write_text(src)
    subprocess.run(["gcc", "-nostdlib", "-static", "-Wl,-Ttext=0x200000", "-Wl,--build-id=none",
                    "-Wl,-z,noexecstack", "-o", str(out), str(s)], check=True)
    return out

"""A classic-BPF interpreter over `struct seccomp_data`, to check compiled filters without installing them.

It runs the program the way the kernel's seccomp does (linux/filter.h
opcodes, 32-bit accumulator and index register, 16 scratch words) and
refuses anything a seccomp program may not contain, so a test can ask
"what does this program answer for (nr, arch, args)?" for thousands of
calls in a second.
"""

from __future__ import annotations

import struct

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
X32_SYSCALL_BIT = 0x4000_0000
_U32 = 0xFFFF_FFFF

# linux/bpf_common.h
_LD, _LDX, _ST, _STX, _ALU, _JMP, _RET, _MISC = range(8)
_W, _ABS, _IMM, _MEM = 0x00, 0x20, 0x00, 0x60
_K, _X = 0x00, 0x08


class BpfFault(Exception):
    """The program does something the kernel would have refused or that ends outside it."""


def seccomp_data(nr: int, args: tuple[int, ...] = (), arch: int = AUDIT_ARCH_X86_64, ip: int = 0) -> bytes:
    full = (tuple(args) + (0,) * 6)[:6]
    return struct.pack("<iIQ6Q", nr, arch, ip, *full)


def run(code: bytes, data: bytes, max_steps: int = 100_000) -> int:
    """The program's return value for `data`."""
    insns = [struct.unpack_from("<HBBI", code, off) for off in range(0, len(code), 8)]
    a = x = 0
    mem = [0] * 16
    pc = 0
    for _ in range(max_steps):
        if not 0 <= pc < len(insns):
            raise BpfFault(f"pc {pc} outside the program")
        op, jt, jf, k = insns[pc]
        cls = op & 0x07
        if cls == _LD:
            mode = op & 0xE0
            if op & 0x18 != _W:
                raise BpfFault(f"seccomp programs load words only (op {op:#x})")
            if mode == _ABS:
                if k % 4 or k + 4 > len(data):
                    raise BpfFault(f"bad load offset {k}")
                a = struct.unpack_from("<I", data, k)[0]
            elif mode == _IMM:
                a = k
            elif mode == _MEM:
                a = mem[k]
            else:
                raise BpfFault(f"unsupported load mode {op:#x}")
        elif cls == _LDX:
            mode = op & 0xE0
            if mode == _IMM:
                x = k
            elif mode == _MEM:
                x = mem[k]
            else:
                raise BpfFault(f"unsupported ldx mode {op:#x}")
        elif cls == _ST:
            mem[k] = a
        elif cls == _STX:
            mem[k] = x
        elif cls == _ALU:
            src = x if op & 0x08 else k
            alu = op & 0xF0
            if alu == 0x00:
                a = (a + src) & _U32
            elif alu == 0x10:
                a = (a - src) & _U32
            elif alu == 0x40:
                a |= src
            elif alu == 0x50:
                a &= src
            elif alu == 0x60:
                a = (a << src) & _U32
            elif alu == 0x70:
                a >>= src
            elif alu == 0xA0:
                a ^= src
            elif alu == 0x80:
                a = (-a) & _U32
            else:
                raise BpfFault(f"unsupported alu op {op:#x}")
        elif cls == _JMP:
            jmp = op & 0xF0
            src = x if op & 0x08 else k
            if jmp == 0x00:
                pc += 1 + k
                continue
            taken = {0x10: a == src, 0x20: a > src, 0x30: a >= src, 0x40: bool(a & src)}.get(jmp)
            if taken is None:
                raise BpfFault(f"unsupported jump {op:#x}")
            pc += 1 + (jt if taken else jf)
            continue
        elif cls == _RET:
            return a if op & 0x18 == 0x10 else k
        elif cls == _MISC:
            if op & 0xF8 == 0x00:
                x = a
            elif op & 0xF8 == 0x80:
                a = x
            else:
                raise BpfFault(f"unsupported misc op {op:#x}")
        else:
            raise BpfFault(f"unknown class in {op:#x}")
        pc += 1
    raise BpfFault("the program did not return")

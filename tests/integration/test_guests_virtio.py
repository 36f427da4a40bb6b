"""Ember's virtio devices end to end, driven by the test guest's virtio driver.

The test guest (tests/guests; docs/test-guests.md) has a small virtio-mmio
driver (lib/virtio.c) and three modes that use it: `vblk`, `vnet`, `vsock`.
This file checks them in two ways:

* **Against mock devices, on the host (no KVM).** The driver and the modes
  are compiled for the host with -DTG_HOST_TEST (register accesses, interrupt
  routing and sleeping become hooks) into a shared library. The mock devices
  below implement the device side of the virtio 1.1 spec (virtio-mmio
  registers §4.2.2, split virtqueues §2.6, block §5.2, net §5.1, vsock §5.10)
  over the library's memory, so the driver's requests, its checks of what a
  device returns, and its flow control are tested before and independently of
  Ember's VMM. Misbehaving mocks check that a bad device ends the test with
  FAIL, never a hang.
* **In real microVMs (`kvm`).** `ember-vmm --no-api --config-file` with
  `drives` (temporary files), `network-interfaces` (a TAP device in a network
  namespace this test creates) and `vsock` (Unix sockets in a temporary
  directory, Firecracker's hybrid design). While the VMM refuses a device
  ("... is not supported yet"), its test is skipped with that message.
"""

from __future__ import annotations

import collections
import ctypes
import hashlib
import json
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
GUEST_DIR = REPO_ROOT / "tests" / "guests"
SECTOR = 512

# --- virtio constants (virtio 1.1), device side -------------------------------------

MMIO_BASE, MMIO_WINDOW, GSI_BASE = 0xD000_1000, 0x1000, 5
MAGIC = 0x74726976  # §4.2.2 "virt"
STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK = 1, 2, 4, 8  # §2.1
F_VERSION_1 = 1 << 32  # §6
INT_VRING = 1  # §4.2.2 InterruptStatus
DESC_F_NEXT, DESC_F_WRITE, DESC_F_INDIRECT = 1, 2, 4  # §2.6.5

ID_NET, ID_BLOCK, ID_VSOCK = 1, 2, 19
BLK_F_RO, BLK_F_BLK_SIZE, BLK_F_FLUSH = 1 << 5, 1 << 6, 1 << 9  # §5.2.3
BLK_T_IN, BLK_T_OUT, BLK_T_FLUSH, BLK_T_GET_ID = 0, 1, 4, 8  # §5.2.6
BLK_S_OK, BLK_S_IOERR, BLK_S_UNSUPP = 0, 1, 2
NET_F_MAC = 1 << 5  # §5.1.3
NET_HDR_LEN = 12  # §5.1.6 with VIRTIO_F_VERSION_1
VSOCK_HDR = struct.Struct("<QQIIIHHIII")  # §5.10.6 struct virtio_vsock_hdr, 44 bytes
(OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST) = range(1, 8)
VSOCK_TYPE_STREAM, SHUTDOWN_BOTH = 1, 3
ETHERTYPE_EMBER = 0x88B5


def blk_pattern(sector: int) -> bytes:
    """The vblk mode's write pattern for one sector (modes/vblk.c)."""
    return bytes((j * 7 + sector * 13 + 0x5A) & 0xFF for j in range(SECTOR))


# =====================================================================================
# The driver built for the host, and mock devices
# =====================================================================================

HARNESS_C = r"""
/* Host harness: runs the virtio modes against devices provided by Python callbacks. */
#include <setjmp.h>
#include <sys/mman.h>
#include <time.h>
#include "virtio.h"

int mode_vblk(void);
int mode_vnet(void);
int mode_vsock(void);

typedef u32 (*th_read_fn)(u64 addr, u32 size);
typedef void (*th_write_fn)(u64 addr, u32 size, u32 value);
typedef u32 (*th_sleep_fn)(void);

static th_read_fn cb_read;
static th_write_fn cb_write;
static th_sleep_fn cb_sleep;
static jmp_buf fail_env;
static char out[1 << 20];
static size_t out_len;
static char cmdline_buf[4096];
static u64 arena_base, arena_size, arena_used, tsc_hz;
static struct { unsigned vector; tg_irq_handler_t fn; } routes[32];

const char *tg_cmdline = cmdline_buf;
const char *tg_mode_name = "none";
tg_spinlock_t tg_console_lock;

u32 tg_host_mmio_read(u64 addr, unsigned size) { return cb_read(addr, size); }
void tg_host_mmio_write(u64 addr, unsigned size, u32 value) { cb_write(addr, size, value); }

void tg_host_irq_route(unsigned gsi, unsigned vector, tg_irq_handler_t fn) {
    if (gsi < 32) {
        routes[gsi].vector = vector;
        routes[gsi].fn = fn;
    }
}

void tg_host_sleep(void) {
    u32 raised = cb_sleep();
    for (unsigned g = 0; g < 32; g++)
        if (((raised >> g) & 1) && routes[g].fn)
            routes[g].fn(routes[g].vector);
}

void tg_console_write(const char *s, size_t n) {
    if (n > sizeof(out) - 1 - out_len)
        n = sizeof(out) - 1 - out_len;
    memcpy(out + out_len, s, n);
    out_len += n;
    out[out_len] = 0;
}

void tg_fail(const char *fmt, ...) {
    char reason[400];
    va_list ap;
    va_start(ap, fmt);
    tg_vsnprintf(reason, sizeof(reason), fmt, ap);
    va_end(ap);
    tg_printf("TESTGUEST %s FAIL %s\n", tg_mode_name, reason);
    longjmp(fail_env, 1);
}

const char *tg_cmdline_get(const char *key, char *buf, size_t size) {
    size_t klen = strlen(key);
    const char *p = tg_cmdline;
    while (*p) {
        while (*p == ' ')
            p++;
        const char *word = p;
        while (*p && *p != ' ')
            p++;
        if ((size_t)(p - word) > klen && strncmp(word, key, klen) == 0 && word[klen] == '=') {
            size_t n = (size_t)(p - word - klen - 1);
            if (n >= size)
                n = size - 1;
            memcpy(buf, word + klen + 1, n);
            buf[n] = 0;
            return buf;
        }
    }
    return NULL;
}

u64 tg_cmdline_u64(const char *key, u64 def) {
    char buf[32];
    return tg_cmdline_get(key, buf, sizeof(buf)) ? tg_strtou64(buf, NULL) : def;
}

void *tg_alloc_pages(unsigned n) {
    u64 size = (u64)n * 4096;
    if (arena_used + size > arena_size)
        tg_fail("host harness: arena exhausted");
    void *p = (void *)(arena_base + arena_used);
    arena_used += size;
    memset(p, 0, size);
    return p;
}

static u64 now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (u64)ts.tv_sec * 1000000000ull + (u64)ts.tv_nsec;
}

u64 tg_tsc_hz(void) { return tsc_hz; }
u64 tg_deadline_us(u64 us) { return rdtsc() + us * (tsc_hz / 1000000); }

/* Sets the callbacks, maps the page arena and calibrates the TSC; returns the arena's address. */
u64 th_init(th_read_fn r, th_write_fn w, th_sleep_fn s, u64 size) {
    cb_read = r;
    cb_write = w;
    cb_sleep = s;
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return 0;
    arena_base = (u64)p;
    arena_size = size;
    u64 t0 = now_ns(), c0 = rdtsc();
    while (now_ns() - t0 < 20000000ull)
        ;
    u64 t1 = now_ns(), c1 = rdtsc();
    tsc_hz = (c1 - c0) * 1000000000ull / (t1 - t0);
    return arena_base;
}

/* Runs one mode: 0 = PASS, 1 = FAIL (the reason is in the output). */
int th_run(const char *mode, const char *cmdline) {
    static int (*const fns[])(void) = { mode_vblk, mode_vnet, mode_vsock };
    static const char *const names[] = { "vblk", "vnet", "vsock" };
    size_t n = strlen(cmdline);
    if (n >= sizeof(cmdline_buf))
        n = sizeof(cmdline_buf) - 1;
    memcpy(cmdline_buf, cmdline, n);
    cmdline_buf[n] = 0;
    tg_mode_name = mode;
    for (unsigned i = 0; i < 3; i++) {
        if (strcmp(mode, names[i]) != 0)
            continue;
        if (setjmp(fail_env))
            return 1;
        tg_printf("TESTGUEST %s START\n", mode);
        int rc = fns[i]();
        if (rc)
            tg_fail("mode returned %d", rc);
        tg_printf("TESTGUEST %s PASS\n", mode);
        return 0;
    }
    return 2;
}

const char *th_output(void) { return out; }
"""

HOST_SOURCES = ("lib/virtio.c", "lib/printf.c", "lib/string.c", "modes/vblk.c", "modes/vnet.c", "modes/vsock.c")
HOST_CFLAGS = ("-std=gnu11", "-O1", "-g", "-fPIC", "-shared", "-DTG_HOST_TEST", "-fno-tree-loop-distribute-patterns",
               "-fno-builtin", "-Wall", "-Wextra", "-Werror", "-Wl,-z,defs")


@pytest.fixture(scope="session")
def host_driver_lib(tmp_path_factory) -> Path:
    """The virtio driver and modes compiled for the host (cached per source hash)."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the host harness")
    h = hashlib.sha256(HARNESS_C.encode())
    for rel in HOST_SOURCES + ("include/tg.h", "include/tg_layout.h", "include/virtio.h"):
        h.update((GUEST_DIR / rel).read_bytes())
    out_dir = tmp_path_factory.mktemp("virtio-host")
    src = out_dir / "harness.c"
    src.write_text(HARNESS_C)
    lib = out_dir / f"vharness-{h.hexdigest()[:12]}.so"
    cmd = ["gcc", *HOST_CFLAGS, "-I", str(GUEST_DIR / "include"), "-o", str(lib), str(src),
           *(str(GUEST_DIR / s) for s in HOST_SOURCES)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"host build of the virtio driver failed:\n{' '.join(cmd)}\n{proc.stderr}"
    return lib


class DeviceError(AssertionError):
    """The driver did something the virtio spec forbids (seen by a mock device)."""


READ_FN = ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_uint64, ctypes.c_uint32)
WRITE_FN = ctypes.CFUNCTYPE(None, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint32)
SLEEP_FN = ctypes.CFUNCTYPE(ctypes.c_uint32)
ARENA_BYTES = 64 << 20


class Arena:
    """The harness's page arena: the 'guest memory' the mock devices read and write."""

    def __init__(self, base: int, size: int):
        self.base, self.size = base, size

    def _check(self, addr: int, n: int) -> None:
        if not (self.base <= addr and addr + n <= self.base + self.size):
            raise DeviceError(f"driver gave address {addr:#x}+{n} outside guest memory")

    def read(self, addr: int, n: int) -> bytes:
        self._check(addr, n)
        # SAFETY: [addr, addr+n) lies inside the harness's mmap'd arena (checked above),
        # which stays mapped for the life of the loaded library.
        return ctypes.string_at(addr, n)

    def write(self, addr: int, data: bytes) -> None:
        self._check(addr, len(data))
        # SAFETY: as in read(): the destination range is inside the live arena.
        ctypes.memmove(addr, data, len(data))

    def u16(self, addr: int) -> int:
        return struct.unpack("<H", self.read(addr, 2))[0]


@dataclass
class Chain:
    """A descriptor chain popped from an available ring (§2.6.5)."""

    head: int
    readable: list[tuple[int, int]]  # (addr, len), device-readable, in order
    writable: list[tuple[int, int]]  # device-writable, after the readable ones

    def read_all(self, mem: Arena) -> bytes:
        return b"".join(mem.read(a, n) for a, n in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(n for _, n in self.writable)

    def write(self, mem: Arena, data: bytes) -> int:
        """Scatter `data` over the writable buffers; returns the bytes written."""
        done = 0
        for addr, n in self.writable:
            if done == len(data):
                break
            k = min(n, len(data) - done)
            mem.write(addr, data[done:done + k])
            done += k
        if done < len(data):
            raise DeviceError(f"chain {self.head}: {len(data)} bytes do not fit {self.writable_len} writable bytes")
        return done


class MockQueue:
    """The device side of a split virtqueue (§2.6)."""

    def __init__(self, max_size: int = 256):
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        self.num, self.ready = 0, 0
        self.desc = self.avail = self.used = 0
        self.next_avail = self.next_used = 0

    def pop_all(self, mem: Arena) -> list[Chain]:
        avail_idx = mem.u16(self.avail + 2)
        if (avail_idx - self.next_avail) & 0xFFFF > self.num:
            raise DeviceError(f"avail->idx {avail_idx} runs past the ring (seen {self.next_avail}, size {self.num})")
        chains = []
        while self.next_avail != avail_idx:
            head = mem.u16(self.avail + 4 + 2 * (self.next_avail % self.num))
            chains.append(self._chain(mem, head))
            self.next_avail = (self.next_avail + 1) & 0xFFFF
        return chains

    def _chain(self, mem: Arena, head: int) -> Chain:
        chain, i = Chain(head, [], []), head
        for _ in range(self.num):
            if i >= self.num:
                raise DeviceError(f"descriptor index {i} out of range (queue size {self.num})")
            addr, length, flags, nxt = struct.unpack("<QIHH", mem.read(self.desc + 16 * i, 16))
            if flags & DESC_F_INDIRECT:
                raise DeviceError("indirect descriptor without VIRTIO_F_INDIRECT_DESC")
            if flags & DESC_F_WRITE:
                chain.writable.append((addr, length))
            elif chain.writable:
                raise DeviceError(f"chain {head}: device-readable descriptor after a device-writable one (§2.6.4.2)")
            else:
                chain.readable.append((addr, length))
            mem.read(addr, length)  # the buffer must lie in guest memory
            if not flags & DESC_F_NEXT:
                return chain
            i = nxt
        raise DeviceError(f"chain {head} is longer than the queue (a loop?)")

    def push(self, mem: Arena, head: int, written: int) -> None:
        mem.write(self.used + 4 + 8 * (self.next_used % self.num), struct.pack("<II", head, written))
        self.next_used = (self.next_used + 1) & 0xFFFF
        mem.write(self.used + 2, struct.pack("<H", self.next_used))


class MockDevice:
    """Base of the mock devices: what the transport needs from one."""

    device_id = 0
    features = F_VERSION_1
    num_queues = 1

    def __init__(self):
        self.queues = [MockQueue() for _ in range(self.num_queues)]
        self.mem: Arena | None = None
        self.transport: MockTransport | None = None

    def config(self) -> bytes:
        return b""

    def notify(self, queue: int) -> None:
        raise NotImplementedError

    def on_sleep(self) -> None:
        """The guest waits: host-side progress happens here."""

    def interrupt(self) -> None:
        self.transport.raise_interrupt(INT_VRING)


class MockTransport:
    """The virtio-mmio register file (§4.2.2) in front of a mock device."""

    VENDOR = 0x454D4252  # "EMBR"

    def __init__(self, device: MockDevice, mem: Arena, slot: int, version: int = 2):
        self.device, self.mem, self.slot, self.version = device, mem, slot, version
        device.mem, device.transport = mem, self
        self.status = self.isr = self.generation = 0
        self.dev_sel = self.drv_sel = self.queue_sel = 0
        self.driver_features = 0
        self.pending = False
        self.interrupts = 0

    @property
    def gsi(self) -> int:
        return GSI_BASE + self.slot

    def _queue(self) -> MockQueue | None:
        q = self.queue_sel
        return self.device.queues[q] if q < len(self.device.queues) else None

    def raise_interrupt(self, bit: int) -> None:
        self.isr |= bit
        self.pending = True
        self.interrupts += 1

    def read(self, off: int, size: int) -> int:
        if off >= 0x100:
            cfg = self.device.config()
            return int.from_bytes(cfg[off - 0x100:off - 0x100 + size].ljust(size, b"\0"), "little")
        if size != 4 or off % 4:
            raise DeviceError(f"{size}-byte read of register {off:#x}: §4.2.2 allows only 32-bit accesses")
        q = self._queue()
        regs = {
            0x000: MAGIC, 0x004: self.version, 0x008: self.device.device_id, 0x00C: self.VENDOR,
            0x010: (self.device.features >> (32 * self.dev_sel)) & 0xFFFFFFFF if self.dev_sel < 2 else 0,
            0x034: q.max_size if q else 0, 0x044: q.ready if q else 0,
            0x060: self.isr, 0x070: self.status, 0x0FC: self.generation,
        }
        if off not in regs:
            raise DeviceError(f"read of write-only or reserved register {off:#x}")
        return regs[off]

    def write(self, off: int, size: int, value: int) -> None:
        if size != 4 or off % 4 or off >= 0x100:
            raise DeviceError(f"{size}-byte write at {off:#x}: not a 32-bit register write")
        q = self._queue()
        if off == 0x014:
            self.dev_sel = value
        elif off == 0x020:
            if self.drv_sel < 2:
                shift = 32 * self.drv_sel
                self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)
        elif off == 0x024:
            self.drv_sel = value
        elif off == 0x030:
            self.queue_sel = value
        elif off == 0x050:
            if not self.status & STATUS_DRIVER_OK:
                raise DeviceError("queue notification before DRIVER_OK")
            self.device.notify(value)
        elif off == 0x064:
            self.isr &= ~value
        elif off == 0x070:
            self._set_status(value)
        elif q is None:
            raise DeviceError(f"queue register {off:#x} written with QueueSel {self.queue_sel} (no such queue)")
        elif off == 0x038:
            if value == 0 or value > q.max_size or value & (value - 1):
                raise DeviceError(f"QueueNum {value} (max {q.max_size}, must be a power of two)")
            q.num = value
        elif off == 0x044:
            q.ready = value
        elif off in (0x080, 0x084, 0x090, 0x094, 0x0A0, 0x0A4):
            name = {0x80: "desc", 0x90: "avail", 0xA0: "used"}[off & ~0xF]
            cur = getattr(q, name)
            new = (cur & ~0xFFFFFFFF) | value if off & 4 == 0 else (cur & 0xFFFFFFFF) | (value << 32)
            setattr(q, name, new)
        else:
            raise DeviceError(f"write of read-only or reserved register {off:#x}")

    def _set_status(self, value: int) -> None:
        if value == 0:
            self.status, self.isr, self.driver_features = 0, 0, 0
            for q in self.device.queues:
                q.reset()
            return
        if value & ~self.status & STATUS_FEATURES_OK:
            if self.driver_features & ~self.device.features:
                return  # refuse: FEATURES_OK does not stick
        if value & ~self.status & STATUS_DRIVER_OK:
            for i, q in enumerate(self.device.queues):
                if not q.ready:
                    raise DeviceError(f"DRIVER_OK with queue {i} not ready")
        self.status = value


class HostDriver:
    """The host-built driver library loaded fresh (its static state is per load)."""

    def __init__(self, lib_path: Path, tmp: Path, devices: list[MockDevice], version: int = 2):
        copy = tmp / f"vharness-{id(self)}.so"
        shutil.copy(lib_path, copy)
        # SAFETY: a private copy, so this load gets its own static state; the library is
        # never unloaded, so the arena and the callbacks it holds stay valid.
        self.lib = ctypes.CDLL(str(copy))
        self.lib.th_init.restype = ctypes.c_uint64
        self.lib.th_init.argtypes = [READ_FN, WRITE_FN, SLEEP_FN, ctypes.c_uint64]
        self.lib.th_run.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
        self.lib.th_output.restype = ctypes.c_char_p
        self.errors: list[BaseException] = []
        # SAFETY: the C side keeps these function pointers; self._cbs keeps the thunks alive
        # as long as this object, which outlives every th_run call.
        self._cbs = (READ_FN(self._read), WRITE_FN(self._write), SLEEP_FN(self._sleep))
        base = self.lib.th_init(*self._cbs, ARENA_BYTES)
        assert base, "the harness could not map its arena"
        self.mem = Arena(base, ARENA_BYTES)
        self.transports = [MockTransport(d, self.mem, i, version) for i, d in enumerate(devices)]

    def _transport(self, addr: int) -> tuple[MockTransport | None, int]:
        slot, off = divmod(addr - MMIO_BASE, MMIO_WINDOW)
        if addr < MMIO_BASE or slot >= len(self.transports):
            return None, off
        return self.transports[slot], off

    def _guard(self, fn: Callable, default):
        try:
            return fn()
        except BaseException as exc:  # surfaced after the run; C cannot unwind Python exceptions
            self.errors.append(exc)
            return default

    def _read(self, addr: int, size: int) -> int:
        t, off = self._transport(addr)
        return 0xFFFFFFFF if t is None else self._guard(lambda: t.read(off, size), 0xFFFFFFFF)

    def _write(self, addr: int, size: int, value: int) -> None:
        t, off = self._transport(addr)
        if t is None:
            self.errors.append(DeviceError(f"write to unclaimed MMIO {addr:#x}"))
            return
        self._guard(lambda: t.write(off, size, value), None)

    def _sleep(self) -> int:
        raised = 0
        for t in self.transports:
            if t.status & STATUS_DRIVER_OK:
                self._guard(t.device.on_sleep, None)
            if t.pending:
                t.pending = False
                raised |= 1 << t.gsi
        return raised

    def run(self, mode: str, cmdline: str = "") -> tuple[int, list[str]]:
        rc = self.lib.th_run(mode.encode(), f"mode={mode} {cmdline}".encode())
        lines = self.lib.th_output().decode().splitlines()
        if self.errors:
            raise self.errors[0]
        return rc, lines


def run_host(lib: Path, tmp: Path, devices: list[MockDevice], mode: str, cmdline: str = "",
             version: int = 2) -> tuple[int, list[str]]:
    return HostDriver(lib, tmp, devices, version).run(mode, cmdline)


def fail_line(lines: list[str], mode: str) -> str:
    return next((line for line in lines if line.startswith(f"TESTGUEST {mode} FAIL")), "")


# --- mock block device (§5.2) ------------------------------------------------------------


class MockBlock(MockDevice):
    device_id = ID_BLOCK

    def __init__(self, data: bytearray, read_only: bool = False, ident: bytes = b"mock-disk",
                 flush: bool = True, misbehave: str = ""):
        super().__init__()
        self.data, self.read_only, self.ident, self.misbehave = data, read_only, ident, misbehave
        self.features = F_VERSION_1 | BLK_F_BLK_SIZE | (BLK_F_RO if read_only else 0) | (BLK_F_FLUSH if flush else 0)
        self.requests: list[tuple[int, int, int]] = []  # (type, sector, status)

    def config(self) -> bytes:
        cfg = bytearray(0x18)
        struct.pack_into("<Q", cfg, 0, len(self.data) // SECTOR)
        struct.pack_into("<I", cfg, 0x14, 4096)
        return bytes(cfg)

    def notify(self, queue: int) -> None:
        if queue != 0:
            raise DeviceError(f"notification for queue {queue}; virtio-blk has one")
        q = self.queues[0]
        for chain in q.pop_all(self.mem):
            if self.misbehave == "silent":
                continue
            written = self._request(chain)
            head = q.num + 3 if self.misbehave == "bogus-id" else chain.head
            q.push(self.mem, head, written)
        if self.misbehave != "silent":
            self.interrupt()

    def _request(self, chain: Chain) -> int:
        out = chain.read_all(self.mem)
        if len(out) < 16 or not chain.writable or chain.writable[-1][1] < 1:
            raise DeviceError(f"malformed block request: {len(out)} readable bytes, writable {chain.writable}")
        rtype, _, sector = struct.unpack_from("<IIQ", out)
        data_in = chain.writable_len - 1  # the last writable byte is the status
        status, payload = BLK_S_OK, b""
        cap = len(self.data)
        if rtype == BLK_T_IN:
            if data_in % SECTOR or sector * SECTOR + data_in > cap:
                status = BLK_S_IOERR
            else:
                payload = bytes(self.data[sector * SECTOR:sector * SECTOR + data_in])
        elif rtype == BLK_T_OUT:
            body = out[16:]
            if self.read_only or len(body) % SECTOR or sector * SECTOR + len(body) > cap:
                status = BLK_S_IOERR
            else:
                self.data[sector * SECTOR:sector * SECTOR + len(body)] = body
        elif rtype == BLK_T_FLUSH:
            pass
        elif rtype == BLK_T_GET_ID:
            payload = self.ident[:20].ljust(20, b"\0")
        else:
            status = BLK_S_UNSUPP
        self.requests.append((rtype, sector, status))
        body = payload.ljust(data_in, b"\0") if status == BLK_S_OK else b"\0" * data_in
        chain.write(self.mem, body + bytes([status]))
        return len(payload) + 1


# --- mock network device (§5.1) -----------------------------------------------------------


def _inet_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ether(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def arp_request(src_mac: bytes, src_ip: bytes, target_ip: bytes) -> bytes:
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + src_mac + src_ip + b"\0" * 6 + target_ip
    return ether(b"\xff" * 6, src_mac, 0x0806, arp)


def icmp_echo(src_mac: bytes, dst_mac: bytes, src_ip: bytes, dst_ip: bytes, ident: int, seq: int,
              data: bytes) -> bytes:
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + data
    icmp = icmp[:2] + struct.pack("!H", _inet_checksum(icmp)) + icmp[4:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 1, 0, 64, 1, 0, src_ip, dst_ip)
    ip = ip[:10] + struct.pack("!H", _inet_checksum(ip)) + ip[12:]
    return ether(dst_mac, src_mac, 0x0800, ip + icmp)


class MockNet(MockDevice):
    device_id = ID_NET
    num_queues = 2
    HOST_MAC = bytes.fromhex("0a0000000001")
    HOST_IP = bytes([10, 0, 0, 1])

    def __init__(self, mac: bytes | None, guest_ip: bytes | None = None):
        super().__init__()
        self.mac, self.guest_ip = mac, guest_ip
        self.features = F_VERSION_1 | (NET_F_MAC if mac else 0)
        self.rx_chains: collections.deque[Chain] = collections.deque()
        self.to_guest: collections.deque[bytes] = collections.deque()
        self.from_guest: list[bytes] = []
        self.started = False

    def config(self) -> bytes:
        return (self.mac or b"\0" * 6) + struct.pack("<HHH", 1, 1, 1500)

    def notify(self, queue: int) -> None:
        q = self.queues[queue]
        if queue == 0:
            self.rx_chains.extend(q.pop_all(self.mem))
        elif queue == 1:
            for chain in q.pop_all(self.mem):
                pkt = chain.read_all(self.mem)
                if len(pkt) < NET_HDR_LEN + 14:
                    raise DeviceError(f"transmitted packet of {len(pkt)} bytes")
                self.from_guest.append(pkt[NET_HDR_LEN:])
                q.push(self.mem, chain.head, 0)
                self.interrupt()
                self._host_reacts(pkt[NET_HDR_LEN:])
        else:
            raise DeviceError(f"notification for queue {queue}")
        self._deliver()

    def _host_reacts(self, frame: bytes) -> None:
        if self.started or frame[12:14] != struct.pack("!H", ETHERTYPE_EMBER) or b"EMBER-VNET-PING" not in frame:
            return
        self.started = True
        src = frame[6:12]
        self.to_guest.append(ether(b"\xff" * 6, self.HOST_MAC, 0x86DD, b"\x60" + b"\0" * 60))  # noise: IPv6
        if self.guest_ip:
            self.to_guest.append(arp_request(self.HOST_MAC, self.HOST_IP, self.guest_ip))
            self.to_guest.append(icmp_echo(self.HOST_MAC, src, self.HOST_IP, self.guest_ip, 0x1234, 1, b"x" * 40))
        self.to_guest.append(ether(src, self.HOST_MAC, ETHERTYPE_EMBER, b"EMBER-HOST-PING 1".ljust(46, b"\0")))

    def _deliver(self) -> None:
        q = self.queues[0]
        while self.to_guest and self.rx_chains:
            chain = self.rx_chains.popleft()
            data = struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 1) + self.to_guest.popleft()
            q.push(self.mem, chain.head, chain.write(self.mem, data))
            self.interrupt()

    def on_sleep(self) -> None:
        self._deliver()


# --- mock vsock device (§5.10) ----------------------------------------------------------------


@dataclass
class HostConn:
    """The host end of one mock vsock stream."""

    host_port: int
    guest_port: int
    echo: bool
    established: bool = False
    closed: bool = False
    guest_buf_alloc: int = 0
    guest_fwd_cnt: int = 0
    tx_cnt: int = 0  # bytes sent to the guest
    rx_cnt: int = 0  # bytes received from the guest
    fwd_cnt: int = 0  # bytes the host has taken out of its buffer
    outq: bytearray = field(default_factory=bytearray)
    received: bytearray = field(default_factory=bytearray)
    to_send: bytes = b""
    shutdown_sent: bool = False
    got_rst: bool = False
    credit_updates_from_guest: int = 0


class MockVsock(MockDevice):
    device_id = ID_VSOCK
    num_queues = 3
    HOST_CID = 2
    BUF_ALLOC = 16384  # small: the guest must wait for credit
    MAX_PKT = 4096

    def __init__(self, cid: int, echo_ports: tuple[int, ...] = (), connect_to: int | None = None,
                 send: bytes = b"", overrun: bool = False):
        super().__init__()
        self.cid, self.echo_ports, self.connect_to, self.send, self.overrun = cid, echo_ports, connect_to, send, overrun
        self.rx_chains: collections.deque[Chain] = collections.deque()
        self.pkts: collections.deque[bytes] = collections.deque()
        self.conns: dict[tuple[int, int], HostConn] = {}
        self.rsts_for_unknown = 0
        self.credit_requests_sent = 0

    def config(self) -> bytes:
        return struct.pack("<Q", self.cid)

    def _hdr(self, c: HostConn, op: int, payload: bytes = b"", flags: int = 0) -> bytes:
        return VSOCK_HDR.pack(self.HOST_CID, self.cid, c.host_port, c.guest_port, len(payload), VSOCK_TYPE_STREAM,
                              op, flags, self.BUF_ALLOC, c.fwd_cnt) + payload

    def notify(self, queue: int) -> None:
        q = self.queues[queue]
        if queue == 0:
            self.rx_chains.extend(q.pop_all(self.mem))
        elif queue == 1:
            for chain in q.pop_all(self.mem):
                self._from_guest(chain.read_all(self.mem))
                q.push(self.mem, chain.head, 0)
                self.interrupt()
        elif queue == 2:
            q.pop_all(self.mem)  # event buffers: held, never used
        self._pump()

    def _from_guest(self, pkt: bytes) -> None:
        if len(pkt) < VSOCK_HDR.size:
            raise DeviceError(f"vsock packet of {len(pkt)} bytes")
        src_cid, dst_cid, sport, dport, length, typ, op, flags, buf_alloc, fwd_cnt = VSOCK_HDR.unpack_from(pkt)
        payload = pkt[VSOCK_HDR.size:]
        if (src_cid, dst_cid, typ) != (self.cid, self.HOST_CID, VSOCK_TYPE_STREAM) or len(payload) != length:
            raise DeviceError(f"bad vsock header: cids {src_cid}->{dst_cid} type {typ} len {length}/{len(payload)}")
        c = self.conns.get((dport, sport))
        if op == OP_REQUEST:
            if dport in self.echo_ports and c is None:
                c = self.conns[(dport, sport)] = HostConn(dport, sport, echo=True, established=True)
                c.guest_buf_alloc, c.guest_fwd_cnt = buf_alloc, fwd_cnt
                self.pkts.append(self._hdr(c, OP_RESPONSE))
                self.pkts.append(self._hdr(c, OP_CREDIT_REQUEST))  # the guest must answer with CREDIT_UPDATE
                self.credit_requests_sent += 1
            else:
                self.pkts.append(VSOCK_HDR.pack(self.HOST_CID, self.cid, dport, sport, 0, 1, OP_RST, 0, 0, 0))
            return
        if c is None or c.closed:
            if op != OP_RST:
                self.rsts_for_unknown += 1
            return
        c.guest_buf_alloc, c.guest_fwd_cnt = buf_alloc, fwd_cnt
        if op == OP_RESPONSE:
            c.established = True
            c.outq += c.to_send
        elif op == OP_RW:
            credit = self.BUF_ALLOC - (c.rx_cnt - c.fwd_cnt)
            if length > credit:
                raise DeviceError(f"guest sent {length} bytes with {credit} bytes of host credit")
            c.rx_cnt += length
            c.received += payload
            if c.echo:
                c.outq += payload
            else:
                c.fwd_cnt += length
        elif op == OP_CREDIT_UPDATE:
            c.credit_updates_from_guest += 1
        elif op == OP_CREDIT_REQUEST:
            self.pkts.append(self._hdr(c, OP_CREDIT_UPDATE))
        elif op == OP_SHUTDOWN:
            self.pkts.append(self._hdr(c, OP_RST))
            c.closed = True
        elif op == OP_RST:
            c.got_rst, c.closed = True, True
        else:
            raise DeviceError(f"unexpected op {op} from the guest")

    def _pump(self) -> None:
        if self.connect_to is not None and self.rx_chains and not self.conns:
            c = self.conns[(1234, self.connect_to)] = HostConn(1234, self.connect_to, echo=False, to_send=self.send)
            self.pkts.append(self._hdr(c, OP_REQUEST))
        for c in self.conns.values():
            if not c.established or c.closed:
                continue
            while c.outq:
                credit = c.guest_buf_alloc - (c.tx_cnt - c.guest_fwd_cnt)
                n = min(len(c.outq), self.MAX_PKT, len(c.outq) if self.overrun else credit)
                if n <= 0:
                    break
                chunk = bytes(c.outq[:n])
                del c.outq[:n]
                c.tx_cnt += n
                if c.echo:
                    c.fwd_cnt += n  # echoed: out of the host's buffer
                self.pkts.append(self._hdr(c, OP_RW, chunk))
            if not c.echo and not c.shutdown_sent and len(c.received) == len(c.to_send) and c.tx_cnt == len(c.to_send):
                c.shutdown_sent = True
                self.pkts.append(self._hdr(c, OP_SHUTDOWN, flags=SHUTDOWN_BOTH))
        q = self.queues[0]
        while self.pkts and self.rx_chains:
            chain = self.rx_chains.popleft()
            q.push(self.mem, chain.head, chain.write(self.mem, self.pkts.popleft()))
            self.interrupt()

    def on_sleep(self) -> None:
        self._pump()


# =====================================================================================
# Host-side tests of the driver (no KVM)
# =====================================================================================


def _disk(sectors: int, seed: int) -> bytearray:
    return bytearray(random.Random(seed).randbytes(sectors * SECTOR))


def test_vblk_mode_against_mock_devices(host_driver_lib, tmp_path):
    rw, ro = _disk(256, 1), _disk(16, 2)
    ro_before, rw_before = bytes(ro), bytes(rw)
    devices = [MockBlock(rw, ident=b"rootfs"), MockBlock(ro, read_only=True, ident=b"x" * 20)]
    rc, lines = run_host(host_driver_lib, tmp_path, devices, "vblk",
                         "vblk.sectors=100 vblk.write_sector=10 vblk.write_count=3 vblk.timeout_ms=2000")
    assert rc == 0, "\n".join(lines)
    assert f"VBLK READ sectors=100 sum={zlib.crc32(rw_before[:100 * SECTOR]):08x}" in lines
    assert "VBLK ID 0 rootfs" in lines and "VBLK ID 1 " + "x" * 20 in lines
    assert "VBLK BEYOND status=IOERR" in lines and "VBLK UNSUPP status=UNSUPP" in lines
    assert "VBLK WRITE 0 sector=10 count=3 ok" in lines and "VBLK FLUSH 0 status=OK" in lines
    assert "VBLK RO 1 write status=IOERR" in lines
    assert bytes(rw[10 * SECTOR:13 * SECTOR]) == b"".join(blk_pattern(s) for s in (10, 11, 12))
    assert bytes(rw[:10 * SECTOR]) == rw_before[:10 * SECTOR] and bytes(rw[13 * SECTOR:]) == rw_before[13 * SECTOR:]
    assert bytes(ro) == ro_before
    assert any(r[0] == BLK_T_FLUSH for r in devices[0].requests)
    irqs = int(re.search(r"^VBLK IRQS (\d+)$", "\n".join(lines), re.M).group(1))
    assert 0 < irqs <= sum(d.transport.interrupts for d in devices)  # edges coalesce while the guest works


def test_vblk_fails_cleanly_on_bad_used_id(host_driver_lib, tmp_path):
    rc, lines = run_host(host_driver_lib, tmp_path, [MockBlock(_disk(8, 3), misbehave="bogus-id")], "vblk")
    assert rc == 1
    assert "not the head of a chain in flight" in fail_line(lines, "vblk"), lines


def test_vblk_times_out_on_a_silent_device(host_driver_lib, tmp_path):
    start = time.monotonic()
    rc, lines = run_host(host_driver_lib, tmp_path, [MockBlock(_disk(8, 4), misbehave="silent")], "vblk",
                         "vblk.timeout_ms=200")
    assert rc == 1 and "still pending after 200 ms" in fail_line(lines, "vblk"), lines
    assert time.monotonic() - start < 5


def test_driver_refuses_legacy_and_featureless_devices(host_driver_lib, tmp_path):
    rc, lines = run_host(host_driver_lib, tmp_path, [MockBlock(_disk(8, 5))], "vblk", version=1)
    assert rc == 1 and "only the modern interface" in fail_line(lines, "vblk"), lines
    legacy_only = MockBlock(_disk(8, 5))
    legacy_only.features = BLK_F_FLUSH
    rc, lines = run_host(host_driver_lib, tmp_path, [legacy_only], "vblk")
    assert rc == 1 and "lacking required 0x100000000" in fail_line(lines, "vblk"), lines


def test_vnet_mode_against_a_mock_device(host_driver_lib, tmp_path):
    mac = bytes.fromhex("06000a000002")
    net = MockNet(mac, guest_ip=bytes([10, 0, 0, 2]))
    disk = MockBlock(_disk(8, 6))  # a device before the NIC: slot 1, GSI 6
    rc, lines = run_host(host_driver_lib, tmp_path, [disk, net], "vnet", "vnet.ip=10.0.0.2 vnet.timeout_ms=3000")
    assert rc == 0, "\n".join(lines)
    assert any(line.startswith("VNET MAC 06:00:0a:00:00:02") for line in lines)
    assert "VNET HOST-PING EMBER-HOST-PING 1" in lines
    assert any(line.startswith("VNET DONE") and "arp=1 icmp=1" in line for line in lines), lines
    rx = [line for line in lines if line.startswith("VNET RX ")]
    assert len(rx) == 4 and rx[0].split()[2] == str(14 + 61)
    frames = net.from_guest
    ping = frames[0]
    assert ping[:6] == b"\xff" * 6 and ping[6:12] == mac and ping[12:14] == b"\x88\xb5"
    assert ping[14:].startswith(b"EMBER-VNET-PING 1")
    arp = next(f for f in frames if f[12:14] == b"\x08\x06")
    assert arp[:6] == MockNet.HOST_MAC and struct.unpack("!H", arp[20:22])[0] == 2
    assert arp[22:28] == mac and arp[28:32] == bytes([10, 0, 0, 2]) and arp[38:42] == MockNet.HOST_IP
    reply = next(f for f in frames if f[12:14] == b"\x08\x00")
    ip = reply[14:34]
    assert _inet_checksum(ip) == 0 and ip[12:16] == bytes([10, 0, 0, 2]) and ip[16:20] == MockNet.HOST_IP
    icmp = reply[34:34 + struct.unpack("!H", ip[2:4])[0] - 20]
    assert icmp[0] == 0 and _inet_checksum(icmp) == 0 and icmp[8:] == b"x" * 40


def test_vsock_connect_mode_against_a_mock_device(host_driver_lib, tmp_path):
    vs = MockVsock(cid=42, echo_ports=(5000,))
    nbytes = 300_000
    rc, lines = run_host(host_driver_lib, tmp_path, [vs], "vsock",
                         f"vsock.port=5000 vsock.bytes={nbytes} vsock.timeout_ms=3000")
    assert rc == 0, "\n".join(lines)
    assert "VSOCK CID 42 features=0x100000000" in lines
    assert "VSOCK ECHO hello from guest" in lines
    (conn,) = vs.conns.values()
    assert conn.received[:16] == b"hello from guest" and len(conn.received) == 16 + nbytes
    assert f"VSOCK BYTES {nbytes} SUM {zlib.crc32(conn.received[16:]):08x} via=connect" in lines
    assert conn.closed and conn.credit_updates_from_guest >= 1  # it answered the mock's CREDIT_REQUEST
    assert "VSOCK CLOSED 50000 by=guest" in lines


def test_vsock_listen_mode_against_a_mock_device(host_driver_lib, tmp_path):
    data = random.Random(7).randbytes(500_000)
    vs = MockVsock(cid=3, connect_to=6000, send=data)
    rc, lines = run_host(host_driver_lib, tmp_path, [vs], "vsock", "vsock.listen=6000 vsock.timeout_ms=3000")
    assert rc == 0, "\n".join(lines)
    (conn,) = vs.conns.values()
    assert bytes(conn.received) == data
    assert f"VSOCK BYTES {len(data)} SUM {zlib.crc32(data):08x} via=listen" in lines
    assert "VSOCK ACCEPTED port=6000 peer=1234" in lines and "VSOCK CLOSED 6000 by=shutdown" in lines
    assert conn.got_rst


def test_vsock_fails_when_the_device_ignores_guest_credit(host_driver_lib, tmp_path):
    vs = MockVsock(cid=3, connect_to=6000, send=bytes(400_000), overrun=True)
    rc, lines = run_host(host_driver_lib, tmp_path, [vs], "vsock", "vsock.listen=6000 vsock.timeout_ms=2000")
    assert rc == 1 and "bytes of credit left" in fail_line(lines, "vsock"), lines


def test_vsock_refused_connection_fails(host_driver_lib, tmp_path):
    rc, lines = run_host(host_driver_lib, tmp_path, [MockVsock(cid=3)], "vsock", "vsock.port=7 vsock.timeout_ms=2000")
    assert rc == 1 and "refused (RST)" in fail_line(lines, "vsock"), lines


# =====================================================================================
# Real microVMs: ember-vmm with drives, network interfaces and vsock (KVM)
# =====================================================================================

_UNSUPPORTED = re.compile(r"not (yet )?(supported|implemented)|unsupported|unknown (field|key)", re.IGNORECASE)


def skip_if_unsupported(result, key: str) -> None:
    """Skip while the VMM refuses the config because it lacks the device: it exited
    non-zero before the guest started, with an error naming `key`."""
    if result.returncode == 0 or "TESTGUEST" in result.stdout:
        return
    errors = [line for line in result.stderr.splitlines() if key in line and _UNSUPPORTED.search(line)]
    if errors:
        pytest.skip(f"ember-vmm does not support {key} yet: {errors[-1].strip()}")


def _guest_line(lines: list[str], pattern: str) -> re.Match:
    for line in lines:
        m = re.fullmatch(pattern, line)
        if m:
            return m
    raise AssertionError(f"no console line matches /{pattern}/")


# --- virtio-blk ------------------------------------------------------------------------------


@pytest.mark.kvm
def test_vblk_reads_writes_flushes_and_refuses_writes_to_a_read_only_drive(testguest, run_vmm, tmp_path):
    rw_data = random.Random(11).randbytes(1 << 20)  # 2048 sectors
    ro_data = random.Random(12).randbytes(64 << 10)  # 128 sectors
    rw, ro = tmp_path / "rootfs.img", tmp_path / "data.img"
    rw.write_bytes(rw_data)
    ro.write_bytes(ro_data)
    drives = [
        {"drive_id": "rootfs", "path_on_host": str(rw), "is_root_device": True, "is_read_only": False,
         "cache_type": "Writeback"},
        {"drive_id": "data", "path_on_host": str(ro), "is_root_device": False, "is_read_only": True},
    ]
    write_sector, count, sectors = 1000, 8, 512
    result = run_vmm(testguest, f"mode=vblk vblk.sectors={sectors} vblk.write_sector={write_sector} "
                                f"vblk.write_count={count}", config_extra={"drives": drives})
    skip_if_unsupported(result, "drives")
    result.assert_guest_passed("vblk")
    lines = result.lines
    _guest_line(lines, r"VBLK DEV 0 slot=0 capacity=2048 ro=0 flush=1 .*")
    _guest_line(lines, r"VBLK DEV 1 slot=1 capacity=128 ro=1 .*")
    assert f"VBLK READ sectors={sectors} sum={zlib.crc32(rw_data[:sectors * SECTOR]):08x}" in lines, result.describe()
    for i in (0, 1):
        ident = _guest_line(lines, rf"VBLK ID {i} (\S+)").group(1)
        assert ident != "status=UNSUPP" and ident != "(empty)", result.describe()
    for expected in ("VBLK BEYOND status=IOERR", "VBLK UNSUPP status=UNSUPP", "VBLK FLUSH 0 status=OK",
                     f"VBLK WRITE 0 sector={write_sector} count={count} ok", "VBLK RO 1 write status=IOERR"):
        assert expected in lines, result.describe()
    assert int(_guest_line(lines, r"VBLK IRQS (\d+)").group(1)) > 0

    after = rw.read_bytes()
    lo, hi = write_sector * SECTOR, (write_sector + count) * SECTOR
    assert after[lo:hi] == b"".join(blk_pattern(s) for s in range(write_sector, write_sector + count))
    assert after[:lo] == rw_data[:lo] and after[hi:] == rw_data[hi:]
    assert ro.read_bytes() == ro_data


@pytest.mark.kvm
def test_virtio_devices_appear_in_config_order_root_drive_first(testguest, run_vmm, tmp_path):
    data, root = tmp_path / "data.img", tmp_path / "root.img"
    data.write_bytes(bytes(16 * SECTOR))
    root.write_bytes(random.Random(14).randbytes(64 * SECTOR))
    extra = {
        "drives": [  # the root drive is listed second: it must still be the first device
            {"drive_id": "data", "path_on_host": str(data), "is_root_device": False, "is_read_only": True},
            {"drive_id": "root", "path_on_host": str(root), "is_root_device": True, "is_read_only": True},
        ],
        "vsock": {"guest_cid": GUEST_CID, "uds_path": str(tmp_path / "v.sock")},
    }
    result = run_vmm(testguest, "mode=vblk vblk.sectors=64", config_extra=extra)
    for key in ("drives", "vsock"):
        skip_if_unsupported(result, key)
    result.assert_guest_passed("vblk")
    found = [m.groups() for m in (re.fullmatch(r"VIRTIO slot=(\d+) addr=(0x[0-9a-f]+) id=(\d+) .* gsi=(\d+)", line)
                                  for line in result.lines) if m]
    expected = [(slot, MMIO_BASE + slot * MMIO_WINDOW, dev_id, GSI_BASE + slot)
                for slot, dev_id in enumerate((ID_BLOCK, ID_BLOCK, ID_VSOCK))]
    assert [(int(a), int(b, 16), int(c), int(d)) for a, b, c, d in found] == expected, result.describe()
    assert "VIRTIO devices=3" in result.lines
    _guest_line(result.lines, r"VBLK DEV 0 slot=0 capacity=64 ro=1 .*")
    _guest_line(result.lines, r"VBLK DEV 1 slot=1 capacity=16 ro=1 .*")
    assert f"VBLK READ sectors=64 sum={zlib.crc32(root.read_bytes()):08x}" in result.lines, result.describe()


# --- virtio-net ----------------------------------------------------------------------------------

GUEST_MAC = "06:00:0a:c8:00:02"
HOST_ADDR, GUEST_ADDR = "10.200.0.1", "10.200.0.2"

# Runs inside the test's network namespace: watches the TAP device for the guest's
# broadcast, pings the guest through the kernel's stack (ARP, then ICMP echo), then
# sends the frame that lets the guest PASS. Prints one JSON object per event.
NETNS_HELPER = r"""
import json, os, socket, struct, sys, time
tap, guest_ip, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
def say(**kw): print(json.dumps(kw), flush=True)
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16: s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff
pk = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88b5))
pk.bind((tap, 0))
pk.settimeout(1.0)
host_mac = pk.getsockname()[4]
end = time.monotonic() + timeout
guest_mac = None
while guest_mac is None:
    if time.monotonic() > end:
        say(event="timeout", waiting_for="guest ping"); sys.exit(1)
    try:
        frame = pk.recv(2048)
    except socket.timeout:
        continue
    if frame[14:].startswith(b"EMBER-VNET-PING"):
        guest_mac = frame[6:12]
        say(event="guest-ping", src=guest_mac.hex(":"), dst=frame[:6].hex(":"),
            payload=frame[14:].split(b"\0")[0].decode())
icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
icmp.settimeout(1.0)
ident = os.getpid() & 0xffff
for seq in range(1, 6):
    msg = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"ember-ping-%d" % seq
    msg = msg[:2] + struct.pack("!H", csum(msg)) + msg[4:]
    t0 = time.monotonic()
    icmp.sendto(msg, (guest_ip, 0))
    got = False
    while time.monotonic() - t0 < 2.0:
        try:
            pkt, addr = icmp.recvfrom(2048)
        except socket.timeout:
            break
        ihl = (pkt[0] & 0xf) * 4
        typ, _, _, rid, rseq = struct.unpack("!BBHHH", pkt[ihl:ihl + 8])
        if addr[0] == guest_ip and typ == 0 and rid == ident and rseq == seq:
            got = csum(pkt[ihl:]) == 0 and pkt[ihl + 8:] == b"ember-ping-%d" % seq
            say(event="ping-reply", seq=seq, ms=round((time.monotonic() - t0) * 1000, 2), valid=got)
            break
    if got:
        break
for _ in range(3):
    pk.send(guest_mac + host_mac + struct.pack("!H", 0x88b5) + b"EMBER-HOST-PING from the host".ljust(46, b"\0"))
    time.sleep(0.1)
say(event="host-ping-sent")
"""


def _have_netns_tools() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces and TAP devices need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is missing"
    return None


@pytest.fixture
def tap_in_netns():
    """(netns, tap): a TAP device with 10.200.0.1/24 inside a fresh network namespace
    (nothing is routed outside it); both are deleted afterwards."""
    reason = _have_netns_tools()
    if reason:
        pytest.skip(reason)
    tag = f"{os.getpid() % 100000}{random.randrange(1000):03d}"
    netns, tap = f"ember-vnet-{tag}", f"tapemb{tag}"[:15]

    def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)

    ip("netns", "add", netns)
    try:
        ip("-n", netns, "tuntap", "add", "dev", tap, "mode", "tap")
        ip("-n", netns, "addr", "add", f"{HOST_ADDR}/24", "dev", tap)
        ip("-n", netns, "link", "set", "lo", "up")
        ip("-n", netns, "link", "set", tap, "up")
        # Keep IPv6 chatter (router solicitations, MLD) off the guest's console.
        subprocess.run(["ip", "netns", "exec", netns, "sh", "-c",
                        f"echo 1 > /proc/sys/net/ipv6/conf/{tap}/disable_ipv6"], capture_output=True)
        yield netns, tap
    finally:
        ip("netns", "del", netns, check=False)


@pytest.mark.kvm
def test_vnet_exchanges_frames_and_answers_ping_through_a_tap(testguest, tap_in_netns, spawn_vmm):
    # tap_in_netns before spawn_vmm: the VMM is stopped before its namespace goes away.
    netns, tap = tap_in_netns
    ifaces = [{"iface_id": "eth0", "host_dev_name": tap, "guest_mac": GUEST_MAC}]
    vmm = spawn_vmm(testguest, f"mode=vnet vnet.ip={GUEST_ADDR} vnet.timeout_ms=40000",
                    config_extra={"network-interfaces": ifaces}, wrapper=["ip", "netns", "exec", netns])
    helper = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", NETNS_HELPER, tap, GUEST_ADDR,
                               "40"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        result = vmm.wait(timeout=90)
    finally:
        if helper.poll() is None:
            helper.kill()
        out, err = helper.communicate()
    skip_if_unsupported(result, "network-interfaces")
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    report = f"{result.describe()}\n--- netns helper ---\n{out}{err}"
    result.assert_guest_passed("vnet")
    lines = result.lines
    assert _guest_line(lines, r"VNET MAC (\S+) features=.*").group(1) == GUEST_MAC, report
    guest_ping = next(e for e in events if e["event"] == "guest-ping")
    assert guest_ping["src"] == GUEST_MAC and guest_ping["dst"] == "ff:ff:ff:ff:ff:ff", report
    assert re.fullmatch(r"EMBER-VNET-PING \d+", guest_ping["payload"]), report
    replies = [e for e in events if e["event"] == "ping-reply"]
    assert replies and replies[-1]["valid"], report
    assert "VNET HOST-PING EMBER-HOST-PING from the host" in lines, report
    done = _guest_line(lines, r"VNET DONE tx=(\d+) rx=(\d+) arp=(\d+) icmp=(\d+) irqs=(\d+)")
    assert int(done.group(3)) >= 1 and int(done.group(4)) >= 1 and int(done.group(5)) > 0, report
    assert any(line.startswith("VNET RX ") for line in lines), report


# --- virtio-vsock ----------------------------------------------------------------------------------

GUEST_CID = 3
BULK = 16 << 20


@pytest.fixture
def vsock_dir():
    """A short directory for the vsock Unix sockets (sun_path holds 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="ember-vs-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class EchoServer:
    """Listens on a Unix socket, accepts one connection and echoes it until EOF."""

    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(1)
        self.sock.settimeout(120)
        self.received = 0
        self.first = b""
        self.crc_after_first = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self.sock.accept()
            with conn:
                conn.settimeout(120)
                while True:
                    data = conn.recv(1 << 16)
                    if not data:
                        return
                    conn.sendall(data)
                    head = max(0, 16 - len(self.first))
                    self.first += data[:head]
                    self.crc_after_first = zlib.crc32(data[head:], self.crc_after_first)
                    self.received += len(data)
        except BaseException as exc:
            self.error = exc
        finally:
            self.sock.close()


@pytest.mark.kvm
def test_vsock_guest_connects_to_the_host_and_streams_16_mib(testguest, run_vmm, vsock_dir):
    uds = vsock_dir / "v.sock"
    port = 5000
    server = EchoServer(Path(f"{uds}_{port}"))
    result = run_vmm(testguest, f"mode=vsock vsock.port={port} vsock.bytes={BULK}", timeout=240,
                     config_extra={"vsock": {"guest_cid": GUEST_CID, "uds_path": str(uds)}})
    skip_if_unsupported(result, "vsock")
    server.thread.join(10)
    result.assert_guest_passed("vsock")
    assert server.error is None, server.error
    lines = result.lines
    assert _guest_line(lines, r"VSOCK CID (\d+) features=.*").group(1) == str(GUEST_CID)
    assert "VSOCK ECHO hello from guest" in lines and server.first == b"hello from guest"
    assert server.received == 16 + BULK
    assert f"VSOCK BYTES {BULK} SUM {server.crc_after_first:08x} via=connect" in lines, result.describe()
    _guest_line(lines, r"VSOCK CLOSED \d+ by=\w+")


@pytest.mark.kvm
def test_vsock_host_connects_to_the_guest_and_streams_16_mib(testguest, spawn_vmm, vsock_dir):
    uds = vsock_dir / "v.sock"
    port = 6000
    vmm = spawn_vmm(testguest, f"mode=vsock vsock.listen={port}",
                    config_extra={"vsock": {"guest_cid": GUEST_CID, "uds_path": str(uds)}})
    try:
        vmm.wait_for_output(rf"^VSOCK LISTENING {port}", timeout=60)
    except AssertionError:
        snapshot = vmm.wait(timeout=10) if vmm.proc.poll() is not None else None
        if snapshot is not None:
            skip_if_unsupported(snapshot, "vsock")
        raise
    data = random.Random(13).randbytes(BULK)
    echo = bytearray()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(120)
        s.connect(str(uds))
        s.sendall(f"CONNECT {port}\n".encode())
        reply = b""
        while not reply.endswith(b"\n") and len(reply) < 64:
            chunk = s.recv(1)
            if not chunk:
                break
            reply += chunk
        assert re.fullmatch(rb"OK \d+\n", reply), reply
        writer_error: list[BaseException] = []

        def write_all() -> None:
            try:
                s.sendall(data)
            except BaseException as exc:
                writer_error.append(exc)

        writer = threading.Thread(target=write_all, daemon=True)
        writer.start()
        while len(echo) < len(data):
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            echo += chunk
        writer.join(30)
        assert not writer_error, writer_error
    result = vmm.wait(timeout=60)
    result.assert_guest_passed("vsock")
    assert len(echo) == len(data) and echo == data, f"echo: {len(echo)} of {len(data)} bytes"
    lines = result.lines
    assert f"VSOCK BYTES {BULK} SUM {zlib.crc32(data):08x} via=listen" in lines, result.describe()
    _guest_line(lines, rf"VSOCK ACCEPTED port={port} peer=\d+")
    _guest_line(lines, rf"VSOCK CLOSED {port} by=\w+")

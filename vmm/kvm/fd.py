"""Kvm -> VmFd -> VcpuFd: thin, policy-free wrappers over the KVM ioctls.

Every ioctl goes through `_ioctl`, a ctypes call into libc. ctypes releases
the GIL for the call (so vCPU threads run in parallel with the VMM's Python
code), and unlike `fcntl.ioctl` it does not retry on EINTR (PEP 475), so a
signal sent to a vCPU thread makes KVM_RUN return.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from typing import Iterable

from . import bindings as kb
from . import exits

__all__ = ["KvmError", "Kvm", "VmFd", "VcpuFd"]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


class KvmError(OSError):
    """A KVM ioctl failed."""


def _ioctl(fd: int, request: int, arg: int | ctypes._CData | None = None, *, retry_eintr: bool = True) -> int:
    """Issue one ioctl; `arg` is an integer argument or a ctypes object passed by reference."""
    if arg is None:
        argp = None
    elif isinstance(arg, int):
        argp = arg
    else:
        # SAFETY: `arg` is a ctypes object the caller keeps alive for the duration
        # of this synchronous call; its size matches the ioctl's encoded size
        # (asserted in bindings) or the variable-length header+array the ioctl reads.
        argp = ctypes.addressof(arg)
    while True:
        ret = _libc.ioctl(fd, request, argp)
        if ret >= 0:
            return ret
        err = ctypes.get_errno()
        if err == errno.EINTR and retry_eintr:
            continue
        raise KvmError(err, f"ioctl {request:#x}: {os.strerror(err)}")


class Kvm:
    """The /dev/kvm system fd."""

    def __init__(self, path: str = "/dev/kvm"):
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise KvmError(exc.errno, f"cannot open {path}: {exc.strerror}") from exc
        version = _ioctl(self.fd, kb.KVM_GET_API_VERSION)
        if version != kb.KVM_API_VERSION:
            os.close(self.fd)
            raise KvmError(0, f"KVM API version {version}, need {kb.KVM_API_VERSION}")
        self._vcpu_mmap_size: int | None = None

    def check_extension(self, cap: int) -> int:
        return _ioctl(self.fd, kb.KVM_CHECK_EXTENSION, cap)

    @property
    def vcpu_mmap_size(self) -> int:
        if self._vcpu_mmap_size is None:
            self._vcpu_mmap_size = _ioctl(self.fd, kb.KVM_GET_VCPU_MMAP_SIZE)
        return self._vcpu_mmap_size

    def get_supported_cpuid(self) -> list[kb.kvm_cpuid_entry2]:
        n = kb.KVM_MAX_CPUID_ENTRIES
        while True:
            buf = _cpuid_buffer(n)
            try:
                _ioctl(self.fd, kb.KVM_GET_SUPPORTED_CPUID, buf)
            except KvmError as exc:
                if exc.errno == errno.E2BIG and n < 4096:
                    n *= 2
                    continue
                raise
            return [kb.kvm_cpuid_entry2.from_buffer_copy(e) for e in buf.entries[: buf.header.nent]]

    def get_msr_index_list(self) -> list[int]:
        n = kb.KVM_MAX_MSR_ENTRIES
        while True:
            class _List(ctypes.Structure):
                _fields_ = [("nmsrs", ctypes.c_uint32), ("indices", ctypes.c_uint32 * n)]
            lst = _List(nmsrs=n)
            try:
                _ioctl(self.fd, kb.KVM_GET_MSR_INDEX_LIST, lst)
            except KvmError as exc:
                if exc.errno == errno.E2BIG and n < 8192:
                    n *= 4
                    continue
                raise
            return list(lst.indices[: lst.nmsrs])

    def create_vm(self) -> "VmFd":
        fd = _ioctl(self.fd, kb.KVM_CREATE_VM, 0)
        return VmFd(self, fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        return f"<Kvm fd={self.fd}>"


def _cpuid_buffer(n: int):
    class _Cpuid2(ctypes.Structure):
        _fields_ = [("header", kb.kvm_cpuid2_header), ("entries", kb.kvm_cpuid_entry2 * n)]
    buf = _Cpuid2()
    buf.header.nent = n
    return buf


def _msrs_buffer(n: int):
    class _Msrs(ctypes.Structure):
        _fields_ = [("header", kb.kvm_msrs_header), ("entries", kb.kvm_msr_entry * n)]
    buf = _Msrs()
    buf.header.nmsrs = n
    return buf


class VmFd:
    """A VM: memory slots, the in-kernel irqchip and PIT, irqfds and ioeventfds."""

    def __init__(self, kvm: Kvm, fd: int):
        self.kvm = kvm
        self.fd = fd

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM: the answer for this VM (e.g. its XSAVE size)."""
        return _ioctl(self.fd, kb.KVM_CHECK_EXTENSION, cap)

    def set_tss_address(self, addr: int) -> None:
        _ioctl(self.fd, kb.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_address(self, addr: int) -> None:
        v = ctypes.c_uint64(addr)
        _ioctl(self.fd, kb.KVM_SET_IDENTITY_MAP_ADDR, v)

    def create_irq_chip(self) -> None:
        _ioctl(self.fd, kb.KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int = kb.KVM_PIT_SPEAKER_DUMMY) -> None:
        cfg = kb.kvm_pit_config(flags=flags)
        _ioctl(self.fd, kb.KVM_CREATE_PIT2, cfg)

    def set_user_memory_region(self, slot: int, guest_addr: int, size: int, host_addr: int, flags: int = 0) -> None:
        # SAFETY: host_addr..host_addr+size is a live mapping owned by a GuestRegion
        # that outlives the VM (the Vm object keeps the GuestMemory).
        region = kb.kvm_userspace_memory_region(
            slot=slot, flags=flags, guest_phys_addr=guest_addr, memory_size=size, userspace_addr=host_addr)
        _ioctl(self.fd, kb.KVM_SET_USER_MEMORY_REGION, region)

    def set_irq_line(self, irq: int, level: bool) -> None:
        lvl = kb.kvm_irq_level(irq=irq, level=1 if level else 0)
        _ioctl(self.fd, kb.KVM_IRQ_LINE, lvl)

    def register_irqfd(self, eventfd: int, gsi: int) -> None:
        req = kb.kvm_irqfd(fd=eventfd, gsi=gsi)
        _ioctl(self.fd, kb.KVM_IRQFD, req)

    def unregister_irqfd(self, eventfd: int, gsi: int) -> None:
        req = kb.kvm_irqfd(fd=eventfd, gsi=gsi, flags=kb.KVM_IRQFD_FLAG_DEASSIGN)
        _ioctl(self.fd, kb.KVM_IRQFD, req)

    def register_ioeventfd(self, eventfd: int, addr: int, length: int = 4, datamatch: int | None = None,
                           pio: bool = False) -> None:
        flags = (kb.KVM_IOEVENTFD_FLAG_PIO if pio else 0)
        if datamatch is not None:
            flags |= kb.KVM_IOEVENTFD_FLAG_DATAMATCH
        req = kb.kvm_ioeventfd(datamatch=datamatch or 0, addr=addr, len=length, fd=eventfd, flags=flags)
        _ioctl(self.fd, kb.KVM_IOEVENTFD, req)

    def unregister_ioeventfd(self, eventfd: int, addr: int, length: int = 4, datamatch: int | None = None,
                             pio: bool = False) -> None:
        flags = kb.KVM_IOEVENTFD_FLAG_DEASSIGN | (kb.KVM_IOEVENTFD_FLAG_PIO if pio else 0)
        if datamatch is not None:
            flags |= kb.KVM_IOEVENTFD_FLAG_DATAMATCH
        req = kb.kvm_ioeventfd(datamatch=datamatch or 0, addr=addr, len=length, fd=eventfd, flags=flags)
        _ioctl(self.fd, kb.KVM_IOEVENTFD, req)

    def get_irqchip(self, chip_id: int) -> bytes:
        chip = kb.kvm_irqchip(chip_id=chip_id)
        _ioctl(self.fd, kb.KVM_GET_IRQCHIP, chip)
        return bytes(chip.chip)

    def set_irqchip(self, chip_id: int, data: bytes) -> None:
        if len(data) != 512:
            raise ValueError("irqchip state must be 512 bytes")
        chip = kb.kvm_irqchip(chip_id=chip_id)
        ctypes.memmove(chip.chip, data, 512)
        _ioctl(self.fd, kb.KVM_SET_IRQCHIP, chip)

    def get_pit2(self) -> bytes:
        st = kb.kvm_pit_state2()
        _ioctl(self.fd, kb.KVM_GET_PIT2, st)
        return bytes(st)

    def set_pit2(self, data: bytes) -> None:
        st = kb.kvm_pit_state2.from_buffer_copy(data)
        _ioctl(self.fd, kb.KVM_SET_PIT2, st)

    def get_clock(self) -> kb.kvm_clock_data:
        cd = kb.kvm_clock_data()
        _ioctl(self.fd, kb.KVM_GET_CLOCK, cd)
        return cd

    def set_clock(self, clock: int, flags: int = 0) -> None:
        cd = kb.kvm_clock_data(clock=clock, flags=flags)
        _ioctl(self.fd, kb.KVM_SET_CLOCK, cd)

    def get_dirty_log(self, slot: int, size: int) -> bytes:
        """The dirty bitmap of a slot (one bit per 4 KiB page), cleared by the call."""
        nbytes = ((size >> 12) + 63) // 64 * 8
        bitmap = (ctypes.c_uint8 * nbytes)()
        # SAFETY: bitmap holds one bit per page of the slot, rounded up to u64 as KVM requires.
        req = kb.kvm_dirty_log(slot=slot, dirty_bitmap=ctypes.addressof(bitmap))
        _ioctl(self.fd, kb.KVM_GET_DIRTY_LOG, req)
        return bytes(bitmap)

    def create_vcpu(self, vcpu_id: int) -> "VcpuFd":
        fd = _ioctl(self.fd, kb.KVM_CREATE_VCPU, vcpu_id)
        return VcpuFd(self, fd, vcpu_id)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        return f"<VmFd fd={self.fd}>"


class VcpuFd:
    """One vCPU: its kvm_run page, registers and state."""

    def __init__(self, vm: VmFd, fd: int, vcpu_id: int):
        self.vm = vm
        self.fd = fd
        self.id = vcpu_id
        size = vm.kvm.vcpu_mmap_size
        # SAFETY: KVM maps the vCPU's kvm_run page(s) at offset 0 of the vCPU fd;
        # the size is what KVM_GET_VCPU_MMAP_SIZE reports, and the mmap lives as
        # long as this object.
        self._run_map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        # SAFETY: kvm_run is smaller than the mapping; from_buffer keeps the mmap exported.
        self.run_struct = kb.kvm_run.from_buffer(self._run_map)

    # --- running ----------------------------------------------------------------

    def set_immediate_exit(self, value: bool) -> None:
        self.run_struct.immediate_exit = 1 if value else 0

    def run(self) -> exits.VcpuExit:
        """Enter the guest until the next exit; EINTR (a kick) returns `Interrupted`."""
        try:
            _ioctl(self.fd, kb.KVM_RUN, retry_eintr=False)
        except KvmError as exc:
            if exc.errno in (errno.EINTR, errno.EAGAIN):
                return exits.Interrupted()
            raise
        run = self.run_struct
        reason = run.exit_reason
        if reason == kb.KVM_EXIT_IO:
            io = run.u.io
            n = io.size * io.count
            if io.direction == kb.KVM_EXIT_IO_OUT:
                # data_offset comes from KVM, but bound-check it against our mapping anyway.
                off = io.data_offset
                data = bytes(self._run_map[off:off + n])
                return exits.IoOut(io.port, io.size, data)
            return exits.IoIn(io.port, io.size, io.count)
        if reason == kb.KVM_EXIT_MMIO:
            m = run.u.mmio
            length = min(m.len, 8)
            if m.is_write:
                return exits.MmioWrite(m.phys_addr, bytes(m.data[:length]))
            return exits.MmioRead(m.phys_addr, length)
        if reason == kb.KVM_EXIT_INTR:
            return exits.Interrupted()
        if reason == kb.KVM_EXIT_HLT:
            return exits.Hlt()
        if reason == kb.KVM_EXIT_SHUTDOWN:
            return exits.Shutdown()
        if reason == kb.KVM_EXIT_SYSTEM_EVENT:
            ev = run.u.system_event
            return exits.SystemEvent(ev.type, ev.data[0] if ev.ndata else 0)
        if reason == kb.KVM_EXIT_FAIL_ENTRY:
            fe = run.u.fail_entry
            return exits.FailEntry(fe.hardware_entry_failure_reason, fe.cpu)
        if reason == kb.KVM_EXIT_INTERNAL_ERROR:
            ie = run.u.internal
            return exits.InternalError(ie.suberror, tuple(ie.data[: min(ie.ndata, 16)]))
        return exits.Unknown(reason)

    def set_io_in_data(self, data: bytes) -> None:
        """Answer the pending IoIn exit: KVM copies `data` into the guest on the next KVM_RUN."""
        io = self.run_struct.u.io
        n = io.size * io.count
        off = io.data_offset
        self._run_map[off:off + n] = data[:n].ljust(n, b"\xff")

    def set_mmio_read_data(self, data: bytes) -> None:
        m = self.run_struct.u.mmio
        length = min(m.len, 8)
        ctypes.memmove(m.data, data[:length].ljust(length, b"\xff"), length)

    # --- registers and state ----------------------------------------------------

    def get_regs(self) -> kb.kvm_regs:
        r = kb.kvm_regs()
        _ioctl(self.fd, kb.KVM_GET_REGS, r)
        return r

    def set_regs(self, regs: kb.kvm_regs) -> None:
        _ioctl(self.fd, kb.KVM_SET_REGS, regs)

    def get_sregs(self) -> kb.kvm_sregs:
        s = kb.kvm_sregs()
        _ioctl(self.fd, kb.KVM_GET_SREGS, s)
        return s

    def set_sregs(self, sregs: kb.kvm_sregs) -> None:
        _ioctl(self.fd, kb.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> kb.kvm_fpu:
        f = kb.kvm_fpu()
        _ioctl(self.fd, kb.KVM_GET_FPU, f)
        return f

    def set_fpu(self, fpu: kb.kvm_fpu) -> None:
        _ioctl(self.fd, kb.KVM_SET_FPU, fpu)

    def set_cpuid2(self, entries: Iterable[kb.kvm_cpuid_entry2]) -> None:
        entries = list(entries)
        buf = _cpuid_buffer(len(entries))
        for i, e in enumerate(entries):
            buf.entries[i] = e
        _ioctl(self.fd, kb.KVM_SET_CPUID2, buf)

    def get_cpuid2(self, max_entries: int = kb.KVM_MAX_CPUID_ENTRIES) -> list[kb.kvm_cpuid_entry2]:
        """The CPUID table set on this vCPU (KVM_GET_CPUID2); empty before KVM_SET_CPUID2."""
        buf = _cpuid_buffer(max_entries)
        # SAFETY: buf holds `max_entries` entries and says so in header.nent; KVM
        # writes at most that many (E2BIG otherwise) and stores the count in nent.
        _ioctl(self.fd, kb.KVM_GET_CPUID2, buf)
        n = min(buf.header.nent, max_entries)
        return [kb.kvm_cpuid_entry2.from_buffer_copy(e) for e in buf.entries[:n]]

    def get_msrs(self, indices: list[int]) -> list[tuple[int, int]]:
        """Read MSRs; returns only those KVM read (it stops at the first failure)."""
        buf = _msrs_buffer(len(indices))
        for i, idx in enumerate(indices):
            buf.entries[i].index = idx
        n = _ioctl(self.fd, kb.KVM_GET_MSRS, buf)
        return [(buf.entries[i].index, buf.entries[i].data) for i in range(n)]

    def set_msrs(self, msrs: list[tuple[int, int]]) -> int:
        """Write MSRs; returns how many KVM accepted (it stops at the first failure)."""
        buf = _msrs_buffer(len(msrs))
        for i, (idx, val) in enumerate(msrs):
            buf.entries[i].index = idx
            buf.entries[i].data = val
        return _ioctl(self.fd, kb.KVM_SET_MSRS, buf)

    def get_lapic(self) -> bytes:
        st = kb.kvm_lapic_state()
        _ioctl(self.fd, kb.KVM_GET_LAPIC, st)
        return bytes(st.regs)

    def set_lapic(self, regs: bytes) -> None:
        st = kb.kvm_lapic_state.from_buffer_copy(regs)
        _ioctl(self.fd, kb.KVM_SET_LAPIC, st)

    def get_mp_state(self) -> int:
        st = kb.kvm_mp_state()
        _ioctl(self.fd, kb.KVM_GET_MP_STATE, st)
        return st.mp_state

    def set_mp_state(self, state: int) -> None:
        _ioctl(self.fd, kb.KVM_SET_MP_STATE, kb.kvm_mp_state(mp_state=state))

    def get_vcpu_events(self) -> bytes:
        ev = kb.kvm_vcpu_events()
        _ioctl(self.fd, kb.KVM_GET_VCPU_EVENTS, ev)
        return bytes(ev)

    def set_vcpu_events(self, data: bytes) -> None:
        _ioctl(self.fd, kb.KVM_SET_VCPU_EVENTS, kb.kvm_vcpu_events.from_buffer_copy(data))

    def get_debugregs(self) -> bytes:
        d = kb.kvm_debugregs()
        _ioctl(self.fd, kb.KVM_GET_DEBUGREGS, d)
        return bytes(d)

    def set_debugregs(self, data: bytes) -> None:
        _ioctl(self.fd, kb.KVM_SET_DEBUGREGS, kb.kvm_debugregs.from_buffer_copy(data))

    def get_xsave(self) -> bytes:
        x = kb.kvm_xsave()
        _ioctl(self.fd, kb.KVM_GET_XSAVE, x)
        return bytes(x)

    def set_xsave(self, data: bytes) -> None:
        _ioctl(self.fd, kb.KVM_SET_XSAVE, kb.kvm_xsave.from_buffer_copy(data))

    def get_xcrs(self) -> bytes:
        x = kb.kvm_xcrs()
        _ioctl(self.fd, kb.KVM_GET_XCRS, x)
        return bytes(x)

    def set_xcrs(self, data: bytes) -> None:
        _ioctl(self.fd, kb.KVM_SET_XCRS, kb.kvm_xcrs.from_buffer_copy(data))

    def xsave_size(self) -> int:
        """Bytes of this vCPU's XSAVE image: KVM_CAP_XSAVE2's answer, or 4096 without it."""
        return max(self.vm.check_extension(kb.KVM_CAP_XSAVE2), ctypes.sizeof(kb.kvm_xsave))

    def get_xsave2(self) -> bytes:
        """The whole XSAVE image (KVM_GET_XSAVE2; KVM_GET_XSAVE on kernels without KVM_CAP_XSAVE2)."""
        if self.vm.check_extension(kb.KVM_CAP_XSAVE2) == 0:
            return self.get_xsave()
        size = self.xsave_size()
        buf = (ctypes.c_uint8 * size)()
        # SAFETY: KVM copies out exactly the vCPU's XSAVE size, which
        # KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) on its VM reports; buf has that many
        # bytes (at least 4096, the ioctl's encoded size) and lives across the call.
        _ioctl(self.fd, kb.KVM_GET_XSAVE2, buf)
        return bytes(buf)

    def set_xsave2(self, data: bytes) -> None:
        """Load an XSAVE image of any size KVM_GET_XSAVE2 produces (zero-padded to this VM's size)."""
        size = max(len(data), self.xsave_size())
        buf = (ctypes.c_uint8 * size).from_buffer_copy(data.ljust(size, b"\0"))
        # SAFETY: KVM_SET_XSAVE reads the vCPU's XSAVE size (KVM_CAP_XSAVE2's answer,
        # 4096 without it), not the ioctl's encoded 4096; buf has at least that
        # many bytes and lives across the call. Zero padding is the init state of
        # any component the image's XSTATE_BV does not mark present.
        _ioctl(self.fd, kb.KVM_SET_XSAVE, buf)

    def set_tsc_khz(self, khz: int) -> None:
        """Set the guest TSC frequency (KVM_SET_TSC_KHZ); needs KVM_CAP_TSC_CONTROL to scale."""
        _ioctl(self.fd, kb.KVM_SET_TSC_KHZ, khz)

    def kvmclock_ctrl(self) -> None:
        """Tell the guest its vCPU was paused, so it does not report a soft lockup."""
        _ioctl(self.fd, kb.KVM_KVMCLOCK_CTRL)

    def get_tsc_khz(self) -> int:
        return _ioctl(self.fd, kb.KVM_GET_TSC_KHZ)

    def close(self) -> None:
        del self.run_struct
        try:
            self._run_map.close()
        except BufferError:
            pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        return f"<VcpuFd id={self.id} fd={self.fd}>"

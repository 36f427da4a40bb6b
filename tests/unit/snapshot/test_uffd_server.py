"""The page server against the real kernel: /dev/userfaultfd, faults from another thread, SCM_RIGHTS."""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import threading
import time

import pytest

from snapshot import (
    ChunkStoreSource,
    FaultResolver,
    HandshakeError,
    MemoryFileSource,
    PageServer,
    UffdMapping,
    Userfaultfd,
    WorkingSetRecorder,
    prefetch_plan,
    receive_handshake,
    send_handshake,
)
from snapshot import uffd_server as us
from vmm.memory import GuestMemory

from tests.unit.snapshot._guest import PAGE, MiB, pattern_page, save_guest

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not os.path.exists("/dev/userfaultfd") and os.geteuid() != 0,
                       reason="needs /dev/userfaultfd or root for userfaultfd(2)"),
]

CHUNK = 64 << 10
SIZE = 4 * MiB

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MADV_DONTNEED = 4


def touch(addr: int, length: int) -> bytes:
    """Read guest memory from another thread with the GIL released (a page fault
    blocks that thread until the server answers; it must not block the server)."""
    buf = ctypes.create_string_buffer(length)
    # SAFETY (test): `addr` is inside a live mapping owned by the test's GuestMemory;
    # memmove goes through ctypes' FFI, which releases the GIL during the copy.
    worker = threading.Thread(target=ctypes.memmove, args=(buf, addr, length), daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "fault was never served"
    return buf.raw


def settled(predicate) -> bool:
    """Whether `predicate` becomes true within 5 s. The kernel wakes a faulting
    thread inside UFFDIO_COPY, before the server has counted the install."""
    deadline = time.monotonic() + 5
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


@pytest.fixture
def snapshot_files(tmp_path):
    """A 4 MiB guest: every third page patterned, the last MiB zero."""
    mem = GuestMemory.anonymous([(0, SIZE)])
    for p in range(0, (SIZE - MiB) // PAGE, 3):
        mem.write(p * PAGE, pattern_page(p))
    state, memory = save_guest(mem, tmp_path)
    mem.close()
    return state, memory


class Restore:
    """Fresh anonymous guest memory registered with a new uffd, served by a PageServer thread."""

    def __init__(self, source, recorder=None, features=us.UFFD_FEATURE_EVENT_REMOVE):
        self.mem = GuestMemory.anonymous([(0, SIZE)])
        self.region = self.mem.regions[0]
        self.uffd = Userfaultfd.create(features=features)
        self.uffd.register(self.region.host_addr, SIZE)
        self.mappings = (UffdMapping(self.region.host_addr, SIZE, 0, PAGE),)
        self.resolver = FaultResolver(self.mappings, source, recorder)
        self.server = PageServer(self.uffd, self.resolver)
        self.thread: threading.Thread | None = None

    def start(self) -> "Restore":
        self.thread = us.serve_in_thread(self.server)
        return self

    def read(self, offset: int, length: int) -> bytes:
        return touch(self.region.host_addr + offset, length)

    def close(self) -> None:
        if self.thread is not None:
            self.server.stop()
            self.thread.join(10)
            assert self.server.error is None
        self.server.close()
        self.uffd.close()
        self.mem.close()


def test_ioctl_numbers_match_linux_userfaultfd_h():
    # Values of the macros in linux/userfaultfd.h on x86_64.
    assert us.UFFDIO_API == 0xC018AA3F
    assert us.UFFDIO_REGISTER == 0xC020AA00
    assert us.UFFDIO_UNREGISTER == 0x8010AA01
    assert us.UFFDIO_WAKE == 0x8010AA02
    assert us.UFFDIO_COPY == 0xC028AA03
    assert us.UFFDIO_ZEROPAGE == 0xC020AA04
    assert us.USERFAULTFD_IOC_NEW == 0xAA00
    assert us.ffi.sizeof("struct uffd_msg") == 32


def test_api_negotiation_reports_features_and_ioctls():
    uffd = Userfaultfd.create(features=us.UFFD_FEATURE_EVENT_REMOVE)
    try:
        assert uffd.features & us.UFFD_FEATURE_EVENT_REMOVE
        assert uffd.ioctls & (1 << 0x3F)  # UFFDIO_API itself
    finally:
        uffd.close()
    with pytest.raises(us.UffdSyscallError, match="UFFDIO_API"):
        Userfaultfd.create(features=1 << 62)


def test_faults_are_served_from_a_memory_file(snapshot_files):
    _, memory = snapshot_files
    source = MemoryFileSource(memory)
    restore = Restore(source).start()
    try:
        expected = memory.read_bytes()
        assert restore.read(0, SIZE) == expected
        # One install per 4 KiB page of a raw file (no chunking).
        assert settled(lambda: restore.server.installs == SIZE // PAGE)
        assert restore.resolver.installed.total() == SIZE
    finally:
        restore.close()
        source.close()


def test_faults_are_served_per_chunk_from_the_chunk_store(snapshot_files, store):
    state, memory = snapshot_files
    store.put_snapshot("vm", state, memory)
    restore = Restore(ChunkStoreSource(store.open("vm"))).start()
    try:
        expected = memory.read_bytes()
        assert restore.read(5 * PAGE, 100) == expected[5 * PAGE:5 * PAGE + 100]
        assert settled(lambda: restore.server.installs == 1)  # the whole first chunk
        # The rest of that chunk is present: no more faults for it.
        assert restore.read(0, CHUNK) == expected[:CHUNK]
        assert restore.resolver.faults == 1
        assert restore.read(0, SIZE) == expected
        assert settled(lambda: restore.server.installs == SIZE // CHUNK)
        assert restore.resolver.faults == SIZE // CHUNK
    finally:
        restore.close()


def test_removed_pages_read_back_as_zeros(snapshot_files):
    _, memory = snapshot_files
    source = MemoryFileSource(memory)
    restore = Restore(source).start()
    try:
        assert restore.read(0, 4 * PAGE)[:PAGE] == pattern_page(0)
        # The balloon hands page 0 back: MADV_DONTNEED from another thread
        # (it waits until the server has read the remove event).
        worker = threading.Thread(target=_libc.madvise, args=(restore.region.host_addr, PAGE, MADV_DONTNEED))
        worker.start()
        worker.join(10)
        assert not worker.is_alive()
        assert restore.read(0, PAGE) == bytes(PAGE)
        assert restore.read(3 * PAGE, PAGE) == pattern_page(3)  # untouched by the remove
        assert settled(lambda: restore.resolver.removed.total() == PAGE)
    finally:
        restore.close()
        source.close()


def test_pages_already_present_are_skipped_page_by_page(snapshot_files, store):
    state, memory = snapshot_files
    store.put_snapshot("vm", state, memory)
    restore = Restore(ChunkStoreSource(store.open("vm")))
    try:
        # Something (the VMM restoring a device ring, say) filled page 5 first.
        marker = b"\xab" * PAGE
        assert restore.uffd.copy(restore.region.host_addr + 5 * PAGE, marker) == PAGE
        restore.start()
        data = restore.read(0, CHUNK)
        expected = bytearray(memory.read_bytes()[:CHUNK])
        expected[5 * PAGE:6 * PAGE] = marker
        assert data == bytes(expected)
        # A direct copy onto a present page is refused by the kernel.
        assert restore.uffd.copy(restore.region.host_addr, bytes(PAGE)) == -errno.EEXIST
    finally:
        restore.close()


def test_working_set_recorded_then_prefetched(snapshot_files, store):
    state, memory = snapshot_files
    store.put_snapshot("vm", state, memory)
    expected = memory.read_bytes()
    touched = [0, 40 * PAGE, 41 * PAGE, 700 * PAGE, 3 * MiB + 5 * PAGE]

    # First restore: record what the guest touches.
    recorder = WorkingSetRecorder()
    first = Restore(ChunkStoreSource(store.open("vm")), recorder).start()
    try:
        for off in touched:
            assert first.read(off, 8) == expected[off:off + 8]
        assert settled(lambda: len(recorder) == 4)  # pages 40 and 41 share a chunk
    finally:
        first.close()
    store.set_working_set("vm", recorder.runs)
    assert store.get_working_set("vm") == [(0, CHUNK), (2 * CHUNK, CHUNK), (43 * CHUNK, CHUNK),
                                           (3 * MiB, CHUNK)]

    # Second restore: install the working set before the guest runs.
    second = Restore(ChunkStoreSource(store.open("vm")))
    try:
        plan = prefetch_plan(store.get_working_set("vm"))
        assert second.server.prefetch(plan) == 4 * CHUNK
        second.start()
        for off in touched:
            assert second.read(off, 8) == expected[off:off + 8]
        assert second.resolver.faults == 0
    finally:
        second.close()


def test_handshake_carries_the_uffd_over_scm_rights(snapshot_files):
    _, memory = snapshot_files
    vmm_side, server_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    restore = Restore(MemoryFileSource(memory))
    try:
        send_handshake(vmm_side, restore.mappings, restore.uffd.fd)
        mappings, fd = receive_handshake(server_side)
        assert mappings == restore.mappings
        # The received fd is the same uffd: serving through it answers faults.
        received = Userfaultfd(fd)
        server = PageServer(received, FaultResolver(mappings, MemoryFileSource(memory)))
        thread = us.serve_in_thread(server)
        assert restore.read(3 * PAGE, PAGE) == pattern_page(3)
        server.stop()
        thread.join(10)
        server.close()
        received.close()
    finally:
        restore.close()
        vmm_side.close()
        server_side.close()


@pytest.mark.parametrize("nfds", [0, 2])
def test_handshake_needs_exactly_one_fd_and_closes_extras(nfds):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(nfds)]
    try:
        message = b'[{"base_host_virt_addr": 4096, "size": 4096, "offset": 0, "page_size": 4096}]'
        socket.send_fds(a, [message], fds)
        before = set(os.listdir("/proc/self/fd"))
        with pytest.raises(HandshakeError, match=f"got {nfds}"):
            receive_handshake(b)
        assert set(os.listdir("/proc/self/fd")) <= before  # nothing leaked
    finally:
        for fd in fds:
            os.close(fd)
        a.close()
        b.close()


def test_a_bad_handshake_closes_the_received_fd():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        socket.send_fds(a, [b"[{}]"], [fd])
        before = set(os.listdir("/proc/self/fd"))
        with pytest.raises(HandshakeError, match="has keys"):
            receive_handshake(b)
        assert set(os.listdir("/proc/self/fd")) <= before
    finally:
        os.close(fd)
        a.close()
        b.close()


def test_repr():
    uffd = Userfaultfd.create()
    try:
        assert repr(uffd).startswith(f"<Userfaultfd fd={uffd.fd} features=")
    finally:
        uffd.close()

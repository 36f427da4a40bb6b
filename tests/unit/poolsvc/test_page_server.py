"""`ember page-server` against the real kernel (userfaultfd, SCM_RIGHTS), no KVM: a fake VMM reads its memory."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from poolsvc.snapshot_cli import NotASocket, PageService, SocketInUse, bind_unix_socket
from snapshot import ChunkStore, ChunkStoreSource, MemoryFileSource

from tests.unit.poolsvc._vmm import CHUNK, PAGE, SIZE, ZERO_PAGES, EventLog, FakeVmm, page_bytes, write_snapshot

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not os.path.exists("/dev/userfaultfd") and os.geteuid() != 0,
                       reason="needs /dev/userfaultfd or root for userfaultfd(2)"),
]

ROOT = Path(__file__).resolve().parents[3]
EXPECTED = b"".join(page_bytes(i) for i in range(SIZE // PAGE))
ZERO_COUNT = sum(1 for i in range(SIZE // PAGE) if page_bytes(i) == bytes(PAGE))


class Running:
    """A PageService on a thread, its events collected."""

    def __init__(self, sock: Path, source, **options) -> None:
        self.events = EventLog()
        self.log = io.StringIO()
        self.service = PageService(str(sock), source, out=self.events, log=self.log, **options)
        self.thread = threading.Thread(target=self.service.serve_forever, daemon=True)
        self.thread.start()
        self.events.next("listening")

    def stop(self) -> None:
        self.service.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.fixture
def files(tmp_path):
    return write_snapshot(tmp_path)


@pytest.fixture
def store(tmp_path, files):
    s = ChunkStore(tmp_path / "store")
    s.put_snapshot("vm", *files)
    yield s
    s.close()


@pytest.fixture
def memfile_server(tmp_path, files):
    source = MemoryFileSource(files[1])
    running = Running(tmp_path / "pages.sock", source)
    yield running
    running.stop()
    source.close()


@pytest.fixture
def snapshot_server(tmp_path, store):
    running = Running(tmp_path / "pages.sock", ChunkStoreSource(store.open("vm")), store=store, snapshot_id="vm")
    yield running
    running.stop()


def test_serves_a_memory_file_page_by_page(memfile_server, tmp_path):
    vm = FakeVmm(tmp_path / "pages.sock")
    try:
        assert vm.read(0, SIZE) == EXPECTED
        vm.disconnect()
        done = memfile_server.events.next("vm-done")
    finally:
        vm.close()
    assert done["pid"] == os.getpid()
    assert done["end"] == "hangup" and done["error"] is None
    assert done["faults"] == SIZE // PAGE  # a raw file is served one page per fault
    assert done["bytes"] == SIZE
    assert done["zero_pages"] == ZERO_COUNT
    assert done["prefetched_bytes"] == 0 and done["working_set"] is None
    assert f"vm pid={os.getpid()} hangup: faults={SIZE // PAGE}" in memfile_server.log.getvalue()
    assert memfile_server.service.served == 1


def test_serves_a_stored_snapshot_chunk_by_chunk_with_zero_chunks(snapshot_server, tmp_path):
    vm = FakeVmm(tmp_path / "pages.sock")
    try:
        assert vm.read(3 * PAGE, 100) == EXPECTED[3 * PAGE:3 * PAGE + 100]
        assert vm.read(0, SIZE) == EXPECTED
        vm.disconnect()
        done = snapshot_server.events.next("vm-done")
    finally:
        vm.close()
    assert done["faults"] == SIZE // CHUNK  # one install per 64 KiB chunk
    assert done["bytes"] == SIZE
    # Zero chunks are installed with UFFDIO_ZEROPAGE, patterned ones copied even
    # where some of their pages are zero.
    assert done["zero_pages"] == len(ZERO_PAGES)


def test_removed_pages_read_back_as_zeros(memfile_server, tmp_path):
    vm = FakeVmm(tmp_path / "pages.sock")
    try:
        assert vm.read(0, 8 * PAGE) == EXPECTED[:8 * PAGE]
        vm.discard(2 * PAGE, 2 * PAGE)         # installed pages given back
        vm.discard(100 * PAGE, PAGE)           # a page never touched
        assert vm.read(0, 8 * PAGE) == EXPECTED[:2 * PAGE] + bytes(2 * PAGE) + EXPECTED[4 * PAGE:8 * PAGE]
        assert vm.read(100 * PAGE, PAGE) == bytes(PAGE)
        assert vm.read(101 * PAGE, PAGE) == page_bytes(101)
        vm.disconnect()
        done = memfile_server.events.next("vm-done")
    finally:
        vm.close()
    assert done["end"] == "hangup"
    assert done["zero_pages"] == 3 + 1  # pages 2, 3, 100, and page 7 of the pattern


def test_working_set_is_recorded_then_prefetched(snapshot_server, store, tmp_path):
    touched = [0, 5 * PAGE, 10 * CHUNK, 20 * CHUNK + PAGE]
    first = FakeVmm(tmp_path / "pages.sock")
    try:
        for off in touched:
            assert first.read(off, 16) == EXPECTED[off:off + 16]
        first.disconnect()
        done = snapshot_server.events.next("vm-done")
    finally:
        first.close()
    assert done["working_set"] == "recorded" and done["working_set_runs"] == 3
    assert done["prefetched_bytes"] == 0 and done["bytes"] == 3 * CHUNK
    assert store.get_working_set("vm") == [(0, CHUNK), (10 * CHUNK, CHUNK), (20 * CHUNK, CHUNK)]
    assert store.show("vm").has_working_set

    second = FakeVmm(tmp_path / "pages.sock")
    try:
        for off in touched:
            assert second.read(off, 16) == EXPECTED[off:off + 16]
        assert second.read(30 * CHUNK, PAGE) == EXPECTED[30 * CHUNK:30 * CHUNK + PAGE]  # not in the set
        second.disconnect()
        done = snapshot_server.events.next("vm-done")
    finally:
        second.close()
    assert done["working_set"] == "prefetched" and done["working_set_runs"] == 3
    assert done["prefetched_bytes"] == 3 * CHUNK
    assert done["bytes"] == CHUNK  # only the chunk outside the working set was installed on demand
    # A prefetching connection does not record: the stored set is unchanged.
    assert store.get_working_set("vm") == [(0, CHUNK), (10 * CHUNK, CHUNK), (20 * CHUNK, CHUNK)]


@pytest.mark.parametrize("options,prefetched,recorded", [
    ({"prefetch": False}, 0, None),                   # --no-prefetch: serve on demand, keep the stored set
    ({"record_working_set": True}, 0, [(7 * CHUNK, CHUNK)]),  # --record-working-set: measure afresh, replace
])
def test_no_prefetch_and_forced_recording(tmp_path, store, options, prefetched, recorded):
    store.set_working_set("vm", [(0, 2 * CHUNK)])
    running = Running(tmp_path / "pages.sock", ChunkStoreSource(store.open("vm")), store=store, snapshot_id="vm",
                      **options)
    vm = FakeVmm(tmp_path / "pages.sock")
    try:
        assert vm.read(7 * CHUNK, 8) == EXPECTED[7 * CHUNK:7 * CHUNK + 8]
        vm.disconnect()
        done = running.events.next("vm-done")
    finally:
        vm.close()
        running.stop()
    assert done["prefetched_bytes"] == prefetched and done["bytes"] == CHUNK
    assert done["working_set"] == ("recorded" if recorded else None)
    assert store.get_working_set("vm") == (recorded or [(0, 2 * CHUNK)])


def test_record_seconds_stores_the_working_set_while_the_vm_runs(tmp_path, store):
    running = Running(tmp_path / "pages.sock", ChunkStoreSource(store.open("vm")), store=store, snapshot_id="vm",
                      record_seconds=0.2)
    vm = FakeVmm(tmp_path / "pages.sock")
    try:
        assert vm.read(4 * CHUNK, 8) == EXPECTED[4 * CHUNK:4 * CHUNK + 8]
        deadline = time.monotonic() + 5
        while store.get_working_set("vm") is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert store.get_working_set("vm") == [(4 * CHUNK, CHUNK)]
        assert vm.read(8 * CHUNK, 8) == EXPECTED[8 * CHUNK:8 * CHUNK + 8]  # after the deadline: not recorded
        vm.disconnect()
        done = running.events.next("vm-done")
    finally:
        vm.close()
        running.stop()
    assert done["working_set"] == "recorded" and done["working_set_runs"] == 1
    assert store.get_working_set("vm") == [(4 * CHUNK, CHUNK)]


def test_clones_are_served_concurrently(snapshot_server, tmp_path):
    vms = [FakeVmm(tmp_path / "pages.sock") for _ in range(3)]
    try:
        results: dict[int, bytes] = {}
        readers = [threading.Thread(target=lambda i=i, vm=vm: results.__setitem__(i, vm.read(0, SIZE)))
                   for i, vm in enumerate(vms)]
        for r in readers:
            r.start()
        for r in readers:
            r.join(20)
        assert [results.get(i) == EXPECTED for i in range(3)] == [True] * 3
        for vm in vms:
            vm.disconnect()
        reports = [snapshot_server.events.next("vm-done") for _ in vms]
    finally:
        for vm in vms:
            vm.close()
    assert all(r["bytes"] == SIZE and r["end"] == "hangup" for r in reports)


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_bad_handshakes_are_refused_and_the_server_keeps_serving(memfile_server, tmp_path):
    path = tmp_path / "pages.sock"
    # Mappings beyond the memory file.
    vm = FakeVmm(path, size=2 * SIZE)
    try:
        refused = memfile_server.events.next("vm-refused")
    finally:
        vm.close()
    assert "Page source does not cover the mappings" in refused["error"]
    assert refused["pid"] == os.getpid()

    # Not JSON; the fd that came with it is closed again.
    before = _fds()
    fd = os.open("/dev/null", os.O_RDONLY)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(path))
        socket.send_fds(s, [b"{not json"], [fd])
        refused = memfile_server.events.next("vm-refused")
    os.close(fd)
    assert refused["error"].startswith("handshake: Invalid uffd handshake: not JSON")
    deadline = time.monotonic() + 5
    while _fds() - before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _fds() - before

    # A connection that closes without a word (a liveness probe) is not an event.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(path))

    vm = FakeVmm(path)
    try:
        assert vm.read(9 * PAGE, PAGE) == page_bytes(9)
        vm.disconnect()
        assert memfile_server.events.next("vm-done")["bytes"] == PAGE
    finally:
        vm.close()
    assert memfile_server.service.refused == 2 and memfile_server.service.served == 1


def test_handshake_timeout_refuses_a_silent_peer(tmp_path, files):
    source = MemoryFileSource(files[1])
    running = Running(tmp_path / "pages.sock", source, handshake_timeout=0.2)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(tmp_path / "pages.sock"))
            assert "timed out" in running.events.next("vm-refused")["error"]
    finally:
        running.stop()
        source.close()


def test_stop_ends_live_connections_and_removes_the_socket(tmp_path, files):
    source = MemoryFileSource(files[1])
    running = Running(tmp_path / "pages.sock", source)
    vm = FakeVmm(tmp_path / "pages.sock")
    try:
        assert vm.read(0, PAGE) == page_bytes(0)
        running.stop()
        assert running.events.next("vm-done")["end"] == "stopped"
        assert not (tmp_path / "pages.sock").exists()
    finally:
        vm.close()
        source.close()


def test_stop_does_not_wait_for_a_silent_peer_s_handshake(tmp_path, files):
    source = MemoryFileSource(files[1])
    running = Running(tmp_path / "pages.sock", source, handshake_timeout=60)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
            silent.connect(str(tmp_path / "pages.sock"))
            time.sleep(0.1)  # accepted, waiting for a handshake
            began = time.monotonic()
            running.stop()
            assert time.monotonic() - began < 5
        assert running.events.empty()
    finally:
        source.close()


def test_bind_removes_a_stale_socket_and_refuses_a_live_one(tmp_path):
    path = str(tmp_path / "s.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens
    live = bind_unix_socket(path)
    try:
        with pytest.raises(SocketInUse, match="already listening"):
            bind_unix_socket(path)
    finally:
        live.close()
    (tmp_path / "plain").write_text("x")
    with pytest.raises(NotASocket):
        bind_unix_socket(str(tmp_path / "plain"))


def _start(args: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "poolsvc.cli", "page-server", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert '"event": "listening"' in line, line + proc.stderr.read()
    return proc


def test_cli_sigterm_closes_the_socket_and_exits_0(tmp_path, files):
    sock = tmp_path / "pages.sock"
    proc = _start(["--socket", str(sock), "--mem", str(files[1])])
    try:
        # A second server on the same socket is refused; the first is not disturbed.
        second = subprocess.run([sys.executable, "-m", "poolsvc.cli", "page-server", "--socket", str(sock),
                                 "--mem", str(files[1])], cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert second.returncode == 1
        assert second.stderr == f"ember: A page server is already listening on this socket: {sock}\n"
        vm = FakeVmm(sock)
        try:
            assert vm.read(PAGE, PAGE) == page_bytes(1)
        finally:
            vm.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        proc.kill()
        proc.wait()
    assert not sock.exists()
    assert '"event": "vm-done"' in proc.stdout.read()
    assert "Traceback" not in proc.stderr.read()


def test_cli_once_exits_after_one_vm(tmp_path, files, store):
    store.close()  # the subprocess opens its own
    sock = tmp_path / "pages.sock"
    proc = _start(["--socket", str(sock), "--snapshot", "vm", "--store", str(tmp_path / "store"), "--once"])
    try:
        vm = FakeVmm(sock)
        try:
            assert vm.read(CHUNK, PAGE) == page_bytes(CHUNK // PAGE)
        finally:
            vm.close()
        assert proc.wait(20) == 0
    finally:
        proc.kill()
        proc.wait()
    out = proc.stdout.read()
    assert '"working_set": "recorded"' in out
    with ChunkStore(tmp_path / "store") as s:
        assert s.get_working_set("vm") == [(CHUNK, CHUNK)]

"""The chunk store: round trips, zero elision, dedup, remove/gc, crash consistency, verify."""

from __future__ import annotations

import os
import random
import threading
import time

import lmdb
import pytest

from snapshot import (
    ZERO_CHUNK,
    BadSnapshotInput,
    ChunkMissing,
    ChunkStore,
    InvalidSnapshotId,
    MemoryFileLayout,
    SnapshotExists,
    SnapshotNotFound,
    StoreConfigMismatch,
    read_state,
    write_state,
)
from snapshot.chunkstore import _REF, ChunkStoreError
from vmm.memory import GuestMemory

from tests.unit.snapshot._guest import PAGE, MiB, corpus, layout_of, pattern_page, save_guest

CHUNK = 64 << 10


def chunk_files(store: ChunkStore) -> list[str]:
    out = []
    for d in os.listdir(store.chunk_dir):
        out += [os.path.join(d, f) for f in os.listdir(os.path.join(store.chunk_dir, d)) if not f.startswith(".tmp-")]
    return out


def tmp_files(store: ChunkStore) -> list[str]:
    out = []
    for d in os.listdir(store.chunk_dir):
        out += [f for f in os.listdir(os.path.join(store.chunk_dir, d)) if f.startswith(".tmp-")]
    return out


@pytest.fixture
def guest(tmp_path):
    """16 MiB guest: 4 MiB of guest-like content, a few scattered pages, the rest zero."""
    mem = GuestMemory.anonymous([(0, 16 * MiB)])
    mem.write(0, corpus(4 * MiB))
    for p in (2000, 2001, 3000, 4095):
        mem.write(p * PAGE, pattern_page(p))
    state, memory = save_guest(mem, tmp_path, "guest")
    yield mem, state, memory
    mem.close()


def test_put_then_read_back_every_way(store, guest, tmp_path):
    mem, state, memory = guest
    stats = store.put_snapshot("vm-1", state, memory, {"template": "python-3.11"}, layout=layout_of(mem))
    assert stats.logical_bytes == 16 * MiB
    assert stats.chunks == 256
    assert stats.new_stored_bytes < stats.new_raw_bytes
    original = memory.read_bytes()

    # Chunk by chunk.
    for offset in (0, CHUNK, 2000 * PAGE, 16 * MiB - 1):
        start = offset - offset % CHUNK
        assert store.get_chunk("vm-1", offset) == original[start:start + CHUNK]
    # Ranges across chunk boundaries, into a caller's buffer.
    buf = bytearray(3 * CHUNK + 100)
    assert store.read_into("vm-1", CHUNK - 50, buf) == len(buf)
    assert bytes(buf) == original[CHUNK - 50:CHUNK - 50 + len(buf)]
    # A zero chunk is a ref without a digest.
    ref = store.locate("vm-1", 10 * MiB)
    assert ref.digest is None and ref.offset == 10 * MiB and ref.length == CHUNK
    # The whole snapshot, back as files.
    store.materialize("vm-1", tmp_path / "out.mem", tmp_path / "out.state")
    assert (tmp_path / "out.mem").read_bytes() == original
    assert (tmp_path / "out.state").read_bytes() == state.read_bytes()
    assert read_state(tmp_path / "out.state")["name"] == "guest"
    # Sparse: the zero chunks are holes in the materialized file.
    assert os.stat(tmp_path / "out.mem").st_blocks * 512 < 6 * MiB
    assert store.verify().ok


def test_zero_chunks_are_not_stored(store, tmp_path):
    mem = GuestMemory.anonymous([(0, 64 * MiB)])
    mem.write(5 * MiB, b"\x01")
    state, memory = save_guest(mem, tmp_path)
    stats = store.put_snapshot("sparse", state, memory)
    assert stats.zero_chunks == stats.chunks - 1
    assert stats.zero_bytes == 64 * MiB - CHUNK
    assert len(chunk_files(store)) == 2  # the one data chunk and the state file
    info = store.show("sparse")
    assert info.chunks == 1024 and info.zero_chunks == 1023
    assert store.get_chunk("sparse", 0) == bytes(CHUNK)
    mem.close()


def test_chunks_never_cross_region_boundaries(store, tmp_path):
    # A region whose size is not a chunk multiple: the last chunk is short.
    mem = GuestMemory.anonymous([(0, CHUNK + 3 * PAGE), (1 << 30, 2 * CHUNK)])
    for r in mem.regions:
        for p in range(r.size // PAGE):
            mem.write(r.guest_addr + p * PAGE, pattern_page(r.guest_addr // PAGE + p))
    layout = layout_of(mem)
    state, memory = save_guest(mem, tmp_path)
    store.put_snapshot("two-regions", state, memory, layout=layout)
    short = store.locate("two-regions", CHUNK + PAGE)
    assert (short.offset, short.length) == (CHUNK, 3 * PAGE)
    second = store.locate("two-regions", CHUNK + 3 * PAGE)
    assert (second.offset, second.length) == (CHUNK + 3 * PAGE, CHUNK)
    store.materialize("two-regions", tmp_path / "out.mem")
    assert (tmp_path / "out.mem").read_bytes() == memory.read_bytes()
    assert store.show("two-regions").layout == layout
    mem.close()


def test_two_templates_sharing_pages_store_them_once(store, tmp_path):
    shared = corpus(8 * MiB)
    a = GuestMemory.anonymous([(0, 32 * MiB)])
    b = GuestMemory.anonymous([(0, 32 * MiB)])
    for m in (a, b):
        m.write(0, shared)  # same kernel and base image at the same addresses
    a.write(16 * MiB, random.Random(1).randbytes(2 * MiB))  # what makes each template itself
    b.write(16 * MiB, random.Random(2).randbytes(2 * MiB))
    sa, ma = save_guest(a, tmp_path, "a")
    sb, mb = save_guest(b, tmp_path, "b")
    first = store.put_snapshot("python", sa, ma, {"template": "python"})
    second = store.put_snapshot("node", sb, mb, {"template": "node"})
    shared_chunks = 8 * MiB // CHUNK
    assert first.dedup_across == 0
    assert second.dedup_across == shared_chunks
    assert second.new_chunks == 2 * MiB // CHUNK
    assert second.new_raw_bytes == 2 * MiB
    totals = store.stats()
    assert totals.raw_bytes == first.new_raw_bytes + second.new_raw_bytes + first.state_bytes + second.state_bytes
    assert totals.dedup_ratio == pytest.approx(20 / 12, rel=1e-3)  # 2 x (8 shared + 2 own) MiB over 12 stored
    a.close()
    b.close()


def test_repeated_content_within_one_snapshot_is_stored_once(store, tmp_path):
    mem = GuestMemory.anonymous([(0, 8 * MiB)])
    block = corpus(CHUNK)
    for i in range(0, 8 * MiB, CHUNK):
        mem.write(i, block)
    state, memory = save_guest(mem, tmp_path)
    stats = store.put_snapshot("repeat", state, memory)
    assert stats.new_chunks == 1 and stats.dedup_within == 127
    assert stats.dedup_ratio == 128
    mem.close()


def test_remove_and_gc_keep_what_others_still_use(store, tmp_path):
    shared = corpus(2 * MiB)
    snaps = {}
    for name, seed in (("a", 1), ("b", 2)):
        m = GuestMemory.anonymous([(0, 8 * MiB)])
        m.write(0, shared)
        m.write(4 * MiB, random.Random(seed).randbytes(MiB))
        snaps[name] = save_guest(m, tmp_path, name)
        store.put_snapshot(name, *snaps[name])
        m.close()
    before = len(chunk_files(store))
    released = store.remove("a")
    assert released == MiB // CHUNK + 1  # a's own chunks and its state file
    assert "a" not in store and "b" in store
    assert len(chunk_files(store)) == before  # files stay until gc
    gc = store.gc()
    assert gc.chunks_deleted == released and gc.bytes_freed > 0
    assert len(chunk_files(store)) == before - released
    store.materialize("b", tmp_path / "b.out")
    assert (tmp_path / "b.out").read_bytes() == snaps["b"][1].read_bytes()
    store.remove("b")
    store.gc()
    assert chunk_files(store) == []
    assert store.verify().ok and store.list() == []
    with pytest.raises(SnapshotNotFound):
        store.remove("b")


def test_list_show_stats_and_repr(store, guest):
    mem, state, memory = guest
    store.put_snapshot("z-last", state, memory, {"template": "t", "kernel": "6.1"})
    store.put_snapshot("a-first", state, memory)
    infos = store.list()
    assert [i.snapshot_id for i in infos] == ["a-first", "z-last"]
    info = store.show("z-last")
    assert info.meta == {"template": "t", "kernel": "6.1"}
    assert info.memory_size == 16 * MiB and info.chunk_size == CHUNK
    assert info.state_size == os.path.getsize(state)
    assert abs(info.created_ns - time.time_ns()) < 60e9
    assert info.stats["logical_bytes"] == 16 * MiB
    totals = store.stats()
    assert totals.snapshots == 2 and totals.logical_bytes == 32 * MiB
    assert totals.compression_ratio > 1.5 and totals.dedup_ratio >= 2.0
    assert repr(store).startswith("<ChunkStore ") and "snapshots=2" in repr(store)
    assert repr(store.open("a-first")) == "<SnapshotView a-first 16 MiB chunk=64 KiB regions=1>"


def test_working_set_is_kept_beside_the_manifest(store, guest):
    _, state, memory = guest
    store.put_snapshot("ws", state, memory)
    assert store.get_working_set("ws") is None
    store.set_working_set("ws", [(CHUNK * 3, CHUNK), (0, CHUNK)])
    assert store.get_working_set("ws") == [(CHUNK * 3, CHUNK), (0, CHUNK)]
    assert store.show("ws").has_working_set
    with pytest.raises(ChunkStoreError, match="outside the memory file"):
        store.set_working_set("ws", [(16 * MiB, PAGE)])
    store.remove("ws")
    with pytest.raises(SnapshotNotFound):
        store.get_working_set("ws")


@pytest.mark.parametrize("bad", ["", "-x", "a/b", "../x", "x" * 129, "é", "a b", 5])
def test_snapshot_ids_are_validated(store, guest, bad):
    _, state, memory = guest
    with pytest.raises(InvalidSnapshotId):
        store.put_snapshot(bad, state, memory)


def test_an_id_is_stored_once(store, guest):
    _, state, memory = guest
    store.put_snapshot("once", state, memory)
    with pytest.raises(SnapshotExists):
        store.put_snapshot("once", state, memory)


def test_inputs_are_checked_before_anything_is_stored(store, guest, tmp_path):
    _, state, memory = guest
    broken = tmp_path / "broken.state"
    broken.write_bytes(state.read_bytes()[:-1])
    with pytest.raises(BadSnapshotInput, match="truncated"):
        store.put_snapshot("x", broken, memory)
    with pytest.raises(BadSnapshotInput, match="the layout describes"):
        store.put_snapshot("x", state, memory, layout=MemoryFileLayout.contiguous([(0, 32 * MiB)]))
    odd = tmp_path / "odd.mem"
    odd.write_bytes(b"x" * 1000)
    with pytest.raises(BadSnapshotInput, match="multiple of 4096"):
        store.put_snapshot("x", state, odd)
    with pytest.raises(BadSnapshotInput, match="No such file"):
        store.put_snapshot("x", state, tmp_path / "absent.mem")
    with pytest.raises(BadSnapshotInput, match="meta"):
        store.put_snapshot("x", state, memory, {"when": 1.5})
    assert chunk_files(store) == [] and store.list() == []


def test_store_settings_are_fixed_at_creation(tmp_path):
    with ChunkStore(tmp_path / "s", chunk_size=2 << 20, zstd_level=1) as s:
        assert (s.chunk_size, s.zstd_level) == (2 << 20, 1)
    with ChunkStore(tmp_path / "s") as s:
        assert s.chunk_size == 2 << 20
    with pytest.raises(StoreConfigMismatch, match="chunk size 2097152, asked for 65536"):
        ChunkStore(tmp_path / "s", chunk_size=64 << 10)
    with pytest.raises(StoreConfigMismatch, match="power of two"):
        ChunkStore(tmp_path / "t", chunk_size=3 << 12)


def test_two_handles_on_one_root_share_the_catalog(tmp_path, guest):
    _, state, memory = guest
    with ChunkStore(tmp_path / "s") as one, ChunkStore(tmp_path / "s") as two:
        one.put_snapshot("shared", state, memory)
        assert "shared" in two
        assert two.get_chunk("shared", 0) == memory.read_bytes()[:CHUNK]


def test_a_replaced_snapshot_is_not_served_from_a_stale_cache(store, tmp_path):
    versions = []
    for i in range(2):
        m = GuestMemory.anonymous([(0, MiB)])
        m.write(0, pattern_page(100 + i))
        versions.append(save_guest(m, tmp_path, f"v{i}"))
        m.close()
    store.put_snapshot("tmpl", *versions[0])
    assert store.get_chunk("tmpl", 0)[:PAGE] == pattern_page(100)
    store.remove("tmpl")
    store.put_snapshot("tmpl", *versions[1])
    assert store.get_chunk("tmpl", 0)[:PAGE] == pattern_page(101)


# --- crash consistency -------------------------------------------------------


def test_crash_between_chunk_writes_and_commit(store, guest, monkeypatch):
    _, state, memory = guest
    store.put_snapshot("kept", state, memory)

    other = memory.read_bytes().replace(b"EMBERPG!", b"CRASHED!")
    memory2 = memory.with_name("other.mem")
    memory2.write_bytes(other)

    def crash(*args, **kwargs):
        raise RuntimeError("power cut")

    monkeypatch.setattr(ChunkStore, "_commit_snapshot", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        store.put_snapshot("lost", state, memory2)
    monkeypatch.undo()

    assert "lost" not in store and store.list()[0].snapshot_id == "kept"
    assert store.verify().ok
    gc = store.gc()
    assert gc.chunks_deleted == 3  # the chunks holding pages 2000-2001, 3000 and 4095
    assert store.verify().ok
    store.put_snapshot("lost", state, memory2)
    assert store.get_chunk("lost", 2000 * PAGE)[:PAGE] == other[2000 * PAGE:2001 * PAGE]


@pytest.mark.parametrize("point", ["mid-chunks", "before-commit"])
def test_process_killed_mid_put(tmp_path, guest, point):
    _, state, memory = guest
    root = tmp_path / "store"
    with ChunkStore(root) as store:
        store.put_snapshot("kept", state, memory)
    big = GuestMemory.anonymous([(0, 16 * MiB)])
    big.write(0, corpus(12 * MiB)[::-1])  # new content: every chunk is new
    state2, memory2 = save_guest(big, tmp_path, "big")
    big.close()

    pid = os.fork()
    if pid == 0:  # the child: a fresh store (LMDB handles do not survive fork)
        try:
            child = ChunkStore(root)
            if point == "mid-chunks":
                real = ChunkStore._write_chunk
                count = [0]

                def write_then_die(self, digest, data):
                    if count[0] == 40:
                        os._exit(7)
                    count[0] += 1
                    return real(self, digest, data)

                ChunkStore._write_chunk = write_then_die  # type: ignore[method-assign]
            else:
                def die(*args, **kwargs):
                    os._exit(7)

                ChunkStore._commit_snapshot = die  # type: ignore[method-assign]
            child.put_snapshot("doomed", state2, memory2)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 7

    with ChunkStore(root) as store:
        assert [i.snapshot_id for i in store.list()] == ["kept"]
        assert store.verify().ok
        orphans = len(chunk_files(store)) - store.stats().chunks
        assert orphans >= 40
        gc = store.gc()
        assert gc.chunks_deleted == orphans
        assert tmp_files(store) == []
        assert store.verify().ok
        store.put_snapshot("doomed", state2, memory2)
        store.materialize("doomed", tmp_path / "out.mem")
        assert (tmp_path / "out.mem").read_bytes() == memory2.read_bytes()
        assert store.verify().ok


def test_unreferenced_chunk_files_are_never_trusted(store, guest):
    _, state, memory = guest
    data = memory.read_bytes()[:CHUNK]
    import hashlib
    digest = hashlib.sha256(data).digest()
    path = store.chunk_path(digest)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"torn write after a crash")
    store.put_snapshot("vm", state, memory)
    assert store.get_chunk("vm", 0) == data
    assert store.verify().ok


def test_leftover_temporary_files_are_collected(store, guest):
    _, state, memory = guest
    store.put_snapshot("vm", state, memory)
    d = os.path.join(store.chunk_dir, "ab")
    os.makedirs(d, exist_ok=True)
    open(os.path.join(d, ".tmp-123-456-abcdef"), "wb").close()
    assert store.gc().tmp_files_deleted == 1
    assert tmp_files(store) == []


def test_gc_waits_for_a_put_in_flight(store, guest, monkeypatch):
    _, state, memory = guest
    paused = threading.Event()
    release = threading.Event()
    real = ChunkStore._commit_snapshot

    def slow_commit(self, *args):
        paused.set()
        release.wait(10)
        return real(self, *args)

    monkeypatch.setattr(ChunkStore, "_commit_snapshot", slow_commit)
    put = threading.Thread(target=store.put_snapshot, args=("inflight", state, memory))
    put.start()
    assert paused.wait(10)
    gc_done = threading.Event()
    gc_thread = threading.Thread(target=lambda: (store.gc(), gc_done.set()))
    gc_thread.start()
    # The put's chunks are written but unreferenced: a gc now would delete them.
    assert not gc_done.wait(0.3)
    release.set()
    put.join(10)
    gc_thread.join(10)
    assert gc_done.is_set()
    assert store.verify().ok
    store.materialize("inflight", memory.with_name("out.mem"))
    assert memory.with_name("out.mem").read_bytes() == memory.read_bytes()


# --- verify ------------------------------------------------------------------


def test_verify_finds_missing_and_corrupt_chunks_and_bad_refcounts(store, guest):
    _, state, memory = guest
    store.put_snapshot("vm", state, memory)
    assert store.verify().ok
    view = store.open("vm")
    refs = [r for r in view.chunks() if r.digest is not None]

    os.unlink(store.chunk_path(refs[0].digest))
    with open(store.chunk_path(refs[1].digest), "r+b") as f:
        f.seek(20)
        f.write(b"\xff\xff\xff\xff")
    with store.env.begin(write=True) as txn:
        count, stored, raw = _REF.unpack(txn.get(refs[2].digest, db=store.db_refs))
        txn.put(refs[2].digest, _REF.pack(count + 1, stored, raw), db=store.db_refs)

    report = store.verify()
    assert not report.ok
    text = "\n".join(report.problems)
    assert f"chunk {refs[0].digest.hex()}: file missing" in text
    assert refs[1].digest.hex() in text
    assert f"chunk {refs[2].digest.hex()}: refcount 2, referenced by 1" in text
    assert len(report.problems) == 3
    with pytest.raises(ChunkMissing):
        store.get_chunk("vm", refs[0].offset)


def test_a_corrupt_manifest_is_reported_not_crashed_on(store, guest):
    _, state, memory = guest
    store.put_snapshot("vm", state, memory)
    with store.env.begin(write=True) as txn:
        txn.put(b"vm", b"\x08\x00", db=store.db_snapshots)  # an empty dict
    report = store.verify()
    assert any("vm: unreadable manifest" in p for p in report.problems)
    with pytest.raises(ChunkStoreError, match="unknown manifest version"):
        store.open("vm")
    assert ZERO_CHUNK == bytes(32)


def test_catalog_is_an_lmdb_environment(store):
    assert isinstance(store.env, lmdb.Environment)
    assert os.path.exists(os.path.join(store.catalog_dir, "data.mdb"))


def test_state_files_are_deduplicated_too(store, tmp_path):
    m = GuestMemory.anonymous([(0, MiB)])
    state, memory = save_guest(m, tmp_path)
    write_state(state, {"same": True})
    store.put_snapshot("one", state, memory)
    stats = store.put_snapshot("two", state, memory)
    assert stats.new_chunks == 0 and stats.new_stored_bytes == 0
    assert store.read_state_bytes("two") == state.read_bytes()
    m.close()

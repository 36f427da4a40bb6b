"""snapshot.auth and the memory-file checks in snapshot.memfile: signatures, digests, seals, keys."""

from __future__ import annotations

import hashlib
import os
import stat
import struct

import pytest

from snapshot import ChunkStoreSource, FaultResolver, MemoryFileSource, UffdMapping
from snapshot.auth import (
    DEFAULT_SIGN_CHUNK_SIZE,
    KEY_SIZE,
    KeyFileError,
    MalformedSignature,
    MemoryDigest,
    MemoryMismatch,
    SignatureInvalid,
    SignatureMissing,
    SnapshotKey,
    StateMismatch,
    VerifiedSource,
    WrongKey,
    ensure_key_file,
    load_key_file,
    memory_digest_of_buffers,
    read_signature,
    sign_snapshot,
    signature_path,
    verify_signature,
    write_signature,
    zero_chunk_digest,
)
from snapshot.format import MemoryFileLayout, encode_state
from snapshot.memfile import (
    SEAL_XATTR,
    memory_digest_of_file,
    memory_file_sealed,
    seal_memory_file,
    verify_memory_fd,
    write_memory_file,
)
from vmm.memory import GuestMemory

from tests.unit.snapshot._guest import PAGE, MiB, layout_of, pattern_page, save_guest

CHUNK = DEFAULT_SIGN_CHUNK_SIZE


@pytest.fixture
def key() -> SnapshotKey:
    return SnapshotKey(bytes(range(KEY_SIZE)))


@pytest.fixture
def guest():
    """4 MiB of guest RAM at 0: a few pattern pages, the rest zero (holes in the file)."""
    m = GuestMemory.anonymous([(0, 4 * MiB)])
    for page in (0, 1, 17, 300, 1023):
        m.write(page * PAGE, pattern_page(page))
    yield m
    m.close()


@pytest.fixture
def signed(tmp_path, guest, key):
    """(state, memory, signature path, SnapshotSignature) of a signed snapshot of `guest`."""
    state, memory = save_guest(guest, tmp_path)
    digest = memory_digest_of_buffers([r.mapping for r in guest.regions])
    sig = signature_path(state)
    write_signature(sig, sign_snapshot(key, state.read_bytes(), digest))
    return state, memory, sig, read_signature(key, sig)


# --- keys ----------------------------------------------------------------------------------


def test_key_derivation_separates_uses_and_repr_hides_the_secret(key) -> None:
    assert len({key.secret, key.mac_key, key.seal_key}) == 3
    assert key.key_id != SnapshotKey(bytes(32)).key_id
    assert key.secret.hex() not in repr(key) and key.mac_key.hex() not in repr(key)
    with pytest.raises(KeyFileError):
        SnapshotKey(b"short")


def test_key_file_is_created_0600_once_and_reads_back(tmp_path) -> None:
    path = tmp_path / "home" / "snapshot.key"
    first = ensure_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.stat().st_size == KEY_SIZE
    assert ensure_key_file(path).secret == first.secret  # not replaced
    assert load_key_file(path).key_id == first.key_id
    hexfile = tmp_path / "hex.key"
    hexfile.write_text(first.secret.hex() + "\n")
    hexfile.chmod(0o600)
    assert load_key_file(hexfile).secret == first.secret


@pytest.mark.parametrize("content, mode, needle", [
    (bytes(32), 0o644, "chmod 600"),
    (bytes(32), 0o660, "chmod 600"),
    (b"x" * 31, 0o600, "raw bytes"),
    (b"zz" * 32, 0o600, "hex digits"),
])
def test_bad_key_files_are_refused(tmp_path, content, mode, needle) -> None:
    path = tmp_path / "k"
    path.write_bytes(content)
    path.chmod(mode)
    with pytest.raises(KeyFileError, match=needle):
        load_key_file(path)
    with pytest.raises(KeyFileError):
        load_key_file(tmp_path / "missing")


# --- signatures ----------------------------------------------------------------------------


def test_signature_round_trip(signed, key, guest) -> None:
    state, memory, sig, signature = signed
    signature.check_state(state.read_bytes())
    assert signature.key_id == key.key_id
    assert signature.memory.size == 4 * MiB and signature.memory.count == 4 * MiB // CHUNK
    assert signature.memory.digest(2) == zero_chunk_digest(CHUNK)  # pages 32..47: all zero
    assert signature.memory.digest(1) == hashlib.sha256(bytes(PAGE) + pattern_page(17) + bytes(14 * PAGE)).digest()
    assert "4 MiB" in repr(signature)


def test_every_flipped_byte_of_a_signature_is_refused(signed, key) -> None:
    data = bytearray(open(signed[2], "rb").read())
    # Every byte of the prefix and the MAC, and a sample of the body (the chunk table is long).
    positions = list(range(24)) + list(range(24, len(data) - 32, 97)) + list(range(len(data) - 32, len(data)))
    for pos in positions:
        bad = bytearray(data)
        bad[pos] ^= 0x01
        with pytest.raises((SignatureInvalid, MalformedSignature)):
            verify_signature(key, bytes(bad))


@pytest.mark.parametrize("cut", [0, 10, 24, 100, -1])
def test_truncated_and_extended_signatures_are_refused(signed, key, cut) -> None:
    data = open(signed[2], "rb").read()
    with pytest.raises(MalformedSignature):
        verify_signature(key, data[:cut])
    with pytest.raises(MalformedSignature):
        verify_signature(key, data + b"\0")


def test_the_mac_is_checked_before_the_body_is_decoded(signed, key, monkeypatch) -> None:
    import snapshot.auth as auth
    data = bytearray(open(signed[2], "rb").read())
    data[40] ^= 0xFF
    calls = []
    monkeypatch.setattr(auth, "decode_value", lambda *a: calls.append(a))
    with pytest.raises(SignatureInvalid):
        verify_signature(key, bytes(data))
    assert calls == []


def test_another_key_is_named_and_refused(signed) -> None:
    other = SnapshotKey(os.urandom(32))
    with pytest.raises(WrongKey, match=other.key_id.hex()):
        read_signature(other, signed[2])


def test_a_forged_body_with_a_recomputed_sha256_but_no_key_is_refused(signed, key) -> None:
    """What an attacker without the key can do: rewrite the body and keep the old MAC."""
    data = open(signed[2], "rb").read()
    body = data[24:-32]
    forged_digest = MemoryDigest(4 * MiB, CHUNK, bytes(32 * (4 * MiB // CHUNK)))
    from snapshot.format import encode_value
    new_body = encode_value({"state": {"sha256": hashlib.sha256(b"x").digest(), "size": 1},
                             "memory": forged_digest.to_tree()})
    forged = data[:12] + struct.pack("<I", len(new_body)) + data[16:24] + new_body + data[-32:]
    assert body != new_body
    with pytest.raises(SignatureInvalid):
        verify_signature(key, forged)


def test_missing_signature(tmp_path, key) -> None:
    with pytest.raises(SignatureMissing):
        read_signature(key, tmp_path / "vm.state.sig")


@pytest.mark.parametrize("tamper", ["flip", "truncate", "extend", "other"])
def test_state_bytes_must_be_the_signed_ones(signed, key, tamper) -> None:
    state, _, _, signature = signed
    data = bytearray(state.read_bytes())
    if tamper == "flip":
        data[len(data) // 2] ^= 0x40
    elif tamper == "truncate":
        del data[-1:]
    elif tamper == "extend":
        data += b"\0"
    else:  # a valid state file of another snapshot
        data = bytearray(encode_state({"name": "other"}))
    with pytest.raises(StateMismatch):
        signature.check_state(bytes(data))


# --- memory digests ------------------------------------------------------------------------


def test_digest_of_the_buffers_equals_the_digest_of_the_sparse_file(tmp_path, signed, guest) -> None:
    _, memory, _, signature = signed
    assert os.stat(memory).st_blocks * 512 < MiB  # sparse: the zero pages are holes
    assert memory_digest_of_file(memory, chunk_size=CHUNK) == signature.memory


def test_digest_spans_regions_not_aligned_to_chunks() -> None:
    a, b = bytes([1]) * (3 * PAGE), bytes([2]) * (20 * PAGE)
    digest = memory_digest_of_buffers([a, b], chunk_size=4 * PAGE)
    whole = a + b
    assert digest.size == len(whole) and digest.count == 6
    for i in range(digest.count):
        lo, hi = digest.bounds(i)
        assert digest.digest(i) == hashlib.sha256(whole[lo:hi]).digest()


@pytest.mark.parametrize("where", ["data", "hole", "truncate", "extend"])
def test_a_tampered_memory_file_is_refused(signed, where) -> None:
    _, memory, _, signature = signed
    with open(memory, "r+b") as f:
        if where == "data":
            f.seek(17 * PAGE + 5)
            byte = f.read(1)
            f.seek(17 * PAGE + 5)
            f.write(bytes([byte[0] ^ 1]))
        elif where == "hole":
            f.seek(2 * MiB + 123)
            f.write(b"\x01")
        elif where == "truncate":
            f.truncate(4 * MiB - PAGE)
        else:
            f.truncate(4 * MiB + PAGE)
    fd = os.open(memory, os.O_RDONLY)
    try:
        with pytest.raises(MemoryMismatch):
            verify_memory_fd(fd, signature.memory)
    finally:
        os.close(fd)


def test_an_intact_memory_file_verifies(signed) -> None:
    _, memory, _, signature = signed
    fd = os.open(memory, os.O_RDONLY)
    try:
        verify_memory_fd(fd, signature.memory)
    finally:
        os.close(fd)


@pytest.mark.parametrize("size, chunk", [(0, CHUNK), (PAGE, 100), (PAGE, 0)])
def test_memory_digest_shape_is_validated(size, chunk) -> None:
    with pytest.raises(MalformedSignature):
        MemoryDigest(size, chunk, b"")


# --- seals ---------------------------------------------------------------------------------


def _sealed(path, key, signature) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return memory_file_sealed(fd, key, signature)
    finally:
        os.close(fd)


@pytest.mark.skipif(os.geteuid() != 0, reason="sealing makes files root-owned")
def test_seal_makes_the_file_read_only_and_binds_it_to_its_signature(tmp_path, signed, key, guest) -> None:
    state, memory, _, signature = signed
    assert not _sealed(memory, key, signature)  # written 0644: not sealed
    assert seal_memory_file(memory, key, signature)
    assert stat.S_IMODE(memory.stat().st_mode) & 0o222 == 0
    assert _sealed(memory, key, signature)
    # Another key, or another snapshot's signature, does not accept the seal.
    assert not _sealed(memory, SnapshotKey(os.urandom(32)), signature)
    other_sig = sign_snapshot(key, b"other state", signature.memory)
    assert not _sealed(memory, key, verify_signature(key, other_sig))
    # Writable again (only root could do this): no longer sealed.
    memory.chmod(0o644)
    assert not _sealed(memory, key, signature)
    memory.chmod(0o444)
    assert _sealed(memory, key, signature)
    os.chown(memory, 65534, 65534)  # owned by someone who could rewrite it
    assert not _sealed(memory, key, signature)


@pytest.mark.skipif(os.geteuid() != 0, reason="sealing makes files root-owned")
def test_seal_refuses_a_tampered_file_and_does_not_seal_it(signed, key) -> None:
    _, memory, _, signature = signed
    with open(memory, "r+b") as f:
        f.seek(PAGE)
        f.write(b"\xff")
    with pytest.raises(MemoryMismatch):
        seal_memory_file(memory, key, signature)
    with pytest.raises(OSError):
        os.getxattr(memory, SEAL_XATTR)


# --- the page server's source --------------------------------------------------------------


def test_verified_source_serves_intact_chunks_and_refuses_a_tampered_one(signed, key) -> None:
    _, memory, _, signature = signed
    with open(memory, "r+b") as f:
        f.seek(300 * PAGE + 9)  # page 300 lies in chunk 18
        f.write(b"\x00\x00")
    inner = MemoryFileSource(memory)
    try:
        source = VerifiedSource(inner, signature.memory)
        assert source.unit(5 * PAGE) == (0, CHUNK)
        assert source.read(0, CHUNK)[:PAGE] == pattern_page(0)
        assert source.read(PAGE, PAGE) == pattern_page(1)  # a partial read checks the whole chunk
        assert source.read(CHUNK * 2, CHUNK) is None  # zero chunk
        assert source.read(CHUNK - PAGE, 2 * PAGE) == bytes(2 * PAGE)  # across two chunks
        with pytest.raises(MemoryMismatch, match="chunk 18"):
            source.read(18 * CHUNK, CHUNK)
        # Through the fault resolver: the fault on the bad chunk raises, as the page server needs.
        base = 0x7F0000000000
        resolver = FaultResolver([UffdMapping(base, 4 * MiB, 0, PAGE)], source)
        assert resolver.on_fault(base + 17 * PAGE)[0].data[PAGE:2 * PAGE] == pattern_page(17)
        with pytest.raises(MemoryMismatch):
            resolver.on_fault(base + 300 * PAGE)
    finally:
        inner.close()


def test_verified_source_over_the_chunk_store(tmp_path, store, signed, key, guest) -> None:
    state, memory, _, signature = signed
    store.put_snapshot("vm", state, memory, layout=layout_of(guest))
    source = VerifiedSource(ChunkStoreSource(store.open("vm")), signature.memory)
    for i in range(signature.memory.count):
        lo, hi = signature.memory.bounds(i)
        source.read(lo, hi - lo)
    # A chunk file rewritten with other content (valid zstd) is caught.
    ref = store.open("vm").locate(0)
    import zstandard
    path = store.chunk_path(ref.digest)
    os.chmod(path, 0o644)
    with open(path, "wb") as f:
        f.write(zstandard.ZstdCompressor().compress(bytes([7]) * ref.length))
    fresh = VerifiedSource(ChunkStoreSource(store.open("vm")), signature.memory)
    with pytest.raises(MemoryMismatch, match="chunk 0"):
        fresh.read(0, CHUNK)


def test_verified_source_size_must_match(tmp_path, key) -> None:
    path = tmp_path / "m"
    layout = MemoryFileLayout.contiguous([(0, MiB)])
    write_memory_file(path, layout, [bytes(MiB)])
    inner = MemoryFileSource(path)
    try:
        with pytest.raises(MemoryMismatch):
            VerifiedSource(inner, memory_digest_of_buffers([bytes(2 * MiB)]))
    finally:
        inner.close()


def test_a_data_chunk_turned_into_a_hole_is_refused(tmp_path, signed, guest) -> None:
    """The signature says chunk 18 holds page 300; a file where it is a hole (zeros) does not match."""
    _, _, _, signature = signed
    guest.write(300 * PAGE, bytes(PAGE))
    zeroed = tmp_path / "zeroed.mem"
    write_memory_file(zeroed, layout_of(guest), [r.mapping for r in guest.regions])
    fd = os.open(zeroed, os.O_RDONLY)
    try:
        with pytest.raises(MemoryMismatch, match="chunk 18 "):
            verify_memory_fd(fd, signature.memory)
    finally:
        os.close(fd)


def test_memory_shorter_than_a_chunk_multiple(tmp_path, key) -> None:
    """The last chunk is short (a size not a multiple of the chunk): hole and data cases both check it."""
    size = CHUNK * 2 + 3 * PAGE
    for tail in (bytes(3 * PAGE), b"\x09" * (3 * PAGE)):
        data = bytes(2 * CHUNK) + tail
        path = tmp_path / "odd.mem"
        write_memory_file(path, MemoryFileLayout.contiguous([(0, size)]), [data])
        digest = memory_digest_of_buffers([data])
        assert memory_digest_of_file(path, chunk_size=CHUNK) == digest
        fd = os.open(path, os.O_RDONLY)
        try:
            verify_memory_fd(fd, digest)
            other = memory_digest_of_buffers([bytes(2 * CHUNK) + (b"\x01" * (3 * PAGE))])
            with pytest.raises(MemoryMismatch, match="chunk 2 "):
                verify_memory_fd(fd, other)
        finally:
            os.close(fd)

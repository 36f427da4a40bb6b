"""vmm.persist with a snapshot key: signing on create, the state checked before it is parsed,
the memory file checked (or its seal) before it is mapped."""

from __future__ import annotations

import os

import pytest

import vmm.persist as persist
from snapshot.auth import SnapshotKey, read_signature, signature_path
from snapshot.format import MemoryFileLayout, encode_state, write_state
from snapshot.memfile import seal_memory_file, write_memory_file
from vmm.persist import FileBackend, MicrovmState, SnapshotLoadError

MiB = 1 << 20
PAGE = 4096


@pytest.fixture
def key() -> SnapshotKey:
    return SnapshotKey(b"k" * 32)


def _guest_buffers() -> list[bytearray]:
    low, high = bytearray(2 * MiB), bytearray(MiB)
    low[PAGE:2 * PAGE] = b"\x5a" * PAGE
    high[-PAGE:] = b"\xa5" * PAGE
    return [low, high]


@pytest.fixture
def snap(tmp_path, key):
    """A signed snapshot whose state tree is not a MicrovmState (the parser's refusal is the marker)."""
    buffers = _guest_buffers()
    layout = MemoryFileLayout.contiguous([(0, 2 * MiB), (4 * MiB, MiB)])
    state, mem = tmp_path / "vm.state", tmp_path / "vm.mem"
    write_state(state, {"not": "a microvm"})
    write_memory_file(mem, layout, buffers)
    persist._sign(str(state), buffers, key)
    return state, mem, layout


def test_signing_writes_the_sidecar_and_unsigned_create_removes_a_stale_one(snap, key) -> None:
    state, _, _ = snap
    sig = read_signature(key, signature_path(state))
    sig.check_state(state.read_bytes())
    assert sig.memory.size == 3 * MiB
    assert persist._sign(str(state), _guest_buffers(), None) == 0
    assert not os.path.exists(signature_path(state))


def test_an_authentic_state_reaches_the_parser(snap, key) -> None:
    state, _, _ = snap
    with pytest.raises(SnapshotLoadError, match="invalid snapshot file.*unknown field|invalid snapshot file.*missing"):
        MicrovmState.read(str(state), key=key)


@pytest.mark.parametrize("tamper, needle", [
    ("flip", "State file does not match its signature"),
    ("truncate", "State file does not match"),
    ("other", "State file does not match"),
    ("unsigned", "not signed"),
    ("bad-sig", "signature does not verify"),
    ("other-key", "signed with key"),
])
def test_a_tampered_or_unsigned_state_is_refused_before_it_is_parsed(snap, key, tamper, needle, monkeypatch) -> None:
    state, _, _ = snap
    sig = signature_path(state)
    data = bytearray(state.read_bytes())
    if tamper == "flip":
        data[-3] ^= 0x10
        state.write_bytes(data)
    elif tamper == "truncate":
        state.write_bytes(data[:-8])
    elif tamper == "other":
        state.write_bytes(encode_state({"not": "a microvm either"}))
    elif tamper == "unsigned":
        os.unlink(sig)
    elif tamper == "bad-sig":
        raw = bytearray(open(sig, "rb").read())
        raw[-1] ^= 1
        open(sig, "wb").write(raw)
    parsed = []
    monkeypatch.setattr(persist, "decode_state", lambda *a, **k: parsed.append(a))
    monkeypatch.setattr(MicrovmState, "from_tree", classmethod(lambda cls, t: parsed.append(t)))
    use = SnapshotKey(b"o" * 32) if tamper == "other-key" else key
    with pytest.raises(SnapshotLoadError, match="is not authentic") as info:
        MicrovmState.read(str(state), key=use)
    assert needle in str(info.value)
    assert parsed == []


def test_without_a_key_an_unsigned_state_reads_as_before(snap) -> None:
    state, _, _ = snap
    os.unlink(signature_path(state))
    with pytest.raises(SnapshotLoadError, match="invalid snapshot file.*(unknown|missing) field"):
        MicrovmState.read(str(state))


def _backend(snap, key, mem=None) -> FileBackend:
    state, default_mem, _ = snap
    sig = read_signature(key, signature_path(state))
    return FileBackend(str(mem or default_mem), key=key, signature=sig)


def test_an_intact_memory_file_is_hashed_then_mapped(snap, key) -> None:
    _, _, layout = snap
    backend = _backend(snap, key)
    mem = backend.open(layout)
    try:
        assert backend.verification == "hashed"
        assert mem.regions[0].file_path == backend.path
        assert bytes(mem.regions[0].mapping[PAGE:PAGE + 4]) == b"\x5a" * 4
    finally:
        mem.close()


@pytest.mark.parametrize("where", ["data", "hole", "truncate"])
def test_a_tampered_memory_file_is_refused(snap, key, where) -> None:
    _, mem, layout = snap
    with open(mem, "r+b") as f:
        if where == "data":
            f.seek(PAGE + 1)
            f.write(b"\x00")
        elif where == "hole":
            f.seek(MiB)
            f.write(b"\x01")
        else:
            f.truncate(3 * MiB - PAGE)
    with pytest.raises(SnapshotLoadError, match="not authentic|has .* bytes"):
        _backend(snap, key).open(layout)


@pytest.mark.skipif(os.geteuid() != 0, reason="sealing makes files root-owned")
def test_a_sealed_memory_file_is_not_hashed_and_a_foreign_seal_does_not_count(tmp_path, snap, key) -> None:
    state, mem, layout = snap
    sig = read_signature(key, signature_path(state))
    assert seal_memory_file(mem, key, sig)
    backend = _backend(snap, key)
    backend.open(layout).close()
    assert backend.verification == "sealed"
    # Another snapshot's memory, sealed for *its* signature, put in place of ours: hashed, and refused.
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    buffers = _guest_buffers()
    buffers[0][0] = 1
    other_state, other_mem = other_dir / "vm.state", other_dir / "vm.mem"
    write_state(other_state, {"not": "a microvm"})
    write_memory_file(other_mem, layout, buffers)
    persist._sign(str(other_state), buffers, key)
    assert seal_memory_file(other_mem, key, read_signature(key, signature_path(other_state)))
    os.rename(other_mem, mem)  # the other sealed inode itself, seal and all
    backend = _backend(snap, key)
    with pytest.raises(SnapshotLoadError, match="not authentic"):
        backend.open(layout)
    assert backend.verification == "none"


def test_key_and_signature_go_together(key) -> None:
    with pytest.raises(ValueError):
        FileBackend("/x", key=key)

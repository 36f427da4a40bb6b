"""Signed snapshots with the test guest: real KVM, real `ember-vmm` and `ember page-server` processes.

A VMM started with ``--snapshot-key-file`` signs what it snapshots and
loads only authentic snapshots: every tampering — one flipped byte in the
state or the memory file, a truncated file, another snapshot's state or
memory with a well-formed signature, no signature, another key's
signature — is refused with a 400 before any VM runs, and the VMM goes on
serving (it then loads the genuine snapshot). A page server given the key
checks every chunk it installs: a tampered chunk in the store ends that
VM. The load cost of the check is measured (File backend: hashing the
memory file's data, and a sealed file).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.page_server import PageServer
from tests.integration.test_snapshot_guest import _boot_echo, _finish_echo, apiclient, work  # noqa: F401

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(600)]

REPO_ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(REPO_ROOT))


@pytest.fixture
def keyfile(work: Path) -> Path:
    path = work / "snapshot.key"
    path.write_bytes(os.urandom(32))
    path.chmod(0o600)
    return path


@pytest.fixture
def vmm(work):
    procs = []

    def start(name: str, key: Path | None):
        args = ("--id", name.split(".")[0], *(("--snapshot-key-file", str(key)) if key else ()))
        p = apiclient.VmmApiProcess(work, args, sock_name=name)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.close()


def _snapshot_echo(vmm, work: Path, testguest: Path, key: Path | None, tag: str, line: str) -> tuple[Path, Path]:
    a = vmm(f"{tag}.sock", key)
    _boot_echo(a, testguest)
    a.send_console(f"{line}\n".encode())
    a.wait_for_output(f"ECHO:{line}")
    assert a.api.patch("/vm", {"state": "Paused"}).status == 204
    state, mem = work / f"{tag}.state", work / f"{tag}.mem"
    resp = a.api.put("/snapshot/create", {"snapshot_path": str(state), "mem_file_path": str(mem)})
    assert resp.status == 204, f"{resp}\n{a.describe()}"
    a.close()
    return state, mem


@pytest.fixture
def signed(vmm, work, testguest, keyfile):
    return _snapshot_echo(vmm, work, testguest, keyfile, "a", "before")


def _load(proc, state: Path, mem: Path, backend: str = "File", resume: bool = True):
    return proc.api.put("/snapshot/load", {"snapshot_path": str(state), "mem_backend": {
        "backend_type": backend, "backend_path": str(mem)}, "resume_vm": resume})


def _refused(proc, state: Path, mem: Path, *needles: str) -> None:
    resp = _load(proc, state, mem)
    assert resp.status == 400, f"{resp}\n{proc.describe()}"
    for needle in needles:
        assert needle in resp.fault, resp.fault
    assert proc.api.get("/").json()["state"] == "Not started"  # no VM runs, the VMM still serves


def _copy(src: Path, dst: Path, flip_at: int | None = None, truncate_to: int | None = None) -> Path:
    data = bytearray(src.read_bytes())
    if flip_at is not None:
        data[flip_at] ^= 0x01
    if truncate_to is not None:
        del data[truncate_to:]
    dst.write_bytes(data)
    return dst


def _first_data_offset(mem: Path) -> int:
    fd = os.open(mem, os.O_RDONLY)
    try:
        return os.lseek(fd, 1 << 20, os.SEEK_DATA)  # the guest's image, loaded at 1 MiB
    finally:
        os.close(fd)


def test_signed_create_then_load_continues(vmm, signed, keyfile) -> None:
    state, mem = signed
    sig = Path(f"{state}.sig")
    assert sig.exists() and sig.read_bytes()[:8] == b"EMBERSIG"
    b = vmm("b.sock", keyfile)
    resp = _load(b, state, mem)
    assert resp.status == 204, f"{resp}\n{b.describe()}"
    _finish_echo(b)


def test_tampered_snapshots_are_refused_and_the_vmm_keeps_serving(vmm, work, testguest, signed, keyfile) -> None:
    state, mem = signed
    sig = Path(f"{state}.sig")
    other_state, other_mem = _snapshot_echo(vmm, work, testguest, keyfile, "o", "other")
    b = vmm("b.sock", keyfile)
    t = work / "t"
    t.mkdir()

    # One flipped byte in the state file (its signature beside it, untouched).
    flipped = _copy(state, t / "flip.state", flip_at=state.stat().st_size // 2)
    _copy(sig, t / "flip.state.sig")
    _refused(b, flipped, mem, "not authentic", "State file does not match its signature")
    # A truncated state file.
    short = _copy(state, t / "short.state", truncate_to=100)
    _copy(sig, t / "short.state.sig")
    _refused(b, short, mem, "not authentic", "State file does not match")
    # Another snapshot's state (valid file, valid format) under our signature.
    swapped = _copy(other_state, t / "swap.state")
    _copy(sig, t / "swap.state.sig")
    _refused(b, swapped, mem, "State file does not match")
    # Another snapshot's state with its own signature, but our memory file.
    _refused(b, other_state, mem, "memory file", "not authentic", "Memory does not match")
    # One flipped byte in the memory file (in the guest's code).
    bad_mem = _copy(mem, t / "flip.mem", flip_at=_first_data_offset(mem) + 77)
    _refused(b, state, bad_mem, "memory file", "not authentic", "chunk")
    # A byte written into a hole of the memory file (all-zero memory the guest may use later).
    holed = _copy(mem, t / "hole.mem")
    with open(holed, "r+b") as f:
        f.seek(mem.stat().st_size - 4096)
        f.write(b"\x01")
    _refused(b, state, holed, "Memory does not match")
    # A truncated memory file.
    _refused(b, state, _copy(mem, t / "short.mem", truncate_to=mem.stat().st_size - 4096), "memory file")
    # No signature at all.
    _copy(state, t / "unsigned.state")
    _refused(b, t / "unsigned.state", mem, "not signed")
    # A signature made with another key over the very same files.
    other_key = work / "other.key"
    other_key.write_bytes(os.urandom(32))
    other_key.chmod(0o600)
    _copy(state, t / "rekeyed.state")
    _cli("snapshot", "sign", "--state", str(t / "rekeyed.state"), "--mem", str(mem), "--key-file", str(other_key))
    _refused(b, t / "rekeyed.state", mem, "signed with another key")
    # A flipped byte in the signature itself.
    _copy(state, t / "badsig.state")
    _copy(sig, t / "badsig.state.sig", flip_at=sig.stat().st_size - 40)
    _refused(b, t / "badsig.state", mem, "signature does not verify")

    # After all that, the same VMM loads the genuine snapshot and the guest continues.
    resp = _load(b, state, mem)
    assert resp.status == 204, f"{resp}\n{b.describe()}"
    _finish_echo(b)


def test_firecracker_compatibility_without_a_key(vmm, work, testguest, signed) -> None:
    """No key: unsigned snapshots are made and loaded as before; a signature is not needed."""
    state, mem = _snapshot_echo(vmm, work, testguest, None, "u", "before")
    assert not Path(f"{state}.sig").exists()
    b = vmm("b.sock", None)
    assert _load(b, state, mem).status == 204
    _finish_echo(b)
    c = vmm("c.sock", None)  # a signed snapshot loads too (the signature is not looked at)
    assert _load(c, *signed).status == 204
    _finish_echo(c)


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "poolsvc.cli", *args], cwd=REPO_ROOT, env=ENV,
                         capture_output=True, text=True, timeout=120)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def test_cli_signs_an_unsigned_snapshot_and_verifies_pairs(vmm, work, testguest, keyfile) -> None:
    state, mem = _snapshot_echo(vmm, work, testguest, None, "u", "before")
    b = vmm("b.sock", keyfile)
    _refused(b, state, mem, "not signed")
    _cli("snapshot", "sign", "--state", str(state), "--mem", str(mem), "--key-file", str(keyfile))
    ok = _cli("snapshot", "verify", "--state", str(state), "--mem", str(mem), "--key-file", str(keyfile), "--json")
    assert json.loads(ok.stdout)["ok"] is True
    bad = _copy(mem, work / "bad.mem", flip_at=_first_data_offset(mem))
    out = _cli("snapshot", "verify", "--state", str(state), "--mem", str(bad), "--key-file", str(keyfile), check=False)
    assert out.returncode == 1 and "Memory does not match" in out.stderr, out
    assert _load(b, state, mem).status == 204
    _finish_echo(b)


# --- the uffd path: the page server checks every chunk it installs ------------------------------


def test_page_server_serves_signed_memory_and_refuses_a_tampered_chunk(vmm, work, signed, keyfile) -> None:
    state, mem = signed
    sig = Path(f"{state}.sig")
    # From the raw memory file, signature given explicitly: intact memory serves.
    server = PageServer(work / "ps.sock", "--mem", str(mem), "--key-file", str(keyfile), "--signature", str(sig))
    try:
        b = vmm("b.sock", keyfile)
        assert _load(b, state, work / "ps.sock", "Uffd").status == 204
        _finish_echo(b)
    finally:
        events = server.stop()
    assert events and events[0]["end"] == "hangup" and events[0]["error"] is None, server.stderr

    # Unsigned memory file: a keyed page server does not start.
    out = _cli("page-server", "--socket", str(work / "x.sock"), "--mem", str(mem), "--key-file", str(keyfile),
               check=False)
    assert out.returncode == 1 and "not signed" in out.stderr, out.stderr

    # From the store (the signature travels in the snapshot's meta). The first restore records the
    # guest's working set: which chunks it really reads.
    store = work / "store"
    _cli("snapshot", "put", "echo", "--store", str(store), "--state", str(state), "--mem", str(mem))
    server = PageServer(work / "ps1.sock", "--snapshot", "echo", "--store", str(store), "--key-file", str(keyfile))
    try:
        b = vmm("b1.sock", keyfile)
        assert _load(b, state, work / "ps1.sock", "Uffd").status == 204
        _finish_echo(b)
    finally:
        events = server.stop()
    assert events and events[0]["error"] is None and events[0]["working_set"] == "recorded", server.stderr

    # Rewrite one chunk file the guest reads with other (valid zstd) content.
    import zstandard

    from snapshot import ChunkStore
    with ChunkStore(store) as cs:
        offset, _ = cs.get_working_set("echo")[0]
        ref = cs.locate("echo", offset)
        path = cs.chunk_path(ref.digest)
        data = bytearray(cs.load_chunk(ref.digest, ref.length))
    data[100] ^= 0x01
    os.chmod(path, 0o644)
    Path(path).write_bytes(zstandard.ZstdCompressor().compress(bytes(data)))
    server = PageServer(work / "ps2.sock", "--snapshot", "echo", "--store", str(store), "--key-file", str(keyfile),
                        "--no-prefetch")
    try:
        c = vmm("c.sock", keyfile)
        try:
            # The state is authentic; memory comes lazily, and the first chunk the guest (or the
            # VMM restoring a device) touches may be the forged one, during the load itself.
            _load(c, state, work / "ps2.sock", "Uffd")
        except OSError:
            pass  # the VMM was killed before it could answer
        rc = c.wait(timeout=30)
        assert rc != 0, c.describe()  # the page server stopped the VM rather than serve a forged chunk
    finally:
        server.stop()
    assert "Memory does not match the snapshot's signature" in server.stderr, server.stderr
    assert f"offset {ref.offset:#x}" in server.stderr, server.stderr


# --- cost ----------------------------------------------------------------------------------------


def test_measure_load_cost_of_verification(work, signed, keyfile, capsys) -> None:
    """Median load time (File backend, paused) without a key, with a key (memory hashed) and with a
    key and a sealed memory file; the VMM's own figures (its Info log line), printed for the record.

    The check must keep loads in milliseconds: a sealed memory file adds an
    fstat and a getxattr; an unsealed one adds hashing its data extents.
    """
    from snapshot.auth import load_key_file, read_signature
    from snapshot.memfile import seal_memory_file

    state, mem = signed
    sealed_mem = work / "sealed.mem"
    _copy(mem, sealed_mem)
    key = load_key_file(keyfile)
    can_seal = os.geteuid() == 0 and seal_memory_file(sealed_mem, key, read_signature(key, f"{state}.sig"))
    modes = {"no key": (None, mem), "key, hashed": (keyfile, mem)}
    if can_seal:
        modes["key, sealed"] = (keyfile, sealed_mem)
    took: dict[str, list[float]] = {m: [] for m in modes}
    verify: dict[str, list[float]] = {m: [] for m in modes}
    for run in range(7):
        for m, (mode, (key_path, memory)) in enumerate(modes.items()):  # interleaved: host noise hits every mode alike
            args = ("--id", f"m{run}", "--level", "Info", *(("--snapshot-key-file", str(key_path)) if key_path else ()))
            p = apiclient.VmmApiProcess(work, args, sock_name=f"m{run}-{m}.sock")
            try:
                resp = _load(p, state, memory, resume=False)
                assert resp.status == 204, f"{resp}\n{p.describe()}"
                deadline = time.monotonic() + 10
                while "snapshot loaded" not in p.stderr and time.monotonic() < deadline:
                    time.sleep(0.01)
                line = next(ln for ln in p.stderr.splitlines() if "snapshot loaded" in ln)
                took[mode].append(_field(line, "took_us") / 1000)
                verify[mode].append(_field(line, "memory_verify_us") / 1000)
            finally:
                p.close()
    data_mib = sum(e - s for s, e in _extents(mem)) / (1 << 20)
    with capsys.disabled():
        print(f"\nsnapshot load, File backend, {mem.stat().st_size >> 20} MiB guest ({data_mib:.1f} MiB data), "
              "median of 7 (whole load / memory check), ms:")
        for mode in modes:
            print(f"  {mode:12} {statistics.median(took[mode]):7.2f} / {statistics.median(verify[mode]):6.3f}")
    assert statistics.median(verify["key, hashed"]) > 0
    if can_seal:
        assert statistics.median(verify["key, sealed"]) < statistics.median(verify["key, hashed"])


def _field(line: str, name: str) -> float:
    import re
    m = re.search(rf"{name}[=:]\s*(\d+)", line)
    assert m, line
    return float(m.group(1))


def _extents(path: Path) -> list[tuple[int, int]]:
    from snapshot.memfile import data_extents
    fd = os.open(path, os.O_RDONLY)
    try:
        return list(data_extents(fd, 0, os.fstat(fd).st_size))
    finally:
        os.close(fd)


# --- the pool's templates -------------------------------------------------------------------------


def test_template_store_signs_seals_and_refuses_a_tampered_template(work, testguest) -> None:
    import stat

    from poolsvc.launcher import Launcher, TemplateNotAuthentic, TemplateStore
    from snapshot.memfile import SEAL_XATTR

    store = TemplateStore(work / "home")
    store.key_file = work / "home" / "snapshot.key"
    info = store.create("echo", testguest, boot_args="mode=echo", vcpus=1, mem_mib=64, ready_marker="ECHO READY",
                        timeout=60)
    assert stat.S_IMODE(store.key_file.stat().st_mode) == 0o600
    for path in (info.state_path, Path(f"{info.state_path}.sig"), info.mem_path):
        st = path.stat()
        assert st.st_mode & 0o222 == 0 and st.st_uid == 0, path
    assert len(os.getxattr(info.mem_path, SEAL_XATTR)) == 32
    with Launcher(store, work / "run") as lau:
        h = lau.restore("echo", "c0")
        assert "--snapshot-key-file" in Path(f"/proc/{h.pid}/cmdline").read_bytes().decode(errors="replace")
        lau.destroy(h)
        # The memory file replaced by a copy with one byte changed (a new inode: it has no seal,
        # as a file written by anyone but the pool would not): hashed, and refused.
        forged = _copy(info.mem_path, work / "forged.mem", flip_at=_first_data_offset(info.mem_path) + 1)
        os.rename(forged, info.mem_path)
        with pytest.raises(TemplateNotAuthentic, match="memory file"):
            lau.restore("echo", "c1")
        assert not (lau.root / "c1").exists()

"""`ember snapshot ls|show|rm|gc|put|verify` and the page server's argument errors, on a temporary store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from poolsvc.cli import main
from snapshot import ChunkStore

from tests.unit.poolsvc._vmm import CHUNK, PAGE, SIZE, ZERO_PAGES, write_snapshot


@pytest.fixture
def store_dir(tmp_path) -> Path:
    return tmp_path / "store"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def run_json(capsys, *argv: str):
    rc, out, err = run(capsys, *argv, "--json")
    assert rc == 0, err
    return json.loads(out)


@pytest.fixture
def two_snapshots(tmp_path, store_dir, capsys):
    """`base`, and `child`: the same memory with one chunk changed."""
    state, mem = write_snapshot(tmp_path, "base")
    child_state, child_mem = write_snapshot(tmp_path, "child")
    data = bytearray(child_mem.read_bytes())
    data[3 * CHUNK:3 * CHUNK + PAGE] = b"\x5a" * PAGE
    child_mem.write_bytes(bytes(data))
    put = run_json(capsys, "snapshot", "put", "base", "--state", str(state), "--mem", str(mem),
                   "--store", str(store_dir), "--meta", "template=python")
    assert put["id"] == "base" and put["logical_bytes"] == SIZE and put["new_chunks"] > 0
    rc, out, err = run(capsys, "snapshot", "put", "child", "--state", str(child_state), "--mem", str(child_mem),
                       "--store", str(store_dir))
    assert rc == 0, err
    assert out.startswith("stored child: 2.0 MiB memory")
    return store_dir


def test_ls_lists_every_snapshot(two_snapshots, capsys):
    rows = run_json(capsys, "snapshot", "ls", "--store", str(two_snapshots))
    assert [r["id"] for r in rows] == ["base", "child"]
    base, child = rows
    assert set(base) == {"id", "created", "memory_size", "stored_bytes", "has_working_set"}
    assert base["memory_size"] == child["memory_size"] == SIZE
    # The child shares all but one chunk with the base: it added far less.
    assert 0 < child["stored_bytes"] < base["stored_bytes"] / 4
    assert base["has_working_set"] is False
    with ChunkStore(two_snapshots) as store:
        store.set_working_set("base", [(0, CHUNK)])
    rows = run_json(capsys, "snapshot", "ls", "--store", str(two_snapshots))
    assert [r["has_working_set"] for r in rows] == [True, False]
    rc, out, _ = run(capsys, "snapshot", "ls", "--store", str(two_snapshots))
    lines = out.splitlines()
    assert rc == 0 and lines[0].split() == ["ID", "CREATED", "MEMORY", "STORED", "WORKING", "SET"]
    assert lines[1].startswith("base ") and lines[1].endswith("yes") and "2.0 MiB" in lines[1]


def test_show_gives_chunk_counts_ratios_and_the_working_set(two_snapshots, capsys):
    with ChunkStore(two_snapshots) as store:
        store.set_working_set("base", [(0, CHUNK), (5 * CHUNK, 2 * CHUNK)])
    info = run_json(capsys, "snapshot", "show", "base", "--store", str(two_snapshots))
    assert info["id"] == "base"
    assert info["chunk_size"] == CHUNK
    assert info["chunks"] == SIZE // CHUNK
    assert info["zero_chunks"] == len(ZERO_PAGES) * PAGE // CHUNK
    assert info["nonzero_chunks"] == info["chunks"] - info["zero_chunks"]
    assert info["meta"] == {"template": "python"}
    assert info["working_set"] == {"runs": 2, "bytes": 3 * CHUNK}
    assert info["compression_ratio"] > 2  # repeated patterns compress well
    assert info["space_ratio"] > info["compression_ratio"]  # zero chunks are not stored at all
    assert info["put"]["zero_bytes"] == len(ZERO_PAGES) * PAGE
    assert len(info["state_sha256"]) == 64
    rc, out, _ = run(capsys, "snapshot", "show", "child", "--store", str(two_snapshots))
    assert rc == 0
    assert "working set  none" in out and "chunks       32 of 64.0 KiB (4 zero, 28 stored)" in out


def test_rm_then_gc_frees_only_unshared_chunks(two_snapshots, capsys):
    rc, out, _ = run(capsys, "snapshot", "rm", "child", "--store", str(two_snapshots))
    assert rc == 0 and out.startswith("removed child: 2 chunks no longer referenced")  # its chunk 3 and state
    gc = run_json(capsys, "snapshot", "gc", "--store", str(two_snapshots))
    assert gc["chunks_deleted"] == 2 and gc["bytes_freed"] > 0
    assert [r["id"] for r in run_json(capsys, "snapshot", "ls", "--store", str(two_snapshots))] == ["base"]
    assert run_json(capsys, "snapshot", "gc", "--store", str(two_snapshots))["chunks_deleted"] == 0
    assert run_json(capsys, "snapshot", "verify", "--store", str(two_snapshots))["ok"] is True


def test_verify_reports_a_corrupt_chunk(two_snapshots, capsys):
    chunk = next(p for p in (two_snapshots / "chunks").rglob("*") if p.is_file())
    chunk.write_bytes(b"garbage")
    report = json.loads(run(capsys, "snapshot", "verify", "--store", str(two_snapshots), "--json")[1])
    assert report["ok"] is False and report["problems"]
    rc, out, _ = run(capsys, "snapshot", "verify", "--store", str(two_snapshots))
    assert rc == 1 and out.splitlines()[-1].startswith("PROBLEMS:")
    rc, _, _ = run(capsys, "snapshot", "verify", "--quick", "--store", str(two_snapshots))
    assert rc == 0  # the file is there; its contents are not checked


@pytest.mark.parametrize("argv,message", [
    (["snapshot", "show", "nope"], "ember: No such snapshot: nope\n"),
    (["snapshot", "rm", "nope"], "ember: No such snapshot: nope\n"),
    (["snapshot", "show", "../x"], "ember: Invalid snapshot id"),
    (["page-server", "--socket", "S", "--snapshot", "nope"], "ember: No such snapshot: nope\n"),
])
def test_unknown_ids_are_one_line_errors(two_snapshots, capsys, argv, message):
    rc, out, err = run(capsys, *argv, "--store", str(two_snapshots))
    assert rc == 1 and out == ""
    assert err.startswith(message) and err.count("\n") == 1


def test_put_refuses_bad_input_and_duplicates(two_snapshots, tmp_path, capsys):
    state, mem = write_snapshot(tmp_path, "other")
    rc, _, err = run(capsys, "snapshot", "put", "base", "--state", str(state), "--mem", str(mem),
                     "--store", str(two_snapshots))
    assert (rc, err) == (1, "ember: Snapshot already exists: base\n")
    rc, _, err = run(capsys, "snapshot", "put", "x", "--state", str(mem), "--mem", str(mem),
                     "--store", str(two_snapshots))
    assert rc == 1 and err.startswith("ember: Snapshot files cannot be stored") and err.count("\n") == 1
    rc, _, err = run(capsys, "snapshot", "put", "x", "--state", str(state), "--mem", str(mem), "--meta", "novalue",
                     "--store", str(two_snapshots))
    assert (rc, err) == (1, "ember: Invalid option: --meta 'novalue' is not KEY=VALUE\n")


def test_a_missing_store_lists_nothing_and_is_not_created(tmp_path, capsys):
    missing = tmp_path / "missing"
    assert run_json(capsys, "snapshot", "ls", "--store", str(missing)) == []
    rc, _, err = run(capsys, "snapshot", "gc", "--store", str(missing))
    assert (rc, err) == (1, f"ember: No snapshot store at this path: {missing}\n")
    assert not missing.exists()


def test_the_default_store_is_under_ember_home(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EMBER_HOME", str(tmp_path / "home"))
    state, mem = write_snapshot(tmp_path)
    rc, _, err = run(capsys, "snapshot", "put", "vm", "--state", str(state), "--mem", str(mem))
    assert rc == 0, err
    assert (tmp_path / "home" / "snapshots" / "catalog").is_dir()
    assert [r["id"] for r in run_json(capsys, "snapshot", "ls")] == ["vm"]


def test_page_server_argument_errors(tmp_path, capsys):
    state, mem = write_snapshot(tmp_path)
    rc, _, err = run(capsys, "page-server", "--socket", str(tmp_path / "s"), "--mem", str(mem),
                     "--record-working-set")
    assert (rc, err) == (1, "ember: Invalid option: --record-working-set and --record-seconds "
                            "need --snapshot\n")
    (tmp_path / "plain").write_text("")
    rc, _, err = run(capsys, "page-server", "--socket", str(tmp_path / "plain"), "--mem", str(mem))
    assert (rc, err) == (1, f"ember: Path exists and is not a socket: {tmp_path / 'plain'}\n")
    rc, _, err = run(capsys, "page-server", "--socket", str(tmp_path / "s"), "--mem", str(tmp_path / "none"))
    assert rc == 1 and "No such file or directory" in err and not (tmp_path / "s").exists()

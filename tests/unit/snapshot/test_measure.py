"""Measurements behind the chunk store's defaults (chunk size, zstd level), printed for the report.

Run with ``-s`` to see the tables. Content is guest-like (code, text,
bytecode, 1/8 random pages; see _guest.corpus); the template model is the
pool's: templates derived from one base snapshot, each changing 2% of the
pages in short runs scattered over memory.
"""

from __future__ import annotations

import random
import time

import pytest
import zstandard

from snapshot import ChunkStore
from vmm.memory import GuestMemory

from tests.unit.snapshot._guest import PAGE, MiB, corpus, save_guest

GUEST = 64 * MiB
USED = 40 * MiB


def derived_template(base: bytes, seed: int) -> GuestMemory:
    """The base image with 2% of its pages rewritten, in runs of 1-16 pages."""
    mem = GuestMemory.anonymous([(0, GUEST)])
    mem.write(0, base)
    rng = random.Random(seed)
    changed = 0
    while changed < USED // PAGE // 50:
        run = rng.randint(1, 16)
        page = rng.randrange(USED // PAGE - run)
        mem.write(page * PAGE, rng.randbytes(run * PAGE))
        changed += run
    return mem


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    d = tmp_path_factory.mktemp("templates")
    base = corpus(USED)
    files = []
    for seed in (1, 2):
        mem = derived_template(base, seed)
        files.append(save_guest(mem, d, f"t{seed}"))
        mem.close()
    return files


def test_chunk_size_dedup_compression_and_fault_cost(templates, tmp_path):
    rows = []
    for chunk_size in (64 << 10, 2 << 20):
        with ChunkStore(tmp_path / f"s{chunk_size}", chunk_size=chunk_size) as store:
            first = store.put_snapshot("t1", *templates[0])
            second = store.put_snapshot("t2", *templates[1])
            totals = store.stats()
            view = store.open("t2")
            refs = [r for r in view.chunks() if r.digest is not None]
            sample = refs[:: max(1, len(refs) // 200)][:200]
            began = time.perf_counter()
            for ref in sample:
                view.read_chunk(ref)
            per_chunk = (time.perf_counter() - began) / len(sample)
            rows.append((chunk_size, first, second, totals, per_chunk))
    print()
    print("chunk    put1 MB/s  zstd ratio  t2 new MiB  store dedup  space ratio  fault cost/chunk  per 4K page")
    for chunk_size, first, second, totals, per_chunk in rows:
        throughput = first.logical_bytes / first.seconds / 1e6
        print(f"{chunk_size >> 10:5} KiB {throughput:9.0f} {totals.compression_ratio:11.2f} "
              f"{second.new_raw_bytes / MiB:11.1f} {totals.dedup_ratio:12.2f} {totals.space_ratio:12.1f} "
              f"{per_chunk * 1e6:13.0f} us {per_chunk * 1e6 / (chunk_size // PAGE):10.2f} us")
    (small, s1, s2, st_small, cost_small), (large, l1, l2, st_large, cost_large) = rows
    # The second template, derived from the same base, shares most 64 KiB chunks
    # with the first but almost no 2 MiB chunk (2% of pages changed, in runs).
    assert s2.new_raw_bytes < 0.5 * l2.new_raw_bytes
    assert st_small.dedup_ratio > st_large.dedup_ratio
    # A first touch costs far less with small chunks.
    assert cost_small * 5 < cost_large
    # Compression barely depends on the chunk size.
    assert st_small.compression_ratio > 0.85 * st_large.compression_ratio > 1.3


def test_zstd_level(templates):
    data = templates[0][1].read_bytes()[:16 * MiB]
    chunk = 64 << 10
    pieces = [data[i:i + chunk] for i in range(0, len(data), chunk)]
    decompressor = zstandard.ZstdDecompressor()
    results = {}
    print()
    print("level  ratio  compress MB/s  decompress MB/s")
    for level in (1, 3, 6, 9, 19):
        compressor = zstandard.ZstdCompressor(level=level)
        began = time.perf_counter()
        blobs = [compressor.compress(p) for p in pieces]
        compress = time.perf_counter() - began
        began = time.perf_counter()
        for b in blobs:
            decompressor.decompress(b)
        decompress = time.perf_counter() - began
        ratio = len(data) / sum(len(b) for b in blobs)
        results[level] = (ratio, len(data) / compress / 1e6, len(data) / decompress / 1e6)
        print(f"{level:5} {ratio:6.2f} {results[level][1]:14.0f} {results[level][2]:16.0f}")
    # Higher levels buy little ratio for much time; level 3 is the knee.
    assert results[3][0] >= results[1][0]
    assert results[19][0] < 1.3 * results[3][0]
    assert results[19][1] < results[3][1] / 3

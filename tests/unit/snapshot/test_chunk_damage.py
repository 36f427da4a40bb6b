"""A damaged chunk file is refused on the read path (regression: bench/chaos.py's corrupt_chunk).

Before chunk frames carried zstd's content checksum, most byte flips in a
stored chunk still decompressed, to the wrong bytes, and the page server
installed them in the guest without a word. Every flip must now raise
`ChunkCorrupt` from the page-fault path (`SnapshotView.read_chunk`).
"""

from __future__ import annotations

import os
import random

from snapshot import ChunkStore
from snapshot.chunkstore import ChunkCorrupt
from vmm.memory import GuestMemory

from tests.unit.snapshot._guest import MiB, corpus, save_guest


def test_every_flipped_chunk_is_refused_not_served(tmp_path) -> None:
    mem = GuestMemory.anonymous([(0, 2 * MiB)])
    try:
        # Guest-like content, and incompressible bytes (stored as raw zstd blocks).
        mem.write(0, corpus(MiB))
        mem.write(MiB, random.Random(7).randbytes(MiB))
        state, memory = save_guest(mem, tmp_path, "vm")
    finally:
        mem.close()
    rng = random.Random(1)
    with ChunkStore(tmp_path / "store") as store:
        store.put_snapshot("vm", state, memory)
        view = store.open("vm")
        refs = [r for r in view.chunks() if r.digest is not None]
        assert len(refs) >= 16
        served_wrong = refused = 0
        for ref in refs:
            path = store.chunk_path(ref.digest)
            with open(path, "rb") as f:
                good = f.read()
            for _ in range(4):
                bad = bytearray(good)
                for pos in rng.sample(range(len(bad) // 4, len(bad)), 8):
                    bad[pos] ^= 0xFF
                with open(path, "wb") as f:
                    f.write(bad)
                try:
                    view.read_chunk(ref)
                    served_wrong += 1
                except ChunkCorrupt:
                    refused += 1
            with open(path, "wb") as f:
                f.write(good)
            assert view.read_chunk(ref) == store.load_chunk(ref.digest, ref.length)
        assert served_wrong == 0 and refused == 4 * len(refs)
        assert store.verify().ok and os.path.exists(store.chunk_path(refs[0].digest))

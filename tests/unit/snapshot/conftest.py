"""Fixtures for the snapshot tests."""

from __future__ import annotations

import pytest

from snapshot import ChunkStore
from vmm.memory import GuestMemory

from tests.unit.snapshot._guest import MiB


@pytest.fixture
def mem16():
    """16 MiB of guest RAM at 0."""
    m = GuestMemory.anonymous([(0, 16 * MiB)])
    yield m
    m.close()


@pytest.fixture
def store(tmp_path):
    s = ChunkStore(tmp_path / "store")
    yield s
    s.close()

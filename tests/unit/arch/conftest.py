"""Shared fixtures for the x86_64 arch tests."""

from __future__ import annotations

import pytest

from vmm.memory import GuestMemory


@pytest.fixture
def mem16():
    """16 MiB of guest RAM at 0."""
    m = GuestMemory.anonymous([(0, 16 << 20)])
    yield m
    m.close()

"""Shared fixtures for the virtio tests: guest memory, a driver-side queue, an arena."""

from __future__ import annotations

import pytest

from tests.unit.devices.virtio.mock import Arena, VirtQueue
from vmm.memory import GuestMemory

MEM_SIZE = 16 << 20
QUEUE_BASE = 0x1000
ARENA_BASE = 0x10_0000


@pytest.fixture
def mem():
    """16 MiB of guest RAM at 0."""
    m = GuestMemory.anonymous([(0, MEM_SIZE)])
    yield m
    m.close()


@pytest.fixture
def vq(mem):
    """A 16-entry driver-side queue at 0x1000."""
    return VirtQueue(mem, QUEUE_BASE, 16)


@pytest.fixture
def arena(mem):
    """Guest buffers from 1 MiB up."""
    return Arena(mem, ARENA_BASE, MEM_SIZE)

"""State-file inputs the fuzzer (bench/fuzz, target snapshot) found; each must be refused cleanly."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from snapshot.format import decode_state
from vmm.persist import MicrovmState
from vmm.state_tree import StateTreeError

SEED = Path(__file__).resolve().parents[3] / "bench" / "fuzz" / "corpus" / "microvm.state"


@pytest.fixture(scope="module")
def tree() -> dict:
    return decode_state(SEED.read_bytes())


def test_the_seed_state_file_parses(tree: dict) -> None:
    assert MicrovmState.from_tree(tree).virtio


@pytest.mark.parametrize("kind", [{}, [], {"a": 1}, [["vsock"]]])
def test_an_unhashable_device_kind_is_a_state_error(tree: dict, kind: object) -> None:
    """Was a TypeError ("unhashable type: 'dict'") out of `from_tree`, past `MicrovmState.read`."""
    bad = copy.deepcopy(tree)
    bad["devices"]["virtio"][0]["kind"] = kind
    with pytest.raises(StateTreeError, match=r"devices\.virtio\[0\]\.kind: unknown device kind"):
        MicrovmState.from_tree(bad)

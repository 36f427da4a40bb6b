"""bench/chaos.py's pure part: which failures chaos explains, and lease conflicts."""

from __future__ import annotations

import math

import pytest

from bench.chaos import Attempt, ChaosConfig, ChaosError, Ledger, classify, lease_conflicts, release_after_failure


def _ledger() -> Ledger:
    led = Ledger()
    led.service_killed(10.0)
    led.service_up(14.0)
    led.vmm_killed("sb-a", 30.0)
    return led


def test_unavailable_is_expected_only_around_a_service_restart() -> None:
    led = _ledger()
    a = Attempt(client=0, start=11.0, epoch=1, end=11.1, error="acquire/UNAVAILABLE", acquire_code="UNAVAILABLE")
    assert classify(a, led) == "acquire_unavailable_service_down"
    a.start, a.end = 50.0, 50.1
    assert classify(a, led).startswith("unexpected")


def test_a_lost_lease_explains_a_failed_ping_and_release() -> None:
    led = _ledger()
    a = Attempt(client=0, start=29.0, epoch=1, end=40.0, vm_id="sb-a", acquired=29.5, release_sent=39.5,
                error="ping/AgentNotReady", release_code="NOT_FOUND")
    assert classify(a, led) == "ping_failed_vmm_killed"
    assert release_after_failure(a, led) is None
    other = Attempt(client=1, start=29.0, epoch=1, end=40.0, vm_id="sb-b", acquired=29.5,
                    error="ping/AgentNotReady", release_code="NOT_FOUND")
    assert classify(other, led).startswith("unexpected")  # its VMM was never killed
    assert release_after_failure(other, led).startswith("unexpected")
    restarted = Attempt(client=1, start=9.0, epoch=0, end=16.0, vm_id="sb-c", acquired=9.2,
                        error="release/NOT_FOUND", release_code="NOT_FOUND", release_sent=15.0)
    assert classify(restarted, led) == "release_not_found_after_loss"


def test_a_wrong_answer_is_never_expected() -> None:
    led = _ledger()
    a = Attempt(client=0, start=29.0, epoch=1, end=31.0, vm_id="sb-a", acquired=29.5, error="ping/WrongAnswer")
    assert classify(a, led).startswith("unexpected")
    assert classify(Attempt(client=0, start=1.0, epoch=0, end=2.0, vm_id="x", acquired=1.1), led) == "ok"


def test_lease_conflicts_count_reuse_and_concurrent_holders() -> None:
    leases = [
        Attempt(client=0, start=0, epoch=0, end=5, vm_id="sb-1", acquired=1, release_sent=4),
        Attempt(client=1, start=2, epoch=1, end=6, vm_id="sb-1", acquired=3, release_sent=6),  # while 0 holds it
        Attempt(client=0, start=7, epoch=1, end=9, vm_id="sb-2", acquired=8, release_sent=9),
        Attempt(client=1, start=10, epoch=1, end=12, vm_id="sb-2", acquired=11, release_sent=12),  # after
        Attempt(client=1, start=13, epoch=1, end=14, vm_id="sb-3", acquired=13.5, release_sent=14),
        Attempt(client=0, start=13, epoch=1, end=14, error="acquire/UNAVAILABLE"),
    ]
    twice, concurrent, details = lease_conflicts(leases)
    assert (twice, concurrent) == (2, 1)
    assert any("client 0 held it" in d for d in details)
    assert lease_conflicts(leases[4:]) == (0, 0, [])


def test_config_is_checked() -> None:
    with pytest.raises(ChaosError):
        ChaosConfig(duration=0)
    with pytest.raises(ChaosError):
        ChaosConfig(duration=1, weights={"kill_everything": 1})
    assert math.isinf(Ledger(down=[[1.0, math.inf]]).down[0][1])

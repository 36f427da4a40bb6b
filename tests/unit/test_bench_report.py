"""`bench.report`'s scenario list and summary (the runs themselves: tests/integration/test_bench_load_smoke.py)."""

from __future__ import annotations

import pytest

from bench.report import FIGURES, SCENARIOS, medians, parse_only


def test_only_names_scenarios_in_the_given_order() -> None:
    assert [s.name for s in parse_only("lx, tg")] == ["lx", "tg"]
    with pytest.raises(ValueError, match="tg-cold"):
        parse_only("tg,tg-cold")
    with pytest.raises(ValueError):
        parse_only(" , ")


def test_the_scenarios_are_the_issues_measurements() -> None:
    assert SCENARIOS["tg-hold"].load_args == ("--hold", "50") and SCENARIOS["tg-hold"].max_warm >= 50
    assert SCENARIOS["tg-warm"].load_args == ("--rate", "5")
    assert {s.guest for s in SCENARIOS.values()} == {"tg", "lx"}
    assert all("--net-cidr" in s.serve_args for s in SCENARIOS.values() if s.guest == "lx")


def test_medians_are_per_figure_over_the_runs_that_report_it() -> None:
    runs = [{"launches_per_s": 30.0, "acquire_p50_ms": 90.0, "failures": 0},
            {"launches_per_s": 40.0, "acquire_p50_ms": None, "failures": 2},
            {"launches_per_s": 35.0, "acquire_p50_ms": 70.0, "failures": 0}]
    m = medians(runs)
    assert set(m) == set(FIGURES)
    assert m["launches_per_s"] == 35.0 and m["acquire_p50_ms"] == 80.0 and m["failures"] == 0
    assert m["overhead_rss_mib"] is None

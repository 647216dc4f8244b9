"""Summary statistics on known data, with negative controls."""

from __future__ import annotations

import pytest

from source_agent.sweep.plan import Axes, PointConfig, SweepPlan
from source_agent.sweep.summary import (Stats, accounting, accounting_error, percentile,
                                        summarise)


def test_percentile_interpolates_linearly_like_numpy():
    values = [10, 1, 7, 3, 5]              # sorted: 1 3 5 7 10
    assert percentile(values, 50) == 5
    assert percentile(values, 0) == 1 and percentile(values, 100) == 10
    assert percentile(values, 5) == pytest.approx(1.4)    # rank 0.2: 1 + 0.2 * 2
    assert percentile(values, 95) == pytest.approx(9.4)   # rank 3.8: 7 + 0.8 * 3
    assert percentile([2, 4], 50) == 3
    # Negative control: nearest-rank would say 1 and 10 for p5/p95; interpolation does not.
    assert percentile(values, 5) != 1 and percentile(values, 95) != 10
    with pytest.raises(ValueError):
        percentile([], 50)


def test_stats_of_known_data():
    stats = Stats.of(range(101))
    assert stats == Stats(101, 50, 5, 95)
    assert Stats.of([]) is None


def _verdicts(**checks: tuple[int, int] | None) -> dict:
    """A run whose report has these verdicts as (value_ns, expected_ns), None = not measurable."""
    return {"report": {"verdicts": {
        name: {"ok": None, "detail": "n/a"} if figures is None else
        {"ok": True, "detail": "", "value_ns": figures[0], "expected_ns": figures[1],
         "lo_ns": figures[1] - 5, "hi_ns": figures[1] + 50}
        for name, figures in checks.items()}}}


def test_accounting_error_prefers_xen_and_falls_back_to_kvmclock():
    both = _verdicts(xen_runnable_in_window=(130, 100), kvmclock_follows_gap=(90, 100))
    assert accounting_error(both) == ("xen_runnable", 30)
    assert accounting(both).low_ns == -5 and accounting(both).high_ns == 50
    no_xen = _verdicts(xen_runnable_in_window=None, kvmclock_follows_gap=(90, 100))
    assert accounting_error(no_xen) == ("kvmclock", -10)
    assert accounting_error(_verdicts(xen_runnable_in_window=None)) is None
    assert accounting_error({"wall_gap_ns": 100}) is None


def test_accounting_error_compares_like_with_like_not_with_the_wall_gap():
    """Item 9: the figure is the verdict's value minus its expected (same events), not the jump
    minus the wall gap, which stops before the first KVM_RUN and so biases every point by it."""
    run = {"wall_gap_ns": 27_120_000, "kvmclock_jump_ns": 29_080_000,
           **_verdicts(kvmclock_follows_gap=(29_080_000, 29_070_000))}
    assert accounting_error(run) == ("kvmclock", 10_000)
    # Negative control: the old figure (jump - wall gap) carried the ~2 ms bias.
    assert run["kvmclock_jump_ns"] - run["wall_gap_ns"] == 1_960_000


def _run(point: PointConfig, outcome: str = "passed", *, xen: int | None = None,
         kvmclock: int | None = None, **figures) -> dict:
    """``xen`` / ``kvmclock``: the accounting error the run's verdict carries (expected 10)."""
    checks = {name: {"ok": outcome != "failed", "detail": "", "value_ns": 10 + error,
                     "expected_ns": 10}
              for name, error in (("xen_runnable_in_window", xen),
                                  ("kvmclock_follows_gap", kvmclock)) if error is not None}
    return {"outcome": outcome, "error": None if outcome == "passed" else f"{outcome}!",
            "downtime_ns": None, **figures,
            "report": {"sweep": {"combination": point.combination}, "clock_sync": {"rtt_ns": 7},
                       **({"verdicts": checks} if outcome != "error" else {})}}


def test_summarise_groups_repeats_per_combination_in_plan_order():
    plan = SweepPlan("s", Axes(latency=(0.0, 0.005)), 3)
    p0, p1 = plan.points()[:2]
    runs = [_run(p1, kvmclock=e, downtime_ns=d) for e, d in ((1, 100), (2, 200), (3, 300))]
    runs += [_run(p0, xen=10, kvmclock=-5, downtime_ns=50),
             _run(p0, "error"), _run(p0, "failed", xen=30)]
    runs.append({"outcome": "passed", "report": {"sweep": {"combination": "elsewhere"}}})
    first, second = summarise(plan, runs)
    assert first.point == p0 and second.point == p1
    assert (first.runs, first.passed, first.failed, first.errors) == (3, 1, 1, 1)
    assert first.basis == "xen_runnable"
    assert first.accounting_error == Stats(2, 20, 11, 29)  # errors 10 and 30
    assert first.downtime == Stats(1, 50, 50, 50)
    assert first.problems == ["error!", "failed!"]
    assert second.basis == "kvmclock"
    assert second.accounting_error == Stats(3, 2, pytest.approx(1.1), pytest.approx(2.9))
    assert second.downtime.median == 200 and second.rtt.median == 7
    # Verdicts are counted as reported (the errored run has none).
    assert first.verdicts == {
        "xen_runnable_in_window": {"passed": 1, "failed": 1, "not_measurable": 0},
        "kvmclock_follows_gap": {"passed": 1, "failed": 0, "not_measurable": 0}}
    assert first.to_plain()["verdicts"] == first.verdicts


def test_a_point_without_runs_or_figures_has_no_statistics():
    plan = SweepPlan("s", Axes(latency=(0.0,)), 1)
    (summary,) = summarise(plan, [_run(plan.points()[0])])
    assert summary.runs == 1 and summary.basis is None and summary.accounting_error is None
    (empty,) = summarise(plan, [])
    assert empty.runs == 0 and empty.to_plain()["accounting_error"] is None


def test_an_error_retried_to_completion_no_longer_counts():
    plan = SweepPlan("s", Axes(latency=(0.0,)), 2)
    p0, p1 = plan.points()[:2]
    retried = [{**_run(p0, "error"), "point": p0.key}, {**_run(p0), "point": p0.key}]
    (summary,) = summarise(plan, retried)
    assert (summary.runs, summary.passed, summary.errors) == (1, 1, 0)
    # Control: an error whose point never completed still counts.
    (summary,) = summarise(plan, [*retried, {**_run(p1, "error"), "point": p1.key}])
    assert (summary.runs, summary.passed, summary.errors) == (2, 1, 1)

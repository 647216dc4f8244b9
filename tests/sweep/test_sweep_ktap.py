"""KTAP output parses: version line, one plan, results numbered 1..N matching the plan."""

from __future__ import annotations

import pytest

from source_agent.sweep import ktap
from source_agent.sweep.plan import Axes, SweepPlan
from source_agent.sweep.summary import Stats, summarise


def _summaries():
    plan = SweepPlan("s", Axes(latency=(0.0, 0.001, 0.005, 0.02)), 1)
    ok, failed, unmeasurable, not_run = summarise(plan, [])
    ok.runs, ok.passed, ok.basis, ok.accounting_error = 2, 2, "kvmclock", Stats(2, 1e5, 5e4, 2e5)
    ok.downtime = Stats(2, 5e6, 4e6, 6e6)
    ok.verdicts = {"xen_runnable_in_window": {"passed": 0, "failed": 0, "not_measurable": 2},
                   "kvmclock_follows_gap": {"passed": 2, "failed": 0, "not_measurable": 0}}
    failed.runs, failed.passed, failed.failed = 2, 1, 1
    failed.problems = ["verdict failed: never_backwards # not a directive"]
    unmeasurable.runs, unmeasurable.passed = 1, 1
    return plan, [ok, failed, unmeasurable, not_run]


def test_rendered_ktap_parses_with_one_result_per_point():
    plan, summaries = _summaries()
    text = ktap.render(plan.name, summaries)
    assert text.splitlines()[:2] == ["KTAP version 1", "# sweep s: 4 points"]
    results = ktap.parse(text)
    assert [r.number for r in results] == [1, 2, 3, 4]
    assert [r.ok for r in results] == [True, False, True, True]
    assert results[0].description == summaries[0].label == "latency=0ms"
    assert results[0].directive is None
    assert results[1].directive.startswith("1 failed, 0 errored of 2: verdict failed: never_backwards")
    assert "#" not in results[1].directive
    assert results[2].directive.startswith("SKIP not measurable")
    assert results[3].directive == "SKIP not run"
    assert ("# accounting error, kvmclock jump − host CLOCK_REALTIME between the same two guest "
            "reports (no Xen): median 0.100 ms") in text
    # Each verdict is counted in a diagnostic of its point (the first point only has counts).
    assert text.index("# verdict xen_runnable_in_window: 0 passed, 0 failed, 2 not measurable") \
        < text.index("ok 1 ")
    assert "# verdict kvmclock_follows_gap: 2 passed, 0 failed, 0 not measurable" in text
    assert text.count("# verdict ") == 2


@pytest.mark.parametrize("mangle, message", [
    (lambda t: t.replace("1..4", "1..5"), "plan says 5 tests, found 4"),
    (lambda t: t.replace("KTAP version 1\n", ""), "expected 'KTAP version 1'"),
    (lambda t: t.replace("1..4\n", ""), "no plan line"),
    (lambda t: t.replace("ok 3 ", "ok 7 "), "test 7, expected 3"),
    (lambda t: t + "garbage\n", "not a result, plan or diagnostic"),
])
def test_the_parser_catches_malformed_ktap(mangle, message):
    """Negative controls: the parser is strict enough to fail."""
    plan, summaries = _summaries()
    with pytest.raises(ktap.KtapError, match=message):
        ktap.parse(mangle(ktap.render(plan.name, summaries)))

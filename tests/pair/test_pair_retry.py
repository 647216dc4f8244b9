"""The pair's one retry on a kernel oops, on real machines (tools/xen_pair/run.py).

A CI-path run once failed when dst's kernel oopsed under TCG 62 s in (int3 in __schedule) and
the control socket broke. Here the first boot's dst is killed once the pair is set up and the
line an oops leaves is written to its console (--inject-oops dst): the scenario then meets a
dead machine, the console says oops, and the pair boots again and runs the scenario. The
unit tests in test_pair_tool.py are the negative controls (no oops: the error is raised; an
oops twice: the pair fails).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from xen_pair.run import INJECTED_OOPS, PairOptions, run_pair
from xen_pair.scenario import Scenario

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.pair


def test_a_machine_killed_mid_run_with_an_oops_is_booted_again():
    results = REPO / "results" / "pair-retry"
    options = PairOptions(python=sys.executable, results=results, timeout=900,
                          inject_oops="dst")
    outcomes, facts = run_pair(options, [Scenario(migrate_args=("--json", "--gap", "10ms"))])
    print(f"retry: {facts}")
    assert facts["attempts"] == 2
    assert INJECTED_OOPS in facts["oops_1"]
    assert "error_1" in facts, facts  # the first attempt's scenario met the dead machine
    print(f"the first attempt failed as: {facts['error_1']}")
    assert INJECTED_OOPS in (results / "dst" / "console-oops-1.log").read_text()
    assert INJECTED_OOPS not in (results / "dst" / "console.log").read_text()  # a new boot
    assert [o.status for o in outcomes] == [0], outcomes[0].stderr[-800:]
    assert outcomes[0].report()["verdicts"]["kvmclock_follows_gap"]["ok"] is True

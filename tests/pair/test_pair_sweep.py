"""The sweep's remote topology over the pair with the skew as an axis (`./dev pair
--sweep-skew`, tools/xen_pair/skew_sweep.py): on one boot, one `source-agent sweep --topology
remote` on src per skew, dst's clock set between them by the pair tool.

What must come out: clock=realtime's kvmclock error follows the skew (y = skew, each point
failing kvmclock_follows_gap except at 0), clock=realtime-synced's stays at 0 within the
clock sync's uncertainty (every point passing). Each is the other's control.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from xen_pair.run import PairOptions, run_pair
from xen_pair.skew_sweep import plot, points, run_sweeps

REPO = Path(__file__).resolve().parents[2]
SKEWS_MS = (-250, 0, 250)
SWEEP = ("--strategy", "clock=realtime,runstate=off", "--strategy",
         "clock=realtime-synced,runstate=off", "--gap", "20ms", "--repeat", "1")

pytestmark = pytest.mark.pair


@pytest.fixture(scope="module")
def rows():
    results = REPO / "results" / "pair-sweep-tests"
    (results / "src" / "sweep.db").unlink(missing_ok=True)  # a rerun must not skip points
    options = PairOptions(python=sys.executable, results=results, timeout=900)
    outcomes, facts = run_pair(options, [], session=lambda pair: run_sweeps(
        pair, [ms * 1_000_000 for ms in SKEWS_MS], SWEEP))
    print(f"sweep over the pair: {facts}")
    found = points(outcomes)
    plot(found, results / "plots" / "pair-clock-error-vs-skew")
    return found


def test_every_skew_and_strategy_ran(rows):
    assert sorted((r["skew_requested_ns"], r["strategy"]) for r in rows) == sorted(
        (ms * 1_000_000, s) for ms in SKEWS_MS
        for s in ("clock=realtime,runstate=off", "clock=realtime-synced,runstate=off"))
    assert all(r["runs"] == 1 and r["errors"] == 0 and r["basis"] == "kvmclock" for r in rows)


def test_realtime_error_follows_the_skew_and_synced_stays_at_zero(rows):
    for r in rows:
        skew, error = r["skew_reference_ns"], r["error_median_ns"]
        print(f"skew {skew / 1e6:+9.3f} ms  {r['strategy']:<36} error {error / 1e6:+9.3f} ms  "
              f"failed {r['failed']}")
        if r["strategy"].startswith("clock=realtime-synced"):
            assert abs(error) < 10e6 and r["failed"] == 0
        else:
            assert abs(error - skew) < 10e6
            assert r["failed"] == (1 if abs(skew) > 10e6 else 0)

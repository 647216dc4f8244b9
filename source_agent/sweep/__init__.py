"""Network-latency experiments: sweeps over latency, jitter, bandwidth, guest size, gap and strategy.

``source-agent sweep`` runs every combination repeatedly through an injector
(tc netem or the delay relay), records each run in the results store
(resumable by point key), and summarises, plots and reports the accounting
error and downtime per point. See docs/sweep.md.
"""

from __future__ import annotations

from .plan import Axes, AxisError, PointConfig, SweepPlan
from .runner import RunPoint, SweepConfigError, SweepOutcome, Target, run_sweep
from .summary import PointSummary, Stats, percentile, summarise

__all__ = [
           "Axes",
           "AxisError",
           "PointConfig",
           "PointSummary",
           "RunPoint",
           "Stats",
           "SweepConfigError",
           "SweepOutcome",
           "SweepPlan",
           "Target",
           "percentile",
           "run_sweep",
           "summarise",
]

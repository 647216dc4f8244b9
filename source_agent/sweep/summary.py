"""Per-point statistics of a sweep, from the runs in the results store.

The quantity the experiment is about is the *accounting error*: what the
guest was told it lost minus what it really lost. Where both hosts have KVM
Xen, "told" is the Xen runstate's runnable delta (accounted steal); where not,
the kvmclock jump is the best the guest has, and the summary says which basis
each figure uses rather than mixing them silently. "Really lost" is the host's
figure over the *same* start and end events, as the verdict that checks the
figure (kvmcore.analysis) states it: its ``value_ns - expected_ns``. So a correct
strategy sits at 0 within the verdict's bound at every gap, and one that hides
the gap (clock=plain) at minus the gap -- no built-in bias from comparing the
guest's report-to-report interval with a wall gap that stops before the first
KVM_RUN. The summary only counts verdicts; it never decides one.

Percentiles interpolate linearly between order statistics (numpy's default),
so p5/p95 of a handful of repeats are honest about having little data: with
two runs they lie between the two values, never beyond.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from source_agent.results import COMPLETED

from .plan import PointConfig, SweepPlan

BASES = {"xen_runnable": "Xen runnable delta − (wall gap + open), from the captured runstate "
                         "entry to the first KVM_RUN",
         "kvmclock": "kvmclock jump − host CLOCK_REALTIME between the same two guest reports "
                     "(no Xen)"}
#: The verdict each basis takes its figure and bound from, in order of preference.
BASIS_CHECKS = {"xen_runnable": "xen_runnable_in_window", "kvmclock": "kvmclock_follows_gap"}


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation; ValueError when empty."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside 0..100")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Stats:
    """Median and 5th/95th percentiles of ``n`` values, in nanoseconds."""

    n: int
    median: float
    p5: float
    p95: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Stats | None:
        data = list(values)
        if not data:
            return None
        return cls(len(data), percentile(data, 50), percentile(data, 5), percentile(data, 95))

    def to_plain(self) -> dict[str, float | int]:
        return {"n": self.n, "median_ns": self.median, "p5_ns": self.p5, "p95_ns": self.p95}


@dataclass(frozen=True)
class Accounting:
    """One run's accounting error and the bound its verdict states on it (ns, relative)."""

    basis: str
    error_ns: int
    low_ns: int | None       # verdict's lo - expected
    high_ns: int | None      # verdict's hi - expected
    ok: bool | None          # the verdict as the report has it


def accounting(run: dict[str, Any]) -> Accounting | None:
    """The accounting figure of one run from its report's verdicts, or None where no verdict
    carries one (not measurable, or a report older than these fields)."""
    verdicts = run.get("report", {}).get("verdicts") or {}
    for basis, name in BASIS_CHECKS.items():
        v = verdicts.get(name) or {}
        value, expected = v.get("value_ns"), v.get("expected_ns")
        if isinstance(value, int) and isinstance(expected, int):
            lo, hi = v.get("lo_ns"), v.get("hi_ns")
            return Accounting(basis, value - expected,
                              lo - expected if isinstance(lo, int) else None,
                              hi - expected if isinstance(hi, int) else None, v.get("ok"))
    return None


def accounting_error(run: dict[str, Any]) -> tuple[str, int] | None:
    """(basis, accounted − lost in ns) for one run, or None where it is not measurable."""
    acc = accounting(run)
    return None if acc is None else (acc.basis, acc.error_ns)


def verdict_counts(runs: Iterable[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per verdict name: how many runs passed, failed (failing the run or shown only) and
    could not measure it -- the verdicts as reported, counted, never re-judged."""
    counts: dict[str, dict[str, int]] = {}
    for run in runs:
        for name, v in (run.get("report", {}).get("verdicts") or {}).items():
            c = counts.setdefault(name, {"passed": 0, "failed": 0, "not_measurable": 0})
            key = {True: "passed", False: "failed", None: "not_measurable"}[v.get("ok")]
            c[key] += 1
    return counts


def measured_rtt(run: dict[str, Any]) -> int | None:
    """The RTT the migration's clock sync measured through the injector (None if not reported)."""
    rtt = run.get("report", {}).get("clock_sync", {}).get("rtt_ns")
    return rtt if isinstance(rtt, int) else None


@dataclass
class PointSummary:
    """Every run of one combination (all repeats) reduced to counts and statistics."""

    point: PointConfig  # repeat 0: stands for the combination
    label: str = ""     # the combination by the axes the sweep varies (SweepPlan.label)
    runs: int = 0
    passed: int = 0
    failed: int = 0
    errors: int = 0
    basis: str | None = None  # "xen_runnable", "kvmclock", "mixed" or None (not measurable)
    accounting_error: Stats | None = None
    downtime: Stats | None = None
    rtt: Stats | None = None
    problems: list[str] = field(default_factory=list)  # errors and failed verdicts, as reported
    verdicts: dict[str, dict[str, int]] = field(default_factory=dict)  # verdict_counts()

    @property
    def name(self) -> str:
        return self.point.combination

    def to_plain(self) -> dict[str, Any]:
        return {
            "point": self.name, "label": self.label, "config": {k: v for k, v in self.point.to_plain().items()
                                           if k != "repeat"},
            "runs": self.runs, "passed": self.passed, "failed": self.failed, "errors": self.errors,
            "accounting_error_basis": self.basis,
            "accounting_error": self.accounting_error and self.accounting_error.to_plain(),
            "downtime": self.downtime and self.downtime.to_plain(),
            "rtt": self.rtt and self.rtt.to_plain(), "problems": self.problems,
            "verdicts": self.verdicts,
        }


def summarise(plan: SweepPlan, runs: Iterable[dict[str, Any]]) -> list[PointSummary]:
    """One summary per combination of ``plan``, in plan order; runs of other points are ignored."""
    points = plan.points()[: plan.combination_count]
    summaries = {p.combination: PointSummary(p, plan.label(p)) for p in points}
    errors: dict[str, list[tuple[str, int]]] = {key: [] for key in summaries}
    downtimes: dict[str, list[int]] = {key: [] for key in summaries}
    rtts: dict[str, list[int]] = {key: [] for key in summaries}
    completed_runs: dict[str, list[dict[str, Any]]] = {key: [] for key in summaries}
    runs = list(runs)
    # An errored run is retried on rerun: once its point completed, the error is history.
    completed = {run.get("point") for run in runs if run["outcome"] in COMPLETED} - {None}
    for run in runs:
        if run["outcome"] not in COMPLETED and run.get("point") in completed:
            continue
        combination = run.get("report", {}).get("sweep", {}).get("combination")
        summary = summaries.get(combination)
        if summary is None:
            continue
        summary.runs += 1
        outcome = run["outcome"]
        summary.passed += outcome == "passed"
        summary.failed += outcome == "failed"
        summary.errors += outcome not in COMPLETED       # error or rolled back
        if outcome != "passed" and run.get("error"):
            summary.problems.append(run["error"])
        if outcome not in COMPLETED:
            continue  # no figures from a run that did not complete
        completed_runs[combination].append(run)
        if (acc := accounting_error(run)) is not None:
            errors[combination].append(acc)
        if run.get("downtime_ns") is not None:
            downtimes[combination].append(run["downtime_ns"])
        if (rtt := measured_rtt(run)) is not None:
            rtts[combination].append(rtt)
    for key, summary in summaries.items():
        bases = {basis for basis, _ in errors[key]}
        summary.basis = bases.pop() if len(bases) == 1 else ("mixed" if bases else None)
        summary.accounting_error = Stats.of(value for _, value in errors[key])
        summary.downtime = Stats.of(downtimes[key])
        summary.rtt = Stats.of(rtts[key])
        summary.verdicts = verdict_counts(completed_runs[key])
    return list(summaries.values())

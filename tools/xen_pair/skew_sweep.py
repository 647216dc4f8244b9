"""`./dev pair --sweep-skew LIST`: the sweep's `remote` topology over the pair, with the hosts'
clock skew as one more axis, set by the pair tool between sweeps (issue 12 item 5).

For each skew, dst's CLOCK_REALTIME is stepped to it (and verified against the reference, as
for a scenario), then `source-agent sweep --topology remote --to dst` runs on src with the
other axes (by default clock=realtime and clock=realtime-synced, runstate off, a 20 ms gap, two
repeats). The sweep itself is unchanged: each of its runs carries the reference in its report
(`clock_reference`), and its JSON summary gives every point's accounting error (kvmclock jump
minus the host's interval over the same events: summary.accounting). The figure here is that
error against the skew by the reference, one line per clock strategy: realtime on y = skew,
realtime-synced on y = 0.
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agentcore.options import UsageError

from .run import Outcome, Pair, progress
from .scenario import Scenario, signed_duration_ns

DEFAULT_SWEEP = ("--strategy", "clock=realtime,runstate=off",
                 "--strategy", "clock=realtime-synced,runstate=off",
                 "--gap", "20ms", "--repeat", "2")


def parse_skews(text: str) -> list[int]:
    """'-250ms,0,+250ms' -> ns; UsageError naming a bad item."""
    try:
        skews = [signed_duration_ns(item.strip()) for item in text.split(",") if item.strip()]
    except UsageError as e:
        raise UsageError(f"--sweep-skew: {e}") from None
    if not skews or len(set(skews)) != len(skews):
        raise UsageError(f"--sweep-skew {text!r}: give distinct skews, e.g. -250ms,0,+250ms")
    return skews


def sweep_name(skew_ns: int) -> str:
    """The sweep's name in the results store (letters, digits, '_', '.', '-': no '+')."""
    ms = round(skew_ns / 1e6)
    return f"pair-skew-{'m' if ms < 0 else 'p' if ms > 0 else ''}{abs(ms)}ms"


def run_sweeps(pair: Pair, skews: Sequence[int], sweep_args: Sequence[str]) -> list[Outcome]:
    """One sweep on src per skew (each its own name in one results database on src)."""
    db = pair.src.results / "sweep.db"
    outcomes = []
    for skew in skews:
        scenario = Scenario(skew_ns=skew, migrate_args=tuple(sweep_args))
        pair.apply(scenario)
        before = pair.references()
        argv = [pair.options.python, "-P", "-m", "source_agent", "sweep", sweep_name(skew),
                "--topology", "remote", "--to", pair.target, "--psk-file", str(pair.key),
                "--format", "json", "--db", str(db), *sweep_args]
        progress(f"sweep {sweep_name(skew)} on src: skew {skew / 1e6:+.0f} ms (reference "
                 f"{before['destination_minus_source']['offset_ns'] / 1e6:+.3f} ms)")
        t = time.monotonic()
        reply = pair.src.run(argv, pair.deadline,
                             env={"KVM_TESTBED_CLOCK_REFERENCE": json.dumps(before)})
        outcomes.append(Outcome(scenario, reply["rc"], reply["stdout"], reply["stderr"], before,
                                pair.references(), time.monotonic() - t, direction="sweep"))
    return outcomes


def points(outcomes: Sequence[Outcome]) -> list[dict[str, Any]]:
    """Every sweep point with its skew (requested, and dst - src by the reference)."""
    rows = []
    for o in outcomes:
        summary = o.report()
        if summary is None:
            raise ValueError(f"sweep at skew {o.scenario.skew_ns / 1e6:+.0f} ms printed no JSON "
                             f"(exit {o.status}): {o.stderr.strip()[-300:]}")
        reference = o.reference_before["destination_minus_source"]
        for point in summary["points"]:
            error = point["accounting_error"] or {}
            rows.append({"skew_requested_ns": o.scenario.skew_ns,
                         "skew_reference_ns": reference["offset_ns"],
                         "strategy": point["config"]["strategy"], "runs": point["runs"],
                         "passed": point["passed"], "failed": point["failed"],
                         "errors": point["errors"], "basis": point["accounting_error_basis"],
                         "error_median_ns": error.get("median_ns"),
                         "error_p5_ns": error.get("p5_ns"), "error_p95_ns": error.get("p95_ns")})
    return rows


def plot(rows: Sequence[dict[str, Any]], stem: Path) -> list[Path]:
    """Clock error against skew, one line per strategy (PNG and SVG, checked)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from source_agent.sweep.plots import check_png

    figure = Figure(figsize=(7, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        mine = sorted((r for r in rows if r["strategy"] == strategy and
                       r["error_median_ns"] is not None), key=lambda r: r["skew_reference_ns"])
        x = [r["skew_reference_ns"] / 1e6 for r in mine]
        y = [r["error_median_ns"] / 1e6 for r in mine]
        below = [(r["error_median_ns"] - r["error_p5_ns"]) / 1e6 for r in mine]
        above = [(r["error_p95_ns"] - r["error_median_ns"]) / 1e6 for r in mine]
        line = ax.errorbar(x, y, yerr=[below, above], marker="o", capsize=3, label=strategy)
        failed = [r for r in mine if r["failed"]]
        ax.scatter([r["skew_reference_ns"] / 1e6 for r in failed],
                   [r["error_median_ns"] / 1e6 for r in failed], s=160, facecolors="none",
                   edgecolors="red", linewidths=1.5)
        del line
    lo = min(r["skew_reference_ns"] for r in rows) / 1e6
    hi = max(r["skew_reference_ns"] for r in rows) / 1e6
    ax.plot([lo, hi], [lo, hi], color="grey", linestyle=":", label="y = skew")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("dst CLOCK_REALTIME − src's, by the reference (ms)")
    ax.set_ylabel("kvmclock error: guest − host over the same events (ms)")
    ax.set_title("The pair: clock error against the hosts' skew (median, p5–p95; red: failed)")
    ax.legend(fontsize="small")
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix in (".png", ".svg"):
        path = stem.with_suffix(suffix)
        figure.savefig(path)
        written.append(path)
    check_png(written[0])
    return written

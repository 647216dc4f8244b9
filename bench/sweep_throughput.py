"""Sweep throughput: migrations per minute for a 2 MiB guest on loopback, through the whole sweep path.

Each point is what ``source-agent sweep`` does per migration: a fresh delay
relay (0 ms: its copy path, or the latency given), a real migration by the
agents to a ``dest-agent serve`` subprocess, the report composed, one SQLite
transaction. Timed from the first point's start to the last point's end, so
the destination's start-up is left out (it happens once per sweep).

Usage: ``python bench/sweep_throughput.py [--repeat N] [--latency 0ms,5ms] [--memory 2MiB]``.
Needs the agents (source_agent.migrate) and /dev/kvm.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import trio

from source_agent.results import ResultsStore
from source_agent.sweep.injector import choose_injector
from source_agent.sweep.plan import Axes, SweepPlan, parse_durations, parse_sizes
from source_agent.sweep.runner import run_sweep
from source_agent.sweep.topology import open_endpoint


class Clock:
    """A Progress that timestamps each point."""

    def __init__(self) -> None:
        self.starts: dict[int, float] = {}
        self.durations: dict[float, list[float]] = {}
        self.first: float | None = None
        self.last = 0.0
        self.errors: list[str] = []

    def start(self, total: int, skipped: int) -> None:
        pass

    def point_started(self, index: int, point: Any) -> None:
        self.starts[index] = time.perf_counter()
        self.first = self.first or self.starts[index]

    def point_finished(self, index: int, point: Any, report: dict[str, Any]) -> None:
        self.last = time.perf_counter()
        self.durations.setdefault(point.latency, []).append(self.last - self.starts[index])
        if report.get("outcome") != "passed":
            self.errors.append(f"{point.key}: {report.get('outcome')}: {report.get('error')}")


async def bench(plan: SweepPlan, db: Path) -> Clock:
    from source_agent.sweep.agent import agent_run_point

    clock = Clock()
    await run_sweep(plan, ResultsStore(db), agent_run_point(), endpoint=partial(open_endpoint, "loopback"),
                    choose=partial(choose_injector, "auto"), progress=clock)
    return clock


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--latency", default="0ms")
    parser.add_argument("--memory", default="2MiB")
    args = parser.parse_args()
    try:
        import source_agent.sweep.agent  # noqa: F401
    except ImportError as exc:
        print(f"cannot run yet: the migration agents are not installed here ({exc})", file=sys.stderr)
        return 2
    plan = SweepPlan("bench", Axes(latency=parse_durations("--latency", args.latency),
                                   memory=parse_sizes("--memory", args.memory)), args.repeat)
    with tempfile.TemporaryDirectory() as tmp:
        clock = trio.run(bench, plan, Path(tmp) / "bench.db")
    runs = sum(len(d) for d in clock.durations.values())
    elapsed = clock.last - (clock.first or clock.last)
    print(f"{runs} migrations of a {args.memory} guest on loopback in {elapsed:.2f} s: "
          f"{runs / elapsed * 60:.0f} migrations per minute ({len(clock.errors)} not passed)")
    print(f"{'one-way latency':>16} {'runs':>5} {'per point p50':>14} {'min':>9} {'max':>9}")
    for latency, durations in clock.durations.items():
        print(f"{latency * 1e3:>14g}ms {len(durations):>5} {statistics.median(durations) * 1e3:>11.1f} ms"
              f" {min(durations) * 1e3:>6.1f} ms {max(durations) * 1e3:>6.1f} ms")
    for error in clock.errors[:5]:
        print(f"  {error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

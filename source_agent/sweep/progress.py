"""Progress on stderr: a rich bar with ETA on a terminal, one plain line per point otherwise.

stderr, so ``--format json`` on stdout stays clean for a pipe. Plain lines
when stderr is not a terminal (CI logs, ``2> sweep.log``): a redrawn bar
would fill a log with control codes, while a line per point with its outcome
and an ETA reads well and greps.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, Self, TextIO

from .plan import PointConfig


def describe(report: dict[str, Any]) -> str:
    """``passed (gap 10.2 ms, downtime 4.1 ms)`` or ``error: <why>`` for one run."""
    outcome = report.get("outcome", "?")
    if outcome in ("error", "rolled back"):
        return f"{outcome}: {report.get('error')}"
    gap = (report.get("wall_gap") or {}).get("value_ns")
    downtime = (report.get("downtime") or {}).get("total_ns")
    figures = [f"{label} {value / 1e6:.1f} ms" for label, value in
               (("gap", gap), ("downtime", downtime)) if isinstance(value, int)]
    return f"{outcome} ({', '.join(figures)})" if figures else outcome


def _eta(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class PlainProgress:
    """One line per point: ``[3/12] latency=5ms ... rep=1: passed (...) eta 0:01:20``."""

    def __init__(self, stream: TextIO, sweep: str, label: Callable[[PointConfig], str]) -> None:
        self.label = label
        self.stream = stream
        self.sweep = sweep
        self.total = 0
        self.began = time.monotonic()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def _print(self, text: str) -> None:
        print(f"sweep {self.sweep}: {text}", file=self.stream, flush=True)

    def start(self, total: int, skipped: int) -> None:
        self.total = total
        self.began = time.monotonic()
        self._print(f"{total} point(s) to run" + (f", {skipped} already done (skipped)"
                                                  if skipped else ""))

    def point_started(self, index: int, point: PointConfig) -> None:
        pass  # a line per point is enough; the finished line says which point

    def point_finished(self, index: int, point: PointConfig, report: dict[str, Any]) -> None:
        done = index + 1
        remaining = (time.monotonic() - self.began) / done * (self.total - done)
        self._print(f"[{done}/{self.total}] {self.label(point)}: {describe(report)}"
                    + (f"; eta {_eta(remaining)}" if done < self.total else ""))


class RichProgress:
    """A live bar (description, bar, count, elapsed, remaining) on the terminal's stderr."""

    def __init__(self, stream: TextIO, sweep: str, label: Callable[[PointConfig], str]) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.label = label
        self.console = Console(file=stream)
        self.sweep = sweep
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                            MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"),
                            TimeRemainingColumn(), console=self.console)
        self.task: Any = None

    def __enter__(self) -> Self:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def start(self, total: int, skipped: int) -> None:
        if skipped:
            self.console.print(f"sweep {self.sweep}: {skipped} point(s) already done, skipped",
                               highlight=False)
        self.task = self.bar.add_task(f"sweep {self.sweep}", total=total)

    def point_started(self, index: int, point: PointConfig) -> None:
        self.bar.update(self.task, description=self.label(point))

    def point_finished(self, index: int, point: PointConfig, report: dict[str, Any]) -> None:
        self.console.print(f"{self.label(point)}: {describe(report)}", highlight=False)
        self.bar.advance(self.task)


def make_progress(sweep: str, stream: TextIO | None = None,
                  label: Callable[[PointConfig], str] = lambda point: point.key,
                  ) -> PlainProgress | RichProgress:
    """``label`` spells a point (default: its full key)."""
    stream = sys.stderr if stream is None else stream
    kind = RichProgress if stream.isatty() else PlainProgress
    return kind(stream, sweep, label)

"""Shared helpers: a small plan, a progress recorder, and a one-call sweep over the fakes."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any

from fakes import FAKE_DEST, fake_dest_argv

from source_agent.results import ResultsStore
from source_agent.sweep.injector import choose_injector
from source_agent.sweep.plan import Axes, SweepPlan
from source_agent.sweep.runner import run_sweep
from source_agent.sweep.topology import open_endpoint

#: ``python sweep_script.py NAME ...``: the sweep command with the test doubles (tests/sweep runs it).
SWEEP_SCRIPT = Path(__file__).with_name("sweep_script.py")


def small_plan(name: str = "s", *, latency=(0.0, 0.001, 0.005), repeat: int = 2,
               topology: str = "loopback", **axes: Any) -> SweepPlan:
    return SweepPlan(name, Axes(latency=tuple(latency), **axes), repeat, topology)


def dest_pids() -> set[int]:
    """Processes running this checkout's fake destination (other checkouts' tests may run at once)."""
    mine = str(FAKE_DEST).encode()
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if mine in f.read():
                    found.add(int(pid))
        except OSError:
            pass
    return found


class Recorder:
    """A Progress that remembers every call (and checks their order)."""

    def __init__(self) -> None:
        self.total: int | None = None
        self.skipped: int | None = None
        self.started: list[str] = []
        self.finished: list[tuple[str, str]] = []

    def start(self, total: int, skipped: int) -> None:
        self.total, self.skipped = total, skipped

    def point_started(self, index: int, point: Any) -> None:
        assert index == len(self.started)
        self.started.append(point.key)

    def point_finished(self, index: int, point: Any, report: dict[str, Any]) -> None:
        assert self.started[index] == point.key
        self.finished.append((point.key, report["outcome"]))


async def sweep(plan: SweepPlan, store: ResultsStore, agent: Any, *, dest_argv=fake_dest_argv,
                progress: Recorder | None = None, **kw: Any):
    endpoint = partial(open_endpoint, plan.topology, dest_argv=dest_argv)
    return await run_sweep(plan, store, agent, endpoint=endpoint,
                           choose=partial(choose_injector, plan.injector),
                           progress=progress or Recorder(), **kw)

"""Run a sweep: every point not yet in the results store, one migration each, each recorded at once.

The migration itself is injected (``run_point``): the runner owns everything
around it — the destination, the per-point injector, the store, progress —
and knows nothing of KVM or the wire format, so the agents' coroutine plugs
in unchanged and unit tests can drive the runner with a stand-in for the
agent layer.

Durability: each run is one SQLite transaction, written synchronously right
after its migration returns, before the next checkpoint, so a cancellation
(Ctrl-C) or ``kill -9`` loses at most the run in flight, never a completed
one and never half of one. A run that raised (peer, network, timeout) is
recorded with outcome ``error``; errored points are not "done", so a rerun
retries them.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from source_agent.results import COMPLETED, OUTCOMES, ResultsStore, RunRecord, record_columns, timestamp

from .injector import Injector, inject
from .plan import PointConfig, SweepPlan, config_mismatch
from .topology import Endpoint

#: After this many errored runs in a row the sweep stops: the destination or the path is gone,
#: and continuing would only fill the store with the same error.
MAX_CONSECUTIVE_ERRORS = 3
#: Upper bound on one point (capture, transfer at the lowest bandwidth, restore, report).
POINT_TIMEOUT = 300.0


@dataclass(frozen=True)
class Target:
    """Where ``run_point`` migrates to: the injector's address, the key, and the topology label.

    ``destination`` is the destination agent's own ``HOST:PORT`` (``--to`` for
    remote), which is what a run records; ``host``/``port`` may be a relay's.
    """

    host: str
    port: int
    psk_file: str | None
    topology: str
    destination: str = ""

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port


RunPoint = Callable[[PointConfig, Target], Awaitable[dict[str, Any]]]


class SweepStop(Exception):
    """Raised by a ``run_point`` for a failure every later point would repeat (the destination
    refused the key, or speaks another protocol version): the run is recorded, the sweep stops."""


class SweepConfigError(Exception):
    """The sweep name is already in the store with different axes or topology."""


class Progress(Protocol):
    def start(self, total: int, skipped: int) -> None: ...
    def point_started(self, index: int, point: PointConfig) -> None: ...
    def point_finished(self, index: int, point: PointConfig, report: dict[str, Any]) -> None: ...


@dataclass
class SweepOutcome:
    """What this invocation did (the store holds the results, earlier invocations' too)."""

    planned: int
    skipped: int
    ran: int = 0
    errors: int = 0
    stopped: str | None = None  # why the sweep stopped before its last point
    injector: Injector | None = None
    run_ids: list[str] = field(default_factory=list)


def _refuse_other_settings(store: ResultsStore, plan: SweepPlan, stored: dict[str, Any] | None) -> None:
    differences = [] if stored is None else config_mismatch(stored, plan.config())
    if differences:
        raise SweepConfigError(
            f"sweep {plan.name!r} is already in {store.path} with other settings "
            f"({'; '.join(differences)}); rerun with the stored settings to resume it, or use "
            "a new name (or another --db) for a new experiment")


def check_settings(store: ResultsStore, plan: SweepPlan) -> None:
    """SweepConfigError if the name is stored with other settings; reads only, stores nothing."""
    _refuse_other_settings(store, plan, store.sweep_config(plan.name))


def claim(store: ResultsStore, plan: SweepPlan) -> None:
    """Register the sweep's config, or check it against the stored one (SweepConfigError).

    Called only once everything that can refuse the sweep at set-up (the
    injector, the destination) has accepted it, right before the first point:
    a sweep refused before it ran anything leaves no settings behind to refuse
    its corrected rerun with.
    """
    _refuse_other_settings(store, plan, store.register_sweep(plan.name, plan.config(),
                                                             timestamp(time.time_ns())))


def _error_report(point: PointConfig, target: Target, error: str) -> dict[str, Any]:
    return {"command": "sweep", "outcome": "error", "exit_code": 3, "error": error,
            "topology": target.topology, "memory_size": point.memory_size,
            "strategy": point.strategy}


def record_run(store: ResultsStore, plan: SweepPlan, point: PointConfig, report: dict[str, Any],
               injection: dict[str, Any], started_ns: int, target: Target) -> str:
    """Store one run (a single transaction); returns its run id. Synchronous on purpose: no checkpoint.

    The run's ``destination`` is the destination agent's address, not the relay's
    ephemeral port the migration connected to (that one is kept as ``sweep.via``).
    """
    run_id = f"{plan.name}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime(started_ns / 1e9))}-" \
             f"{secrets.token_hex(4)}"
    report = {"started_at": timestamp(started_ns), **report, "run_id": run_id,
              "destination": target.destination or f"{target.host}:{target.port}",
              "sweep": {"name": plan.name, "point": point.key, "combination": point.combination,
                        "repeat": point.repeat, "config": point.to_plain(), "injector": injection,
                        "via": f"{target.host}:{target.port}"}}
    exit_code = report.get("exit_code")
    store.record(RunRecord(
        run_id=run_id, started_at=timestamp(started_ns), finished_at=timestamp(time.time_ns()),
        command="sweep", outcome=report["outcome"],
        exit_code=exit_code if isinstance(exit_code, int) else {"passed": 0, "failed": 1}.get(
            report["outcome"], 3),
        report=report, sweep=plan.name, point=point.key, error=report.get("error"),
        **record_columns(report)))
    return run_id


async def run_sweep(plan: SweepPlan, store: ResultsStore, run_point: RunPoint, *,
                    endpoint: Callable[[], AbstractAsyncContextManager[Endpoint]],
                    choose: Callable[[str], Awaitable[Injector]], progress: Progress,
                    point_timeout: float = POINT_TIMEOUT,
                    max_consecutive_errors: int = MAX_CONSECUTIVE_ERRORS) -> SweepOutcome:
    """Run the points of ``plan`` not yet done in ``store``; cancellation stops it cleanly.

    ``endpoint()`` opens the destination for the whole sweep (it is not even
    started when every point is done); ``choose(topology)`` picks the injector.
    """
    check_settings(store, plan)
    done = store.points_done(plan.name)
    todo = [p for p in plan.points() if p.key not in done]
    outcome = SweepOutcome(planned=len(plan.points()), skipped=len(plan.points()) - len(todo))
    progress.start(len(todo), outcome.skipped)
    if not todo:
        return outcome
    outcome.injector = await choose(plan.topology)
    consecutive = 0
    async with endpoint() as dest:
        claim(store, plan)
        for index, point in enumerate(todo):
            progress.point_started(index, point)
            async with inject(outcome.injector, dest, point) as injection:
                target = Target(*injection.address, dest.psk_file, plan.topology,
                                destination=dest.destination)
                started = time.time_ns()
                stop = None
                with trio.move_on_after(point_timeout) as timer:
                    try:
                        report = await run_point(point, target)
                    except SweepStop as exc:
                        stop = str(exc)
                        report = _error_report(point, target, stop)
                    except Exception as exc:  # noqa: BLE001 - the agent layer's failure is this run's result
                        report = _error_report(point, target, f"{type(exc).__name__}: {exc}")
                if timer.cancelled_caught:
                    report = _error_report(point, target, f"point timed out after {point_timeout:g}s")
                elif report.get("outcome") not in OUTCOMES:
                    report = {**report, "outcome": "error", "error": "the migration's report has "
                              f"no valid outcome ({report.get('outcome')!r})"}
                # Recorded and reported before the next checkpoint (leaving the injector is one),
                # so a cancellation cannot fall between a stored run and its progress line.
                outcome.run_ids.append(record_run(store, plan, point, report, injection.describe(),
                                                  started, target))
                outcome.ran += 1
                progress.point_finished(index, point, report)
            if stop is not None:
                outcome.errors += 1
                outcome.stopped = stop
                break
            if report.get("outcome") not in COMPLETED:
                await dest.check()
                outcome.errors += 1
                consecutive += 1
                if consecutive >= max_consecutive_errors:
                    outcome.stopped = (f"{consecutive} errors in a row, the last: "
                                       f"{report.get('error')}")
                    break
            else:
                consecutive = 0
    return outcome

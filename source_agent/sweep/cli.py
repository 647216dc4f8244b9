"""``source-agent sweep``: options → plan → run (resumable) → summary, plots, table/JSON/KTAP.

Everything that can be wrong with the options is found before any
namespace, process or VM exists (exit 2). Ctrl-C cancels the sweep through
trio — the destination process is killed, the relay closed, the namespace
deleted, the runs completed so far are already committed — and exits 130.
stdout carries only the chosen format, so ``--format json | jq`` works;
progress and diagnostics go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import trio

import protocol
from source_agent.netem import NetemError
from agentcore.options import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_PASSED,
    EXIT_PEER,
    EXIT_USAGE,
    UsageError,
    argtype,
    parse_host_port,
    parse_timeout,
)
from source_agent.results import ResultsStore, ResultsStoreError, default_db_path

from . import ktap
from ._groups import single_error
from .injector import InjectorError, choose_injector
from .plan import (
    INJECTORS,
    TOPOLOGIES,
    Axes,
    AxisError,
    PointConfig,
    SweepPlan,
    parse_byte_rates,
    parse_byte_sizes,
    parse_durations,
    parse_modes,
    parse_rates,
    parse_sizes,
    strategies,
)
from .plots import PlotError, write_plots
from .progress import make_progress
from .runner import RunPoint, SweepConfigError, SweepOutcome, run_sweep
from .summary import BASES, PointSummary, Stats, summarise
from .topology import DestArgv, DestinationError, agent_argv, open_endpoint


EPILOG = """\
examples:
  source-agent sweep lat --latency 0ms,1ms,5ms,20ms,100ms --repeat 5 --plot-dir plots
  source-agent sweep size --memory 2MiB,16MiB,64MiB --latency 0ms,5ms --repeat 3
  source-agent sweep ns --topology netns --latency 0ms,20ms --bandwidth unlimited,100mbit
  source-agent sweep far --topology remote --to 10.0.0.2:7400 --psk-file key --latency 0ms,5ms
  source-agent sweep live --mode stop-copy,precopy --dirty-rate 0,10,50MiB/s --working-set 8MiB \
      --memory 16MiB,64MiB --plot-dir plots
  source-agent sweep lat --format ktap     # rerun: points already in --db are skipped

Every combination of the axes runs --repeat times. Latency and jitter are one-way (the RTT is
about twice the latency) and need a unit; bandwidth uses tc's units (mbit; 'bps' is bytes/s).
A rerun with the same NAME and --db resumes: done points are skipped (errored ones are retried);
a larger --repeat adds repeats; other axes under the same NAME are refused.
exit codes: 0 every run passed, 1 a run failed a verdict or errored, 2 usage or set-up error,
3 the destination or the path failed (the sweep stopped), 130 interrupted (rerun to resume).
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``sweep`` with its options on the ``source-agent`` subcommands."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "sweep", help="run a latency / bandwidth / guest-size experiment (resumable)",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Migrate a guest at every combination of network and guest parameters, "
                    "record every run, and summarise how the guest's accounting follows the gap.")
    p.add_argument("name", metavar="NAME", help="the sweep's name in the results store (resume key)")
    p.add_argument("--latency", default="0ms", metavar="LIST",
                   help="one-way delays, e.g. 0ms,1ms,5ms,20ms,100ms (default 0ms)")
    p.add_argument("--jitter", default="0ms", metavar="LIST",
                   help="uniform ± jitter around the delay, never reordering (default 0ms)")
    p.add_argument("--bandwidth", default="unlimited", metavar="LIST",
                   help="rate caps, e.g. unlimited,100mbit,1gbit (default unlimited)")
    p.add_argument("--memory", default="2MiB", metavar="LIST",
                   help="guest memory sizes, multiples of 2MiB, e.g. 2MiB,16MiB (default 2MiB)")
    p.add_argument("--gap", default="0ms", metavar="LIST",
                   help="extra wait between capture and sending, e.g. 0ms,10ms (default 0ms)")
    p.add_argument("--strategy", action="append", default=[], metavar="STRATEGY",
                   help="restore strategy: 'best' or overrides like clock=plain,tsc=none; "
                        "repeat the option for several (default best)")
    p.add_argument("--mode", default="stop-copy", metavar="LIST",
                   help="stop-copy, precopy or both: stop-copy,precopy (default stop-copy)")
    p.add_argument("--dirty-rate", default="0", metavar="LIST",
                   help="the guest's dirtying rates, e.g. 0,10,50MiB/s (default 0: none)")
    p.add_argument("--working-set", default="0", metavar="LIST",
                   help="the memory the guest dirties, e.g. 8MiB (needed with a dirty rate)")
    p.add_argument("--repeat", type=int, default=3, metavar="N",
                   help="runs per combination (default 3)")
    p.add_argument("--topology", choices=TOPOLOGIES, default="loopback",
                   help="loopback: destination on 127.0.0.1; netns: in a network namespace "
                        "joined by veth; remote: an agent at --to (default loopback)")
    p.add_argument("--to", metavar="HOST:PORT", help="the remote destination agent")
    p.add_argument("--psk-file", metavar="PATH",
                   help="pre-shared key file (mode 600); netns makes a throwaway one if absent")
    p.add_argument("--injector", choices=INJECTORS, default="auto",
                   help="tc (netem on the netns veth) or relay (userspace); auto: tc where the "
                        "kernel has sch_netem, else relay (default auto)")
    p.add_argument("--db", metavar="PATH", help=f"results database (default {default_db_path()})")
    p.add_argument("--format", choices=("table", "json", "ktap"), default="table",
                   help="summary on stdout (default table)")
    p.add_argument("--plot-dir", metavar="DIR", type=Path,
                   help="write NAME-accounting and NAME-downtime as PNG and SVG here")
    p.add_argument("--point-timeout", type=argtype(parse_timeout), default=300.0,
                   metavar="DURATION", help="give up on one point after this long (default 5m)")
    p.set_defaults(run=run)
    return p


def _host_port(text: str) -> tuple[str, int]:
    """``--to``, in the agents' one address grammar (agentcore.options.parse_host_port)."""
    try:
        host, port = parse_host_port(text, default_port=7400)
    except UsageError as exc:
        raise AxisError(f"--to: {exc}") from None
    if port == 0:
        raise AxisError(f"--to: {text!r}: port 0 is not a destination agent's port")
    return host, port


def plan_from_args(args: argparse.Namespace) -> SweepPlan:
    """The options as a plan; AxisError names the first bad option and value."""
    axes = Axes(latency=parse_durations("--latency", args.latency),
                jitter=parse_durations("--jitter", args.jitter),
                bandwidth=parse_rates("--bandwidth", args.bandwidth),
                memory=parse_sizes("--memory", args.memory),
                gap_ns=tuple(round(s * 1e9) for s in parse_durations("--gap", args.gap)),
                strategy=strategies("--strategy", args.strategy),
                mode=parse_modes("--mode", args.mode),
                dirty_rate=parse_byte_rates("--dirty-rate", args.dirty_rate),
                working_set=parse_byte_sizes("--working-set", args.working_set))
    to = _host_port(args.to) if args.to else None
    return SweepPlan(args.name, axes, args.repeat, args.topology,
                     f"{to[0]}:{to[1]}" if to else None, args.injector)


def default_run_point() -> RunPoint:
    """The agents' migration as a run_point (source_agent.sweep.agent, once the agents exist)."""
    try:
        from .agent import agent_run_point
    except ImportError as exc:
        raise SetupError(f"the migration agents are not installed here ({exc})") from None
    return agent_run_point()


class SetupError(Exception):
    """Something on this host prevents the sweep from starting (exit 2)."""


def check_plot_dir(path: Path) -> None:
    """SetupError unless ``path`` is a writable directory or can be made one; creates nothing."""
    existing = path
    while not os.path.lexists(existing) and existing.parent != existing:
        existing = existing.parent
    if existing == path and not path.is_dir():
        raise SetupError(f"--plot-dir {path}: exists and is not a directory")
    if not existing.is_dir():
        raise SetupError(f"--plot-dir {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SetupError(f"--plot-dir {path}: cannot write in {existing}")


def _error(message: str) -> None:
    print(f"source-agent sweep: error: {message}", file=sys.stderr)


async def _watch_sigint(scope: trio.CancelScope, interrupted: list[bool]) -> None:
    """First Ctrl-C cancels the sweep; teardown then runs to the end whatever else is pressed."""
    with trio.open_signal_receiver(signal.SIGINT) as signals:
        async for _ in signals:
            if not interrupted:
                print("\nsource-agent sweep: interrupted; stopping cleanly (completed runs are "
                      "saved)", file=sys.stderr, flush=True)
            interrupted.append(True)
            scope.cancel()


async def _sweep(plan: SweepPlan, store: ResultsStore, run_point: RunPoint, args: argparse.Namespace,
                 dest_argv: DestArgv, interrupted: list[bool]) -> SweepOutcome | None:
    to = _host_port(plan.destination) if plan.destination else None
    endpoint = partial(open_endpoint, plan.topology, psk_file=args.psk_file, dest_argv=dest_argv,
                       to=to)
    choose = partial(choose_injector, plan.injector)
    outcome = None

    def label(point: PointConfig) -> str:
        return f"{plan.label(point)} rep={point.repeat}"

    with make_progress(plan.name, label=label) as progress, trio.CancelScope() as scope, single_error():
        async with trio.open_nursery() as nursery:
            if threading.current_thread() is threading.main_thread():  # signals need it
                nursery.start_soon(_watch_sigint, scope, interrupted)
            outcome = await run_sweep(plan, store, run_point, endpoint=endpoint, choose=choose,
                                      progress=progress, point_timeout=args.point_timeout)
            nursery.cancel_scope.cancel()
    return outcome


async def run(args: argparse.Namespace, *, run_point: RunPoint | None = None,
              dest_argv: DestArgv = agent_argv) -> int:
    """Run the sweep ``args`` describe; returns the exit code.

    ``run_point`` and ``dest_argv`` default to the real agents; tests pass
    stand-ins for the agent layer (never for KVM).
    """
    try:
        plan = plan_from_args(args)
        if args.plot_dir is not None:  # checked now, not after the last point
            check_plot_dir(args.plot_dir)
        if args.psk_file:
            protocol.load_psk(args.psk_file)
        run_point = run_point or default_run_point()
        store = ResultsStore(args.db or default_db_path())  # last: a refused sweep writes nothing
    except (AxisError, ResultsStoreError, SetupError, protocol.KeyFileError) as exc:
        _error(str(exc))
        return EXIT_USAGE
    interrupted: list[bool] = []
    try:
        outcome = await _sweep(plan, store, run_point, args, dest_argv, interrupted)
    except (SweepConfigError, InjectorError, NetemError) as exc:
        _error(str(exc))
        return EXIT_USAGE
    except DestinationError as exc:
        _error(str(exc))
        return EXIT_PEER
    if interrupted or outcome is None:
        print("source-agent sweep: interrupted; rerun the same command to resume "
              "(finished points are skipped)", file=sys.stderr)
        return EXIT_INTERRUPTED
    runs = store.runs(sweep=plan.name)
    summaries = summarise(plan, runs)
    plots: list[Path] = []
    if args.plot_dir is not None:
        try:
            plots = write_plots(plan, runs, args.plot_dir)
        except (PlotError, OSError) as exc:
            _error(f"plots: {exc}")
            return EXIT_USAGE
    emit(args.format, plan, outcome, summaries, plots, store, runs)
    if outcome.stopped:
        _error(f"sweep stopped: {outcome.stopped}")
        return EXIT_PEER
    return EXIT_FAILED if any(s.failed or s.errors for s in summaries) else EXIT_PASSED


def injectors(runs: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Every injector the sweep's stored runs went through (a resumed sweep may have used two)."""
    seen: dict[tuple[str, str], None] = {}
    for run in runs:
        used = run["report"].get("sweep", {}).get("injector") or {}
        seen[(str(used.get("injector")), str(used.get("reason")))] = None
    return [{"kind": kind, "reason": reason} for kind, reason in seen]


def summary_json(plan: SweepPlan, outcome: SweepOutcome, summaries: list[PointSummary],
                 plots: list[Path], store: ResultsStore, runs: list[dict[str, Any]]) -> dict[str, Any]:
    injector = outcome.injector
    return {"sweep": plan.name, "db": str(store.path), "config": plan.config(),
            "repeat": plan.repeat, "planned": outcome.planned, "ran": outcome.ran,
            "skipped": outcome.skipped, "errors": outcome.errors, "stopped": outcome.stopped,
            "injector": injector and {"kind": injector.kind, "reason": injector.reason},
            "injectors_recorded": injectors(runs),
            "points": [s.to_plain() for s in summaries], "plots": [str(p) for p in plots]}


def _fixed(plan: SweepPlan) -> str:
    """The axes with one value, which the point labels leave out."""
    return " ".join(f"{axis}={values[0]}" for axis, values in plan.axes.describe().items()
                    if len(values) == 1) or "-"


def _ms(stats: Stats | None, field: str) -> str:
    """One statistic in milliseconds, ``-`` where the point has no figure."""
    return "-" if stats is None else f"{getattr(stats, field) / 1e6:.3f}"


def emit(fmt: str, plan: SweepPlan, outcome: SweepOutcome, summaries: list[PointSummary],
         plots: list[Path], store: ResultsStore, runs: list[dict[str, Any]]) -> None:
    if fmt == "json":
        json.dump(summary_json(plan, outcome, summaries, plots, store, runs), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    if fmt == "ktap":
        sys.stdout.write(ktap.render(plan.name, summaries))
        return
    from rich.table import Table

    from source_agent.render import ReportConsole

    used = "; ".join(f"{i['kind']} ({i['reason']})" for i in injectors(runs))
    title = (f"sweep {plan.name}: ran {outcome.ran}, skipped {outcome.skipped} (already done), "
             f"errors {outcome.errors}" + (f"; injector {used}" if used else ""))
    table = Table(title=title, title_justify="left", caption=f"fixed: {_fixed(plan)}",
                  caption_justify="left")
    for column in ("point", "runs ok/all", "basis", "acct err median", "p5", "p95",
                   "downtime median", "p5", "p95", "rtt median", "failed verdicts"):
        table.add_column(column, justify="left" if column in ("point", "basis", "failed verdicts")
                         else "right")
    for s in summaries:
        table.add_row(s.label, f"{s.passed}/{s.runs}", s.basis or "-",
                      *(_ms(s.accounting_error, f) for f in ("median", "p5", "p95")),
                      *(_ms(s.downtime, f) for f in ("median", "p5", "p95")),
                      _ms(s.rtt, "median"),
                      ", ".join(f"{name} {c['failed']}/{sum(c.values())}"
                                for name, c in s.verdicts.items() if c["failed"]) or "-")
    console = ReportConsole(file=sys.stdout, width=200)
    console.print(table)
    console.print("times in ms; accounting error = " + "; ".join(
        f"{k}: {v}" for k, v in BASES.items()), highlight=False)
    for path in plots:
        console.print(f"plot: {path}", highlight=False)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m source_agent.sweep NAME ...`` until the coordinator wires ``sweep`` into source-agent."""
    parser = argparse.ArgumentParser(prog="source-agent")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["sweep", *(sys.argv[1:] if argv is None else argv)])
    try:
        return trio.run(run, args)
    except KeyboardInterrupt:  # Ctrl-C before the sweep's own handler was installed
        return EXIT_INTERRUPTED

"""``source-agent results list | export | show``: read the results store, never write it.

A reading command opens the database read-only (SQLite enforces it) and
never creates one: a typo in ``--db`` or someone else's SQLite file is a
clear error (exit 2), not a new or altered database. ``show`` prints a stored
report exactly as its run printed it, through the same `print_report`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from typing import IO, Any

from agentcore.options import EXIT_USAGE, UsageError, argtype, parse_duration_ns

from .results import (
    OUTCOMES,
    ResultsStore,
    ResultsStoreError,
    default_db_path,
    export_csv,
    export_json,
    timestamp,
)

EPILOG = """\
examples:
  source-agent results list --limit 5
  source-agent results list --sweep latency-gap --outcome error --since 2h
  source-agent results list --outcome "rolled back"   # the destination failed, the guest ran on
  source-agent results show 20261127T125225-ffcb4640 --json
  source-agent results export --format json --since 2026-11-27 | jq '.[].outcome'

--since takes a time (2026-11-27, 2026-11-27T12:00, UTC unless it names an offset) or a
duration before now (30min, 2h, 1d). The database is opened read-only and never created.
exit codes: 0 done, 2 bad option, no such run, or not a testbed results database.
"""


def parse_since(text: str, *, now_ns: int | None = None) -> str:
    """A `timestamp` from ``2026-11-27[T12:00[:00][Z|+01:00]]`` (UTC if naive) or a duration ago."""
    try:
        ago = parse_duration_ns(text)
    except UsageError:
        pass
    else:
        return timestamp((time.time_ns() if now_ns is None else now_ns) - ago)
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--since {text!r}: expected a time (2026-11-27, 2026-11-27T12:00Z) or "
                         "a duration before now (2h)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
    return timestamp((when - epoch) // datetime.timedelta(microseconds=1) * 1000)  # exact, no float


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``results`` on the ``source-agent`` subcommands."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "results", help="list, export or show recorded runs",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Runs recorded in the SQLite results store.")
    p.add_argument("action", nargs="?", choices=("list", "export", "show"), default="list")
    p.add_argument("run_id", nargs="?", metavar="RUN_ID",
                   help="show: the run (its id, or the start of it)")
    p.add_argument("--db", metavar="PATH", help=f"default {default_db_path()}")
    p.add_argument("--format", choices=("json", "csv"), default="json",
                   help="export format (default json)")
    p.add_argument("--json", action="store_true", help="show: the report as JSON, as --json printed it")
    p.add_argument("--sweep", metavar="NAME", help="only this sweep's runs")
    p.add_argument("--outcome", choices=OUTCOMES, help="only runs with this outcome")
    p.add_argument("--since", type=argtype(parse_since), metavar="WHEN",
                   help="only runs started at or after WHEN (a time, or a duration before now)")
    p.add_argument("--limit", type=argtype(_positive_int), metavar="N", help="only the N latest runs")
    return p


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise UsageError(f"--limit {text!r}: expected a whole number of at least 1")
    return int(text)


def print_report(report: dict[str, Any], *, as_json: bool, file: IO[str] | None = None) -> None:
    """A report on stdout as a run prints it: JSON in the report's own key order, or the tables."""
    out = sys.stdout if file is None else file
    if as_json:
        out.write(json.dumps(report, indent=2, sort_keys=False) + "\n")
    else:
        from .render import render

        render(report, out)


def _error(message: str) -> int:
    print(f"source-agent results: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def run(args: argparse.Namespace) -> int:
    """The ``results`` command; returns the exit code."""
    if (args.action == "show") != (args.run_id is not None):
        return _error("RUN_ID is given with 'show', and only there")
    try:
        store = ResultsStore(args.db or default_db_path(), read_only=True)
        if args.action == "show":
            print_report(store.run(args.run_id)["report"], as_json=args.json)
            return 0
        runs = store.runs(sweep=args.sweep, outcome=args.outcome, since=args.since,
                          limit=args.limit)
    except ResultsStoreError as exc:
        return _error(str(exc))
    if args.action == "export":
        sys.stdout.write(export_json(runs) if args.format == "json" else export_csv(runs))
        return 0
    _print_table(runs)
    return 0


def _print_table(runs: list[dict[str, Any]]) -> None:
    from rich.table import Table

    from .render import ReportConsole, ms

    table = Table(title=f"{len(runs)} run(s)", title_justify="left")
    for col in ("run", "started", "command", "sweep", "outcome", "destination", "strategy",
                "wall gap", "kvmclock jump", "downtime", "error"):
        table.add_column(col)
    for r in runs:
        table.add_row(r["run_id"], r["started_at"], r["command"], r["sweep"] or "-", r["outcome"],
                      r["destination"] or "-", r["strategy"] or "-", ms(r["wall_gap_ns"]),
                      ms(r["kvmclock_jump_ns"]), ms(r["downtime_ns"]), r["error"] or "")
    ReportConsole(file=sys.stdout, width=200).print(table)

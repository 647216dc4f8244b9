"""`./dev pair`: boot the pair and run a migration (or a script of them, or the pair's tests)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import xen_lane
from agentcore.options import UsageError, parse_duration_ns

from . import table
from .hetero import run_hetero
from .run import PairOptions, progress, run_pair
from .skew_sweep import DEFAULT_SWEEP, parse_skews, plot, points, run_sweeps
from .scenario import add_condition_options, parse_script, scenario_from, split_dashdash

EPILOG = """\
examples:
  ./dev pair                                   # the pair's tests (pytest -m pair tests/pair)
  ./dev pair --ci                              # CI's one boot: tests/pair/test_pair_clock.py
  ./dev pair --                                # one migration src -> dst, the report printed
  ./dev pair -- --gap 50ms --json              # the same with source-agent migrate arguments
  ./dev pair --skew +250ms -- --clock realtime --json
  ./dev pair --boot-gap 5s --latency 5ms --jitter 1ms -- --tsc offset
  ./dev pair --script scenarios.txt            # several scenarios on one boot (docs/pair.md)
  ./dev pair --sweep-skew -250ms,0,+250ms      # the sweep over the pair, skew as an axis
  ./dev pair --hetero -- --json                # this machine <-> a lane machine, both ways
  ./dev pair --hetero lane-to-host -- --tsc offset   # refused: this host does not apply it

Each scenario prints the source's stdout; the exit status is the source-agent's (with --script the
highest of them); 2 when the pair cannot boot or for bad usage, 124 on --timeout.
Kept in --results: src/ and dst/ (console.log, the agents' HOME), scenarios.json, timings.json.
"""


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    own, migrate = split_dashdash(argv)
    parser = argparse.ArgumentParser(
        prog="./dev pair", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Two lane machines, src and dst, each its own kernel, clock and TSC, joined by "
                    "a virtio-net link; dest-agent serves on dst, source-agent migrates from src. "
                    "Their clocks are set from the host's over a separate virtio-serial path, which "
                    "also measures them (the reference the report records as clock_reference).")
    add_condition_options(parser)
    parser.add_argument("--boot-gap", type=parse_duration_ns, default=0, metavar="DURATION",
                        help="boot dst this long after src, so their TSCs differ by about it")
    parser.add_argument("--script", type=Path, metavar="FILE",
                        help="one scenario a line ([--skew ...] -- MIGRATE ARGS); one boot for all")
    parser.add_argument("--results", type=Path, default=xen_lane.REPO / "results" / "pair",
                        help="where consoles, reports and timings are kept (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=900,
                        help="seconds for everything, retry included (default %(default)s)")
    parser.add_argument("--hetero", nargs="?", const="both", metavar="DIRECTION",
                        choices=("both", "host-to-lane", "lane-to-host"),
                        help="the heterogeneous pair instead: this machine's own kernel and "
                             "one lane machine (a host port forwarded into it), host-to-lane, "
                             "lane-to-host or both (the default); a scenario without "
                             "--clock/--tsc/--runstate gets the best strategy both support")
    parser.add_argument("--sweep-skew", type=parse_skews, metavar="LIST",
                        help="the sweep over the pair: for each skew (e.g. -250ms,0,+250ms) set "
                             "dst's clock, then run `source-agent sweep --topology remote` on "
                             "src with the arguments after -- (default: "
                             + " ".join(DEFAULT_SWEEP) + "); plots clock error against skew "
                             "per strategy into --results/plots")
    parser.add_argument("--table", type=Path, metavar="SCENARIOS_JSON",
                        help="print a run's scenarios.json as the README's markdown table "
                             "(nothing boots)")
    parser.add_argument("--clock-guest", action="store_true",
                        help="both lane machines load kvm/kvm-amd with the project's "
                             "KVM_[GS]ET_CLOCK_GUEST (tools/kvm_modules.py, built once and "
                             "cached, as ./dev lane --clock-guest): clock=guest becomes their best")
    parser.add_argument("--inject-oops", choices=("src", "dst"), metavar="MACHINE",
                        help="test the retry: on the first boot, once set up, kill src or dst "
                             "and write an oops line to its console; the pair must boot again")
    parser.add_argument("--python", default=sys.executable, help="the virtualenv's python")
    parser.add_argument("--test", action="store_true",
                        help="run the pair's tests (the default without arguments)")
    parser.add_argument("--ci", action="store_true",
                        help="CI's run: one boot (--boot-gap 5s), a short script of six "
                             "migrations (skew 0 and +-250 ms, realtime-synced, a Xen "
                             "migration, tsc=none) judged by tests/pair/test_pair_clock.py")
    try:
        return parser.parse_args(own), migrate
    except UsageError as e:
        parser.error(str(e))


def run_tests(python: str, ci: bool = False) -> int:
    env = {**os.environ, "KVM_TESTBED_RUN_PAIR": "1"}
    if ci:
        env["KVM_TESTBED_PAIR_SET"] = "ci"
    where = "tests/pair/test_pair_clock.py" if ci else "tests/pair"
    return subprocess.call([python, "-m", "pytest", "-m", "pair", where, "-q", "-rA",
                            "-p", "no:cacheprovider"], cwd=xen_lane.REPO, env=env)


def sweep_over_skews(args: argparse.Namespace, sweep_args: Sequence[str]) -> int:
    """--sweep-skew: the pair, one sweep on src per skew, the figure and a points table."""
    if args.script or args.hetero or args.skew:
        progress("error: --sweep-skew: not with --script, --hetero or --skew (the skews are "
                 "its axis)")
        return 2
    options = PairOptions(python=args.python, results=args.results.resolve(),
                          timeout=args.timeout, boot_gap_s=args.boot_gap / 1e9,
                          clock_guest=args.clock_guest)
    sweep_args = list(sweep_args) or list(DEFAULT_SWEEP)
    try:
        outcomes, facts = run_pair(options, [], session=lambda pair: run_sweeps(
            pair, args.sweep_skew, sweep_args))
        rows = points(outcomes)
    except xen_lane.LaneError as e:
        progress(f"error: the pair failed: {e}")
        return xen_lane.EXIT_TIMEOUT if e.status == xen_lane.EXIT_TIMEOUT else 2
    except ValueError as e:
        progress(f"error: {e}")
        return 2
    (options.results / "sweep-points.json").write_text(json.dumps(rows, indent=1) + "\n")
    written = plot(rows, options.results / "plots" / "pair-clock-error-vs-skew")
    print(f"{'skew (ref)':>12} {'strategy':<36} {'runs':>4} {'failed':>6} {'error median':>13}")
    for r in rows:
        median = r["error_median_ns"]
        print(f"{r['skew_reference_ns'] / 1e6:+10.3f}ms {r['strategy']:<36} {r['runs']:>4} "
              f"{r['failed']:>6} " + (f"{median / 1e6:+11.3f}ms" if median is not None else "-"))
    progress(f"done in {facts['total_s']} s; plots: {', '.join(map(str, written))}")
    return max(o.status for o in outcomes)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, migrate = parse_args(argv)
    migration = "--" in argv or args.script or args.skew or args.latency or args.jitter \
        or args.rate or args.boot_gap or args.inject_oops or args.hetero or args.clock_guest \
        or args.sweep_skew or args.table
    if args.test or args.ci or not migration:
        return run_tests(args.python, args.ci)
    if not (os.path.isfile(args.python) and os.access(args.python, os.X_OK)):
        progress(f"error: --python {args.python}: not an executable file")
        return 2
    if args.table:
        try:
            sys.stdout.write(table.markdown(json.loads(args.table.read_text())))
        except (OSError, ValueError, KeyError) as e:
            progress(f"error: --table {args.table}: {e}")
            return 2
        return 0
    if args.sweep_skew:
        return sweep_over_skews(args, migrate)
    try:
        scenarios = (parse_script(args.script.read_text(), str(args.script)) if args.script
                     else [scenario_from(args, migrate)])
    except OSError as e:
        progress(f"error: --script {args.script}: {e.strerror}")
        return 2
    except UsageError as e:
        progress(f"error: {e}")
        return 2
    if args.hetero and (args.boot_gap or any(s.netem() for s in scenarios)):
        progress("error: --hetero: no --boot-gap, --latency, --jitter or --rate (one machine "
                 "is this one: its clock, TSC and loopback are not ours to change)")
        return 2
    options = PairOptions(python=args.python, results=args.results.resolve(),
                          timeout=args.timeout, boot_gap_s=args.boot_gap / 1e9,
                          inject_oops=args.inject_oops, clock_guest=args.clock_guest)

    def show(outcome) -> None:
        sys.stdout.write(outcome.stdout)
        sys.stdout.flush()
        if outcome.status not in (0, 1):
            progress(f"source-agent exited {outcome.status}: {outcome.stderr.strip()[-500:]}")

    try:
        if args.hetero:
            outcomes, facts = run_hetero(options, scenarios, args.hetero, show)
        else:
            outcomes, facts = run_pair(options, scenarios, show)
    except xen_lane.LaneError as e:
        progress(f"error: the pair failed: {e}")
        return xen_lane.EXIT_TIMEOUT if e.status == xen_lane.EXIT_TIMEOUT else 2
    progress(f"done in {facts['total_s']} s (results in {options.results})")
    return max(o.status for o in outcomes)

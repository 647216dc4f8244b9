"""``source-agent migrate | loopback | results``: the command line over migrate() and the store.

A run is: parse and check the options (exit 2 on anything wrong, before any VM
or connection), migrate, compose the report, record it (every run, failed ones
too), print it. stdout carries only the report, so ``--json | jq`` works;
diagnostics go to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import secrets
import sys
import time
from collections.abc import Sequence
from typing import Any

import trio

import protocol
from kvmcore import HostCapabilities, KvmError, Strategy, System, Unsupported, probe
from kvmcore.strategy import CHOICES, PARTS

from .loopback import loopback
from .migrate import MigrationFailed, MigrationPlan, RolledBack, migrate
from .stats import MODES
from agentcore import AGENT_VERSION
from agentcore.crash import internal_error
from agentcore.options import (
    EXIT_BROKEN_PIPE,
    EXIT_PEER,
    EXIT_USAGE,
    UsageError,
    argtype,
    parse_byte_rate,
    parse_duration_ns,
    parse_guest_memory,
    parse_host_port,
    parse_size,
    parse_timeout,
    seconds,
)
from . import results_cli
from .results_cli import print_report
from .sweep import cli as sweep_cli
from .report import compose, error_report
from .results import (
    ResultsStore,
    ResultsStoreError,
    RunRecord,
    default_db_path,
    record_columns,
    timestamp,
)

EPILOG = """\
examples:
  source-agent loopback                          # both agents on 127.0.0.1, report as tables
  source-agent loopback --gap 10ms --json | jq .verdicts
  source-agent loopback --clock plain            # negative control: kvmclock hides the gap (exit 1)
  source-agent migrate --to 10.0.0.2:7400 --psk-file key --gap 50ms
  source-agent loopback --mode precopy --memory 64MiB --dirty-rate 50MiB/s --working-set 8MiB
  source-agent loopback --destroy-first          # the seed's order: source VM destroyed at capture
  source-agent results list --limit 20
  source-agent results show RUN_ID               # a stored report, as its run printed it
  source-agent results export --format csv > runs.csv

exit codes: 0 every verdict passed, 1 a verdict failed, 2 usage or set-up error
(bad option, key file refused, strategy unsupported on this host, no /dev/kvm),
3 peer or network error (refused, timeout, authentication, the destination's ERROR; once the
source guest exists it is resumed: outcome "rolled back"),
4 internal error (a bug: one line names the file holding the traceback).
"""

log = logging.getLogger("source_agent")


def _common(p: argparse.ArgumentParser, *, remote: bool) -> None:
    p.add_argument("--json", action="store_true", help="print the report as JSON (stable keys)")
    p.add_argument("--gap", type=argtype(parse_duration_ns), default=0, metavar="DURATION",
                   help="extra wait between capture and sending, e.g. 10ms (default 0)")
    p.add_argument("--clock", choices=CHOICES["clock"],
                   help="kvmclock restore (default: the best this host can do)")
    p.add_argument("--tsc", choices=CHOICES["tsc"], help="TSC restore (default: best)")
    p.add_argument("--runstate", choices=CHOICES["runstate"],
                   help="Xen runstate restore (default: kernel where KVM has Xen, else off)")
    p.add_argument("--memory", type=argtype(parse_guest_memory), default=2 << 20, metavar="SIZE",
                   help="guest memory, a multiple of 2MiB up to 1GiB (default 2MiB)")
    p.add_argument("--warmup", type=argtype(parse_duration_ns), default=10_000_000,
                   metavar="DURATION", help="run the guest this long before capture (default 10ms)")
    p.add_argument("--chunk-size", type=argtype(parse_size), default=1 << 20, metavar="SIZE",
                   help="memory chunk size on the wire (default 1MiB)")
    p.add_argument("--clock-rounds", type=int, default=8, metavar="N",
                   help="clock-sync exchanges, 1..256; the minimum-RTT one is used (default 8)")
    p.add_argument("--mode", choices=MODES, default="stop-copy",
                   help="stop-copy: the guest stopped for the whole transfer; precopy: memory "
                        "sent in rounds while it runs, then the last dirty pages (default "
                        "stop-copy)")
    p.add_argument("--destroy-first", action="store_true",
                   help="stop-copy in the seed's order: destroy the source VM at capture, "
                        "before the transfer (inside the downtime; a failure loses the guest)")
    p.add_argument("--downtime-limit", type=argtype(parse_duration_ns), metavar="DURATION",
                   help="precopy: stop the guest once the dirty pages would take no longer "
                        "than this to send (default 30ms)")
    p.add_argument("--max-rounds", type=int, metavar="N",
                   help="precopy: stop the guest after N rounds, round 0 (all memory) "
                        "included, converged or not (default 10)")
    p.add_argument("--dirty-rate", type=argtype(parse_byte_rate), default=0, metavar="RATE",
                   help="the guest writes this many bytes per second of its kvmclock time, "
                        "e.g. 50MiB/s (default 0: none)")
    p.add_argument("--working-set", type=argtype(parse_size), default=0, metavar="SIZE",
                   help="... over this much of its memory, whole 4KiB pages, e.g. 8MiB")
    for name, default in (("connect", "10s"), ("handshake", "30s"), ("message", "30s"),
                          ("idle", "60s")):
        p.add_argument(f"--{name}-timeout", type=argtype(parse_timeout), default=seconds(default),
                       metavar="DURATION", help=f"{name} timeout (default {default})")
    if remote:
        p.add_argument("--to", required=True, metavar="HOST:PORT",
                       type=argtype(lambda t: parse_host_port(t, default_port=7400)),
                       help="the destination agent (port defaults to 7400)")
        p.add_argument("--psk-file", metavar="PATH",
                       help="pre-shared key file, the destination's (mode 600, >= 16 bytes); "
                            "without it the empty key, which a loopback destination accepts")
        p.add_argument("--tls-ca", metavar="PEM", help="use TLS, trusting this CA")
        p.add_argument("--tls-cert", metavar="PEM", help="client certificate (mutual TLS)")
        p.add_argument("--tls-key", metavar="PEM", help="the client certificate's key")
        p.add_argument("--topology", default="remote", help="label for the report (default remote)")
    p.add_argument("--db", metavar="PATH", help=f"results database (default {default_db_path()})")
    p.add_argument("--no-db", action="store_true", help="do not record this run")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="source-agent", formatter_class=raw, epilog=EPILOG,
        description="Source agent of the KVM migration testbed: migrate a guest, report what "
                    "it saw of the gap.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {AGENT_VERSION}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _common(sub.add_parser("migrate", help="migrate a guest to a destination agent",
                           formatter_class=raw, epilog=EPILOG,
                           description="Migrate a guest to a running dest-agent."), remote=True)
    _common(sub.add_parser("loopback", help="start a destination on 127.0.0.1 and migrate to it",
                           formatter_class=raw, epilog=EPILOG,
                           description="Both agents in one process over TCP on 127.0.0.1 "
                                       "(random in-memory key): the one-command experiment."),
            remote=False)
    results_cli.add_parser(sub)
    sweep_cli.add_parser(sub)
    return parser


def plan_from_args(args: argparse.Namespace) -> MigrationPlan:
    """Options -> plan, before anything runs; UsageError says which option and why.

    The strategy is left as the options give it (see resolve_strategy): the host's
    best needs the probe, which is part of the run."""
    if args.chunk_size % protocol.PAGE_SIZE or not 0 < args.chunk_size <= 4 << 20:
        raise UsageError("--chunk-size: a multiple of 4KiB up to 4MiB")
    most = protocol.Limits().max_clock_sync_rounds     # what a destination answers in a row
    if not 1 <= args.clock_rounds <= most:
        raise UsageError(f"--clock-rounds {args.clock_rounds}: must be between 1 and {most}")
    host, port = getattr(args, "to", ("127.0.0.1", 0))
    psk = b""
    ssl_context = None
    if getattr(args, "psk_file", None):
        try:
            psk = protocol.load_psk(args.psk_file)
        except protocol.KeyFileError as exc:
            raise UsageError(str(exc)) from None
    if getattr(args, "tls_ca", None):
        try:
            ssl_context = protocol.tls_client_context(args.tls_ca, certfile=args.tls_cert,
                                                      keyfile=args.tls_key)
        except (OSError, ValueError) as exc:
            raise UsageError(f"TLS set-up: {exc}") from None
    for option in ("downtime_limit", "max_rounds"):
        if getattr(args, option) is not None and args.mode != "precopy":
            raise UsageError(f"--{option.replace('_', '-')} applies to --mode precopy only "
                             f"(this run is {args.mode})")
    precopy = {name: value for name in ("downtime_limit", "max_rounds")
               if (value := getattr(args, name)) is not None}
    if "downtime_limit" in precopy:
        precopy["downtime_limit_ns"] = precopy.pop("downtime_limit")
    return MigrationPlan(
        mode=args.mode, destroy_first=args.destroy_first, dirty_rate=args.dirty_rate,
        working_set=args.working_set, **precopy,
        host=host, port=port, psk=psk, strategy=Strategy(), memory_size=args.memory,
        warmup_ns=args.warmup, gap_ns=args.gap, chunk_size=args.chunk_size,
        clock_rounds=args.clock_rounds, topology=getattr(args, "topology", "loopback"),
        ssl_context=ssl_context, connect_timeout=args.connect_timeout,
        handshake_timeout=args.handshake_timeout, message_timeout=args.message_timeout,
        idle_timeout=args.idle_timeout)


def strategy_options(args: argparse.Namespace) -> str:
    """The parts --clock/--tsc/--runstate give (``"tsc=offset"``; ``""``: none)."""
    return ",".join(f"{part}={getattr(args, part)}" for part in PARTS
                    if getattr(args, part) is not None)


def resolve_strategy(args: argparse.Namespace, caps: HostCapabilities) -> Strategy:
    """This host's best, overridden part by part; Unsupported (exit 2) for a part the host
    cannot do, before any VM or connection. `migrate` negotiates the parts left open once
    the destination's HELLO is in (MigrationPlan.negotiate)."""
    return Strategy.resolve(strategy_options(args), caps)


async def run_migration(args: argparse.Namespace, plan: MigrationPlan, run_id: str,
                        started: int) -> dict[str, Any]:
    """Set up, migrate, compose the report; the failures are cmd_run's to classify."""
    try:
        kvm = System()
    except OSError as exc:
        raise UsageError(f"cannot open /dev/kvm: {exc.strerror}") from None
    with kvm:
        caps = await trio.to_thread.run_sync(probe, kvm)
        plan = dataclasses.replace(plan, strategy=resolve_strategy(args, caps),
                                   negotiate=strategy_options(args)
                                   if args.command == "migrate" else None)
        log.info("migrating a %d MiB guest (%s, %s) %s", plan.memory_size >> 20, plan.strategy,
                 plan.mode, "over loopback" if args.command == "loopback"
                 else f"to {plan.destination}")
        if args.command == "loopback":
            migration = await loopback(plan, kvm, caps)
        else:
            migration = await migrate(plan, kvm, caps)
    return compose(migration, run_id=run_id, started_ns=started, command=args.command)


def classify(exc: BaseException, args: argparse.Namespace, plan: MigrationPlan
             ) -> tuple[int, str] | None:
    """A failure's exit code and message: 3 the peer or the network, 2 this host's set-up;
    None for anything else (a bug: exit 4)."""
    if isinstance(exc, (UsageError, Unsupported, KvmError)):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, (protocol.ProtocolError, OSError, trio.TooSlowError)):
        what = "timed out" if isinstance(exc, trio.TooSlowError) else str(exc)
        if isinstance(exc, protocol.AuthenticationFailed) and not plan.psk:
            what += "; this source has no key: give --psk-file with the destination's key file"
        where = "loopback" if args.command == "loopback" else plan.destination
        return EXIT_PEER, f"{where}: {what or type(exc).__name__}"
    return None


def cmd_run(args: argparse.Namespace) -> int:
    try:
        plan = plan_from_args(args)
    except UsageError as exc:
        print(f"source-agent: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    started = time.time_ns()
    run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime(started / 1e9)) + "-" + secrets.token_hex(4)
    try:
        store = None if args.no_db else ResultsStore(args.db or default_db_path())
    except ResultsStoreError as exc:
        print(f"source-agent: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        report = trio.run(run_migration, args, plan, run_id, started)
    except Exception as exc:
        failed = exc if isinstance(exc, MigrationFailed) else None
        known = classify(failed.cause if failed else exc, args, plan)
        if known is None:
            raise (failed.cause if failed else exc)
        code, error = known
        extra: dict[str, Any] = {}
        if failed is not None:
            # What became of the source guest, after the cause.
            error += f"; {failed.what}"
            extra["migration"] = failed.stats.to_plain()
            if isinstance(failed, RolledBack):
                extra["rollback"] = failed.rollback.to_plain()
        print(f"source-agent: error: {error}", file=sys.stderr)
        destination = (f"{args.to[0]}:{args.to[1]}" if getattr(args, "to", None) else None)
        report = error_report(run_id=run_id, started_ns=started, command=args.command,
                              topology=getattr(args, "topology", "loopback"),
                              destination=destination, strategy=None, exit_code=code,
                              error=error, outcome=("rolled back" if isinstance(
                                  failed, RolledBack) else "error"), **extra)
    if store is not None:
        store.record(RunRecord(
            run_id=run_id, started_at=report["started_at"], finished_at=timestamp(time.time_ns()),
            command=args.command, outcome=report["outcome"], exit_code=report["exit_code"],
            error=report["error"], report=report, **record_columns(report)))
    print_report(report, as_json=args.json)
    return int(report["exit_code"])


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # stdout's reader left (`| head`): the run is recorded already; end quietly, as a
        # process killed by SIGPIPE would, and keep the interpreter's final flush quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except Exception as exc:     # our bug, never exit 1 ("a verdict failed"): see agentcore.crash
        return internal_error("source-agent", exc)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        stream=sys.stderr, format="%(name)s: %(message)s")
    if args.command == "results":
        return results_cli.run(args)
    if args.command == "sweep":
        return trio.run(args.run, args)
    return cmd_run(args)

"""What one migration in the pair is made of, and the --script format (pure; unit-tested).

A scenario is the network and clock conditions plus the source-agent migrate arguments. A script
file holds one scenario a line, in the command line's own syntax:

    # skew 0, then dst ahead and behind by 250 ms (blank lines and comments are ignored)
    -- --gap 50ms --json
    --skew +250ms -- --gap 50ms --json
    --skew -250ms --latency 5ms -- --clock realtime --json
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
from collections.abc import Sequence

from agentcore.options import UsageError, parse_duration_ns, parse_rate


def signed_duration_ns(text: str) -> int:
    """'+250ms' / '-250ms' / '250ms' -> nanoseconds (a skew may be negative)."""
    sign = -1 if text.startswith("-") else 1
    return sign * parse_duration_ns(text.lstrip("+-"))


@dataclasses.dataclass(frozen=True)
class Scenario:
    skew_ns: int = 0
    latency_ns: int = 0
    jitter_ns: int = 0
    rate_bps: float | None = None  # bytes per second, None: no cap
    migrate_args: tuple[str, ...] = ()

    def netem(self) -> list[str]:
        """`tc qdisc replace ... netem` arguments for these conditions ([] for none)."""
        args = []
        if self.latency_ns or self.jitter_ns:
            args += ["delay", f"{self.latency_ns // 1000}us"]
            if self.jitter_ns:
                args += [f"{self.jitter_ns // 1000}us"]
        if self.rate_bps:
            args += ["rate", f"{int(self.rate_bps * 8)}bit"]
        return args

    def label(self) -> str:
        parts = [f"skew {self.skew_ns / 1e6:+.0f} ms"]
        if self.netem():
            parts.append("netem " + " ".join(self.netem()))
        return ", ".join(parts) + (" -- " + shlex.join(self.migrate_args) if self.migrate_args else "")


def add_condition_options(parser: argparse.ArgumentParser) -> None:
    """The per-scenario options (the command line and each script line share them)."""
    parser.add_argument("--skew", type=signed_duration_ns, default=0, metavar="DURATION",
                        help="dst's CLOCK_REALTIME minus src's, signed: +250ms puts dst ahead "
                             "(default 0: both set to the host's clock)")
    parser.add_argument("--latency", type=parse_duration_ns, default=0, metavar="DURATION",
                        help="tc netem one-way delay on both NICs, e.g. 5ms")
    parser.add_argument("--jitter", type=parse_duration_ns, default=0, metavar="DURATION",
                        help="tc netem jitter on both NICs")
    parser.add_argument("--rate", type=parse_rate, default=None, metavar="RATE",
                        help="tc netem rate cap on both NICs, e.g. 100Mbit")


def scenario_from(ns: argparse.Namespace, migrate_args: Sequence[str]) -> Scenario:
    return Scenario(ns.skew, ns.latency, ns.jitter, ns.rate, tuple(migrate_args))


def split_dashdash(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(our options, the migrate arguments after `--`); `--skew -250ms` is made `--skew=-250ms`
    (and `--sweep-skew -250ms,0` the same),
    since argparse takes a value starting with '-' for an option."""
    argv = list(argv)
    own, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    joined: list[str] = []
    for word in own:
        if joined and joined[-1] in ("--skew", "--sweep-skew") and word.startswith("-"):
            joined[-1] = f"{joined[-1]}={word}"
        else:
            joined.append(word)
    return joined, rest


class _Raising(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def parse_script(text: str, name: str = "script") -> list[Scenario]:
    """The scenarios of a script; UsageError naming the line of the first bad one."""
    parser = _Raising(prog=name, add_help=False)
    add_condition_options(parser)
    scenarios = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            own, migrate = split_dashdash(shlex.split(line))
            scenarios.append(scenario_from(parser.parse_args(own), migrate))
        except (UsageError, ValueError) as e:
            raise UsageError(f"{name}:{number}: {e}") from None
    if not scenarios:
        raise UsageError(f"{name}: no scenarios in it")
    return scenarios



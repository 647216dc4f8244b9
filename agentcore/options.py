"""Human-friendly option values and the exit codes both agents share (docs/agents.md).

Durations ("10ms", "1.5s") and sizes ("2MiB") are parsed here once, with
errors that quote the value and say what would have been accepted, because a
typo in an experiment's parameters should stop it before any VM exists.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable


#: Exit codes (documented in docs/agents.md).
EXIT_PASSED = 0         # every verdict passed
EXIT_FAILED = 1         # a verdict failed
EXIT_USAGE = 2          # usage or set-up error on this host
EXIT_PEER = 3           # the peer or the network failed
EXIT_INTERNAL = 4       # a bug in the testbed: an unexpected exception (traceback logged)

_DURATION_UNITS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 1_000_000_000,
                   "m": 60_000_000_000, "min": 60_000_000_000, "h": 3_600_000_000_000,
                   "d": 86_400_000_000_000}
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2,
               "mib": 1 << 20, "g": 1000**3, "gb": 1000**3, "gib": 1 << 30}
_NUMBER = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Zµ]*)\s*")


class UsageError(Exception):
    """A bad option value or a set-up problem on this host (exit code 2)."""


def parse_duration_ns(text: str) -> int:
    """``"10ms"`` -> 10_000_000; a unit is required (ns, us, ms, s, m)."""
    match = _NUMBER.fullmatch(text)
    if not match or match.group(2) not in _DURATION_UNITS:
        raise UsageError(f"duration {text!r}: expected a number and a unit "
                         f"({', '.join(_DURATION_UNITS)}), e.g. 10ms")
    return round(float(match.group(1)) * _DURATION_UNITS[match.group(2)])


def parse_size(text: str) -> int:
    """``"2MiB"`` -> 2097152; plain numbers are bytes; K/M/G are powers of 1000, KiB/MiB/GiB of 1024."""
    match = _NUMBER.fullmatch(text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _SIZE_UNITS:
        raise UsageError(f"size {text!r}: expected a number and an optional unit "
                         "(B, KiB, MiB, GiB, K, M, G), e.g. 2MiB")
    value = float(match.group(1)) * _SIZE_UNITS[unit]
    if value != int(value):
        raise UsageError(f"size {text!r}: not a whole number of bytes")
    return int(value)


def parse_host_port(text: str, *, default_port: int | None = None) -> tuple[str, int]:
    """``HOST:PORT`` or ``[v6addr]:PORT`` (PORT optional when ``default_port`` is given)."""
    host, sep, port = text.rpartition(":")
    if not sep or (host.count(":") and not host.startswith("[")):
        host, port = text, ""
    host = host.strip("[]")
    if not port and default_port is not None:
        port = str(default_port)
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"address {text!r}: expected HOST:PORT with PORT in 0..65535")
    return host, int(port)


def seconds(text: str) -> float:
    """A duration option given in seconds for trio (which wants floats)."""
    return parse_duration_ns(text) / 1e9


def argtype(parse: Callable[[str], object]) -> Callable[[str], object]:
    """Wrap a parser for argparse so its UsageError message is what the user sees."""
    def convert(text: str) -> object:
        try:
            return parse(text)
        except UsageError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = parse.__name__
    return convert

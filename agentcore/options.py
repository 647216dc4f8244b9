"""Human-friendly option values and the exit codes both agents share (docs/agents.md).

Durations ("10ms", "1.5s"), sizes ("2MiB") and bit rates ("100mbit") are
parsed here once for every command and for the network-condition layer, with
errors that quote the value as typed and say what would have been accepted,
because a typo in an experiment's parameters should stop it before any VM
exists. The formatters are their inverses (the spellings sweeps store).
"""

from __future__ import annotations

import argparse
import ipaddress
import re
from collections.abc import Callable


#: Exit codes (documented in docs/agents.md).
EXIT_PASSED = 0         # every verdict passed
EXIT_FAILED = 1         # a verdict failed
EXIT_USAGE = 2          # usage or set-up error on this host
EXIT_PEER = 3           # the peer or the network failed
EXIT_INTERNAL = 4       # a bug in the testbed: an unexpected exception (traceback logged)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as shells report it)
EXIT_BROKEN_PIPE = 141  # the reader of stdout went away (128 + SIGPIPE)

#: Every quantity is a number and a unit, case-insensitive, spaces allowed around either
#: (``" 20 ms "``). Durations need a unit except a bare 0 (zero in any unit); a bare size is bytes;
#: a rate always needs a unit (tc reads a bare rate as bits, which a reader would not guess).
_DURATION_UNITS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 1_000_000_000,
                   "m": 60_000_000_000, "min": 60_000_000_000, "h": 3_600_000_000_000,
                   "d": 86_400_000_000_000}
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2,
               "mib": 1 << 20, "g": 1000**3, "gb": 1000**3, "gib": 1 << 30}
#: Bytes per second, in tc's vocabulary: ``bit`` are bits (divided by 8), ``bps`` *bytes* per
#: second (tc's meaning, kept so one value means the same to the relay and to tc netem); and a
#: size per second, ``50MiB/s`` (how a guest's dirtying rate reads best), with the size units.
_RATE_UNITS = {**{f"{prefix}{unit}": factor / (8 if unit == "bit" else 1)
                  for prefix, factor in {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
                                         "ki": 2**10, "mi": 2**20, "gi": 2**30,
                                         "ti": 2**40}.items()
                  for unit in ("bit", "bps")},
               **{f"{unit}/s": factor for unit, factor in _SIZE_UNITS.items() if unit}}
_NUMBER = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Zµ]*(?:/s)?)\s*")
#: What ``--bandwidth`` takes for no cap at all.
UNLIMITED = ("unlimited", "none")


class UsageError(Exception):
    """A bad option value or a set-up problem on this host (exit code 2)."""


def _quantity(text: str, units: dict[str, int] | dict[str, float], example: str) -> float:
    """The value of ``text`` in the base unit; UsageError quoting ``text`` as the user typed it."""
    match = _NUMBER.fullmatch(text)
    if match is None:
        raise UsageError(f"cannot parse {text!r} (expected e.g. {example!r})")
    number, unit = match.group(1), match.group(2).lower()
    if unit == "" and "" not in units and float(number) != 0:
        raise UsageError(f"{text!r} has no unit (expected e.g. {example!r})")
    if unit not in units and unit != "":
        known = ", ".join(u for u in units if u and u != "µs")
        raise UsageError(f"unknown unit {match.group(2)!r} in {text!r} (known: {known})")
    return float(number) * units.get(unit, 1)


def parse_duration_ns(text: str) -> int:
    """``"10ms"`` -> 10_000_000; a unit is required (ns, us, ms, s, min, h, d) except for ``0``."""
    return round(_quantity(text, _DURATION_UNITS, "5ms"))


def seconds(text: str) -> float:
    """A duration option given in seconds for trio (which wants floats)."""
    return parse_duration_ns(text) / 1e9


def parse_timeout(text: str) -> float:
    """A timeout in seconds, longer than 0: with 0 every session would fail at once."""
    value = seconds(text)
    if value <= 0:
        raise UsageError(f"{text!r} must be longer than 0 (every wait would time out at once)")
    return value


def parse_size(text: str) -> int:
    """``"2MiB"`` -> 2097152; plain numbers are bytes; K/M/G are powers of 1000, KiB/MiB/GiB of 1024."""
    value = _quantity(text, _SIZE_UNITS, "2MiB")
    if value != int(value):
        raise UsageError(f"{text!r} is not a whole number of bytes")
    return int(value)


def parse_guest_memory(text: str) -> int:
    """A guest memory size: whole 2 MiB pages from 2 MiB to kvmcore's 1 GiB maximum."""
    # kvmcore's one rule (imported here: agentcore itself stays KVM-free), in the user's words.
    from kvmcore import HUGE_PAGE, MAX_MEMORY, MIN_MEMORY, memory_size_problem

    size = parse_size(text)
    if memory_size_problem(size):
        raise UsageError(f"{text!r} must be a multiple of {format_size(HUGE_PAGE)} between "
                         f"{format_size(MIN_MEMORY)} and {format_size(MAX_MEMORY)} (guest memory)")
    return size


def parse_rate(text: str) -> float:
    """Bytes per second from ``"100mbit"``, ``"1gbit"``, ``"10mbps"`` (bytes!); more than 0."""
    rate = _quantity(text, _RATE_UNITS, "100mbit")
    if rate == 0:
        raise UsageError(f"{text!r} must be more than 0")
    return rate


def parse_byte_rate(text: str) -> int:
    """A rate of bytes per second that may be 0 (a guest that dirties nothing): ``"50MiB/s"``
    -> 52428800, ``"0"`` -> 0; any `parse_rate` spelling otherwise, rounded to whole bytes."""
    if _quantity(text, _RATE_UNITS, "50MiB/s") == 0:
        return 0
    return round(parse_rate(text))


def parse_bandwidth(text: str) -> float | None:
    """A rate cap: `parse_rate`, or ``unlimited`` (None) for none; 0 is refused, pointing there."""
    if text.strip().lower() in UNLIMITED:
        return None
    try:
        return parse_rate(text)
    except UsageError as exc:
        if "more than 0" in str(exc):
            raise UsageError(f"{text!r} must be more than 0 (write 'unlimited' for no cap)") from None
        raise


def format_duration(seconds: float) -> str:
    """The shortest exact-enough tc-style spelling: ``0.005`` -> ``"5ms"``."""
    if seconds >= 1:
        return f"{seconds:g}s"
    if seconds >= 1e-3 or seconds == 0:
        return f"{seconds * 1e3:g}ms"
    return f"{seconds * 1e6:g}us"


def format_rate(bytes_per_second: float) -> str:
    """tc-style bits per second: ``12.5e6`` -> ``"100mbit"``."""
    bits = bytes_per_second * 8
    for prefix, factor in (("g", 1e9), ("m", 1e6), ("k", 1e3)):
        if bits >= factor:
            return f"{bits / factor:g}{prefix}bit"
    return f"{bits:g}bit"


def format_size(size: int) -> str:
    """The largest binary unit that divides ``size``: ``2097152`` -> ``"2MiB"``."""
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


def parse_host_port(text: str, *, default_port: int | None = None) -> tuple[str, int]:
    """``HOST:PORT`` or ``[v6addr]:PORT`` (PORT optional when ``default_port`` is given).

    An IPv6 address needs its brackets: ``::1:7432`` could be ``[::1]:7432`` or the address
    ``::1:7432``, so it is refused with the bracketed form to type, never guessed."""
    if text.startswith("["):
        host, closed, rest = text[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise UsageError(f"address {text!r}: expected [IPv6]:PORT, e.g. [::1]:7400")
        port = rest[1:]
    elif text.count(":") > 1:
        raise UsageError(f"address {text!r}: an IPv6 address goes in brackets, e.g. "
                         f"{' or '.join(_bracketed(text, default_port))}")
    else:
        host, _, port = text.partition(":")
    if not port and default_port is not None:
        port = str(default_port)
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"address {text!r}: expected HOST:PORT with PORT in 0..65535")
    return host, int(port)


def _bracketed(text: str, default_port: int | None) -> list[str]:
    """What an unbracketed IPv6 ``text`` may have meant: [address]:PORT split at the last
    colon, and the whole of it as the address."""
    host, _, port = text.rpartition(":")
    meant = [f"[{host}]:{port}"] if port.isdigit() and _is_ipv6(host) else []
    if _is_ipv6(text):
        meant.append(f"[{text}]:{default_port if default_port is not None else 'PORT'}")
    return meant or ["[::1]:7400"]


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def argtype(parse: Callable[[str], object]) -> Callable[[str], object]:
    """Wrap a parser for argparse so its UsageError message is what the user sees."""
    def convert(text: str) -> object:
        try:
            return parse(text)
        except UsageError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = parse.__name__
    return convert

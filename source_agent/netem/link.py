"""`Link`: what one direction of a network path does to bytes (delay, jitter, rate).

Values are kept in SI base units (seconds, bytes per second) so the relay's hot
path does no conversion; the human forms (``"5ms"``, ``"100mbit"``) follow
``tc``'s vocabulary so one sweep option means the same thing to the userspace
relay and to ``tc netem``. Note ``tc``'s ``bps`` is *bytes* per second; we
keep that meaning rather than invent a second one.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

from ._errors import ImpairmentError

_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0}

# Bytes per second for one unit. Bits are divided by 8; IEC prefixes are 1024-based.
_RATE_UNITS: dict[str, float] = {}
for _prefix, _factor in {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12,
                         "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}.items():
    _RATE_UNITS[f"{_prefix}bit"] = _factor / 8
    _RATE_UNITS[f"{_prefix}bps"] = _factor

_QUANTITY = re.compile(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-zµ]*)\s*", re.IGNORECASE)

Number = int | float


def _number(field: str, value: object) -> float:
    """Reject what would silently mean something else: bools, NaN, infinities, negatives."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ImpairmentError(f"{field}: expected a number or a string with a unit, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ImpairmentError(f"{field}: must be finite and >= 0, got {value!r}")
    return float(value)


def _quantity(field: str, text: str, units: dict[str, float], hint: str) -> float:
    match = _QUANTITY.fullmatch(text)
    if match is None:
        raise ImpairmentError(f"{field}: cannot parse {text!r} (expected e.g. {hint})")
    number, unit = match.groups()
    if not unit:
        raise ImpairmentError(f"{field}: {text!r} has no unit (expected e.g. {hint})")
    factor = units.get(unit.lower())
    if factor is None:
        raise ImpairmentError(
            f"{field}: unknown unit {unit!r} in {text!r} (known: {', '.join(units)})")
    return _number(field, float(number) * factor)


def parse_duration(value: str | Number, field: str = "duration") -> float:
    """Seconds from ``"5ms"``, ``"250us"``, ``"1.5s"`` or a number of seconds."""
    if isinstance(value, str):
        return _quantity(field, value, _DURATION_UNITS, "'5ms'")
    return _number(field, value)


def parse_rate(value: str | Number | None, field: str = "rate") -> float | None:
    """Bytes per second from ``"100mbit"``, ``"1gbit"``, ``"10mbps"`` (bytes!) or a number of bytes/s.

    ``None`` means unlimited. Zero is rejected: a link that carries nothing is a
    partition, which the relay models explicitly.
    """
    if value is None:
        return None
    rate = (_quantity(field, value, _RATE_UNITS, "'100mbit'") if isinstance(value, str)
            else _number(field, value))
    if rate == 0:
        raise ImpairmentError(f"{field}: must be > 0 (use None for unlimited, partition() for none)")
    return rate


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


@dataclass(frozen=True)
class Link:
    """One direction's impairment: one-way ``delay`` and ``jitter`` in seconds, ``rate`` in bytes/s.

    Jitter is uniform in ``[-jitter, +jitter]`` around ``delay`` (netem's default
    distribution), clamped so no byte leaves before it arrived. ``rate=None`` is
    unlimited. Construct from human strings with `Link.parse`.
    """

    delay: float = 0.0
    jitter: float = 0.0
    rate: float | None = None

    def __post_init__(self) -> None:
        _number("delay", self.delay)
        _number("jitter", self.jitter)
        if self.rate is not None and _number("rate", self.rate) == 0:
            raise ImpairmentError("rate: must be > 0 (use None for unlimited)")

    @classmethod
    def parse(cls, delay: str | Number = 0.0, jitter: str | Number = 0.0,
              rate: str | Number | None = None) -> Link:
        """``Link.parse("5ms", "1ms", "100mbit")``; numbers are taken as seconds and bytes/s."""
        return cls(parse_duration(delay, "delay"), parse_duration(jitter, "jitter"),
                   parse_rate(rate, "rate"))

    @property
    def is_zero(self) -> bool:
        """True when the link changes nothing, so the relay may take its copy-only fast path."""
        return self.delay == 0 and self.jitter == 0 and self.rate is None

    def sample_delay(self, rng: random.Random) -> float:
        """One byte-batch's one-way delay: ``delay`` plus uniform jitter, never negative."""
        if self.jitter == 0:
            return self.delay
        return max(0.0, self.delay + rng.uniform(-self.jitter, self.jitter))

    def __str__(self) -> str:
        parts = [f"delay {format_duration(self.delay)}"]
        if self.jitter:
            parts.append(f"jitter {format_duration(self.jitter)}")
        parts.append(f"rate {format_rate(self.rate)}" if self.rate else "rate unlimited")
        return " ".join(parts)

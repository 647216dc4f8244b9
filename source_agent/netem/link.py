"""`Link`: what one direction of a network path does to bytes (delay, jitter, rate).

Values are kept in SI base units (seconds, bytes per second) so the relay's hot
path does no conversion; the human forms (``"5ms"``, ``"100mbit"``) are the
testbed's one unit grammar (`agentcore.options`, tc's vocabulary for rates), so
one sweep option means the same thing to the userspace relay, to ``tc netem``
and to every command. Note ``tc``'s ``bps`` is *bytes* per second.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from agentcore import options
from agentcore.options import UsageError, format_duration, format_rate

from ._errors import ImpairmentError

__all__ = ["Link", "format_duration", "format_rate", "parse_duration", "parse_rate"]

Number = int | float


def _number(field: str, value: object) -> float:
    """Reject what would silently mean something else: bools, NaN, infinities, negatives."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ImpairmentError(f"{field}: expected a number or a string with a unit, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ImpairmentError(f"{field}: must be finite and >= 0, got {value!r}")
    return float(value)


def _parsed(field: str, parse: Callable[[str], float], text: str) -> float:
    """The testbed's one unit grammar (agentcore.options), its error as this layer's, with the field."""
    try:
        return parse(text)
    except UsageError as exc:
        raise ImpairmentError(f"{field}: {exc}") from None


def parse_duration(value: str | Number, field: str = "duration") -> float:
    """Seconds from ``"5ms"``, ``"250us"``, ``"1.5s"`` or a number of seconds."""
    if isinstance(value, str):
        return _parsed(field, options.seconds, value)
    return _number(field, value)


def parse_rate(value: str | Number | None, field: str = "rate") -> float | None:
    """Bytes per second from ``"100mbit"``, ``"1gbit"``, ``"10mbps"`` (bytes!) or a number of bytes/s.

    ``None`` means unlimited. Zero is rejected: a link that carries nothing is a
    partition, which the relay models explicitly.
    """
    if value is None:
        return None
    if isinstance(value, str):
        return _parsed(field, options.parse_rate, value)
    if _number(field, value) == 0:
        raise ImpairmentError(f"{field}: must be > 0 (use None for unlimited, partition() for none)")
    return float(value)


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

"""Clock offset between the two hosts from NTP-style exchanges.

One exchange gives four timestamps: ``t1`` source sends, ``t2`` destination
receives, ``t3`` destination sends, ``t4`` source receives.  With ``d`` the
delay out and ``d'`` the delay back, ``t2 = t1 + offset + d`` and
``t4 = t3 - offset + d'``, so

    offset = ((t2 - t1) + (t3 - t4)) / 2 + (d' - d) / 2
    rtt    = (t4 - t1) - (t3 - t2) = d + d'

Since both delays are non-negative, ``|d' - d| <= rtt``: the true offset lies
within ``offset ± rtt / 2``.  The exchange with the smallest round trip has
the tightest bound, which is why the estimate keeps that one (minimum-RTT
filtering, as NTP's clock filter does) rather than averaging in samples
delayed by queueing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["ClockEstimate", "ClockSample", "estimate_clock_offset"]


@dataclass(frozen=True)
class ClockSample:
    """One exchange's four timestamps, in nanoseconds of each host's own clock."""

    t1: int
    t2: int
    t3: int
    t4: int

    @property
    def offset_ns(self) -> float:
        """Destination clock minus source clock, assuming symmetric delays."""
        return ((self.t2 - self.t1) + (self.t3 - self.t4)) / 2

    @property
    def rtt_ns(self) -> int:
        """Round trip spent on the network (the destination's processing time removed)."""
        return (self.t4 - self.t1) - (self.t3 - self.t2)


@dataclass(frozen=True)
class ClockEstimate:
    """Best estimate of destination clock minus source clock, with its bound.

    The true offset lies within ``offset_ns ± uncertainty_ns`` if neither
    clock stepped during the exchanges.  ``consistent`` is False when the
    samples' own bounds do not all overlap, i.e. a clock stepped or drifted
    noticeably meanwhile, and the bound should not be trusted.
    """

    offset_ns: float
    uncertainty_ns: float
    rtt_ns: int
    samples: int
    consistent: bool


def estimate_clock_offset(samples: Sequence[ClockSample]) -> ClockEstimate:
    """Minimum-RTT estimate of the offset over ``samples``; ValueError if none is usable.

    A sample whose destination processing time or round trip is negative
    cannot come from causally ordered clocks and is refused.
    """
    if not samples:
        raise ValueError("no clock samples")
    for sample in samples:
        if sample.t3 < sample.t2 or sample.t4 < sample.t1 or sample.rtt_ns < 0:
            raise ValueError(f"clock sample is not causally ordered: {sample}")
    best = min(samples, key=lambda s: s.rtt_ns)
    low = max(s.offset_ns - s.rtt_ns / 2 for s in samples)
    high = min(s.offset_ns + s.rtt_ns / 2 for s in samples)
    return ClockEstimate(
        offset_ns=best.offset_ns,
        uncertainty_ns=best.rtt_ns / 2,
        rtt_ns=best.rtt_ns,
        samples=len(samples),
        consistent=low <= high,
    )

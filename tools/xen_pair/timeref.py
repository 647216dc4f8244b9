"""Ground truth for time: a machine's CLOCK_REALTIME against the physical host's, measured over
the control channel (virtio-serial), which is independent of the link the agents sync over.

One probe: the host reads its CLOCK_REALTIME (t1), asks the guest for its own (g), reads again
(t4). The guest's clock read lies between t1 and t4 in host time, so offset = g - (t1 + t4) / 2 is
right within (t4 - t1) / 2 whatever the delays (the NTP argument with the guest's processing
inside the round trip). Of many probes over a second, the one with the smallest round trip has
the tightest bound and is kept.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence


@dataclasses.dataclass(frozen=True)
class Reference:
    """Guest CLOCK_REALTIME minus host CLOCK_REALTIME, true within +- uncertainty_ns (for the
    TSC reference the same in TSC ticks)."""

    offset_ns: int
    uncertainty_ns: int
    probes: int

    def minus(self, other: Reference) -> Reference:
        """This machine's clock minus the other's; the uncertainties add."""
        return Reference(self.offset_ns - other.offset_ns,
                         self.uncertainty_ns + other.uncertainty_ns, min(self.probes, other.probes))

    def to_plain(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def best_probe(probes: Sequence[tuple[int, int, int]]) -> Reference:
    """The reference from (t1, guest, t4) probes: the one with the smallest round trip."""
    if not probes:
        raise ValueError("no time probes")
    for t1, _, t4 in probes:
        if t4 < t1:
            raise ValueError(f"host clock went backwards during a probe ({t1} -> {t4})")
    t1, g, t4 = min(probes, key=lambda p: p[2] - p[0])
    return Reference(g - (t1 + t4) // 2, (t4 - t1 + 1) // 2, len(probes))


def measure(ask_guest: Callable[[], int], host_clock: Callable[[], int], *,
            duration_s: float = 1.0, max_probes: int = 200, units_per_s: float = 1e9) -> Reference:
    """Probe for `duration_s` seconds (at most max_probes times) and keep the best probe.
    The clocks count `units_per_s` a second: ns for CLOCK_REALTIME; for the TSC reference
    (the same argument with rdtsc on both sides) the offset is in ticks."""
    probes = []
    start = host_clock()
    while len(probes) < max_probes and host_clock() - start < duration_s * units_per_s:
        t1 = host_clock()
        g = ask_guest()
        probes.append((t1, g, host_clock()))
    return best_probe(probes)

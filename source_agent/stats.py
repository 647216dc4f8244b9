"""The migration's statistics, like QEMU's ``query-migrate``: one document, rendered everywhere.

Why a document of its own: the report (``migration``), its table, the results store's
columns and the sweep's plots all read these figures, so they are computed once, here,
from what the source measured, and every reader takes them from ``to_plain()``.

Times are host nanoseconds; the downtime is the guest's: from the source stop (the
source vCPU leaving its last KVM_RUN) to the destination's first report (its first
KVM_RUN returning), both on CLOCK_REALTIME, the destination's corrected by the
clock-sync offset. Phases outside the downtime (the destination's preparation, the
source VM's destruction after the REPORT) are kept apart, so a reader sees what
live migration moved out of it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from kvmcore.dirty import PAGE_SIZE

MODES = ("stop-copy", "precopy")


@dataclass(frozen=True)
class RoundStats:
    """One precopy round (or the final stop-and-copy transfer): what it sent and how fast the
    guest dirtied memory meanwhile."""

    pages: int
    bytes: int
    ns: int                     # ROUND sent -> its COMMIT written
    dirty_rate: float | None    # bytes/s the guest dirtied during it (None: not measured)

    @classmethod
    def of(cls, sent: int, ns: int, dirtied: int | None = None) -> RoundStats:
        """``sent`` bytes in ``ns``; ``dirtied`` bytes found dirty when it ended."""
        rate = None if dirtied is None or ns <= 0 else dirtied * 1e9 / ns
        return cls(sent // PAGE_SIZE, sent, ns, rate)

    @property
    def bandwidth(self) -> float | None:
        """Bytes per second this transfer achieved."""
        return self.bytes * 1e9 / self.ns if self.ns > 0 and self.bytes else None


@dataclass
class MigrationStats:
    """What ``query-migrate`` would say of this migration (module docstring)."""

    mode: str
    destroy_first: bool = False
    total_ns: int | None = None            # connect -> REPORT validated
    setup_ns: int | None = None            # connect -> the first memory sent (PREPARED in)
    downtime_ns: int | None = None         # source stop -> destination's first report
    expected_downtime_ns: int | None = None  # the last dirty set at the measured bandwidth
    bandwidth: float | None = None         # bytes/s, of the last transfer measured
    converged: bool | None = None          # precopy: the expectation met the limit in time
    rounds: list[RoundStats] = field(default_factory=list)
    final: RoundStats | None = None        # MIGRATE's memory, after the stop
    downtime_limit_ns: int | None = None   # precopy only
    max_rounds: int | None = None          # precopy only
    #: Outside the downtime: the destination's VM and memory made at PREPARE, and the
    #: source VM's destruction after the REPORT (inside it with --destroy-first).
    destination_prepare_ns: int | None = None
    source_destroy_ns: int | None = None

    def to_plain(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def round_count(self) -> int:
        return len(self.rounds)

    def add_round(self, sent: int, ns: int) -> RoundStats:
        """Record a precopy round; its bandwidth becomes the one the next decision uses."""
        stats = RoundStats.of(sent, ns)
        self.rounds.append(stats)
        self.bandwidth = stats.bandwidth or self.bandwidth
        return stats

    def add_final(self, sent: int, ns: int) -> RoundStats:
        """Record MIGRATE's memory, after the stop; the last bandwidth measured, as a round's."""
        self.final = RoundStats.of(sent, ns)
        self.bandwidth = self.final.bandwidth or self.bandwidth
        return self.final

    def dirtied(self, dirty_bytes: int) -> None:
        """The dirty set found after the last round: that round's dirty rate."""
        last = self.rounds[-1]
        self.rounds[-1] = RoundStats.of(last.bytes, last.ns, dirty_bytes)

    def expect(self, dirty_bytes: int) -> int | None:
        """The downtime ``dirty_bytes`` would cost at the measured bandwidth (ns), kept."""
        self.expected_downtime_ns = (None if not self.bandwidth
                                     else round(dirty_bytes * 1e9 / self.bandwidth))
        return self.expected_downtime_ns

"""The REPORT: what a destination tells the source about the migration it carried out.

A typed document beside VmState (the MIGRATE's), for the same reasons: the
destination builds it from typed values, the source reads it with
``DestinationReport.from_plain``, which checks every field against the
dataclasses' own type hints (kvmcore._schema) -- no key list is written by
hand, and a bad field is a StateError naming it. It lives in kvmcore, not in
an agent, because its parts are kvmcore's (Snapshot, RestoreRecord, Runstate)
and kvmcore.analysis reads them. Its wire version is VmState's FORMAT_VERSION:
a REPORT only ever answers a state the destination accepted.

Each fact is sent once. The first entry is the ``after`` snapshot's host
bracket (``host_entry_realtime_ns`` before the first KVM_RUN, ``host_run_ns``
its duration); restore()'s duration is the RestoreRecord's; the capture
instant is the source's own (``VmState.capture_realtime_ns``); the
destination's capabilities came in its HELLO.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ._schema import ADDED, CHECK, dataclass_from_plain
from .errors import StateError, StrategyError
from .intact import MemoryDigest
from .snapshot import Snapshot
from .state import CLOCK_SPEC
from .strategy import Strategy
from .xen import Runstate


def check_strategy(value: Any, path: str) -> None:
    """The strategy's canonical text (what MIGRATE carries)."""
    if not isinstance(value, str):
        raise StateError(path, f"expected a string, got {type(value).__name__}")
    try:
        Strategy.parse_exact(value)
    except StrategyError as exc:
        raise StateError(path, str(exc)) from None


@dataclass
class RestoreRecord:
    """What restore() did and when: the host-side facts the analysis and report need."""

    strategy: str = field(metadata={CHECK: check_strategy})
    restore_ns: int = 0                                   # restore() start to return
    timings: dict[str, int] = field(default_factory=dict)  # its phases
    #: KVM_GET_CLOCK after restore
    clock_after: dict[str, int] = field(default_factory=dict, metadata={CHECK: CLOCK_SPEC})
    tsc_offset_requested: int | None = None
    tsc_offset_applied: int | None = None                 # read back
    #: tsc=offset with clock=guest: the realtime gap the TSC was to follow, when it was
    #: negative (the destination's realtime behind the source's capture) and so taken as 0,
    #: as KVM_SET_CLOCK takes a KVM_CLOCK_REALTIME in the future; None: not clamped
    tsc_gap_clamped_ns: int | None = field(default=None, metadata={ADDED: True})
    tsc_khz_destination: int = 0                          # the source's is VmState.tsc_khz
    #: KVM_SET_TSC_KHZ given (the source's rate, where this host scales); None: not scaled
    tsc_khz_set: int | None = None
    runstate_restored: Runstate | None = None             # RUNSTATE_DATA as written

    def to_plain(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_plain(cls, plain: Any, path: str = "restore_record") -> RestoreRecord:
        """Validate a record from the wire exactly: every field, no extra one, integers in
        range, a strategy that parses; StateError names the field."""
        return dataclass_from_plain(cls, plain, path)


@dataclass(frozen=True)
class DestinationPhases:
    """The destination's own steps of one migration, beyond restore() (RestoreRecord) and
    the first entry (the ``after`` snapshot)."""

    validate_ns: int           # MIGRATE received -> state and strategy checked
    receive_ns: int            # checked -> the memory's COMMIT verified
    close_ns: int              # destroying the restored VM after its first report
    migrate_realtime_ns: int   # CLOCK_REALTIME when MIGRATE arrived
    commit_realtime_ns: int    # CLOCK_REALTIME when COMMIT was verified (ends the transfer)
    # Off the downtime path (live migration); absent from an older REPORT: 0.
    #: PREPARE: memory allocated, VM + slot + vCPU created (kvmcore.migrate.prepare).
    prepare_ns: int = field(default=0, metadata={ADDED: True})
    #: All ROUNDs received into the prepared memory, while the source guest ran.
    rounds_receive_ns: int = field(default=0, metadata={ADDED: True})
    #: MemoryDigest.of the memory after the first report (the REPORT's ``memory``).
    verify_ns: int = field(default=0, metadata={ADDED: True})

    @classmethod
    def from_plain(cls, plain: Any, path: str = "phases") -> DestinationPhases:
        return dataclass_from_plain(cls, plain, path)


@dataclass(frozen=True)
class DestinationReport:
    """The REPORT (module docstring): the restored guest's first snapshot, what restore()
    did, and the destination's phases."""

    after: Snapshot
    restore_record: RestoreRecord
    phases: DestinationPhases
    #: The restored memory's digest after the first report (None: not computed, above
    #: DIGEST_MAX_MEMORY, or a REPORT from before digests): the source judges it with
    #: compare_digest against its own stopped memory.
    memory: MemoryDigest | None = field(default=None, metadata={ADDED: True})

    def to_plain(self) -> dict[str, Any]:
        """Msgpack-ready; ``from_plain(to_plain())`` gives it back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_plain(cls, plain: Any, path: str = "report") -> DestinationReport:
        """Validate a REPORT from the wire (the peer may be faulty or hostile) exactly;
        StateError names the field (``report.after.runstate.state``)."""
        return dataclass_from_plain(cls, plain, path)

    def check_answers(self, strategy: Strategy, path: str = "report", *,
                      memory_size: int | None = None) -> DestinationReport:
        """This report, if it describes a restore with ``strategy`` (the one MIGRATE asked
        for) and its memory digest, if any, a memory of ``memory_size`` (when given);
        StateError naming the field otherwise."""
        if self.restore_record.strategy != str(strategy):
            raise StateError(f"{path}.restore_record.strategy",
                             f"{self.restore_record.strategy!r}, but {str(strategy)!r} "
                             "was asked for")
        if self.memory is not None and memory_size is not None:
            self.memory.check_size(memory_size, f"{path}.memory")
        return self

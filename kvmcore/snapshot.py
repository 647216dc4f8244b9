"""What the guest reports: its snapshot, decoded from the report page (guest_program/abi.h)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ._schema import check_int, check_record, check_u64
from .xen import Runstate

MASK64 = (1 << 64) - 1


def pvclock_ns(system_time: int, tsc_timestamp: int, mul: int, shift: int, tsc: int) -> int:
    """The kernel's pvclock read: system_time + ((tsc - tsc_timestamp) << shift) * mul >> 32,
    in the guest's u64 arithmetic (so a TSC behind the timestamp wraps, as in the guest)."""
    delta = (tsc - tsc_timestamp) & MASK64
    delta = delta >> -shift if shift < 0 else (delta << shift) & MASK64
    return (system_time + ((delta * mul) >> 32)) & MASK64


def signed64(value: int) -> int:
    """Reinterpret a u64 difference as signed (jumps can be backwards)."""
    value &= MASK64
    return value - (1 << 64) if value >> 63 else value


def tsc_ticks_to_ns(ticks: int, tsc_khz: int) -> int:
    return ticks * 1_000_000 // tsc_khz


@dataclass(frozen=True)
class Pvclock:
    """struct pvclock_vcpu_time_info as the guest read it (version protocol obeyed)."""

    version: int
    tsc_timestamp: int
    system_time: int
    tsc_to_system_mul: int
    tsc_shift: int
    flags: int

    @classmethod
    def from_c(cls, pv: Any) -> Pvclock:
        return cls(pv.version, pv.tsc_timestamp, pv.system_time, pv.tsc_to_system_mul,
                   pv.tsc_shift, pv.flags)

    def ns_at(self, tsc: int) -> int:
        """kvmclock ns at guest TSC ``tsc``, computed host-side."""
        return pvclock_ns(self.system_time, self.tsc_timestamp, self.tsc_to_system_mul,
                          self.tsc_shift, tsc)

    def to_plain(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_plain(cls, plain: Any, path: str = "pvclock") -> Pvclock:
        """Validate the wire form exactly (each field in its C type's range); StateError
        names the field."""
        def ranged(lo: int, hi: int) -> Any:
            return lambda value, where: check_int(value, where, lo, hi)

        u32, u64 = ranged(0, (1 << 32) - 1), ranged(0, MASK64)
        check_record(plain, path, {"version": u32, "tsc_timestamp": u64, "system_time": u64,
                                   "tsc_to_system_mul": u32, "tsc_shift": ranged(-128, 127),
                                   "flags": ranged(0, 255)})
        return cls(**plain)


@dataclass(frozen=True)
class Snapshot:
    """One report: what the guest saw, plus host clocks read right after the exit."""

    sequence: int
    tsc: int                     # guest rdtsc, inside the pvclock read
    kvmclock_ns: int             # computed by the guest from pvclock and tsc
    pvclock: Pvclock
    pvclock_retries: int
    steal_ns: int                # struct kvm_steal_time.steal
    steal_version: int           # 0: KVM never wrote the steal record
    runstate: Runstate           # the guest's copy of its runstate area; zeros without Xen
    backwards_count: int         # times the guest's kvmclock went backwards, ever
    backwards_prev_ns: int
    backwards_next_ns: int
    # The guest took this snapshot between these two host instants (CLOCK_REALTIME):
    # before the KVM_RUN call that produced it, and after it returned. The bracket
    # holds even if the vCPU thread was preempted; a single stamp would not.
    host_entry_realtime_ns: int
    host_realtime_ns: int
    host_monotonic_ns: int       # CLOCK_MONOTONIC after KVM_RUN returned

    @classmethod
    def from_report(cls, r: Any, host_entry_realtime_ns: int, host_realtime_ns: int,
                    host_monotonic_ns: int) -> Snapshot:
        return cls(
            sequence=r.sequence, tsc=r.tsc, kvmclock_ns=r.kvmclock_ns,
            pvclock=Pvclock.from_c(r.pvclock), pvclock_retries=r.pvclock_retries,
            steal_ns=r.steal.steal, steal_version=r.steal.version,
            runstate=Runstate.from_guest(r.runstate),
            backwards_count=r.backwards_count, backwards_prev_ns=r.backwards_prev_ns,
            backwards_next_ns=r.backwards_next_ns,
            host_entry_realtime_ns=host_entry_realtime_ns, host_realtime_ns=host_realtime_ns,
            host_monotonic_ns=host_monotonic_ns)

    @classmethod
    def from_plain(cls, plain: Any, path: str = "snapshot") -> Snapshot:
        """A snapshot from the wire (a destination's REPORT), validated exactly: every field
        present, no other, each an integer in its range; StateError names the field."""
        def check_pvclock(value: Any, where: str) -> None:
            Pvclock.from_plain(value, where)

        def check_runstate(value: Any, where: str) -> None:
            Runstate.from_plain(value, where)

        spec: dict[str, Any] = {name: check_u64 for name in cls.__dataclass_fields__}
        spec.update(pvclock=check_pvclock, runstate=check_runstate)
        check_record(plain, path, spec)
        return cls(**{**plain, "pvclock": Pvclock(**plain["pvclock"]),
                      "runstate": Runstate(**plain["runstate"])})

    @property
    def runnable_ns(self) -> int:
        """Xen runstate time_runnable (steal) as the guest saw it."""
        return self.runstate.time_runnable

    @property
    def host_run_ns(self) -> int:
        """How long the KVM_RUN call that produced this report took, on the host's
        CLOCK_REALTIME (the bracket's width): for a restored guest's first report, its
        first entry."""
        return self.host_realtime_ns - self.host_entry_realtime_ns

    def to_plain(self) -> dict[str, Any]:
        return asdict(self)

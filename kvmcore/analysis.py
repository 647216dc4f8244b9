"""What the guest saw across a migration, from its reports before and after.

Every number says which mechanism produced it; a number this host cannot
produce is None with the reason, never an estimate.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .migrate import RestoreRecord, Strategy
from .snapshot import Snapshot, signed64, tsc_ticks_to_ns
from .state import VmState

# Guest time is compared with a host bracket, not a host stamp: each report happened
# between the host's CLOCK_REALTIME before the KVM_RUN that produced it and after it
# returned, so the guest's interval between two reports lies in
# [after.entry - before.exit, after.exit - before.entry] however the vCPU thread was
# scheduled. What remains is the clocks' rates -- kvmclock follows the host's
# monotonic raw clock, CLOCK_REALTIME is NTP-disciplined (<= 500 ppm apart; 1000 ppm
# allowed) -- and the granularity of reading them (50 us allowed).
DEFAULT_SLACK_NS = 50_000
DEFAULT_SLACK_PPM = 1000

CLOCK_MECHANISM = {
    "guest": "KVM_SET_CLOCK_GUEST: source pvclock re-applied to the guest TSC",
    "realtime": "KVM_SET_CLOCK with KVM_CLOCK_REALTIME: kvmclock advanced by the "
                "CLOCK_REALTIME elapsed since the source's KVM_GET_CLOCK",
    "plain": "KVM_SET_CLOCK without KVM_CLOCK_REALTIME (QEMU's way): kvmclock resumes at "
             "the captured value, the gap is hidden",
    "none": "kvmclock not restored: the destination VM's own kvmclock",
}
TSC_MECHANISM = {
    "offset": "KVM_VCPU_TSC_OFFSET computed by the devices/vcpu.rst algorithm",
    "adjust": "MSR_IA32_TSC_ADJUST written by the host (stores the MSR, does not move the TSC)",
    "none": "TSC not restored: the destination vCPU's TSC as KVM set it",
}


@dataclass(frozen=True)
class Measurement:
    """One number: its value (None when not measurable), how it came about, and why not."""

    value_ns: int | None
    mechanism: str
    reason: str | None = None

    @classmethod
    def unmeasurable(cls, mechanism: str, reason: str) -> Measurement:
        return cls(None, mechanism, reason)


@dataclass(frozen=True)
class Check:
    """A verdict: ok is None when an input was not measurable."""

    ok: bool | None
    detail: str


@dataclass(frozen=True)
class Analysis:
    strategy: str
    sequence_before: int
    sequence_after: int
    wall_gap: Measurement
    host_interval: Measurement
    kvmclock_jump: Measurement
    tsc_jump: Measurement
    kvm_steal_delta: Measurement
    xen_runnable_delta: Measurement
    guest_saw_backwards: bool
    backwards_step_ns: int | None       # the last backwards step the guest saw (negative)
    checks: dict[str, Check]
    host_bracket_ns: tuple[int, int]    # bounds on the guest's interval between reports

    def to_plain(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def analyse(before: Snapshot, after: Snapshot, state: VmState, record: RestoreRecord,
            wall_gap_ns: int | None = None, clock_offset_ns: int = 0,
            slack_ns: int = DEFAULT_SLACK_NS, slack_ppm: int = DEFAULT_SLACK_PPM) -> Analysis:
    """``before``: the source's last report; ``after``: the destination's first.
    ``clock_offset_ns``: destination CLOCK_REALTIME minus source's (0 in-process); or
    pass ``wall_gap_ns`` measured otherwise."""
    strategy = Strategy.parse(record.strategy)

    if wall_gap_ns is not None:
        wall_gap = Measurement(wall_gap_ns, "given by the caller")
    elif record.first_entry_realtime_ns is None:
        wall_gap = Measurement.unmeasurable("CLOCK_REALTIME", "the restored guest never ran")
    else:
        wall_gap = Measurement(
            record.first_entry_realtime_ns - state.capture_realtime_ns - clock_offset_ns,
            "CLOCK_REALTIME: source KVM_GET_CLOCK.realtime at capture to destination "
            f"clock_gettime before the first KVM_RUN, minus the {clock_offset_ns} ns "
            "clock offset between hosts")
    host_interval = Measurement(
        after.host_realtime_ns - before.host_realtime_ns - clock_offset_ns,
        "CLOCK_REALTIME stamped by the host after each report's exit")
    lo = after.host_entry_realtime_ns - before.host_realtime_ns - clock_offset_ns
    hi = after.host_realtime_ns - before.host_entry_realtime_ns - clock_offset_ns
    slack = slack_ns + abs(hi) * slack_ppm // 1_000_000

    kvmclock_jump = Measurement(signed64(after.kvmclock_ns - before.kvmclock_ns),
                                f"guest kvmclock (pvclock read); {CLOCK_MECHANISM[strategy.clock]}")
    tsc_ticks = signed64(after.tsc - before.tsc)
    khz_note = ("" if record.tsc_khz_destination in (0, state.tsc_khz) else
                f"; TSC kHz differs: source {state.tsc_khz}, destination "
                f"{record.tsc_khz_destination}")
    tsc_jump = Measurement(tsc_ticks_to_ns(tsc_ticks, state.tsc_khz),
                           f"guest rdtsc at {state.tsc_khz} kHz; {TSC_MECHANISM[strategy.tsc]}"
                           + _offset_note(record) + khz_note)

    if before.steal_version == 0 or after.steal_version == 0:
        steal = Measurement.unmeasurable("MSR_KVM_STEAL_TIME", "KVM had not yet written the "
                                         "steal record when a report was taken")
    else:
        steal = Measurement(signed64(after.steal_ns - before.steal_ns),
                            "MSR_KVM_STEAL_TIME: the vCPU thread's scheduler run delay "
                            "(a migration gap is not included by design)")

    if strategy.runstate != "kernel":
        runnable = Measurement.unmeasurable(
            "Xen runstate", "runstate=off" if state.xen else "guest not Xen-configured "
            "(no KVM_CAP_XEN_HVM runstate on the hosts, or xen=False)")
    else:
        runnable = Measurement(signed64(after.runnable_ns - before.runnable_ns),
                               "Xen runstate time_runnable: RUNSTATE_DATA restored as "
                               "runnable, KVM accounted the gap at vcpu_load")

    backwards = after.backwards_count > before.backwards_count
    step = (signed64(after.backwards_next_ns - after.backwards_prev_ns) if backwards else None)

    checks = {
        "sequence_continues": Check(after.sequence == before.sequence + 1,
                                    f"{before.sequence} -> {after.sequence}"),
        "never_backwards": Check(not backwards, "guest saw kvmclock go backwards by "
                                    f"{-step} ns" if step is not None else "never backwards"),
        "kvmclock_follows_gap": _within(kvmclock_jump, lo, hi, slack),
        "tsc_follows_gap": _within(tsc_jump, lo, hi, slack),
    }
    return Analysis(record.strategy, before.sequence, after.sequence, wall_gap, host_interval,
                    kvmclock_jump, tsc_jump, steal, runnable, backwards, step, checks,
                    (lo, hi))


def _within(guest: Measurement, lo: int, hi: int, slack: int) -> Check:
    assert guest.value_ns is not None
    ok = lo - slack <= guest.value_ns <= hi + slack
    return Check(ok, f"guest {guest.value_ns} ns {'within' if ok else 'outside'} host bracket "
                 f"[{lo}, {hi}] ns +- {slack} ns")


def _offset_note(record: RestoreRecord) -> str:
    if record.tsc_offset_requested is None:
        return ""
    if record.tsc_offset_applied == record.tsc_offset_requested:
        return f"; offset {record.tsc_offset_requested:#x} applied"
    return (f"; offset {record.tsc_offset_requested:#x} requested but "
            f"{record.tsc_offset_applied:#x} read back")

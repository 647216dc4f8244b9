"""Precision: how far off the guest's kvmclock is after a migration, in ns, for clock=guest
(KVM_SET_CLOCK_GUEST, the project's reference implementation: `./dev lane --clock-guest`) against
clock=realtime and clock=realtime-synced, all with tsc=offset, through both real agents over
loopback TCP inside the lane; several runs each, printed as a table (docs/clock-guest.md#precision).

Each error is against what is true here: one host, one CLOCK_REALTIME, so the two "hosts'" clocks
agree exactly (offset 0), whatever the clock sync estimates.
- At the same guest TSC: the destination's kvmclock at the guest TSC of its first report minus
  what the source's KVM_GET_CLOCK_GUEST record (capture() takes it on every row) computes at that
  TSC: pvclock_preserved's measure, which that verdict decides with for clock=guest only. Did the
  kvmclock as a function of guest TSC survive?
- Against the wall, from KVM's own clock pairs: the kvmclock elapsed minus the CLOCK_REALTIME
  elapsed between the source's KVM_GET_CLOCK at capture and the destination's right after restore
  (each one ioctl giving both readings: no guest report, no bracket). Did the transit's wall time
  reach the kvmclock?
- Against the wall, from the guest's reports: kvmclock_follows_gap's figure (the guest's kvmclock
  interval between the two reports minus the host's CLOCK_REALTIME between their exits): coarse
  under TCG (the bracket is milliseconds wide), but it is the product's verdict.

What should hold: clock=guest within pvclock_preserved's 2 ns at the same TSC; against the wall,
clock=realtime and clock=guest within the documented slack (50 us + 1000 ppm) of 0, and
clock=realtime-synced within it of minus its clock-sync estimate (it moves the kvmclock by exactly
the offset it was told); every row's kvmclock_follows_gap passes. The controls, in one process on
the same kernel: a record moved by 1 us fails pvclock_preserved by 1000 +- 2 ns; a source clock
100 ms behind the destination's (the skew as restore() sees it: the capture's CLOCK_REALTIME)
puts 100 ms into the kvmclock of clock=realtime and of clock=guest -- its TSC offset carries the
wall time, from CLOCK_REALTIME -- failing kvmclock_follows_gap, while clock=realtime-synced, told
the skew, passes; clock=guest still passes pvclock_preserved there. A source clock 1 s ahead (a
destination behind by more than the gap): realtime-synced passes; clock=guest's elapsed time is
negative, which restore() takes as 0 (saying so in the record, tsc_gap_clamped_ns), so the gap is
hidden and kvmclock_follows_gap fails. (Before that clamp the guest TSC wrapped below zero,
KVM_SET_CLOCK_GUEST accepted it, and the kvmclock landed ~225 years ahead with pvclock_preserved
passing: this test found it.)
"""
from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
from xen_lane_migrations import GAP_S, migrate

from kvmcore import (Analysis, Check, HostCapabilities, RestoreRecord, Snapshot, Strategy, System,
                     VmState, probe)
from kvmcore._kvm import lib
from kvmcore.analysis import DEFAULT_SLACK_NS, DEFAULT_SLACK_PPM, PVCLOCK_BOUND_NS, \
    pvclock_preserved
from source_agent.loopback import loopback
from source_agent.migrate import MigrationPlan

pytestmark = pytest.mark.xen_lane

STRATEGIES = ("clock=guest,tsc=offset", "clock=realtime,tsc=offset",
              "clock=realtime-synced,tsc=offset")
RUNS = 5
GAP_NS = int(GAP_S * 1e9)
# The controls' source clock, behind the destination's: well beyond the width of the verdict's
# bracket (the two reports' KVM_RUN times: 2-10 ms under TCG, seen), so that it must fail.
SKEW_NS = 100_000_000
MOVED_NS = 1000         # the control's record, moved


@dataclass(frozen=True)
class Sample:
    """One migration's kvmclock errors (module docstring) and the verdicts on it."""

    at_tsc_ns: int
    kvm_wall_ns: int                 # from KVM's clock pairs
    kvm_wall_slack_ns: int           # the documented slack over the pairs' interval
    report_wall_ns: int              # from the guest's reports
    sync_offset_ns: int | None       # the clock-sync estimate (dst - src; None in one process)
    sync_uncertainty_ns: int | None
    pvclock: bool | None             # the verdicts as the product gives them
    follows: Check                   # kvmclock_follows_gap, with its bound
    clamped_ns: int | None           # the negative gap restore() took as 0 (clock=guest)


def sample(strategy: Strategy, state: VmState, before: Snapshot, after: Snapshot,
           record: RestoreRecord, analysis: Analysis,
           sync: tuple[int, int] | None = None) -> Sample:
    assert state.clock_guest is not None, "capture() takes the record wherever GET works"
    # pvclock_preserved's own computation, whichever clock the row restored with.
    same_tsc = pvclock_preserved(dataclasses.replace(strategy, clock="guest"), state, after)
    assert same_tsc.error_ns is not None
    src, dst = state.clock, record.clock_after
    assert src["flags"] & dst["flags"] & lib.KVM_CLOCK_REALTIME, (src, dst)
    span = dst["realtime"] - src["realtime"]
    jump = analysis.kvmclock_jump.value_ns
    assert jump is not None
    return Sample(same_tsc.error_ns, (dst["clock"] - src["clock"]) - span,
                  DEFAULT_SLACK_NS + span * DEFAULT_SLACK_PPM // 1_000_000,
                  jump - (after.host_realtime_ns - before.host_realtime_ns),
                  *(sync or (None, None)), analysis.checks["pvclock_preserved"].ok,
                  analysis.checks["kvmclock_follows_gap"], record.tsc_gap_clamped_ns)


def spread(values: Sequence[int], unit: int) -> str:
    """median [min, max], in units of ``unit`` ns (one value: itself)."""
    def fmt(v: float) -> str:
        return f"{v:.0f}" if unit == 1 else f"{v / unit:.1f}"
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(statistics.median(values))} [{fmt(min(values))}, {fmt(max(values))}]"


def passes(values: Sequence[bool | None]) -> str:
    if all(v is None for v in values):
        return "n/a"
    return f"{sum(v is True for v in values)}/{len(values)}"


HEAD = ("strategy", "runs", "at the same guest TSC, ns", "against the wall (KVM clock pairs), ns",
        "against the wall (guest reports), µs", "clock-sync offset estimate, µs",
        "pvclock_preserved", "kvmclock_follows_gap")


def precision_table(groups: dict[str, list[Sample]]) -> str:
    """Markdown: per group, each error's median [min, max] over its runs, and the verdicts."""
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    for label, rows in groups.items():
        offsets = [r.sync_offset_ns for r in rows if r.sync_offset_ns is not None]
        worst = max(r.sync_uncertainty_ns or 0 for r in rows)
        sync = f"{spread(offsets, 1000)} (± {worst / 1000:.0f})" if offsets else "-"
        lines.append(f"| {label} | {len(rows)} | {spread([r.at_tsc_ns for r in rows], 1)} "
                     f"| {spread([r.kvm_wall_ns for r in rows], 1)} "
                     f"| {spread([r.report_wall_ns for r in rows], 1000)} | {sync} "
                     f"| {passes([r.pvclock for r in rows])} "
                     f"| {passes([r.follows.ok for r in rows])} |")
    return "\n".join(lines)


def moved(state: VmState) -> VmState:
    """The source's record with its kvmclock 1 us later (a wrong record)."""
    assert state.clock_guest is not None
    return dataclasses.replace(state, clock_guest=state.clock_guest | {
        "system_time": state.clock_guest["system_time"] + MOVED_NS})


def source_clock_behind(skew_ns: int) -> Callable[[VmState], VmState]:
    """The state a source whose CLOCK_REALTIME is ``skew_ns`` behind the destination's sends
    (negative: ahead): its capture instant reads that much earlier, and a perfect clock sync says
    the destination is that far ahead. restore() reads the source's clock nowhere else."""
    def alter(state: VmState) -> VmState:
        return dataclasses.replace(state, clock=state.clock | {
            "realtime": state.clock["realtime"] - skew_ns},
            clock_sync={"offset_ns": skew_ns, "uncertainty_ns": 0})
    return alter


MOVED = f"clock=guest,tsc=offset, record moved +{MOVED_NS} ns (one process)"
SKEWED = {text: f"{text}, source clock {SKEW_NS // 1_000_000} ms behind (one process)"
          for text in STRATEGIES}
#: A destination behind by more than the gap (the source's clock ahead by far more than the
#: ~50-100 ms an in-process wall gap takes): the elapsed time restore() computes is negative.
AHEAD_NS = 1_000_000_000
AHEAD = {text: f"{text}, source clock {AHEAD_NS // 1_000_000_000} s ahead (one process)"
         for text in ("clock=guest,tsc=offset", "clock=realtime-synced,tsc=offset")}


def in_process_controls(kvm: System, caps: HostCapabilities) -> dict[str, list[Sample]]:
    """The negative controls, in one process (xen_lane_migrations.migrate), where the state
    restore() is given can be changed as another host would change it; the analysis compares
    with the state as captured, and the clocks agree (offset 0)."""
    cases: list[tuple[str, str, Callable[[VmState], VmState]]] = [
        (MOVED, "clock=guest,tsc=offset", moved)]
    cases += [(label, text, source_clock_behind(SKEW_NS)) for text, label in SKEWED.items()]
    cases += [(label, text, source_clock_behind(-AHEAD_NS)) for text, label in AHEAD.items()]
    out: dict[str, list[Sample]] = {}
    for label, text, alter in cases:
        strategy = Strategy.parse(text + ",runstate=kernel")
        row = migrate(kvm, caps, strategy, alter=alter)
        assert row.outcome == "ok", (label, row.outcome)
        assert row.state and row.before and row.after and row.record and row.analysis
        out[label] = [sample(strategy, row.state, row.before, row.after, row.record,
                             row.analysis)]
    return out


async def test_clock_guest_precision_in_loopback(clock_guest_kvm: System) -> None:
    caps = probe(clock_guest_kvm)
    loop: dict[str, list[Sample]] = {}
    for text in STRATEGIES:
        strategy = Strategy.parse(text + ",runstate=kernel")
        plan = MigrationPlan(host="", port=0, psk=b"", strategy=strategy, gap_ns=GAP_NS)
        for _ in range(RUNS):
            m = await loopback(plan, clock_guest_kvm, caps)
            loop.setdefault(text, []).append(sample(
                strategy, m.source.state, m.source.before, m.destination.after,
                m.destination.restore_record, m.analysis,
                (round(m.clock.offset_ns), round(m.clock.uncertainty_ns))))
    controls = in_process_controls(clock_guest_kvm, caps)
    print(f"\nPrecision: kvmclock error after a migration, gap {GAP_S * 1e3:.0f} ms, "
          f"runstate=kernel, kernel {caps.kernel_release}, clock_guest={caps.clock_guest}; "
          "errors against this one host's CLOCK_REALTIME (true offset 0); agents over loopback "
          "TCP, then the controls in one process")
    print(precision_table({f"{k} (agents, loopback)": v for k, v in loop.items()} | controls))
    for label, rows in (loop | controls).items():
        for r in rows:
            print(f"  {label}: at TSC {r.at_tsc_ns:+d} ns, KVM pairs {r.kvm_wall_ns:+d} ns "
                  f"(slack {r.kvm_wall_slack_ns} ns), sync offset {r.sync_offset_ns} ns; "
                  f"kvmclock_follows_gap: {r.follows.detail}")

    # What should hold, run by run (loopback: the clocks agree).
    for text, rows in loop.items():
        for r in rows:
            assert r.follows.ok is True, (text, r.follows)
            if text.startswith("clock=guest,"):
                assert r.pvclock is True and abs(r.at_tsc_ns) <= PVCLOCK_BOUND_NS, (text, r)
            else:
                assert r.pvclock is None, (text, r)   # n/a: no record carried
            # realtime-synced moves the kvmclock by the offset it was told (here an error).
            told = r.sync_offset_ns if text.startswith("clock=realtime-synced,") else 0
            assert r.sync_offset_ns is not None
            assert abs(r.kvm_wall_ns + told) <= r.kvm_wall_slack_ns, (text, r)
    # The controls: each check fails where it should, by what was changed, and only there.
    [r] = controls[MOVED]
    assert r.pvclock is False and abs(r.at_tsc_ns - MOVED_NS) <= PVCLOCK_BOUND_NS, r
    assert r.follows.ok is True and abs(r.kvm_wall_ns) <= r.kvm_wall_slack_ns, r
    for text, label in SKEWED.items():
        [r] = controls[label]
        check = r.follows
        if text.startswith("clock=realtime-synced,"):
            assert check.ok is True and abs(r.kvm_wall_ns) <= r.kvm_wall_slack_ns, r
            continue
        assert abs(r.kvm_wall_ns - SKEW_NS) <= r.kvm_wall_slack_ns, r
        assert None not in (check.lo_ns, check.hi_ns, check.value_ns)
        assert check.lo_ns + SKEW_NS <= check.value_ns <= check.hi_ns + SKEW_NS, check
        assert check.hi_ns - check.lo_ns < SKEW_NS, f"bracket wider than the skew: {check}"
        assert check.ok is False, check
        if text.startswith("clock=guest,"):
            assert r.pvclock is True and abs(r.at_tsc_ns) <= PVCLOCK_BOUND_NS, r
    # The destination behind by more than the gap: realtime-synced, told the offset, carries
    # the gap; clock=guest's elapsed time is negative, taken as 0: the gap hidden, said so.
    [r] = controls[AHEAD["clock=realtime-synced,tsc=offset"]]
    assert r.follows.ok is True and abs(r.kvm_wall_ns) <= r.kvm_wall_slack_ns, r
    assert r.clamped_ns is None
    [r] = controls[AHEAD["clock=guest,tsc=offset"]]
    assert r.clamped_ns is not None and r.clamped_ns < GAP_NS - AHEAD_NS // 2, r
    assert r.follows.ok is False and r.kvm_wall_ns < -GAP_NS, r      # at least the sleep hidden
    assert r.pvclock is True and abs(r.at_tsc_ns) <= PVCLOCK_BOUND_NS, r
    for rows in loop.values():
        assert all(x.clamped_ns is None for x in rows)

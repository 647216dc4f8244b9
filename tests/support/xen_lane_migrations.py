"""In-process migrations of a Xen guest for the lane's tests, one row of the strategy table each.

A uniquely named module (tests cannot import a conftest reliably). Nothing here is skipped or
mocked: every row is a real capture on a real KVM-Xen VM, a real gap and a real restore; a
restore the kernel refuses is a row too ("refused: ..."), not an exception.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvmcore import (
    Analysis, Guest, GuestConfig, HostCapabilities, KvmIoctlError, RestoreRecord, Snapshot,
    Strategy, System, Unsupported, VmState, analyse, capture, restore, xen,
)
from source_agent.report import compose

if TYPE_CHECKING:
    from source_agent.migrate import Migration

GAP_S = 0.010                       # the seed's gap
# TCG slack for the runnable window: the kvmclock follows the lane kernel's raw monotonic clock,
# the gap is measured with CLOCK_REALTIME, and under TCG the kernel's timekeeping steers
# CLOCK_MONOTONIC/REALTIME against MONOTONIC_RAW by up to 2337 ppm over 200 ms (-396 over 1 s,
# -145 over 2 s; measured in the lane). 5000 ppm of a ~100 ms gap is 0.5 ms: still 20 times
# smaller than the 10 ms a hidden gap (clock=plain) takes away.
LANE_SLACK_PPM = 5000


def ms(ns: int | None) -> str:
    return "-" if ns is None else f"{ns / 1e6:.2f}"


@dataclass
class Row:
    """One migration: what was asked, what the kernel did, what the guest saw, the checks."""

    strategy: Strategy
    close_runstate: bool = True
    outcome: str = "ok"                 # ok | refused: ... | unsupported on this host: ...
    runnable_ns: int | None = None      # Xen time_runnable delta the guest saw
    wall_gap_ns: int | None = None
    first_entry_ns: int | None = None
    open_ns: int | None = None          # captured kvmclock - captured runstate entry time
    captured_state: int | None = None   # runstate state in the captured VmState
    window: tuple[int, int] | None = None
    kvmclock_jump_ns: int | None = None
    tsc_jump_ns: int | None = None
    src_tsc_timestamp: int | None = None  # the source pvclock's tsc_timestamp (last report)
    dest_tsc: int | None = None         # the guest TSC at the destination's first report
    checks: dict[str, bool | None] = field(default_factory=dict)
    # What the analysis was made from, for a test that measures more than the table shows.
    state: VmState | None = None        # as captured (not as altered for the restore)
    before: Snapshot | None = None      # the source's last report
    after: Snapshot | None = None       # the destination's first report
    record: RestoreRecord | None = None
    analysis: Analysis | None = None

    @property
    def label(self) -> str:
        capture_how = "" if self.close_runstate else " (seed capture)"
        return f"clock={self.strategy.clock},tsc={self.strategy.tsc}{capture_how}"

    @property
    def seed_ok(self) -> bool | None:
        """The seed's check as the product makes it (kvmcore.analysis seed_runnable)."""
        return self.checks.get("seed_runnable")

    @property
    def tight_ok(self) -> bool | None:
        """The product's verdict xen_runnable_in_window (kvmcore.analysis)."""
        return self.checks.get("xen_runnable_in_window")

    def summary(self) -> dict[str, bool | None | str]:
        """What the table asserts: outcome and the four checks."""
        return {"outcome": self.outcome.split(":")[0], "tight": self.tight_ok,
                "kvmclock": self.checks.get("kvmclock_follows_gap"),
                "tsc": self.checks.get("tsc_follows_gap"),
                "never_backwards": self.checks.get("never_backwards")}


def migrate(kvm: System, caps: HostCapabilities, strategy: Strategy, *, gap_s: float = GAP_S,
            close_runstate: bool = True, reports: int = 3,
            alter: Callable[[VmState], VmState] | None = None) -> Row:
    """Create a Xen guest, let it report ``reports`` times, capture, destroy, sleep ``gap_s``,
    restore with ``strategy``, run to its first report: the seed's flow, in one process.
    ``alter`` changes the state restore() is given (a model of what another host would send:
    its clock off ours, a record moved); the analysis still compares with the state captured."""
    row = Row(strategy, close_runstate)
    try:
        strategy.check_host(caps)
    except Unsupported as exc:
        row.outcome = str(exc)
        return row
    with Guest.create(kvm, GuestConfig(xen=True)) as g:
        for _ in range(reports):
            before = g.run_until_snapshot()
        state = capture(g, close_runstate=close_runstate)
    rs = state.runstate
    assert rs is not None
    row.captured_state = rs.state
    row.open_ns = state.clock["clock"] - rs.state_entry_time
    time.sleep(gap_s)
    given = alter(state) if alter else state
    try:
        g2 = restore(kvm, strategy.check(caps, given), g.memory)
    except KvmIoctlError as exc:
        row.outcome = f"refused: {exc}"
        return row
    with g2:
        after = g2.run_until_snapshot()
    record = g2.restore_record
    assert record is not None
    a = analyse(before, after, state, record, requested_gap_ns=int(gap_s * 1e9),
                runnable_slack_ppm=LANE_SLACK_PPM)
    assert a.wall_gap.value_ns is not None
    row.runnable_ns = a.xen_runnable_delta.value_ns
    row.wall_gap_ns = a.wall_gap.value_ns
    row.first_entry_ns = after.host_run_ns
    # The product's verdict (kvmcore.analysis) is what the table shows; its window must be the
    # documented bound (kvmcore.xen.runnable_window) over the same figures.
    window = a.checks["xen_runnable_in_window"]
    assert window.lo_ns is not None and window.hi_ns is not None
    row.window = (window.lo_ns, window.hi_ns)
    assert row.window == xen.runnable_window(a.wall_gap.value_ns, after.host_run_ns,
                                             row.open_ns, slack_ppm=LANE_SLACK_PPM)
    row.kvmclock_jump_ns = a.kvmclock_jump.value_ns
    row.tsc_jump_ns = a.tsc_jump.value_ns
    row.src_tsc_timestamp = before.pvclock.tsc_timestamp
    row.dest_tsc = after.tsc
    row.checks = {name: check.ok for name, check in a.checks.items()}
    row.state, row.before, row.after, row.record = state, before, after, record
    row.analysis = a
    return row


def yes_no(value: bool | None) -> str:
    return "-" if value is None else ("pass" if value else "FAIL")


COLUMNS = ("strategy", "restore", "Δrunnable ms", "wall gap ms", "window ms", "open ms",
           "kvmclock jump ms", "TSC jump ms", "seed check", "tight", "kvmclock", "TSC",
           "expected (why)")


def table(rows: list[tuple[Row, str]]) -> str:
    """Markdown table of ``(row, expectation)`` pairs (the expectation is the last column)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row, why in rows:
        restore_col = row.outcome if len(row.outcome) < 90 else row.outcome[:87] + "..."
        window = "-" if row.window is None else f"[{ms(row.window[0])}, {ms(row.window[1])}]"
        lines.append(
            f"| {row.label} | {restore_col} | {ms(row.runnable_ns)} | {ms(row.wall_gap_ns)} "
            f"| {window} | {ms(row.open_ns)} | {ms(row.kvmclock_jump_ns)} "
            f"| {ms(row.tsc_jump_ns)} | {yes_no(row.seed_ok)} | {yes_no(row.tight_ok)} "
            f"| {yes_no(row.checks.get('kvmclock_follows_gap'))} "
            f"| {yes_no(row.checks.get('tsc_follows_gap'))} | {why} |")
    return "\n".join(lines)


def check_agents_migration(m: Migration, label: str) -> dict:
    """The composed report's verdicts and the runnable window, from the source's own state."""
    report = compose(m, run_id="lane", started_ns=time.time_ns(), command=label)
    state, a, record = m.source.state, m.analysis, m.destination.restore_record
    assert state.runstate is not None
    assert state.runstate.state == xen.RUNSTATE_RUNNABLE          # closed at capture
    assert record.runstate_restored is not None
    assert record.runstate_restored.state == xen.RUNSTATE_RUNNABLE
    open_ns = state.clock["clock"] - state.runstate.state_entry_time
    delta, gap = a.xen_runnable_delta.value_ns, a.wall_gap.value_ns
    assert delta is not None and gap is not None
    uncertainty = round(m.clock.uncertainty_ns)
    lo, hi = xen.runnable_window(gap, m.destination.after.host_run_ns, open_ns, uncertainty,
                                 LANE_SLACK_PPM)
    print(f"{label}: clock-sync RTT {ms(round(m.clock.rtt_ns))} ms (+-{ms(uncertainty)} ms), "
          f"runnable delta {ms(delta)} ms, wall gap {ms(gap)} ms, window [{ms(lo)}, {ms(hi)}] ms, "
          "verdicts " + ", ".join(f"{k}={v['ok']}" for k, v in report["verdicts"].items()))
    assert report["measurements"]["xen_runnable_delta"]["value_ns"] == delta
    assert report["verdicts"]["seed_runnable"]["ok"] is True
    # Every verdict passes; pvclock_preserved applies only to clock=guest (n/a otherwise).
    # memory_intact passes too: the agents compare the source's memory with the REPORT's digest.
    pvclock = True if report["strategy"].startswith("clock=guest,") else None
    assert {n: v["ok"] for n, v in report["verdicts"].items()} == dict.fromkeys(
        report["verdicts"], True) | {"pvclock_preserved": pvclock}, report["verdicts"]
    assert lo <= delta <= hi
    # The report's own verdict: the same bound, at the product's 1000 ppm (tighter than the
    # lane's 5000, so inside [lo, hi]).
    window = report["verdicts"]["xen_runnable_in_window"]
    assert window["value_ns"] == delta and lo <= window["lo_ns"] <= window["hi_ns"] <= hi
    assert window["expected_ns"] == gap + open_ns
    return report

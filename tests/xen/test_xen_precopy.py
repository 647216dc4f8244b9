"""The seed's flow in precopy, on real KVM Xen inside the lane (issue 13: clock semantics are
unchanged at the stop).

In precopy the guest keeps running while its memory goes; it is stopped only for the last
dirty pages and its state. The runstate is closed as runnable at that capture, so the runnable
time the guest sees on the destination is only the final stop, not the transfer: the project's
window (kvmcore.xen.runnable_window, from the capture's clock reading to the destination's
first entry) must hold exactly as in stop-copy, every other verdict pass, and the destination's
memory be the source's page by page (memory_intact, from the REPORT's digest).

Negative control: the same window does not contain the whole migration's duration -- a
runnable delta that counted the transfer (as stop-copy's "stopped for the whole transfer" would
in a migration this long) would fall outside it.
"""
from __future__ import annotations

import pytest
from xen_lane_migrations import GAP_S, check_agents_migration, ms

from kvmcore import Strategy, System, probe
from source_agent.loopback import loopback
from source_agent.migrate import MigrationPlan

HEADLINE = Strategy.parse("clock=realtime,tsc=offset,runstate=kernel")


@pytest.mark.xen_lane
async def test_seed_flow_precopy() -> None:
    with System() as kvm:
        caps = probe(kvm)
        plan = MigrationPlan(host="", port=0, psk=b"", strategy=HEADLINE,
                             gap_ns=int(GAP_S * 1e9), mode="precopy",
                             memory_size=16 << 20, dirty_rate=4 << 20, working_set=4 << 20)
        m = await loopback(plan, kvm, caps)
    report = check_agents_migration(m, "loopback agents, precopy")
    stats = m.stats
    assert stats.mode == "precopy" and stats.rounds, stats
    assert stats.rounds[0].bytes == plan.memory_size          # round 0: all memory, live
    assert report["verdicts"]["memory_intact"]["ok"] is True, report["verdicts"]["memory_intact"]
    window = report["verdicts"]["xen_runnable_in_window"]
    delta = window["value_ns"]
    # The control: the migration as a whole (connect to REPORT) lasts longer than the window
    # allows, so a delta that had counted the live rounds would have failed the verdict.
    assert stats.total_ns is not None and stats.total_ns > window["hi_ns"], (stats, window)
    print(f"precopy: {len(stats.rounds)} round(s), final {stats.final.pages if stats.final else 0}"
          f" pages, downtime {ms(stats.downtime_ns)} ms, total {ms(stats.total_ns)} ms, runnable"
          f" delta {ms(delta)} ms in [{ms(window['lo_ns'])}, {ms(window['hi_ns'])}] ms")

"""The clock-sync estimate travels with the state (issue 12): clock=realtime-synced through the
real agents, and the report says how far the hosts' clocks disagree."""

from __future__ import annotations

from kvm_helpers import require

from kvmcore import Strategy


def test_loopback_realtime_synced_passes_and_reports_the_hosts_clocks(cli, caps):
    require(Strategy.parse("clock=realtime-synced,tsc=none,runstate=off"), caps)
    run = cli("source-agent", "loopback", "--json", "--no-db", "--clock", "realtime-synced",
              "--gap", "10ms")
    assert run.code == 0, run.stderr
    report = run.json()
    assert report["strategy"].startswith("clock=realtime-synced,")
    assert report["verdicts"]["kvmclock_follows_gap"]["ok"] is True
    assert "translated into the destination's timescale" in \
        report["measurements"]["kvmclock_jump"]["mechanism"]
    # One host, one clock: the estimate is within its uncertainty of 0 and the report says so.
    clocks = report["hosts_clocks"]
    assert clocks["value_ns"] == report["clock_sync"]["offset_ns"]
    assert "the two clocks agree within" in clocks["mechanism"]
    text = cli("source-agent", "loopback", "--no-db", "--clock", "realtime-synced").stdout
    assert "host clocks protocol clock sync" in text

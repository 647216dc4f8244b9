"""In-process migrations on the real kernel, one per strategy, with negative controls."""

from __future__ import annotations

import dataclasses
import re

import pytest
from common_helpers import open_fds
from kvm_helpers import migrate, require

from kvmcore import Guest, GuestConfig, StateError, Strategy, Unsupported, analyse, capture, restore

# Guest vs host time across a migration. Each report happened between the host's
# CLOCK_REALTIME before its KVM_RUN and after it returned, so the guest's interval from
# the source's last report to the destination's first lies in the host bracket
# [after.entry - before.exit, after.exit - before.entry] regardless of scheduling. The
# bracket is as wide as the two runs (the destination's first entry is the widest,
# ~1.5 ms under PVM); outside it only the clocks' rates differ: kvmclock vs NTP-slewed
# CLOCK_REALTIME, <= 500 ppm. Allowed: 50 us + 1000 ppm (analysis.DEFAULT_SLACK_*), 100x
# below the smallest gap, so a clock that loses or hides the gap cannot pass.


@pytest.mark.parametrize("gap_ms", [10, 50])
@pytest.mark.parametrize("text", ["clock=realtime,tsc=offset", "best"])
def test_migration_carries_the_gap(kvm, caps, text, gap_ms):
    strategy = Strategy.best(caps) if text == "best" else Strategy.parse(text)
    require(strategy, caps)
    if strategy.clock != "realtime":
        pytest.skip(f"best strategy here is {strategy}; this test is about clock=realtime")
    m = migrate(kvm, caps, strategy, gap_ms / 1000)
    a = m.analysis
    assert a.strategy == str(strategy)
    assert m.after.sequence == m.before.sequence + 1          # resumed, not restarted
    assert m.memory_intact
    assert not a.guest_saw_backwards
    lo, hi = a.host_bracket_ns
    assert lo >= gap_ms * 1_000_000                           # the sleep is in the interval
    assert a.kvmclock_jump.value_ns >= gap_ms * 1_000_000
    assert a.checks["kvmclock_follows_gap"].ok, a.checks
    if strategy.tsc == "none":
        # Only meaningful where a new vCPU's TSC is the host TSC (PVM: no offsetting).
        assert not caps.tsc_offset_applies
    assert a.checks["tsc_follows_gap"].ok, a.checks
    assert a.failed == [], a.checks
    # Without Xen runstate the Xen verdicts are not measured, not passed.
    assert a.checks["xen_runnable_in_window"].ok is None


def test_clock_none_guest_sees_backwards(kvm, caps):
    """Negative control: without restoring the kvmclock the new VM's clock (near 0) is
    behind the source's, and the guest's own check catches it."""
    strategy = Strategy.parse("clock=none", base=Strategy.best(caps))
    m = migrate(kvm, caps, strategy, 0.01, source_run_s=0.05)
    a = m.analysis
    assert a.guest_saw_backwards
    assert m.after.backwards_count == m.before.backwards_count + 1
    assert a.kvmclock_jump.value_ns < 0 and a.backwards_step_ns < 0
    assert a.checks["never_backwards"].ok is False
    assert a.checks["kvmclock_follows_gap"].ok is False


def test_clock_plain_hides_the_gap(kvm, caps):
    """QEMU's way: kvmclock resumes where it was; the analysis sees it lag the host."""
    m = migrate(kvm, caps, Strategy.parse("clock=plain", base=Strategy.best(caps)), 0.05)
    a = m.analysis
    assert not a.guest_saw_backwards
    assert a.host_interval.value_ns - a.kvmclock_jump.value_ns >= 45_000_000
    assert a.checks["kvmclock_follows_gap"].ok is False


def test_tsc_none_loses_the_tsc(kvm, caps):
    """Negative control for the TSC: where KVM starts a new vCPU's TSC afresh, not
    restoring it gives a jump unrelated to the gap."""
    if not caps.tsc_offset_applies:
        pytest.skip("unsupported on this host: TSC offsetting (a new vCPU's TSC is the "
                    f"host TSC, so tsc=none cannot lose it: {caps.tsc_offset_detail})")
    m = migrate(kvm, caps, Strategy.parse("tsc=none", base=Strategy.best(caps)), 0.05)
    assert m.analysis.checks["tsc_follows_gap"].ok is False


def test_analysis_detects_a_wrong_tsc(kvm, caps):
    """Negative control for the TSC check itself, on any host: the same migration with
    the after-report's TSC moved back by one second fails tsc_follows_gap."""
    strategy = Strategy.best(caps)
    m = migrate(kvm, caps, strategy, 0.01)
    assert m.analysis.checks["tsc_follows_gap"].ok
    wrong = dataclasses.replace(m.after, tsc=m.after.tsc - m.state.tsc_khz * 1000)
    bad = analyse(m.before, wrong, m.state, m.record)
    assert bad.checks["tsc_follows_gap"].ok is False
    assert bad.tsc_jump.value_ns < 0


def test_tsc_adjust_is_what_the_seed_does(kvm, caps):
    """tsc=adjust restores MSR_IA32_TSC_ADJUST; the analysis names that mechanism."""
    if not caps.tsc_adjust_msr:
        pytest.skip("unsupported on this host: MSR_IA32_TSC_ADJUST")
    m = migrate(kvm, caps, Strategy.parse("tsc=adjust", base=Strategy.best(caps)), 0.01)
    assert "MSR_IA32_TSC_ADJUST" in m.analysis.tsc_jump.mechanism
    assert m.after.sequence == m.before.sequence + 1


def test_unsupported_strategy_fails_before_a_vm_exists(kvm, caps):
    """A strategy this host or this state cannot do is refused by Strategy.check, which
    needs no VM and no memory: restore() only ever gets a plan that passed."""
    with Guest.create(kvm, GuestConfig()) as g:
        g.run_until_snapshot()
        state = capture(g)
    g.memory.close()
    fds = open_fds()
    for text in ("clock=guest", "tsc=offset", "runstate=kernel"):
        strategy = Strategy.parse(text, base=Strategy.best(caps))
        missing = strategy.missing(caps)
        if missing:
            with pytest.raises(Unsupported, match="^unsupported on this host: " + re.escape(missing[0])):
                strategy.check(caps, state)
        elif text == "runstate=kernel":      # a host with Xen, a guest without
            with pytest.raises(StateError) as info:
                strategy.check(caps, state)
            assert info.value.field == "runstate"
        else:
            assert strategy.check(caps, state).strategy == strategy
    # runstate=kernel is refused on every host for this non-Xen guest (control: the
    # best strategy for it passes).
    with pytest.raises((Unsupported, StateError)):
        Strategy.parse("runstate=kernel", base=Strategy.best(caps)).check(caps, state)
    assert Strategy.best(caps, state).check(caps, state).state is state
    assert open_fds() == fds


def test_restore_makes_the_record_and_the_guest_only_runs(kvm, caps):
    """restore() writes the RestoreRecord; running the guest leaves it as it was (the first
    entry is the first Snapshot's host bracket, not a stamp in the record)."""
    with Guest.create(kvm, GuestConfig()) as g:
        before = g.run_until_snapshot()
        state = capture(g)
    with restore(kvm, Strategy.best(caps, state).check(caps, state), g.memory) as g2:
        record = dataclasses.replace(g2.restore_record)     # a copy, before any run
        assert g2.restore_record is not None and record.restore_ns > 0
        first = g2.run_until_snapshot()
        second = g2.run_until_snapshot()
        assert g2.restore_record == record
    g.memory.close()
    assert first.sequence == before.sequence + 1
    assert 0 < first.host_run_ns and first.host_entry_realtime_ns > state.capture_realtime_ns
    assert second.host_entry_realtime_ns >= first.host_realtime_ns   # brackets do not overlap
    a = analyse(before, first, state, record)
    assert a.wall_gap.value_ns == first.host_entry_realtime_ns - state.capture_realtime_ns

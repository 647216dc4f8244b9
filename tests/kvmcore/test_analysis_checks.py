"""kvmcore.analysis's verdicts as Checks: the figures they carry, the Xen runnable window, and how
a host without KVM Xen is named. Inputs come from a real migration on this host's /dev/kvm; only
the Xen runstate the guest would have reported is set by hand where the host has none (the real
thing runs in the kernel Xen lane: tests/xen/test_xen_migration.py)."""
from __future__ import annotations

import dataclasses

import pytest
from kvm_helpers import migrate

from kvmcore import Strategy, analyse, xen
from kvmcore.analysis import (CHECK_NAMES, DEFAULT_SLACK_NS, DEFAULT_SLACK_PPM, HOST_BRACKET_RULE,
                             NO_XEN)


@pytest.fixture
def migration(kvm, caps):
    return migrate(kvm, caps, Strategy.best(caps), 0.01)


def test_every_check_is_named_once_in_report_order(migration):
    assert tuple(migration.analysis.checks) == CHECK_NAMES


def test_no_kvm_xen_is_named_as_the_host_not_the_strategy(migration):
    m = migration
    a = analyse(m.before, m.after, m.state, m.record, hosts_have_xen=False, requested_gap_ns=1)
    for name in ("xen_runnable_in_window", "seed_runnable"):
        assert a.checks[name].ok is None and a.checks[name].detail == NO_XEN
        assert not a.checks[name].failed
    # Control: hosts that have Xen but a guest without runstate say why differently.
    b = analyse(m.before, m.after, m.state, m.record, hosts_have_xen=True)
    assert b.checks["xen_runnable_in_window"].detail != NO_XEN


def test_kvmclock_check_compares_the_same_two_reports_and_prints_ms(migration):
    c = migration.analysis.checks["kvmclock_follows_gap"]
    a = migration.analysis
    assert c.value_ns == a.kvmclock_jump.value_ns and c.expected_ns == a.host_interval.value_ns
    assert c.lo_ns <= c.value_ns <= c.hi_ns and c.ok
    # Like with like: the error is far below the ~first-entry bias of jump - wall gap.
    assert abs(c.error_ns) < c.hi_ns - c.lo_ns
    assert " ms" in c.detail and " ns" not in c.detail and "error " in c.detail


def as_xen(m, runnable_ns: int, *, open_ns: int = 100_000):
    """The same migration as if the guest had Xen runstate with ``runnable_ns`` accounted."""
    entry = m.state.clock["clock"] - open_ns
    rs = xen.Runstate(state=xen.RUNSTATE_RUNNABLE, state_entry_time=entry, time_running=entry,
                      time_runnable=0, time_blocked=0, time_offline=0)
    state = dataclasses.replace(m.state, runstate=rs)
    strategy = Strategy.parse(m.record.strategy)
    record = dataclasses.replace(m.record, strategy=str(dataclasses.replace(
        strategy, runstate="kernel")))
    before = dataclasses.replace(m.before, runstate=xen.Runstate(1, 0, 0, 0, 0, 0))
    after = dataclasses.replace(m.after, runstate=xen.Runstate(0, 0, 0, runnable_ns, 0, 0))
    return analyse(before, after, state, record, requested_gap_ns=10_000_000)


def test_runnable_window_passes_the_gap_and_fails_a_hidden_one(migration):
    m = migration
    gap = m.analysis.wall_gap.value_ns
    # Accounted from the runstate entry to the first KVM_RUN: what a correct restore gives.
    good = as_xen(m, gap + 100_000 + 10_000).checks
    assert good["xen_runnable_in_window"].ok is True, good["xen_runnable_in_window"]
    assert good["xen_runnable_in_window"].error_ns == 10_000
    assert good["seed_runnable"].ok is True
    # Negative control, clock=plain's signature: only the restore-to-entry time accounted; the
    # seed's check lets it pass whenever that exceeds the requested gap, the window does not.
    hidden = as_xen(m, 10_500_000).checks
    assert hidden["xen_runnable_in_window"].ok is False
    assert hidden["xen_runnable_in_window"].failed
    assert hidden["seed_runnable"].ok is True
    assert "outside" in hidden["xen_runnable_in_window"].detail
    lo, hi = xen.runnable_window(gap, m.after.host_run_ns, 100_000)
    assert (good["xen_runnable_in_window"].lo_ns, good["xen_runnable_in_window"].hi_ns) == (lo, hi)


def test_tsc_check_is_shown_but_does_not_decide_when_the_tsc_is_not_restored(migration):
    m = migration
    wrong = dataclasses.replace(m.after, tsc=m.after.tsc - m.state.tsc_khz * 1000)
    strategy = Strategy.parse(m.record.strategy)
    for tsc, decides in (("none", False), ("adjust", True)):
        record = dataclasses.replace(m.record, strategy=str(dataclasses.replace(strategy,
                                                                                tsc=tsc)))
        check = analyse(m.before, wrong, m.state, record).checks["tsc_follows_gap"]
        assert check.ok is False and check.failed is decides


def test_the_stated_host_bracket_rule_is_the_one_the_checks_use():
    """Reports state the bound (report ``bound.detail``) from the analysis's own figures."""
    assert f"+- {DEFAULT_SLACK_NS // 1000} us + {DEFAULT_SLACK_PPM} ppm" in HOST_BRACKET_RULE


def test_pvclock_preserved_compares_the_records_at_the_same_guest_tsc(kvm, caps):
    """clock=guest's verdict, on a real migration's snapshot: the destination's pvclock (as
    the guest read it) against a source record. The record it was restored from agrees
    exactly; one moved by more than the series' 2 ns bound fails (the negative control);
    any other clock choice carries no record (n/a)."""
    from kvmcore.analysis import PVCLOCK_BOUND_NS, pvclock_preserved

    m = migrate(kvm, caps, Strategy.best(caps), 0.01)
    assert m.analysis.checks["pvclock_preserved"].ok is None          # realtime: no record
    pv = m.after.pvclock
    record = {"version": pv.version, "pad0": 0, "tsc_timestamp": pv.tsc_timestamp,
              "system_time": pv.system_time, "tsc_to_system_mul": pv.tsc_to_system_mul,
              "tsc_shift": pv.tsc_shift, "flags": pv.flags, "pad": [0, 0]}
    guest = Strategy.parse("clock=guest", Strategy.best(caps))
    for moved, ok in ((0, True), (PVCLOCK_BOUND_NS, True), (PVCLOCK_BOUND_NS + 1, False),
                      (-1000, False)):
        state = dataclasses.replace(m.state, clock_guest={**record,
                                                          "system_time": pv.system_time + moved})
        check = pvclock_preserved(guest, state, m.after)
        assert check.ok is ok, (moved, check.detail)
        assert check.error_ns == -moved


def test_pvclock_preserved_allows_the_rate_drift_between_two_hosts(kvm, caps):
    """Between hosts whose TSC rates differ (the pair's lane machines: 1 kHz apart) the
    destination's pvclock runs at its vCPU's rate after KVM_SET_CLOCK_GUEST, the record at the
    source's: the bound widens by exactly that drift from the restore's guest TSC to the
    report's. Control: the same error fails at equal rates, and beyond the drift."""
    from kvmcore.analysis import PVCLOCK_BOUND_NS, pvclock_preserved, pvclock_rate_drift_ns

    m = migrate(kvm, caps, Strategy.best(caps), 0.01)
    pv = m.after.pvclock
    khz = m.record.tsc_khz_destination
    ticks = 10 * khz                                          # 10 ms of the vCPU's TSC
    record = dataclasses.replace(m.record, tsc_offset_applied=0, clock_after={
        **m.record.clock_after, "host_tsc": m.after.tsc - ticks})
    apart = dataclasses.replace(m.state, tsc_khz=khz + 100)   # ~38 ppm: ~385 ns over 10 ms
    drift = pvclock_rate_drift_ns(apart, record, m.after.tsc)
    assert drift == -(-ticks * 100 * 1_000_000 // (khz * khz))
    assert 300 < drift < 500, drift
    guest = Strategy.parse("clock=guest", Strategy.best(caps))
    base = {"version": pv.version, "pad0": 0, "tsc_timestamp": pv.tsc_timestamp,
            "system_time": pv.system_time, "tsc_to_system_mul": pv.tsc_to_system_mul,
            "tsc_shift": pv.tsc_shift, "flags": pv.flags, "pad": [0, 0]}
    moved = drift + PVCLOCK_BOUND_NS - 1
    for state_khz, shift, ok in ((khz + 100, moved, True), (khz + 100, moved + 2, False),
                                 (khz, moved, False)):
        state = dataclasses.replace(m.state, tsc_khz=state_khz, clock_guest={
            **base, "system_time": pv.system_time + shift})
        check = pvclock_preserved(guest, state, m.after, record)
        assert check.ok is ok, (state_khz, shift, check.detail)
    assert "rate drift" in pvclock_preserved(guest, dataclasses.replace(
        apart, clock_guest=base), m.after, record).detail

"""The guest program runs on the real /dev/kvm and reports consistent snapshots."""

from __future__ import annotations

import dataclasses
import time

import pytest

from kvmcore import Guest, GuestConfig, StateError
from kvmcore._kvm import lib
from kvmcore.errors import GuestError


def test_guest_reports_increasing_sequence(kvm):
    with Guest.create(kvm, GuestConfig()) as g:
        snaps = [g.run_until_snapshot() for _ in range(5)]
    assert [s.sequence for s in snaps] == [1, 2, 3, 4, 5]
    # kvmclock enabled by the guest itself: KVM wrote a record (even version, TSC stable).
    assert all(s.pvclock.version and s.pvclock.version % 2 == 0 for s in snaps)
    assert all(s.pvclock.tsc_to_system_mul for s in snaps)
    assert all(b.kvmclock_ns > a.kvmclock_ns for a, b in zip(snaps, snaps[1:]))
    assert all(b.tsc > a.tsc for a, b in zip(snaps, snaps[1:]))
    assert snaps[-1].backwards_count == 0


def test_guest_kvmclock_agrees_with_host_computation(kvm):
    """The guest's kvmclock (its own pvclock arithmetic) equals the host's computation
    from the same record and TSC, to the nanosecond."""
    with Guest.create(kvm, GuestConfig()) as g:
        snaps = [g.run_until_snapshot() for _ in range(5)]
    for s in snaps:
        assert s.pvclock.ns_at(s.tsc) == s.kvmclock_ns
    # Negative control: the same check sees a TSC one microsecond off.
    s = snaps[-1]
    assert s.pvclock.ns_at(s.tsc + 3000) != s.kvmclock_ns


def test_guest_kvmclock_tracks_host_time(kvm):
    """Between two reports 20 ms apart, the guest's kvmclock advances as the host's clock.

    Each report happened between the host's CLOCK_REALTIME before its KVM_RUN and after
    it returned, so the guest's interval lies in [b.entry - a.exit, b.exit - a.entry]
    whatever the scheduling; only clock rates (<= 500 ppm NTP slew) remain: 50 us +
    1000 ppm allowed, as kvmcore.analysis does.
    """
    with Guest.create(kvm, GuestConfig()) as g:
        a = g.run_until_snapshot()
        time.sleep(0.02)
        b = g.run_until_snapshot()
    guest = b.kvmclock_ns - a.kvmclock_ns
    lo = b.host_entry_realtime_ns - a.host_realtime_ns
    hi = b.host_realtime_ns - a.host_entry_realtime_ns
    slack = 50_000 + hi // 1000
    assert lo - slack <= guest <= hi + slack
    assert guest >= 20_000_000
    # Negative control: the same bracket excludes a clock 100 ms off (the bracket is as
    # wide as the two runs: well under a millisecond, a few ms when preempted).
    assert not lo - slack <= guest + 100_000_000 <= hi + slack


def test_report_magic_is_checked(kvm):
    """Negative control for the report-page check: a clobbered magic is refused."""
    with Guest.create(kvm, GuestConfig()) as g:
        g.run_until_snapshot()
        g.report_page().magic = 0
        # The guest rewrites magic only once, at start: the next report must be refused.
        with pytest.raises(GuestError, match="magic"):
            g.run_until_snapshot()


def test_guest_config_rejects_bad_memory_size():
    with pytest.raises(StateError, match="memory_size"):
        GuestConfig(memory_size=lib.KVMCORE_MIN_MEMORY + 4096)
    with pytest.raises(StateError, match="memory_size"):
        GuestConfig(memory_size=0)
    assert dataclasses.replace(GuestConfig(), memory_size=4 << 20).memory_size == 4 << 20

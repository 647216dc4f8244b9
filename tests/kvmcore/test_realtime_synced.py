"""clock=realtime-synced on the real kernel: the source's realtime translated into the
destination's timescale by the clock-sync offset before KVM_SET_CLOCK with KVM_CLOCK_REALTIME.

One host has one CLOCK_REALTIME, so a destination whose clock disagrees is made by the
figures: the state claims clock sync measured the destination ``SKEW`` behind, and the
analysis corrects the host's figures by the same offset, exactly as between two hosts whose
clocks really disagree by it. clock=realtime on the same state is the control: it carries the
disagreement into the kvmclock, fails, and its verdict names the cause. The real skew is in the
pair (tests/pair/test_pair_clock.py).
"""

from __future__ import annotations

import dataclasses
import time

import pytest
from kvm_helpers import require

from kvmcore import (Guest, GuestConfig, GuestMemory, StateError, Strategy, VmState, analyse,
                     capture, restore)

SKEW_NS = -100_000_000      # the destination's realtime 100 ms behind the source's
GAP_S = 0.01


def migrate_with_offset(kvm, caps, clock: str, offset_ns: int, uncertainty_ns: int = 0):
    strategy = Strategy(clock, "none", "off")
    require(strategy, caps)
    with Guest.create(kvm, GuestConfig()) as g:
        g.run_until_snapshot()
        before = g.run_until_snapshot()
        state = capture(g)
    sent = dataclasses.replace(state, clock_sync={"offset_ns": offset_ns,
                                                  "uncertainty_ns": uncertainty_ns})
    state2 = VmState.from_plain(sent.to_plain())          # through the wire form
    assert state2.clock_sync == sent.clock_sync
    plan = strategy.check(caps, state2)
    memory = GuestMemory.allocate(state2.memory_size)
    memory.view()[:] = g.memory.view()
    g.memory.close()
    time.sleep(GAP_S)
    with restore(kvm, plan, memory) as g2:
        after = g2.run_until_snapshot()
        a = analyse(before, after, state2, g2.restore_record, clock_offset_ns=offset_ns,
                    uncertainty_ns=uncertainty_ns)
    memory.close()
    return a


def test_realtime_synced_translates_the_offset(kvm, caps):
    a = migrate_with_offset(kvm, caps, "realtime-synced", SKEW_NS)
    check = a.checks["kvmclock_follows_gap"]
    assert check.ok, check.detail
    assert a.failed == [], a.checks
    # The kvmclock advanced by the gap plus the claimed 100 ms the destination is behind.
    assert a.kvmclock_jump.value_ns >= GAP_S * 1e9 - SKEW_NS
    assert "translated into the destination's timescale" in a.kvmclock_jump.mechanism
    assert "100.000 ms behind the source's" in a.hosts_clock_offset.mechanism


def test_realtime_carries_the_offset_and_names_the_cause(kvm, caps):
    """The control: the same state and figures with clock=realtime fail by the offset."""
    a = migrate_with_offset(kvm, caps, "realtime", SKEW_NS)
    check = a.checks["kvmclock_follows_gap"]
    assert check.ok is False and "kvmclock_follows_gap" in a.failed
    # Off by the offset exactly: inside the verdict's bound once that is moved by it.
    assert check.lo_ns + SKEW_NS <= check.value_ns <= check.hi_ns + SKEW_NS, check.detail
    assert ("cause: the destination's realtime is 100.000 ms behind the source's"
            in check.detail), check.detail


def test_no_cause_named_within_the_uncertainty(kvm, caps):
    """An offset inside its uncertainty is no disagreement: nothing is blamed on it (the
    verdict still fails: the offset was real, as far as the figures go)."""
    a = migrate_with_offset(kvm, caps, "realtime", SKEW_NS, uncertainty_ns=-SKEW_NS + 1)
    check = a.checks["kvmclock_follows_gap"]
    assert check.ok is False
    assert "cause:" not in check.detail
    assert "agree within" in a.hosts_clock_offset.mechanism


def test_realtime_synced_needs_the_estimate(kvm, caps):
    strategy = Strategy("realtime-synced", "none", "off")
    require(strategy, caps)
    with Guest.create(kvm, GuestConfig()) as g:
        g.run_until_snapshot()
        state = capture(g)
    assert state.clock_sync is None                # capture() cannot know it
    with pytest.raises(StateError) as exc:
        strategy.check(caps, state)
    assert exc.value.field == "clock_sync"
    Strategy("realtime", "none", "off").check(caps, state)          # control
    plain = dataclasses.replace(state, clock_sync={"offset_ns": 0,
                                                   "uncertainty_ns": 0}).to_plain()
    for bad, field in [({"offset_ns": 1.5, "uncertainty_ns": 0}, "clock_sync.offset_ns"),
                       ({"offset_ns": 1 << 63, "uncertainty_ns": 0}, "clock_sync.offset_ns"),
                       ({"offset_ns": 0, "uncertainty_ns": -1}, "clock_sync.uncertainty_ns"),
                       ({"offset_ns": 0}, "clock_sync.uncertainty_ns")]:
        with pytest.raises(StateError) as exc:
            VmState.from_plain({**plain, "clock_sync": bad})
        assert exc.value.field == f"state.{field}"
    # A translated realtime below 0 cannot be given to KVM: refused before any VM exists.
    past = VmState.from_plain({**plain, "clock_sync": {
        "offset_ns": -state.clock["realtime"] - 1, "uncertainty_ns": 0}})
    with pytest.raises(StateError):
        strategy.check(caps, past)
    g.memory.close()


def test_kvm_adds_only_a_positive_elapsed_realtime(kvm, caps):
    """What a destination behind by more than the gap meets, on the real kernel: a realtime
    given to KVM_SET_CLOCK that lies in the future (here: the state claims the destination 1 s
    ahead) does not set the kvmclock back; it resumes at the captured value, the gap hidden."""
    a = migrate_with_offset(kvm, caps, "realtime-synced", 1_000_000_000)
    assert 0 <= a.kvmclock_jump.value_ns < GAP_S * 1e9, a.kvmclock_jump
    assert not a.guest_saw_backwards
    # Control: the same restore with the offset 0 carries the gap.
    assert migrate_with_offset(kvm, caps, "realtime-synced", 0).kvmclock_jump.value_ns \
        >= GAP_S * 1e9


def test_the_cause_says_which_way_the_kernel_took_it():
    """name_the_cause from the figures: behind by more than the host's interval, the kvmclock
    resumed at the captured value (the pair's -3 s); behind by less, the offset was carried."""
    from kvmcore.analysis import Check, name_the_cause
    failed = Check(False, "outside", value_ns=5_000_000, expected_ns=370_000_000)
    realtime = Strategy("realtime", "none", "off")
    far = name_the_cause(failed, realtime, -3_000_000_000, 2_000_000).detail
    assert "3000.000 ms behind the source's" in far and "resumed at the captured value" in far
    near = name_the_cause(failed, realtime, -250_000_000, 2_000_000).detail
    assert "carried it into the kvmclock" in near and "resumed" not in near
    # Controls: a passing check, or another strategy, is left as it is.
    assert name_the_cause(dataclasses.replace(failed, ok=True), realtime, -3_000_000_000,
                          0).detail == "outside"
    assert name_the_cause(failed, Strategy("plain", "none", "off"), -3_000_000_000,
                          0).detail == "outside"

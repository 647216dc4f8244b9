"""hosts_tsc: the destination host's TSC minus the source's at one instant, from the two
KVM_GET_CLOCK host_tsc readings and the realtime between them (issue 12's boot-gap case).

On one host there is one TSC, so a real migration here measures ~0; a state whose host_tsc
claims the source's TSC was N ticks ahead is the control (the figure moves by exactly -N).
Two hosts whose TSCs really differ: tests/pair (--boot-gap) and the heterogeneous pair.
"""
from __future__ import annotations

import dataclasses

from kvm_helpers import require

from kvmcore import Guest, GuestConfig, GuestMemory, Strategy, analyse, capture, restore
from kvmcore.analysis import hosts_tsc


def migrate_here(kvm, caps):
    strategy = Strategy("realtime", "none", "off")
    require(strategy, caps)
    with Guest.create(kvm, GuestConfig()) as g:
        g.run_until_snapshot()
        before = g.run_until_snapshot()
        state = capture(g)
    plan = strategy.check(caps, state)
    memory = GuestMemory.allocate(state.memory_size)
    memory.view()[:] = g.memory.view()
    g.memory.close()
    with restore(kvm, plan, memory) as g2:
        after = g2.run_until_snapshot()
        record = g2.restore_record
    memory.close()
    return before, after, state, record


def test_one_host_has_one_tsc(kvm, caps):
    before, after, state, record = migrate_here(kvm, caps)
    a = analyse(before, after, state, record)
    value = a.hosts_tsc_offset.value_ns
    assert value is not None, a.hosts_tsc_offset.reason
    # The two readings are a restore apart; their realtime and TSC agree to a few us.
    assert abs(value) < 200_000, value
    assert "hosts' TSCs differ" not in a.tsc_jump.mechanism


def test_a_source_tsc_ahead_shows_as_a_destination_behind(kvm, caps):
    """Negative control: the same figures with the source's host_tsc 5 s of ticks ahead."""
    before, after, state, record = migrate_here(kvm, caps)
    ticks = 5 * state.tsc_khz * 1000
    ahead = dataclasses.replace(state, clock={**state.clock,
                                              "host_tsc": state.clock["host_tsc"] + ticks})
    plain = hosts_tsc(state, record, 0, 0).value_ns
    shifted = hosts_tsc(ahead, record, 0, 0).value_ns
    assert abs(shifted - plain + 5_000_000_000) < 2, (plain, shifted)
    a = analyse(before, after, ahead, record)
    assert "the hosts' TSCs differ by -5000" in a.tsc_jump.mechanism
    assert "not carried" in a.tsc_jump.mechanism


def test_no_host_tsc_is_not_measurable(kvm, caps):
    before, after, state, record = migrate_here(kvm, caps)
    bare = dataclasses.replace(state, clock={**state.clock, "flags": 0})
    m = hosts_tsc(bare, record, 0, 0)
    assert m.value_ns is None and "KVM_CLOCK_HOST_TSC" in m.reason

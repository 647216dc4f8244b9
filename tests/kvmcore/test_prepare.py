"""prepare() + restore(..., prepared=) on the real kernel: the same guest as restore() makes by
itself, the VM's creation moved out of the restore; a prepared VM that does not fit the state is
refused before any ioctl touches it."""

from __future__ import annotations

import dataclasses

import pytest
from common_helpers import open_fds

from kvmcore import (Guest, GuestConfig, GuestError, GuestMemory, StateError, Strategy, VmState,
                     analyse, capture, prepare, restore, xen)
from kvmcore._schema import struct_to_plain
from kvmcore.state import MSRS
from kvmcore.strategy import RestorePlan

CONFIG = GuestConfig(memory_size=4 << 20, dirty_rate=1 << 20, working_set=1 << 20)


@pytest.fixture
def source(kvm, caps):
    """A captured guest (its wire form), its last report and its memory."""
    with Guest.create(kvm, CONFIG) as g:
        for _ in range(3):
            before = g.run_until_snapshot()
        state = capture(g)
    state = VmState.from_plain(state.to_plain())
    yield state, before, g.memory, Strategy.best(caps, state).check(caps, state)
    g.memory.close()


def copy_of(memory: GuestMemory) -> GuestMemory:
    copy = GuestMemory.allocate(memory.size)
    copy.write(0, memory.read(0, memory.size))
    return copy


def registers(guest: Guest) -> dict:
    vcpu = guest.vcpu
    return {"regs": struct_to_plain(vcpu.get_regs()), "sregs": struct_to_plain(vcpu.get_sregs()),
            "fpu": struct_to_plain(vcpu.get_fpu()),
            "msrs": vcpu.get_msrs([i for i in MSRS.values() if i in guest.msr_indices])}


def test_a_prepared_restore_is_the_same_guest(kvm, source):
    state, before, memory, plan = source
    with copy_of(memory) as fresh_mem, copy_of(memory) as prepared_mem:
        prepared = prepare(kvm, plan.strategy.guest_config(state.memory_size), prepared_mem)
        assert prepared.timings["create"] > 0 and prepared.restore_record is None
        with restore(kvm, plan, fresh_mem) as fresh, \
                restore(kvm, plan, prepared_mem, prepared=prepared) as again:
            assert again is prepared
            assert registers(again) == registers(fresh)
            a, b = fresh.restore_record, again.restore_record
            same = ("strategy", "tsc_offset_requested", "tsc_offset_applied",
                    "tsc_khz_destination", "tsc_khz_set", "runstate_restored")
            assert {f: getattr(a, f) for f in same} == {f: getattr(b, f) for f in same}
            assert a.clock_after.keys() == b.clock_after.keys()
            assert a.clock_after["flags"] == b.clock_after["flags"]
            assert a.timings.keys() == b.timings.keys()
            # The creation is prepare()'s now, not the restore's.
            assert a.timings["create"] > 0 and b.timings["create"] == 0
            firsts = [g.run_until_snapshot() for g in (fresh, again)]
            for guest, first in zip((fresh, again), firsts):
                assert first.sequence == before.sequence + 1
                analysis = analyse(before, first, state, guest.restore_record)
                assert analysis.failed == [], analysis.checks
                assert guest.run_until_snapshot().sequence == before.sequence + 2


def test_a_prepared_vm_that_does_not_fit_is_refused_before_any_ioctl(kvm, source):
    state, before, memory, plan = source
    with copy_of(memory) as mem, GuestMemory.allocate(8 << 20) as big:
        prepared = prepare(kvm, GuestConfig(memory_size=state.memory_size), mem)
        untouched = registers(prepared)
        other = prepare(kvm, GuestConfig(memory_size=8 << 20), big)
        xen_state = dataclasses.replace(state, runstate=xen.Runstate(0, 0, 0, 0, 0, 0))
        cases = [
            # The VM prepared on another memory (and size) than the one given.
            ("memory", plan, mem, other),
            # Its memory given, but for another state size.
            ("memory_size", plan, big, other),
            # A Xen guest's state (no Strategy.check here: this host has no Xen to pass it).
            ("runstate", RestorePlan(plan.strategy, xen_state), mem, prepared),
        ]
        with other:
            for field, case_plan, case_mem, case_guest in cases:
                with pytest.raises(StateError) as info:
                    restore(kvm, case_plan, case_mem, prepared=case_guest)
                assert info.value.field == field, info.value
        # Nothing touched the prepared VM: its registers are as prepare() left them, and
        # the right state restores into it (the control).
        assert registers(prepared) == untouched
        with restore(kvm, plan, mem, prepared=prepared) as g:
            assert registers(g) != untouched
            assert g.run_until_snapshot().sequence == before.sequence + 1
            with pytest.raises(GuestError, match="already restored"):
                restore(kvm, plan, mem, prepared=g)
        with pytest.raises(GuestError, match="closed"):
            restore(kvm, plan, mem, prepared=prepared)


def test_prepare_checks_the_memory_before_any_vm(kvm):
    fds = open_fds()
    with GuestMemory.allocate(4 << 20) as mem:
        with pytest.raises(StateError) as info:
            prepare(kvm, GuestConfig(memory_size=2 << 20), mem)
        assert info.value.field == "memory_size" and open_fds() == fds
    with pytest.raises(StateError) as info:
        prepare(kvm, GuestConfig(memory_size=4 << 20), mem)       # closed
    assert info.value.field == "memory" and open_fds() == fds
    # Control: the fitting memory gives a VM (fds open), closed again with the guest.
    with GuestMemory.allocate(4 << 20) as mem, prepare(kvm, GuestConfig(4 << 20), mem) as g:
        assert g.vm.fd >= 0 and open_fds() > fds
    assert open_fds() == fds


def test_the_guest_config_rule_is_the_strategys():
    assert Strategy.parse("runstate=kernel").guest_config(4 << 20) == GuestConfig(4 << 20, xen=True)
    assert Strategy.parse("runstate=off").guest_config(4 << 20) == GuestConfig(4 << 20)
    with pytest.raises(StateError):
        Strategy().guest_config(3 << 20)            # the size rule is GuestConfig's

"""The strategy requirements table, against an expected table written out by hand.

Host capabilities are taken from this host's probe and then switched on and off
one at a time, so every row of kvmcore.strategy.REQUIREMENTS is exercised on any
host (what the probe says is tested elsewhere; here, what follows from it).
"""

from __future__ import annotations

import dataclasses

import pytest

from kvmcore import (Guest, GuestConfig, StateError, Strategy, StrategyError, System,
                     Unsupported, capture)
from kvmcore import xen

# Everything a host can offer, then each capability's removal and the choices that
# removal (and only it) makes unsupported, with the words of the refusal.
FULL = dict(clock_guest=True, adjust_clock_flags=["TSC_STABLE", "REALTIME", "HOST_TSC"],
            tsc_offset_attr=True, tsc_offset_applies=True, tsc_adjust_msr=True,
            xen_hvm=["HYPERCALL_MSR", "SHARED_INFO", "RUNSTATE"])
WITHOUT = [
    (dict(clock_guest=False), {"clock=guest": "KVM_SET_CLOCK_GUEST"}),
    (dict(clock_guest=None), {"clock=guest": "KVM_SET_CLOCK_GUEST"}),
    (dict(adjust_clock_flags=["TSC_STABLE"]),
     {"clock=realtime": "KVM_CLOCK_REALTIME in KVM_SET_CLOCK",
      "clock=realtime-synced": "KVM_CLOCK_REALTIME in KVM_SET_CLOCK"}),
    (dict(tsc_offset_attr=False), {"tsc=offset": "KVM_VCPU_TSC_OFFSET applied"}),
    (dict(tsc_offset_applies=False), {"tsc=offset": "KVM_VCPU_TSC_OFFSET applied"}),
    (dict(tsc_adjust_msr=False), {"tsc=adjust": "MSR_IA32_TSC_ADJUST"}),
    (dict(xen_hvm=["HYPERCALL_MSR", "SHARED_INFO"]),
     {"runstate=kernel": "KVM_CAP_XEN_HVM SHARED_INFO|RUNSTATE"}),
]
EVERY_CHOICE = [f"clock={c}" for c in ("guest", "realtime", "realtime-synced", "plain",
                                                  "none")] + \
    [f"tsc={t}" for t in ("offset", "adjust", "none")] + \
    [f"runstate={r}" for r in ("kernel", "off")]


@pytest.fixture
def full(caps):
    return dataclasses.replace(caps, **FULL)


@pytest.fixture(scope="module")
def captured_state():
    """A real capture of a plain (non-Xen) guest on this host."""
    with System() as kvm, Guest.create(kvm, GuestConfig()) as g:
        g.run_until_snapshot()
        state = capture(g)
    g.memory.close()
    return state


def single(choice: str) -> Strategy:
    """The strategy with ``choice`` and needing nothing else."""
    return Strategy.parse(choice, Strategy("plain", "none", "off"))


@pytest.mark.parametrize(("removed", "refused"), WITHOUT)
def test_each_capability_refuses_exactly_its_choices(full, removed, refused):
    host = dataclasses.replace(full, **removed)
    for choice in EVERY_CHOICE:
        strategy = single(choice)
        strategy.check_host(full)                         # control: the full host can
        if choice in refused:
            assert strategy.missing(host)[0].startswith(refused[choice])
            with pytest.raises(Unsupported, match=f"^unsupported on this host: {refused[choice]}"):
                strategy.check_host(host)
        else:
            assert strategy.missing(host) == []
            strategy.check_host(host)


def test_best_takes_the_most_faithful_choice_the_host_has(full):
    assert str(Strategy.best(full)) == "clock=guest,tsc=offset,runstate=kernel"
    # Never the choices kept only to show what they get wrong (clock=none, tsc=adjust).
    host = dataclasses.replace(full, clock_guest=False, adjust_clock_flags=[],
                               tsc_offset_applies=False, xen_hvm=[])
    assert str(Strategy.best(host)) == "clock=plain,tsc=none,runstate=off"
    host = dataclasses.replace(full, clock_guest=False)
    assert str(Strategy.best(host)) == "clock=realtime,tsc=offset,runstate=kernel"


def test_best_common_takes_each_part_both_hosts_can_do(full):
    """A lane machine (Xen, offset applied, no clock=guest) and a PVM host (no Xen, offset
    ignored): each part's first choice both have; either host alone would pick more."""
    lane = dataclasses.replace(full, clock_guest=False)
    pvm = dataclasses.replace(full, clock_guest=False, tsc_offset_applies=False, xen_hvm=[])
    assert str(Strategy.best_common(lane, pvm)) == "clock=realtime,tsc=none,runstate=off"
    assert Strategy.best_common(pvm, lane) == Strategy.best_common(lane, pvm)
    assert Strategy.best_common(lane) == Strategy.best(lane)      # one host: its own best
    assert str(Strategy.best(lane)) == "clock=realtime,tsc=offset,runstate=kernel"  # control
    assert Strategy.best_common(lane, pvm).missing(pvm) == []
    assert Strategy.best(lane).missing(pvm) == [                 # what the PVM side lacks
        pvm.tsc_offset_detail and f"KVM_VCPU_TSC_OFFSET applied to the guest TSC "
        f"({pvm.tsc_offset_detail})", "KVM_CAP_XEN_HVM SHARED_INFO|RUNSTATE"]


def test_resolve_lays_overrides_over_the_best_and_checks_them(full):
    host = dataclasses.replace(full, clock_guest=False, tsc_offset_applies=False)
    assert str(Strategy.resolve("", host)) == "clock=realtime,tsc=none,runstate=kernel"
    assert Strategy.resolve("best", host) == Strategy.resolve("", host)
    assert str(Strategy.resolve("clock=plain", host)) == "clock=plain,tsc=none,runstate=kernel"
    with pytest.raises(Unsupported, match="KVM_VCPU_TSC_OFFSET applied"):
        Strategy.resolve("tsc=offset", host)
    with pytest.raises(StrategyError, match="choose one of"):
        Strategy.resolve("clock=sundial", host)


def test_check_names_the_state_field_a_choice_needs(full, captured_state):
    state = captured_state
    Strategy("realtime", "none", "off").check(full, state)          # control
    for strategy, field in ((Strategy("guest", "none", "off"), "clock_guest"),
                            (Strategy("plain", "none", "kernel"), "runstate")):
        stripped = dataclasses.replace(state, clock_guest=None, runstate=None)
        with pytest.raises(StateError, match=field):
            strategy.check(full, stripped)
    no_realtime = dataclasses.replace(state, clock={**state.clock, "flags": 0})
    with pytest.raises(StateError, match="clock.flags"):
        Strategy("realtime", "none", "off").check(full, no_realtime)
    # A Xen guest needs a Xen host whatever the runstate choice.
    xen_guest = dataclasses.replace(state, runstate=xen.Runstate(0, 0, 0, 0, 0, 0))
    with pytest.raises(Unsupported, match="KVM_CAP_XEN_HVM"):
        Strategy("plain", "none", "off").check(dataclasses.replace(full, xen_hvm=[]), xen_guest)


def test_clock_guest_needs_the_record_rate_within_its_tolerance(full, captured_state):
    """KVM_SET_CLOCK_GUEST is ERANGE beyond 1 kHz between the record's rate and the vCPU's
    (the pair's machines calibrate up to 33 kHz apart): refused by the source after HELLO
    (check_pair) and by the destination at MIGRATE (check), before any guest or memory,
    unless the destination can scale (KVM_CAP_TSC_CONTROL)."""
    guest = Strategy("guest", "none", "off")
    rate = full.tsc_khz
    state = dataclasses.replace(captured_state, tsc_khz=rate,
                                clock_guest=captured_state.clock_guest or {"version": 0})
    near = dataclasses.replace(full, tsc_khz=rate + 1, tsc_control=False)
    far = dataclasses.replace(full, tsc_khz=rate + 8, tsc_control=False)
    guest.check_pair(full, near)                                         # control: 1 kHz
    guest.check(near, state)
    for refuse in (lambda: guest.check_pair(full, far), lambda: guest.check(far, state)):
        with pytest.raises(Unsupported, match=rf"{rate} kHz against .*{rate + 8} kHz.*ERANGE"):
            refuse()
    scaling = dataclasses.replace(far, tsc_control=True)                 # scaled: carried
    guest.check_pair(full, scaling)
    assert guest.check(scaling, state).tsc_khz == rate
    Strategy("realtime", "none", "off").check_pair(full, far)            # only clock=guest

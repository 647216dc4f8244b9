"""The TSC rate across hosts (issue 12 item 3): carried with KVM_SET_TSC_KHZ where the
destination can scale (KVM_CAP_TSC_CONTROL, probed) and the rates differ; otherwise the
analysis names the ppm not carried."""

from __future__ import annotations

import dataclasses
import time

from kvmcore import (Guest, GuestConfig, GuestMemory, RestorePlan, Strategy, analyse, capture,
                     restore)


def captured(kvm):
    with Guest.create(kvm, GuestConfig()) as g:
        g.run_until_snapshot()
        before = g.run_until_snapshot()
        state = capture(g)
    return before, state, g.memory


def test_the_plan_scales_only_where_the_rates_differ_and_the_host_can(kvm, caps):
    _, state, memory = captured(kvm)
    memory.close()
    strategy = Strategy("realtime", "none", "off")
    other = dataclasses.replace(state, tsc_khz=caps.tsc_khz + 20)          # another host's
    scaling = dataclasses.replace(caps, tsc_control=True)
    assert strategy.check(scaling, other).tsc_khz == caps.tsc_khz + 20
    # Controls: same rate, or no KVM_CAP_TSC_CONTROL: nothing to scale / cannot.
    assert strategy.check(scaling, dataclasses.replace(other, tsc_khz=caps.tsc_khz)).tsc_khz \
        is None
    assert strategy.check(dataclasses.replace(caps, tsc_control=False), other).tsc_khz is None


def test_restore_sets_the_rate_the_plan_gives(kvm, caps):
    """The restore() branch on the real kernel: KVM_SET_TSC_KHZ at this host's own rate (any
    host accepts a rate within its tolerance, scaling or not); without it nothing is set."""
    for khz in (caps.tsc_khz, None):
        before, state, memory = captured(kvm)
        plan = RestorePlan(Strategy("realtime", "none", "off"), state, khz)
        time.sleep(0.005)
        with restore(kvm, plan, memory) as g2:
            after = g2.run_until_snapshot()
            record = g2.restore_record
        memory.close()
        assert record.tsc_khz_set == khz
        a = analyse(before, after, state, record)
        assert a.checks["kvmclock_follows_gap"].ok, a.checks
        if khz is None:
            assert "TSC rate carried" not in a.tsc_jump.mechanism
        else:
            assert f"TSC rate carried: KVM_SET_TSC_KHZ {khz} kHz" in a.tsc_jump.mechanism


def test_the_ppm_not_carried_is_named(kvm):
    before, state, memory = captured(kvm)
    time.sleep(0.005)
    with restore(kvm, RestorePlan(Strategy("realtime", "none", "off"), state), memory) as g2:
        after = g2.run_until_snapshot()
        record = g2.restore_record
    memory.close()
    assert "ppm not carried" not in analyse(before, after, state, record).tsc_jump.mechanism
    # The pair's two lane kernels: src 2596140 kHz, dst 2596120 kHz.
    src = dataclasses.replace(state, tsc_khz=2596140)
    dst = dataclasses.replace(record, tsc_khz_destination=2596120)
    mechanism = analyse(before, after, src, dst).tsc_jump.mechanism
    assert "source 2596140, destination 2596120: -7.7 ppm not carried" in mechanism, mechanism

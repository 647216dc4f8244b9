"""capture() and restore(): one guest's migration, carried out by a named Strategy.

What each strategy choice does and needs is kvmcore.strategy's; this module does it.
"""

from __future__ import annotations

import dataclasses
import errno
import time
from typing import TYPE_CHECKING, Any

from . import xen
from ._kvm import lib
from .errors import GuestError, KvmIoctlError, StateError
from .guest import Guest, GuestConfig
from .memory import GuestMemory
from .report_doc import RestoreRecord
from .strategy import RestorePlan, Strategy
from ._schema import plain_to_struct, struct_to_plain
from .state import MSRS, VmState

if TYPE_CHECKING:
    from .system import System

MASK64 = (1 << 64) - 1


def capture(guest: Guest, *, close_runstate: bool = True) -> VmState:
    """Capture a stopped guest (after run_until_snapshot). The `out` it stopped on is
    completed first, so the destination resumes after it. The memory is not copied: it is
    ``guest.memory``, which outlives the VM.

    Xen guests: KVM switches the runstate to running at the first guest entry after a
    vcpu_load (KVM_REQ_STEAL_UPDATE) and to runnable only when the vCPU thread is
    preempted, so a vCPU the VMM merely stopped still reads ``running`` since its last
    KVM_RUN entry or preemption. ``close_runstate`` (default) switches it to runnable first
    (RUNSTATE_CURRENT: KVM accounts that open period as running, up to now), before the
    clock is read: the destination then accounts only the stop as runnable. False reads
    RUNSTATE_DATA as it is, as the seed does: the open period (the last KVM_RUN, and on a
    busy vCPU that rarely leaves KVM_RUN, everything since its last preemption) is then
    accounted as runnable on the destination. Either way the source vCPU should not run
    again."""
    t0 = time.perf_counter_ns()
    vcpu, vm = guest.vcpu, guest.vm
    vcpu.complete_pending_io()
    t1 = time.perf_counter_ns()
    regs, sregs, fpu = vcpu.get_regs(), vcpu.get_sregs(), vcpu.get_fpu()
    wanted = {name: index for name, index in MSRS.items()
              if index in guest.msr_indices}
    values = vcpu.get_msrs(list(wanted.values()))
    msrs = {name: values[index] for name, index in wanted.items()}
    tsc_khz = vcpu.get_tsc_khz()
    if guest.config.xen and close_runstate:
        # Right before the clock reading: the runnable period starts this close to it.
        vcpu.xen_set_attr(xen.vcpu_attr_runstate_current(xen.RUNSTATE_RUNNABLE))
    t_clock = time.perf_counter_ns()
    clock = vm.get_clock()
    # The capture instant, kept once: KVM's own CLOCK_REALTIME reading where it gives one.
    realtime = (clock.realtime if clock.flags & lib.KVM_CLOCK_REALTIME
                else time.clock_gettime_ns(time.CLOCK_REALTIME))
    has_offset = vcpu.has_device_attr(lib.KVM_VCPU_TSC_CTRL, lib.KVM_VCPU_TSC_OFFSET)
    tsc_offset = vcpu.get_tsc_offset() if has_offset else None
    clock_guest = _get_clock_guest(guest)
    runstate = (xen.Runstate.from_attr(vcpu.xen_get_attr(
        lib.KVM_XEN_VCPU_ATTR_TYPE_RUNSTATE_DATA)) if guest.config.xen else None)
    t2 = time.perf_counter_ns()
    return VmState(
        memory_size=guest.memory.size,
        regs=struct_to_plain(regs), sregs=struct_to_plain(sregs), fpu=struct_to_plain(fpu),
        msrs=msrs, tsc_khz=tsc_khz, tsc_offset=tsc_offset,
        clock={"clock": clock.clock, "flags": clock.flags, "realtime": realtime,
               "host_tsc": clock.host_tsc},
        clock_guest=clock_guest, runstate=runstate,
        sequence=guest.last_snapshot.sequence if guest.last_snapshot else 0,
        # before_clock: from the capture's start to its instant (so the start is known too).
        timings={"complete_io": t1 - t0, "before_clock": t_clock - t0, "capture": t2 - t0})


def _get_clock_guest(guest: Guest) -> dict[str, Any] | None:
    try:
        return struct_to_plain(guest.vcpu.get_clock_guest())
    except KvmIoctlError as e:
        if e.errno in (errno.EINVAL, errno.ENOTTY):
            return None   # absent, or no master clock: the probe tells which
        raise


def prepare(kvm: System, config: GuestConfig, memory: GuestMemory) -> Guest:
    """A destination's VM made ahead of the state (at PREPARE): VM + memory slot on
    ``memory`` + vCPU with CPUID (+ Xen config when ``config.xen``), registers not set.
    restore(..., prepared=guest) later resumes the migrated guest in it, so the VM's
    creation is off the downtime path; ``guest.timings["create"]`` is what it cost."""
    _check_memory(memory, config.memory_size)
    t0 = time.perf_counter_ns()
    guest = Guest.with_memory(kvm, config, memory)
    guest.timings["create"] = time.perf_counter_ns() - t0
    return guest


def _check_memory(memory: GuestMemory, memory_size: int) -> None:
    if memory.closed:
        raise StateError("memory", "the guest memory is closed")
    if memory.size != memory_size:
        raise StateError("memory_size", f"{memory_size:#x} but the memory given has "
                         f"{memory.size:#x} bytes")


def _check_prepared(prepared: Guest, state: VmState, memory: GuestMemory) -> None:
    """The prepared VM fits the state: its memory, its size, Xen or not (StateError naming
    the state's field), and nothing restored into it yet."""
    if prepared.memory is not memory:
        raise StateError("memory", "the prepared VM's memory is not the memory given")
    if prepared.config.memory_size != state.memory_size:
        raise StateError("memory_size", f"{state.memory_size:#x} but the VM was prepared "
                         f"for {prepared.config.memory_size:#x} bytes")
    if prepared.config.xen != (state.runstate is not None):
        raise StateError("runstate", (
            "a Xen guest's state but the VM was prepared without Xen" if state.runstate
            else "no Xen runstate but the VM was prepared with Xen"))
    if prepared.vm.fd < 0:
        raise GuestError("the prepared VM is closed")
    if prepared.restore_record is not None or prepared.last_snapshot is not None:
        raise GuestError("the prepared VM was already restored into or run")


def restore(kvm: System, plan: RestorePlan, memory: GuestMemory, *,
            prepared: Guest | None = None) -> Guest:
    """A VM resuming ``plan.state``'s guest on ``memory`` (used as RAM, not copied): a new
    one, or ``prepared`` (from prepare(), on this ``memory``).

    ``plan`` comes from Strategy.check, so nothing about the host or the state is
    checked again; only ``memory`` and ``prepared`` are (StateError before any VM exists
    or any ioctl). The returned guest's ``restore_record`` says what was done
    (``timings["create"]`` is 0 for a prepared VM: its creation was prepare()'s); its
    first entry is the host bracket of the Snapshot its first run_until_snapshot()
    returns. A failure of the restore itself closes the guest, prepared or not (its state
    is then half-set); a refusal by the checks leaves a prepared VM as it was.
    """
    state, strategy = plan.state, plan.strategy
    _check_memory(memory, state.memory_size)
    if prepared is not None:
        _check_prepared(prepared, state, memory)

    t0 = time.perf_counter_ns()
    record = RestoreRecord(strategy=str(strategy))
    if prepared is None:
        config = GuestConfig(memory_size=state.memory_size, xen=state.runstate is not None)
        guest = Guest.with_memory(kvm, config, memory)
    else:
        guest = prepared
    try:
        t1 = time.perf_counter_ns()
        _restore_registers(guest, state, strategy)
        t2 = time.perf_counter_ns()
        if plan.tsc_khz is not None:
            # The rate before any TSC or clock figure is derived from it.
            guest.vcpu.set_tsc_khz(plan.tsc_khz)
            record.tsc_khz_set = plan.tsc_khz
        if strategy.clock == "guest":
            # kvmclock is then a function of guest TSC: the TSC must be in place first. Its
            # offset needs the master clock's host TSC, which 6.12 has only after a KVM_SET_CLOCK
            # or the first KVM_RUN (the v6 series turns it on at vCPU creation): so first
            # KVM_SET_CLOCK with REALTIME, as the series' own flow does; SET_CLOCK_GUEST then
            # sets the kvmclock from the guest TSC alone (docs/clock-guest.md).
            guest.vm.set_clock(state.clock["clock"], lib.KVM_CLOCK_REALTIME,
                               state.clock["realtime"])
            _restore_tsc(guest, state, strategy, record)
            guest.vcpu.set_clock_guest(plain_to_struct("struct pvclock_vcpu_time_info",
                                                       state.clock_guest))
        else:
            _restore_clock(guest, state, strategy)
            _restore_tsc(guest, state, strategy, record)
        t3 = time.perf_counter_ns()
        if strategy.runstate == "kernel":
            record.runstate_restored = _restore_runstate(guest, state)
        after = guest.vm.get_clock()
        record.clock_after = {"clock": after.clock, "flags": after.flags,
                              "realtime": after.realtime, "host_tsc": after.host_tsc}
        record.tsc_khz_destination = guest.vcpu.get_tsc_khz()
    except BaseException:
        guest.close()
        raise
    t4 = time.perf_counter_ns()
    record.timings = {"create": t1 - t0 if prepared is None else 0, "registers": t2 - t1, "clock_tsc": t3 - t2,
                      "runstate": t4 - t3}
    record.restore_ns = t4 - t0
    guest.restore_record = record
    if prepared is None:
        guest.timings["create"] = t1 - t0
    guest.timings["setup"] = t4 - t1
    return guest


def _restore_registers(guest: Guest, state: VmState, strategy: Strategy) -> None:
    vcpu = guest.vcpu
    vcpu.set_sregs(plain_to_struct("struct kvm_sregs", state.sregs))
    vcpu.set_regs(plain_to_struct("struct kvm_regs", state.regs))
    vcpu.set_fpu(plain_to_struct("struct kvm_fpu", state.fpu))
    # Host-initiated writes: kvmclock and steal time point at the carried pages again.
    msrs = {MSRS[name]: value for name, value in state.msrs.items()
            if name != "MSR_IA32_TSC_ADJUST" or strategy.tsc == "adjust"}
    vcpu.set_msrs(msrs)


def _restore_clock(guest: Guest, state: VmState, strategy: Strategy) -> None:
    if strategy.clock == "realtime":
        guest.vm.set_clock(state.clock["clock"], lib.KVM_CLOCK_REALTIME,
                           state.clock["realtime"])
    elif strategy.clock == "realtime-synced":
        # The source's realtime read on the destination's clock: KVM then advances the
        # kvmclock by the elapsed time alone, not by the hosts' clock difference too.
        assert state.synced_realtime_ns is not None   # Strategy.check
        guest.vm.set_clock(state.clock["clock"], lib.KVM_CLOCK_REALTIME,
                           state.synced_realtime_ns)
    elif strategy.clock == "plain":
        guest.vm.set_clock(state.clock["clock"])


def _restore_tsc(guest: Guest, state: VmState, strategy: Strategy,
                 record: RestoreRecord) -> None:
    """tsc=offset, devices/vcpu.rst: with (tsc_src, guest_src, ofs_src) from the source
    and (tsc_dst, guest_dst) from KVM_GET_CLOCK here,
        ofs_dst = ofs_src + (guest_dst - guest_src) * freq + (tsc_src - tsc_dst),
    i.e. the guest TSC advances exactly as the (restored) kvmclock did. With
    clock=guest, CLOCK_REALTIME measures the gap."""
    if strategy.tsc != "offset":
        return
    assert state.tsc_offset is not None
    now = guest.vm.get_clock()
    if strategy.clock == "guest":
        elapsed_ns = now.realtime - state.clock["realtime"]
        if elapsed_ns < 0:
            # The destination's realtime is behind the capture: a TSC that followed it
            # would go back (below zero: the guest's kvmclock then lands centuries ahead).
            # No gap is carried instead, as KVM_SET_CLOCK does for a realtime in its future;
            # the gap verdicts fail and the record says why.
            record.tsc_gap_clamped_ns = elapsed_ns
            elapsed_ns = 0
    else:
        elapsed_ns = now.clock - state.clock["clock"]
    offset = (state.tsc_offset + elapsed_ns * state.tsc_khz // 1_000_000
              + state.clock["host_tsc"] - now.host_tsc) & MASK64
    guest.vcpu.set_tsc_offset(offset)
    record.tsc_offset_requested = offset
    record.tsc_offset_applied = guest.vcpu.get_tsc_offset()


def _restore_runstate(guest: Guest, state: VmState) -> xen.Runstate:
    """As the seed: RUNSTATE_DATA with the state forced to runnable (capture() has already
    made it so, unless close_runstate=False), so the first vcpu_load accounts
    (kvmclock now - state_entry_time) as runnable. Needs the kvmclock restored first:
    KVM refuses an entry time in the future with EINVAL (clock=none does exactly that). And
    last: a kernel without the 2026 negative-delta fix (6.12.95, docs/xen-lane.md) accounts a
    kvmclock set back after this as a huge (u64-wrapped) time at the next switch."""
    assert state.runstate is not None
    runstate = dataclasses.replace(state.runstate, state=xen.RUNSTATE_RUNNABLE)
    try:
        guest.vcpu.xen_set_attr(xen.vcpu_attr_runstate_data(runstate))
    except KvmIoctlError as exc:
        if exc.errno != errno.EINVAL:
            raise
        # Say which of KVM's EINVAL cases it is when the figures show it: a kvmclock behind
        # the entry time (between hosts: a destination clock behind the source's, carried by
        # clock=realtime).
        now = guest.vm.get_clock().clock
        behind = runstate.state_entry_time - now
        why = (f"RUNSTATE_DATA: the kvmclock as restored ({now} ns) is {behind / 1e6:.3f} ms "
               f"behind the runstate's entry time ({runstate.state_entry_time} ns)"
               if behind > 0 else "RUNSTATE_DATA")
        raise KvmIoctlError("KVM_XEN_VCPU_SET_ATTR", exc.errno, why) from None
    return runstate

"""Argument packing for KVM's Xen emulation (Documentation/virt/kvm/api.rst, arch/x86/kvm/xen.c).

Pure functions that build the ioctl arguments, so their layout is unit-tested
on any host; the ioctls themselves are the ``xen_*`` methods of Vm and Vcpu
and need ``KVM_CAP_XEN_HVM``.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass, field
from typing import Any

from ._kvm import ffi, lib
from ._schema import CHECK, check_int, check_record, dataclass_spec

RUNSTATE_RUNNING, RUNSTATE_RUNNABLE, RUNSTATE_BLOCKED, RUNSTATE_OFFLINE = range(4)
# The guest's vcpu_runstate_info as KVM writes it (KVM_XEN_ATTR_TYPE_LONG_MODE selects):
# 64-bit: u32 state, 4 bytes of padding, u64 state_entry_time, u64 time[4] (0x30 bytes);
# 32-bit (compat): the same fields packed (0x2c bytes).
RUNSTATE_AREA_FORMAT = {True: "<I4xQ4Q", False: "<IQ4Q"}
RUNSTATE_AREA_SIZE = {mode: struct.calcsize(fmt) for mode, fmt in RUNSTATE_AREA_FORMAT.items()}
# RUNSTATE_ADJUST's "leave this field alone" value for state.
RUNSTATE_ADJUST_KEEP_STATE = (1 << 64) - 1

# KVM_CAP_XEN_HVM's bits, by name (bit order).
HVM_FLAG_NAMES = {
    "HYPERCALL_MSR": lib.KVM_XEN_HVM_CONFIG_HYPERCALL_MSR,
    "INTERCEPT_HCALL": lib.KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL,
    "SHARED_INFO": lib.KVM_XEN_HVM_CONFIG_SHARED_INFO,
    "RUNSTATE": lib.KVM_XEN_HVM_CONFIG_RUNSTATE,
    "EVTCHN_2LEVEL": lib.KVM_XEN_HVM_CONFIG_EVTCHN_2LEVEL,
    "EVTCHN_SEND": lib.KVM_XEN_HVM_CONFIG_EVTCHN_SEND,
    "RUNSTATE_UPDATE_FLAG": lib.KVM_XEN_HVM_CONFIG_RUNSTATE_UPDATE_FLAG,
    "PVCLOCK_TSC_UNSTABLE": lib.KVM_XEN_HVM_CONFIG_PVCLOCK_TSC_UNSTABLE,
    "SHARED_INFO_HVA": lib.KVM_XEN_HVM_CONFIG_SHARED_INFO_HVA,
}


def hvm_flag_names(bits: int) -> list[str]:
    """Names of the KVM_CAP_XEN_HVM bits set in ``bits``; unknown bits as ``BIT<n>``."""
    names = [name for name, bit in HVM_FLAG_NAMES.items() if bits & bit]
    known = sum(HVM_FLAG_NAMES.values())
    names += [f"BIT{n}" for n in range(32) if bits & ~known & (1 << n)]
    return names


def check_u32(value: Any, path: str) -> None:
    check_int(value, path, 0, (1 << 32) - 1)


@dataclass(frozen=True)
class Runstate:
    """The vCPU's Xen runstate accounting (ns of kvmclock), in its one typed form: what
    capture reads (RUNSTATE_DATA), the VmState and the REPORT carry, restore writes back,
    the guest's report holds and the analysis compares. Every other form -- the cffi
    attribute, the guest's runstate area, the wire dict -- converts here.

    KVM's invariant: ``state_entry_time == sum of the four times``.
    """

    state: int = field(metadata={CHECK: check_u32})   # a u32 in every layout
    state_entry_time: int
    time_running: int
    time_runnable: int
    time_blocked: int
    time_offline: int

    def to_plain(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_plain(cls, plain: Any, path: str = "runstate") -> Runstate:
        """The wire form, validated exactly (six u64 fields, no other); StateError names
        the field."""
        check_record(plain, path, dataclass_spec(cls))
        return cls(**plain)

    @classmethod
    def from_attr(cls, attr: Any) -> Runstate:
        """From KVM_XEN_VCPU_GET_ATTR's RUNSTATE_DATA (struct kvm_xen_vcpu_attr)."""
        rs = attr.u.runstate
        return cls(rs.state, rs.state_entry_time, rs.time_running, rs.time_runnable,
                   rs.time_blocked, rs.time_offline)

    @classmethod
    def from_guest(cls, info: Any) -> Runstate:
        """From the guest's copy of its runstate area (struct kvmcore_runstate_info in the
        report page: zeros unless the VM is Xen-configured)."""
        return cls(info.state, info.state_entry_time, *info.time)


def parse_runstate_area(data: bytes, long_mode: bool) -> Runstate:
    """The guest's runstate area (RUNSTATE_AREA_SIZE[long_mode] bytes) as a Runstate."""
    return Runstate(*struct.unpack(RUNSTATE_AREA_FORMAT[long_mode], data))


# The project's bound on the Xen runnable delta a migration adds (docs/xen-lane.md).
# kvmcore's capture() closes the running period first (RUNSTATE_CURRENT = runnable, then
# KVM_GET_CLOCK), so the runnable period starts at the captured runstate's entry time, at
# most ``open_ns`` = captured kvmclock - entry time before the capture's clock reading, and
# ends at the destination's first vcpu_load, inside its first KVM_RUN. With the kvmclock
# carried by CLOCK_REALTIME (clock=realtime) the kernel must therefore account
#     wall_gap + open_ns  <=  delta runnable  <=  wall_gap + open_ns + first_entry_ns
# where wall_gap runs from the capture's clock reading to just before the first KVM_RUN
# and first_entry_ns is that KVM_RUN's duration until the guest's report. Allowed on top:
# the clock-sync uncertainty between two hosts, kvmclock's rate against CLOCK_REALTIME
# (1000 ppm, as kvmcore.analysis) and 50 us of reading granularity.
RUNNABLE_SLACK_NS = 50_000
RUNNABLE_SLACK_PPM = 1000


def runnable_window(wall_gap_ns: int, first_entry_ns: int, open_ns: int = 0,
                    uncertainty_ns: int = 0,
                    slack_ppm: int = RUNNABLE_SLACK_PPM) -> tuple[int, int]:
    """[lo, hi] the Xen runnable delta of a migration must lie in (the bound above)."""
    lo = wall_gap_ns + open_ns
    hi = lo + first_entry_ns
    slack = RUNNABLE_SLACK_NS + uncertainty_ns + abs(hi) * slack_ppm // 1_000_000
    return lo - slack, hi + slack


def hvm_config(msr: int, flags: int = 0) -> Any:
    """KVM_XEN_HVM_CONFIG: ``msr`` is the hypercall-page MSR; configuring it makes KVM
    switch the runstate to running at vcpu_load, which is what accounts steal."""
    return ffi.new("struct kvm_xen_hvm_config *", {"flags": flags, "msr": msr})


def hvm_attr_long_mode(long_mode: bool) -> Any:
    """KVM_XEN_ATTR_TYPE_LONG_MODE: selects the 64-bit guest layouts (runstate 0x30 bytes)."""
    return ffi.new("struct kvm_xen_hvm_attr *",
                   {"type": lib.KVM_XEN_ATTR_TYPE_LONG_MODE, "u": {"long_mode": int(long_mode)}})


def hvm_attr_shared_info(gfn: int) -> Any:
    """KVM_XEN_ATTR_TYPE_SHARED_INFO: guest frame number of the shared_info page."""
    return ffi.new("struct kvm_xen_hvm_attr *",
                   {"type": lib.KVM_XEN_ATTR_TYPE_SHARED_INFO,
                    "u": {"shared_info": {"gfn": gfn}}})


def hvm_attr_query(attr_type: int) -> Any:
    """An empty VM attribute of ``attr_type`` for KVM_XEN_HVM_GET_ATTR to fill."""
    return ffi.new("struct kvm_xen_hvm_attr *", {"type": attr_type})


def vcpu_attr_runstate_addr(gpa: int) -> Any:
    """KVM_XEN_VCPU_ATTR_TYPE_RUNSTATE_ADDR: where KVM writes the vCPU's runstate area."""
    return ffi.new("struct kvm_xen_vcpu_attr *",
                   {"type": lib.KVM_XEN_VCPU_ATTR_TYPE_RUNSTATE_ADDR, "u": {"gpa": gpa}})


def vcpu_attr_runstate_current(state: int) -> Any:
    """KVM_XEN_VCPU_ATTR_TYPE_RUNSTATE_CURRENT: switch state now (EINVAL if > offline)."""
    return ffi.new("struct kvm_xen_vcpu_attr *",
                   {"type": lib.KVM_XEN_VCPU_ATTR_TYPE_RUNSTATE_CURRENT,
                    "u": {"runstate": {"state": state}}})


def vcpu_attr_runstate_data(rs: Runstate) -> Any:
    """KVM_XEN_VCPU_ATTR_TYPE_RUNSTATE_DATA: replace the whole accounting (migration)."""
    return ffi.new("struct kvm_xen_vcpu_attr *",
                   {"type": lib.KVM_XEN_VCPU_ATTR_TYPE_RUNSTATE_DATA,
                    "u": {"runstate": rs.to_plain()}})


def vcpu_attr_runstate_adjust(state: int, *, running: int = 0, runnable: int = 0,
                              blocked: int = 0, offline: int = 0,
                              entry_time: int = 0) -> Any:
    """KVM_XEN_VCPU_ATTR_TYPE_RUNSTATE_ADJUST: add signed deltas to the times (two's
    complement in u64); ``state`` may be RUNSTATE_ADJUST_KEEP_STATE."""
    mask = (1 << 64) - 1
    return ffi.new("struct kvm_xen_vcpu_attr *",
                   {"type": lib.KVM_XEN_VCPU_ATTR_TYPE_RUNSTATE_ADJUST,
                    "u": {"runstate": {"state": state, "state_entry_time": entry_time & mask,
                                       "time_running": running & mask,
                                       "time_runnable": runnable & mask,
                                       "time_blocked": blocked & mask,
                                       "time_offline": offline & mask}}})


def vcpu_attr_query(attr_type: int) -> Any:
    """An empty vCPU attribute of ``attr_type`` for KVM_XEN_VCPU_GET_ATTR to fill."""
    return ffi.new("struct kvm_xen_vcpu_attr *", {"type": attr_type})

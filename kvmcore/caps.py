"""What this host's KVM can do for a migration, probed on the real kernel.

Some answers exist only once a vCPU has run with kvmclock enabled (the master
clock, KVM_GET_CLOCK_GUEST), and one only shows in the guest itself (whether
KVM_VCPU_TSC_OFFSET moves the guest's TSC), so the probe runs the guest
program briefly in a throwaway VM, closed before probe() returns.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import xen
from ._kvm import lib
from .errors import KvmIoctlError
from .guest import Guest, GuestConfig
from ._schema import check_record, dataclass_spec, list_of, one_of

if TYPE_CHECKING:
    from .system import System

MSR_IA32_TSC_ADJUST = 0x3B
CLOCK_FLAG_NAMES = {"TSC_STABLE": lib.KVM_CLOCK_TSC_STABLE, "REALTIME": lib.KVM_CLOCK_REALTIME,
                    "HOST_TSC": lib.KVM_CLOCK_HOST_TSC}
# An offset the guest cannot miss: 2^40 ticks is minutes at any TSC frequency.
_PROBE_TSC_OFFSET = 1 << 40


DIRTY_LOG_MANUAL_NAMES = {"MANUAL_PROTECT_ENABLE": lib.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
                          "INITIALLY_SET": lib.KVM_DIRTY_LOG_INITIALLY_SET}


def clock_flag_names(flags: int) -> list[str]:
    return [name for name, bit in CLOCK_FLAG_NAMES.items() if flags & bit]


def dirty_log_manual_names(bits: int) -> list[str]:
    return [name for name, bit in DIRTY_LOG_MANUAL_NAMES.items() if bits & bit]


@dataclass(frozen=True)
class HostCapabilities:
    """The probe's result; ``to_plain()`` is the stable document (``probe --json``)."""

    kernel_release: str
    kvm_modules: list[str]          # /sys/module/kvm* (e.g. kvm_pvm, kvm_amd)
    api_version: int
    clocksource: str
    tsc_khz: int                    # KVM_GET_TSC_KHZ of a fresh vCPU
    master_clock: bool              # KVM_GET_CLOCK reports TSC_STABLE once a vCPU ran
    get_clock_flags: list[str]      # KVM_GET_CLOCK flags then
    adjust_clock_flags: list[str]   # KVM_CAP_ADJUST_CLOCK: the kvm_clock_data flags KVM knows
    xen_hvm: list[str]              # KVM_CAP_XEN_HVM bits by name ([] = no Xen emulation)
    clock_guest: bool | None        # KVM_GET_CLOCK_GUEST present (None: could not tell)
    clock_guest_detail: str
    tsc_offset_attr: bool           # KVM_HAS_DEVICE_ATTR(KVM_VCPU_TSC_CTRL, TSC_OFFSET)
    tsc_offset_applies: bool        # ... and the guest's rdtsc actually moves with it
    tsc_offset_detail: str
    tsc_scale_attr: bool            # KVM_VCPU_TSC_SCALE (CLOCK_GUEST series v6)
    tsc_control: bool               # KVM_CAP_TSC_CONTROL (KVM_SET_TSC_KHZ scaling)
    tsc_adjust_msr: bool            # MSR_IA32_TSC_ADJUST in KVM_GET_MSR_INDEX_LIST
    kvmclock: bool                  # CPUID KVM_FEATURE_CLOCKSOURCE2
    kvmclock_stable_bit: bool       # CPUID KVM_FEATURE_CLOCKSOURCE_STABLE_BIT
    steal_time: bool                # CPUID KVM_FEATURE_STEAL_TIME
    dirty_log: bool                 # KVM_GET_DIRTY_LOG saw the probe guest's report page
    dirty_log_manual_protect: list[str]  # KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 bits ([] = no
                                         # KVM_CLEAR_DIRTY_LOG)
    dirty_log_ring: int             # KVM_CAP_DIRTY_LOG_RING: max ring bytes (0 = none)

    @property
    def xen_runstate(self) -> bool:
        return {"SHARED_INFO", "RUNSTATE"} <= set(self.xen_hvm)

    def to_plain(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_plain(cls, plain: Any, path: str = "capabilities") -> HostCapabilities:
        """For a peer's capabilities received over the wire: exact keys, each value of its
        field's type (and a known flag name where the kernel defines the names); StateError
        names the first bad field, before anything reads it."""
        spec = dict(dataclass_spec(cls))
        for name in ("get_clock_flags", "adjust_clock_flags"):
            spec[name] = list_of(one_of(CLOCK_FLAG_NAMES))
        spec["dirty_log_manual_protect"] = list_of(one_of(DIRTY_LOG_MANUAL_NAMES))
        check_record(plain, path, spec)
        return cls(**plain)


def probe(kvm: System) -> HostCapabilities:
    """Probe the host. Leaves no VM behind (the probe guest is closed on every path)."""
    cpuid = kvm.supported_cpuid()
    kvm_features = next((e.eax for e in cpuid.entries[0:cpuid.nent]
                         if e.function == lib.KVM_CPUID_FEATURES), 0)
    manual_bits = kvm.check_extension(lib.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)

    with Guest.create(kvm, GuestConfig()) as g:
        vcpu = g.vcpu
        tsc_khz = vcpu.get_tsc_khz()
        first = g.run_until_snapshot()           # kvmclock now enabled by the guest
        clock_flags = int(g.vm.get_clock().flags)
        master_clock = bool(clock_flags & lib.KVM_CLOCK_TSC_STABLE)
        clock_guest, clock_guest_detail = _probe_clock_guest(g, master_clock)
        tsc_offset_attr = vcpu.has_device_attr(lib.KVM_VCPU_TSC_CTRL, lib.KVM_VCPU_TSC_OFFSET)
        tsc_scale_attr = vcpu.has_device_attr(lib.KVM_VCPU_TSC_CTRL, lib.KVM_VCPU_TSC_SCALE)
        applies, offset_detail = (_probe_tsc_offset(g, first.tsc) if tsc_offset_attr
                                  else (False, "no such vCPU attribute (ENXIO)"))
        dirty_log = _probe_dirty_log(g)

    return HostCapabilities(
        kernel_release=os.uname().release,
        kvm_modules=_kvm_modules(),
        api_version=kvm.api_version(),
        clocksource=_read("/sys/devices/system/clocksource/clocksource0/current_clocksource"),
        tsc_khz=tsc_khz,
        master_clock=master_clock,
        get_clock_flags=clock_flag_names(clock_flags),
        adjust_clock_flags=clock_flag_names(kvm.check_extension(lib.KVM_CAP_ADJUST_CLOCK)),
        xen_hvm=xen.hvm_flag_names(kvm.check_extension(lib.KVM_CAP_XEN_HVM)),
        clock_guest=clock_guest,
        clock_guest_detail=clock_guest_detail,
        tsc_offset_attr=tsc_offset_attr,
        tsc_offset_applies=applies,
        tsc_offset_detail=offset_detail,
        tsc_scale_attr=tsc_scale_attr,
        tsc_control=bool(kvm.check_extension(lib.KVM_CAP_TSC_CONTROL)),
        tsc_adjust_msr=MSR_IA32_TSC_ADJUST in kvm.msr_index_list(),
        kvmclock=bool(kvm_features & (1 << lib.KVM_FEATURE_CLOCKSOURCE2)),
        kvmclock_stable_bit=bool(kvm_features & (1 << lib.KVM_FEATURE_CLOCKSOURCE_STABLE_BIT)),
        steal_time=bool(kvm_features & (1 << lib.KVM_FEATURE_STEAL_TIME)),
        dirty_log=dirty_log,
        dirty_log_manual_protect=dirty_log_manual_names(manual_bits),
        dirty_log_ring=kvm.check_extension(lib.KVM_CAP_DIRTY_LOG_RING),
    )


def _probe_dirty_log(g: Guest) -> bool:
    """Dirty logging has no capability of its own (KVM_MEM_LOG_DIRTY_PAGES is as old as
    memory slots), so ask the kernel: log one guest report and look for its page."""
    try:
        g.start_dirty_log()
        g.run_until_snapshot()
        return lib.KVMCORE_REPORT_GPA // lib.KVMCORE_PAGE_SIZE in g.dirty_bitmap().pages()
    except KvmIoctlError:
        return False
    finally:
        g.stop_dirty_log()


def _probe_clock_guest(g: Guest, master_clock: bool) -> tuple[bool | None, str]:
    """On x86 an unknown vCPU ioctl is EINVAL, and so is GET_CLOCK_GUEST without the
    master clock: the answer means "absent" only on a vCPU that ran with kvmclock while
    KVM_GET_CLOCK reports TSC_STABLE."""
    numbers = (f"KVM_GET_CLOCK_GUEST {lib.KVM_GET_CLOCK_GUEST:#x}, "
               f"KVM_SET_CLOCK_GUEST {lib.KVM_SET_CLOCK_GUEST:#x}")
    try:
        g.vcpu.get_clock_guest()
    except KvmIoctlError as e:
        name = errno.errorcode.get(e.errno, str(e.errno))
        if e.errno in (errno.EINVAL, errno.ENOTTY) and master_clock:
            return False, f"KVM_GET_CLOCK_GUEST: {name} with the master clock on ({numbers})"
        return None, (f"KVM_GET_CLOCK_GUEST: {name}, master clock "
                      f"{'on' if master_clock else 'off'} ({numbers})")
    return True, f"KVM_GET_CLOCK_GUEST returned the vCPU's pvclock ({numbers})"


def _probe_tsc_offset(g: Guest, tsc_before: int) -> tuple[bool, str]:
    """Set a large offset and see whether the guest's next rdtsc includes it: some KVM
    implementations (PVM) accept the attribute but leave the guest on the host TSC."""
    vcpu = g.vcpu
    base = vcpu.get_tsc_offset()
    vcpu.set_tsc_offset(base + _PROBE_TSC_OFFSET)
    readback = vcpu.get_tsc_offset()
    seen = g.run_until_snapshot().tsc - tsc_before
    applies = seen >= _PROBE_TSC_OFFSET
    detail = (f"set offset {base:#x}+2^40: reads back {readback:#x}, guest TSC advanced "
              f"{seen} ticks ({'includes' if applies else 'does not include'} the offset)")
    return applies, detail


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as e:
        return f"unknown ({e.strerror})"


def _kvm_modules() -> list[str]:
    try:
        return sorted(m for m in os.listdir("/sys/module") if m.startswith("kvm"))
    except OSError:
        return []


def render_table(caps: HostCapabilities) -> str:
    """The readable form for `python -m kvmcore probe`."""
    rows = caps.to_plain()
    width = max(map(len, rows))

    def fmt(value: Any) -> str:
        if isinstance(value, list):
            return ", ".join(value) or "-"
        if value is None:
            return "unknown"
        return str(value)

    return "\n".join(f"{key:<{width}}  {fmt(value)}" for key, value in rows.items())

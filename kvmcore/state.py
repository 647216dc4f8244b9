"""VmState: everything a destination needs to resume the guest, as plain msgpack-ready data.

Guest memory is not part of it: it stays the guest's (``Guest.memory``) on the
source and travels separately, in chunks, into a GuestMemory the destination
allocates only after it has checked this document -- ``from_plain(plain)``
validates every field (names, types, ranges, the format version and the memory
size) and raises StateError naming the field before anything is allocated or
touches KVM.

Kernel structs (kvm_regs, kvm_sregs, kvm_fpu, pvclock_vcpu_time_info) travel
as dicts of their fields, converted by walking the cffi types, so the wire
form follows the compiler-checked layout with no hand-written field lists.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ._kvm import lib
from ._layout import memory_size_problem
from ._schema import describe, check_int, check_record, check_u64, optional
from .errors import StateError
from .xen import Runstate

#: The version of the documents kvmcore puts on the wire: this VmState (in MIGRATE) and the
#: DestinationReport that answers it (in REPORT, kvmcore.report_doc). A destination refuses
#: a state of another version before anything else, so one number covers both.
#: 2: no guest_tsc (derivable from tsc_offset and clock.host_tsc, and never read) and no Xen
#: layout fields (the guest program's ABI fixes them; restore never read the carried ones).
#: 3: the runstate is a top-level ``runstate`` (xen.Runstate's fields), no ``xen`` wrapper;
#: no capture_realtime_ns (clock.realtime is the capture instant) and no timings (the
#: source's own); the REPORT has no capabilities and nothing twice (kvmcore.report_doc).
#: 4: ``clock_sync``, the source's clock-sync estimate of the destination's clock (for
#: clock=realtime-synced); the REPORT's restore_record has ``tsc_khz_set``.
FORMAT_VERSION = 4

MSR_IA32_TSC_ADJUST = 0x3B
# The MSRs a VmState may carry, by the names the wire uses.
MSRS = {
    "MSR_KVM_SYSTEM_TIME_NEW": lib.MSR_KVM_SYSTEM_TIME_NEW,   # kvmclock page + enable
    "MSR_KVM_STEAL_TIME": lib.MSR_KVM_STEAL_TIME,             # steal record + enable
    "MSR_IA32_TSC_ADJUST": MSR_IA32_TSC_ADJUST,               # for tsc=adjust (the seed)
}


def check_msrs(value: Any, path: str) -> None:
    if not isinstance(value, dict):
        raise StateError(path, f"expected a dict, got {describe(value)}")
    for key, data in value.items():
        if key not in MSRS:
            raise StateError(f"{path}.{key}", f"unknown MSR (known: {', '.join(MSRS)})")
        check_int(data, f"{path}.{key}")
    for key in ("MSR_KVM_SYSTEM_TIME_NEW", "MSR_KVM_STEAL_TIME"):
        if key not in value:
            raise StateError(f"{path}.{key}", "missing")


CLOCK_SPEC = {"clock": check_u64, "flags": check_u64, "realtime": check_u64,
              "host_tsc": check_u64}


#: |offset| bound: far beyond any real pair of clocks, and far from u64 overflow.
MAX_CLOCK_OFFSET_NS = 1 << 62
CLOCK_SYNC_SPEC = {
    "offset_ns": lambda v, path: check_int(v, path, -MAX_CLOCK_OFFSET_NS, MAX_CLOCK_OFFSET_NS),
    "uncertainty_ns": check_u64,
}


def check_runstate(value: Any, path: str) -> None:
    Runstate.from_plain(value, path)


@dataclass
class VmState:
    """A captured guest: everything but its memory (module docstring)."""

    memory_size: int
    regs: dict[str, Any]                 # struct kvm_regs
    sregs: dict[str, Any]                # struct kvm_sregs
    fpu: dict[str, Any]                  # struct kvm_fpu (the guest uses none; carried anyway)
    msrs: dict[str, int]                 # by name, see MSRS
    tsc_khz: int                         # KVM_GET_TSC_KHZ at the source
    tsc_offset: int | None               # KVM_VCPU_TSC_OFFSET (None: no such attribute)
    #: KVM_GET_CLOCK: clock, flags, realtime, host_tsc. ``realtime`` is the capture instant
    #: (CLOCK_REALTIME): KVM's own reading with KVM_CLOCK_REALTIME in flags, else capture()'s
    #: clock_gettime right after the ioctl.
    clock: dict[str, int]
    clock_guest: dict[str, Any] | None   # KVM_GET_CLOCK_GUEST's pvclock, where present
    #: RUNSTATE_DATA, Xen guests only (None: not Xen-configured). Only what the source's KVM
    #: knows and the guest's memory does not: the Xen layout (hypercall MSR, shared_info and
    #: runstate GPAs, 64-bit mode) is the guest program's ABI (abi.h), the same at both ends.
    runstate: Runstate | None
    sequence: int                        # guest's last reported sequence number
    #: The source's estimate of the destination's CLOCK_REALTIME minus its own, from the
    #: protocol's clock sync at the handshake: {offset_ns, uncertainty_ns} (None: not
    #: measured, as capture() leaves it; the source agent sets it before MIGRATE). Only the
    #: source can know it -- the destination sees t2/t3 of the exchanges, never t4 -- so it
    #: travels in the MIGRATE's state, checked with it; clock=realtime-synced reads it.
    clock_sync: dict[str, int] | None = None
    #: capture()'s phases (ns), for the source's own report: not on the wire (no destination
    #: reads them), so a state from the wire has none.
    timings: dict[str, int] = field(default_factory=dict, compare=False)
    format_version: int = FORMAT_VERSION

    SPEC = {
        "format_version": check_u64,
        "memory_size": check_u64,
        "regs": "struct kvm_regs",
        "sregs": "struct kvm_sregs",
        "fpu": "struct kvm_fpu",
        "msrs": check_msrs,
        "tsc_khz": check_u64,
        "tsc_offset": optional(check_u64),
        "clock": CLOCK_SPEC,
        "clock_guest": optional("struct pvclock_vcpu_time_info"),
        "runstate": optional(check_runstate),
        "sequence": check_u64,
        "clock_sync": optional(CLOCK_SYNC_SPEC),
    }

    @property
    def capture_realtime_ns(self) -> int:
        """CLOCK_REALTIME of the capture: ``clock["realtime"]``, the one place it is kept."""
        return self.clock["realtime"]

    @property
    def synced_realtime_ns(self) -> int | None:
        """The capture instant in the destination's timescale (capture realtime + the
        clock-sync offset), what clock=realtime-synced gives KVM_SET_CLOCK; None without an
        estimate or outside u64."""
        if self.clock_sync is None:
            return None
        value = self.clock["realtime"] + self.clock_sync["offset_ns"]
        return value if 0 <= value < 1 << 64 else None

    def to_plain(self) -> dict[str, Any]:
        """As str-keyed dicts of ints, bytes, bools and None (msgpack-ready)."""
        plain = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                 if f.name != "timings"}
        plain["runstate"] = self.runstate and self.runstate.to_plain()
        return plain

    @classmethod
    def from_plain(cls, plain: Any) -> VmState:
        """Validate ``plain`` (from the wire); StateError on the first problem, naming the
        field. Allocates nothing and creates nothing in KVM."""
        if not isinstance(plain, dict):
            raise StateError("<state>", f"expected a dict, got {describe(plain)}")
        # The version first: a future format may differ in every other field.
        if "format_version" not in plain:
            raise StateError("format_version", "missing")
        if plain["format_version"] != FORMAT_VERSION or isinstance(plain["format_version"],
                                                                   bool):
            raise StateError("format_version", f"{plain['format_version']!r} is not the "
                             f"supported version {FORMAT_VERSION}")
        check_record(plain, "state", cls.SPEC)
        size = plain["memory_size"]
        problem = memory_size_problem(size)
        if problem:
            raise StateError("memory_size", problem)
        runstate = plain["runstate"]
        return cls(**{**plain, "runstate": runstate and Runstate(**runstate)})

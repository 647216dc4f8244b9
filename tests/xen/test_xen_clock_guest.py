"""KVM_[GS]ET_CLOCK_GUEST, the seed's clock ioctls, run for real: the rules of the proposed UAPI
(kernel-facts.md), each with its control, on the lane kernel with the project's reference
implementation (`./dev lane --clock-guest`, tools/clock_guest/, docs/clock-guest.md).

Only there do they run: a kernel without the ioctls skips them naming KVM_GET_CLOCK_GUEST, and a lane
booted with the patched modules (KVM_TESTBED_CLOCK_GUEST=patched) that does not have them fails.
"""
from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import Any

import pytest
from xen_lane_probe import CLOCK_GUEST_UNSUPPORTED as UNSUPPORTED
from xen_lane_probe import clock_guest_patched, in_lane

from kvmcore import Guest, GuestConfig, KvmIoctlError, System, probe
from kvmcore._kvm import lib
from kvmcore._schema import plain_to_struct, struct_to_plain
from kvmcore.snapshot import pvclock_ns

PATCHED = clock_guest_patched()
PVTI = "struct pvclock_vcpu_time_info"


def _host_has_clock_guest() -> bool:
    """Outside the lane, the host's own answer (probed; the lane probes in the fixture instead,
    so that no VM is created and destroyed at collection there: docs/xen-lane.md, static keys)."""
    try:
        with System() as kvm:
            return bool(probe(kvm).clock_guest)
    except Exception:
        return False


pytestmark = pytest.mark.xen_lane
needs_clock_guest = pytest.mark.skipif(not in_lane() and not _host_has_clock_guest(),
                                       reason=UNSUPPORTED)


def test_probe_reports_clock_guest() -> None:
    """The probe finds the ioctls exactly when the lane loaded the patched modules: true with
    `--clock-guest`, false on Debian's own (each run is the other's negative control)."""
    with System() as kvm:
        caps = probe(kvm)
    print(f"clock_guest: {caps.clock_guest} ({caps.clock_guest_detail}); patched modules: {PATCHED}")
    assert caps.clock_guest is PATCHED, caps.clock_guest_detail


@pytest.fixture
def guest(clock_guest_kvm: System) -> Iterator[Guest]:
    """A guest that has run with kvmclock on (the master clock is then in use)."""
    with Guest.create(clock_guest_kvm, GuestConfig()) as g:
        g.run_until_snapshot()
        yield g


def get(g: Guest) -> dict[str, Any]:
    return struct_to_plain(g.vcpu.get_clock_guest())


def set_(g: Guest, record: dict[str, Any]) -> None:
    g.vcpu.set_clock_guest(plain_to_struct(PVTI, record))


def ns_at(record: dict[str, Any], tsc: int) -> int:
    return pvclock_ns(record["system_time"], record["tsc_timestamp"], record["tsc_to_system_mul"],
                      record["tsc_shift"], tsc)


def errno_of_set(g: Guest, record: dict[str, Any]) -> int:
    """0 if KVM_SET_CLOCK_GUEST accepted ``record``, else its errno."""
    try:
        set_(g, record)
    except KvmIoctlError as e:
        return e.errno
    return 0


def at_khz(record: dict[str, Any], khz: int, delta_khz: float) -> dict[str, Any]:
    """The record with its multiplier scaled to imply a TSC of khz + delta_khz."""
    return record | {"tsc_to_system_mul": round(record["tsc_to_system_mul"] * khz
                                                / (khz + delta_khz))}


@needs_clock_guest
def test_get_returns_the_vcpus_record(guest: Guest) -> None:
    rec = get(guest)
    assert rec["flags"] & 1, "PVCLOCK_TSC_STABLE_BIT: the master clock is in use"
    assert rec["pad0"] == 0 and list(rec["pad"]) == [0, 0]
    # The record is the guest's kvmclock: its own last reading lies on it (to the ns).
    snap = guest.last_snapshot
    assert snap is not None and snap.tsc >= 0
    assert abs(ns_at(rec, snap.tsc) - snap.kvmclock_ns) <= 2, (rec, snap)


@needs_clock_guest
def test_get_einval_without_the_master_clock(guest: Guest) -> None:
    """A second vCPU whose TSC matches the first keeps the master clock (control: GET works on it);
    moving its TSC offset by 2^40 ends TSC matching, so the master clock: GET and SET are EINVAL."""
    rec = get(guest)
    second = guest.vm.create_vcpu(1)
    try:
        assert second.get_clock_guest().flags & 1  # controls: GET, and SET of the first's record
        second.set_clock_guest(plain_to_struct(PVTI, rec))
        second.set_tsc_offset(guest.vcpu.get_tsc_offset() + (1 << 40))
        with pytest.raises(KvmIoctlError) as e:
            second.get_clock_guest()
        assert e.value.errno == errno.EINVAL, e.value
        assert not guest.vm.get_clock().flags & lib.KVM_CLOCK_HOST_TSC  # master clock off
        # SET too: without the master clock the record is not the VM's kvmclock (the guest TSC is
        # now 2^40 ticks further ahead of the record, so the TSC rule cannot be what refuses it).
        with pytest.raises(KvmIoctlError) as e:
            second.set_clock_guest(plain_to_struct(PVTI, rec))
        assert e.value.errno == errno.EINVAL, e.value
    finally:
        second.close()


@needs_clock_guest
@pytest.mark.parametrize("change, want", [
    ({}, 0),                                   # control: the record as it came
    ({"pad0": 1}, errno.EINVAL),
    ({"pad": [1, 0]}, errno.EINVAL),
    ({"pad": [0, 1]}, errno.EINVAL),
    ({"tsc_to_system_mul": 0}, errno.EINVAL),
    ({"tsc_shift": 32}, errno.EINVAL),
    ({"tsc_shift": -32}, errno.EINVAL),
    ({"tsc_shift": 31}, errno.ERANGE),         # control: a shift in range passes the EINVAL rule
    ({"tsc_shift": -31}, errno.ERANGE),        # (and then implies a wildly wrong frequency)
], ids=lambda v: str(v) if not isinstance(v, dict) else ",".join(f"{k}={x}" for k, x in v.items())
   or "unchanged")
@needs_clock_guest
def test_set_field_rules(guest: Guest, change: dict[str, Any], want: int) -> None:
    assert errno_of_set(guest, get(guest) | change) == want


@needs_clock_guest
@pytest.mark.parametrize("delta_khz, want", [
    (0.4, 0), (-0.4, 0),                       # controls: within 1 kHz
    (3, errno.ERANGE), (-3, errno.ERANGE), (500, errno.ERANGE),
])
@needs_clock_guest
def test_set_erange_when_the_frequency_differs(guest: Guest, delta_khz: float, want: int) -> None:
    khz = guest.vcpu.get_tsc_khz()
    assert errno_of_set(guest, at_khz(get(guest), khz, delta_khz)) == want


@needs_clock_guest
@pytest.mark.parametrize("delta_khz, want", [
    (0, 0),                                    # control: the rate the record was taken at
    (2, errno.ERANGE), (-2, errno.ERANGE),     # the pair's machines, 2596121 and 2596119 kHz
    (-20, errno.ERANGE),                       # ... and 2596140 and 2596120 kHz (docs/pair.md)
])
def test_set_erange_on_a_vcpu_at_another_rate(guest: Guest, delta_khz: int, want: int) -> None:
    """Across two hosts: each kernel calibrates its own TSC rate, and without TSC scaling
    (KVM_CAP_TSC_CONTROL, which the lane lacks) the destination's vCPU keeps its host's rate, so
    the source's record implies a rate the vCPU does not have. Modelled on one host: the record
    as it came, after KVM_SET_TSC_KHZ moved the vCPU's rate by delta_khz (within KVM's 250 ppm
    tolerance it needs no scaling: the vCPU's rate becomes the one asked for)."""
    rec = get(guest)
    khz = guest.vcpu.get_tsc_khz()
    guest.vcpu.set_tsc_khz(khz + delta_khz)
    assert guest.vcpu.get_tsc_khz() == khz + delta_khz
    assert errno_of_set(guest, rec) == want


@needs_clock_guest
def test_set_einval_for_a_guest_tsc_before_the_timestamp(guest: Guest) -> None:
    rec = get(guest)
    before = get(guest)
    assert errno_of_set(guest, rec | {"tsc_timestamp": rec["tsc_timestamp"] + (1 << 40)}) \
        == errno.EINVAL
    after = get(guest)  # refused: the kvmclock did not move
    assert abs(ns_at(after, after["tsc_timestamp"]) - ns_at(before, after["tsc_timestamp"])) <= 2
    assert errno_of_set(guest, rec) == 0  # control: the record's own timestamp is in the past


def round_trip_error(guest: Guest, shift_ns: int) -> tuple[int, int]:
    """GET, SET (the record moved by shift_ns), then what the guest's own kvmclock read at its next
    report minus what the first record computes at that TSC; and the same for a second GET."""
    rec = get(guest)
    set_(guest, rec | {"system_time": rec["system_time"] + shift_ns})
    rec2 = get(guest)
    snap = guest.run_until_snapshot()
    probe_tsc = rec2["tsc_timestamp"] + 10**9
    return snap.kvmclock_ns - ns_at(rec, snap.tsc), ns_at(rec2, probe_tsc) - ns_at(rec, probe_tsc)


@needs_clock_guest
def test_round_trip_keeps_the_kvmclock(guest: Guest) -> None:
    """What pvclock_migration_test asserts: the same kvmclock within 2 ns at the same guest TSC.
    Negative control: a record moved by 1000 ns moves the guest's kvmclock by that much."""
    guest_err, record_err = round_trip_error(guest, 0)
    print(f"round trip: guest kvmclock error {guest_err} ns, record error {record_err} ns")
    assert abs(guest_err) <= 2 and abs(record_err) <= 2
    guest_err, record_err = round_trip_error(guest, 1000)
    assert abs(guest_err - 1000) <= 2 and abs(record_err - 1000) <= 2, (guest_err, record_err)

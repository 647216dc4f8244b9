"""The bindings: struct layouts vs ioctl encodings, errors, and Xen argument packing."""

from __future__ import annotations

import errno
import struct

import pytest
from common_helpers import open_fds

from kvmcore import KvmIoctlError, System, Unsupported, xen
from kvmcore._ioctl import ioctl, request_size
from kvmcore._kvm import ffi, lib

IOCTL_ARGS = {
    "KVM_GET_REGS": "struct kvm_regs", "KVM_SET_REGS": "struct kvm_regs",
    "KVM_GET_SREGS": "struct kvm_sregs", "KVM_SET_SREGS": "struct kvm_sregs",
    "KVM_GET_FPU": "struct kvm_fpu", "KVM_SET_FPU": "struct kvm_fpu",
    "KVM_GET_CLOCK": "struct kvm_clock_data", "KVM_SET_CLOCK": "struct kvm_clock_data",
    "KVM_SET_USER_MEMORY_REGION": "struct kvm_userspace_memory_region",
    "KVM_GET_MSRS": "struct kvm_msrs", "KVM_SET_MSRS": "struct kvm_msrs",
    "KVM_SET_CPUID2": "struct kvm_cpuid2", "KVM_GET_SUPPORTED_CPUID": "struct kvm_cpuid2",
    "KVM_HAS_DEVICE_ATTR": "struct kvm_device_attr",
    "KVM_GET_DEVICE_ATTR": "struct kvm_device_attr",
    "KVM_SET_DEVICE_ATTR": "struct kvm_device_attr",
    "KVM_XEN_HVM_CONFIG": "struct kvm_xen_hvm_config",
    "KVM_XEN_HVM_GET_ATTR": "struct kvm_xen_hvm_attr",
    "KVM_XEN_HVM_SET_ATTR": "struct kvm_xen_hvm_attr",
    "KVM_XEN_VCPU_GET_ATTR": "struct kvm_xen_vcpu_attr",
    "KVM_XEN_VCPU_SET_ATTR": "struct kvm_xen_vcpu_attr",
    "KVM_GET_CLOCK_GUEST": "struct pvclock_vcpu_time_info",
    "KVM_SET_CLOCK_GUEST": "struct pvclock_vcpu_time_info",
}


@pytest.mark.parametrize("name", sorted(IOCTL_ARGS))
def test_ioctl_size_field_matches_struct(name):
    assert request_size(name) == ffi.sizeof(IOCTL_ARGS[name])


def test_known_sizes_and_a_mismatch_is_visible():
    assert ffi.sizeof("struct kvm_regs") == 144
    assert ffi.sizeof("struct kvm_sregs") == 312
    assert ffi.sizeof("struct kvm_clock_data") == 48
    assert ffi.sizeof("struct pvclock_vcpu_time_info") == 32
    assert ffi.sizeof("struct kvmcore_runstate_info") == 0x30
    # Negative control: the size check distinguishes two different structs.
    assert request_size("KVM_GET_REGS") != ffi.sizeof("struct kvm_sregs")


def test_clock_guest_numbers_are_the_v4_v6_ones():
    # _IOR(KVMIO=0xAE, 0xd7, 32 bytes) / _IOW(..., 0xd6, ...): never the 2024 0xd5/0xd6.
    assert lib.KVM_GET_CLOCK_GUEST == (2 << 30) | (32 << 16) | (0xAE << 8) | 0xD7
    assert lib.KVM_SET_CLOCK_GUEST == (1 << 30) | (32 << 16) | (0xAE << 8) | 0xD6


def test_ioctl_error_names_ioctl_and_errno():
    with System() as kvm:
        with pytest.raises(KvmIoctlError) as info:
            ioctl(kvm.fd, "KVM_GET_REGS", ffi.new("struct kvm_regs *"))  # not a vCPU fd
    assert info.value.ioctl == "KVM_GET_REGS"
    assert "KVM_GET_REGS" in str(info.value) and errno.errorcode[info.value.errno] in str(
        info.value)


def test_clock_guest_absent_here(kvm, caps):
    if caps.clock_guest:
        pytest.skip("KVM_GET_CLOCK_GUEST present: the absent path cannot run here")
    from kvmcore import Guest, GuestConfig

    with Guest.create(kvm, GuestConfig()) as g:
        g.run_until_snapshot()
        with pytest.raises(KvmIoctlError) as info:
            g.vcpu.get_clock_guest()
    assert info.value.errno in (errno.EINVAL, errno.ENOTTY)


def test_clock_guest_round_trip(kvm, caps):
    if not caps.clock_guest:
        pytest.skip("unsupported on this host: KVM_GET_CLOCK_GUEST")
    from kvmcore import Guest, GuestConfig

    with Guest.create(kvm, GuestConfig()) as g:
        g.run_until_snapshot()
        pvti = g.vcpu.get_clock_guest()
        assert pvti.tsc_to_system_mul
        g.vcpu.set_clock_guest(pvti)


def test_xen_guest_runs_with_the_capability(kvm, caps):
    from kvmcore import Guest, GuestConfig

    if not caps.xen_runstate:
        pytest.skip("unsupported on this host: KVM_CAP_XEN_HVM")
    with Guest.create(kvm, GuestConfig(xen=True)) as g:
        s = g.run_until_snapshot()
        s = g.run_until_snapshot()
    rs = s.runstate                                 # entry time = sum of the times
    assert rs.state_entry_time == (rs.time_running + rs.time_runnable + rs.time_blocked
                                   + rs.time_offline)


def test_xen_guest_needs_the_capability(kvm, caps):
    from kvmcore import Guest, GuestConfig

    if caps.xen_runstate:
        pytest.skip("this host has KVM_CAP_XEN_HVM: there is no refusal to check")
    fds = open_fds()
    with pytest.raises(Unsupported, match="unsupported on this host: KVM_CAP_XEN_HVM"):
        Guest.create(kvm, GuestConfig(xen=True))
    assert open_fds() == fds


# --- Xen argument packing, checked against an independent struct.pack of api.rst ---

def raw(cdata) -> bytes:
    return bytes(ffi.buffer(cdata))


def test_xen_hvm_config_packing():
    got = raw(xen.hvm_config(0x40000000, lib.KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL))
    assert got == struct.pack("<II", 2, 0x40000000) + bytes(56 - 8)


def test_xen_hvm_attr_packing():
    # __u16 type; __u16 pad[3]; union u (64 bytes).
    assert raw(xen.hvm_attr_shared_info(0x8)) == struct.pack("<H6xQ", 1, 8) + bytes(56)
    assert raw(xen.hvm_attr_long_mode(True)) == struct.pack("<H6xB", 0, 1) + bytes(63)
    # Negative control: a different gfn packs differently.
    assert raw(xen.hvm_attr_shared_info(0x9)) != raw(xen.hvm_attr_shared_info(0x8))


def test_xen_vcpu_attr_packing():
    assert raw(xen.vcpu_attr_runstate_addr(0x9000)) == struct.pack("<H6xQ", 2, 0x9000) + bytes(56)
    assert raw(xen.vcpu_attr_runstate_current(xen.RUNSTATE_RUNNABLE)) == \
        struct.pack("<H6xQ", 3, 1) + bytes(56)
    rs = xen.Runstate(xen.RUNSTATE_RUNNABLE, 100, 60, 30, 10, 0)
    assert raw(xen.vcpu_attr_runstate_data(rs)) == \
        struct.pack("<H6x6Q", 4, 1, 100, 60, 30, 10, 0) + bytes(16)
    adj = xen.vcpu_attr_runstate_adjust(xen.RUNSTATE_ADJUST_KEEP_STATE, runnable=5,
                                        running=-5)
    assert raw(adj) == struct.pack("<H6xQQqQQQ", 5, (1 << 64) - 1, 0, -5, 5, 0, 0) + bytes(16)
    assert xen.Runstate.from_attr(xen.vcpu_attr_runstate_data(rs)) == rs


def test_xen_flag_names():
    assert xen.hvm_flag_names(0x1FF) == list(xen.HVM_FLAG_NAMES)
    assert xen.hvm_flag_names(0b1000) == ["RUNSTATE"]
    assert xen.hvm_flag_names(1 << 12) == ["BIT12"]
    assert xen.hvm_flag_names(0) == []


def test_a_partial_msr_access_is_its_own_error_not_an_errno(kvm):
    """KVM_[GS]ET_MSRS succeed with the count done; a short count is no errno the kernel
    returned, so it is ShortMsrAccess naming the MSR it stopped at."""
    from kvmcore import ShortMsrAccess

    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid2(kvm.cpuid())
        tsc_adjust = 0x3B
        assert set(vcpu.get_msrs([tsc_adjust])) == {tsc_adjust}          # control
        vcpu.set_msrs({tsc_adjust: 0})                                     # control
        for call in (lambda: vcpu.get_msrs([tsc_adjust, 0xDEAD0000]),
                     lambda: vcpu.set_msrs({tsc_adjust: 0, 0xDEAD0000: 1})):
            with pytest.raises(ShortMsrAccess) as info:
                call()
            assert (info.value.index, info.value.done, info.value.asked) == (0xDEAD0000, 1, 2)
            assert "MSR 0xdead0000 (1 of 2 done)" in str(info.value)
            assert not isinstance(info.value, KvmIoctlError)

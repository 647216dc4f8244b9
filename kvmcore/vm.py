"""A KVM VM file descriptor: memory slots, vCPUs, the VM-wide kvmclock, Xen config."""

from __future__ import annotations

import os
from typing import Any

from . import xen
from ._ioctl import ioctl, ioctl_int
from ._kvm import ffi
from .vcpu import Vcpu


class Vm:
    """One VM. Closing it closes its vCPUs first (their fds pin the VM in the kernel).

    ``vcpu_mmap_size`` is /dev/kvm's KVM_GET_VCPU_MMAP_SIZE, handed down (as
    kvm-ioctls does) rather than reached through a pointer back to the System."""

    def __init__(self, fd: int, *, vcpu_mmap_size: int) -> None:
        self.fd = fd
        self.vcpu_mmap_size = vcpu_mmap_size
        self.vcpus: list[Vcpu] = []

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM (some answers depend on the VM type)."""
        return ioctl_int(self.fd, "KVM_CHECK_EXTENSION", cap)

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int, flags: int = 0) -> None:
        region = ffi.new("struct kvm_userspace_memory_region *", {
            "slot": slot, "flags": flags, "guest_phys_addr": guest_phys_addr,
            "memory_size": memory_size, "userspace_addr": userspace_addr})
        ioctl(self.fd, "KVM_SET_USER_MEMORY_REGION", region)

    def create_vcpu(self, vcpu_id: int = 0) -> Vcpu:
        fd = ioctl_int(self.fd, "KVM_CREATE_VCPU", vcpu_id)
        try:
            vcpu = Vcpu(fd, vcpu_id, run_size=self.vcpu_mmap_size)
        except BaseException:
            os.close(fd)
            raise
        self.vcpus.append(vcpu)
        return vcpu

    def get_clock(self) -> Any:
        """KVM_GET_CLOCK: ``struct kvm_clock_data`` (clock ns; realtime and host_tsc when
        the flags say so -- they come from one host TSC read in master-clock mode)."""
        data = ffi.new("struct kvm_clock_data *")
        ioctl(self.fd, "KVM_GET_CLOCK", data)
        return data

    def set_clock(self, clock: int, flags: int = 0, realtime: int = 0) -> None:
        """KVM_SET_CLOCK; with KVM_CLOCK_REALTIME the kernel adds the CLOCK_REALTIME
        elapsed since ``realtime`` to ``clock`` (if positive)."""
        data = ffi.new("struct kvm_clock_data *",
                       {"clock": clock, "flags": flags, "realtime": realtime})
        ioctl(self.fd, "KVM_SET_CLOCK", data)

    # --- Xen emulation (KVM_CAP_XEN_HVM); arguments built by kvmcore.xen ---

    def xen_hvm_config(self, config: Any) -> None:
        ioctl(self.fd, "KVM_XEN_HVM_CONFIG", config)

    def xen_hvm_set_attr(self, attr: Any) -> None:
        ioctl(self.fd, "KVM_XEN_HVM_SET_ATTR", attr, context=f"type {attr.type}")

    def xen_hvm_get_attr(self, attr_type: int) -> Any:
        attr = xen.hvm_attr_query(attr_type)
        ioctl(self.fd, "KVM_XEN_HVM_GET_ATTR", attr, context=f"type {attr_type}")
        return attr

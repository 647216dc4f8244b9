"""A KVM VM file descriptor: memory slots and their dirty log, vCPUs, the VM-wide kvmclock,
Xen config."""

from __future__ import annotations

import os
from typing import Any

from . import xen
from ._ioctl import ioctl, ioctl_int
from ._kvm import ffi
from .dirty import DirtyBitmap, bitmap_bytes
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

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP on the VM (e.g. KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2); up to 4 args."""
        data = ffi.new("struct kvm_enable_cap *", {"cap": cap, "flags": flags,
                                                   "args": list(args)})
        ioctl(self.fd, "KVM_ENABLE_CAP", data, context=f"cap {cap}")

    def get_dirty_log(self, slot: int, num_pages: int) -> DirtyBitmap:
        """KVM_GET_DIRTY_LOG for a slot of ``num_pages`` pages (the slot must have
        KVM_MEM_LOG_DIRTY_PAGES). Without manual protect KVM also clears the log and
        write-protects the pages again, so each call sees the writes since the last."""
        size = bitmap_bytes(num_pages)
        buf = ffi.new("char[]", size)
        log = ffi.new("struct kvm_dirty_log *", {"slot": slot})
        log.dirty_bitmap = buf
        ioctl(self.fd, "KVM_GET_DIRTY_LOG", log, context=f"slot {slot}")
        return DirtyBitmap(slot, num_pages, ffi.unpack(buf, size))

    def clear_dirty_log(self, dirty: DirtyBitmap) -> None:
        """KVM_CLEAR_DIRTY_LOG (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 enabled): clear and
        write-protect again the pages set in ``dirty`` (the whole slot from page 0, which
        meets the kernel's rule that a range start at a multiple of 64)."""
        buf = ffi.new("char[]", dirty.bitmap)
        log = ffi.new("struct kvm_clear_dirty_log *", {
            "slot": dirty.slot, "num_pages": dirty.num_pages, "first_page": 0})
        log.dirty_bitmap = buf
        ioctl(self.fd, "KVM_CLEAR_DIRTY_LOG", log, context=f"slot {dirty.slot}")

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

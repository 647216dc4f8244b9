"""A KVM vCPU file descriptor: KVM_RUN and the per-vCPU state ioctls."""

from __future__ import annotations

import errno
import mmap
import os
from dataclasses import dataclass
from typing import Any

from . import xen
from ._ioctl import ioctl, ioctl_int
from ._kvm import ffi, lib
from .errors import GuestError, KvmIoctlError, ShortMsrAccess

EXIT_NAMES = {getattr(lib, n): n for n in (
    "KVM_EXIT_UNKNOWN", "KVM_EXIT_IO", "KVM_EXIT_HLT", "KVM_EXIT_MMIO", "KVM_EXIT_SHUTDOWN",
    "KVM_EXIT_FAIL_ENTRY", "KVM_EXIT_INTR", "KVM_EXIT_INTERNAL_ERROR")}


@dataclass(frozen=True)
class IoExit:
    """KVM_EXIT_IO: the guest executed in/out; for OUT, ``data`` is what it wrote."""

    port: int
    out: bool
    size: int
    count: int
    data: bytes


class Vcpu:
    """One vCPU, with its shared ``struct kvm_run`` mapped."""

    def __init__(self, fd: int, vcpu_id: int, *, run_size: int) -> None:
        self.fd = fd
        self.vcpu_id = vcpu_id
        self._run_map = mmap.mmap(fd, run_size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        self._run_buf = ffi.from_buffer(self._run_map)
        self.run_struct: Any = ffi.cast("struct kvm_run *", self._run_buf)

    def close(self) -> None:
        if self.fd < 0:
            return
        self.run_struct = None
        ffi.release(self._run_buf)
        self._run_map.close()
        os.close(self.fd)
        self.fd = -1

    # --- running ---

    def run(self) -> int:
        """KVM_RUN once; returns the exit reason (KVM_EXIT_*). EINTR (a signal, or
        immediate_exit) is returned as KVM_EXIT_INTR, as the kernel sets it."""
        try:
            ioctl(self.fd, "KVM_RUN")
        except KvmIoctlError as e:
            if e.errno != errno.EINTR:
                raise
            return lib.KVM_EXIT_INTR
        return self.run_struct.exit_reason

    def complete_pending_io(self) -> None:
        """Finish an exit's pending I/O without entering the guest (api.rst: KVM_RUN with
        immediate_exit=1 before saving state). Afterwards RIP is past the `out`."""
        self.run_struct.immediate_exit = 1
        try:
            reason = self.run()
        finally:
            self.run_struct.immediate_exit = 0
        if reason != lib.KVM_EXIT_INTR:
            raise GuestError(f"KVM_RUN with immediate_exit returned exit "
                             f"{EXIT_NAMES.get(reason, reason)} instead of completing the I/O")

    def io_exit(self) -> IoExit:
        """Decode the exit union as KVM_EXIT_IO (valid only right after such an exit)."""
        base = ffi.cast("char *", self.run_struct)
        io = ffi.cast("struct kvmcore_exit_io *", base + lib.KVMCORE_RUN_EXIT_OFFSET)
        data = ffi.unpack(base + io.data_offset, io.size * io.count)
        return IoExit(io.port, io.direction == lib.KVM_EXIT_IO_OUT, io.size, io.count, data)

    def exit_detail(self) -> bytes:
        """The raw first 32 bytes of the exit union, for error messages on odd exits."""
        base = ffi.cast("char *", self.run_struct)
        return ffi.unpack(base + lib.KVMCORE_RUN_EXIT_OFFSET, 32)

    # --- registers ---

    def get_regs(self) -> Any:
        regs = ffi.new("struct kvm_regs *")
        ioctl(self.fd, "KVM_GET_REGS", regs)
        return regs

    def set_regs(self, regs: Any) -> None:
        ioctl(self.fd, "KVM_SET_REGS", regs)

    def get_sregs(self) -> Any:
        sregs = ffi.new("struct kvm_sregs *")
        ioctl(self.fd, "KVM_GET_SREGS", sregs)
        return sregs

    def set_sregs(self, sregs: Any) -> None:
        ioctl(self.fd, "KVM_SET_SREGS", sregs)

    def get_fpu(self) -> Any:
        fpu = ffi.new("struct kvm_fpu *")
        ioctl(self.fd, "KVM_GET_FPU", fpu)
        return fpu

    def set_fpu(self, fpu: Any) -> None:
        ioctl(self.fd, "KVM_SET_FPU", fpu)

    # --- MSRs and CPUID ---

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """KVM_GET_MSRS; KVM returns how many it read, and stops at the first it cannot."""
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(indices),
                                              "entries": [{"index": i} for i in indices]})
        done = ioctl(self.fd, "KVM_GET_MSRS", msrs)
        if done != len(indices):
            raise ShortMsrAccess("KVM_GET_MSRS", indices[done], done, len(indices))
        return {e.index: e.data for e in msrs.entries[0:len(indices)]}

    def set_msrs(self, values: dict[int, int]) -> None:
        msrs = ffi.new("struct kvm_msrs *", {
            "nmsrs": len(values),
            "entries": [{"index": i, "data": v} for i, v in values.items()]})
        done = ioctl(self.fd, "KVM_SET_MSRS", msrs)
        if done != len(values):
            raise ShortMsrAccess("KVM_SET_MSRS", msrs.entries[done].index, done, len(values))

    def set_cpuid2(self, cpuid: Any) -> None:
        ioctl(self.fd, "KVM_SET_CPUID2", cpuid)

    # --- TSC ---

    def get_tsc_khz(self) -> int:
        return ioctl_int(self.fd, "KVM_GET_TSC_KHZ")

    def set_tsc_khz(self, khz: int) -> None:
        ioctl_int(self.fd, "KVM_SET_TSC_KHZ", khz)

    def has_device_attr(self, group: int, attr: int) -> bool:
        """KVM_HAS_DEVICE_ATTR: ENXIO means "no such attribute", anything else is an error."""
        arg = ffi.new("struct kvm_device_attr *", {"group": group, "attr": attr})
        try:
            ioctl(self.fd, "KVM_HAS_DEVICE_ATTR", arg, context=f"group {group} attr {attr}")
        except KvmIoctlError as e:
            if e.errno == errno.ENXIO:
                return False
            raise
        return True

    def get_device_attr_u64(self, group: int, attr: int) -> int:
        value = ffi.new("__u64 *")
        arg = ffi.new("struct kvm_device_attr *", {
            "group": group, "attr": attr, "addr": int(ffi.cast("uintptr_t", value))})
        ioctl(self.fd, "KVM_GET_DEVICE_ATTR", arg, context=f"group {group} attr {attr}")
        return int(value[0])

    def set_device_attr_u64(self, group: int, attr: int, data: int) -> None:
        value = ffi.new("__u64 *", data)
        arg = ffi.new("struct kvm_device_attr *", {
            "group": group, "attr": attr, "addr": int(ffi.cast("uintptr_t", value))})
        ioctl(self.fd, "KVM_SET_DEVICE_ATTR", arg, context=f"group {group} attr {attr}")

    def get_tsc_offset(self) -> int:
        """KVM_VCPU_TSC_OFFSET (devices/vcpu.rst): guest_tsc = host_tsc + offset (mod 2^64)."""
        return self.get_device_attr_u64(lib.KVM_VCPU_TSC_CTRL, lib.KVM_VCPU_TSC_OFFSET)

    def set_tsc_offset(self, offset: int) -> None:
        self.set_device_attr_u64(lib.KVM_VCPU_TSC_CTRL, lib.KVM_VCPU_TSC_OFFSET,
                                 offset & ((1 << 64) - 1))

    # --- kvmclock as a function of guest TSC (the unmerged CLOCK_GUEST series) ---

    def get_clock_guest(self) -> Any:
        """KVM_GET_CLOCK_GUEST: the vCPU's pvclock record (EINVAL without master clock,
        and also when the kernel lacks the ioctl)."""
        pvti = ffi.new("struct pvclock_vcpu_time_info *")
        ioctl(self.fd, "KVM_GET_CLOCK_GUEST", pvti)
        return pvti

    def set_clock_guest(self, pvti: Any) -> None:
        ioctl(self.fd, "KVM_SET_CLOCK_GUEST", pvti)

    # --- Xen emulation (KVM_CAP_XEN_HVM); arguments built by kvmcore.xen ---

    def xen_set_attr(self, attr: Any) -> None:
        ioctl(self.fd, "KVM_XEN_VCPU_SET_ATTR", attr, context=f"type {attr.type}")

    def xen_get_attr(self, attr_type: int) -> Any:
        attr = xen.vcpu_attr_query(attr_type)
        ioctl(self.fd, "KVM_XEN_VCPU_GET_ATTR", attr, context=f"type {attr_type}")
        return attr

"""/dev/kvm: the system-level ioctls, and the factory for VMs."""

from __future__ import annotations

import os
from typing import Any

from ._ioctl import ioctl, ioctl_int
from ._kvm import ffi, lib
from .errors import Unsupported
from .vm import Vm


# Large enough for every CPUID leaf and MSR KVM reports; E2BIG tells us otherwise.
_MAX_CPUID_ENTRIES = 256
_MAX_MSR_INDICES = 1024


class System:
    """An open /dev/kvm. Use as a context manager; VMs it creates close independently."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            version = self.api_version()
            if version != lib.KVM_API_VERSION:
                raise Unsupported(f"KVM API version {version} (need {lib.KVM_API_VERSION})")
            self.vcpu_mmap_size = ioctl_int(self.fd, "KVM_GET_VCPU_MMAP_SIZE")
        except BaseException:
            os.close(self.fd)
            raise
        self._msr_indices: frozenset[int] | None = None
        self._cpuid: Any = None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> System:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def api_version(self) -> int:
        return ioctl_int(self.fd, "KVM_GET_API_VERSION")

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on /dev/kvm: 0 when absent, else a cap-specific value."""
        return ioctl_int(self.fd, "KVM_CHECK_EXTENSION", cap)

    def supported_cpuid(self) -> Any:
        """KVM_GET_SUPPORTED_CPUID: a ``struct kvm_cpuid2 *`` ready for KVM_SET_CPUID2."""
        cpuid = ffi.new("struct kvm_cpuid2 *",
                        {"nent": _MAX_CPUID_ENTRIES, "entries": _MAX_CPUID_ENTRIES})
        ioctl(self.fd, "KVM_GET_SUPPORTED_CPUID", cpuid)
        return cpuid

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs KVM_GET/SET_MSRS handle (saved and emulated)."""
        msr_list = ffi.new("struct kvm_msr_list *",
                           {"nmsrs": _MAX_MSR_INDICES, "indices": _MAX_MSR_INDICES})
        ioctl(self.fd, "KVM_GET_MSR_INDEX_LIST", msr_list)
        return list(ffi.unpack(msr_list.indices, msr_list.nmsrs))

    def cpuid(self) -> Any:
        """supported_cpuid(), read once per System: KVM_SET_CPUID2 copies it, and the
        ioctl costs ~0.4 ms, a tenth of a migration cycle."""
        if self._cpuid is None:
            self._cpuid = self.supported_cpuid()
        return self._cpuid

    def msr_indices(self) -> frozenset[int]:
        """msr_index_list(), read once per System."""
        if self._msr_indices is None:
            self._msr_indices = frozenset(self.msr_index_list())
        return self._msr_indices

    def create_vm(self) -> Vm:
        """KVM_CREATE_VM (default machine type)."""
        return Vm(ioctl_int(self.fd, "KVM_CREATE_VM", 0), vcpu_mmap_size=self.vcpu_mmap_size)

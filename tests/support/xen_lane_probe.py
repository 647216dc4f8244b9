"""Probes shared by the lane's tests and conftest.py (a module of its own, with a name unique in
tests/, because tests cannot import a conftest reliably)."""
from __future__ import annotations

import fcntl
import os

KVM_CHECK_EXTENSION = 0xAE03  # _IO(KVMIO, 0x03)
KVM_CAP_XEN_HVM = 38
UNSUPPORTED = "unsupported on this host: KVM_CAP_XEN_HVM"
CLOCK_GUEST_UNSUPPORTED = "unsupported on this host: KVM_GET_CLOCK_GUEST"


def in_lane() -> bool:
    return os.environ.get("KVM_TESTBED_LANE") == "xen"


def clock_guest_patched() -> bool:
    """The lane loaded the project's KVM_[GS]ET_CLOCK_GUEST modules (`--clock-guest`): the
    ioctls must then be there, and no clock=guest test may skip."""
    return os.environ.get("KVM_TESTBED_CLOCK_GUEST") == "patched"


def xen_hvm_bits() -> int:
    """KVM_CHECK_EXTENSION(KVM_CAP_XEN_HVM): 0 without KVM Xen, else its feature bits.
    (Temporary plain probe; kvmcore's capability probe will replace it.)"""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        return fcntl.ioctl(fd, KVM_CHECK_EXTENSION, KVM_CAP_XEN_HVM)
    finally:
        os.close(fd)

"""The one place kvmcore calls ioctl(2): returns the result or raises KvmIoctlError.

Requests are passed by name (the ``lib`` attribute holding the number the
compiler computed), so every failure names the ioctl without a lookup table.
"""

from __future__ import annotations

from typing import Any

from ._kvm import ffi, lib
from .errors import KvmIoctlError

_call_ptr = lib.kvmcore_ioctl
_call_int = lib.kvmcore_ioctl_int


def ioctl(fd: int, name: str, arg: Any = ffi.NULL, context: str = "") -> int:
    """ioctl(fd, <name>, pointer); ``arg`` is cdata (a struct pointer) or NULL."""
    ret = _call_ptr(fd, getattr(lib, name), arg)
    if ret < 0:
        raise KvmIoctlError(name, ffi.errno, context)
    return ret


def ioctl_int(fd: int, name: str, value: int = 0, context: str = "") -> int:
    """ioctl(fd, <name>, integer): for the requests whose argument is a value, not a pointer."""
    ret = _call_int(fd, getattr(lib, name), value)
    if ret < 0:
        raise KvmIoctlError(name, ffi.errno, context)
    return ret


def request_size(name: str) -> int:
    """The argument size encoded in an _IOR/_IOW request number (bits 16..29)."""
    return (getattr(lib, name) >> 16) & 0x3FFF

"""kvmcore's whole error hierarchy: one root, and each leaf says whose fault it was."""

from __future__ import annotations

import errno as _errno
import os


class KvmError(Exception):
    """Root of every error kvmcore raises (catch this to catch them all)."""


class KvmIoctlError(KvmError):
    """An ioctl on /dev/kvm, a VM or a vCPU failed; names the ioctl and the errno."""

    def __init__(self, ioctl: str, errno: int, context: str = "") -> None:
        self.ioctl = ioctl
        self.errno = errno
        self.context = context
        name = _errno.errorcode.get(errno, str(errno))
        where = f" ({context})" if context else ""
        super().__init__(f"{ioctl}{where} failed: {name} ({os.strerror(errno)})")


class Unsupported(KvmError):
    """The host lacks a kernel feature that was asked for; raised before anything changes.

    The message always reads ``unsupported on this host: <capability>``, the
    same words tests use in ``pytest.skip``.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        super().__init__(f"unsupported on this host: {what}")


class StateError(KvmError):
    """A document from the wire is malformed: a VmState, a peer's HELLO capabilities, a
    REPORT's parts. The one error for a bad wire value; names the field and the reason.

    Raised by validation (kvmcore.state's checkers) before anything uses the value.
    """

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"invalid field {field!r}: {reason}")


class ShortMsrAccess(KvmError):
    """KVM_GET_MSRS or KVM_SET_MSRS handled only some of the MSRs: the ioctl itself
    succeeded (it returns the count done), so this is no errno; names the first MSR left."""

    def __init__(self, ioctl: str, index: int, done: int, asked: int) -> None:
        self.ioctl, self.index, self.done, self.asked = ioctl, index, done, asked
        super().__init__(f"{ioctl} stopped at MSR {index:#x} ({done} of {asked} done)")


class GuestMemoryError(KvmError):
    """Guest memory misused: a size it cannot have, an access outside it, or use once closed."""


class StrategyError(KvmError):
    """A strategy text or part that is not one of the choices (kvmcore.strategy)."""


class GuestError(KvmError):
    """The guest did something other than report: an unexpected exit, a bad report page."""


class GuestTimeout(GuestError):
    """The guest did not report within the run's time limit; its vCPU was kicked out."""

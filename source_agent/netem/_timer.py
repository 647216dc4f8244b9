"""Sleeps that end on time: a timerfd per pipe instead of trio's timeout.

trio sleeps by passing the next deadline to ``epoll_wait``, whose timeout is in
whole milliseconds, rounded up: a 1 ms delay came out as 1.6 ms on average
(measured, one hop), a 60 % error at the smallest latency the sweeps use. A
timerfd is armed with nanosecond resolution and wakes the same epoll loop by
becoming readable, so the release is late only by scheduling latency (tens of
microseconds idle) and still never early.

Python 3.11 has no ``os.timerfd_*`` (added in 3.13), hence ctypes. Under a
virtual clock (``MockClock`` in tests) real timers would be wrong, so the
sleeper defers to `trio.sleep_until` there.
"""

from __future__ import annotations

import ctypes
import os

import trio
import trio.testing

_CLOCK_MONOTONIC = 1
_libc = ctypes.CDLL(None, use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _check(result: int, call: str) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{call}: {os.strerror(errno)}")
    return result


class Sleeper:
    """`sleep_until` on trio's clock with sub-millisecond precision; closes its fd on exit."""

    def __init__(self) -> None:
        self._virtual = isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock)
        self._fd = -1
        if not self._virtual:
            flags = os.O_NONBLOCK | os.O_CLOEXEC  # TFD_NONBLOCK, TFD_CLOEXEC share these values
            self._fd = _check(_libc.timerfd_create(_CLOCK_MONOTONIC, flags), "timerfd_create")
        self._spec = _Itimerspec()

    def __enter__(self) -> Sleeper:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._fd >= 0:
            trio.lowlevel.notify_closing(self._fd)
            os.close(self._fd)
            self._fd = -1

    async def sleep_until(self, deadline: float) -> None:
        if self._virtual:
            await trio.sleep_until(deadline)
            return
        remaining = deadline - trio.current_time()
        if remaining <= 0:
            await trio.lowlevel.checkpoint()
            return
        # Arming resets the expiry count, so a timer left over from a cancelled
        # sleep cannot end this one early.
        value = self._spec.it_value
        value.tv_sec = int(remaining)
        value.tv_nsec = max(1, int((remaining - value.tv_sec) * 1e9))
        _check(_libc.timerfd_settime(self._fd, 0, ctypes.byref(self._spec), None), "timerfd_settime")
        await trio.lowlevel.wait_readable(self._fd)
        os.read(self._fd, 8)

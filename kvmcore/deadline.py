"""A time limit on KVM_RUN: a vCPU that does not come back by itself is kicked out.

A guest is code of somebody else's choosing once it arrives over the network: one
that never reports would keep its vCPU thread in KVM_RUN for ever. api.rst gives
the way out: set ``kvm_run.immediate_exit`` (for a thread about to enter) and send
the vCPU thread a signal (for one inside): KVM_RUN then returns EINTR.

The signal needs a handler, or its default action would end the process, and
Python installs handlers only from the main thread: call
:func:`install_kick_handler` there once (the agents do it at start-up).
"""

from __future__ import annotations

import signal
import threading
from typing import Any

#: The signal that kicks a vCPU thread out of KVM_RUN.
KICK_SIGNAL = signal.SIGUSR1


def _ignore(signum: int, frame: Any) -> None:
    """The kick only needs to interrupt the ioctl; there is nothing to do on delivery."""


def install_kick_handler() -> None:
    """Give KICK_SIGNAL a no-op handler (main thread only; idempotent)."""
    if signal.getsignal(KICK_SIGNAL) is not _ignore:
        signal.signal(KICK_SIGNAL, _ignore)


def kick_handler_installed() -> bool:
    return signal.getsignal(KICK_SIGNAL) is _ignore


class RunDeadline:
    """While active, kicks the calling thread's vCPU out of KVM_RUN after ``seconds``.

    ``expired`` tells the run loop that an EINTR was the deadline, not a stray
    signal. A lock orders the timer against ``__exit__``, so a kick can never land
    after the deadline was disarmed (and leave ``immediate_exit`` set for a later run).
    """

    def __init__(self, run_struct: Any, seconds: float) -> None:
        if not kick_handler_installed():
            raise RuntimeError("kvmcore.install_kick_handler() must run in the main thread "
                               "before a run has a time limit")
        self.seconds = seconds
        self.expired = False
        self._run_struct = run_struct
        self._thread = 0                # the thread that runs the vCPU: the one entering
        self._lock = threading.Lock()
        self._armed = True
        self._timer = threading.Timer(seconds, self._kick)
        self._timer.daemon = True

    def _kick(self) -> None:
        with self._lock:
            if not self._armed:
                return
            self.expired = True
            self._run_struct.immediate_exit = 1
            signal.pthread_kill(self._thread, KICK_SIGNAL)

    def __enter__(self) -> RunDeadline:
        self._thread = threading.get_ident()
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._armed = False
            self._run_struct.immediate_exit = 0
        self._timer.cancel()

"""``python -m source_agent.sweep._guard PARENT_PID -- ARGV...``: run ARGV, and kill it when the sweep dies.

The sweep owns the destination agent through trio, which kills it on every
way out the sweep itself sees (end, error, Ctrl-C). ``kill -9`` of the sweep
runs no code at all, and the agent would then serve on, orphaned, for ever.
This guard sits between the two: it polls its parent pid and kills the agent
as soon as the sweep is gone.

Why polling and not ``PR_SET_PDEATHSIG`` on the agent directly: trio starts
processes from a worker thread, and the death signal fires when that *thread*
exits — which trio's thread cache does after a few idle seconds, killing a
healthy agent. The guard is single-threaded, so it can safely give the agent
PDEATHSIG itself: if the guard is killed outright, the agent dies with it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from types import FrameType

PR_SET_PDEATHSIG = 1
POLL = 0.2           # seconds between checks of the parent
TERM_GRACE = 5.0     # the agent's time to exit after SIGTERM before SIGKILL


def _die_with_guard() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _stop(child: subprocess.Popen[bytes]) -> int:
    child.terminate()
    try:
        return child.wait(TERM_GRACE)
    except subprocess.TimeoutExpired:
        child.kill()
        return child.wait()


def _exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m source_agent.sweep._guard PARENT_PID -- ARGV...", file=sys.stderr)
        return 2
    parent = int(argv[0])
    child = subprocess.Popen(argv[2:], preexec_fn=_die_with_guard)  # noqa: PLW1509 - single-threaded

    def forward(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(_exit_status(_stop(child)))

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while True:
        try:
            return _exit_status(child.wait(POLL))
        except subprocess.TimeoutExpired:
            pass
        if os.getppid() != parent:  # re-parented: the sweep is gone
            child.kill()
            return _exit_status(child.wait())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

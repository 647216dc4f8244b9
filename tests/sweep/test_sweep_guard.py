"""The guard kills the destination agent when the sweep dies without running code (kill -9)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from source_agent.sweep import _guard

#: A stand-in for the sweep: starts ARGV (guarded or not) and prints the grandchild's pid.
INTERMEDIATE = textwrap.dedent("""
    import os, subprocess, sys, time
    guarded = sys.argv[1] == "guarded"
    argv = ["sleep", "60"]
    if guarded:
        argv = [sys.executable, sys.argv[2], str(os.getpid()), "--", *argv]
    child = subprocess.Popen(argv)
    time.sleep(0.5)  # let the guard start its own child
    sleeper = child.pid
    if guarded:
        sleeper = int(open(f"/proc/{child.pid}/task/{child.pid}/children").read().split()[0])
    print(sleeper, flush=True)
    time.sleep(60)
""")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def orphan_after_kill_9(guarded: bool) -> tuple[int, bool]:
    """Kill -9 the intermediate; return the sleeper's pid and whether it is still alive 3 s later."""
    intermediate = subprocess.Popen([sys.executable, "-c", INTERMEDIATE,
                                     "guarded" if guarded else "bare", _guard.__file__],
                                    stdout=subprocess.PIPE)
    try:
        sleeper = int(intermediate.stdout.readline())
        intermediate.kill()
        intermediate.wait()
        deadline = time.monotonic() + 3
        while alive(sleeper) and time.monotonic() < deadline:
            time.sleep(0.05)
        return sleeper, alive(sleeper)
    finally:
        intermediate.stdout.close()


def test_the_guarded_process_dies_with_the_sweep():
    _, survived = orphan_after_kill_9(guarded=True)
    assert not survived


def test_negative_control_an_unguarded_process_outlives_the_sweep():
    sleeper, survived = orphan_after_kill_9(guarded=False)
    try:
        assert survived
    finally:
        os.kill(sleeper, signal.SIGKILL)


def test_the_guard_passes_on_the_exit_status_and_sigterm():
    done = subprocess.run([sys.executable, _guard.__file__, str(os.getpid()), "--", "sh", "-c",
                           "exit 7"], check=False)
    assert done.returncode == 7
    guard = subprocess.Popen([sys.executable, _guard.__file__, str(os.getpid()), "--",
                              "sleep", "60"])
    time.sleep(0.5)
    guard.terminate()
    assert guard.wait(timeout=10) == 128 + signal.SIGTERM  # sleep was terminated, and said so

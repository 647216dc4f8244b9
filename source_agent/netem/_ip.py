"""Running ``ip`` and ``tc``, and naming what we create so a later run can find our leftovers.

Names carry our prefix and the creating process's pid (``netem-<pid>-<hex>``):
unique across parallel runs, and a namespace whose pid is dead belongs to a
crashed run and may be removed.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess

from ._errors import CommandError

PREFIX = "netem-"
_OURS = re.compile(rf"^{PREFIX}(\d+)-([0-9a-f]{{6}})$")

#: Generous: ``ip``/``tc`` normally return in milliseconds, but a loaded host may stall.
TIMEOUT = 20.0


def unique_namespace() -> str:
    return f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}"


def token_of(namespace: str) -> str:
    """The random part of one of our namespace names (used to name its veth pair)."""
    match = _OURS.match(namespace)
    if match is None:
        raise ValueError(f"not a namespace this package created: {namespace!r}")
    return match.group(2)


def owner_pid(namespace: str) -> int | None:
    match = _OURS.match(namespace)
    return int(match.group(1)) if match else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run(argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one command to completion (blocking: callers in trio use ``trio.to_thread``)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    except FileNotFoundError as exc:
        raise CommandError(argv, 127, f"{argv[0]} not found: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandError(argv, -1, f"timed out after {TIMEOUT:g} s") from exc
    if check and done.returncode != 0:
        raise CommandError(argv, done.returncode, done.stderr)
    return done


def namespaces() -> list[str]:
    """Every named network namespace on the host (``ip netns list``)."""
    return [line.split()[0] for line in run(["ip", "netns", "list"]).stdout.splitlines() if line.strip()]


def delete_namespace(namespace: str) -> None:
    """Kill what runs inside, then delete; missing is fine (teardown must be idempotent).

    The processes are ours: the namespace's name is unique to the run that made it.
    """
    pids = run(["ip", "netns", "pids", namespace], check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), 9)
        except ProcessLookupError:
            pass
    done = run(["ip", "netns", "delete", namespace], check=False)
    if done.returncode != 0 and namespace in namespaces():
        raise CommandError(["ip", "netns", "delete", namespace], done.returncode, done.stderr)

"""Helpers for the robustness tests: agents as real processes, observed from outside through /proc.

Why /proc: a destination killed or stopped cannot be asked anything, and one that runs must not
need a test-only API to be audited. Its VMs are its ``anon_inode:kvm-vm`` descriptors, its
connections its sockets, its threads and memory ``/proc/<pid>/status``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from common_helpers import BIN

PACED = Path(__file__).resolve().parent / "paced.py"
T = TypeVar("T")


def fd_targets(pid: int) -> list[str]:
    """What each open descriptor of ``pid`` points at (descriptors closing meanwhile are skipped)."""
    targets = []
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        try:
            targets.append(os.readlink(f"{base}/{name}"))
        except FileNotFoundError:
            pass
    return targets


def vm_count(pid: int) -> int:
    """Live VMs of ``pid``: every KVM VM is one ``anon_inode:kvm-vm`` descriptor."""
    return sum(target == "anon_inode:kvm-vm" for target in fd_targets(pid))


def _status(pid: int, key: str) -> str:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return line.split(":", 1)[1].strip()
    raise KeyError(key)


def thread_count(pid: int) -> int:
    return int(_status(pid, "Threads"))


def rss_kib(pid: int) -> int:
    return int(_status(pid, "VmRSS").split()[0])


def proc_state(pid: int) -> str:
    """One letter: R, S, T (stopped), Z, ... (the field after the command name in /proc/pid/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@dataclass(frozen=True)
class Resources:
    fds: int
    sockets: int
    vms: int
    threads: int
    rss_kib: int

    @classmethod
    def of(cls, pid: int) -> Resources:
        targets = fd_targets(pid)
        return cls(len(targets), sum(t.startswith("socket:") for t in targets),
                   sum(t == "anon_inode:kvm-vm" for t in targets), thread_count(pid), rss_kib(pid))


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.01) -> T:
    """Poll ``predicate`` until it returns something truthy, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


async def await_for(predicate: Callable[[], T], timeout: float, what: str,
                    interval: float = 0.01) -> T:
    """`wait_for` for trio tests: other tasks (a relay, clients) run while it polls."""
    import trio

    with trio.move_on_after(timeout):
        while not (value := predicate()):
            await trio.sleep(interval)
        return value
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def kill_and_reap(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL (works on a stopped process too) and reap; a no-op on one already gone."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


class Agent:
    """A console-script process with its stderr in a file (read while it runs, never blocking)."""

    def __init__(self, argv: Sequence[str], log: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.log_path = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self._log, env={**os.environ, **(env or {})}, cwd=cwd)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_log(self, pattern: str, timeout: float, count: int = 1) -> list[re.Match[str]]:
        """Wait until ``pattern`` matches ``count`` times in the log; fail early if the process ends."""
        def found() -> list[re.Match[str]] | None:
            matches = list(re.finditer(pattern, self.log()))
            if len(matches) >= count:
                return matches
            if not self.alive():
                raise AssertionError(f"process exited {self.proc.returncode} before {pattern!r}; "
                                     f"log:\n{self.log()}")
            return None
        return wait_for(found, timeout, f"{pattern!r} in {self.log_path.name}")

    def wait_paused(self, point: str, timeout: float = 30) -> None:
        """The paced launcher announced ``point`` and the process is really stopped there."""
        self.wait_log(f"PAUSED {point}", timeout)
        wait_for(lambda: proc_state(self.pid) == "T", 5, f"pid {self.pid} stopped at {point}")

    def kill(self) -> None:
        kill_and_reap(self.proc)
        self._log.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def finish(self, timeout: float) -> tuple[int, str]:
        """Wait (bounded) for the exit; returns the code and stdout."""
        out, _ = self.proc.communicate(timeout=timeout)
        self._log.close()
        return self.proc.returncode, out.decode(errors="replace")


class DestAgent(Agent):
    """``dest-agent serve`` on 127.0.0.1:<free port> (optionally through the paced launcher)."""

    def __init__(self, tmp: Path, key: Path | None, *options: str, pause: str | None = None,
                 name: str = "dest") -> None:
        cli = ["serve", "--listen", "127.0.0.1:0", *(["--psk-file", str(key)] if key else []),
               *options]
        argv = ([sys.executable, str(PACED), "dest", pause, "--", *cli] if pause
                else [str(BIN / "dest-agent"), *cli])
        super().__init__(argv, tmp / f"{name}.log")
        try:
            match = self.wait_log(r"serving on 127\.0\.0\.1:(\d+)", 30)[0]
        except BaseException:
            self.kill()
            raise
        self.address = ("127.0.0.1", int(match.group(1)))

    @property
    def target(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def sessions(self) -> list[str]:
        """The one-line-per-session log entries so far."""
        return re.findall(r"^dest-agent: session \S+: (.*)$", self.log(), re.M)

    def wait_sessions(self, count: int, timeout: float = 20) -> list[str]:
        wait_for(lambda: len(self.sessions()) >= count, timeout, f"{count} session log lines")
        return self.sessions()


def source_argv(*args: str, pause: str | None = None) -> list[str]:
    """``source-agent ARGS``, or the paced launcher stopping the source at ``pause``."""
    if pause:
        return [sys.executable, str(PACED), "source", pause, "--", *args]
    return [str(BIN / "source-agent"), *args]

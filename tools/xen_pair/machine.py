"""One pair machine: a lane QEMU with a virtio-net NIC on the pair's link and a control channel.

The machine boots like the lane (xen_lane.qemu_command, its initramfs and /init) and runs
guest_agent.py as the lane's command. QEMU connects its virtio-serial port to a Unix socket this
side listens on, so the agent's first line ("hello") says the machine is up.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import xen_lane

from . import timeref
from .guest_agent import make_rdtsc

#: This machine's TSC, read the way each pair machine's agent reads its own.
HOST_RDTSC = make_rdtsc()
#: TSC references probe for a shorter time: they only need to tell seconds apart.
TSC_PROBE_S = 0.3


def host_tsc_khz(seconds: float = 0.2) -> int:
    """The physical host's TSC rate, counted against CLOCK_MONOTONIC_RAW (kHz)."""
    t0, c0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC_RAW), HOST_RDTSC()
    time.sleep(seconds)
    t1, c1 = time.clock_gettime_ns(time.CLOCK_MONOTONIC_RAW), HOST_RDTSC()
    return round((c1 - c0) * 1_000_000 / (t1 - t0))

LINK_NET = "10.12.0"  # the pair's own link; only the two machines have it


class PairError(xen_lane.LaneError):
    """The pair failed as a pair (a machine did not boot, the agent went away)."""


def link_args(index: int, link_port: int) -> list[str]:
    """virtio-net on QEMU's socket netdev: src listens on 127.0.0.1, dst connects (no iPXE ROM:
    nothing boots from the network)."""
    role = "listen" if index == 0 else "connect"
    return ["-netdev", f"socket,id=link,{role}=127.0.0.1:{link_port}",
            "-device", f"virtio-net-pci,netdev=link,mac=52:54:00:12:00:{index + 1:02x},romfile="]


def control_args(control: Path) -> list[str]:
    return ["-chardev", f"socket,id=ctl,path={xen_lane.qemu_escape(control)}",
            "-device", "virtio-serial-pci",
            "-device", "virtserialport,chardev=ctl,name=testbed.ctl"]


class Machine:
    """A booting or booted machine; `call` talks to its agent, `reference` measures its clock."""

    def __init__(self, name: str, index: int, results: Path) -> None:
        self.name, self.index, self.results = name, index, results
        self.address = f"{LINK_NET}.{index + 1}"
        self.control = Path(f"/tmp/testbed-pair-{os.getpid()}-{name}.sock")
        self.boot_result: xen_lane.Boot | None = None
        self.boot_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._buffer = b""
        self.started_at: float | None = None
        self.nic = ""  # its link interface, found at set-up
        self.clock_target_ns = 0  # its CLOCK_REALTIME minus the host's, as last set
        self.held_vm = False  # its agent holds an empty VM open (guest_agent.hold_a_vm)
        self._proc: subprocess.Popen | None = None

    def _started(self, proc: subprocess.Popen) -> None:
        self._proc = proc

    def start(self, qemu: Sequence[str], deadline: float) -> None:
        """Start QEMU in a thread (xen_lane.boot waits for it to exit and logs the console)."""
        self.control.unlink(missing_ok=True)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.control))
        self._listener.listen(1)
        argv = [*qemu, *control_args(self.control)]

        def boot() -> None:
            try:
                self.boot_result = xen_lane.boot(argv, deadline, self.results / "console.log",
                                                 echo=False, started=self._started)
            except BaseException as e:  # reported by the main thread
                self.boot_error = e

        self.started_at = time.monotonic()
        self._thread = threading.Thread(target=boot, name=f"qemu-{self.name}", daemon=True)
        self._thread.start()

    def wait_ready(self, deadline: float) -> float:
        """Accept QEMU's connection and wait for the agent's hello; seconds since QEMU started."""
        self._listener.settimeout(1.0)
        while self._sock is None:
            self._check_alive(deadline, "connect its control channel")
            try:
                self._sock, _ = self._listener.accept()
            except TimeoutError:
                continue
        self._sock.settimeout(1.0)
        while True:
            self._check_alive(deadline, "start its agent")
            line = self._read_line()
            if line is not None:
                hello = json.loads(line)
                if hello.get("hello"):
                    self.held_vm = bool(hello.get("held_vm"))
                    return time.monotonic() - (self.started_at or 0)

    def _check_alive(self, deadline: float, doing: str) -> None:
        if self.boot_error is not None:
            raise self.boot_error
        if self._thread is not None and not self._thread.is_alive():
            console = self.results / "console.log"
            oops = xen_lane.find_oops(xen_lane.log_text(console)) if console.exists() else None
            raise PairError(f"{self.name} exited before it could {doing}"
                            + (f": kernel oops: {oops}" if oops else f"; {self.last_words()}"))
        if time.monotonic() > deadline:
            raise PairError(f"{self.name} did not {doing} before the deadline", xen_lane.EXIT_TIMEOUT)

    def _read_line(self) -> bytes | None:
        assert self._sock is not None
        while b"\n" not in self._buffer:
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                return None
            if not chunk:
                raise PairError(f"{self.name}'s agent closed its control channel; "
                                f"{self.last_words()}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def call(self, request: dict[str, Any], deadline: float) -> dict[str, Any]:
        """One request to the agent and its reply; PairError on an agent-side error."""
        assert self._sock is not None, "call before wait_ready"
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            self._check_alive(deadline, f"answer {request.get('op')}")
            line = self._read_line()
            if line is not None:
                reply = json.loads(line)
                if "error" in reply:
                    raise PairError(f"{self.name}: {request.get('op')} failed: {reply['error']}")
                return reply

    def run(self, argv: Sequence[str], deadline: float, **extra: Any) -> dict[str, Any]:
        timeout = max(1.0, deadline - time.monotonic())
        return self.call({"op": "run", "argv": list(argv), "timeout": timeout, **extra}, deadline)

    def sh(self, script: str, deadline: float) -> str:
        """A shell command that must succeed (set-up steps); its stdout."""
        reply = self.run(["/bin/sh", "-c", script], deadline)
        if reply["rc"] != 0:
            raise PairError(f"{self.name}: `{script}` exited {reply['rc']}: {reply['stderr'].strip()}")
        return reply["stdout"]

    def reference(self, deadline: float, duration_s: float = 1.0) -> timeref.Reference:
        """This machine's CLOCK_REALTIME minus the physical host's, over the control channel."""
        return timeref.measure(lambda: self.call({"op": "time"}, deadline)["realtime_ns"],
                               time.time_ns, duration_s=duration_s)

    def tsc_reference(self, deadline: float, khz: int) -> timeref.Reference:
        """This machine's TSC minus the physical host's, in ticks (the realtime argument with
        rdtsc on both sides); `khz` the host's TSC rate, to probe for TSC_PROBE_S."""
        return timeref.measure(lambda: self.call({"op": "tsc"}, deadline)["tsc"], HOST_RDTSC,
                               duration_s=TSC_PROBE_S, units_per_s=khz * 1000)

    def kill(self) -> None:
        """Kill QEMU at once (as a kernel that died would) and wait for its boot thread."""
        if self._proc is not None:
            self._proc.kill()
        if self._thread is not None:
            self._thread.join(30)

    def step_clock(self, delta_ns: int, deadline: float) -> None:
        self.call({"op": "settime", "delta_ns": delta_ns}, deadline)

    def stop(self, timeout: float = 60) -> None:
        """Ask the agent to exit (then /init powers off) and wait for QEMU; kill it if need be."""
        if self._sock is not None:
            try:
                self._sock.sendall(b'{"op": "exit"}\n')
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive() and self._proc is not None:
                self._proc.kill()  # xen_lane.boot then returns and reaps it
                self._thread.join(30)
        if self._sock is not None:
            self._sock.close()
        self._listener.close()
        self.control.unlink(missing_ok=True)

    def last_words(self) -> str:
        """The agent's last output lines (/init keeps them in output.log), for an error."""
        log = self.results / "output.log"
        lines = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
        return (f"its last output: {' | '.join(lines)}" if lines else "it printed nothing") + \
            f" (console: {self.results / 'console.log'})"

    @property
    def console(self) -> str:
        path = self.results / "console.log"
        return xen_lane.log_text(path) if path.exists() else ""

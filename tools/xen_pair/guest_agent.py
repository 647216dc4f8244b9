"""The control agent inside each pair machine: JSON lines over a virtio-serial port.

The host drives both machines through it and measures their clocks through it, so this path is
independent of the network link under test (virtio-net). One request, one reply, in order:

  {"op": "time"}                      -> {"realtime_ns": N}      the host's time reference
  {"op": "tsc"}                       -> {"tsc": N}              the host's TSC reference (rdtsc)
  {"op": "settime", "delta_ns": D}    -> {"realtime_ns": N}      CLOCK_REALTIME stepped by D
  {"op": "run", "argv": [...], "timeout": S, "env": {...}} -> {"rc", "stdout", "stderr"}
  {"op": "spawn", "argv": [...], "log": PATH, "env": {...}} -> {"pid"}   in the background
  {"op": "exit"}                      -> {} and the agent exits (then /init powers off)

A failing request replies {"error": "..."}; the agent keeps serving. Standard library only: it runs
with the host's python from the read-only root, before anything else is set up.
"""
from __future__ import annotations

import ctypes
import fcntl
import json
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

PORT_NAME = "testbed.ctl"
#: rdtsc; shl rdx, 32; or rax, rdx; ret -- the x86-64 TSC as one u64 (System V ABI).
RDTSC_CODE = bytes([0x0F, 0x31, 0x48, 0xC1, 0xE2, 0x20, 0x48, 0x09, 0xD0, 0xC3])


def make_rdtsc():
    """This machine's TSC as a Python callable: ten bytes of machine code in an executable
    page (the standard library has no rdtsc). The host side uses the same function, so both
    ends of the TSC reference read the TSC the same way."""
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(RDTSC_CODE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    function = ctypes.CFUNCTYPE(ctypes.c_uint64)(address)
    function.page = page  # the page lives as long as the function
    return function


def find_port() -> Path:
    """The virtio-serial port QEMU named testbed.ctl (no udev here: look it up in sysfs)."""
    for entry in Path("/sys/class/virtio-ports").glob("*"):
        if (entry / "name").read_text().strip() == PORT_NAME:
            return Path("/dev") / entry.name
    raise SystemExit(f"no virtio-serial port named {PORT_NAME}")


KVM_CREATE_VM = 0xAE01  # _IO(KVMIO, 0x01)


def hold_a_vm() -> int | None:
    """An empty KVM VM held open for the machine's life, so that KVM's preempt-notifier static
    key (enabled at the first VM's creation, disabled at the last one's destruction) is never
    patched in and out of __schedule by the migrations' own VMs. Under multi-threaded TCG that
    INT3-based text patching is what oopsed these machines: "int3: 0000" at __schedule+0x444,
    three times, always while a scenario created or destroyed a VM (docs/pair.md). None where
    there is no /dev/kvm (nothing to protect then)."""
    try:
        kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
    except OSError:
        return None
    finally:
        os.close(kvm)


def handle(request: dict, children: list[subprocess.Popen], rdtsc) -> dict:
    op = request.get("op")
    if op == "time":
        return {"realtime_ns": time.clock_gettime_ns(time.CLOCK_REALTIME)}
    if op == "tsc":
        return {"tsc": rdtsc()}
    if op == "settime":
        now = time.clock_gettime_ns(time.CLOCK_REALTIME)
        time.clock_settime_ns(time.CLOCK_REALTIME, now + int(request["delta_ns"]))
        return {"realtime_ns": time.clock_gettime_ns(time.CLOCK_REALTIME)}
    env = {**os.environ, **request.get("env", {})}
    if op == "run":
        try:
            proc = subprocess.run(request["argv"], capture_output=True, text=True, env=env,
                                  timeout=request.get("timeout", 300), stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            return {"error": f"timed out after {e.timeout} s: {request['argv']}"}
        return {"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}
    if op == "spawn":
        with open(request["log"], "ab") as log:  # the child keeps its own descriptor
            child = subprocess.Popen(request["argv"], stdout=log, stderr=subprocess.STDOUT,
                                     env=env, stdin=subprocess.DEVNULL)
        children.append(child)
        return {"pid": child.pid}
    if op == "poll":
        child = next(c for c in children if c.pid == request["pid"])
        return {"rc": child.poll()}
    return {"error": f"unknown op {op!r}"}


def main() -> int:
    port = find_port()
    children: list[subprocess.Popen] = []
    rdtsc = make_rdtsc()
    held = hold_a_vm()
    fd = os.open(port, os.O_RDWR)  # a virtio port opens once: one descriptor both ways
    os.write(fd, json.dumps({"hello": True, "held_vm": held is not None}).encode() + b"\n")
    buffer = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:  # the host side is not connected (or went away): wait for it
            time.sleep(0.05)
            continue
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            request = json.loads(line)
            if request.get("op") == "exit":
                os.write(fd, b"{}\n")
                for child in children:
                    child.terminate()
                return 0
            try:
                reply = handle(request, children, rdtsc)
            except Exception as e:  # a bad request must not end the agent
                reply = {"error": f"{type(e).__name__}: {e}"}
            os.write(fd, json.dumps(reply).encode() + b"\n")


if __name__ == "__main__":
    sys.exit(main())

"""Per-phase cost of an in-process migration cycle: kvmcore (Python) next to plain C.

    python bench/kvmcore_cycle.py [--cycles N] [--sizes 2,256]

Phases (both languages, same ioctl sequence; bench/c/cycle.c):
  create       guest RAM mmap, KVM_CREATE_VM, memory slot, vCPU, kvm_run mmap, CPUID
  setup        guest image, page tables, GDT, long-mode sregs, regs
  run          KVM_RUN until the guest's first report
  capture      complete the pending `out`, read registers/MSRs/clock/TSC, close the VM
  restore      new VM on the same RAM, registers, MSRs, KVM_SET_CLOCK(REALTIME)
  first_entry  KVM_RUN until the resumed guest's next report
Prints medians (ms) and the Python/C ratio. Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import resources

from kvmcore import Guest, GuestConfig, Strategy, System, capture, probe, restore

PHASES = ["create", "setup", "run", "capture", "restore", "first_entry"]
HERE = os.path.dirname(os.path.abspath(__file__))


def python_cycles(kvm: System, memory_size: int, cycles: int) -> dict[str, int]:
    caps = probe(kvm)
    strategy = Strategy.best(caps)
    samples: dict[str, list[int]] = {p: [] for p in PHASES}
    for _ in range(cycles + 1):                      # the first cycle warms caches
        g = Guest.create(kvm, GuestConfig(memory_size=memory_size))
        g.run_until_snapshot()
        t0 = time.perf_counter_ns()
        state = capture(g)
        g.close()
        t_capture = time.perf_counter_ns() - t0
        g2 = restore(kvm, strategy.check(caps, state), g.memory)
        first = g2.run_until_snapshot()
        g2.close()
        g.memory.close()
        record = g2.restore_record
        assert record is not None
        for phase, ns in (("create", g.timings["create"]), ("setup", g.timings["setup"]),
                          ("run", g.timings["run"]), ("capture", t_capture),
                          ("restore", record.restore_ns),
                          ("first_entry", first.host_run_ns)):
            samples[phase].append(ns)
    return {p: int(statistics.median(v[1:])) for p, v in samples.items()}


def c_cycles(memory_size: int, cycles: int) -> dict[str, int]:
    guest_bin = resources.files("kvmcore") / "guest.bin"
    include = os.path.join(HERE, os.pardir, "kvmcore", "guest_program")
    with tempfile.TemporaryDirectory() as tmp, resources.as_file(guest_bin) as image:
        exe = os.path.join(tmp, "cycle")
        subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-I", include,
                        os.path.join(HERE, "c", "cycle.c"), "-o", exe], check=True)
        out = subprocess.run([exe, str(image), str(memory_size), str(cycles + 1)],
                             check=True, capture_output=True, text=True).stdout
    return {name: int(ns) for name, ns in (line.split() for line in out.splitlines())}


def downtime_ns(cycle: dict[str, int]) -> int:
    """What of a cycle a migration's downtime holds: capture, restore and the first entry."""
    return cycle["capture"] + cycle["restore"] + cycle["first_entry"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--sizes", default="2,256", help="guest sizes in MiB")
    args = parser.parse_args()

    with System() as kvm:
        print(f"strategy {Strategy.best(probe(kvm))}, {args.cycles} cycles, "
              "medians in ms")
        for mib in (int(s) for s in args.sizes.split(",")):
            size = mib << 20
            c = c_cycles(size, args.cycles)
            py = python_cycles(kvm, size, args.cycles)
            print(f"\n{mib} MiB guest   {'python':>8} {'C':>8} {'ratio':>6}")
            for phase in [*PHASES, "total"]:
                p = sum(py.values()) if phase == "total" else py[phase]
                q = sum(c.values()) if phase == "total" else c[phase]
                print(f"{phase:<13} {p / 1e6:8.3f} {q / 1e6:8.3f} {p / q:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

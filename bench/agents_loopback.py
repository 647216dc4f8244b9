"""Loopback migration through both agents, per phase, next to kvmcore's in-process cycle and C.

    python bench/agents_loopback.py [--runs N] [--memory-mib M] [--no-c]

Both agents run in this process under one trio run, talking over real TCP on
127.0.0.1 with a random key (exactly `source-agent loopback`, minus the CLI),
warm-up 0 (the guest's first report is captured), no extra gap. Phases are the
report's (downtime by phase); "agent path" is migrate() as a whole: connect,
HELLO/AUTH, clock sync, the guest's creation and run, capture, transfer,
restore, first entry, REPORT, BYE. The in-process kvmcore cycle and the C
ioctl sequence come from bench/kvmcore_cycle.py (imported, not copied).
Prints medians in ms. Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import trio
from cryptography.hazmat.primitives.poly1305 import Poly1305

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kvmcore_cycle

from kvmcore import Strategy, System, probe
from source_agent.loopback import loopback
from source_agent.migrate import MigrationPlan
from source_agent.report import compose

SOURCE = ["connect_ns", "handshake_ns", "guest_ns", "send_ns", "report_wait_ns"]
#: Outside the downtime since the source guest is kept until the REPORT (source_agent.stats).
OUTSIDE = ["source_destroy_ns"]
PHASES = ["stop_ns", "capture_ns", "encode_ns", "transfer_ns", "validate_ns", "restore_ns",
          "first_entry_ns", "other_ns", "total_ns"]


async def agent_runs(kvm: System, memory_size: int, runs: int) -> dict[str, list[int]]:
    caps = probe(kvm)
    plan = MigrationPlan(host="127.0.0.1", port=0, psk=b"", strategy=Strategy.best(caps),
                         memory_size=memory_size, warmup_ns=0, clock_rounds=8)
    samples: dict[str, list[int]] = {p: [] for p in [*PHASES, *SOURCE, *OUTSIDE,
                                                     "agent_path_ns"]}
    for i in range(runs + 1):                        # the first run warms caches
        t0 = time.perf_counter_ns()
        m = await loopback(plan, kvm, caps)
        path = time.perf_counter_ns() - t0
        report = compose(m, run_id=str(i), started_ns=0, command="bench")
        if report["exit_code"] != 0:
            raise SystemExit(f"run {i} failed its verdicts: {report['error']}")
        if i == 0:
            continue
        for phase in PHASES:
            samples[phase].append(report["downtime"][phase])
        for phase in SOURCE:
            samples[phase].append(m.source_phases[phase])
        for phase in OUTSIDE:
            samples[phase].append(report["migration"][phase])
        samples["agent_path_ns"].append(path)
    return samples


def load() -> str:
    """The 1-minute load average (this host is shared: figures depend on it)."""
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def tag_ms(size: int) -> float:
    """One side's memory tag (protocol 2: Poly1305, inline beside the I/O) over ``size`` bytes."""
    data = bytes(size)
    times = []
    for _ in range(20):
        t0 = time.perf_counter_ns()
        Poly1305.generate_tag(bytes(32), data)
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times) / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--memory-mib", type=int, default=2)
    parser.add_argument("--no-c", action="store_true", help="skip the C reference")
    args = parser.parse_args()
    size = args.memory_mib << 20
    load_before = load()

    with System() as kvm:
        samples = trio.run(agent_runs, kvm, size, args.runs)
        py = kvmcore_cycle.python_cycles(kvm, size, args.runs)
        strategy = Strategy.best(probe(kvm))
    c = None if args.no_c else kvmcore_cycle.c_cycles(size, args.runs)

    med = {k: statistics.median(v) / 1e6 for k, v in samples.items()}
    print(f"{args.memory_mib} MiB guest, strategy {strategy}, "
          f"{args.runs} runs, medians in ms; load average {load_before} at start, {load()} at end "
          f"({os.cpu_count()} CPUs, shared)\n")
    print("agents over TCP (downtime by phase)")
    for phase in PHASES:
        print(f"  {phase.removesuffix('_ns'):<13} {med[phase]:8.3f}")
    print("source agent's own steps")
    for phase in SOURCE:
        print(f"  {phase.removesuffix('_ns'):<13} {med[phase]:8.3f}")
    print(f"  {'agent path':<13} {med['agent_path_ns']:8.3f}   (server start .. BYE: loopback())")
    print("outside the downtime")
    for phase in OUTSIDE:
        print(f"  {phase.removesuffix('_ns'):<15} {med[phase]:8.3f}   (after the REPORT)")
    tagging = tag_ms(size)
    print(f"  (transfer: {size / med['transfer_ns'] / 1e3:.0f} MB/s; the Poly1305 tag of the guest "
          f"memory, which both sides compute for COMMIT, inline beside the I/O: "
          f"{tagging:.3f} ms per side)")
    print("\nin-process kvmcore cycle (bench/kvmcore_cycle.py)")
    cycle_total = sum(py.values()) / 1e6
    c_total = sum(c.values()) / 1e6 if c else None
    for phase in kvmcore_cycle.PHASES:
        ref = f"{c[phase] / 1e6:8.3f}" if c else "       -"
        print(f"  {phase:<13} {py[phase] / 1e6:8.3f} {ref}")
    print(f"  {'total':<13} {cycle_total:8.3f} {c_total if c_total is None else f'{c_total:8.3f}'}"
          "   (python, C)")
    if c_total:
        print(f"\nagent path / C cycle: {med['agent_path_ns'] / c_total:.2f}x; "
              f"downtime total / C (capture+restore+first entry): "
              f"{med['total_ns'] / (kvmcore_cycle.downtime_ns(c) / 1e6):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Live migration through both agents, side by side in one run: what precopy buys and costs.

    python bench/live_migration.py [--runs N] [--big-mib 256] [--no-c]

All through `source_agent.loopback` (both agents in this process, real TCP on
127.0.0.1, the host's best strategy), interleaved run by run so every figure sees
the same load from the machine's other tenants:

1. a ``--big-mib`` stop-copy migration's transfer (the migration statistics'
   bandwidth, MIGRATE to its COMMIT written) against a raw socket ``sendall`` of
   the same bytes to a receiving thread;
2. the 2 MiB stop-copy downtime (source stop -> destination's first report)
   against the C ioctl cycle's capture + restore + first entry
   (bench/kvmcore_cycle.py, imported);
3. precopy of ``--big-mib`` with no dirtying (round 0 while the guest runs; only the
   pages it wrote meanwhile after the stop) against the 2 MiB stop-copy downtime;
4. precopy of a 64 MiB guest dirtying 8 MiB at 50 MiB/s: rounds until the 30 ms
   limit is met (at most 10), and its downtime.

Medians in ms (bandwidths in MiB/s). Figures only: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import threading
import time
from dataclasses import replace

import trio

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kvmcore_cycle  # noqa: E402
from agents_loopback import load  # noqa: E402

from kvmcore import Strategy, System, probe  # noqa: E402
from source_agent.loopback import loopback  # noqa: E402
from source_agent.migrate import MigrationPlan  # noqa: E402

MiB = 1 << 20


def raw_socket_bandwidth(data: memoryview) -> float:
    """Bytes/s of one ``sendall`` of ``data`` over TCP on 127.0.0.1 to a thread receiving it
    into a buffer of its own."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        sink = bytearray(len(data))

        def receive() -> None:
            conn, _ = server.accept()
            with conn:
                view, got = memoryview(sink), 0
                while got < len(sink):
                    got += conn.recv_into(view[got:])
                conn.sendall(b"\1")

        thread = threading.Thread(target=receive)
        thread.start()
        with socket.create_connection(server.getsockname()) as conn:
            t0 = time.perf_counter()
            conn.sendall(data)
            assert conn.recv(1) == b"\1"
            elapsed = time.perf_counter() - t0
        thread.join()
    return len(data) / elapsed


async def run(plan: MigrationPlan, kvm: System, caps) -> dict:
    m = await loopback(plan, kvm, caps)
    if m.analysis.failed:
        raise SystemExit(f"{plan.mode} {plan.memory_size >> 20} MiB failed {m.analysis.failed}")
    return m.stats.to_plain()


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--big-mib", type=int, default=256)
    parser.add_argument("--no-c", action="store_true", help="skip the C reference")
    args = parser.parse_args()
    big = args.big_mib * MiB
    load_before = load()
    data = memoryview(os.urandom(big))
    figures: dict[str, list[float]] = {key: [] for key in (
        "raw", "big_stop_copy_bw", "small_downtime", "big_precopy_downtime",
        "big_precopy_rounds", "dirty_downtime", "dirty_rounds", "dirty_converged")}
    with System() as kvm:
        caps = probe(kvm)
        base = MigrationPlan(host="127.0.0.1", port=0, psk=b"", strategy=Strategy.best(caps),
                             warmup_ns=0)
        plans = {
            "big": replace(base, memory_size=big),
            "small": base,
            "big_precopy": replace(base, memory_size=big, mode="precopy"),
            "dirty": replace(base, memory_size=64 * MiB, mode="precopy", dirty_rate=50 * MiB,
                             working_set=8 * MiB, warmup_ns=20_000_000),
        }
        trio.run(run, plans["small"], kvm, caps)               # warm caches
        for _ in range(args.runs):
            figures["raw"].append(raw_socket_bandwidth(data) / MiB)
            s = trio.run(run, plans["big"], kvm, caps)
            figures["big_stop_copy_bw"].append(s["bandwidth"] / MiB)
            s = trio.run(run, plans["small"], kvm, caps)
            figures["small_downtime"].append(s["downtime_ns"] / 1e6)
            s = trio.run(run, plans["big_precopy"], kvm, caps)
            figures["big_precopy_downtime"].append(s["downtime_ns"] / 1e6)
            figures["big_precopy_rounds"].append(len(s["rounds"]))
            s = trio.run(run, plans["dirty"], kvm, caps)
            figures["dirty_downtime"].append(s["downtime_ns"] / 1e6)
            figures["dirty_rounds"].append(len(s["rounds"]))
            figures["dirty_converged"].append(bool(s["converged"]))
        c = None if args.no_c else kvmcore_cycle.c_cycles(2 * MiB, max(args.runs, 5))
    med = {key: median(values) for key, values in figures.items()}
    print(f"strategy {Strategy.best(caps)}, {args.runs} run(s), medians; load average "
          f"{load_before} at start, {load()} at end ({os.cpu_count()} CPUs, shared)\n")
    print(f"1. {args.big_mib} MiB transfer: agents {med['big_stop_copy_bw']:8.1f} MiB/s, raw socket "
          f"{med['raw']:8.1f} MiB/s ({med['big_stop_copy_bw'] / med['raw']:.2f}x)")
    c_ms = kvmcore_cycle.downtime_ns(c) / 1e6 if c else None
    print(f"2. 2 MiB stop-copy downtime {med['small_downtime']:8.3f} ms; C cycle (capture + "
          f"restore + first entry) " + (f"{c_ms:8.3f} ms ({med['small_downtime'] / c_ms:.2f}x)"
                                        if c_ms else "- (--no-c)"))
    print(f"3. precopy {args.big_mib} MiB, no dirtying: downtime "
          f"{med['big_precopy_downtime']:8.3f} ms in {med['big_precopy_rounds']:.0f} round(s) "
          f"against 2 MiB stop-copy {med['small_downtime']:8.3f} ms "
          f"({med['big_precopy_downtime'] / med['small_downtime']:.2f}x)")
    print(f"4. precopy 64 MiB dirtying 8 MiB at 50 MiB/s: converged in "
          f"{sum(figures['dirty_converged'])}/{args.runs} run(s) within 10 rounds (median "
          f"{med['dirty_rounds']:.0f} rounds), downtime {med['dirty_downtime']:8.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

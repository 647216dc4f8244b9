"""Live migration between two agent processes, side by side in one run: issue 13's targets.

    python bench/live_migration.py [--runs N] [--big-mib 256] [--no-c] [--loopback]

The destination is ``dest-agent serve`` in a process of its own (as a user runs it);
this process is the source agent (`source_agent.migrate.migrate`, what ``source-agent
migrate --to`` runs); they talk over TCP on 127.0.0.1.  (``--loopback`` puts both agents
in this process instead, as ``source-agent loopback`` does: they then share one GIL, and
the figures are not the issue's "between two agent processes".)  The raw socket's receiver
is a process of its own as well.  Interleaved run by run so every figure sees the same
load from the machine's other tenants:

1. a ``--big-mib`` stop-copy migration's transfer, end to end (MIGRATE's first byte
   leaving the source -> the destination's COMMIT verified, on the hosts' realtime),
   against a raw socket ``sendall`` of the same bytes to a process ``recv_into`` a buffer
   of its own (then a one-byte reply); the ratio is the median of each run's pair;
2. the 2 MiB stop-copy downtime (source stop -> destination's first report), phase by
   phase, against the C ioctl cycle of the same run (bench/kvmcore_cycle.py, imported):
   its capture + restore + first entry, and its whole cycle;
3. ``--big-mib`` stop-copy with ``--destroy-first`` (no PREPARE: the destination
   allocates and creates at MIGRATE) against the prepared one of figure 1: transfer and
   downtime;
4. precopy of ``--big-mib`` with no dirtying against the 2 MiB stop-copy downtime;
5. precopy of a 64 MiB guest dirtying 8 MiB at 50 MiB/s: rounds until the 30 ms limit
   is met (at most 10), and its downtime.

Medians in ms (bandwidths in MiB/s). Figures only: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import trio

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kvmcore_cycle  # noqa: E402
from agents_loopback import load  # noqa: E402
from data_path import raw_sink, raw_transfer  # noqa: E402

from kvmcore import Strategy, System, probe  # noqa: E402
from source_agent.loopback import loopback  # noqa: E402
from source_agent.migrate import Migration, MigrationPlan, migrate  # noqa: E402

MiB = 1 << 20


def raw_receiver(pipe: Any, size: int) -> None:
    """The raw socket's receiver, in its own process: each connection's ``size`` bytes
    ``recv_into`` one buffer of its own, then a one-byte reply (bench/data_path.py's sink)."""
    server = socket.create_server(("127.0.0.1", 0))
    pipe.send(server.getsockname()[1])
    raw_sink(server, memoryview(bytearray(size)))


@contextlib.contextmanager
def destination_process() -> Iterator[int]:
    """``dest-agent serve`` on 127.0.0.1 (an ephemeral port, no key: loopback only); its port."""
    process = subprocess.Popen([sys.executable, "-m", "dest_agent", "serve", "--listen",
                                "127.0.0.1:0", "--max-memory", "1GiB"],
                               stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        for line in process.stderr:
            if found := re.search(r"serving on [\d.]+:(\d+)", line):
                break
        else:
            raise SystemExit(f"dest-agent exited ({process.wait()}) without serving")
        # Its one line per session goes on being read, so that it never blocks on a full pipe.
        threading.Thread(target=process.stderr.read, daemon=True).start()
        yield int(found.group(1))
    finally:
        process.terminate()
        process.wait(10)


def checked(m: Migration, plan: MigrationPlan) -> Migration:
    if m.analysis.failed:
        raise SystemExit(f"{plan.mode} {plan.memory_size >> 20} MiB failed {m.analysis.failed}")
    return m


def transfer_ns(m: Migration) -> int:
    """MIGRATE's first byte sent -> COMMIT verified at the destination (its realtime, offset
    corrected): the memory's whole way, as the raw socket's figure is."""
    offset = round(m.clock.offset_ns)
    return m.destination.phases.commit_realtime_ns - offset - m.send_start_realtime_ns


def downtime_phases(m: Migration) -> dict[str, int]:
    """The downtime cut at every instant both agents stamp (ns, on the source's realtime)."""
    offset = round(m.clock.offset_ns)
    state, dest, after = m.source.state, m.destination, m.destination.after
    capture_start = state.capture_realtime_ns - state.timings["before_clock"]
    capture_end = capture_start + state.timings["capture"]
    migrate_rt = dest.phases.migrate_realtime_ns - offset
    commit_rt = dest.phases.commit_realtime_ns - offset
    entry_rt = after.host_entry_realtime_ns - offset
    restore_start = entry_rt - dest.restore_record.restore_ns
    marks = [("stop -> capture", m.source.stop_realtime_ns, capture_start),
             ("capture", capture_start, capture_end),
             ("to trio, MIGRATE encoded", capture_end, m.send_start_realtime_ns),
             ("MIGRATE sent -> received", m.send_start_realtime_ns, migrate_rt),
             ("validate", migrate_rt, migrate_rt + dest.phases.validate_ns),
             ("memory + COMMIT", migrate_rt + dest.phases.validate_ns, commit_rt),
             ("COMMIT -> restore starts", commit_rt, restore_start),
             ("restore", restore_start, entry_rt),
             ("first entry", entry_rt, after.host_realtime_ns - offset)]
    phases = {name: end - start for name, start, end in marks}
    phases["total"] = m.stats.downtime_ns
    return phases


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--big-mib", type=int, default=256)
    parser.add_argument("--no-c", action="store_true", help="skip the C reference")
    parser.add_argument("--loopback", action="store_true",
                        help="both agents in this process (one GIL), not two processes")
    args = parser.parse_args()
    big = args.big_mib * MiB
    load_before = load()
    data = memoryview(os.urandom(big))
    figures: dict[str, list[float]] = {}
    phases: dict[str, list[int]] = {}

    def note(key: str, value: float) -> None:
        figures.setdefault(key, []).append(value)

    mine, theirs = multiprocessing.Pipe()
    sink = multiprocessing.get_context("spawn").Process(target=raw_receiver, args=(theirs, big),
                                                        daemon=True)
    sink.start()
    with System() as kvm, destination_process() as port:
        raw_port = mine.recv()
        caps = probe(kvm)
        base = MigrationPlan(host="127.0.0.1", port=port, psk=b"",
                             strategy=Strategy.best(caps), warmup_ns=0)
        plans = {
            "big": replace(base, memory_size=big),
            "small": base,
            "big_destroy_first": replace(base, memory_size=big, destroy_first=True),
            "big_precopy": replace(base, memory_size=big, mode="precopy"),
            "dirty": replace(base, memory_size=64 * MiB, mode="precopy", dirty_rate=50 * MiB,
                             working_set=8 * MiB, warmup_ns=20_000_000),
        }

        def run(name: str) -> Migration:
            plan = plans[name]
            if args.loopback:
                return checked(trio.run(loopback, plan, kvm, caps), plan)
            return checked(trio.run(migrate, plan, kvm, caps), plan)

        run("small")                                           # warm both agents
        raw_transfer(raw_port, data)                            # and the raw sink's buffer
        for _ in range(args.runs):
            raw = big / raw_transfer(raw_port, data) / MiB
            m = run("big")
            agents = big / (transfer_ns(m) / 1e9) / MiB
            note("raw", raw)
            note("agents", agents)
            note("agents/raw", agents / raw)
            note("big_downtime", m.stats.downtime_ns / 1e6)
            m = run("small")
            note("small_downtime", m.stats.downtime_ns / 1e6)
            for phase, ns in downtime_phases(m).items():
                phases.setdefault(phase, []).append(ns)
            m = run("big_destroy_first")
            note("destroy_first_bw", big / (transfer_ns(m) / 1e9) / MiB)
            note("destroy_first_downtime", m.stats.downtime_ns / 1e6)
            m = run("big_precopy")
            note("big_precopy_downtime", m.stats.downtime_ns / 1e6)
            note("big_precopy_rounds", len(m.stats.rounds))
            m = run("dirty")
            note("dirty_downtime", m.stats.downtime_ns / 1e6)
            note("dirty_rounds", len(m.stats.rounds))
            note("dirty_converged", bool(m.stats.converged))
        c = None if args.no_c else kvmcore_cycle.c_cycles(2 * MiB, max(args.runs, 5))
    sink.kill()
    med = {key: median(values) for key, values in figures.items()}
    where = "both agents in this process (--loopback)" if args.loopback else \
        "the destination agent in its own process (dest-agent serve)"
    print(f"strategy {Strategy.best(caps)}, {where}, {args.runs} run(s), medians; load "
          f"average {load_before} at start, {load()} at end ({os.cpu_count()} CPUs, shared)\n")
    print(f"1. {args.big_mib} MiB transfer (MIGRATE -> COMMIT verified): agents "
          f"{med['agents']:7.1f} MiB/s, raw socket {med['raw']:7.1f} MiB/s: agents/raw "
          f"{med['agents/raw']:.2f} (runs {min(figures['agents/raw']):.2f}-"
          f"{max(figures['agents/raw']):.2f}); its downtime {med['big_downtime']:.1f} ms")
    total = med["small_downtime"]
    if c:
        c_down, c_whole = kvmcore_cycle.downtime_ns(c) / 1e6, sum(c.values()) / 1e6
        versus = (f"C cycle: capture + restore + first entry {c_down:.3f} ms ({total / c_down:.2f}x), "
                  f"whole cycle {c_whole:.3f} ms ({total / c_whole:.2f}x)")
    else:
        versus = "C cycle - (--no-c)"
    print(f"2. 2 MiB stop-copy downtime {total:.3f} ms; {versus}")
    for phase, values in phases.items():
        print(f"     {phase:<26} {median(values) / 1e6:8.3f} ms")
    print(f"3. {args.big_mib} MiB --destroy-first: transfer {med['destroy_first_bw']:7.1f} MiB/s "
          f"(prepared: {med['agents']:7.1f}), downtime {med['destroy_first_downtime']:.1f} ms "
          f"(prepared: {med['big_downtime']:.1f})")
    print(f"4. precopy {args.big_mib} MiB, no dirtying: downtime "
          f"{med['big_precopy_downtime']:8.3f} ms in {med['big_precopy_rounds']:.0f} round(s) "
          f"against 2 MiB stop-copy {total:8.3f} ms "
          f"({med['big_precopy_downtime'] / total:.2f}x)")
    print(f"5. precopy 64 MiB dirtying 8 MiB at 50 MiB/s: converged in "
          f"{sum(figures['dirty_converged']):.0f}/{args.runs} run(s) within 10 rounds (median "
          f"{med['dirty_rounds']:.0f} rounds), downtime {med['dirty_downtime']:8.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

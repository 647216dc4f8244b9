"""Soak: many loopback migrations through both agents; nothing may leak, no run may fail.

    python bench/soak.py [--runs 1000] [--memory 2MiB] [--every 100] [--rss-slack 16MiB]

The destination is a real ``dest-agent serve`` process on 127.0.0.1:<free port>; the source
drives ``source_agent.migrate.migrate`` in this process (one trio run, one /dev/kvm handle, the
same coroutine `source-agent migrate` and sweeps call), so a thousand runs take minutes, not a
thousand interpreter start-ups. Both processes are measured from /proc -- descriptors, threads,
RSS, and the destination's VMs (its ``anon_inode:kvm-vm`` descriptors) -- after a warm-up, every
``--every`` runs and at the end. Exit 0 only if every run passed and the end figures are flat:
descriptors equal, VMs zero, threads not above the start (trio's idle worker threads expire on
their own), RSS within ``--rss-slack`` of the start.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvmcore import Strategy, System, probe  # noqa: E402
from source_agent.migrate import MigrationPlan, migrate  # noqa: E402
from agentcore.options import parse_size  # noqa: E402

WARMUP_RUNS = 5


def figures(pid: int) -> dict[str, int]:
    """Descriptors, VMs, threads and RSS (KiB) of ``pid``, read from /proc."""
    fd_dir = f"/proc/{pid}/fd"
    links = []
    for name in os.listdir(fd_dir):
        try:
            links.append(os.readlink(os.path.join(fd_dir, name)))
        except FileNotFoundError:
            pass
    status = Path(f"/proc/{pid}/status").read_text()
    threads = int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
    rss = int(re.search(r"^VmRSS:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
    return {"fds": len(links), "vms": links.count("anon_inode:kvm-vm"), "threads": threads,
            "rss_kib": rss}


def line(label: str, runs: int, dest: dict[str, int], source: dict[str, int]) -> str:
    def one(f: dict[str, int]) -> str:
        return f"fds {f['fds']:3d} vms {f['vms']} threads {f['threads']:2d} rss {f['rss_kib'] / 1024:6.1f} MiB"
    return f"{label:>5} {runs:5d} runs | destination {one(dest)} | source {one(source)}"


def start_destination(log: Path) -> tuple[subprocess.Popen[bytes], int]:
    agent = Path(sys.executable).parent / "dest-agent"
    argv = [str(agent)] if agent.exists() else [sys.executable, "-P", "-m", "dest_agent"]
    proc = subprocess.Popen([*argv, "serve", "--listen", "127.0.0.1:0"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        match = re.search(r"serving on 127\.0\.0\.1:(\d+)", log.read_text())
        if match:
            return proc, int(match.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    raise SystemExit(f"dest-agent did not start:\n{log.read_text()}")


def sessions_logged(log: Path) -> int:
    return len(re.findall(r"^dest-agent: session ", log.read_text(), re.M))


async def quiesced(log: Path, runs: int) -> None:
    """Wait (bounded) until the destination has logged the end of every session so far: it
    logs after closing the connection, so a measurement is not racing the last one's close."""
    with trio.move_on_after(10):
        while sessions_logged(log) < runs:
            await trio.sleep(0.005)


async def soak(args: argparse.Namespace, dest_pid: int, port: int, log: Path) -> int:
    plan = MigrationPlan(host="127.0.0.1", port=port, psk=b"", memory_size=args.memory,
                         warmup_ns=0, strategy=Strategy("realtime", "none", "off"),
                         topology="soak")
    failures: list[str] = []
    with System() as kvm:
        caps = await trio.to_thread.run_sync(probe, kvm)

        async def run(i: int) -> None:
            try:
                m = await migrate(plan, kvm, caps)
                if not m.analysis.checks["sequence_continues"].ok:
                    failures.append(f"run {i}: the guest's sequence did not continue")
            except Exception as exc:  # noqa: BLE001 -- a failed run is counted and reported
                failures.append(f"run {i}: {type(exc).__name__}: {exc}")

        for i in range(WARMUP_RUNS):
            await run(-1 - i)
        await quiesced(log, WARMUP_RUNS)
        start = figures(dest_pid), figures(os.getpid())
        print(line("start", 0, *start), flush=True)
        t0 = time.monotonic()
        for i in range(args.runs):
            await run(i)
            if (i + 1) % args.every == 0 and i + 1 < args.runs:
                await quiesced(log, WARMUP_RUNS + i + 1)
                print(line("", i + 1, figures(dest_pid), figures(os.getpid())), flush=True)
        elapsed = time.monotonic() - t0
        await quiesced(log, WARMUP_RUNS + args.runs)
        # Let trio's idle worker threads expire (10 s) so the thread count is comparable.
        with trio.move_on_after(15):
            while figures(dest_pid)["threads"] > start[0]["threads"] or \
                    figures(os.getpid())["threads"] > start[1]["threads"]:
                await trio.sleep(0.2)
        end = figures(dest_pid), figures(os.getpid())
        print(line("end", args.runs, *end))
    print(f"{args.runs} migrations of a {args.memory >> 20} MiB guest in {elapsed:.1f} s "
          f"({args.runs / elapsed:.1f}/s), {len(failures)} failed")
    for failure in failures[:20]:
        print("  " + failure)
    problems = []
    for who, s, e in (("destination", start[0], end[0]), ("source", start[1], end[1])):
        if e["fds"] != s["fds"]:
            problems.append(f"{who}: descriptors {s['fds']} -> {e['fds']}")
        if e["vms"]:
            problems.append(f"{who}: {e['vms']} VM(s) left")
        if e["threads"] > s["threads"]:
            problems.append(f"{who}: threads {s['threads']} -> {e['threads']}")
        if e["rss_kib"] - s["rss_kib"] > args.rss_slack >> 10:
            problems.append(f"{who}: RSS grew {(e['rss_kib'] - s['rss_kib']) / 1024:.1f} MiB "
                            f"(slack {args.rss_slack >> 20} MiB)")
    print("flat: " + ("yes" if not problems else "NO -- " + "; ".join(problems)))
    return 0 if not failures and not problems else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--memory", type=parse_size, default=2 << 20, help="guest memory (2MiB)")
    parser.add_argument("--every", type=int, default=100, help="print figures every N runs")
    parser.add_argument("--rss-slack", type=parse_size, default=16 << 20,
                        help="allowed RSS growth per process (16MiB)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        log = Path(tmp) / "dest.log"
        proc, port = start_destination(log)
        try:
            code = trio.run(soak, args, proc.pid, port, log)
            done = len(re.findall(r"session \S+: done, 1 migration", log.read_text()))
            print(f"destination log: {done} sessions done, "
                  f"{len(re.findall(r'session ', log.read_text())) - done} otherwise")
        finally:
            proc.kill()
            proc.wait()
    return code


if __name__ == "__main__":
    sys.exit(main())

"""Protocol throughput and small-message latency; prints a table (no pass/fail: figures only).

    python bench/protocol_throughput.py [--sizes-mib 2 256] [--round-trips 2000]

1. In-process (sans-IO, no sockets): encode + decode of a guest memory of
   2 MiB and 256 MiB through a source and a destination `Session` (MIGRATE,
   MEMORY chunks received straight into a buffer, COMMIT with its Poly1305 tag),
   next to a plain copy of the same bytes and the Poly1305 MAC alone.
2. The same migration over loopback TCP through two `Channel`s, the
   destination in its own process as on a real host.
3. One small request/response (CLOCK_REQUEST -> CLOCK_REPLY, MACed) over
   loopback TCP through `Channel`s, against a raw trio socket echo of the same
   size: the protocol's added latency is the difference of the medians.

Targets (issue 3): memory streaming >= 1 GB/s over loopback, small-message
overhead <= 50 us.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import trio
from cryptography.hazmat.primitives.poly1305 import Poly1305

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol_common import authenticated_pair, timed_migration  # noqa: E402

import protocol  # noqa: E402
from protocol import Channel, MiB, Session  # noqa: E402
from protocol._auth import FrameMac  # noqa: E402

PSK = b"benchmark key, 32 bytes long...."
CHUNK = 1 * MiB


def best_of(runs: int, fn: Any) -> float:
    """Best wall time of ``runs`` calls (the least disturbed by the other tenants)."""
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def authenticated() -> tuple[Session, Session]:
    return authenticated_pair(PSK)


def sans_io_migration(memory: memoryview, into: bytearray, mac_memory: bool = True) -> None:
    source, destination = authenticated()
    destination.receive_data(source.send(protocol.Migrate({}, "full", len(memory), CHUNK)))
    destination.next_event()
    destination.receive_memory_into(into)
    for offset in range(0, len(memory), CHUNK):
        for piece in source.send_iov(protocol.MemoryChunk(offset, memory[offset : offset + CHUNK])):
            destination.receive_data(piece)
        destination.next_event()
    destination.receive_data(source.send(source.make_commit()))
    assert isinstance(destination.next_event(), protocol.Commit)


async def serve_destinations(port_pipe: Any, size: int, count: int) -> None:
    """Destination side (in its own process, as on a real host): ``count`` migrations, then exit."""
    into = bytearray(size)
    served = 0
    finished = trio.Event()

    async def handler(stream: trio.SocketStream) -> None:
        nonlocal served
        channel = Channel(stream, Session("destination", PSK), receive_size=1 * MiB)
        await protocol.destination_handshake(channel, agent_version="bench", capabilities={})
        migrate = await channel.receive()
        assert isinstance(migrate, protocol.Migrate)
        await channel.receive_memory(into)
        # The COMMIT tag has been checked by receive_memory: the bytes are the source's.
        await channel.send(protocol.Report({"received": len(into)}))
        await channel.aclose()
        served += 1
        if served == count:
            finished.set()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        port_pipe.send(listeners[0].socket.getsockname()[1])
        await finished.wait()
        nursery.cancel_scope.cancel()


def destination_process(port_pipe: Any, size: int, count: int) -> None:
    trio.run(serve_destinations, port_pipe, size, count)


def tcp_migrations(memory: memoryview, runs: int) -> list[float]:
    """Times of ``runs`` migrations to a destination agent in another process (sorted)."""
    receiver, sender = multiprocessing.Pipe(duplex=False)
    child = multiprocessing.get_context("spawn").Process(
        target=destination_process, args=(sender, len(memory), runs)
    )
    child.start()
    try:
        port = receiver.recv()
        return sorted(trio.run(timed_migration, "127.0.0.1", port, PSK, memory, CHUNK) for _ in range(runs))
    finally:
        child.join(60)


async def round_trips(count: int, size: int) -> tuple[list[float], list[float], list[float], list[float]]:
    """Interleaved round trips: a raw socket echo of ``size`` bytes and a CLOCK_REQUEST/REPLY.

    Alternating the two in one loop exposes both to the same interference
    from the machine's other tenants, so their difference means something.
    """
    limits = protocol.Limits(max_clock_sync_rounds=count + 1)

    async def handler(stream: trio.SocketStream) -> None:
        channel = Channel(stream, Session("destination", PSK, limits=limits))
        await protocol.destination_handshake(channel, agent_version="bench", capabilities={})
        try:
            await channel.receive()  # answers CLOCK_REQUESTs until BYE
        finally:
            await channel.aclose()

    async def echo(stream: trio.SocketStream) -> None:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)

    async with trio.open_nursery() as nursery:
        ports = []
        for serve in (handler, echo):
            listeners = await nursery.start(functools.partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
            ports.append(listeners[0].socket.getsockname()[1])
        channel = await protocol.open_channel("127.0.0.1", ports[0], Session("source", PSK, limits=limits))
        await protocol.source_handshake(channel, agent_version="bench", capabilities={}, clock_rounds=0)
        raw = await trio.open_tcp_stream("127.0.0.1", ports[1])
        payload = b"x" * size
        channel_times, raw_times, channel_cpu, raw_cpu = [], [], [], []
        clock, cpu = time.perf_counter, time.process_time  # both ends are in this process
        for i in range(count):
            start, start_cpu = clock(), cpu()
            await raw.send_all(payload)
            received = 0
            while received < size:
                received += len(await raw.receive_some(65536))
            raw_times.append(clock() - start)
            raw_cpu.append(cpu() - start_cpu)
            start, start_cpu = clock(), cpu()
            await channel.send(protocol.ClockSyncRequest(t1=i))
            await channel.receive()
            channel_times.append(clock() - start)
            channel_cpu.append(cpu() - start_cpu)
        await raw.aclose()
        await channel.bye()
        nursery.cancel_scope.cancel()
    return raw_times, channel_times, raw_cpu, channel_cpu


def sans_io_round_trip_us(count: int) -> float:
    """CPU time of one CLOCK_REQUEST + CLOCK_REPLY through both sessions, no I/O (best of 3)."""
    limits = protocol.Limits(max_clock_sync_rounds=count + 1)
    best = float("inf")
    for _ in range(3):
        source, destination = authenticated()
        source.limits = destination.limits = limits
        start = time.perf_counter()
        for i in range(count):
            destination.receive_data(source.send(protocol.ClockSyncRequest(t1=i)))
            destination.next_event()
            source.receive_data(destination.send(protocol.ClockSyncReply(t1=i, t2=i, t3=i)))
            source.next_event()
        best = min(best, (time.perf_counter() - start) / count)
    return best * 1e6


def frame_mac_us(count: int = 20000) -> float:
    """Cost of the session MAC on one small frame (best of 3)."""
    mac = FrameMac(bytes(32))
    body = bytes(40)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(count):
            mac.tag(56, [body])
        best = min(best, (time.perf_counter() - start) / count)
    return best * 1e6


def small_frame_size() -> int:
    source, destination = authenticated()
    return len(source.send(protocol.ClockSyncRequest(t1=10**18)))


def load() -> str:
    """The 1-minute load average (this host is shared: figures depend on it)."""
    return open("/proc/loadavg").read().split()[0]


def throughput_rows(mib: int, runs: int) -> list[tuple[str, str, str]]:
    """The throughput figures for a memory of ``mib`` MiB: best of ``runs`` in-process, median and best over TCP."""
    size = mib * MiB
    data = os.urandom(size)
    memory = memoryview(data)
    into = bytearray(size)

    def copy() -> None:
        into[:] = memory

    def mac() -> None:
        Poly1305.generate_tag(bytes(32), memory)

    copy_s = best_of(runs, copy)
    mac_s = best_of(runs, mac)
    sans_io_s = best_of(runs, lambda: sans_io_migration(memory, into))
    assert into == data
    tcp = tcp_migrations(memory, runs)
    return [
        (f"{mib} MiB", "plain memory copy (reference)", f"{size / copy_s / 1e6:8.0f} MB/s"),
        (f"{mib} MiB", "Poly1305 of the memory (COMMIT tag, one side)", f"{size / mac_s / 1e6:8.0f} MB/s"),
        (f"{mib} MiB", "encode + decode, sans-IO, into a buffer", f"{size / sans_io_s / 1e6:8.0f} MB/s"),
        (f"{mib} MiB", f"whole migration over loopback TCP, 2 processes, median of {runs}",
         f"{size / statistics.median(tcp) / 1e6:8.0f} MB/s"),
        (f"{mib} MiB", "whole migration over loopback TCP, 2 processes, best", f"{size / tcp[0] / 1e6:8.0f} MB/s"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[2, 256])
    parser.add_argument("--round-trips", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=9, help="runs of each throughput figure (3 above 64 MiB)")
    args = parser.parse_args()

    load_before = load()
    rows: list[tuple[str, str, str]] = []
    for mib in args.sizes_mib:
        rows += throughput_rows(mib, args.runs if mib <= 64 else min(3, args.runs))

    frame = small_frame_size()
    raw_times, channel_times, raw_cpu, channel_cpu = trio.run(round_trips, args.round_trips, frame)
    channel_us = statistics.median(channel_times) * 1e6
    raw_us = statistics.median(raw_times) * 1e6
    channel_cpu_us = statistics.median(channel_cpu) * 1e6
    raw_cpu_us = statistics.median(raw_cpu) * 1e6
    rows += [
        ("small", f"raw trio socket echo, {frame} B each way, median", f"{raw_us:8.1f} us"),
        ("small", "CLOCK_REQUEST -> CLOCK_REPLY via Channel, median", f"{channel_us:8.1f} us"),
        ("small", "added by the protocol (difference of medians)", f"{channel_us - raw_us:8.1f} us"),
        ("small", "  the same in CPU time (both ends, this process)", f"{channel_cpu_us - raw_cpu_us:8.1f} us"),
        ("small", "of which sans-IO CPU (both sessions, no I/O)", f"{sans_io_round_trip_us(args.round_trips):8.1f} us"),
        ("small", "of which frame MAC, per frame (tag or verify)", f"{frame_mac_us():8.1f} us"),
    ]

    width = max(len(r[1]) for r in rows)
    print(f"load average {load_before} at start, {load()} at end ({os.cpu_count()} CPUs, shared)")
    print(f"{'size':8}  {'what':{width}}  figure")
    for size_label, what, figure in rows:
        print(f"{size_label:8}  {what:{width}}  {figure}")


if __name__ == "__main__":
    main()

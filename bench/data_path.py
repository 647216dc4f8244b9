"""The data path side by side: raw socket, the agents' memory stream, and through the relay at 0 ms.

    python bench/data_path.py [--mib 256] [--runs 5] [--chunk-kib 1024]

Issue 13, item 5.  The receiver runs in its own process, as on a real host,
with one buffer of ``--mib`` MiB it writes every transfer into.  Each round,
interleaved so that all three see the same load from the machine's other
tenants:

* ``raw``: a plain Python socket: ``sendall`` of the buffer, the receiver
  ``recv_into`` its buffer, then a one-byte reply;
* ``agents``: the protocol between two channels exactly as the agents use it
  (HELLO/AUTH before the clock starts; then MIGRATE, ``send_memory`` from the
  buffer -- writev straight from it, Poly1305 inline --, ``receive_memory``
  straight into the receiver's buffer, COMMIT checked, REPORT back);
* ``agents via relay``: the same through the source agent's delay relay
  (`source_agent.netem`) at 0 ms, as ``--latency 0`` does.

Prints every round's figures, then the range and the ratios (agents / raw,
relay / direct).  Figures only: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol_common import timed_migration  # noqa: E402

import protocol  # noqa: E402
from protocol import Channel, MiB, Session  # noqa: E402
from source_agent.netem import Link, open_relay  # noqa: E402

PSK = b"benchmark key, 32 bytes long...."
CHUNK = 1 * MiB


def raw_sink(server: socket.socket, into: memoryview) -> None:
    """Receive one buffer's worth per connection straight into ``into``, then reply one byte."""
    while True:
        conn, _ = server.accept()
        with conn:
            got = 0
            while got < len(into):
                count = conn.recv_into(into[got:])
                if not count:
                    break
                got += count
            conn.sendall(b"\1")


async def serve(pipe: Any, size: int) -> None:
    into = bytearray(size)
    view = memoryview(into)
    server = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=raw_sink, args=(server, view), daemon=True).start()

    async def handler(stream: trio.SocketStream) -> None:
        async with Channel(stream, Session("destination", PSK), receive_size=1 * MiB) as channel:
            await protocol.destination_handshake(channel, agent_version="bench", capabilities={})
            migrate = await channel.receive()
            assert isinstance(migrate, protocol.Migrate)
            await channel.receive_memory(into)  # the COMMIT tag is checked here
            await channel.send(protocol.Report({"received": len(into)}))

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        pipe.send((server.getsockname()[1], listeners[0].socket.getsockname()[1]))
        await trio.sleep_forever()


def receiver(pipe: Any, size: int) -> None:
    trio.run(serve, pipe, size)


def raw_transfer(port: int, memory: memoryview) -> float:
    with socket.create_connection(("127.0.0.1", port)) as conn:
        start = time.perf_counter()
        conn.sendall(memory)
        assert conn.recv(1) == b"\1"
        return time.perf_counter() - start


async def agents_transfer(port: int, memory: memoryview, relay: bool, chunk: int = CHUNK) -> float:
    if not relay:
        return await timed_migration("127.0.0.1", port, PSK, memory, chunk)
    async with open_relay(("127.0.0.1", port), up=Link(), down=Link()) as hop:
        return await timed_migration(*hop.address, PSK, memory, chunk)


def spread(values: list[float]) -> str:
    return f"{min(values):6.2f}-{max(values):5.2f} (median {statistics.median(values):5.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--chunk-kib", type=int, default=1024, help="MIGRATE.chunk_size (the agents send 1 MiB)")
    args = parser.parse_args()
    size = args.mib * MiB
    memory = memoryview(os.urandom(size))
    mine, theirs = multiprocessing.Pipe()
    child = multiprocessing.get_context("spawn").Process(target=receiver, args=(theirs, size), daemon=True)
    child.start()
    try:
        raw_port, agent_port = mine.recv()
        print(f"load average {open('/proc/loadavg').read().split()[0]} at start ({os.cpu_count()} CPUs, shared)")
        print(f"{args.mib} MiB in {args.chunk_kib} KiB chunks, receiver in its own process; GB/s per round")
        print(f"{'round':>5} {'raw':>7} {'agents':>7} {'via relay':>10} {'agents/raw':>11} {'relay/direct':>13}")
        rates: dict[str, list[float]] = {"raw": [], "agents": [], "relay": []}
        ratios: dict[str, list[float]] = {"agents/raw": [], "relay/direct": []}
        raw_transfer(raw_port, memory)  # warm the receiver's buffer and both processes
        for i in range(args.runs):
            raw = size / raw_transfer(raw_port, memory) / 1e9
            chunk = args.chunk_kib * 1024
            agents = size / trio.run(agents_transfer, agent_port, memory, False, chunk) / 1e9
            relay = size / trio.run(agents_transfer, agent_port, memory, True, chunk) / 1e9
            for key, value in (("raw", raw), ("agents", agents), ("relay", relay)):
                rates[key].append(value)
            ratios["agents/raw"].append(agents / raw)
            ratios["relay/direct"].append(relay / agents)
            print(f"{i + 1:>5} {raw:>7.2f} {agents:>7.2f} {relay:>10.2f} {agents / raw:>11.2f} {relay / agents:>13.2f}")
        print(f"load average {open('/proc/loadavg').read().split()[0]} at end")
        for key, values in rates.items():
            print(f"{key + ' GB/s':>20}: {spread(values)}")
        for key, values in ratios.items():
            print(f"{key:>20}: {spread(values)}")
    finally:
        child.kill()
        child.join(5)


if __name__ == "__main__":
    main()

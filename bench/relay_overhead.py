"""What the delay relay costs at 0 ms configured: added RTT and throughput vs a direct connection.

The peer (echo for RTT, sink for throughput) runs in a separate process, as the
destination agent would; the relay runs in this process next to the client, as
it does in the source agent, or in a process of its own. Rows:

* ``direct``: client -> peer on loopback.
* ``relay 0 ms``: through the relay with a zero link (the copy-only fast path).
* ``relay 0 ms, own process``: the same relay in a process of its own (no GIL shared
  with the client).
* ``relay 1 us``: a 1 µs delay forces the queued path (timestamps, queue, writer task).

A second table shows accuracy: configured one-way delay against the RTT the
client measured and the hold time the relay itself recorded.

Usage: ``python bench/relay_overhead.py [--pings N] [--megabytes M] [--repeats R]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import textwrap
from contextlib import asynccontextmanager
from typing import AsyncIterator

import trio

from source_agent.netem import Link, open_relay

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from agents_loopback import load  # noqa: E402

PEER = textwrap.dedent("""
    import socket, sys, threading
    def echo(c):
        with c:
            while data := c.recv(65536):
                c.sendall(data)
    def sink(c):
        with c:
            total = 0
            while data := c.recv(1 << 20):
                total += len(data)
            c.sendall(total.to_bytes(8, "big"))
    server = socket.create_server(("127.0.0.1", 0))
    print(server.getsockname()[1], flush=True)
    handler = echo if sys.argv[1] == "echo" else sink
    while True:
        c, _ = server.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=handler, args=(c,), daemon=True).start()
""")


RELAY = textwrap.dedent("""
    import sys, trio
    from source_agent.netem import Link, open_relay
    async def main(host, port):
        async with open_relay((host, int(port)), up=Link(), down=Link()) as relay:
            print(relay.address[1], flush=True)
            await trio.sleep_forever()
    trio.run(main, *sys.argv[1:])
""")


@asynccontextmanager
async def relay_process(target: tuple[str, int]) -> AsyncIterator[tuple[str, int]]:
    """A 0 ms relay to ``target`` in a process of its own; its address."""
    async with child([sys.executable, "-c", RELAY, *map(str, target)]) as port:
        yield "127.0.0.1", port


@asynccontextmanager
async def child(command: list[str]) -> AsyncIterator[int]:
    """A process that prints its port first; the port, the process killed on leaving."""
    process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE)
    try:
        async with process.stdout:
            yield int((await process.stdout.receive_some(100)).decode())
    finally:
        process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


@asynccontextmanager
async def peer(mode: str) -> AsyncIterator[tuple[str, int]]:
    async with child([sys.executable, "-c", PEER, mode]) as port:
        yield "127.0.0.1", port


async def rtts(address: tuple[str, int], count: int) -> list[float]:
    async with await trio.open_tcp_stream(*address) as stream:
        result = []
        for _ in range(count):
            start = trio.current_time()
            await stream.send_all(b"p" * 64)
            got = 0
            while got < 64:
                got += len(await stream.receive_some(64 - got))
            result.append(trio.current_time() - start)
        return result


async def throughput(address: tuple[str, int], total: int) -> float:
    block = b"t" * (1 << 20)
    async with await trio.open_tcp_stream(*address) as stream:
        start = trio.current_time()
        for _ in range(total // len(block)):
            await stream.send_all(block)
        await stream.send_eof()
        reply = b""
        while len(reply) < 8:
            reply += await stream.receive_some(8)
        elapsed = trio.current_time() - start
    assert int.from_bytes(reply, "big") == total, "sink lost bytes"
    return total / elapsed


OWN_PROCESS = "own process"
ROWS = (("direct", None), ("relay 0 ms (copy path)", Link()),
        ("relay 0 ms, own process", OWN_PROCESS),
        ("relay 1 us (queued path)", Link(delay=1e-6)))


async def measure(route: Link | str | None, echo: tuple[str, int], sink: tuple[str, int],
                  pings: int, total: int) -> tuple[list[float], float]:
    if route is None:
        return await rtts(echo, pings), await throughput(sink, total)
    if route == OWN_PROCESS:
        async with relay_process(echo) as to_echo, relay_process(sink) as to_sink:
            return await rtts(to_echo, pings), await throughput(to_sink, total)
    assert isinstance(route, Link)
    async with open_relay(echo, up=route, down=route) as to_echo, \
            open_relay(sink, up=route, down=route) as to_sink:
        return await rtts(to_echo.address, pings), await throughput(to_sink.address, total)


async def main(pings: int, megabytes: int, repeats: int) -> None:
    total = megabytes << 20
    results: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name, _ in ROWS}
    async with peer("echo") as echo, peer("sink") as sink:
        await rtts(echo, 50)  # warm up
        for _ in range(repeats):  # interleaved: every row sees the same load
            for name, route in ROWS:
                samples, rate = await measure(route, echo, sink, pings // repeats, total)
                results[name][0].extend(samples)
                results[name][1].append(rate)
        accuracy = {}
        for one_way in (0.001, 0.005, 0.020):
            async with open_relay(echo, delay=one_way) as relay:
                samples = await rtts(relay.address, min(pings, 200))
            accuracy[one_way] = (samples, relay.stats.up)
    base = statistics.median(results["direct"][0])
    direct = results["direct"][1]
    print(f"{pings} pings of 64 B, {megabytes} MiB one way, {repeats} repeat(s) interleaved "
          f"(medians); loopback, peer in its own process; load average {load()}\n")
    print(f"{'route':<26} {'RTT p50':>9} {'RTT p99':>9} {'added p50':>10} {'MiB/s':>8} "
          f"{'of direct':>10}")
    for name, (samples, rates) in results.items():
        samples.sort()
        p50, p99 = statistics.median(samples), samples[int(len(samples) * 0.99) - 1]
        ratio = statistics.median(rate / d for rate, d in zip(rates, direct))
        print(f"{name:<26} {p50 * 1e6:>7.0f}us {p99 * 1e6:>7.0f}us "
              f"{(p50 - base) * 1e6:>8.0f}us {statistics.median(rates) / 2**20:>8.0f} "
              f"{ratio:>10.2f}")
    print(f"\n{'one-way delay':<14} {'RTT min':>9} {'RTT p50':>9} {'RTT p99':>9} {'held mean':>10}")
    for one_way, (samples, up) in accuracy.items():
        samples.sort()
        print(f"{one_way * 1e3:>11g} ms {samples[0] * 1e3:>7.2f}ms "
              f"{statistics.median(samples) * 1e3:>7.2f}ms "
              f"{samples[int(len(samples) * 0.99) - 1] * 1e3:>7.2f}ms {up.held_mean * 1e3:>8.3f}ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pings", type=int, default=2000)
    parser.add_argument("--megabytes", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    trio.run(main, args.pings, args.megabytes, args.repeats)

"""Shared by the protocol benchmarks: an authenticated pair of sessions, in memory, and one
timed migration over TCP."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import protocol  # noqa: E402
from protocol import Session  # noqa: E402


def authenticated_pair(psk: bytes) -> tuple[Session, Session]:
    """A source and a destination session that have done HELLO and AUTH with each other."""
    source, destination = Session("source", psk), Session("destination", psk)
    for sender, receiver, build in (
        (source, destination, lambda: source.make_hello("bench", {})),
        (destination, source, lambda: destination.make_hello("bench", {})),
        (source, destination, source.make_auth),
        (destination, source, destination.make_auth),
    ):
        receiver.receive_data(sender.send(build()))
        receiver.next_event()
    return source, destination


async def timed_migration(host: str, port: int, psk: bytes, memory: memoryview, chunk_size: int) -> float:
    """Seconds from MIGRATE to REPORT of one migration of ``memory`` to a destination serving
    ``{"received": size}`` reports (the handshake before the clock starts)."""
    channel = await protocol.open_channel(host, port, Session("source", psk))
    async with channel:
        await protocol.source_handshake(channel, agent_version="bench", capabilities={}, clock_rounds=1)
        start = time.perf_counter()
        await channel.send(protocol.Migrate({}, "full", len(memory), chunk_size))
        await channel.send_memory(memory)
        report = await channel.receive()
        elapsed = time.perf_counter() - start
    assert isinstance(report, protocol.Report) and report.report == {"received": len(memory)}
    return elapsed

"""The COMMIT digest's worker threads are owned by the memory stream's nursery.

A hash job reads the caller's buffer (guest RAM): no way out of `receive_memory`
-- cancellation included -- may leave a job running, or the caller would unmap
memory under it.  A failed job is raised when it is the only error, and never
hides the stream's own error.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import trio
import trio.testing
from protocol_helpers import PSK

import protocol
from protocol import Channel, ConnectionClosed, Session, State

CHUNK = 64 * 1024
MEMORY = bytes(range(256)) * (8 * CHUNK // 256)  # 512 KiB: a job starts at 256 KiB pending


async def pair() -> tuple[Channel, Channel]:
    left, right = trio.testing.memory_stream_pair()
    source = Channel(left, Session("source", PSK))
    destination = Channel(right, Session("destination", PSK))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: protocol.source_handshake(source, agent_version="s", capabilities={}, clock_rounds=0)
        )
        nursery.start_soon(
            lambda: protocol.destination_handshake(destination, agent_version="d", capabilities={})
        )
    await source.send(protocol.Migrate({}, "full", len(MEMORY), CHUNK))
    assert isinstance(await destination.receive(), protocol.Migrate)
    return source, destination


def wrap_jobs(session: Session, wrapper: Callable[[Callable[[], None]], None]) -> list[str]:
    """Run every hash job of ``session`` through ``wrapper``; returns the log of job ends."""
    log: list[str] = []
    real = session.memory_hash_job

    def memory_hash_job() -> Callable[[], None] | None:
        job = real()
        if job is None:
            return None

        def wrapped() -> None:
            try:
                wrapper(job)
            finally:
                log.append("job done")

        return wrapped

    session.memory_hash_job = memory_hash_job  # type: ignore[method-assign]
    return log


async def test_cancelled_receive_memory_waits_for_the_running_job() -> None:
    source, destination = await pair()
    started, go_on = threading.Event(), threading.Event()

    def slow(job: Callable[[], None]) -> None:
        started.set()
        go_on.wait(10)
        job()

    log = wrap_jobs(destination.session, slow)
    for offset in range(0, 5 * CHUNK, CHUNK):  # 320 KiB: one job, then the source stalls
        await source.send(protocol.MemoryChunk(offset, MEMORY[offset : offset + CHUNK]))
    ram = bytearray(len(MEMORY))

    async def receive(scope: trio.CancelScope) -> None:
        with scope:
            await destination.receive_memory(ram)
        log.append("receive_memory left")

    scope = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive, scope)
        await trio.to_thread.run_sync(started.wait, 10)
        scope.cancel()
        await trio.sleep(0.2)
        assert log == []  # cancelled, but still waiting for the job that reads ``ram``
        go_on.set()
    assert log == ["job done", "receive_memory left"]
    assert scope.cancelled_caught
    assert destination.session.state is State.ERROR
    await source.aclose()
    await destination.aclose()


async def test_a_failed_job_is_raised_when_it_is_the_only_error() -> None:
    source, destination = await pair()

    def broken(job: Callable[[], None]) -> None:
        raise RuntimeError("the hash broke")

    wrap_jobs(destination.session, broken)

    for offset in range(0, len(MEMORY), CHUNK):  # a memory stream holds it all
        await source.send(protocol.MemoryChunk(offset, MEMORY[offset : offset + CHUNK]))
    with pytest.raises(RuntimeError, match="the hash broke") as info:
        await destination.receive_memory(bytearray(len(MEMORY)))
    assert type(info.value) is RuntimeError  # not a group
    assert destination.session.state is State.ERROR
    await source.aclose()
    await destination.aclose()


async def test_a_failed_job_never_hides_the_stream_error() -> None:
    source, destination = await pair()
    started, go_on = threading.Event(), threading.Event()

    def fails_late(job: Callable[[], None]) -> None:
        started.set()
        go_on.wait(10)
        raise RuntimeError("the hash broke")

    log = wrap_jobs(destination.session, fails_late)
    for offset in range(0, 5 * CHUNK, CHUNK):
        await source.send(protocol.MemoryChunk(offset, MEMORY[offset : offset + CHUNK]))

    async def break_stream() -> None:
        await trio.to_thread.run_sync(started.wait, 10)
        await source.aclose()  # the stream ends mid-memory while the job runs
        await trio.sleep(0.1)
        go_on.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(break_stream)
        with pytest.raises(ConnectionClosed) as info:
            await destination.receive_memory(bytearray(len(MEMORY)))
    assert type(info.value) is ConnectionClosed
    assert log == ["job done"]  # the job ended (and failed) before receive_memory did
    await destination.aclose()


async def test_hashing_control_a_whole_stream_hashes_in_jobs() -> None:
    source, destination = await pair()
    log = wrap_jobs(destination.session, lambda job: job())

    async def send() -> None:
        for offset in range(0, len(MEMORY), CHUNK):
            await source.send(protocol.MemoryChunk(offset, MEMORY[offset : offset + CHUNK]))
        await source.send(source.session.make_commit())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        ram = bytearray(len(MEMORY))
        assert isinstance(await destination.receive_memory(ram), protocol.Commit)  # digest matched
    assert ram == MEMORY and log  # some of it was hashed by jobs
    await source.aclose()
    await destination.aclose()

"""The pipe's timing logic on memory streams under a virtual clock (no sockets, no flakiness).

Delays here are exact: the autojump clock only advances when every task is
blocked, so a byte's arrival time is the instant the test sent it.
"""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing
from hypothesis import given, settings, strategies as st

from source_agent.netem import DEFAULT_BUFFER, Gate, ImpairmentError, Link, Pipe, TokenBucket


async def pump(link: Link, chunks: list[bytes], gaps: list[float], *, seed: int = 0,
               gate: Gate | None = None) -> tuple[list[tuple[float, bytes]], list[tuple[float, bytes]]]:
    """Send ``chunks`` through a pipe (sleeping ``gaps`` between them); return (sent, received) logs."""
    to_pipe, pipe_in = trio.testing.memory_stream_one_way_pair()
    pipe_out, from_pipe = trio.testing.memory_stream_one_way_pair()
    pipe = Pipe(link, gate or Gate(), rng=random.Random(seed))
    sent, received = [], []

    async def send() -> None:
        for chunk, gap in zip(chunks, gaps):
            await trio.sleep(gap)
            sent.append((trio.current_time(), chunk))
            await to_pipe.send_all(chunk)
        await to_pipe.aclose()

    async def run_pipe() -> None:
        await pipe.run(pipe_in, pipe_out)
        await pipe_out.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        nursery.start_soon(run_pipe)
        async for data in from_pipe:
            received.append((trio.current_time(), data))
    return sent, received


def delivery_violations(sent, received, earliest: float, latest: float) -> list[str]:
    """Every byte must arrive intact, in order, between ``earliest`` and ``latest`` after it was sent."""
    sent_times = [t for t, chunk in sent for _ in chunk]
    problems = []
    if b"".join(c for _, c in received) != b"".join(c for _, c in sent):
        problems.append("byte stream differs (lost, duplicated or reordered bytes)")
    offset = 0
    for when, chunk in received:
        for i in range(offset, min(offset + len(chunk), len(sent_times))):
            if not sent_times[i] + earliest - 1e-9 <= when <= sent_times[i] + latest + 1e-9:
                problems.append(f"byte {i} sent at {sent_times[i]:.6f} delivered at {when:.6f}")
                break
        offset += len(chunk)
    return problems


def numbered(count: int, start: int) -> bytes:
    """Bytes that encode their own position, so any reordering changes the stream."""
    return b"".join((start + i).to_bytes(4, "big") for i in range(count))


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 400), min_size=1, max_size=25),
    gaps=st.lists(st.floats(0, 0.01), min_size=25, max_size=25),
    delay=st.floats(0, 0.05), jitter=st.floats(0, 0.05), seed=st.integers(0, 2**32),
)
def test_jitter_never_reorders_and_keeps_delay_bounds(sizes, gaps, delay, jitter, seed):
    chunks, position = [], 0
    for size in sizes:
        chunks.append(numbered(size, position))
        position += size
    link = Link(delay, jitter)

    async def main():
        return await pump(link, chunks, gaps, seed=seed)

    sent, received = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert delivery_violations(sent, received, max(0.0, delay - jitter), delay + jitter) == []


def test_delivery_check_catches_reordering_and_early_bytes():
    """Negative control: the property check can fail."""
    sent = [(0.0, b"ab"), (0.0, b"cd")]
    assert delivery_violations(sent, [(0.01, b"cd"), (0.01, b"ab")], 0.01, 0.01)
    assert delivery_violations(sent, [(0.005, b"abcd")], 0.01, 0.01)
    assert delivery_violations(sent, [(0.01, b"abcd")], 0.01, 0.01) == []


async def test_jitter_spreads_delivery(autojump_clock):
    sent, received = await pump(Link(0.02, 0.01), [b"x"] * 50, [0.05] * 50, seed=3)
    latencies = [r - s for (s, _), (r, _) in zip(sent, received)]
    assert len(received) == 50
    assert 0.01 <= min(latencies) < 0.013 and 0.027 < max(latencies) <= 0.03


async def test_delay_is_exact_without_jitter(autojump_clock):
    sent, received = await pump(Link(0.005), [b"a", b"b"], [0.0, 1.0])
    assert [round(r - s, 9) for (s, _), (r, _) in zip(sent, received)] == [0.005, 0.005]


async def test_rate_limit_bounds_throughput(autojump_clock):
    rate = 100_000
    start = trio.current_time()
    _, received = await pump(Link(rate=rate), [b"z" * 10_000] * 100, [0.0] * 100)
    elapsed = received[-1][0] - start
    assert sum(len(c) for _, c in received) == 1_000_000
    # One burst (1500 bytes at this rate) may go out before pacing starts.
    assert (1_000_000 - 1500) / rate <= elapsed <= 1_000_000 / rate + 0.01


async def test_unlimited_rate_is_not_paced(autojump_clock):
    """Negative control for the rate test: the same transfer without a rate takes no virtual time."""
    start = trio.current_time()
    _, received = await pump(Link(delay=0.001), [b"z" * 10_000] * 100, [0.0] * 100)
    assert received[-1][0] - start == pytest.approx(0.001)


def test_token_bucket_paces_to_rate():
    bucket = TokenBucket(rate=1000, burst=100, now=0.0)
    assert bucket.take(100, 0.0) == 0.0  # the initial burst is free
    assert bucket.take(500, 0.0) == pytest.approx(0.5)
    assert bucket.take(100, 0.5) == pytest.approx(0.1)
    assert bucket.take(50, 10.0) == 0.0  # idle time refills only up to the burst
    assert bucket.take(100, 10.0) == pytest.approx(0.05)


async def test_partition_holds_bytes_and_heal_delivers_them_in_order(autojump_clock):
    gate = Gate()
    gate.close()
    chunks = [numbered(10, 0), numbered(10, 10)]

    async def heal_later():
        await trio.sleep(5)
        gate.open()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(heal_later)
        sent, received = await pump(Link(0.001), chunks, [0.0, 1.0], gate=gate)
    assert b"".join(c for _, c in received) == b"".join(chunks)
    assert received[0][0] == pytest.approx(5.0)


@pytest.mark.parametrize("buffer, expect_stalled", [(100_000, True), (DEFAULT_BUFFER, False)])
async def test_buffer_bounds_memory_by_stalling_the_sender(autojump_clock, buffer, expect_stalled):
    """With a 100 s delay nothing is delivered; the sender gets only ``buffer`` bytes in.

    The large-buffer case is the negative control: the same sender is not stalled.
    """
    sender, pipe_in = trio.testing.lockstep_stream_pair()
    pipe_out, _never_read = trio.testing.memory_stream_one_way_pair()
    pipe = Pipe(Link(delay=100.0), Gate(), buffer=buffer)
    written = 0

    async def send():
        nonlocal written
        for _ in range(10):
            await sender.send_all(b"y" * 50_000)
            written += 50_000

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pipe.run, pipe_in, pipe_out)
        nursery.start_soon(send)
        await trio.sleep(1)
        assert pipe.queued <= buffer
        assert (written < 500_000) is expect_stalled
        if expect_stalled:
            assert written <= buffer
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("buffer", [0, -1, 1.5, True])
def test_buffer_must_be_a_positive_int(buffer):
    with pytest.raises(ImpairmentError, match="^buffer: must be a positive number of bytes"):
        Pipe(Link(), Gate(), buffer=buffer)

"""One direction of a relayed connection, over any trio byte streams.

Kept apart from sockets so the timing logic runs under ``autojump_clock`` on
memory streams in tests, and the relay only adds accepting and connecting.

Two paths:

* **copy** (the link changes nothing): receive, wait for the gate, send. No
  queue, no clock reads: the relay at 0 ms costs two hops through trio and
  nothing more.
* **queued**: a reader stamps each received batch with its release time
  ``max(previous release, arrival + sampled delay)`` and one writer sends the
  batches in FIFO order when due, paced by a token bucket. Jitter therefore
  never reorders, as on one TCP connection where a byte cannot overtake an
  earlier one: the FIFO guarantees the order, the ``max`` keeps the release
  times (and so the recorded hold times) consistent with it. The reader stops reading
  while ``buffer`` bytes are queued, so a slow or partitioned path pushes back
  on the sender through TCP flow control instead of growing memory.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import trio

from ._errors import ImpairmentError
from ._timer import Sleeper
from .link import Link

#: Largest read; also the batch unit the delay is applied to.
CHUNK = 1 << 18

#: Default bytes queued per direction before the relay stops reading.
DEFAULT_BUFFER = 4 << 20


@dataclass
class DirectionStats:
    """What one direction carried, and how long the relay actually held it.

    ``held_*`` cover the queued path only (the copy path holds nothing): from a
    batch's arrival to the moment it was sent on. They show what the link
    really did rather than what was configured: timers wake up to ~1 ms late
    (epoll's millisecond timeout, rounded up) and a loaded host adds more, but
    a batch is never sent early.
    """

    bytes: int = 0
    batches_held: int = 0
    held_total: float = 0.0
    held_min: float | None = None
    held_max: float = 0.0

    @property
    def held_mean(self) -> float | None:
        return self.held_total / self.batches_held if self.batches_held else None

    def add_held(self, seconds: float) -> None:
        self.batches_held += 1
        self.held_total += seconds
        self.held_min = seconds if self.held_min is None else min(self.held_min, seconds)
        self.held_max = max(self.held_max, seconds)


class Gate:
    """Open or closed for all pipes of a relay: closed is a network partition.

    A closed gate holds bytes (they are delivered after `open`, as TCP would
    deliver them after retransmission), it does not drop them.
    """

    def __init__(self) -> None:
        self._opened = trio.Event()
        self._opened.set()

    @property
    def is_open(self) -> bool:
        return self._opened.is_set()

    def close(self) -> None:
        if self._opened.is_set():
            self._opened = trio.Event()

    def open(self) -> None:
        self._opened.set()

    async def wait_open(self) -> None:
        while not self._opened.is_set():
            await self._opened.wait()


class TokenBucket:
    """Paces bytes to ``rate`` bytes/s with bursts of at most ``burst`` bytes (sans-IO).

    `take` spends tokens and returns how long to wait before sending; the debt
    it leaves is repaid by the time that passes, so long-run throughput is
    ``rate`` however the batches are sized.
    """

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._stamp = now

    def take(self, nbytes: int, now: float) -> float:
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        self._tokens -= nbytes
        return max(0.0, -self._tokens / self.rate)


def batch_size(link: Link) -> int:
    """Read size for a link: under a rate limit, at most ~10 ms of line time, so pacing is smooth."""
    if link.rate is None:
        return CHUNK
    return int(min(CHUNK, max(1500, link.rate / 100)))


def check_buffer(buffer: object) -> int:
    if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 1:
        raise ImpairmentError(f"buffer: must be a positive number of bytes, got {buffer!r}")
    return buffer


class Pipe:
    """Forwards ``src`` to ``dst`` through one `Link`, counting into ``stats`` (which may be shared)."""

    def __init__(self, link: Link, gate: Gate, *, buffer: int = DEFAULT_BUFFER,
                 rng: random.Random | None = None, stats: DirectionStats | None = None) -> None:
        self.link = link
        self.gate = gate
        self.buffer = check_buffer(buffer)
        self.rng = rng or random.Random()
        self.stats = DirectionStats() if stats is None else stats
        self.queued = 0
        self._drained = trio.Event()

    async def run(self, src: trio.abc.ReceiveStream, dst: trio.abc.SendStream) -> None:
        """Forward until ``src`` ends, then pass the end on (half-close) if ``dst`` can."""
        if self.link.is_zero:
            await self._copy(src, dst)
        else:
            await self._queued(src, dst)
        if isinstance(dst, trio.abc.HalfCloseableStream):
            await dst.send_eof()

    async def _copy(self, src: trio.abc.ReceiveStream, dst: trio.abc.SendStream) -> None:
        gate = self.gate
        size = min(CHUNK, self.buffer)
        while data := await src.receive_some(size):
            if not gate.is_open:
                await gate.wait_open()
            await dst.send_all(data)
            self.stats.bytes += len(data)

    async def _queued(self, src: trio.abc.ReceiveStream, dst: trio.abc.SendStream) -> None:
        send, receive = trio.open_memory_channel[tuple[float, float, bytes]](math.inf)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read, src, send)
            await self._write(dst, receive)

    async def _read(self, src: trio.abc.ReceiveStream,
                    send: trio.MemorySendChannel[tuple[float, float, bytes]]) -> None:
        size = min(batch_size(self.link), self.buffer)
        last_release = -math.inf
        async with send:
            while True:
                while self.queued >= self.buffer:
                    await self._drained.wait()
                data = await src.receive_some(min(size, self.buffer - self.queued))
                if not data:
                    return
                arrival = trio.current_time()
                release = max(last_release, arrival + self.link.sample_delay(self.rng))
                last_release = release
                self.queued += len(data)
                send.send_nowait((release, arrival, data))

    async def _write(self, dst: trio.abc.SendStream,
                     receive: trio.MemoryReceiveChannel[tuple[float, float, bytes]]) -> None:
        rate = self.link.rate
        bucket = None if rate is None else TokenBucket(rate, batch_size(self.link), trio.current_time())
        with receive, Sleeper() as sleeper:
            async for release, arrival, data in receive:
                await sleeper.sleep_until(release)
                await self.gate.wait_open()
                if bucket is not None:
                    now = trio.current_time()
                    await sleeper.sleep_until(now + bucket.take(len(data), now))
                self.stats.add_held(trio.current_time() - arrival)
                await dst.send_all(data)
                self.queued -= len(data)
                self._drained.set()
                self._drained = trio.Event()
                self.stats.bytes += len(data)

"""One direction of a relayed connection, over any trio byte streams.

Kept apart from sockets so the timing logic runs under ``autojump_clock`` on
memory streams in tests, and the relay only adds accepting and connecting.

Two paths:

* **copy** (the link changes nothing): receive, wait for the gate, send. No
  queue, no clock reads. Between two sockets the bytes never enter Python:
  a worker thread moves them with splice(2) through a pipe, kernel to kernel,
  so the relay at 0 ms costs no copy and no time on the event loop it shares
  with the agent beside it (`splice_copy`); other streams take two hops
  through trio.
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

import errno
import fcntl
import math
import os
import random
import select
import threading
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
        if isinstance(src, trio.SocketStream) and isinstance(dst, trio.SocketStream):
            await splice_copy(src.socket.fileno(), dst.socket.fileno(), self.gate, self.stats)
            return
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


#: What one splice(2) moves at most; the pipe between them is grown to hold it.
SPLICE_CHUNK = 1 << 20
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_GONE = (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN)
_STATS_LOCK = threading.Lock()


async def splice_copy(src: int, dst: int, gate: Gate, stats: DirectionStats) -> None:
    """Forward socket ``src`` to socket ``dst`` until ``src`` ends, kernel to kernel.

    The copy runs in a worker thread (splice releases the GIL), which trio waits for:
    on cancellation a wake-up pipe makes it return, so no thread outlives the relay
    and no fd is closed under it. The gate (a partition) is checked between taking
    bytes in and sending them on, as on the trio path: when it is closed the thread
    hands back with the bytes still in the pipe, trio waits for the gate, and the
    thread resumes by sending them (the gate holds bytes, it does not drop them). A
    peer that vanished is a trio.BrokenResourceError, as on the trio path."""
    pipe_r, pipe_w = os.pipe2(os.O_CLOEXEC)
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        try:
            fcntl.fcntl(pipe_w, fcntl.F_SETPIPE_SZ, SPLICE_CHUNK)
        except OSError:
            pass            # a smaller pipe only means smaller splices
        pending = 0         # bytes in the pipe, not yet sent on
        while True:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_wake_on_cancel, wake_w)
                ended, pending = await trio.to_thread.run_sync(
                    _splice_until, src, dst, pipe_r, pipe_w, wake_r, gate, stats, pending)
                nursery.cancel_scope.cancel()   # the waker writes its byte: drained below
            if ended:
                return
            _drain(wake_r)
            await gate.wait_open()
    finally:
        for fd in (pipe_r, pipe_w, wake_r, wake_w):
            os.close(fd)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 64):
            pass
    except BlockingIOError:
        pass


async def _wake_on_cancel(wake_w: int) -> None:
    try:
        await trio.sleep_forever()
    finally:
        os.write(wake_w, b"x")


def _splice_until(src: int, dst: int, pipe_r: int, pipe_w: int, wake_r: int, gate: Gate,
                  stats: DirectionStats, pending: int) -> tuple[bool, int]:
    """Worker thread: send the ``pending`` bytes in the pipe on, then splice until ``src``
    ends (True) or the gate is closed or trio wakes it (False); returns that and the bytes
    left in the pipe. ``stats.bytes`` counts as it goes (under a lock: the relay's
    connections share their direction's stats)."""

    def wait(fd: int, event: int) -> bool:
        """Until ``fd`` is ready for ``event``; False if woken instead."""
        poller = select.poll()
        poller.register(fd, event)
        poller.register(wake_r, select.POLLIN)
        while True:
            ready = dict(poller.poll())
            if wake_r in ready:
                return False
            if fd in ready:
                return True

    try:
        while True:
            if pending and not gate.is_open:
                return False, pending
            while pending:
                try:
                    sent = os.splice(pipe_r, dst, pending, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    if not wait(dst, select.POLLOUT):
                        return False, pending
                    continue
                pending -= sent
                with _STATS_LOCK:
                    stats.bytes += sent
            if not wait(src, select.POLLIN):
                return False, 0
            try:
                pending = os.splice(src, pipe_w, SPLICE_CHUNK, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                continue
            if pending == 0:
                return True, 0
    except OSError as exc:
        if exc.errno in _GONE:
            raise trio.BrokenResourceError(f"splice: {os.strerror(exc.errno)}") from exc
        raise

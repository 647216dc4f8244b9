"""The delay relay: a TCP forwarder that impairs each direction like a slow network.

Used wherever the kernel has no ``sch_netem`` (this project's CI hosts): the
source agent connects to the relay instead of the destination, and the relay
forwards each connection to the real destination through two `Pipe`\\ s. It
also simulates faults no qdisc can script precisely: `Relay.partition` (the
path goes silent mid-transfer, connections stay open) and `Relay.cut` (every
connection is reset at once).

Everything runs inside the nursery of `open_relay`; leaving the ``async with``
cancels it, so no task, listener or connection outlives the block.
"""

from __future__ import annotations

import random
import socket
import struct
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import AsyncIterator

import trio

from ._pipe import DEFAULT_BUFFER, DirectionStats, Gate, Pipe, check_buffer
from .link import Link, Number

Address = tuple[str, int]

_LINGER_RESET = struct.pack("ii", 1, 0)
_PEER_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


@dataclass
class RelayStats:
    """What the relay saw, for the experiment report.

    ``up`` is client -> target, ``down`` target -> client, summed over all
    connections; bytes count what was delivered (sent on), not merely received.
    """

    accepted: int = 0
    active: int = 0
    connect_failures: int = 0
    last_error: str | None = None
    up: DirectionStats = field(default_factory=DirectionStats)
    down: DirectionStats = field(default_factory=DirectionStats)


class _Connection:
    """One accepted connection: its cancel scope and sockets, so `Relay.cut` can reset it."""

    def __init__(self, client: trio.SocketStream) -> None:
        self.scope = trio.CancelScope()
        self.streams: list[trio.SocketStream] = [client]

    def reset(self) -> None:
        """Make the coming close send RST rather than FIN, as a crashed peer or middlebox would."""
        for stream in self.streams:
            try:
                stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except (OSError, trio.ClosedResourceError):
                pass  # already closed: nothing left to reset
        self.scope.cancel()


class Relay:
    """A running relay; made by `open_relay`. ``address`` is where clients connect."""

    def __init__(self, target: Address, up: Link, down: Link, *, buffer: int,
                 seed: int | None) -> None:
        self.target = target
        self.up = up
        self.down = down
        self.buffer = check_buffer(buffer)
        self.address: Address = ("", 0)
        self._stats = RelayStats()
        self._gate = Gate()
        self._rng = random.Random(seed)
        self._connections: set[_Connection] = set()

    @property
    def stats(self) -> RelayStats:
        """A snapshot of the counters (a copy: later traffic does not change it)."""
        return replace(self._stats, up=replace(self._stats.up), down=replace(self._stats.down))

    @property
    def partitioned(self) -> bool:
        return not self._gate.is_open

    def partition(self) -> None:
        """Stop forwarding in both directions; connections stay open but silent.

        Bytes in flight are held (up to ``buffer`` per direction, then TCP flow
        control stalls the senders); new connections are accepted but not
        connected on until `heal`.
        """
        self._gate.close()

    def heal(self) -> None:
        """Resume forwarding; held bytes are delivered in order."""
        self._gate.open()

    def cut(self) -> int:
        """Reset every open connection (RST to both ends); the relay keeps listening. Returns how many."""
        connections = list(self._connections)
        for connection in connections:
            connection.reset()
        return len(connections)

    def report(self) -> dict[str, object]:
        """What to store with an experiment: the injector, its links as configured, and what it saw."""
        stats = asdict(self._stats)
        for direction in ("up", "down"):
            stats[direction]["held_mean"] = getattr(self._stats, direction).held_mean
        return {"injector": "relay", "up_link": str(self.up), "down_link": str(self.down),
                "target": f"{self.target[0]}:{self.target[1]}", **stats}

    def _pipe(self, link: Link, stats: DirectionStats) -> Pipe:
        return Pipe(link, self._gate, buffer=self.buffer, rng=self._rng, stats=stats)

    async def _handle(self, client: trio.SocketStream) -> None:
        """Serve one client; every peer failure is contained here (one escaping would stop the server)."""
        self._stats.accepted += 1
        connection = _Connection(client)
        self._connections.add(connection)
        try:
            with connection.scope:
                await self._gate.wait_open()
                try:
                    target = await trio.open_tcp_stream(*self.target)
                except OSError as exc:
                    self._stats.connect_failures += 1
                    self._stats.last_error = f"connect to {self.target[0]}:{self.target[1]}: {exc}"
                    connection.reset()
                    return
                connection.streams.append(target)
                async with target:
                    await self._forward(connection, client, target)
        finally:
            self._connections.discard(connection)

    async def _forward(self, connection: _Connection, client: trio.SocketStream,
                       target: trio.SocketStream) -> None:
        self._stats.active += 1
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pipe(self.up, self._stats.up).run, client, target)
                nursery.start_soon(self._pipe(self.down, self._stats.down).run, target, client)
        except* _PEER_GONE as group:
            # One side vanished: pass that on as a reset, so the other side sees
            # an error rather than a clean end of stream.
            self._stats.last_error = f"peer gone: {group.exceptions[0]!r}"
            connection.reset()
        finally:
            self._stats.active -= 1


@asynccontextmanager
async def open_relay(target: Address, *, delay: str | Number = 0.0, jitter: str | Number = 0.0,
                     rate: str | Number | None = None, up: Link | None = None,
                     down: Link | None = None, host: str = "127.0.0.1", port: int = 0,
                     buffer: int = DEFAULT_BUFFER, seed: int | None = None) -> AsyncIterator[Relay]:
    """Listen on ``host:port`` (0: any free port) and forward each connection to ``target``.

    ``delay``, ``jitter`` and ``rate`` (``"5ms"``, ``0.005``, ``"100mbit"``) give
    both directions the same `Link`; ``up`` (client -> target) or ``down``
    override one direction. The RTT through the relay is therefore about
    ``up.delay + down.delay`` plus the path's own. ``seed`` makes jitter
    reproducible.
    """
    both = Link.parse(delay, jitter, rate)
    relay = Relay(target, up or both, down or both, buffer=buffer, seed=seed)
    body_error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, relay._handle, port, host=host))
        relay.address = listeners[0].socket.getsockname()[:2]
        try:
            yield relay
        except BaseException as exc:
            # Re-raised below, outside the nursery, so the caller gets its own
            # exception rather than an ExceptionGroup wrapping it.
            body_error = exc
        finally:
            nursery.cancel_scope.cancel()
    if body_error is not None:
        raise body_error

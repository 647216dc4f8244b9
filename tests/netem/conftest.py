"""Loopback servers for the relay tests: an echo (for RTT) and a sink (for throughput)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from functools import partial

import pytest
import trio
from common_helpers import open_fds


async def _echo(stream: trio.SocketStream) -> None:
    try:
        async for data in stream:
            await stream.send_all(data)
    except trio.BrokenResourceError:
        pass  # the relay reset us (cut tests): fine


@pytest.fixture
async def echo_port(nursery):
    """Port of an echo server on 127.0.0.1, stopped with the test's nursery."""
    listeners = await nursery.start(partial(trio.serve_tcp, _echo, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


class Sink:
    """Counts bytes received and when the first and last arrived (for throughput)."""

    def __init__(self) -> None:
        self.received = 0
        self.first: float | None = None
        self.last: float | None = None
        self.done = trio.Event()

    async def serve(self, stream: trio.SocketStream) -> None:
        async for data in stream:
            now = trio.current_time()
            self.first = now if self.first is None else self.first
            self.last = now
            self.received += len(data)
        self.done.set()


@pytest.fixture
async def sink(nursery):
    """A `Sink` with its ``port`` attribute set, on 127.0.0.1."""
    server = Sink()
    listeners = await nursery.start(partial(trio.serve_tcp, server.serve, 0, host="127.0.0.1"))
    server.port = listeners[0].socket.getsockname()[1]
    return server


async def round_trips(stream: trio.abc.Stream, count: int, size: int = 64) -> list[float]:
    """``count`` ping-pongs of ``size`` bytes; each RTT in seconds."""
    rtts = []
    payload = b"p" * size
    for _ in range(count):
        start = trio.current_time()
        await stream.send_all(payload)
        got = 0
        while got < size:
            data = await stream.receive_some(size - got)
            assert data, "echo closed mid-ping"
            got += len(data)
        rtts.append(trio.current_time() - start)
    return rtts


@pytest.fixture
def rtt():
    return round_trips


@pytest.fixture
def fd_count():
    return open_fds


async def _fds_after(expected: int, timeout: float = 2.0) -> int:
    """The fd count once it is back to ``expected``, or after ``timeout``.

    In-process peers (the echo server) close their side a scheduler turn after
    the relay closes its own; polling avoids racing them.
    """
    with trio.move_on_after(timeout):
        while open_fds() != expected:
            await trio.sleep(0.01)
    return open_fds()


@pytest.fixture
def fds_after():
    return _fds_after


#: An echo server for inside a namespace: a separate process, as the destination agent will be.
_NS_ECHO = textwrap.dedent("""
    import socket, sys
    server = socket.create_server((sys.argv[1], 0))
    print(server.getsockname()[1], flush=True)
    connection, _ = server.accept()
    while data := connection.recv(65536):
        connection.sendall(data)
""")


async def _start_ns_echo(topology, nursery: trio.Nursery) -> tuple[str, int]:
    """Start the echo inside ``topology`` (killed with ``nursery``); return its address."""
    argv = [sys.executable, "-c", _NS_ECHO, topology.ns_address]
    server = await nursery.start(partial(topology.run, argv, stdout=subprocess.PIPE))
    with trio.fail_after(20):
        port = int((await server.stdout.receive_some(100)).decode())
    return topology.ns_address, port


@pytest.fixture
def start_ns_echo():
    return _start_ns_echo

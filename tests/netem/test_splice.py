"""The relay's copy path between two sockets: splice(2) in a worker thread, on real sockets.

What must hold however the bytes travel: all of them, in order; a closed gate holds them;
the end of the stream is passed on; a vanished peer is a BrokenResourceError; cancelling
leaves no thread behind. And the splice path is the one taken for sockets.
"""

from __future__ import annotations

import os
import socket
import threading

import trio
import trio.testing

from source_agent.netem import Gate, Link, Pipe
from source_agent.netem import _pipe


def socket_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = socket.socketpair()
    return trio.SocketStream(trio.socket.from_stdlib_socket(a)), \
        trio.SocketStream(trio.socket.from_stdlib_socket(b))


async def relay_bytes(data: bytes, *, gate: Gate | None = None) -> tuple[bytes, Pipe]:
    """Send ``data`` into one socket pair, through a zero-link Pipe, out of another."""
    client, pipe_in = socket_pair()
    pipe_out, server = socket_pair()
    pipe = Pipe(Link.parse(0, 0, None), gate or Gate())
    received = bytearray()

    async def send() -> None:
        await client.send_all(data)
        await client.send_eof()

    async def receive() -> None:
        while chunk := await server.receive_some(1 << 20):
            received.extend(chunk)

    async with client, pipe_in, pipe_out, server, trio.open_nursery() as nursery:
        nursery.start_soon(send)
        nursery.start_soon(receive)
        nursery.start_soon(pipe.run, pipe_in, pipe_out)
    return bytes(received), pipe


async def test_sockets_take_the_splice_path_and_every_byte_arrives(monkeypatch):
    calls = []
    real = _pipe._splice_until
    monkeypatch.setattr(_pipe, "_splice_until", lambda *a: calls.append(1) or real(*a))
    data = os.urandom(8 << 20)
    with trio.fail_after(30):
        received, pipe = await relay_bytes(data)
    assert received == data and pipe.stats.bytes == len(data)
    assert calls, "the socket pair did not go through splice"


async def test_memory_streams_keep_the_trio_copy(monkeypatch):
    # Control: streams that are not sockets never reach splice.
    monkeypatch.setattr(_pipe, "splice_copy", None)      # calling it would fail
    to_pipe, pipe_in = trio.testing.memory_stream_one_way_pair()
    pipe_out, from_pipe = trio.testing.memory_stream_one_way_pair()
    pipe = Pipe(Link.parse(0, 0, None), Gate())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pipe.run, pipe_in, pipe_out)
        await to_pipe.send_all(b"x" * 100)
        await to_pipe.aclose()
        assert await from_pipe.receive_some(1000) == b"x" * 100


async def test_a_closed_gate_holds_bytes_and_heal_delivers_them():
    gate = Gate()
    client, pipe_in = socket_pair()
    pipe_out, server = socket_pair()
    pipe = Pipe(Link.parse(0, 0, None), gate)
    async with client, pipe_in, pipe_out, server, trio.open_nursery() as nursery:
        nursery.start_soon(pipe.run, pipe_in, pipe_out)
        await client.send_all(b"before")
        with trio.fail_after(5):
            assert await server.receive_some(100) == b"before"       # control: gate open
        gate.close()
        await client.send_all(b"during")
        with trio.move_on_after(0.3) as silent:
            await server.receive_some(100)
        assert silent.cancelled_caught, "bytes crossed a closed gate"
        gate.open()
        with trio.fail_after(5):
            assert await server.receive_some(100) == b"during"
        nursery.cancel_scope.cancel()


async def test_cancelling_leaves_no_thread_and_a_vanished_peer_is_broken():
    threads = threading.active_count()
    client, pipe_in = socket_pair()
    pipe_out, server = socket_pair()
    pipe = Pipe(Link.parse(0, 0, None), Gate())
    async with client, pipe_in, pipe_out, server:
        with trio.move_on_after(0.2):
            await pipe.run(pipe_in, pipe_out)                 # nothing to send: waits
        # Cancelled: the worker thread was woken and returned; trio caches idle workers,
        # so wait for the count to come back rather than asserting it at once.
        with trio.fail_after(15):
            while threading.active_count() > threads + 1:
                await trio.sleep(0.05)
        await server.aclose()                                 # the far end vanishes
        broke = False
        with trio.fail_after(10):
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client.send_all, b"x" * (4 << 20))
                    await pipe.run(pipe_in, pipe_out)
            except* trio.BrokenResourceError:
                broke = True
        assert broke

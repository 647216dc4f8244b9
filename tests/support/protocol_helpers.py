"""Shared helpers for the protocol tests: sessions driven to a given state in memory."""

from __future__ import annotations

import os

import trio
import trio.testing
from common_helpers import PSK

import protocol
from protocol import Channel, Session, State
MEMORY_SIZE = 5 * protocol.PAGE_SIZE
CHUNK_SIZE = 2 * protocol.PAGE_SIZE
STATE = {"vcpus": [{"regs": {"rip": 0xFFF0, "rflags": 2}, "xsave": b"\0" * 64}], "name": "g", "x": None}


def transfer(sender: Session, receiver: Session, message: protocol.Message) -> protocol.Message:
    """Send one message from ``sender`` and return what ``receiver`` makes of it."""
    receiver.receive_data(sender.send(message))
    event = receiver.next_event()
    assert receiver.next_event() is protocol.NEED_DATA
    return event


def pair(psk_source: bytes = PSK, psk_destination: bytes = PSK, **kwargs: object) -> tuple[Session, Session]:
    return Session("source", psk_source, **kwargs), Session("destination", psk_destination, **kwargs)  # type: ignore[arg-type]


def authenticated() -> tuple[Session, Session]:
    source, destination = pair()
    transfer(source, destination, source.make_hello("test", {"kvm": True}))
    transfer(destination, source, destination.make_hello("test", {"kvm": True}))
    transfer(source, destination, source.make_auth())
    transfer(destination, source, destination.make_auth())
    assert source.state is destination.state is State.READY
    return source, destination


def migrate_message(memory_size: int = MEMORY_SIZE, chunk_size: int = CHUNK_SIZE) -> protocol.Migrate:
    return protocol.Migrate(state=STATE, strategy="full", memory_size=memory_size, chunk_size=chunk_size)


def prepare_message(memory_size: int = MEMORY_SIZE, chunk_size: int = CHUNK_SIZE) -> protocol.Prepare:
    return protocol.Prepare(strategy="full", memory_size=memory_size, chunk_size=chunk_size)


def memory(size: int = MEMORY_SIZE) -> bytes:
    return os.urandom(size)


def drive_to(target: State) -> tuple[Session, Session, bytes]:
    """A source and destination session both in ``target`` (a state reached by messages)."""
    mem = memory()
    if target is State.AWAIT_SOURCE_HELLO:
        return *pair(), mem
    source, destination = pair()
    steps = [
        (State.AWAIT_DESTINATION_HELLO, lambda: (source, destination, source.make_hello("t", {}))),
        (State.AWAIT_SOURCE_AUTH, lambda: (destination, source, destination.make_hello("t", {}))),
        (State.AWAIT_DESTINATION_AUTH, lambda: (source, destination, source.make_auth())),
        (State.READY, lambda: (destination, source, destination.make_auth())),
    ]
    for reached, step in steps:
        transfer(*step())
        if reached is target:
            return source, destination, mem
    if target is State.CLOCK_SYNC:
        transfer(source, destination, protocol.ClockSyncRequest(t1=1))
        return source, destination, mem
    if target in (State.PREPARING, State.PREPARED, State.ROUND_MEMORY, State.ROUND_COMMIT):
        transfer(source, destination, prepare_message())
        if target is State.PREPARING:
            return source, destination, mem
        transfer(destination, source, protocol.Prepared(prepare_ns=1))
        if target is State.PREPARED:
            return source, destination, mem
        transfer(source, destination, protocol.Round(runs=None))  # round 0: all of memory
        if target is State.ROUND_MEMORY:
            return source, destination, mem
        for offset in range(0, MEMORY_SIZE, CHUNK_SIZE):
            transfer(source, destination, protocol.MemoryChunk(offset, mem[offset : offset + CHUNK_SIZE]))
        return source, destination, mem
    transfer(source, destination, migrate_message())
    if target is State.MEMORY:
        return source, destination, mem
    for offset in range(0, MEMORY_SIZE, CHUNK_SIZE):
        transfer(source, destination, protocol.MemoryChunk(offset, mem[offset : offset + CHUNK_SIZE]))
    if target is State.COMMIT:
        return source, destination, mem
    transfer(source, destination, source.make_commit())
    if target is State.REPORT:
        return source, destination, mem
    raise ValueError(f"cannot drive to {target}")


def forge(sender: Session, message: protocol.Message) -> bytes:
    """Frame ``message`` as ``sender`` would, MAC included, but without its state machine's consent.

    Lets a test deliver a message the sender's own session would refuse to send.
    """
    from protocol._frames import LENGTH, memory_header, pack

    if isinstance(message, protocol.MemoryChunk):
        data = bytes(message.data)
        body = memory_header(message.offset, len(data))
        maced, body = body, body + data
    else:
        body = pack(message.to_wire())
        maced = body
    mac = sender._send_mac
    length = len(body) + (16 if mac is not None else 0)
    tag = mac.tag(length, [maced]) if mac is not None else b""
    return LENGTH.pack(length) + body + tag


async def connected(transport: str) -> tuple[Channel, Channel]:
    """Two authenticated channels over ``transport``: "memory" (the generic stream path) or
    "socket" (the fd path)."""
    if transport == "memory":
        left, right = trio.testing.memory_stream_pair()
        streams: tuple[trio.abc.Stream, trio.abc.Stream] = (left, right)
    else:
        a, b = trio.socket.socketpair()
        streams = (trio.SocketStream(a), trio.SocketStream(b))
    source = Channel(streams[0], Session("source", PSK))
    destination = Channel(streams[1], Session("destination", PSK))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: protocol.source_handshake(source, agent_version="s", capabilities={}, clock_rounds=0)
        )
        nursery.start_soon(
            lambda: protocol.destination_handshake(destination, agent_version="d", capabilities={})
        )
    return source, destination


class StreamWrapper(trio.abc.Stream):
    """A stream passing everything to ``inner``: subclasses change what a path does to writes."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()

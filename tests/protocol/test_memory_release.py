"""A failed memory stream lets go of the caller's buffer: guest RAM can be unmapped at once.

The agents unmap guest memory (an mmap) as soon as a migration ends, however it
ended; `mmap.close()` raises BufferError while any view of it lives.  So after a
failure -- a protocol error, a broken stream, cancellation -- no view made by the
session or the channel may survive, not even in the traceback being handled.
Each test closes the map where the agents do: while the exception propagates.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Iterator

import pytest
import trio
import trio.testing
from protocol_helpers import CHUNK_SIZE, MEMORY_SIZE, drive_to, forge

import protocol
from protocol import Channel, ConnectionClosed, State

CHUNK = 4 * 4096
MEMORY = os.urandom(16 * CHUNK)


@pytest.fixture
def guest_ram() -> Iterator[mmap.mmap]:
    ram = mmap.mmap(-1, len(MEMORY))
    yield ram
    with contextlib.suppress(BufferError):  # a view leaked: the test has failed already
        ram.close()


def still_mapped(ram: mmap.mmap) -> bool:
    """Whether some view keeps ``ram`` mapped (close() refused); closes it otherwise."""
    try:
        ram.close()
    except BufferError:
        return True
    return False


# -- sans-IO -------------------------------------------------------------------


def test_a_failed_destination_releases_its_views_of_the_sink(guest_ram: mmap.mmap) -> None:
    source, destination, memory = drive_to(State.MEMORY)
    ram = mmap.mmap(-1, MEMORY_SIZE)
    view = memoryview(ram)
    destination.receive_memory_into(view)
    view.release()
    frame = forge(source, protocol.MemoryChunk(0, memory[:CHUNK_SIZE]))
    destination.receive_data(frame)
    chunk = destination.next_event()  # a view of the sink
    assert isinstance(chunk, protocol.MemoryChunk) and chunk.data == memory[:CHUNK_SIZE]
    second = forge(source, protocol.MemoryChunk(CHUNK_SIZE, memory[CHUNK_SIZE : 2 * CHUNK_SIZE]))
    destination.receive_data(second[: len(second) // 2])  # streamed into the sink, frame unfinished
    assert destination.next_event() is protocol.NEED_DATA
    assert still_mapped(ram)  # control: the session's views do hold the map
    destination.fail("the test gives up")
    assert destination.state is State.ERROR and destination.failure == "the test gives up"
    assert not still_mapped(ram)
    with pytest.raises(ValueError, match="released"):
        bytes(chunk.data)  # never vouched for by a COMMIT: not readable after the failure


def test_a_protocol_error_mid_stream_releases_the_sink() -> None:
    source, destination, memory = drive_to(State.MEMORY)
    ram = mmap.mmap(-1, MEMORY_SIZE)
    view = memoryview(ram)
    destination.receive_memory_into(view)
    view.release()
    frame = bytearray(forge(source, protocol.MemoryChunk(0, memory[:CHUNK_SIZE])))
    frame[-1] ^= 1  # the tag: detected when the frame ends, after its data went to the sink
    destination.receive_data(bytes(frame))
    with pytest.raises(protocol.AuthenticationFailed):
        destination.next_event()
    assert not still_mapped(ram)


def test_a_failed_source_releases_the_chunk_it_framed() -> None:
    source, _, _ = drive_to(State.MEMORY)
    ram = mmap.mmap(-1, MEMORY_SIZE)
    view = memoryview(ram)
    pieces = source.send_iov(protocol.MemoryChunk(0, view[:CHUNK_SIZE]))  # as the channel: a write pending
    view.release()
    assert still_mapped(ram)  # control: the unwritten chunk's data is a view of the map
    source.fail("write cut short")
    assert not still_mapped(ram)
    assert len(pieces) == 3  # header, data, tag: still referenced, but released


def test_a_refused_chunk_keeps_no_view() -> None:
    source, _, _ = drive_to(State.MEMORY)
    ram = mmap.mmap(-1, MEMORY_SIZE)
    view = memoryview(ram)
    with pytest.raises(protocol.LocalProtocolError, match="expected offset 0"):
        source.send_iov(protocol.MemoryChunk(CHUNK_SIZE, view[CHUNK_SIZE : 2 * CHUNK_SIZE]))
    view.release()
    assert not still_mapped(ram)


def test_fail_keeps_the_first_reason_and_allows_only_error() -> None:
    source, _, _ = drive_to(State.READY)
    source.fail("first")
    source.fail("second")
    with pytest.raises(protocol.LocalProtocolError, match=r"CLOCK_REQUEST in state ERROR \(session failed: first\)"):
        source.send(protocol.ClockSyncRequest(t1=1))
    assert source.send(protocol.Error("internal", "why"))  # control: ERROR may still be sent


# -- the trio channel ------------------------------------------------------------


async def receive_into_ram(channel: Channel, ram: mmap.mmap) -> protocol.Commit:
    """As the destination agent does: a view for the call, released after it."""
    migrate = await channel.receive()
    assert isinstance(migrate, protocol.Migrate)
    view = memoryview(ram)
    try:
        return await channel.receive_memory(view)
    finally:
        view.release()


async def test_receive_memory_cut_short_leaves_no_view(channels: tuple[Channel, Channel], guest_ram: mmap.mmap) -> None:
    source, destination = channels
    await source.send(protocol.Migrate({}, "full", len(MEMORY), CHUNK))
    for offset in range(0, 5 * CHUNK, CHUNK):
        await source.send(protocol.MemoryChunk(offset, MEMORY[offset : offset + CHUNK]))
    pieces = source.session.send_iov(protocol.MemoryChunk(5 * CHUNK, MEMORY[5 * CHUNK : 6 * CHUNK]))
    await source.stream.send_all(b"".join(pieces)[: CHUNK // 2])  # half a frame, then the source dies
    await source.aclose()
    with pytest.raises(ConnectionClosed) as info:
        try:
            await receive_into_ram(destination, guest_ram)
        except ConnectionClosed:
            assert not still_mapped(guest_ram)  # the traceback is alive here
            raise
    assert type(info.value) is ConnectionClosed  # the error itself, not a group
    assert destination.session.state is State.ERROR


async def test_receive_memory_cancelled_leaves_no_view(channels: tuple[Channel, Channel], guest_ram: mmap.mmap) -> None:
    source, destination = channels
    await source.send(protocol.Migrate({}, "full", len(MEMORY), CHUNK))
    for offset in range(0, 5 * CHUNK, CHUNK):
        await source.send(protocol.MemoryChunk(offset, MEMORY[offset : offset + CHUNK]))
    with trio.CancelScope() as scope:
        scope.deadline = trio.current_time() + 0.2  # the source stalls mid-memory
        try:
            await receive_into_ram(destination, guest_ram)
        except trio.Cancelled:
            assert not still_mapped(guest_ram)
            raise
    assert scope.cancelled_caught
    assert destination.session.state is State.ERROR  # the buffer is gone: the stream cannot go on
    assert "abandoned (Cancelled)" in str(destination.session.failure)


async def test_receive_memory_control_a_whole_stream_keeps_the_memory(channels: tuple[Channel, Channel], guest_ram: mmap.mmap) -> None:
    source, destination = channels

    async def send() -> None:
        await source.send(protocol.Migrate({}, "full", len(MEMORY), CHUNK))
        await source.send_memory(MEMORY)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        commit = await receive_into_ram(destination, guest_ram)
    assert isinstance(commit, protocol.Commit) and guest_ram[:] == MEMORY
    assert destination.session.state is State.REPORT
    assert not still_mapped(guest_ram)


async def test_send_memory_cut_short_leaves_no_view(channels: tuple[Channel, Channel], guest_ram: mmap.mmap) -> None:
    source, destination = channels
    guest_ram[:] = MEMORY
    await source.send(protocol.Migrate({}, "full", len(MEMORY), CHUNK))
    await destination.aclose()  # the destination is gone before the memory
    view = memoryview(guest_ram)
    with pytest.raises(ConnectionClosed) as info:
        try:
            try:
                await source.send_memory(view)
            finally:
                view.release()
        except ConnectionClosed:
            assert not still_mapped(guest_ram)
            raise
    assert type(info.value) is ConnectionClosed
    assert source.session.state is State.ERROR


async def test_send_memory_cancelled_leaves_no_view(channels: tuple[Channel, Channel], guest_ram: mmap.mmap) -> None:
    source, destination = channels
    big = mmap.mmap(-1, 64 << 20)  # more than the socket buffers hold: the writes must wait
    await source.send(protocol.Migrate({}, "full", len(big), 1 << 20))
    view = memoryview(big)
    # Nobody reads on the other side: over a socket the writes wait, and are cancelled there;
    # a memory stream takes everything, so the cancellation comes at the first write.
    with trio.move_on_after(0.5 if isinstance(source.stream, trio.SocketStream) else 0) as scope:
        try:
            try:
                await source.send_memory(view)
            finally:
                view.release()
        except trio.Cancelled:
            assert not still_mapped(big)
            raise
    assert scope.cancelled_caught
    assert big.closed

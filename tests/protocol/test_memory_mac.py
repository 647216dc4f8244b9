"""The memory MAC (Poly1305 under a per-MIGRATE key) and the memory stream's runs.

A flipped bit anywhere in the memory is an IntegrityError at COMMIT, before
the destination may use it; the tag is keyed by the session and the
migration; runs that are out of order, overlapping, outside memory or past
the limits are refused at MIGRATE, before a byte is written.
"""

from __future__ import annotations

import hmac
import os
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives.poly1305 import Poly1305
from protocol_helpers import PSK, STATE, StreamWrapper, authenticated, connected, forge, transfer

import protocol
from protocol import Channel, IntegrityError, LimitExceeded, LocalProtocolError, RemoteProtocolError, Session, State
from protocol._auth import memory_key

PAGE = protocol.PAGE_SIZE
CHUNK = 2 * PAGE
SIZE = 8 * PAGE
MEMORY = os.urandom(SIZE)


def migrate(runs: list[tuple[int, int]] | None = None, size: int = SIZE) -> protocol.Migrate:
    return protocol.Migrate(STATE, "full", size, CHUNK, None if runs is None else protocol.pack_runs(runs))


def chunks(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The chunks due for ``runs``, written out independently of the stream's rule."""
    due = []
    for offset, length in runs:
        for start in range(offset, offset + length, CHUNK):
            due.append((start, min(CHUNK, offset + length - start)))
    return due


def stream(
    source: Session, destination: Session, memory: bytes, runs: list[tuple[int, int]] | None = None,
    flip: int | None = None, sink: bytearray | None = None,
) -> protocol.Commit:
    """One MIGRATE's memory from ``source`` to ``destination``; ``flip``: the data byte whose
    low bit is flipped on the wire.  Returns the COMMIT received (or raises its error)."""
    transfer(source, destination, migrate(runs))
    if sink is not None:
        destination.receive_memory_into(sink)
    for offset, size in chunks([(0, SIZE)] if runs is None else runs):
        frame = bytearray(source.send(protocol.MemoryChunk(offset, memory[offset : offset + size])))
        data_at = len(frame) - 16 - size  # data ends before the 16-byte frame tag
        if flip is not None and offset <= flip < offset + size:
            frame[data_at + flip - offset] ^= 1
        destination.receive_data(bytes(frame))
        assert isinstance(destination.next_event(), protocol.MemoryChunk)
    destination.receive_data(source.send(source.make_commit()))
    commit = destination.next_event()
    assert isinstance(commit, protocol.Commit)
    return commit


@pytest.mark.parametrize("flip", [0, 1, CHUNK - 1, CHUNK, SIZE // 2 + 7, SIZE - 1])
@pytest.mark.parametrize("into_sink", [False, True])
def test_a_flipped_bit_anywhere_in_the_memory_fails_the_commit(flip: int, into_sink: bool) -> None:
    source, destination = authenticated()
    sink = bytearray(SIZE) if into_sink else None
    with pytest.raises(IntegrityError, match="COMMIT.tag differs from the Poly1305 tag"):
        stream(source, destination, MEMORY, flip=flip, sink=sink)
    assert destination.state is State.ERROR  # no REPORT: nothing may be restored


@pytest.mark.parametrize("into_sink", [False, True])
def test_flip_control_the_unaltered_memory_passes(into_sink: bool) -> None:
    source, destination = authenticated()
    sink = bytearray(SIZE) if into_sink else None
    stream(source, destination, MEMORY, sink=sink)
    assert destination.state is State.REPORT
    assert sink is None or sink == MEMORY


def sessions_with(psk: bytes, nonces: tuple[bytes, bytes]) -> tuple[Session, Session]:
    source = Session("source", psk, nonce=nonces[0])
    destination = Session("destination", psk, nonce=nonces[1])
    transfer(source, destination, source.make_hello("t", {}))
    transfer(destination, source, destination.make_hello("t", {}))
    transfer(source, destination, source.make_auth())
    transfer(destination, source, destination.make_auth())
    return source, destination


def tags(psk: bytes, nonces: tuple[bytes, bytes], migrations: int = 1) -> list[bytes]:
    source, destination = sessions_with(psk, nonces)
    found = []
    for _ in range(migrations):
        found.append(stream(source, destination, MEMORY).tag)
        transfer(destination, source, protocol.Report({}))
    return found


NONCES = (b"s" * 32, b"d" * 32)


def test_the_tag_is_keyed_by_the_session() -> None:
    (one,) = tags(PSK, NONCES)
    (same_key_other_nonces,) = tags(PSK, (b"S" * 32, b"d" * 32))
    (other_key,) = tags(b"another pre-shared key, 32 bytes", NONCES)
    assert len({one, same_key_other_nonces, other_key}) == 3


def test_keyed_control_the_same_session_keys_give_the_same_tag() -> None:
    assert tags(PSK, NONCES) == tags(PSK, NONCES)


def test_each_migration_of_a_session_has_its_own_key() -> None:
    first, second = tags(PSK, NONCES, migrations=2)
    assert first != second  # the same memory: only the one-time key differs


def test_the_tag_is_poly1305_under_the_derived_key_never_the_psk() -> None:
    source, destination = sessions_with(PSK, NONCES)
    commit = stream(source, destination, MEMORY)
    source_key = source._keys["source"]
    expected = Poly1305.generate_tag(
        hmac.digest(source_key, b"kvm-migration-testbed/protocol/1\0memory\0" + bytes(8), "sha256"), MEMORY
    )
    assert commit.tag == expected == Poly1305.generate_tag(memory_key(source_key, 0), MEMORY)
    assert commit.tag != Poly1305.generate_tag(PSK, MEMORY)


# -- runs ------------------------------------------------------------------------


def test_runs_send_only_their_pages_in_chunks_and_the_rest_is_untouched() -> None:
    source, destination = authenticated()
    runs = [(0, PAGE), (2 * PAGE, 3 * PAGE), (7 * PAGE, PAGE)]
    sink = bytearray(b"\xee" * SIZE)
    stream(source, destination, MEMORY, runs, sink=sink)
    assert destination.state is State.REPORT
    expected = bytearray(b"\xee" * SIZE)
    for offset, length in runs:
        expected[offset : offset + length] = MEMORY[offset : offset + length]
    assert sink == expected


def test_a_flipped_bit_inside_a_run_fails_the_commit() -> None:
    source, destination = authenticated()
    with pytest.raises(IntegrityError):
        stream(source, destination, MEMORY, [(PAGE, PAGE), (4 * PAGE, 2 * PAGE)], flip=5 * PAGE + 3)


@pytest.mark.parametrize(
    ("runs", "error"),
    [
        ([(2 * PAGE, PAGE), (0, PAGE)], r"MIGRATE.runs\[1\] \(0, 4096\): is out of order after the run before, which ends at 12288"),
        ([(0, 2 * PAGE), (PAGE, PAGE)], r"MIGRATE.runs\[1\] \(4096, 4096\): overlaps the run before, which ends at 8192"),
        ([(0, PAGE), (0, PAGE)], r"MIGRATE.runs\[1\] \(0, 4096\): overlaps the run before"),
        ([(6 * PAGE, 3 * PAGE)], r"MIGRATE.runs\[0\] \(24576, 12288\): ends at 36864, outside memory_size 32768"),
        ([(2**64 - PAGE, PAGE)], r"outside memory_size 32768"),
        ([(100, PAGE)], r"MIGRATE.runs\[0\] \(100, 4096\): offset and length must be multiples of 4096"),
        ([(0, 0)], r"MIGRATE.runs\[0\] \(0, 0\): offset and length must be multiples of 4096, length > 0"),
    ],
)
def test_bad_runs_are_refused_at_migrate_by_both_sides(runs: list[tuple[int, int]], error: str) -> None:
    source, destination = authenticated()
    with pytest.raises(LocalProtocolError, match=error):
        source.send(migrate(runs))
    destination.receive_data(forge(source, migrate(runs)))
    with pytest.raises(RemoteProtocolError, match=error):
        destination.next_event()
    assert destination.state is State.ERROR  # before MEMORY: no byte written, no buffer asked for
    with pytest.raises(LocalProtocolError, match="receive_memory_into is for a destination before"):
        destination.receive_memory_into(bytearray(SIZE))


def test_runs_past_the_limit_are_refused_before_they_are_unpacked() -> None:
    limits = protocol.Limits(max_memory_runs=2)
    source, destination = authenticated()
    destination.limits = limits
    runs = [(0, PAGE), (2 * PAGE, PAGE), (4 * PAGE, PAGE)]
    destination.receive_data(forge(source, migrate(runs)))
    with pytest.raises(LimitExceeded, match=r"MIGRATE.runs: 3 runs exceeds the limit 2"):
        destination.next_event()
    source.limits = limits
    with pytest.raises(LocalProtocolError, match="3 runs exceeds the limit 2"):
        source.send(migrate(runs))


def test_runs_limit_control_at_the_limit_passes() -> None:
    source, destination = authenticated()
    destination.limits = source.limits = protocol.Limits(max_memory_runs=2)
    transfer(source, destination, migrate([(0, PAGE), (2 * PAGE, PAGE)]))
    assert destination.state is State.MEMORY


def test_runs_not_a_whole_number_of_runs_are_refused() -> None:
    source, destination = authenticated()
    bad = protocol.Migrate(STATE, "full", SIZE, CHUNK, b"\0" * 17)
    destination.receive_data(forge(source, bad))
    with pytest.raises(RemoteProtocolError, match="MIGRATE.runs: 17 bytes is not a whole number of 16-byte runs"):
        destination.next_event()


def test_a_chunk_outside_the_run_due_is_refused() -> None:
    source, destination = authenticated()
    transfer(source, destination, migrate([(0, PAGE), (4 * PAGE, PAGE)]))
    sink = bytearray(SIZE)
    destination.receive_memory_into(sink)
    transfer(source, destination, protocol.MemoryChunk(0, MEMORY[:PAGE]))
    with pytest.raises(LocalProtocolError, match=r"MEMORY chunk at offset 4096, expected offset 16384 \(run 1\)"):
        source.send(protocol.MemoryChunk(PAGE, MEMORY[PAGE : 2 * PAGE]))
    destination.receive_data(forge(source, protocol.MemoryChunk(PAGE, MEMORY[PAGE : 2 * PAGE])))
    with pytest.raises(RemoteProtocolError, match=r"expected offset 16384 \(run 1\)"):
        destination.next_event()
    assert sink[PAGE:] == bytes(SIZE - PAGE)  # the refused chunk's data went nowhere


def test_no_runs_is_stop_and_copy_all_of_memory_in_order() -> None:
    source, destination = authenticated()
    transfer(source, destination, migrate())
    due = []
    while (next_chunk := source.memory_due()) is not None:
        due.append(next_chunk)
        offset, size = next_chunk
        transfer(source, destination, protocol.MemoryChunk(offset, MEMORY[offset : offset + size]))
    assert due == [(offset, CHUNK) for offset in range(0, SIZE, CHUNK)]
    assert source.state is State.COMMIT


async def stream_runs(
    transport: str, runs: list[tuple[int, int]], memory: bytes, sink: bytearray, before_memory: Any = None
) -> Channel:
    """MIGRATE with ``runs``, then ``send_memory`` into ``receive_memory(sink)``; the destination."""
    source, destination = await connected(transport)

    async def send() -> None:
        await source.send(migrate(runs, size=len(memory)))
        if before_memory is not None:
            before_memory()
        await source.send_memory(memory)

    async def receive() -> None:
        assert isinstance(await destination.receive(), protocol.Migrate)
        await destination.receive_memory(sink)

    async with source, destination, trio.open_nursery() as nursery:
        nursery.start_soon(send)
        nursery.start_soon(receive)
    return destination


@pytest.mark.parametrize("transport", ["memory", "socket"])
async def test_send_memory_sends_the_runs_straight_into_the_destination(transport: str) -> None:
    runs = [(PAGE, 3 * PAGE), (5 * PAGE, 2 * PAGE)]
    sink = bytearray(SIZE)
    destination = await stream_runs(transport, runs, MEMORY, sink)
    expected = bytearray(SIZE)
    for offset, length in runs:
        expected[offset : offset + length] = MEMORY[offset : offset + length]
    assert sink == expected and destination.session.state is State.REPORT


async def test_small_runs_share_a_writev(monkeypatch: pytest.MonkeyPatch) -> None:
    """A dirty round's single pages: one system call per batch, not per page."""
    import protocol._io

    size = 128 * PAGE
    memory = os.urandom(size)
    runs = [(offset, PAGE) for offset in range(0, size, 2 * PAGE)]  # 64 single-page runs
    sink = bytearray(size)
    writes: list[int] = []
    real = protocol._io.os.writev

    def counting(fd: int, pieces: list[bytes | memoryview]) -> int:
        writes.append(len(pieces))
        return real(fd, pieces)

    await stream_runs("socket", runs, memory, sink, lambda: monkeypatch.setattr(protocol._io.os, "writev", counting))
    assert all(sink[o : o + n] == memory[o : o + n] for o, n in runs)
    assert writes[0] == 3 * len(runs)  # the whole round in the first writev (control: 3 without batching)
    assert len(writes) <= 1 + 4  # that, the COMMIT, and a few more if the socket took only part


class FlipOneBit(StreamWrapper):
    """On the path: flips one bit in the first write of exactly ``size`` bytes (a chunk's data)."""

    def __init__(self, inner: trio.abc.Stream, size: int) -> None:
        super().__init__(inner)
        self.size, self.flipped = size, False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if not self.flipped and len(data) == self.size:
            data = bytearray(data)
            data[len(data) // 2] ^= 0x10
            self.flipped = True
        await self.inner.send_all(data)


async def migrate_through(size: int) -> tuple[list[str], BaseException | None, BaseException | None]:
    """A migration whose path flips a bit in a ``size``-byte write: what the destination did
    (received, restored), and what each side raised."""
    source, destination = await connected("memory")
    source.stream = FlipOneBit(source.stream, size)
    done: list[str] = []
    raised: dict[str, BaseException | None] = {"source": None, "destination": None}

    async def send() -> None:
        try:
            await source.send(migrate())
            await source.send_memory(MEMORY)
            assert isinstance(await source.receive(), protocol.Report)
        except protocol.ProtocolError as exc:
            raised["source"] = exc

    async def receive() -> None:
        try:
            assert isinstance(await destination.receive(), protocol.Migrate)
            await destination.receive_memory(bytearray(SIZE))
            done.append("restored")  # what an agent would do next: only with the tag checked
            await destination.send(protocol.Report({}))
        except protocol.ProtocolError as exc:
            raised["destination"] = exc

    async with source, destination, trio.open_nursery() as nursery:
        nursery.start_soon(send)
        nursery.start_soon(receive)
    return done, raised["source"], raised["destination"]


async def test_a_bit_flipped_on_the_path_stops_the_destination_before_it_restores() -> None:
    done, at_source, at_destination = await migrate_through(CHUNK)
    assert done == []
    assert isinstance(at_destination, IntegrityError)
    assert isinstance(at_source, protocol.PeerError) and at_source.code == "integrity"


async def test_path_control_an_honest_path_restores() -> None:
    done, at_source, at_destination = await migrate_through(-1)
    assert (done, at_source, at_destination) == (["restored"], None, None)

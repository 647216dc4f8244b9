"""Precopy (protocol 3): PREPARE/PREPARED, ROUNDs of memory while the guest runs, then MIGRATE.

The moves PREPARE opens (allowed and refused, naming state and message), whole
precopy conversations through two sessions and through two channels, a key per
memory stream (a ROUND's tag replayed for a later stream fails), the prepared
sizes a MIGRATE must repeat, ``whole_memory_sent``, and ``send_memory(copy=True)``,
which sends the bytes as they were at the copy however the guest changes them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives.poly1305 import Poly1305
from protocol_helpers import STATE, authenticated, forge, transfer

import protocol
from protocol import (
    Channel,
    IntegrityError,
    LimitExceeded,
    LocalProtocolError,
    Preparation,
    RemoteProtocolError,
    Session,
    State,
)
from protocol._auth import memory_key

PAGE = protocol.PAGE_SIZE
CHUNK = 2 * PAGE
SIZE = 8 * PAGE


def prepare(size: int = SIZE, chunk: int = CHUNK) -> protocol.Prepare:
    return protocol.Prepare(strategy="clock=guest,tsc=native,runstate=kernel", memory_size=size, chunk_size=chunk)


def migrate(runs: list[tuple[int, int]] | None, size: int = SIZE, chunk: int = CHUNK) -> protocol.Migrate:
    return protocol.Migrate(STATE, "clock=guest,tsc=native,runstate=kernel", size, chunk,
                            None if runs is None else protocol.pack_runs(runs))


def round_of(runs: list[tuple[int, int]] | None) -> protocol.Round:
    return protocol.Round(runs=None if runs is None else protocol.pack_runs(runs))


def prepared_pair() -> tuple[Session, Session]:
    source, destination = authenticated()
    transfer(source, destination, prepare())
    transfer(destination, source, protocol.Prepared(prepare_ns=1234))
    return source, destination


def stream(source: Session, destination: Session, memory: bytes | bytearray, into: bytearray,
           tag: bytes | None = None) -> protocol.Commit:
    """The memory of the ROUND or MIGRATE just sent, chunk by chunk as the session says, into
    ``into``; then COMMIT (``tag`` instead of the source's, forged, if given)."""
    destination.receive_memory_into(into)
    while (due := source.memory_due()) is not None:
        offset, size = due
        destination.receive_data(source.send(protocol.MemoryChunk(offset, memory[offset : offset + size])))
        assert isinstance(destination.next_event(), protocol.MemoryChunk)
    commit = source.make_commit()
    if tag is None:
        destination.receive_data(source.send(commit))
    else:
        destination.receive_data(forge(source, protocol.Commit(tag=tag)))
    received = destination.next_event()
    assert isinstance(received, protocol.Commit)
    return commit


# -- the moves ------------------------------------------------------------------------


def test_prepare_leads_to_preparing_then_prepared_and_both_sides_remember_it() -> None:
    source, destination = authenticated()
    assert source.prepared is destination.prepared is None
    assert transfer(source, destination, prepare()) == prepare()
    assert source.state is destination.state is State.PREPARING
    expected = Preparation("clock=guest,tsc=native,runstate=kernel", SIZE, CHUNK, whole_memory_sent=False)
    assert source.prepared == destination.prepared == expected
    assert transfer(destination, source, protocol.Prepared(prepare_ns=99)).prepare_ns == 99  # type: ignore[attr-defined]
    assert source.state is destination.state is State.PREPARED


@pytest.mark.parametrize(
    ("drive", "sender_role", "message", "text"),
    [
        (authenticated, "source", round_of(None),
         "the peer (source) sent ROUND in state READY, where BYE or CLOCK_REQUEST or MIGRATE or PREPARE "
         "may come from the source"),
        (prepared_pair, "source", prepare(),
         "the peer (source) sent PREPARE in state PREPARED, where BYE or MIGRATE or ROUND may come from "
         "the source"),
        (prepared_pair, "source", protocol.ClockSyncRequest(t1=1),
         "the peer (source) sent CLOCK_REQUEST in state PREPARED, where BYE or MIGRATE or ROUND may come "
         "from the source"),
        (prepared_pair, "destination", protocol.Bye(),
         "the peer (destination) sent BYE in state PREPARED, where nothing may come from the destination"),
        (prepared_pair, "destination", protocol.Prepared(prepare_ns=1),
         "the peer (destination) sent PREPARED in state PREPARED, where nothing may come from the destination"),
        (authenticated, "destination", protocol.Prepared(prepare_ns=1),
         "the peer (destination) sent PREPARED in state READY, where BYE may come from the destination"),
    ],
    ids=["round-in-ready", "prepare-twice", "clock-in-prepared", "destination-bye", "prepared-twice",
         "prepared-unasked"],
)
def test_the_moves_precopy_does_not_allow_are_refused_naming_state_and_message(
    drive: Callable[[], tuple[Session, Session]], sender_role: str, message: protocol.Message, text: str
) -> None:
    source, destination = drive()
    sender, receiver = (source, destination) if sender_role == "source" else (destination, source)
    before = sender.state
    with pytest.raises(LocalProtocolError) as local:
        sender.send(message)
    assert str(local.value) == text.replace("the peer", "this side")
    assert sender.state is before  # a refused send changes nothing
    receiver.receive_data(forge(sender, message))
    with pytest.raises(RemoteProtocolError) as remote:
        receiver.next_event()
    assert str(remote.value) == text
    assert receiver.state is State.ERROR


def test_migrate_while_preparing_is_refused() -> None:
    source, destination = authenticated()
    transfer(source, destination, prepare())
    with pytest.raises(LocalProtocolError, match="sent MIGRATE in state PREPARING, where nothing may come"):
        source.send(migrate(None))
    destination.receive_data(forge(source, migrate(None)))
    with pytest.raises(RemoteProtocolError, match="sent MIGRATE in state PREPARING"):
        destination.next_event()


def test_bye_from_prepared_closes_and_forgets_the_preparation() -> None:
    source, destination = prepared_pair()
    assert isinstance(transfer(source, destination, protocol.Bye()), protocol.Bye)
    assert source.state is destination.state is State.CLOSED
    assert source.prepared is destination.prepared is None
    destination.receive_data(b"")
    assert destination.next_event() is protocol.END_OF_STREAM


@pytest.mark.parametrize(
    ("migration", "text"),
    [
        (migrate(None, size=SIZE + PAGE),
         "MIGRATE announces memory_size 36864 and chunk_size 8192 in state PREPARED, where PREPARE "
         "announced memory_size 32768 and chunk_size 8192"),
        (migrate(None, chunk=PAGE),
         "MIGRATE announces memory_size 32768 and chunk_size 4096 in state PREPARED, where PREPARE "
         "announced memory_size 32768 and chunk_size 8192"),
    ],
    ids=["memory_size", "chunk_size"],
)
def test_a_migrate_must_announce_the_prepared_sizes(migration: protocol.Migrate, text: str) -> None:
    source, destination = prepared_pair()
    with pytest.raises(LocalProtocolError) as local:
        source.send(migration)
    assert str(local.value) == text
    assert source.state is State.PREPARED
    destination.receive_data(forge(source, migration))
    with pytest.raises(RemoteProtocolError) as remote:
        destination.next_event()
    assert str(remote.value) == text
    # Control: the prepared sizes pass, and the same MIGRATE from READY (no PREPARE) too.
    source, destination = prepared_pair()
    assert transfer(source, destination, migrate(None)) == migrate(None)
    source, destination = authenticated()
    assert transfer(source, destination, migration) == migration


@pytest.mark.parametrize(
    ("runs", "error", "text"),
    [
        ([(6 * PAGE, 3 * PAGE)], RemoteProtocolError,
         r"ROUND.runs\[0\] \(24576, 12288\): ends at 36864, outside memory_size 32768 \(state PREPARED\)"),
        ([(PAGE, PAGE), (0, PAGE)], RemoteProtocolError,
         r"ROUND.runs\[1\] \(0, 4096\): is out of order after the run before"),
        ([(i * PAGE, PAGE) for i in range(0, 8, 2)], LimitExceeded, r"ROUND.runs: 4 runs exceeds the limit 3"),
    ],
    ids=["outside", "order", "count"],
)
def test_round_runs_are_checked_against_the_prepared_memory_and_the_limits(
    runs: list[tuple[int, int]], error: type[Exception], text: str
) -> None:
    source, destination = prepared_pair()
    limits = protocol.Limits(max_memory_runs=3)
    source.limits = destination.limits = limits
    with pytest.raises(LocalProtocolError, match=text):
        source.send(round_of(runs))
    destination.receive_data(forge(source, round_of(runs)))
    with pytest.raises(error, match=text):
        destination.next_event()
    assert destination.state is State.ERROR  # before ROUND_MEMORY: no buffer was asked for


def test_prepare_is_bounded_before_anything_is_allocated() -> None:
    source, destination = authenticated()
    destination.limits = protocol.Limits(max_memory_size=SIZE)
    big = prepare(size=2 * SIZE)
    destination.receive_data(forge(source, big))
    with pytest.raises(LimitExceeded, match="PREPARE.memory_size: 65536 bytes exceeds the limit 32768"):
        destination.next_event()
    assert destination.prepared is None and destination.state is State.ERROR
    source, destination = authenticated()
    destination.limits = protocol.Limits(max_chunk_size=PAGE)
    destination.receive_data(forge(source, prepare()))
    with pytest.raises(LimitExceeded, match="PREPARE.chunk_size: 8192 bytes exceeds the limit 4096"):
        destination.next_event()
    source, destination = authenticated()  # control: at the limit
    destination.limits = protocol.Limits(max_memory_size=SIZE)
    assert transfer(source, destination, prepare()) == prepare()


# -- whole conversations ------------------------------------------------------------------


def test_a_whole_precopy_conversation_through_two_sessions() -> None:
    source, destination = authenticated()
    guest = bytearray(os.urandom(SIZE))
    into = bytearray(SIZE)
    transfer(source, destination, prepare())
    transfer(destination, source, protocol.Prepared(prepare_ns=5))
    # Round 0: all of memory, while the guest runs.
    transfer(source, destination, round_of(None))
    assert destination.state is State.ROUND_MEMORY
    stream(source, destination, guest, into)
    assert source.state is destination.state is State.PREPARED
    assert into == guest
    # The guest dirties two runs; round 1 sends them.
    guest[PAGE : 3 * PAGE] = os.urandom(2 * PAGE)
    guest[5 * PAGE : 6 * PAGE] = os.urandom(PAGE)
    transfer(source, destination, round_of([(PAGE, 2 * PAGE), (5 * PAGE, PAGE)]))
    stream(source, destination, guest, into)
    assert into == guest
    # Round 2 finds nothing dirty: zero runs, COMMIT at once.
    transfer(source, destination, protocol.Round(runs=b""))
    assert source.state is destination.state is State.ROUND_COMMIT
    stream(source, destination, guest, into)
    # Stop: the last dirty page goes with the MIGRATE.
    guest[7 * PAGE :] = os.urandom(PAGE)
    transfer(source, destination, migrate([(7 * PAGE, PAGE)]))
    assert destination.state is State.MEMORY
    stream(source, destination, guest, into)
    assert source.state is destination.state is State.REPORT
    assert into == guest
    transfer(destination, source, protocol.Report({"ok": True}))
    assert source.state is destination.state is State.READY
    assert source.prepared is destination.prepared is None
    # Another migration may follow: stop-copy from READY, as today.
    transfer(source, destination, migrate(None))
    stream(source, destination, guest, into)
    assert destination.state is State.REPORT


def test_whole_memory_sent_only_once_a_round_of_all_memory_is_committed() -> None:
    source, destination = prepared_pair()
    guest, into = os.urandom(SIZE), bytearray(SIZE)

    def whole() -> tuple[bool, bool]:
        assert source.prepared is not None and destination.prepared is not None
        return source.prepared.whole_memory_sent, destination.prepared.whole_memory_sent

    assert whole() == (False, False)
    transfer(source, destination, round_of([(0, 4 * PAGE)]))  # half of memory: not the whole
    stream(source, destination, guest, into)
    assert whole() == (False, False)
    transfer(source, destination, round_of(None))
    destination.receive_memory_into(into)
    while (due := source.memory_due()) is not None:
        offset, size = due
        transfer(source, destination, protocol.MemoryChunk(offset, guest[offset : offset + size]))
    assert destination.state is State.ROUND_COMMIT
    assert whole() == (False, False)  # all chunks, but not yet committed
    transfer(source, destination, source.make_commit())
    assert whole() == (True, True)
    transfer(source, destination, round_of([(PAGE, PAGE)]))  # a later dirty round keeps it
    stream(source, destination, guest, into)
    assert whole() == (True, True)


def test_a_round_of_all_memory_whose_commit_fails_is_not_whole_memory_sent() -> None:
    # Negative control for the test above: a corrupted round 0 never sets it.
    source, destination = prepared_pair()
    transfer(source, destination, round_of(None))
    with pytest.raises(IntegrityError, match="COMMIT.tag differs"):
        stream(source, destination, os.urandom(SIZE), bytearray(SIZE), tag=b"\0" * 16)
    assert destination.prepared is not None and destination.prepared.whole_memory_sent is False


# -- one key per memory stream -------------------------------------------------------------------


def test_every_memory_stream_has_its_own_key() -> None:
    source, destination = prepared_pair()
    guest, into = os.urandom(SIZE), bytearray(SIZE)
    tags = []
    for _ in range(2):  # two ROUNDs of the same bytes
        transfer(source, destination, round_of(None))
        tags.append(stream(source, destination, guest, into).tag)
    transfer(source, destination, migrate(None))  # and the MIGRATE, the same bytes again
    tags.append(stream(source, destination, guest, into).tag)
    assert len(set(tags)) == 3
    key = source._keys["source"]  # the n-th memory stream's key, from 0, ROUNDs and MIGRATE alike
    assert tags == [Poly1305.generate_tag(memory_key(key, n), guest) for n in range(3)]


def test_a_rounds_tag_replayed_for_a_later_stream_fails() -> None:
    source, destination = prepared_pair()
    guest, into = os.urandom(SIZE), bytearray(SIZE)
    transfer(source, destination, round_of(None))
    first = stream(source, destination, guest, into).tag
    transfer(source, destination, round_of(None))  # the same bytes again, under the next key
    with pytest.raises(IntegrityError, match="COMMIT.tag differs from the Poly1305 tag"):
        stream(source, destination, guest, into, tag=first)
    assert destination.state is State.ERROR
    # Control: the same two rounds, the second with its own tag, pass.
    source, destination = prepared_pair()
    for _ in range(2):
        transfer(source, destination, round_of(None))
        stream(source, destination, guest, into)
    assert destination.state is State.PREPARED


# -- over channels --------------------------------------------------------------------------------

async def precopy_over(
    source: Channel, destination: Channel, guest: bytearray, into: bytearray, *, copy: bool = True
) -> dict[str, Any]:
    """PREPARE, round 0, one dirty round, MIGRATE with the last dirty run, REPORT, BYE."""

    async def destination_side() -> None:
        message = await destination.receive()
        assert isinstance(message, protocol.Prepare)
        await destination.send(protocol.Prepared(prepare_ns=7))
        while isinstance(message := await destination.receive(), protocol.Round):
            await destination.receive_memory(into)
        assert isinstance(message, protocol.Migrate)
        await destination.receive_memory(into)
        await destination.send(protocol.Report({"equal": into == guest}))
        assert isinstance(await destination.receive(), protocol.Bye)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(destination_side)
        await source.send(prepare(len(guest)))
        prepared = await source.receive()
        assert isinstance(prepared, protocol.Prepared) and prepared.prepare_ns == 7
        await source.send(round_of(None))
        await source.send_memory(guest, copy=copy)
        guest[2 * PAGE : 4 * PAGE] = os.urandom(2 * PAGE)
        await source.send(round_of([(2 * PAGE, 2 * PAGE)]))
        await source.send_memory(guest, copy=copy)
        assert source.session.prepared is not None and source.session.prepared.whole_memory_sent
        guest[-PAGE:] = os.urandom(PAGE)
        await source.send(migrate([(len(guest) - PAGE, PAGE)], size=len(guest)))
        await source.send_memory(guest)
        report = await source.receive()
        assert isinstance(report, protocol.Report)
        await source.send(protocol.Bye())
    return dict(report.report)


async def test_a_whole_precopy_conversation_through_two_channels(channels: tuple[Channel, Channel]) -> None:
    source, destination = channels
    guest, into = bytearray(os.urandom(SIZE)), bytearray(SIZE)
    assert await precopy_over(source, destination, guest, into) == {"equal": True}
    assert into == guest


async def test_copy_true_across_batches_larger_than_the_bounce_buffer(channels: tuple[Channel, Channel]) -> None:
    # 3 MiB in 768 KiB chunks: the 1 MiB bounce buffer holds one chunk per batch.
    source, destination = channels
    size, chunk = 3 << 20, 768 << 10
    guest, into = bytearray(os.urandom(size)), bytearray(size)

    async def destination_side() -> None:
        assert isinstance(await destination.receive(), protocol.Prepare)
        await destination.send(protocol.Prepared(prepare_ns=1))
        assert isinstance(await destination.receive(), protocol.Round)
        await destination.receive_memory(into)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(destination_side)
        await source.send(prepare(size, chunk))
        assert isinstance(await source.receive(), protocol.Prepared)
        await source.send(round_of(None))
        await source.send_memory(guest, copy=True)
    assert into == guest
    assert source._bounce is not None and len(source._bounce) == 1 << 20


def mutate_after_each_send(channel: Channel, guest: bytearray) -> list[int]:
    """Make the guest write every chunk right after the session has MACed it, before the write:
    as a running vCPU would.  Returns the offsets changed."""
    session = channel.session
    real = session.send_iov
    changed: list[int] = []

    def send_iov(message: protocol.Message) -> list[bytes | memoryview]:
        pieces = real(message)
        if isinstance(message, protocol.MemoryChunk):
            guest[message.offset] ^= 0xFF
            changed.append(message.offset)
        return pieces

    session.send_iov = send_iov  # type: ignore[method-assign]
    return changed


async def test_copy_true_sends_the_bytes_as_copied_however_the_guest_changes_them(channels: tuple[Channel, Channel]) -> None:
    source, destination = channels
    guest, into = bytearray(os.urandom(SIZE)), bytearray(SIZE)
    at_copy = bytes(guest)

    async def receive() -> protocol.Commit:
        assert isinstance(await destination.receive(), protocol.Prepare)
        await destination.send(protocol.Prepared(prepare_ns=1))
        assert isinstance(await destination.receive(), protocol.Round)
        return await destination.receive_memory(into)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        await source.send(prepare())
        assert isinstance(await source.receive(), protocol.Prepared)
        await source.send(round_of(None))
        changed = mutate_after_each_send(source, guest)
        await source.send_memory(guest, copy=True)
    assert changed == list(range(0, SIZE, CHUNK))
    assert bytes(guest) != at_copy
    assert into == at_copy  # the COMMIT's tag matched: it covers exactly the bytes written


async def test_copy_false_would_write_bytes_other_than_those_maced(channels: tuple[Channel, Channel]) -> None:
    # Negative control for the test above: without the bounce buffer, the guest's write between
    # the MAC and the write goes on the wire, and the destination's COMMIT check fails.
    source, destination = channels
    guest, into = bytearray(os.urandom(SIZE)), bytearray(SIZE)
    failure: list[BaseException] = []

    async def receive() -> None:
        assert isinstance(await destination.receive(), protocol.Prepare)
        await destination.send(protocol.Prepared(prepare_ns=1))
        assert isinstance(await destination.receive(), protocol.Round)
        try:
            await destination.receive_memory(into)
        except IntegrityError as exc:
            failure.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        await source.send(prepare())
        assert isinstance(await source.receive(), protocol.Prepared)
        await source.send(round_of(None))
        mutate_after_each_send(source, guest)
        await source.send_memory(guest, copy=False)
    assert len(failure) == 1 and "COMMIT.tag differs from the Poly1305 tag" in str(failure[0])


async def test_send_memory_needs_a_round_or_migrate(channels: tuple[Channel, Channel]) -> None:
    source, destination = channels
    with pytest.raises(LocalProtocolError, match=r"send_memory needs a ROUND or MIGRATE sent first \(state READY\)"):
        await source.send_memory(bytearray(SIZE), copy=True)


async def test_bye_from_prepared_over_channels(channels: tuple[Channel, Channel]) -> None:
    source, destination = channels
    async with trio.open_nursery() as nursery:
        nursery.start_soon(source.send, prepare())
        assert isinstance(await destination.receive(), protocol.Prepare)
    await destination.send(protocol.Prepared(prepare_ns=1))
    assert isinstance(await source.receive(), protocol.Prepared)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(source.bye)
        assert isinstance(await destination.receive(), protocol.Bye)
    assert destination.session.state is State.CLOSED and destination.session.prepared is None

"""The state machine: the table checked against an independent copy, then every message out of
order refused, on sending and on receiving, naming the state and message."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from protocol_helpers import (
    CHUNK_SIZE,
    MEMORY_SIZE,
    authenticated,
    drive_to,
    forge,
    migrate_message,
    prepare_message,
    transfer,
)

import protocol
from protocol import LocalProtocolError, RemoteProtocolError, Session, State
from protocol._messages import name_of
from protocol._state import COVERED, next_state

REACHABLE = [
    State.AWAIT_SOURCE_HELLO,
    State.AWAIT_DESTINATION_HELLO,
    State.AWAIT_SOURCE_AUTH,
    State.AWAIT_DESTINATION_AUTH,
    State.READY,
    State.CLOCK_SYNC,
    State.PREPARING,
    State.PREPARED,
    State.ROUND_MEMORY,
    State.ROUND_COMMIT,
    State.MEMORY,
    State.COMMIT,
    State.REPORT,
]


def sample(kind: type[protocol.Message], sender: Session) -> protocol.Message:
    samples: dict[type[protocol.Message], protocol.Message] = {
        protocol.Hello: sender.make_hello("t", {}),
        protocol.Auth: protocol.Auth(proof=b"p" * 32),
        protocol.ClockSyncRequest: protocol.ClockSyncRequest(t1=1),
        protocol.ClockSyncReply: protocol.ClockSyncReply(t1=1, t2=2, t3=3),
        protocol.Prepare: prepare_message(),
        protocol.Prepared: protocol.Prepared(prepare_ns=5),
        protocol.Round: protocol.Round(runs=None),
        protocol.Migrate: migrate_message(),
        protocol.MemoryChunk: protocol.MemoryChunk(0, b"\0" * CHUNK_SIZE),
        protocol.Commit: protocol.Commit(tag=b"d" * 16),
        protocol.Report: protocol.Report({}),
        protocol.Bye: protocol.Bye(),
    }
    return samples[kind]


KINDS = [
    protocol.Hello,
    protocol.Auth,
    protocol.ClockSyncRequest,
    protocol.ClockSyncReply,
    protocol.Prepare,
    protocol.Prepared,
    protocol.Round,
    protocol.Migrate,
    protocol.MemoryChunk,
    protocol.Commit,
    protocol.Report,
    protocol.Bye,
]

# The protocol's state table written out again from docs/protocol.md, independently of
# protocol._state (as h11's test_state.py does): (state, sender) -> {message: next state}.
# MEMORY stays in MEMORY here (the count moves it on), ERROR is handled apart from the table.
S, D = "source", "destination"
EXPECTED: dict[tuple[State, str], dict[type[protocol.Message], State]] = {
    (State.AWAIT_SOURCE_HELLO, S): {protocol.Hello: State.AWAIT_DESTINATION_HELLO},
    (State.AWAIT_DESTINATION_HELLO, D): {protocol.Hello: State.AWAIT_SOURCE_AUTH},
    (State.AWAIT_SOURCE_AUTH, S): {protocol.Auth: State.AWAIT_DESTINATION_AUTH},
    (State.AWAIT_DESTINATION_AUTH, D): {protocol.Auth: State.READY},
    (State.READY, S): {
        protocol.ClockSyncRequest: State.CLOCK_SYNC,
        protocol.Prepare: State.PREPARING,
        protocol.Migrate: State.MEMORY,
        protocol.Bye: State.CLOSED,
    },
    (State.READY, D): {protocol.Bye: State.CLOSED},
    (State.CLOCK_SYNC, D): {protocol.ClockSyncReply: State.READY},
    (State.PREPARING, D): {protocol.Prepared: State.PREPARED},
    (State.PREPARED, S): {
        protocol.Round: State.ROUND_MEMORY,
        protocol.Migrate: State.MEMORY,
        protocol.Bye: State.CLOSED,
    },
    (State.ROUND_MEMORY, S): {protocol.MemoryChunk: State.ROUND_MEMORY},
    (State.ROUND_COMMIT, S): {protocol.Commit: State.PREPARED},
    (State.MEMORY, S): {protocol.MemoryChunk: State.MEMORY},
    (State.COMMIT, S): {protocol.Commit: State.REPORT},
    (State.REPORT, D): {protocol.Report: State.READY},
}

COMBINATIONS = list(itertools.product(list(State), (S, D), KINDS))
CASES = [
    (state, role, kind)
    for state, role, kind in itertools.product(REACHABLE, (S, D), KINDS)
    if kind not in EXPECTED.get((state, role), {})
]
ALLOWED = [
    (state, role, kind)
    for state, role, kind in itertools.product(REACHABLE, (S, D), KINDS)
    if kind in EXPECTED.get((state, role), {})
]


def table_differences(lookup: Callable[[State, str, type], State | None]) -> list[str]:
    """Where ``lookup`` (the table under test) disagrees with EXPECTED, one line each."""
    differences = []
    for state, role, kind in COMBINATIONS:
        expected = EXPECTED.get((state, role), {}).get(kind)
        got = lookup(state, role, kind)
        if got is not expected:
            differences.append(f"{state.name} {role} {kind.__name__}: {got} instead of {expected}")
    return differences


def test_the_state_table_is_the_documented_one() -> None:
    assert table_differences(next_state) == []


# Where a memory stream's last chunk leads (the session's move, not a message's).
EXPECTED_COVERED = {State.ROUND_MEMORY: State.ROUND_COMMIT, State.MEMORY: State.COMMIT}


def test_the_covered_moves_are_the_documented_ones() -> None:
    assert COVERED == EXPECTED_COVERED
    # Control: the moves are the ones the table's COMMITs start from.
    assert all(protocol.Commit in EXPECTED[(done, S)] for done in EXPECTED_COVERED.values())


def test_state_table_control_a_wrong_entry_is_caught() -> None:
    # Negative control: one entry changed (the destination allowed to MIGRATE in READY, and
    # CLOCK_REPLY leading to MEMORY) is found, naming each entry.
    def wrong(state: State, role: str, kind: type) -> State | None:
        if (state, role, kind) == (State.READY, D, protocol.Migrate):
            return State.MEMORY
        if (state, role, kind) == (State.CLOCK_SYNC, D, protocol.ClockSyncReply):
            return State.MEMORY
        return next_state(state, role, kind)  # type: ignore[arg-type]

    assert table_differences(wrong) == [
        "READY destination Migrate: State.MEMORY instead of None",
        "CLOCK_SYNC destination ClockSyncReply: State.MEMORY instead of State.READY",
    ]


def _case_id(value: object) -> str:
    return str(getattr(value, "name", getattr(value, "__name__", value)))


def sides(state: State, role: str) -> tuple[Session, Session]:
    source, destination, _ = drive_to(state)
    return (source, destination) if role == "source" else (destination, source)


@pytest.mark.parametrize(("state", "role", "kind"), CASES, ids=_case_id)
def test_out_of_order_message_is_refused_by_the_receiver(state: State, role: str, kind: type) -> None:
    sender, receiver = sides(state, role)
    receiver.receive_data(forge(sender, sample(kind, sender)))
    with pytest.raises(RemoteProtocolError) as info:
        receiver.next_event()
    assert f"sent {name_of(kind)} in state {state.name}" in str(info.value)
    assert receiver.state is State.ERROR


@pytest.mark.parametrize(("state", "role", "kind"), CASES, ids=_case_id)
def test_out_of_order_message_is_refused_by_the_sender(state: State, role: str, kind: type) -> None:
    sender, _ = sides(state, role)
    with pytest.raises(LocalProtocolError, match=f"sent {name_of(kind)} in state {state.name}"):
        sender.send(sample(kind, sender))
    assert sender.state is state  # a refused send changes nothing


@pytest.mark.parametrize(("state", "role", "kind"), ALLOWED, ids=_case_id)
def test_allowed_message_passes_the_state_check(state: State, role: str, kind: type) -> None:
    # Negative control for the two tests above: the allowed moves are not refused for their state.
    sender, receiver = sides(state, role)
    receiver.receive_data(forge(sender, sample(kind, sender)))
    try:
        event = receiver.next_event()
    except protocol.ProtocolError as exc:  # a sample may fail a later check (proof, digest), never the state
        assert "may come from" not in str(exc)
    else:
        assert isinstance(event, kind)
        following = EXPECTED[(state, role)][kind]
        if kind is protocol.MemoryChunk and receiver.memory_progress == (CHUNK_SIZE, MEMORY_SIZE, CHUNK_SIZE):
            following = state  # more chunks are due
        assert receiver.state is following


def test_memory_chunks_must_be_contiguous_in_order_and_exact() -> None:
    cases = [
        (protocol.MemoryChunk(CHUNK_SIZE, b"\0" * CHUNK_SIZE), "at offset 8192, expected offset 0"),
        (protocol.MemoryChunk(0, b"\0" * (CHUNK_SIZE - 4096)), "has 4096 bytes, expected 8192"),
        (protocol.MemoryChunk(0, b"\0" * (CHUNK_SIZE + 4096)), "has 12288 bytes, expected 8192"),
    ]
    for chunk, expected in cases:
        source, destination, _ = drive_to(State.MEMORY)
        with pytest.raises(LocalProtocolError, match=expected):
            source.send(chunk)
        destination.receive_data(forge(source, chunk))
        with pytest.raises(RemoteProtocolError, match=expected):
            destination.next_event()


def test_last_chunk_is_the_remainder_and_nothing_follows_it() -> None:
    source, destination, memory = drive_to(State.COMMIT)
    assert destination.memory_progress == (MEMORY_SIZE, MEMORY_SIZE, CHUNK_SIZE)
    extra = protocol.MemoryChunk(MEMORY_SIZE, b"\0" * 4096)
    destination.receive_data(forge(source, extra))
    with pytest.raises(RemoteProtocolError, match="sent MEMORY in state COMMIT"):
        destination.next_event()


def test_commit_before_all_memory_is_refused() -> None:
    source, destination, _ = drive_to(State.MEMORY)
    destination.receive_data(forge(source, protocol.Commit(tag=b"d" * 16)))
    with pytest.raises(RemoteProtocolError, match="sent COMMIT in state MEMORY"):
        destination.next_event()


def test_clock_reply_must_echo_the_request() -> None:
    source, destination, _ = drive_to(State.CLOCK_SYNC)
    source.receive_data(forge(destination, protocol.ClockSyncReply(t1=2, t2=5, t3=6)))
    with pytest.raises(RemoteProtocolError, match="echoes t1=2, the request had t1=1"):
        source.next_event()
    source, destination, _ = drive_to(State.CLOCK_SYNC)
    source.receive_data(forge(destination, protocol.ClockSyncReply(t1=1, t2=6, t3=5)))
    with pytest.raises(RemoteProtocolError, match="before received"):
        source.next_event()
    source, destination, _ = drive_to(State.CLOCK_SYNC)  # control
    assert transfer(destination, source, protocol.ClockSyncReply(t1=1, t2=5, t3=5)).t3 == 5


def test_clock_sync_rounds_are_bounded() -> None:
    source, destination = authenticated()
    destination.limits = protocol.Limits(max_clock_sync_rounds=3)
    for t in range(3):
        transfer(source, destination, protocol.ClockSyncRequest(t1=t))
        transfer(destination, source, protocol.ClockSyncReply(t1=t, t2=t, t3=t))
    destination.receive_data(source.send(protocol.ClockSyncRequest(t1=9)))
    with pytest.raises(protocol.LimitExceeded, match="more than 3 CLOCK_REQUESTs"):
        destination.next_event()


def test_a_second_migration_in_the_same_session() -> None:
    source, destination, memory = drive_to(State.REPORT)
    transfer(destination, source, protocol.Report({"ok": True}))
    assert source.state is destination.state is State.READY
    transfer(source, destination, migrate_message())
    assert destination.state is State.MEMORY


def test_error_ends_the_session_and_nothing_but_error_may_be_sent_after_a_failure() -> None:
    source, destination = authenticated()
    assert isinstance(transfer(destination, source, protocol.Error("busy", "too many sessions")), protocol.Error)
    assert source.state is destination.state is State.ERROR
    with pytest.raises(LocalProtocolError, match="cannot send CLOCK_REQUEST in state ERROR"):
        source.send(protocol.ClockSyncRequest(t1=1))
    assert source.next_event() is protocol.NEED_DATA
    source.receive_data(b"")
    assert source.next_event() is protocol.END_OF_STREAM


def test_error_after_bye_is_refused() -> None:
    source, destination = authenticated()
    transfer(source, destination, protocol.Bye())
    with pytest.raises(LocalProtocolError, match="ERROR in state CLOSED"):
        destination.send(protocol.Error("x", "y"))


def test_a_destination_cannot_build_auth_before_the_source_proved() -> None:
    source, destination, _ = drive_to(State.AWAIT_SOURCE_AUTH)
    with pytest.raises(LocalProtocolError, match="cannot build AUTH in state AWAIT_SOURCE_AUTH"):
        destination.make_auth()
    source.make_auth()  # control: the source can


def test_memory_chunk_data_must_be_a_contiguous_buffer() -> None:
    source, _, memory = drive_to(State.MEMORY)
    with pytest.raises(LocalProtocolError, match="MEMORY.data: expected a bytes-like buffer, got list"):
        source.send(protocol.MemoryChunk(0, [0] * CHUNK_SIZE))  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="MEMORY.data: the buffer is not contiguous"):
        source.send(protocol.MemoryChunk(0, memoryview(memory * 2)[::2]))
    source.send(protocol.MemoryChunk(0, memoryview(memory)[:CHUNK_SIZE]))  # control

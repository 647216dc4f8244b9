"""The state machine both sides run over the one conversation, apart from the session.

A pure table (in the manner of h11's ``_state.py``): which message each side may
send in each state, and where it leads.  The session looks moves up here and
adds what the table cannot say (MEMORY's count, the checks of each message);
docs/protocol.md shows the same table, and tests/protocol/test_state_machine.py
checks this one against its own copy, written out independently.
"""

from __future__ import annotations

import enum
from typing import Any

from ._messages import (
    Auth,
    Bye,
    ClockSyncReply,
    ClockSyncRequest,
    Commit,
    Hello,
    MemoryChunk,
    Message,
    Migrate,
    Prepare,
    Prepared,
    Report,
    Role,
    Round,
    name_of,
)

__all__ = ["COVERED", "END_OF_STREAM", "NEED_DATA", "State", "next_state", "refusal"]


class _Sentinel(type):
    """A class that is its own type (as h11's sentinels): usable with ``is`` and in type unions."""

    def __new__(cls, name: str, bases: tuple[type, ...], namespace: dict[str, Any]) -> _Sentinel:
        self = super().__new__(cls, name, bases, namespace)
        self.__class__ = self  # type: ignore[assignment]
        return self

    def __repr__(self) -> str:
        return self.__name__


class NEED_DATA(_Sentinel, metaclass=_Sentinel):  # noqa: N801 - named as h11 names it
    """`Session.next_event` needs more bytes before it can return a message."""


class END_OF_STREAM(_Sentinel, metaclass=_Sentinel):  # noqa: N801
    """The peer closed the stream cleanly, after BYE or ERROR."""


class State(enum.Enum):
    """Where the conversation is; the name says whose message is awaited."""

    AWAIT_SOURCE_HELLO = enum.auto()
    AWAIT_DESTINATION_HELLO = enum.auto()
    AWAIT_SOURCE_AUTH = enum.auto()
    AWAIT_DESTINATION_AUTH = enum.auto()
    #: Authenticated, between migrations: the source may sync clocks, prepare, migrate or say BYE.
    READY = enum.auto()
    #: A CLOCK_REQUEST awaits its CLOCK_REPLY.
    CLOCK_SYNC = enum.auto()
    #: PREPARE sent; the destination's PREPARED is due.
    PREPARING = enum.auto()
    #: The destination is prepared: the source may send a precopy ROUND, MIGRATE or BYE.
    PREPARED = enum.auto()
    #: ROUND received; its MEMORY chunks are due until its runs are covered.
    ROUND_MEMORY = enum.auto()
    #: The round's memory all sent; its COMMIT is due.
    ROUND_COMMIT = enum.auto()
    #: MIGRATE received; MEMORY chunks are due until its runs are covered.
    MEMORY = enum.auto()
    #: All memory sent; COMMIT is due.
    COMMIT = enum.auto()
    #: COMMIT sent; the destination's REPORT is due.
    REPORT = enum.auto()
    #: BYE was sent or received.
    CLOSED = enum.auto()
    #: ERROR was sent or received, or a protocol error happened.
    ERROR = enum.auto()


# (state, sender) -> {message class: next state}.  MEMORY stays in MEMORY here (and
# ROUND_MEMORY in ROUND_MEMORY); the session moves on by COVERED once the runs are
# covered.  ERROR is allowed in every state but CLOSED and leads to ERROR: the session
# handles it before the table.
_TRANSITIONS: dict[tuple[State, Role], dict[type[Message], State]] = {
    (State.AWAIT_SOURCE_HELLO, "source"): {Hello: State.AWAIT_DESTINATION_HELLO},
    (State.AWAIT_DESTINATION_HELLO, "destination"): {Hello: State.AWAIT_SOURCE_AUTH},
    (State.AWAIT_SOURCE_AUTH, "source"): {Auth: State.AWAIT_DESTINATION_AUTH},
    (State.AWAIT_DESTINATION_AUTH, "destination"): {Auth: State.READY},
    (State.READY, "source"): {
        ClockSyncRequest: State.CLOCK_SYNC,
        Prepare: State.PREPARING,
        Migrate: State.MEMORY,
        Bye: State.CLOSED,
    },
    (State.READY, "destination"): {Bye: State.CLOSED},
    (State.CLOCK_SYNC, "destination"): {ClockSyncReply: State.READY},
    (State.PREPARING, "destination"): {Prepared: State.PREPARED},
    (State.PREPARED, "source"): {
        Round: State.ROUND_MEMORY,
        Migrate: State.MEMORY,
        Bye: State.CLOSED,
    },
    (State.ROUND_MEMORY, "source"): {MemoryChunk: State.ROUND_MEMORY},
    (State.ROUND_COMMIT, "source"): {Commit: State.PREPARED},
    (State.MEMORY, "source"): {MemoryChunk: State.MEMORY},
    (State.COMMIT, "source"): {Commit: State.REPORT},
    (State.REPORT, "destination"): {Report: State.READY},
}

# The states where a memory stream's MEMORY chunks are due -> the state once its runs
# are covered (at once for a stream of no runs), where its COMMIT is due.
COVERED: dict[State, State] = {State.ROUND_MEMORY: State.ROUND_COMMIT, State.MEMORY: State.COMMIT}

# The same keyed by the state's int value: Enum.__hash__ is a Python-level call, and
# this lookup runs for every message.
_BY_VALUE = {(state._value_, role): allowed for (state, role), allowed in _TRANSITIONS.items()}
_NOTHING: dict[type[Message], State] = {}


def next_state(state: State, sender: Role, kind: type[Message]) -> State | None:
    """Where ``kind`` from ``sender`` leads from ``state``; None if the table forbids it."""
    return _BY_VALUE.get((state._value_, sender), _NOTHING).get(kind)


def refusal(state: State, sender: Role, kind: type[Message]) -> str:
    """Why the table forbids ``kind`` from ``sender`` in ``state``: what it sent, and what may come."""
    allowed = _BY_VALUE.get((state._value_, sender), _NOTHING)
    return (
        f"sent {name_of(kind)} in state {state.name}, where "
        + (" or ".join(sorted(name_of(m) for m in allowed)) or "nothing")
        + f" may come from the {sender}"
    )

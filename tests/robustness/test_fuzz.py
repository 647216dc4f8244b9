"""Hypothesis fuzzing of the frame decoder, the message validators and the state machine, sized
for CI: the five input kinds of tests/support/fuzz_inputs.py (random bytes; a mutated authenticated
conversation, half of it received straight into memory; MACed message-shaped frames to a
destination and to a source; the validators) at 2 000 hypothesis-drawn seeds each = 10 000
inputs, plus 2 000 hypothesis-structured random byte strings and 500 structured mutations
(tests/protocol adds 2 500 more). Each test counts its own inputs and checks hypothesis really
ran them all. Only the protocol's own errors may come out. The 10^5 run is the bench script.

Both directions are fuzzed: a hostile source against a destination (including the memory path
that receives straight into guest RAM, as `Channel.receive_memory` does with ``recv_into``),
and a hostile destination against a source waiting for its REPORT.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from typing import Any

import fuzz_inputs
import pytest
from common_helpers import PSK
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import protocol
from protocol import Session
from protocol._frames import FieldError

PER_KIND = 2_000
NONCE = b"D" * 32
MEMORY = bytes(range(256)) * 48              # 3 pages, in chunks of 2 pages


def fuzz(strategy: st.SearchStrategy[Any], inputs: int = PER_KIND
         ) -> Callable[[Callable[[Any], None]], Callable[[], None]]:
    """Run the decorated check on ``inputs`` hypothesis inputs and assert that many really ran."""
    def decorate(check: Callable[[Any], None]) -> Callable[[], None]:
        def test() -> None:
            ran = 0

            @settings(max_examples=inputs, deadline=None, database=None,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
            @given(strategy)
            def run(value: Any) -> None:
                nonlocal ran
                ran += 1
                check(value)
            run()
            assert ran >= inputs
        test.__name__, test.__doc__ = check.__name__, check.__doc__   # not wraps: no fixtures
        return test
    return decorate


def step(session: Session, data: bytes, sink: bytearray | None = None) -> None:
    """Feed ``data`` and drain events, answering like a destination would; ProtocolError only.

    With ``sink``, memory goes straight into it through `memory_window` / `memory_received`,
    as the trio channel does with ``recv_into``."""
    position = 0
    try:
        while True:
            window = session.memory_window() if sink is not None else None
            if window is not None and position < len(data):
                count = min(len(window), len(data) - position)
                window[:count] = data[position:position + count]
                session.memory_received(count)
                position += count
            elif position < len(data):
                session.receive_data(data[position:position + 997])
                position += 997
            else:
                session.receive_data(b"")
            while (event := session.next_event()) not in (protocol.NEED_DATA,
                                                          protocol.END_OF_STREAM):
                fuzz_inputs.replies(session, event, sink)
            if position >= len(data):
                return
    except protocol.ProtocolError:
        return


@functools.cache
def conversation() -> bytes:
    """A whole authenticated session as the source sent it, for a destination with NONCE."""
    source, destination = Session("source", PSK), Session("destination", PSK, nonce=NONCE)
    sent: list[bytes] = []
    replies = {protocol.Hello: lambda: destination.make_hello("fuzz", {}),
               protocol.Auth: destination.make_auth,
               protocol.ClockSyncRequest: lambda: protocol.ClockSyncReply(t1=7, t2=7, t3=7),
               protocol.Commit: lambda: protocol.Report({"ok": True})}
    for build in (lambda: source.make_hello("fuzz", {"k": [1, 2.5, None]}), source.make_auth,
                  lambda: protocol.ClockSyncRequest(t1=7),
                  lambda: protocol.Migrate({"a": [1, b"x"]}, "full", len(MEMORY), 8192),
                  lambda: protocol.MemoryChunk(0, MEMORY[:8192]),
                  lambda: protocol.MemoryChunk(8192, MEMORY[8192:]), source.make_commit,
                  protocol.Bye):
        sent.append(source.send(build()))
        destination.receive_data(sent[-1])
        event = destination.next_event()
        if type(event) in replies:
            source.receive_data(destination.send(replies[type(event)]()))
            source.next_event()
    return b"".join(sent)


def test_the_recorded_conversation_is_accepted_whole():
    """Control for the mutation target: unmutated, the conversation completes (memory in place)."""
    destination, sink = Session("destination", PSK, nonce=NONCE), bytearray(len(MEMORY))
    step(destination, conversation(), sink)
    assert destination.state is protocol.State.CLOSED and sink == MEMORY


@fuzz(st.binary(max_size=600))
def test_random_bytes_at_a_fresh_destination(data: bytes) -> None:
    step(Session("destination", PSK), data)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(conversation())
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if action == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif action == "delete":
            del data[at]
        else:
            del data[at:]
    return bytes(data)


@fuzz(mutated(), inputs=500)
def test_mutated_conversation_into_guest_memory(data: bytes) -> None:
    step(Session("destination", PSK, nonce=NONCE), data, bytearray(len(MEMORY)))


@pytest.mark.parametrize("kind", range(len(fuzz_inputs.KINDS)),
                         ids=[k.replace(" ", "-") for k in fuzz_inputs.KINDS])
def test_bench_kinds_raise_only_protocol_errors(kind: int) -> None:
    recorded = fuzz_inputs.record()

    @fuzz(st.integers(0, 2**64 - 1))
    def check(seed: int) -> None:
        try:
            fuzz_inputs.run_one(kind, random.Random(seed), recorded)
        except FieldError if kind == 4 else protocol.ProtocolError:
            pass
    check()


def test_fuzz_control_another_exception_is_not_swallowed(monkeypatch) -> None:
    """Negative control: a decoder raising something else than its own errors fails the run."""
    def broken(*args: Any) -> None:
        raise TypeError("not a protocol error")
    monkeypatch.setattr(fuzz_inputs, "from_wire", broken)
    with pytest.raises(TypeError):
        test_bench_kinds_raise_only_protocol_errors(4)

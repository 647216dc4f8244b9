"""Framing under arbitrary splits, hostile bytes and allocation bombs."""

from __future__ import annotations

import functools
import tracemalloc

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from protocol_helpers import CHUNK_SIZE, MEMORY_SIZE, STATE, pair

import protocol
from protocol import LimitExceeded, Limits, ProtocolError, Session
from protocol._frames import LENGTH, unpack
from protocol._messages import from_wire


def transfer_bytes(receiver: Session, data: bytes) -> protocol.Message:
    receiver.receive_data(data)
    event = receiver.next_event()
    assert receiver.next_event() is protocol.NEED_DATA
    return event


def replay(stream: bytes, cuts: list[int], nonce: bytes, sink: bytearray | None = None) -> list[object]:
    """Feed ``stream`` to a destination with ``nonce``, cut at ``cuts``; sending its own replies.

    With ``sink``, the memory is received into it rather than returned as bytes.
    """
    destination = Session("destination", b"a pre-shared key of 32 bytes....", nonce=nonce)
    events: list[object] = []
    bounds = [0, *sorted(set(cuts)), len(stream)]
    for start, end in zip(bounds, bounds[1:], strict=False):
        if start == end:
            continue  # b"" would mean end of stream
        destination.receive_data(stream[start:end])
        while (event := destination.next_event()) is not protocol.NEED_DATA:
            events.append(event)
            # The destination must send its replies for its state to move on.
            if isinstance(event, protocol.Hello):
                destination.send(destination.make_hello("t", {}))
            elif isinstance(event, protocol.Auth):
                destination.send(destination.make_auth())
            elif isinstance(event, protocol.ClockSyncRequest):
                destination.send(protocol.ClockSyncReply(t1=10, t2=20, t3=21))
            elif isinstance(event, protocol.Migrate) and sink is not None:
                destination.receive_memory_into(sink)
            elif isinstance(event, protocol.Commit):
                destination.send(protocol.Report({"ok": True}))
    return events


@functools.cache
def recorded() -> tuple[bytes, list[protocol.Message], bytes, bytes]:
    source, destination = pair(nonce=b"N" * 32)
    # The destination's nonce must be the same in the replay for the source's proof to hold;
    # the source's nonce differs from it so the reflection check passes.
    source._nonce = b"S" * 32
    source_hello = source.make_hello("t", {"k": [1, 2.5, None]})
    stream = []
    events = []
    memory = bytes(range(256)) * (MEMORY_SIZE // 256)
    for message in [source_hello]:
        stream.append(source.send(message))
        events.append(transfer_bytes(destination, stream[-1]))
    source.receive_data(destination.send(destination.make_hello("t", {})))
    source.next_event()
    stream.append(source.send(source.make_auth()))
    events.append(transfer_bytes(destination, stream[-1]))
    source.receive_data(destination.send(destination.make_auth()))
    source.next_event()
    stream.append(source.send(protocol.ClockSyncRequest(t1=10)))
    events.append(transfer_bytes(destination, stream[-1]))
    source.receive_data(destination.send(protocol.ClockSyncReply(t1=10, t2=20, t3=21)))
    source.next_event()
    for message in [protocol.Migrate(STATE, "full", MEMORY_SIZE, CHUNK_SIZE)] + [
        protocol.MemoryChunk(o, memory[o : o + CHUNK_SIZE]) for o in range(0, MEMORY_SIZE, CHUNK_SIZE)
    ]:
        stream.append(source.send(message))
        events.append(transfer_bytes(destination, stream[-1]))
    stream.append(source.send(source.make_commit()))
    events.append(transfer_bytes(destination, stream[-1]))
    source.receive_data(destination.send(protocol.Report({"ok": True})))
    source.next_event()
    stream.append(source.send(protocol.Bye()))
    events.append(transfer_bytes(destination, stream[-1]))
    return b"".join(stream), events, b"N" * 32, memory


def test_recorded_stream_replays_whole() -> None:
    stream, events, nonce, _ = recorded()
    assert replay(stream, [], nonce) == events
    assert len(events) == 1 + 1 + 1 + 1 + 3 + 1 + 1


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(0, 2**20), max_size=40))
def test_any_split_yields_the_same_events(cuts: list[int]) -> None:
    stream, events, nonce, _ = recorded()
    assert replay(stream, [cut % (len(stream) + 1) for cut in cuts], nonce) == events


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(0, 2**20), max_size=40))
def test_any_split_writes_the_same_memory_into_a_sink(cuts: list[int]) -> None:
    stream, events, nonce, memory = recorded()
    sink = bytearray(len(memory))
    assert replay(stream, [cut % (len(stream) + 1) for cut in cuts], nonce, sink) == events
    assert sink == memory


def test_split_control_a_changed_byte_changes_the_outcome() -> None:
    stream, events, nonce, _ = recorded()
    altered = bytearray(stream)
    altered[len(stream) // 2] ^= 1
    with pytest.raises(ProtocolError):
        assert replay(bytes(altered), [], nonce) == events


def feed_only_protocol_errors(session: Session, data: bytes) -> None:
    session.receive_data(data)
    session.receive_data(b"")
    try:
        for _ in range(1000):
            if session.next_event() in (protocol.NEED_DATA, protocol.END_OF_STREAM):
                break
    except ProtocolError:
        pass


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_raise_only_protocol_errors(data: bytes) -> None:
    feed_only_protocol_errors(Session("destination", b"k" * 16), data)


@settings(max_examples=500, deadline=None)
@given(data=st.data())
def test_mutated_stream_raises_only_protocol_errors(data: st.DataObject) -> None:
    stream, _, nonce, _ = recorded()
    mutated = bytearray(stream)
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(mutated) - 1))
        action = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if action == "flip":
            mutated[position] ^= data.draw(st.integers(1, 255))
        elif action == "insert":
            mutated[position:position] = data.draw(st.binary(min_size=1, max_size=8))
        elif action == "delete":
            del mutated[position]
        else:
            del mutated[position:]
        if not mutated:
            break
    feed_only_protocol_errors(Session("destination", b"a pre-shared key of 32 bytes....", nonce=nonce), bytes(mutated))


# msgpack values, and maps shaped like messages, for the decoder and validators.
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
_plain = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20,
)
_TYPES = [
    "hello", "auth", "clock_request", "clock_reply", "prepare", "prepared", "round", "migrate", "memory",
    "commit", "report", "error", "bye",
]  # fmt: skip
_FIELDS = [
    "protocol_version", "agent_version", "role", "capabilities", "nonce", "proof", "t1", "t2", "t3",
    "state", "strategy", "memory_size", "chunk_size", "offset", "data", "tag", "runs", "report", "code", "message",
    "prepare_ns",
]  # fmt: skip
_message_like = st.builds(
    lambda kind, fields: {"type": kind, **fields},
    st.sampled_from([*_TYPES, "x"]),
    st.dictionaries(
        st.sampled_from(_FIELDS),
        _plain,
        max_size=6,
    ),
)


@settings(max_examples=400, deadline=None)
@given(_message_like)
def test_message_like_maps_raise_only_field_errors(obj: dict[str, object]) -> None:
    from protocol._frames import FieldError

    body = msgpack.packb(obj, use_bin_type=True)
    try:
        message = from_wire(unpack(body, Limits()), Limits())
    except FieldError:
        return
    assert message.TYPE == obj["type"]


@settings(max_examples=300, deadline=None)
@given(_message_like)
def test_message_like_frames_after_auth_raise_only_protocol_errors(obj: dict[str, object]) -> None:
    # Correctly MACed frames, so the decoder and state machine see them, not just the MAC check.
    from protocol_helpers import authenticated

    source, destination = authenticated()
    body = msgpack.packb(obj, use_bin_type=True)
    mac = source._send_mac
    assert mac is not None
    frame = LENGTH.pack(len(body) + 16) + body + mac.tag(len(body) + 16, [body])
    feed_only_protocol_errors(destination, frame)


def test_oversized_frame_is_refused_from_its_length_prefix_alone() -> None:
    from protocol_helpers import authenticated

    limits = Limits()
    _, destination = authenticated()
    destination.receive_data(LENGTH.pack(limits.max_frame_size + 1))
    with pytest.raises(LimitExceeded, match=f"exceeds max_frame_size {limits.max_frame_size}"):
        destination.next_event()
    # Control: a frame at the limit is simply waited for.
    _, destination = authenticated()
    destination.receive_data(LENGTH.pack(limits.max_frame_size))
    assert destination.next_event() is protocol.NEED_DATA


def test_before_auth_the_length_prefix_is_held_to_the_unauthenticated_limit() -> None:
    limits = Limits()
    destination = Session("destination", b"k" * 16)
    destination.receive_data(LENGTH.pack(limits.max_unauthenticated_frame_size + 1))
    with pytest.raises(LimitExceeded, match="exceeds max_unauthenticated_frame_size"):
        destination.next_event()
    destination = Session("destination", b"k" * 16)
    destination.receive_data(LENGTH.pack(limits.max_unauthenticated_frame_size))
    assert destination.next_event() is protocol.NEED_DATA


@pytest.mark.parametrize(
    "bomb",
    [
        b"\xdd\xff\xff\xff\xff",  # array32 of 4 294 967 295 entries
        b"\xdf\xff\xff\xff\xff",  # map32 of as many pairs
        b"\x81\xa4type" + b"\x91" * 5000 + b"\xc0",  # 5000 nested arrays
        b"\xc6\xff\xff\xff\xff",  # bin32 of 4 GiB
        b"\xc7\x01\x05x",  # an ext type
    ],
)
def test_allocation_bombs_are_refused_within_bounded_memory(bomb: bytes) -> None:
    destination = Session("destination", b"k" * 16)
    destination.receive_data(LENGTH.pack(len(bomb)) + bomb)
    tracemalloc.start()
    try:
        with pytest.raises(protocol.RemoteProtocolError):
            destination.next_event()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_allocation_control_a_legitimate_big_message_does_allocate() -> None:
    # Negative control for the measurement above: tracemalloc sees a real 2 MiB decode.
    body = msgpack.packb({"type": "report", "report": {"blob": b"x" * (2 << 20)}})
    tracemalloc.start()
    try:
        unpack(body, Limits())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak > 2 << 20


def test_session_buffer_is_bounded_by_one_frame() -> None:
    source, destination = pair()
    hello = source.send(source.make_hello("t", {}))
    destination.receive_data(hello + b"\0\0\0\1")
    assert isinstance(destination.next_event(), protocol.Hello)
    assert destination.buffered == 4  # only the next frame's beginning is kept


# -- MEMORY data streamed into the sink while its frame is still arriving ----------------


def streaming(into: bytearray) -> tuple[Session, Session, bytes]:
    from protocol_helpers import State, drive_to

    source, destination, memory = drive_to(State.MEMORY)
    destination.receive_memory_into(into)
    return source, destination, memory


def first_chunk_begun(into: bytearray, upto: int) -> tuple[Session, bytes, bytes]:
    """A destination streaming into ``into`` that has the first ``upto`` bytes of chunk 0's frame."""
    source, destination, memory = streaming(into)
    frame = source.send(protocol.MemoryChunk(0, memory[:CHUNK_SIZE]))
    destination.receive_data(frame[:upto])
    assert destination.next_event() is protocol.NEED_DATA
    return destination, frame, memory


def test_data_is_streamed_into_the_sink_before_the_frame_ends() -> None:
    into = bytearray(MEMORY_SIZE)
    destination, frame, memory = first_chunk_begun(into, 1000)
    assert into[: 1000 - 43] == memory[: 1000 - 43]  # already in place, not buffered
    window = destination.memory_window()
    assert window is not None and len(window) == CHUNK_SIZE - (1000 - 43)
    window[:100] = frame[1000:1100]  # as recv_into would
    destination.memory_received(100)
    destination.receive_data(frame[1100:])
    chunk = destination.next_event()
    assert isinstance(chunk, protocol.MemoryChunk) and chunk.offset == 0
    assert bytes(chunk.data) == memory[:CHUNK_SIZE] and chunk.data.obj is into


def test_streamed_frame_with_a_bad_tag_fails() -> None:
    into = bytearray(MEMORY_SIZE)
    source, destination, memory = streaming(into)
    frame = bytearray(source.send(protocol.MemoryChunk(0, memory[:CHUNK_SIZE])))
    frame[-1] ^= 1
    destination.receive_data(bytes(frame[:500]))
    assert destination.next_event() is protocol.NEED_DATA
    destination.receive_data(bytes(frame[500:]))
    with pytest.raises(protocol.AuthenticationFailed, match="fails its MAC"):
        destination.next_event()


def test_streamed_data_altered_fails_the_commit() -> None:
    into = bytearray(MEMORY_SIZE)
    source, destination, memory = streaming(into)
    for offset in range(0, MEMORY_SIZE, CHUNK_SIZE):
        frame = bytearray(source.send(protocol.MemoryChunk(offset, memory[offset : offset + CHUNK_SIZE])))
        frame[200] ^= 1
        destination.receive_data(bytes(frame[:100]))
        destination.next_event()
        destination.receive_data(bytes(frame[100:]))
        assert isinstance(destination.next_event(), protocol.MemoryChunk)
    destination.receive_data(source.send(source.make_commit()))
    with pytest.raises(protocol.IntegrityError):
        destination.next_event()


def test_stream_closed_inside_streamed_data() -> None:
    destination, _, _ = first_chunk_begun(bytearray(MEMORY_SIZE), 500)
    assert destination.buffered > 0  # a frame has begun, for the message timeout
    destination.receive_data(b"")
    with pytest.raises(protocol.ConnectionClosed, match="middle of a frame"):
        destination.next_event()


def test_unexpected_offset_is_not_streamed_and_is_refused() -> None:
    from protocol_helpers import forge

    into = bytearray(MEMORY_SIZE)
    source, destination, memory = streaming(into)
    frame = forge(source, protocol.MemoryChunk(CHUNK_SIZE, memory[:CHUNK_SIZE]))
    destination.receive_data(frame[:500])
    assert destination.next_event() is protocol.NEED_DATA
    assert destination.memory_window() is None  # buffered, not streamed
    assert into == bytes(MEMORY_SIZE)
    destination.receive_data(frame[500:])
    with pytest.raises(protocol.RemoteProtocolError, match="expected offset 0"):
        destination.next_event()


def test_memory_received_outside_the_window_is_refused() -> None:
    into = bytearray(MEMORY_SIZE)
    source, destination, memory = streaming(into)
    with pytest.raises(protocol.LocalProtocolError, match="outside the memory window"):
        destination.memory_received(1)
    destination.receive_data(source.send(protocol.MemoryChunk(0, memory[:CHUNK_SIZE]))[:100])
    destination.next_event()
    with pytest.raises(protocol.LocalProtocolError, match="outside the memory window"):
        destination.memory_received(CHUNK_SIZE)


def test_before_auth_a_frame_is_bounded_by_the_unauthenticated_limit():
    """A stranger's HELLO cannot make the destination buffer megabytes (docs/security.md)."""
    from protocol_helpers import authenticated, pair, transfer

    big = {"blob": b"x" * (100 * protocol.KiB)}
    source, destination = pair()
    destination.receive_data(source.send(source.make_hello("t", big)))
    with pytest.raises(protocol.LimitExceeded, match="max_unauthenticated_frame_size 65536"):
        destination.next_event()
    # Control: a HELLO within the limit passes, and after AUTH a frame of the same size does.
    source, destination = pair()
    assert isinstance(transfer(source, destination, source.make_hello("t", {"blob": b"x" * 1000})),
                      protocol.Hello)
    source, destination = authenticated()
    migrate = transfer(source, destination, protocol.Migrate(big, "full", protocol.PAGE_SIZE,
                                                             protocol.PAGE_SIZE))
    assert isinstance(migrate, protocol.Migrate) and migrate.state == big

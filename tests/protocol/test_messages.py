"""Round trips of every message and the field validation."""

from __future__ import annotations

import msgpack
import pytest
from protocol_helpers import STATE, authenticated, drive_to, migrate_message, pair, transfer

import protocol
from protocol import LimitExceeded, Limits, LocalProtocolError, RemoteProtocolError, State
from protocol._frames import LENGTH
from protocol._messages import MESSAGE_TYPES, from_wire


def test_round_trip_of_every_message_through_a_whole_conversation() -> None:
    source, destination = pair()
    seen: set[type[protocol.Message]] = set()

    def check(sender: protocol.Session, receiver: protocol.Session, message: protocol.Message) -> None:
        received = transfer(sender, receiver, message)
        assert received == message
        assert type(received) is type(message)
        seen.add(type(message))

    check(source, destination, source.make_hello("1.0", {"cpu": "x86", "kvm": {"xen": False}, "f": 1.5}))
    check(destination, source, destination.make_hello("1.0", {"mem": 1 << 33}))
    check(source, destination, source.make_auth())
    check(destination, source, destination.make_auth())
    check(source, destination, protocol.ClockSyncRequest(t1=-(2**63)))
    check(destination, source, protocol.ClockSyncReply(t1=-(2**63), t2=0, t3=2**63 - 1))
    memory = bytes(range(256)) * (5 * 4096 // 256)
    check(source, destination, protocol.Prepare(strategy="clock=guest", memory_size=len(memory), chunk_size=8192))
    check(destination, source, protocol.Prepared(prepare_ns=2**63 - 1))
    check(source, destination, protocol.Round(runs=protocol.pack_runs([(4096, 4096)])))
    check(source, destination, protocol.MemoryChunk(4096, memory[4096:8192]))
    check(source, destination, source.make_commit())
    check(source, destination, migrate_message())
    for offset in range(0, len(memory), 8192):
        check(source, destination, protocol.MemoryChunk(offset, memory[offset : offset + 8192]))
    check(source, destination, source.make_commit())
    check(destination, source, protocol.Report({"verdicts": [True, None], "gap_s": 0.01, "raw": b"\x00"}))
    check(destination, source, protocol.Bye())
    errors_source, errors_destination = pair()
    check(errors_source, errors_destination, protocol.Error(code="restore_failed", message="boom ✗"))
    assert seen == set(MESSAGE_TYPES.values())


def test_peer_hello_is_recorded() -> None:
    source, destination = authenticated()
    assert destination.peer_hello is not None and destination.peer_hello.capabilities == {"kvm": True}
    assert source.peer_hello is not None and source.peer_hello.role == "destination"


def wire(obj: object) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return LENGTH.pack(len(body)) + body


def receive_raw(obj: object, target: State = State.AWAIT_SOURCE_HELLO) -> protocol.Message:
    """Feed a hand-made frame to a destination (before auth, so no MAC) in ``target``."""
    _, destination, _ = drive_to(target)
    destination.receive_data(wire(obj))
    return destination.next_event()


GOOD_HELLO = {
    "type": "hello",
    "protocol_version": protocol.PROTOCOL_VERSION,
    "agent_version": "x",
    "role": "source",
    "capabilities": {},
    "nonce": b"n" * 32,
}


def test_a_hand_made_valid_hello_is_accepted() -> None:
    # Negative control for the rejections below: the same map, unchanged, passes.
    assert isinstance(receive_raw(GOOD_HELLO), protocol.Hello)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"type": "hullo"}, "unknown message type 'hullo'"),
        ({"type": 7}, "no str 'type'"),
        ({"extra": 1}, "unexpected keys [\"'extra'\"]"),
        ({"nonce": None}, "HELLO.nonce: expected bytes, got NoneType"),
        ({"nonce": b"n" * 31}, "HELLO.nonce: expected 32 bytes, got 31"),
        ({"role": "middle"}, "HELLO.role: expected 'source' or 'destination'"),
        ({"agent_version": b"x"}, "HELLO.agent_version: expected str, got bytes"),
        ({"capabilities": []}, "HELLO.capabilities: expected a map, got list"),
        ({"capabilities": {"a": {1: 2}}}, "int is not allowed for map key"),
        ({"capabilities": {"a": {b"k": 2}}}, "map key b'k' is not a str"),
        ({"protocol_version": True}, "HELLO.protocol_version: expected int, got bool"),
        ({"protocol_version": -1}, "HELLO.protocol_version: -1 outside"),
    ],
)
def test_malformed_hello_is_rejected_naming_the_field(change: dict[str, object], expected: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        receive_raw({**GOOD_HELLO, **change})
    assert expected in str(info.value)


def test_missing_key_is_named() -> None:
    hello = dict(GOOD_HELLO)
    del hello["nonce"]
    with pytest.raises(RemoteProtocolError, match=r"HELLO: missing keys \['nonce'\]"):
        receive_raw(hello)


def test_message_that_is_not_a_map_is_rejected() -> None:
    with pytest.raises(RemoteProtocolError, match="message is a list, not a map"):
        receive_raw([1, 2])


def test_repeated_key_is_rejected() -> None:
    body = b"\x82" + msgpack.packb("type") + msgpack.packb("bye") + msgpack.packb("type") + msgpack.packb("bye")
    _, destination = pair()
    destination.receive_data(LENGTH.pack(len(body)) + body)
    with pytest.raises(RemoteProtocolError, match="repeated key"):
        destination.next_event()


def test_float_in_state_is_rejected_but_allowed_in_report() -> None:
    limits = Limits()
    bad = migrate_message()
    with pytest.raises(LocalProtocolError, match=r"MIGRATE.state\['a'\]: float is not a plain value"):
        source, _ = authenticated()
        source.send(protocol.Migrate({"a": 1.0}, "full", bad.memory_size, bad.chunk_size))
    from_wire({"type": "report", "report": {"a": 1.0}}, limits)  # control: accepted


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("memory_size", 4097, "not a multiple of the page size"),
        ("memory_size", 0, "outside"),
        ("chunk_size", 100, "outside"),
        ("chunk_size", 4096 * 3 + 1, "not a multiple"),
        ("strategy", "full restore", "does not match"),
        ("strategy", "x" * 65, "longer than 64"),
        ("state", {"k": object()}, "object is not a plain value"),
    ],
)
def test_migrate_fields_are_range_checked(field: str, value: object, expected: str) -> None:
    fields = {"state": STATE, "strategy": "full", "memory_size": 8192, "chunk_size": 4096, field: value}
    with pytest.raises(LocalProtocolError, match=expected):
        source, _ = authenticated()
        source.send(protocol.Migrate(**fields))  # type: ignore[arg-type]


def test_memory_size_over_the_destination_limit_is_refused_before_any_memory() -> None:
    source, destination = authenticated()
    small = Limits(max_memory_size=16 * 4096)
    destination.limits = small
    destination.receive_data(source.send(migrate_message(memory_size=17 * 4096)))
    with pytest.raises(LimitExceeded, match=r"MIGRATE.memory_size: 69632 bytes exceeds the limit 65536"):
        destination.next_event()
    # Control: exactly at the limit is fine.
    source, destination = authenticated()
    destination.limits = small
    assert transfer(source, destination, migrate_message(memory_size=16 * 4096)).memory_size == 16 * 4096


@pytest.mark.parametrize(
    ("state", "limit", "expected"),
    [
        ({"a": [[[[1]]]]}, Limits(max_depth=5), "nested deeper than 5"),
        ({"a": list(range(11))}, Limits(max_container_entries=10), "container too large"),
        ({"a": [1] * 6, "b": [1] * 6}, Limits(max_total_entries=12), "more than 12 entries in all"),
    ],
)
def test_state_bounds(state: dict[str, object], limit: Limits, expected: str) -> None:
    source, destination = authenticated()
    destination.limits = limit
    destination.receive_data(source.send(migrate_message().__class__(state, "full", 8192, 4096)))
    with pytest.raises(LimitExceeded, match=expected):
        destination.next_event()


@pytest.mark.parametrize(
    ("state", "limit"),
    [
        ({"a": [[[1]]]}, Limits(max_depth=5)),
        ({"a": list(range(10))}, Limits(max_container_entries=10)),
        ({"a": [1] * 5, "b": [1] * 5}, Limits(max_total_entries=12)),
    ],
)
def test_state_bounds_controls_at_the_limit(state: dict[str, object], limit: Limits) -> None:
    source, destination = authenticated()
    destination.limits = limit
    assert transfer(source, destination, protocol.Migrate(state, "full", 8192, 4096)).state == state


def test_error_from_exception_carries_the_code() -> None:
    assert protocol.Error.from_exception(protocol.LimitExceeded("too big")) == protocol.Error("limit", "too big")
    assert protocol.Error.from_exception(ValueError()).code == "internal"
    with pytest.raises(LocalProtocolError, match="ERROR.code"):
        pair()[0].send(protocol.Error(code="Bad Code", message=""))


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="max_chunk_size plus its header"):
        Limits(max_frame_size=1 << 20, max_chunk_size=1 << 20)
    with pytest.raises(ValueError, match="positive int"):
        Limits(max_depth=0)
    Limits(max_frame_size=1 << 20, max_chunk_size=(1 << 20) - 4096)  # control

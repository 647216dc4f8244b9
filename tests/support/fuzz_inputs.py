"""The protocol fuzzer's five kinds of input (``KINDS``), one source for CI and the long run.

tests/robustness/test_fuzz.py runs every kind under hypothesis, 2 000 inputs each; the 10^5 run is
``bench/protocol_fuzz.py``, which imports this module. They live here, with the tests, because CI
depends on them; a bench script is run, never imported.

0. random bytes fed to a fresh destination;
1. a recorded, authenticated conversation with random byte flips, insertions,
   deletions and truncations; every other input has its memory received straight
   into a buffer through ``memory_window`` / ``memory_received`` (the path
   `Channel.receive_memory` takes with ``recv_into``);
2. random msgpack maps shaped like messages, framed with a valid MAC so that they
   reach the decoder and the state machine rather than stopping at the MAC;
3. the same from a hostile destination, to a source that is ready or waiting for
   its REPORT;
4. the same maps straight into the message validators (``from_wire``), where
   only ``FieldError`` may come out.
"""

from __future__ import annotations

import random
from typing import Any

import msgpack
import protocol_helpers
from common_helpers import PSK

import protocol
from protocol import Limits, Session
from protocol._frames import LENGTH, unpack
from protocol._messages import from_wire

NONCE = b"N" * 32
FIELDS = [
    "protocol_version", "agent_version", "role", "capabilities", "nonce", "proof", "t1", "t2", "t3",
    "state", "strategy", "memory_size", "chunk_size", "offset", "data", "digest", "report", "code", "message",
    "runs", "prepare_ns",
]
KINDS = ("random bytes", "mutated conversation", "MACed frames to a destination",
         "MACed frames to a source", "validators")
TYPES = ["hello", "auth", "clock_request", "clock_reply", "prepare", "prepared", "round", "migrate", "memory",
         "commit", "report", "error", "bye"]


def record() -> bytes:
    """The source's bytes of a whole session, for a destination with nonce NONCE."""
    source, destination = Session("source", PSK), Session("destination", PSK, nonce=NONCE)
    out = []

    def up(message: protocol.Message) -> None:
        out.append(source.send(message))
        destination.receive_data(out[-1])
        destination.next_event()

    def down(message: protocol.Message) -> None:
        source.receive_data(destination.send(message))
        source.next_event()

    up(source.make_hello("fuzz", {"k": [1, 2.5]}))
    down(destination.make_hello("fuzz", {}))
    up(source.make_auth())
    down(destination.make_auth())
    up(protocol.ClockSyncRequest(t1=1))
    down(protocol.ClockSyncReply(t1=1, t2=2, t3=3))
    up(protocol.Migrate({"a": [1, b"x", None]}, "full", 3 * 4096, 2 * 4096))
    up(protocol.MemoryChunk(0, bytes(8192)))
    up(protocol.MemoryChunk(8192, bytes(4096)))
    up(source.make_commit())
    down(protocol.Report({}))
    up(protocol.Bye())
    return b"".join(out)


def replies(destination: Session, event: Any, sink: bytearray | None = None) -> None:
    if isinstance(event, protocol.Hello):
        destination.send(destination.make_hello("fuzz", {}))
    elif isinstance(event, protocol.Auth):
        destination.send(destination.make_auth())
    elif isinstance(event, protocol.ClockSyncRequest):
        destination.send(protocol.ClockSyncReply(t1=event.t1, t2=event.t1, t3=event.t1))
    elif isinstance(event, protocol.Migrate) and sink is not None:
        destination.receive_memory_into(sink)
    elif isinstance(event, protocol.Commit):
        destination.send(protocol.Report({}))


def feed(destination: Session, data: bytes, rng: random.Random, sink: bytearray | None = None) -> None:
    """Feed ``data`` in random pieces; with ``sink``, memory data goes straight into it."""
    position = 0
    while position < len(data):
        step = rng.randint(1, 4096)
        window = destination.memory_window() if sink is not None else None
        if window is not None:
            step = min(step, len(window), len(data) - position)
            window[:step] = data[position : position + step]
            destination.memory_received(step)
        else:
            destination.receive_data(data[position : position + step])
        position += step
        while (event := destination.next_event()) is not protocol.NEED_DATA:
            if event is protocol.END_OF_STREAM:
                return
            replies(destination, event, sink)
    destination.receive_data(b"")
    destination.next_event()


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 7)
    return [
        lambda: None,
        lambda: rng.random() < 0.5,
        lambda: rng.randint(-(2**63), 2**64 - 1),
        lambda: rng.randint(-5, 70000),
        lambda: rng.random() * 1e6,
        lambda: "".join(rng.choice("ab_-.Z9 ") for _ in range(rng.randrange(12))),
        lambda: rng.randbytes(rng.choice([0, 16, 31, 32, 33, 64])),
        lambda: [random_value(rng, depth + 1) for _ in range(rng.randrange(4))],
        lambda: {rng.choice(FIELDS + ["x"]): random_value(rng, depth + 1) for _ in range(rng.randrange(4))},
    ][kind]()


def message_like(rng: random.Random) -> bytes:
    obj = {"type": rng.choice(TYPES + ["nope"])}
    for _ in range(rng.randrange(7)):
        obj[rng.choice(FIELDS)] = random_value(rng)
    return msgpack.packb(obj, use_bin_type=True)


def macced(sender: Session, body: bytes) -> bytes:
    """A frame with a valid MAC from ``sender``, so the receiver's decoder sees the body."""
    mac = sender._send_mac
    assert mac is not None
    length = len(body) + 16
    return LENGTH.pack(length) + body + mac.tag(length, [body])


def one(kind: int, rng: random.Random, recorded: bytes, authenticated: tuple[Session, Session]) -> None:
    """One input of ``kind`` (see KINDS); raises only ProtocolError (FieldError for kind 4)."""
    if kind == 0:
        data = rng.randbytes(rng.randrange(600))
        feed(Session("destination", PSK), data, rng)
        return
    if kind == 1:
        data = bytearray(recorded)
        for _ in range(rng.randint(1, 6)):
            at = rng.randrange(len(data))
            action = rng.randrange(4)
            if action == 0:
                data[at] ^= rng.randint(1, 255)
            elif action == 1:
                data[at:at] = rng.randbytes(rng.randint(1, 8))
            elif action == 2:
                del data[at]
            else:
                del data[at:]
            if not data:
                break
        sink = bytearray(3 * 4096) if rng.random() < 0.5 else None
        feed(Session("destination", PSK, nonce=NONCE), bytes(data), rng, sink)
        return
    if kind == 4:
        from_wire(unpack(message_like(rng), Limits()), Limits())
        return
    source, destination = authenticated
    if kind == 2:
        destination.receive_data(macced(source, message_like(rng)))
        destination.next_event()
        return
    if rng.random() < 0.5:  # the source has sent COMMIT and waits for the REPORT
        source.send(protocol.Migrate({}, "full", 4096, 4096))
        source.send(protocol.MemoryChunk(0, bytes(4096)))
        source.send(source.make_commit())
    source.receive_data(macced(destination, message_like(rng)))
    source.next_event()


def run_one(kind: int, rng: random.Random, recorded: bytes) -> None:
    """One input of ``kind``, with a fresh authenticated pair where the kind needs one.

    Kind 4's FieldError is the validators' own error; the other kinds raise ProtocolError."""
    pair = protocol_helpers.authenticated() if kind in (2, 3) else (None, None)
    one(kind, rng, recorded, pair)  # type: ignore[arg-type]

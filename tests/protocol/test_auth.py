"""Mutual authentication on the pre-shared key, and the frame MAC after it."""

from __future__ import annotations

import pytest
from protocol_helpers import PSK, authenticated, drive_to, forge, pair, transfer

import protocol
from protocol import AuthenticationFailed, LocalProtocolError, RemoteProtocolError, Session, State
from protocol._auth import make_proof


def handshake_bytes(source: Session, destination: Session) -> tuple[bytes, bytes, bytes, bytes]:
    """Run HELLO and AUTH, returning the four frames as they crossed the wire."""
    hello_s = source.send(source.make_hello("t", {}))
    destination.receive_data(hello_s)
    destination.next_event()
    hello_d = destination.send(destination.make_hello("t", {}))
    source.receive_data(hello_d)
    source.next_event()
    auth_s = source.send(source.make_auth())
    destination.receive_data(auth_s)
    destination.next_event()
    auth_d = destination.send(destination.make_auth())
    source.receive_data(auth_d)
    source.next_event()
    return hello_s, hello_d, auth_s, auth_d


def test_same_key_authenticates_both_sides() -> None:
    source, destination = authenticated()
    assert source.state is destination.state is State.READY


def test_wrong_key_is_refused_by_the_destination() -> None:
    source, destination = pair(psk_source=b"another key of some length")
    transfer(source, destination, source.make_hello("t", {}))
    transfer(destination, source, destination.make_hello("t", {}))
    destination.receive_data(source.send(source.make_auth()))
    with pytest.raises(AuthenticationFailed, match="the source failed to prove the pre-shared key"):
        destination.next_event()
    # And the destination, not yet convinced, refuses to prove itself.
    with pytest.raises(LocalProtocolError):
        destination.make_auth()


def test_no_key_material_on_the_wire() -> None:
    source, destination = pair()
    wire = b"".join(handshake_bytes(source, destination))
    assert PSK not in wire
    assert PSK[:8] not in wire
    assert source._nonce in wire  # control: the search does see what the frames carry


def test_replayed_hello_and_auth_fail_against_a_fresh_nonce() -> None:
    source, destination = pair()
    hello_s, _, auth_s, _ = handshake_bytes(source, destination)
    # An eavesdropper replays the recorded source frames to a new session.
    fresh = Session("destination", PSK)
    fresh.receive_data(hello_s)
    fresh.next_event()
    fresh.send(fresh.make_hello("t", {}))
    fresh.receive_data(auth_s)
    with pytest.raises(AuthenticationFailed):
        fresh.next_event()


def test_replay_control_the_same_nonce_would_accept_it() -> None:
    # Negative control: freshness of the destination's nonce is what defeats the replay.
    source, destination = pair()
    hello_s, _, auth_s, _ = handshake_bytes(source, destination)
    same = Session("destination", PSK, nonce=destination._nonce)
    same.receive_data(hello_s)
    same.next_event()
    same.send(same.make_hello("t", {}))
    same.receive_data(auth_s)
    assert isinstance(same.next_event(), protocol.Auth)


def test_reflected_hello_nonce_is_refused() -> None:
    # A fake destination echoes the source's own nonce back as its challenge.
    source, _ = pair()
    source.send(source.make_hello("t", {}))
    mirror = Session("destination", b"no key", nonce=source._nonce)
    source.receive_data(forge(mirror, mirror.make_hello("t", {})))
    with pytest.raises(AuthenticationFailed, match="own nonce: a reflection"):
        source.next_event()


def test_reflected_proof_is_refused() -> None:
    # A fake destination without the key sends the source's own proof back as its proof.
    source, impostor = pair(psk_destination=b"impostor does not know it")
    transfer(source, impostor, source.make_hello("t", {}))
    transfer(impostor, source, impostor.make_hello("t", {}))
    own_proof = source.make_auth()
    impostor.receive_data(source.send(own_proof))
    source.receive_data(forge(impostor, protocol.Auth(proof=own_proof.proof)))
    with pytest.raises(AuthenticationFailed, match="the destination failed to prove"):
        source.next_event()


def test_truncated_proof_fails() -> None:
    source, destination, _ = drive_to(State.AWAIT_SOURCE_AUTH)
    proof = source.make_auth().proof
    destination.receive_data(forge(source, protocol.Auth(proof=proof[:31])))
    with pytest.raises(RemoteProtocolError, match="AUTH.proof: expected 32 bytes, got 31"):
        destination.next_event()


def test_truncated_auth_frame_then_close_fails() -> None:
    source, destination, _ = drive_to(State.AWAIT_SOURCE_AUTH)
    frame = source.send(source.make_auth())
    destination.receive_data(frame[:-1])
    assert destination.next_event() is protocol.NEED_DATA
    destination.receive_data(b"")
    with pytest.raises(protocol.ConnectionClosed, match="in the middle of a frame"):
        destination.next_event()


def test_source_is_not_ready_until_the_destination_proved() -> None:
    source, destination, _ = drive_to(State.AWAIT_DESTINATION_AUTH)
    with pytest.raises(LocalProtocolError, match="MIGRATE in state AWAIT_DESTINATION_AUTH"):
        source.send(protocol.Migrate({}, "full", 4096, 4096))
    # An impostor destination cannot skip its proof either.
    source.receive_data(forge(destination, protocol.Report({"ok": True})))
    with pytest.raises(RemoteProtocolError, match="REPORT in state AWAIT_DESTINATION_AUTH"):
        source.next_event()


def test_destination_proof_with_the_wrong_key_is_refused_by_the_source() -> None:
    source, destination, _ = drive_to(State.AWAIT_DESTINATION_AUTH)
    assert destination._transcript is not None
    wrong = make_proof(b"wrong key entirely", "destination", destination._transcript)
    source.receive_data(forge(destination, protocol.Auth(proof=wrong)))
    with pytest.raises(AuthenticationFailed, match="the destination failed to prove"):
        source.next_event()


# -- the frame MAC after authentication ---------------------------------------


def test_altered_frame_fails_its_mac() -> None:
    source, destination = authenticated()
    frame = bytearray(source.send(protocol.ClockSyncRequest(t1=12345)))
    frame[-20] ^= 1
    destination.receive_data(bytes(frame))
    with pytest.raises(AuthenticationFailed, match="fails its MAC"):
        destination.next_event()


def test_replayed_frame_fails_its_mac() -> None:
    source, destination = authenticated()
    frame = source.send(protocol.ClockSyncRequest(t1=1))
    destination.receive_data(frame)
    assert isinstance(destination.next_event(), protocol.ClockSyncRequest)  # control: the original passes
    transfer(destination, source, protocol.ClockSyncReply(t1=1, t2=1, t3=1))
    destination.receive_data(frame)
    with pytest.raises(AuthenticationFailed, match="frame 1 from the source fails its MAC"):
        destination.next_event()


def test_dropped_frame_is_detected() -> None:
    source, destination, memory = drive_to(State.MEMORY)
    source.send(protocol.MemoryChunk(0, memory[:8192]))  # lost on the way
    destination.receive_data(source.send(protocol.MemoryChunk(8192, memory[8192:16384])))
    with pytest.raises(AuthenticationFailed):
        destination.next_event()


def test_altered_memory_offset_fails_its_mac() -> None:
    source, destination, memory = drive_to(State.MEMORY)
    frame = bytearray(source.send(protocol.MemoryChunk(0, memory[:8192])))
    frame[4 + 21 + 6] ^= 0x10  # inside the uint64 offset: 0 becomes 4096
    destination.receive_data(bytes(frame))
    with pytest.raises(AuthenticationFailed):
        destination.next_event()


def test_broken_memory_layout_after_auth_is_an_authentication_failure() -> None:
    source, destination, memory = drive_to(State.MEMORY)
    frame = bytearray(source.send(protocol.MemoryChunk(0, memory[:8192])))
    frame[4 + 20] = 0xCE  # the offset's type marker: no longer the fixed layout
    destination.receive_data(bytes(frame))
    with pytest.raises(AuthenticationFailed):
        destination.next_event()


def test_altered_memory_data_fails_the_commit_digest() -> None:
    source, destination, memory = drive_to(State.MEMORY)
    for offset in range(0, len(memory), 8192):
        frame = bytearray(source.send(protocol.MemoryChunk(offset, memory[offset : offset + 8192])))
        if offset == 8192:
            frame[100] ^= 0xFF  # inside the data, which the digest covers
        destination.receive_data(bytes(frame))
        destination.next_event()
    destination.receive_data(source.send(source.make_commit()))
    with pytest.raises(protocol.IntegrityError, match="memory stream was corrupted"):
        destination.next_event()


def test_unaltered_memory_passes_the_commit_digest() -> None:
    source, destination, memory = drive_to(State.COMMIT)
    assert isinstance(transfer(source, destination, source.make_commit()), protocol.Commit)


def test_a_commit_with_another_digest_cannot_be_sent() -> None:
    source, _, _ = drive_to(State.COMMIT)
    with pytest.raises(LocalProtocolError, match="COMMIT.tag differs"):
        source.send(protocol.Commit(tag=b"\0" * 16))


def test_frame_mac_is_hmac_sha256_over_seq_length_and_body() -> None:
    import hashlib
    import hmac
    import struct

    from protocol._auth import FrameMac

    key = bytes(range(32))
    mac = FrameMac(key)
    for seq, body in enumerate([b"", b"abc", b"x" * 1000]):
        expected = hmac.new(key, struct.pack(">QI", seq, 77) + body, hashlib.sha256).digest()[:16]
        assert mac.tag(77, [body[:1], body[1:]]) == expected
    # Control: another length gives another tag.
    other = hmac.new(key, struct.pack(">QI", 0, 77) + b"abc", hashlib.sha256).digest()[:16]
    assert FrameMac(key).tag(78, [b"abc"]) != other

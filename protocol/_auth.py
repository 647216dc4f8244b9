"""Mutual challenge-response on a pre-shared key, and the per-session frame MAC.

Both HELLOs carry a fresh 32-byte nonce.  Each side proves the key with
``HMAC-SHA256(psk, LABEL || "proof" || role || H)`` where ``H`` is SHA-256
over both HELLO bodies exactly as sent (so both nonces, versions and
capability summaries are bound to the proof, and a man in the middle cannot
alter them).  The key never travels.  Why each attack fails:

* replay: an old proof covers an old verifier nonce; the verifier's nonce is
  fresh for every session;
* reflection: a proof names the prover's role, so the destination's own proof
  sent back to it is a source proof over the wrong label; a HELLO carrying
  the receiver's own nonce is refused outright;
* offline guessing by an unauthenticated client: the destination proves only
  after the source did, so it computes nothing keyed for a stranger.

After the handshake, each direction has its own key
``HMAC-SHA256(psk, LABEL || "key" || direction || H)``; every frame after the
sender's AUTH carries ``HMAC-SHA256(key, seq || length || body)[:16]`` with an
implicit per-direction sequence number, so frames cannot be altered,
dropped, reordered, replayed or injected without detection.

The memory of each memory stream (every precopy ROUND and every MIGRATE) is
covered by its own one-time Poly1305 key,
``HMAC-SHA256(k_source>destination, LABEL || "memory" || n)`` for the n-th
memory stream of the session (`memory_key`): derived from the session's source
key, never from the PSK directly, and never used twice (a Poly1305 key must not be).
"""


from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Iterable

from ._messages import Role

__all__ = [
    "TAG_SIZE",
    "FrameMac",
    "derive_keys",
    "make_proof",
    "memory_key",
    "transcript_hash",
    "verify_proof",
]

TAG_SIZE = 16
_LABEL = b"kvm-migration-testbed/protocol/1\x00"
_SEQ_LENGTH = struct.Struct(">QI")


def transcript_hash(source_hello: bytes, destination_hello: bytes) -> bytes:
    """SHA-256 over both HELLO bodies, each length-prefixed so the split is unambiguous."""
    h = hashlib.sha256()
    for body in (source_hello, destination_hello):
        h.update(len(body).to_bytes(4, "big"))
        h.update(body)
    return h.digest()


def make_proof(psk: bytes, role: Role, transcript: bytes) -> bytes:
    """The AUTH proof of the side ``role`` for this handshake's transcript hash."""
    return hmac.digest(psk, _LABEL + b"proof\x00" + role.encode() + b"\x00" + transcript, "sha256")


def verify_proof(psk: bytes, role: Role, transcript: bytes, proof: bytes) -> bool:
    """Whether ``proof`` is ``role``'s proof for this transcript (constant-time compare)."""
    return hmac.compare_digest(make_proof(psk, role, transcript), bytes(proof))


def derive_keys(psk: bytes, transcript: bytes) -> tuple[bytes, bytes]:
    """The frame MAC keys ``(source_to_destination, destination_to_source)``."""
    return (
        hmac.digest(psk, _LABEL + b"key\x00source>destination\x00" + transcript, "sha256"),
        hmac.digest(psk, _LABEL + b"key\x00destination>source\x00" + transcript, "sha256"),
    )


def memory_key(source_key: bytes, stream: int) -> bytes:
    """The one-time Poly1305 key of the session's ``stream``-th memory stream (from 0).

    ``source_key`` is the source's frame key (`derive_keys`): bound to the PSK
    and to both fresh nonces, so unique per session; ``stream`` (ROUNDs and
    MIGRATEs counted together) makes it unique per memory stream within it.
    """
    return hmac.digest(source_key, _LABEL + b"memory\x00" + stream.to_bytes(8, "big"), "sha256")


class FrameMac:
    """The MAC state of one direction: its key and the next frame's sequence number.

    HMAC-SHA256 (RFC 2104) computed from the two keyed SHA-256 states, made
    once per session, so a frame costs two state copies and no re-keying;
    `tests/protocol/test_auth.py` checks it against the `hmac` module.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) > 64:  # RFC 2104: longer keys are hashed first
            key = hashlib.sha256(key).digest()
        key = key.ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))
        self.seq = 0

    def tag(self, length: int, parts: Iterable[bytes | memoryview]) -> bytes:
        """Tag the next frame (``length`` as in its prefix, ``parts`` the MACed body bytes)."""
        inner = self._inner.copy()
        inner.update(_SEQ_LENGTH.pack(self.seq, length))
        for part in parts:
            inner.update(part)
        outer = self._outer.copy()
        outer.update(inner.digest())
        self.seq += 1
        return outer.digest()[:TAG_SIZE]

    def verify(self, length: int, parts: Iterable[bytes | memoryview], tag: bytes | memoryview) -> bool:
        """Whether ``tag`` is right for the next frame; the sequence number advances either way."""
        return hmac.compare_digest(self.tag(length, parts), bytes(tag))

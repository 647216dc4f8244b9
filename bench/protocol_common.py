"""Shared by the protocol benchmarks: an authenticated pair of sessions, in memory."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol import Session  # noqa: E402


def authenticated_pair(psk: bytes) -> tuple[Session, Session]:
    """A source and a destination session that have done HELLO and AUTH with each other."""
    source, destination = Session("source", psk), Session("destination", psk)
    for sender, receiver, build in (
        (source, destination, lambda: source.make_hello("bench", {})),
        (destination, source, lambda: destination.make_hello("bench", {})),
        (source, destination, source.make_auth),
        (destination, source, destination.make_auth),
    ):
        receiver.receive_data(sender.send(build()))
        receiver.next_event()
    return source, destination

"""HELLO, AUTH and clock sync for the two agents, over a `Channel`, under one deadline."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import trio

from ._channel import Channel
from ._clocksync import ClockEstimate, ClockSample
from ._errors import ProtocolTimeout, RemoteProtocolError
from ._messages import Auth, Hello

__all__ = ["Handshake", "destination_handshake", "source_handshake"]


@dataclass(frozen=True)
class Handshake:
    """What HELLO, AUTH and clock sync established."""

    #: The peer's HELLO: its agent version and capability summary.
    peer: Hello
    #: Destination clock minus source clock (source side only; None on the destination).
    clock: ClockEstimate | None
    samples: tuple[ClockSample, ...] = ()


async def source_handshake(
    channel: Channel,
    *,
    agent_version: str,
    capabilities: Mapping[str, Any],
    clock_rounds: int = 8,
    timeout: float = 30.0,
) -> Handshake:
    """Source side of HELLO, AUTH and ``clock_rounds`` clock syncs, all within ``timeout``."""
    session = channel.session

    async def steps() -> Handshake:
        await channel.send(session.make_hello(agent_version, dict(capabilities)))
        try:
            peer = await channel.receive()
        except RemoteProtocolError as exc:
            # A web server's or an SSH banner's first bytes read as a huge frame length.
            raise type(exc)(f"{exc} (no HELLO came back: is the peer a destination agent of "
                            "this testbed, at this port?)") from exc
        assert isinstance(peer, Hello), peer
        await channel.send(session.make_auth())
        proof = await channel.receive()
        assert isinstance(proof, Auth), proof
        if not clock_rounds:
            return Handshake(peer=peer, clock=None)
        estimate, samples = await channel.sync_clock(clock_rounds)
        return Handshake(peer=peer, clock=estimate, samples=tuple(samples))

    return await _within(channel, timeout, steps)


async def destination_handshake(
    channel: Channel,
    *,
    agent_version: str,
    capabilities: Mapping[str, Any],
    timeout: float = 30.0,
) -> Handshake:
    """Destination side of HELLO and AUTH within ``timeout``; clock syncs are served by `receive`."""
    session = channel.session

    async def steps() -> Handshake:
        peer = await channel.receive()
        assert isinstance(peer, Hello), peer
        await channel.send(session.make_hello(agent_version, dict(capabilities)))
        proof = await channel.receive()
        assert isinstance(proof, Auth), proof
        await channel.send(session.make_auth())
        return Handshake(peer=peer, clock=None)

    return await _within(channel, timeout, steps)


async def _within(channel: Channel, timeout: float, steps: Callable[[], Awaitable[Handshake]]) -> Handshake:
    """Run the handshake ``steps`` under an overall deadline; on expiry tell the peer and raise."""
    with trio.move_on_after(timeout):
        return await steps()
    session = channel.session
    exc = ProtocolTimeout(
        f"handshake with the {session.peer_role} took over {timeout} s (state {session.state.name})"
    )
    await channel.send_error(exc)
    session.fail(str(exc))
    raise exc

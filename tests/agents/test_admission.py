"""Strangers cannot starve key holders (issue 10, item 7): connections that have not proved the
key have their own cap and a cap per address; only key holders count against --max-sessions.
Real sockets on 127.0.0.0/8 (a client may bind any of its addresses: one per "host")."""

from __future__ import annotations

import time

import pytest
import trio
from agents_helpers import PSK, settle

import protocol
from dest_agent import AGENT_VERSION, DestinationServer, ServerConfig
from kvmcore import Strategy
from source_agent.migrate import MigrationPlan, migrate


async def start(nursery, kvm, caps, **config) -> DestinationServer:
    server = DestinationServer(kvm, caps, ServerConfig(psk=PSK, port=0, **config), AGENT_VERSION)
    await nursery.start(server.serve)
    return server


async def stranger(server: DestinationServer, address: str) -> trio.SocketStream:
    """A connection from ``address`` that never sends a byte."""
    sock = trio.socket.socket()
    await sock.bind((address, 0))
    await sock.connect(server.address)
    return trio.SocketStream(sock)


async def until(predicate, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.005)


async def refusal(stream: trio.SocketStream) -> protocol.Error:
    """The ERROR a refused stranger gets at once (then the stream is closed)."""
    session = protocol.Session("source", b"")
    async with stream:
        with trio.fail_after(5):
            session.receive_data(await stream.receive_some(65536))
    error = session.next_event()
    assert isinstance(error, protocol.Error), error
    return error


def plan(server: DestinationServer) -> MigrationPlan:
    return MigrationPlan(*server.address, psk=PSK, warmup_ns=0,
                         strategy=Strategy("realtime", "none", "off"))


async def test_stalled_strangers_do_not_keep_a_good_source_out(nursery, kvm, caps):
    """16 silent strangers (four times --max-sessions) on four addresses, handshake timeout 30 s:
    the good source is served at once. Before the fix it got ERROR busy."""
    server = await start(nursery, kvm, caps, max_sessions=4, handshake_timeout=30)
    strangers = [await stranger(server, f"127.0.0.{2 + i % 4}") for i in range(16)]
    await until(lambda: server.counters.live_unauthenticated == 16)
    t0 = time.monotonic()
    with trio.fail_after(10):                      # a third of the handshake timeout
        m = await migrate(plan(server), kvm, caps)
    elapsed = time.monotonic() - t0
    assert m.analysis.checks["sequence_continues"].ok and elapsed < 10
    assert server.counters.live_unauthenticated == 16      # the strangers were not evicted
    assert server.counters.refused_busy == 0 == server.counters.refused_unauthenticated
    for s in strangers:
        await s.aclose()
    await settle(server)


async def test_strangers_have_their_own_caps_per_address_and_in_all(nursery, kvm, caps):
    server = await start(nursery, kvm, caps, max_unauthenticated=5,
                         max_unauthenticated_per_address=2, handshake_timeout=30)
    held = [await stranger(server, "127.0.0.2") for _ in range(2)]
    await until(lambda: server.counters.live_unauthenticated == 2)
    error = await refusal(await stranger(server, "127.0.0.2"))
    assert error.code == "busy" and "--max-unauthenticated-per-address" in error.message
    assert "127.0.0.2" in error.message
    held += [await stranger(server, f"127.0.0.{i}") for i in (3, 4, 5)]
    await until(lambda: server.counters.live_unauthenticated == 5)
    error = await refusal(await stranger(server, "127.0.0.6"))
    assert error.code == "busy" and "(--max-unauthenticated)" in error.message
    with pytest.raises(protocol.PeerError, match="--max-unauthenticated"):
        await migrate(plan(server), kvm, caps)      # the total cap holds for everyone
    assert server.counters.refused_unauthenticated == 3 and server.counters.vms_created == 0
    await held.pop().aclose()                       # control: one slot free, the source is in
    await until(lambda: server.counters.live_unauthenticated == 4)
    await migrate(plan(server), kvm, caps)
    assert server.counters.vms_created == 1
    for s in held:
        await s.aclose()
    await settle(server)


async def test_a_key_holder_beyond_max_sessions_gets_busy_after_authenticating(nursery, kvm,
                                                                               caps):
    server = await start(nursery, kvm, caps, max_sessions=1)
    holder = await protocol.open_channel(*server.address, protocol.Session("source", PSK))
    await protocol.source_handshake(holder, agent_version="holder", capabilities={},
                                    clock_rounds=1)
    with pytest.raises(protocol.PeerError) as info:
        await migrate(plan(server), kvm, caps)
    assert info.value.code == "busy" and "1 sessions (--max-sessions)" in info.value.message
    await holder.aclose()
    await settle(server)
    await migrate(plan(server), kvm, caps)           # and once free, it serves
    assert server.counters.refused_busy == 1 and server.counters.vms_created == 1


@pytest.mark.parametrize("host, loopback", [
    ("localhost", True), ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True),
    ("127.example.com", False),      # the spelling used to be enough (issue 10, item 5)
    ("0.0.0.0", False), ("::", False), ("10.0.0.2", False),
    ("no-such-host.invalid", False),
])
def test_loopback_is_decided_by_the_resolved_addresses(host, loopback):
    from dest_agent.server import is_loopback_host

    assert is_loopback_host(host) is loopback


def test_the_bound_addresses_are_checked_again_without_a_key():
    from agentcore.options import UsageError
    from dest_agent.server import _check_keyless

    _check_keyless("localhost", ["127.0.0.1", "::1"])
    with pytest.raises(UsageError, match="bound 10.1.2.3, not a loopback address"):
        _check_keyless("127.example.com", ["127.0.0.1", "10.1.2.3"])


def test_dest_agent_refuses_a_loopback_looking_name_without_a_key(cli):
    run = cli("dest-agent", "serve", "--listen", "127.example.com:0")
    assert run.code == 2 and "not a loopback address" in run.stderr
    assert "--psk-file" in run.stderr and "serving on" not in run.stderr

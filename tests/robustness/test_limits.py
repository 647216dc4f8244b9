"""Every bound a peer meets is a `dest-agent serve` option with a safe default; a peer asking for
more gets a clear ERROR and nothing is allocated (guest memory allocations counted at the source
of them), and each limit has its negative control: just within it, the same request is served.

The server runs in-process, configured through the real option parser, so the options and
their plumbing are what is tested.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
import trio
from agents_helpers import settle

import dest_agent.server
import dest_agent.session
import protocol
from dest_agent import AGENT_VERSION, DestinationServer
from dest_agent.cli import build_parser, config_from_args
from kvmcore import GuestMemory, Strategy
from source_agent.migrate import MigrationPlan, migrate
from agentcore.options import UsageError

MiB = 1 << 20


def config(*options: str):
    return config_from_args(build_parser().parse_args(["serve", "--listen", "127.0.0.1:0",
                                                       *options]))


def test_the_defaults_are_the_safe_ones():
    c = config()
    assert c.host == "127.0.0.1" and c.psk == b""
    assert (c.max_sessions, c.max_memory, c.max_frame_size) == (4, 1 << 30, 8 * MiB)
    assert (c.handshake_timeout, c.idle_timeout, c.message_timeout) == (10, 60, 30)


@pytest.mark.parametrize("option, value, words", [
    ("--max-frame-size", "32KiB", "--max-frame-size must be between 64KiB"),
    ("--max-frame-size", "4GiB", "--max-frame-size must be between 64KiB"),
    ("--max-sessions", "0", "--max-sessions must be at least 1"),
])
def test_unsafe_values_are_refused_naming_the_option(option, value, words):
    with pytest.raises(UsageError, match=words):
        config(option, value)


@pytest.mark.parametrize("value", ["3MiB", "64GiB"])
def test_a_guest_memory_no_guest_can_have_is_refused_by_the_parser(capsys, value):
    """Whole 2 MiB pages up to kvmcore's 1 GiB, quoting the value as typed (the parser exits 2)."""
    with pytest.raises(SystemExit) as exited:
        config("--max-memory", value)
    assert exited.value.code == 2
    assert (f"argument --max-memory: {value!r} must be a multiple of 2MiB between 2MiB and 1GiB"
            in capsys.readouterr().err)
    assert config("--max-memory", "1GiB").max_memory == 1 << 30      # negative control


@pytest.fixture
def allocations(monkeypatch):
    """Every guest memory the destination allocates (size), counted where it happens."""
    sizes: list[int] = []

    class Counting:
        @staticmethod
        def allocate(size: int) -> GuestMemory:
            sizes.append(size)
            return GuestMemory.allocate(size)
    monkeypatch.setattr(dest_agent.session, "GuestMemory", Counting)
    return sizes


@pytest.fixture
def serve(nursery, kvm, caps):
    async def start(*options: str) -> DestinationServer:
        server = DestinationServer(kvm, caps, config(*options), AGENT_VERSION)
        await nursery.start(server.serve)
        return server
    return start


def plan(server, **kw) -> MigrationPlan:
    return MigrationPlan(host=server.address[0], port=server.address[1], psk=b"", warmup_ns=0,
                         strategy=Strategy("realtime", "none", "off"), **kw)


async def refused_with(server, kvm, caps, live: int = 0, **kw) -> protocol.PeerError:
    """Migrate, expecting the destination's ERROR; then wait until only ``live`` sessions remain."""
    with pytest.raises(protocol.PeerError) as info:
        await migrate(plan(server, **kw), kvm, caps)
    with trio.fail_after(10):
        while server.counters.live_sessions > live:
            await trio.sleep(0.01)
    return info.value


async def test_max_memory(serve, kvm, caps, allocations):
    server = await serve("--max-memory", "4MiB")
    error = await refused_with(server, kvm, caps, memory_size=8 * MiB)
    assert error.code == "limit" and "memory_size" in error.message and "4194304" in error.message
    assert allocations == [] and server.counters.vms_created == 0
    await migrate(plan(server, memory_size=4 * MiB), kvm, caps)        # control: at the limit
    assert allocations == [4 * MiB] and server.counters.vms_created == 1


async def test_max_frame_size(serve, kvm, caps, allocations):
    server = await serve("--max-frame-size", "256KiB")
    error = await refused_with(server, kvm, caps, chunk_size=MiB)
    assert error.code == "limit" and "chunk_size" in error.message, error
    assert allocations == [] and server.counters.vms_created == 0
    # Before AUTH a bare length prefix over the (smaller) unauthenticated limit is refused
    # before its body is waited for.
    stream = await trio.open_tcp_stream(*server.address)
    async with stream:
        await stream.send_all((64 * 1024 + 1).to_bytes(4, "big"))
        session = protocol.Session("source", b"")
        with trio.fail_after(5):
            session.receive_data(await stream.receive_some(65536))
        error = session.next_event()
        assert isinstance(error, protocol.Error) and error.code == "limit"
        assert "exceeds max_unauthenticated_frame_size 65536" in error.message
    await settle(server)
    await migrate(plan(server, chunk_size=128 * 1024), kvm, caps)    # control: chunks that fit
    assert allocations == [2 * MiB] and server.counters.vms_created == 1


async def test_max_sessions(serve, kvm, caps, allocations):
    server = await serve("--max-sessions", "2")
    idle = []
    for _ in range(2):             # key holders hold sessions (strangers do not: test_admission)
        idle.append(await protocol.open_channel(*server.address, protocol.Session("source", b"")))
        await protocol.source_handshake(idle[-1], agent_version="idle", capabilities={},
                                        clock_rounds=1)
    error = await refused_with(server, kvm, caps, live=2)
    assert error.code == "busy" and "2 sessions (--max-sessions)" in error.message
    assert allocations == [] and server.counters.vms_created == 0
    await idle.pop().aclose()                                          # control: one slot free
    await migrate(plan(server), kvm, caps)
    assert server.counters.vms_created == 1
    await idle.pop().aclose()


async def dropped_after(server, *, handshake: bool, keepalive: float | None = None,
                        within: float = 5.0) -> tuple[float | None, str]:
    """Connect (and handshake), then stay silent -- or send a CLOCK_REQUEST every ``keepalive``
    s. Returns when the destination ended it (None if it had not within ``within``) and why."""
    channel = await protocol.open_channel(*server.address, protocol.Session("source", b""))
    start = time.monotonic()
    async with channel:
        with trio.move_on_after(within):
            try:
                if handshake:
                    await protocol.source_handshake(channel, agent_version="t", capabilities={},
                                                    clock_rounds=1)
                    start = time.monotonic()
                while True:
                    if keepalive is None:
                        await channel.receive()
                    await trio.sleep(keepalive)
                    await channel.send(protocol.ClockSyncRequest(t1=1))
                    assert isinstance(await channel.receive(), protocol.ClockSyncReply)
            except protocol.ProtocolError as exc:
                return time.monotonic() - start, str(exc)
    return None, "still served"


async def test_handshake_timeout(serve):
    server = await serve("--handshake-timeout", "1s")
    elapsed, why = await dropped_after(server, handshake=False)
    assert elapsed is not None and 0.9 < elapsed < 3 and "handshake" in why, (elapsed, why)
    # Control: a handshake done in time is not dropped at 1 s (the idle timeout is 60 s).
    elapsed, why = await dropped_after(server, handshake=True, within=2.0)
    assert elapsed is None, why


async def test_idle_timeout(serve):
    server = await serve("--idle-timeout", "1s")
    elapsed, why = await dropped_after(server, handshake=True)
    assert elapsed is not None and 0.9 < elapsed < 3 and "idle_timeout 1.0" in why, (elapsed, why)
    # Control: a peer that speaks every 0.3 s is kept past the 1 s.
    elapsed, why = await dropped_after(server, handshake=True, keepalive=0.3, within=2.0)
    assert elapsed is None, why


def preauth_peak(limits: protocol.Limits) -> float:
    """MiB traced while a destination session takes the largest HELLO ``limits`` let through
    before authentication: distinct short strings, the costliest values per wire byte."""
    import tracemalloc

    import msgpack

    lists = (limits.max_frame_size - 1024) // (65536 * 10)
    caps = {f"k{i}": [b"%08x" % (i << 16 | j) for j in range(min(65536, limits.max_frame_size
                                                                      // 10))]
            for i in range(max(lists, 1))}
    body = msgpack.packb({"type": "hello", "protocol_version": protocol.PROTOCOL_VERSION, "agent_version": "x",
                          "role": "source", "capabilities": caps, "nonce": bytes(range(32))})
    body = body[:limits.max_frame_size - 4]          # truncated if over: refused, not waited for
    data = len(body).to_bytes(4, "big") + body
    tracemalloc.start()
    try:
        session = protocol.Session("destination", b"k" * 16, limits=limits)
        for start in range(0, len(data), 256 * 1024):    # as the channel reads: in pieces
            session.receive_data(data[start:start + 256 * 1024])
            try:
                if session.next_event() is not protocol.NEED_DATA:
                    break
            except protocol.ProtocolError:
                break
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def test_what_a_peer_costs_before_authentication_is_bounded():
    """Before AUTH a frame is held to Limits.max_unauthenticated_frame_size (64 KiB), whatever
    --max-frame-size allows later: a stranger's HELLO costs little (docs/security.md)."""
    assert preauth_peak(dest_agent.server.session_limits(config())) < 2
    assert preauth_peak(dest_agent.server.session_limits(config("--max-frame-size", "64KiB"))) < 2
    # Control: were the unauthenticated limit the 8 MiB frame limit, one HELLO would cost tens
    # of MiB of Python objects, held until the handshake timeout.
    loose = dataclasses.replace(dest_agent.server.session_limits(config()),
                                max_unauthenticated_frame_size=8 * MiB)
    assert preauth_peak(loose) > 32

"""The trio channel: whole migrations over memory streams, TCP and TLS; timeouts; errors on both sides."""

from __future__ import annotations

import functools
import os
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing
import trustme
from protocol_helpers import PSK

import protocol
from protocol import (
    AuthenticationFailed,
    Channel,
    ConnectionClosed,
    LocalProtocolError,
    ProtocolTimeout,
    Session,
    VersionMismatch,
)

MEMORY = os.urandom(64 * 4096 + 4096)
CHUNK = 16 * 4096
STATE = {"vcpus": [{"regs": {"rax": 1}}], "tsc_khz": 3_000_000}


async def run_source(channel: Channel, memory: bytes = MEMORY) -> dict[str, Any]:
    handshake = await protocol.source_handshake(
        channel, agent_version="src-1", capabilities={"host": "a"}, clock_rounds=4
    )
    await channel.send(protocol.Migrate(STATE, "full", len(memory), CHUNK))
    commit = await channel.send_memory(memory)
    report = await channel.receive()
    assert isinstance(report, protocol.Report)
    await channel.bye()
    return {"handshake": handshake, "commit": commit, "report": report.report}


async def run_destination(channel: Channel) -> dict[str, Any]:
    handshake = await protocol.destination_handshake(
        channel, agent_version="dst-1", capabilities={"host": "b"}
    )
    migrate = await channel.receive()
    assert isinstance(migrate, protocol.Migrate)
    guest_ram = bytearray(migrate.memory_size)
    commit = await channel.receive_memory(guest_ram)
    await channel.send(protocol.Report({"bytes": len(guest_ram), "state_keys": sorted(migrate.state)}))
    bye = await channel.receive()
    assert isinstance(bye, protocol.Bye)
    await channel.aclose()
    return {"handshake": handshake, "commit": commit, "ram": bytes(guest_ram), "migrate": migrate}


async def both(
    source: Callable[[], Awaitable[dict[str, Any]]], destination: Callable[[], Awaitable[dict[str, Any]]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}

    async def keep(name: str, fn: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        results[name] = await fn()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(keep, "source", source)
        nursery.start_soon(keep, "destination", destination)
    return results["source"], results["destination"]


def channels(
    psk_source: bytes = PSK, psk_destination: bytes = PSK, **options: Any
) -> tuple[Channel, Channel]:
    left, right = trio.testing.memory_stream_pair()
    return (
        Channel(left, Session("source", psk_source), **options),
        Channel(right, Session("destination", psk_destination), **options),
    )


def check_migration(source: dict[str, Any], destination: dict[str, Any], memory: bytes = MEMORY) -> None:
    assert destination["ram"] == memory
    assert destination["migrate"].state == STATE
    assert source["report"] == {"bytes": len(memory), "state_keys": ["tsc_khz", "vcpus"]}
    assert source["commit"] == destination["commit"]
    assert source["handshake"].peer.capabilities == {"host": "b"}
    assert destination["handshake"].peer.agent_version == "src-1"
    clock = source["handshake"].clock
    assert clock is not None and clock.samples == 4 and clock.consistent


async def test_whole_migration_over_a_memory_stream() -> None:
    source, destination = channels()
    check_migration(*await both(lambda: run_source(source), lambda: run_destination(destination)))


async def test_memory_lands_in_the_callers_buffer_without_an_intermediate_copy() -> None:
    source, destination = channels()
    ram = bytearray(len(MEMORY))
    chunks: list[protocol.MemoryChunk] = []

    async def dest() -> dict[str, Any]:
        await protocol.destination_handshake(destination, agent_version="d", capabilities={})
        migrate = await destination.receive()
        assert isinstance(migrate, protocol.Migrate)
        destination.session.receive_memory_into(ram)
        while isinstance(message := await destination.receive(), protocol.MemoryChunk):
            chunks.append(message)
        await destination.send(protocol.Report({}))
        return {}

    async def src() -> dict[str, Any]:
        await protocol.source_handshake(source, agent_version="s", capabilities={}, clock_rounds=1)
        await source.send(protocol.Migrate({}, "full", len(MEMORY), CHUNK))
        await source.send_memory(memoryview(MEMORY))
        await source.receive()
        return {}

    await both(src, dest)
    assert ram == MEMORY
    assert all(isinstance(c.data, memoryview) and c.data.obj is ram for c in chunks)


async def handshakes_failing(
    source: Channel, destination: Channel, expected: type[BaseException]
) -> dict[str, BaseException]:
    """Run both handshakes concurrently; each must raise ``expected``; return the two errors."""
    errors: dict[str, BaseException] = {}

    async def attempt(name: str, fn: Callable[[], Awaitable[Any]]) -> None:
        with pytest.raises(expected) as info:
            await fn()
        errors[name] = info.value

    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            attempt, "source", functools.partial(protocol.source_handshake, source, agent_version="s", capabilities={})
        )
        nursery.start_soon(
            attempt,
            "destination",
            functools.partial(protocol.destination_handshake, destination, agent_version="d", capabilities={}),
        )
    return errors


async def test_wrong_key_is_reported_on_both_sides() -> None:
    errors = await handshakes_failing(*channels(psk_source=b"the wrong key, long enough"), AuthenticationFailed)
    assert "the source failed to prove the pre-shared key" in str(errors["destination"])
    assert str(errors["source"]).startswith("the destination refused the authentication: the source failed")


async def test_version_mismatch_is_reported_on_both_sides() -> None:
    class FutureSession(Session):
        protocol_version = protocol.PROTOCOL_VERSION + 1

    left, right = trio.testing.memory_stream_pair()
    source = Channel(left, FutureSession("source", PSK))
    destination = Channel(right, Session("destination", PSK))
    errors = await handshakes_failing(source, destination, VersionMismatch)
    ours, future = protocol.PROTOCOL_VERSION, protocol.PROTOCOL_VERSION + 1
    assert f"the source speaks protocol version {future}, this destination speaks version {ours}" in str(
        errors["destination"]
    )
    assert str(errors["source"]).startswith(f"the destination refused the session: the source speaks protocol version {future}")


async def test_same_version_control() -> None:
    source, destination = channels()
    check_migration(*await both(lambda: run_source(source), lambda: run_destination(destination)))


async def test_idle_timeout(autojump_clock: trio.testing.MockClock) -> None:
    source, destination = channels(idle_timeout=5.0)
    with pytest.raises(ProtocolTimeout, match=r"a message \(idle_timeout 5.0 s\)"):
        await destination.receive()
    assert trio.current_time() == pytest.approx(5.0)
    # The silent peer is told.
    with pytest.raises(protocol.PeerError, match="'timeout'"):
        await source.receive()


async def test_idle_timeout_control_a_message_in_time_is_received(autojump_clock: trio.testing.MockClock) -> None:
    source, destination = channels(idle_timeout=5.0)

    async def late_hello() -> None:
        await trio.sleep(4.9)
        await source.send(source.session.make_hello("s", {}))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(late_hello)
        assert isinstance(await destination.receive(), protocol.Hello)


async def dripped_hello(nursery: trio.Nursery, interval: float) -> Channel:
    """A destination (message_timeout 3 s) whose peer writes a HELLO one byte per ``interval``."""
    left, right = trio.testing.memory_stream_pair()
    hello = Session("source", PSK)
    frame = hello.send(hello.make_hello("s", {}))

    async def drip() -> None:
        for i in range(len(frame)):
            await left.send_all(frame[i : i + 1])
            await trio.sleep(interval)

    nursery.start_soon(drip)
    return Channel(right, Session("destination", PSK), message_timeout=3.0, idle_timeout=60.0)


async def test_a_dripping_peer_is_dropped_at_the_message_timeout(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        destination = await dripped_hello(nursery, 1.0)
        with pytest.raises(ProtocolTimeout, match="the rest of a frame"):
            await destination.receive()
        nursery.cancel_scope.cancel()
    assert trio.current_time() == pytest.approx(3.0)


async def test_drip_control_a_fast_enough_peer_passes(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        destination = await dripped_hello(nursery, 0.01)  # the whole HELLO within about 2 s
        assert isinstance(await destination.receive(), protocol.Hello)
    assert trio.current_time() < 3.0


async def test_handshake_timeout(autojump_clock: trio.testing.MockClock) -> None:
    source, destination = channels(idle_timeout=100.0)
    await source.send(source.session.make_hello("s", {}))  # then the source stalls
    with pytest.raises(ProtocolTimeout, match="handshake with the source took over 10 s"):
        await protocol.destination_handshake(destination, agent_version="d", capabilities={}, timeout=10)
    assert trio.current_time() == pytest.approx(10.0)


async def test_peer_closing_mid_conversation_is_connection_closed() -> None:
    source, destination = channels()
    await source.send(source.session.make_hello("s", {}))
    await source.aclose()
    assert isinstance(await destination.receive(), protocol.Hello)
    with pytest.raises(ConnectionClosed, match="closed the stream in state AWAIT_DESTINATION_HELLO"):
        await destination.receive()


async def test_cancelled_send_leaves_the_channel_unusable(autojump_clock: trio.testing.MockClock) -> None:
    left, right = trio.testing.lockstep_stream_pair()  # sends block until the peer reads
    source = Channel(left, Session("source", PSK))
    with trio.move_on_after(1.0):
        await source.send(source.session.make_hello("s", {}))
    with pytest.raises(LocalProtocolError, match="channel unusable: a HELLO frame was cut short"):
        await source.send(protocol.Bye())


async def test_remote_error_message_is_raised_as_peer_error() -> None:
    source, destination = channels()
    await destination.send(protocol.Error("busy", "too many sessions"))
    with pytest.raises(protocol.PeerError) as info:
        await source.receive()
    assert (info.value.code, info.value.message) == ("busy", "too many sessions")


# -- real sockets ------------------------------------------------------------


async def serve_one(
    nursery: trio.Nursery, handler: Callable[[trio.abc.Stream], Awaitable[None]]
) -> int:
    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]  # type: ignore[no-any-return]


async def test_whole_migration_over_tcp_loopback(nursery: trio.Nursery) -> None:
    done: dict[str, Any] = {}

    async def handler(stream: trio.abc.Stream) -> None:
        done.update(await run_destination(Channel(stream, Session("destination", PSK))))

    port = await serve_one(nursery, handler)
    channel = await protocol.open_channel("127.0.0.1", port, Session("source", PSK))
    result = await run_source(channel)
    with trio.fail_after(10):
        while "ram" not in done:
            await trio.sleep(0.01)
    check_migration(result, done)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def tls_files(tmp_path: Any, ca: trustme.CA) -> dict[str, str]:
    server = ca.issue_cert("localhost", "127.0.0.1")
    client = ca.issue_cert("source-agent")
    paths = {
        "ca": tmp_path / "ca.pem",
        "server_cert": tmp_path / "server.pem",
        "server_key": tmp_path / "server.key",
        "client_cert": tmp_path / "client.pem",
        "client_key": tmp_path / "client.key",
    }
    ca.cert_pem.write_to_path(str(paths["ca"]))
    server.cert_chain_pems[0].write_to_path(str(paths["server_cert"]))
    server.private_key_pem.write_to_path(str(paths["server_key"]))
    client.cert_chain_pems[0].write_to_path(str(paths["client_cert"]))
    client.private_key_pem.write_to_path(str(paths["client_key"]))
    return {name: str(path) for name, path in paths.items()}


async def serve_tls(nursery: trio.Nursery, files: dict[str, str], done: dict[str, Any]) -> int:
    server_context = protocol.tls_server_context(
        files["server_cert"], files["server_key"], client_ca_file=files["ca"]
    )

    async def handler(stream: trio.abc.Stream) -> None:
        tls = trio.SSLStream(stream, server_context, server_side=True)
        async with Channel(tls, Session("destination", PSK)) as channel:
            try:
                done.update(await run_destination(channel))
            except protocol.ProtocolError as exc:
                done["error"] = exc

    return await serve_one(nursery, handler)


async def test_whole_migration_over_mutual_tls(nursery: trio.Nursery, tmp_path: Any, ca: trustme.CA) -> None:
    files = tls_files(tmp_path, ca)
    done: dict[str, Any] = {}
    port = await serve_tls(nursery, files, done)
    client_context = protocol.tls_client_context(
        files["ca"], certfile=files["client_cert"], keyfile=files["client_key"]
    )
    channel = await protocol.open_channel(
        "127.0.0.1", port, Session("source", PSK), ssl_context=client_context, server_hostname="localhost"
    )
    result = await run_source(channel)
    with trio.fail_after(10):
        while "ram" not in done:
            await trio.sleep(0.01)
    check_migration(result, done)
    assert isinstance(channel.stream, trio.SSLStream)


async def test_tls_without_a_client_certificate_is_refused(
    nursery: trio.Nursery, tmp_path: Any, ca: trustme.CA
) -> None:
    files = tls_files(tmp_path, ca)
    done: dict[str, Any] = {}
    port = await serve_tls(nursery, files, done)
    client_context = protocol.tls_client_context(files["ca"])  # no certificate of its own
    channel = await protocol.open_channel(
        "127.0.0.1", port, Session("source", PSK), ssl_context=client_context, server_hostname="localhost"
    )
    with pytest.raises(ConnectionClosed):
        async with channel:
            await run_source(channel)
    with trio.fail_after(10):
        while "error" not in done:
            await trio.sleep(0.01)
    assert isinstance(done["error"], ConnectionClosed)


async def test_tls_to_an_untrusted_server_is_refused(nursery: trio.Nursery, tmp_path: Any, ca: trustme.CA) -> None:
    files = tls_files(tmp_path, ca)
    port = await serve_tls(nursery, files, {})
    stranger = trustme.CA()
    stranger.cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
    client_context = protocol.tls_client_context(
        str(tmp_path / "other-ca.pem"), certfile=files["client_cert"], keyfile=files["client_key"]
    )
    channel = await protocol.open_channel(
        "127.0.0.1", port, Session("source", PSK), ssl_context=client_context, server_hostname="localhost"
    )
    with pytest.raises(ConnectionClosed) as info:
        async with channel:
            await run_source(channel)
    assert isinstance(info.value.__cause__.__cause__, ssl.SSLCertVerificationError)  # type: ignore[union-attr]


async def test_memory_over_the_destination_cap_gets_a_clear_error_on_both_sides(nursery: trio.Nursery) -> None:
    big = bytes(32 * protocol.MiB)
    done: dict[str, Any] = {}

    async def handler(stream: trio.abc.Stream) -> None:
        session = Session("destination", PSK, limits=protocol.Limits(max_memory_size=16 * protocol.MiB))
        async with Channel(stream, session) as channel:
            await protocol.destination_handshake(channel, agent_version="d", capabilities={})
            try:
                await channel.receive()
            except protocol.LimitExceeded as exc:
                done["error"] = exc

    port = await serve_one(nursery, handler)
    async with await protocol.open_channel("127.0.0.1", port, Session("source", PSK)) as channel:
        await protocol.source_handshake(channel, agent_version="s", capabilities={}, clock_rounds=1)
        await channel.send(protocol.Migrate({}, "full", len(big), 1 << 20))
        with pytest.raises(protocol.PeerError) as info:
            await channel.send_memory(big)
            await channel.receive()
    assert info.value.code == "limit"
    # 32 MiB cannot all fit in the socket buffers: the write broke, and the ERROR was read after it.
    assert isinstance(info.value.__cause__, trio.BrokenResourceError)
    assert "MIGRATE.memory_size: 33554432 bytes exceeds the limit 16777216" in info.value.message
    assert "exceeds the limit" in str(done["error"])


async def test_memory_within_the_destination_cap_control(nursery: trio.Nursery) -> None:
    done: dict[str, Any] = {}

    async def handler(stream: trio.abc.Stream) -> None:
        session = Session("destination", PSK, limits=protocol.Limits(max_memory_size=len(MEMORY)))
        done.update(await run_destination(Channel(stream, session)))

    port = await serve_one(nursery, handler)
    result = await run_source(await protocol.open_channel("127.0.0.1", port, Session("source", PSK)))
    with trio.fail_after(10):
        while "ram" not in done:
            await trio.sleep(0.01)
    check_migration(result, done)


class ClosedForWriting(trio.abc.Stream):
    """A stream whose writes fail as after the peer's close, with ``incoming`` left to read."""

    def __init__(self, incoming: bytes) -> None:
        self.incoming = [incoming] if incoming else []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        raise trio.BrokenResourceError("connection reset by peer")

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        return self.incoming.pop(0) if self.incoming else b""

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_broken_write_reports_the_error_the_peer_sent_before_closing() -> None:
    peer = Session("destination", PSK)
    refusal = peer.send(protocol.Error("busy", "no room"))  # the peer refuses at once, then closes
    session = Session("source", PSK)
    channel = Channel(ClosedForWriting(refusal), session)
    with pytest.raises(protocol.PeerError, match="no room"):
        await channel.send(session.make_hello("s", {}))


async def test_broken_write_without_an_error_is_connection_closed() -> None:
    # Control: nothing to read after the close (the loop must end, not spin on END_OF_STREAM).
    session = Session("source", PSK)
    channel = Channel(ClosedForWriting(b""), session)
    with pytest.raises(ConnectionClosed, match="broke while sending HELLO"):
        await channel.send(session.make_hello("s", {}))


# -- the one best-effort ERROR sender -------------------------------------------


async def test_send_error_sends_an_error_message_as_given_its_text_cut_to_the_limit() -> None:
    source, destination = channels()
    await destination.send_error(protocol.Error("busy", "x" * 5000))
    with pytest.raises(protocol.PeerError) as info, trio.fail_after(5):
        await source.receive()
    assert (info.value.code, info.value.message) == ("busy", "x" * 4096)
    assert destination.session.state is protocol.State.ERROR


async def test_send_error_of_an_exception_sends_its_code() -> None:
    source, destination = channels()
    await destination.send_error(protocol.LimitExceeded("too big"))
    with pytest.raises(protocol.PeerError) as info:
        await source.receive()
    assert (info.value.code, info.value.message) == ("limit", "too big")


async def test_send_error_does_not_answer_what_the_peer_said() -> None:
    source, destination = channels()
    for said in (protocol.PeerError("busy", "no room"), ConnectionClosed("gone")):
        await destination.send_error(said)
        assert destination.session.state is protocol.State.AWAIT_SOURCE_HELLO  # nothing was sent
    await destination.send_error(RuntimeError("bug"))  # control: this one is sent
    assert destination.session.state is protocol.State.ERROR


async def test_send_error_never_raises_when_the_peer_is_gone() -> None:
    session = Session("destination", PSK)
    channel = Channel(ClosedForWriting(b""), session)
    await channel.send_error(RuntimeError("bug"))  # the write breaks: swallowed
    assert session.state is protocol.State.ERROR
    left, right = trio.socket.socketpair()
    with left, right:
        socket_channel = Channel(trio.SocketStream(left), Session("destination", PSK))
        right.close()
        await socket_channel.send_error(RuntimeError("bug"))  # EPIPE on the fd path: swallowed
        assert socket_channel.session.state is protocol.State.ERROR


async def test_a_replaced_stream_carries_the_channel_bytes() -> None:
    # paced.py (tests/support) wraps a channel's stream to count what it sends.
    source, _ = channels()
    outgoing = trio.testing.MemorySendStream()
    source.stream = trio.StapledStream(outgoing, source.stream.receive_stream)  # type: ignore[attr-defined]
    await source.send(source.session.make_hello("s", {}))
    peer = Session("destination", PSK)
    peer.receive_data(outgoing.get_data_nowait())
    assert isinstance(peer.next_event(), protocol.Hello)

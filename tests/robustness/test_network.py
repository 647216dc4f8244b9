"""The network misbehaving and hostile clients, against a real `dest-agent` process.

A partition through the delay relay mid-transfer, a client dripping one byte per second, and a
hundred wrong-key clients storming the destination while one good source migrates.
"""

from __future__ import annotations

import json
import time

import pytest
import trio
from agents_helpers import PSK
from robustness_helpers import Agent, Resources, await_for, source_argv, vm_count

import protocol
from kvmcore import Strategy
from source_agent.migrate import MigrationPlan, migrate
from source_agent.netem import open_relay

MiB = 1 << 20


async def test_partition_mid_transfer_fires_both_timeouts_and_both_sides_clean_up(dest, agents,
                                                                                key, tmp_path):
    timeout = 2.0
    d = dest("--idle-timeout", "2s", "--message-timeout", "2s")
    base = Resources.of(d.pid)
    memory = 64 * MiB
    async with open_relay(d.address, rate="200mbit") as relay:      # 64 MiB take ~2.7 s
        target = f"{relay.address[0]}:{relay.address[1]}"
        db = tmp_path / "results.sqlite3"
        source = Agent(source_argv("migrate", "--to", target, "--psk-file", str(key), "--json",
                                   "--db", str(db), "--memory", "64MiB", "--message-timeout",
                                   "2s", "--idle-timeout", "2s"), tmp_path / "src.log")
        agents.append(source)
        # Mid-transfer for sure: past the handshake and MIGRATE, well short of the memory's end.
        sent = await await_for(lambda: relay.stats.up.bytes > 8 * MiB and relay.stats.up.bytes,
                               30, "8 MiB through the relay")
        assert sent < memory / 2
        relay.partition()
        partitioned_at = time.monotonic()
        lines = await await_for(d.sessions, 15, "the destination ending the session")
        dest_after = time.monotonic() - partitioned_at
        await await_for(lambda: source.proc.poll() is not None, 15, "the source exiting")
        source_after = time.monotonic() - partitioned_at
        assert relay.partitioned and relay.stats.up.bytes < memory
    # The destination: its message timeout fired (a frame begun, not finished), not earlier.
    assert "ProtocolTimeout" in lines[0] and "0 migration(s)" in lines[0], lines[0]
    assert timeout * 0.9 < dest_after < timeout + 5, dest_after
    # The source: its write timed out; exit 3 with the error recorded, the guest resumed.
    _, out = source.finish(5)
    assert out, source.log()
    report = json.loads(out)
    assert source.proc.returncode == 3 and report["exit_code"] == 3
    assert report["outcome"] == "rolled back" and report["rollback"]["ok"] is True
    assert target in report["error"] and "took over 2.0 s" in report["error"], report["error"]
    assert timeout * 0.9 < source_after < timeout + 5, source_after
    # Both cleaned up: no VM, the destination's descriptors back where they were.
    now = await await_for(lambda: (r := Resources.of(d.pid)).fds == base.fds and r, 10,
                          "destination fds back")
    assert now.vms == 0 and now.sockets == base.sockets


async def test_partition_control_the_same_path_without_a_partition_completes(dest, agents, key,
                                                                            tmp_path):
    d = dest("--idle-timeout", "2s", "--message-timeout", "2s")
    async with open_relay(d.address, rate="200mbit") as relay:
        source = Agent(source_argv("migrate", "--to", f"{relay.address[0]}:{relay.address[1]}",
                                   "--psk-file", str(key), "--no-db", "--memory", "64MiB",
                                   "--message-timeout", "2s", "--idle-timeout", "2s"),
                       tmp_path / "src.log")
        agents.append(source)
        await await_for(lambda: source.proc.poll() is not None, 60, "the source exiting")
        assert relay.stats.up.bytes > 64 * MiB
    assert source.proc.returncode == 0, source.log()
    assert d.sessions()[0].startswith("done, 1 migration(s)")


async def drip(address: tuple[str, int], data: bytes, interval: float) -> tuple[float, bytes]:
    """Send ``data`` one byte every ``interval`` s until the destination answers or closes.

    Returns how long after the first byte that happened and what it sent."""
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        start = time.monotonic()
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                async def dripper() -> None:
                    for byte in data:
                        try:
                            await stream.send_all(bytes([byte]))
                        except trio.BrokenResourceError:
                            return
                        await trio.sleep(interval)
                nursery.start_soon(dripper)
                received = b""
                try:       # until the peer closes or one whole frame has come
                    while chunk := await stream.receive_some(65536):
                        received += chunk
                        if len(received) >= 4 + int.from_bytes(received[:4].ljust(4, b"\xff")):
                            break
                except trio.BrokenResourceError:
                    pass
                nursery.cancel_scope.cancel()
        return time.monotonic() - start, received


def error_in(session: protocol.Session, received: bytes) -> protocol.Error:
    session.receive_data(received)
    events = []
    while (event := session.next_event()) not in (protocol.NEED_DATA, protocol.END_OF_STREAM):
        events.append(event)
    assert len(events) == 1 and isinstance(events[0], protocol.Error), events
    return events[0]


@pytest.mark.parametrize("which, options", [
    ("handshake", ("--handshake-timeout", "2s", "--message-timeout", "30s")),
    ("message", ("--handshake-timeout", "30s", "--message-timeout", "2s")),
])
async def test_a_client_dripping_one_byte_per_second_is_dropped_at_the_timeout(which, options,
                                                                              dest):
    d = dest(*options)
    session = protocol.Session("source", PSK)
    hello = session.send(session.make_hello("drip", {}))
    elapsed, received = await drip(d.address, hello, 1.0)
    assert 1.8 < elapsed < 5, elapsed          # at the 2 s timeout, not before, not much after
    error = error_in(session, received)
    assert error.code == "timeout", error
    wording = "handshake" if which == "handshake" else "message_timeout 2.0 s"
    assert wording in error.message, error.message
    line = d.wait_sessions(1)[0]
    assert "ProtocolTimeout" in line and "0 migration(s)" in line, line
    # Negative control: the same bytes at once get the destination's HELLO, not a timeout.
    session = protocol.Session("source", PSK)
    elapsed, received = await drip(d.address, session.send(session.make_hello("fast", {})), 0)
    session.receive_data(received)
    assert isinstance(session.next_event(), protocol.Hello) and elapsed < 1.5


async def test_a_hundred_wrong_key_clients_get_no_vm_and_the_good_one_completes(dest, kvm, caps):
    d = dest("--max-sessions", "128", "--max-unauthenticated", "128",
             "--max-unauthenticated-per-address", "128")
    peak = 0
    outcomes: list[str] = []
    storm_started = trio.Event()

    async def watch_vms() -> None:
        nonlocal peak
        while True:
            peak = max(peak, vm_count(d.pid))
            await trio.sleep(0.002)

    async def bad_client(i: int) -> None:
        session = protocol.Session("source", b"wrong-key-%03d-0123456789" % i)
        try:
            channel = await protocol.open_channel(*d.address, session)
            if i == 20:
                storm_started.set()
            async with channel:
                await protocol.source_handshake(channel, agent_version="bad", capabilities={},
                                                clock_rounds=1, timeout=20)
            outcomes.append("authenticated!")
        except protocol.ProtocolError as exc:
            outcomes.append(type(exc).__name__)

    async def good_client() -> None:
        await storm_started.wait()
        plan = MigrationPlan(host=d.address[0], port=d.address[1], psk=PSK, warmup_ns=0,
                             strategy=Strategy("realtime", "none", "off"))
        m = await migrate(plan, kvm, caps)
        assert m.analysis.checks["sequence_continues"].ok

    with trio.fail_after(60):
        async with trio.open_nursery() as watcher:
            watcher.start_soon(watch_vms)
            async with trio.open_nursery() as nursery:
                for i in range(100):
                    nursery.start_soon(bad_client, i)
                nursery.start_soon(good_client)
            lines = await await_for(lambda: len(d.sessions()) >= 101 and d.sessions(), 20,
                                    "101 session log lines")
            watcher.cancel_scope.cancel()
    assert outcomes == ["AuthenticationFailed"] * 100
    assert peak <= 1
    done = [line for line in lines if line.startswith("done")]
    assert len(done) == 1 and done[0].startswith("done, 1 migration(s)"), done
    refused = [line for line in lines if "AuthenticationFailed" in line]
    assert len(refused) == 100 and all("after 0 migration(s)" in line for line in refused)
    assert vm_count(d.pid) == 0

"""The destination agent in-process: authentication, refusals, limits, and every way a source
can vanish -- after each, the server still serves and its VMs, fds and threads are released."""

from __future__ import annotations

import os
import threading

import pytest
import trio
from agents_helpers import PSK, open_fds, settle
from kvm_helpers import require

import protocol
from kvmcore import GuestConfig, Strategy
from source_agent.migrate import MigrationPlan, migrate, run_source_guest

MiB = 1 << 20


def plan_for(server, psk: bytes = PSK, **kw) -> MigrationPlan:
    host, port = server.address
    return MigrationPlan(host=host, port=port, psk=psk, warmup_ns=0,
                         strategy=Strategy("realtime", "none", "off"), **kw)


async def test_good_migration_creates_and_releases_one_vm(server, kvm, caps):
    m = await migrate(plan_for(server), kvm, caps)
    assert m.analysis.checks["sequence_continues"].ok
    await settle(server)
    c = server.counters
    assert (c.vms_created, c.live_vms, c.migrations, c.live_sessions) == (1, 0, 1, 0)


async def test_wrong_key_is_refused_and_creates_no_vm(server, kvm, caps):
    with pytest.raises(protocol.AuthenticationFailed):
        await migrate(plan_for(server, psk=b"not-the-key-0123456789"), kvm, caps)
    await settle(server)
    assert server.counters.vms_created == 0 and server.counters.migrations == 0
    # Negative control: the same server and counters with the right key do count a VM.
    await migrate(plan_for(server), kvm, caps)
    assert server.counters.vms_created == 1


class ScriptedSource:
    """A source that follows the protocol step by step and can stop after any step."""

    def __init__(self, server, kvm, chunk_size: int = MiB) -> None:
        self.server, self.kvm, self.chunk_size = server, kvm, chunk_size

    async def run(self, stop: str) -> None:
        channel = await protocol.open_channel(*self.server.address,
                                              protocol.Session("source", PSK))
        session = channel.session
        try:
            if stop == "after connect":
                return
            await channel.send(session.make_hello("test", {}))
            if stop == "after HELLO":
                return
            await channel.receive()
            await channel.send(session.make_auth())
            if stop == "after AUTH":
                return
            await channel.receive()
            await channel.send(protocol.ClockSyncRequest(t1=1))
            if stop == "mid clock sync":
                return
            await channel.receive()
            source = await trio.to_thread.run_sync(run_source_guest, self.kvm, GuestConfig(), 0)
            memory = source.memory
            view = memory.view()
            try:
                await channel.send(protocol.Migrate(source.state.to_plain(),
                                                    str(Strategy("realtime", "none", "off")),
                                                    memory.size, self.chunk_size))
                if stop == "after MIGRATE":
                    return
                await channel.send(protocol.MemoryChunk(0, view[:self.chunk_size]))
                if stop == "mid memory":
                    return
                await channel.send(protocol.MemoryChunk(self.chunk_size, view[self.chunk_size:]))
                if stop == "before COMMIT":
                    return
                await channel.send(session.make_commit())
                if stop == "before reading REPORT":
                    return
                assert isinstance(await channel.receive(), protocol.Report)
            finally:
                view.release()
                memory.close()
        finally:
            await channel.aclose()


STEPS = ["after connect", "after HELLO", "after AUTH", "mid clock sync", "after MIGRATE",
         "mid memory", "before COMMIT", "before reading REPORT"]


async def test_a_source_vanishing_at_each_step_leaves_the_destination_clean(server, kvm, caps):
    await migrate(plan_for(server), kvm, caps)       # warm caches: trio's worker thread, etc.
    await settle(server)
    fds, threads = open_fds(), threading.active_count()
    created = server.counters.vms_created
    for step in STEPS:
        await ScriptedSource(server, kvm).run(step)
        await settle(server)
        assert server.counters.live_vms == 0, step
        assert open_fds() == fds, step
    # Only the last step got as far as a VM, and released it.
    assert server.counters.vms_created == created + 1
    # Negative control of the fd measure: one more open fd is seen.
    extra = os.dup(0)
    assert open_fds() == fds + 1
    os.close(extra)
    # Threads: trio keeps idle workers cached for a while; the count must come back down.
    with trio.fail_after(15):
        while threading.active_count() > threads:
            await trio.sleep(0.1)
    # Still serving: a complete migration succeeds.
    m = await migrate(plan_for(server), kvm, caps)
    assert m.analysis.checks["sequence_continues"].ok
    assert server.counters.failed_sessions == 0


async def test_scripted_source_completes_when_it_does_not_stop(server, kvm):
    """Negative control for the test above: the script itself is a valid migration."""
    await ScriptedSource(server, kvm).run("never")
    await settle(server)
    assert server.counters.migrations == 1


async def refused(server, kvm, migrate_message) -> protocol.PeerError:
    """Handshake, then send ``migrate_message`` (memory too if it is accepted)."""
    channel = await protocol.open_channel(*server.address, protocol.Session("source", PSK))
    async with channel:
        await protocol.source_handshake(channel, agent_version="test", capabilities={},
                                        clock_rounds=1)
        await channel.send(migrate_message)
        with pytest.raises(protocol.PeerError) as info:
            await channel.send_memory(bytes(migrate_message.memory_size))
            await channel.receive()
    await settle(server)
    assert server.counters.vms_created == 0 and server.counters.live_vms == 0
    return info.value


async def source_state(kvm):
    source = await trio.to_thread.run_sync(run_source_guest, kvm, GuestConfig(), 0)
    source.memory.close()
    return source.state.to_plain()


async def test_memory_above_the_cap_gets_error_limit(server, kvm):
    plain = await source_state(kvm)
    big = 2 << 30          # over the server's 1 GiB default cap
    channel = await protocol.open_channel(*server.address, protocol.Session("source", PSK))
    async with channel:
        await protocol.source_handshake(channel, agent_version="test", capabilities={},
                                        clock_rounds=1)
        with pytest.raises(protocol.PeerError) as info:
            await channel.send(protocol.Migrate(plain, "clock=realtime,tsc=none,runstate=off", big, MiB))
            await channel.receive()
    assert info.value.code == "limit"
    await settle(server)
    assert server.counters.vms_created == 0


async def test_unsupported_strategy_gets_error_naming_it(server, kvm, caps):
    if caps.clock_guest:
        pytest.skip("this host has KVM_SET_CLOCK_GUEST: clock=guest is supported")
    plain = await source_state(kvm)
    err = await refused(server, kvm, protocol.Migrate(plain, "clock=guest,tsc=none,runstate=off", 2 * MiB, MiB))
    assert err.code == "unsupported"
    assert "unsupported on this host: KVM_SET_CLOCK_GUEST" in err.message


@pytest.mark.parametrize("field, value, code, words", [
    ("sequence", -1, "bad_state", "'state.sequence'"),
    ("format_version", 99, "bad_state", "format_version"),
    ("strategy", "fast", "bad_strategy", "expected clock="),
])
async def test_bad_state_or_strategy_gets_an_error_naming_the_field(server, kvm, field, value,
                                                                    code, words):
    plain = await source_state(kvm)
    strategy = "clock=realtime,tsc=none,runstate=off"
    if field == "strategy":
        strategy = value
    else:
        plain[field] = value
    err = await refused(server, kvm, protocol.Migrate(plain, strategy, 2 * MiB, MiB))
    assert err.code == code and words in err.message


async def answer_to_migrate(server, migrate: protocol.Migrate,
                            wait: float = 5.0) -> protocol.PeerError | None:
    """Handshake, send ``migrate`` and no memory: the destination's ERROR, or None if it
    still waits after ``wait`` s (as it must for a good MIGRATE: its memory is due)."""
    channel = await protocol.open_channel(*server.address, protocol.Session("source", PSK))
    async with channel:
        await protocol.source_handshake(channel, agent_version="test", capabilities={},
                                        clock_rounds=1)
        await channel.send(migrate)
        with trio.move_on_after(wait):
            try:
                await channel.receive()
            except protocol.PeerError as exc:
                return exc
    return None


@pytest.mark.parametrize("field, value, words", [
    ("sequence", -1, "'state.sequence'"),
    ("memory_size", 4 * MiB, "MIGRATE announces 0x200000 bytes"),
])
async def test_a_bad_state_is_refused_at_migrate_before_any_memory(server, kvm, field, value,
                                                                   words):
    """The destination checks the state and strategy once, at MIGRATE: the refusal comes
    before the source sends a byte of memory (and before the destination allocates it)."""
    plain = await source_state(kvm)
    strategy = "clock=realtime,tsc=none,runstate=off"
    assert await answer_to_migrate(server, protocol.Migrate(plain, strategy, 2 * MiB, MiB),
                                   wait=0.5) is None
    err = await answer_to_migrate(server, protocol.Migrate({**plain, field: value}, strategy,
                                                           2 * MiB, MiB))
    assert err is not None and err.code == "bad_state" and words in err.message
    await settle(server)
    assert server.counters.vms_created == 0


async def test_a_migrate_with_runs_is_refused_before_any_memory(server, kvm):
    """Runs (part of the memory) would leave the other pages zero: this destination restores
    only a whole memory, and says so at MIGRATE (control: the same MIGRATE without runs
    waits for its memory)."""
    plain = await source_state(kvm)
    strategy = "clock=realtime,tsc=none,runstate=off"
    assert await answer_to_migrate(server, protocol.Migrate(plain, strategy, 2 * MiB, MiB),
                                   wait=0.5) is None
    err = await answer_to_migrate(server, protocol.Migrate(
        plain, strategy, 2 * MiB, MiB, runs=protocol.pack_runs([(0, 4096)])))
    assert err is not None and err.code == "unsupported" and "runs" in err.message
    await settle(server)
    assert server.counters.vms_created == 0


async def test_idle_client_is_dropped_at_the_handshake_timeout(server):
    stream = await trio.open_tcp_stream(*server.address)
    with trio.fail_after(15):
        assert await stream.receive_some(65536) != b""        # the ERROR timeout frame
    await stream.aclose()
    await settle(server)
    assert server.counters.live_sessions == 0


async def test_a_strategy_the_destination_lacks_is_refused_before_any_guest(nursery, kvm, caps):
    """The destination's HELLO says what it can do: a strategy it lacks fails right after the
    handshake (exit 3 on the CLI), before the source creates a guest or sends anything."""
    import dataclasses

    from dest_agent import AGENT_VERSION, DestinationServer, ServerConfig

    lacking = dataclasses.replace(caps, adjust_clock_flags=["TSC_STABLE", "HOST_TSC"])
    srv = DestinationServer(kvm, lacking, ServerConfig(psk=PSK, port=0), AGENT_VERSION)
    await nursery.start(srv.serve)
    realtime = Strategy("realtime", "none", "off")
    from source_agent.migrate import DestinationUnsupported

    with pytest.raises(DestinationUnsupported, match="unsupported on the destination host: "
                                                     "KVM_CLOCK_REALTIME") as info:
        await migrate(MigrationPlan(*srv.address, psk=PSK, warmup_ns=0, strategy=realtime),
                      kvm, caps)
    assert not isinstance(info.value, protocol.PeerError)    # the destination said nothing
    await settle(srv)
    assert srv.counters.vms_created == 0 and srv.counters.migrations == 0
    # Control: a strategy it has goes through.
    await migrate(MigrationPlan(*srv.address, psk=PSK, warmup_ns=0,
                                strategy=Strategy("plain", "none", "off")), kvm, caps)
    assert srv.counters.vms_created == 1


async def test_realtime_synced_without_the_estimate_is_refused_naming_it(server, kvm, caps):
    """clock=realtime-synced needs the clock-sync estimate the source puts in the state: a
    MIGRATE without it is refused before any memory or VM (the control, the same state with
    an estimate, waits for its memory)."""
    require(Strategy.parse("clock=realtime-synced,tsc=none,runstate=off"), caps)
    plain = await source_state(kvm)
    assert plain["clock_sync"] is None          # capture() leaves it to the source agent
    strategy = "clock=realtime-synced,tsc=none,runstate=off"
    err = await refused(server, kvm, protocol.Migrate(plain, strategy, 2 * MiB, MiB))
    assert err.code == "bad_state" and "clock_sync" in err.message, err.message
    good = {**plain, "clock_sync": {"offset_ns": 0, "uncertainty_ns": 1000}}
    channel = await protocol.open_channel(*server.address, protocol.Session("source", PSK))
    async with channel:
        await protocol.source_handshake(channel, agent_version="test", capabilities={},
                                        clock_rounds=1)
        await channel.send(protocol.Migrate(good, strategy, 2 * MiB, MiB))
        with trio.move_on_after(0.5) as waited:
            await channel.receive()
        assert waited.cancelled_caught
    await settle(server)
    assert server.counters.vms_created == 0


async def test_migrate_negotiates_the_parts_the_options_leave_open(nursery, kvm, caps):
    """`source-agent migrate` without --clock: the best both hosts support, named in the report
    (a destination without KVM_CLOCK_REALTIME: clock=plain, where this host's own best is
    realtime); a part the options give is still refused where the destination lacks it."""
    import dataclasses

    from dest_agent import AGENT_VERSION, DestinationServer, ServerConfig
    from source_agent.migrate import DestinationUnsupported
    from source_agent.report import compose

    lacking = dataclasses.replace(caps, adjust_clock_flags=["TSC_STABLE", "HOST_TSC"])
    srv = DestinationServer(kvm, lacking, ServerConfig(psk=PSK, port=0), AGENT_VERSION)
    await nursery.start(srv.serve)
    local = Strategy.resolve("", caps)
    if local.clock != "realtime":
        pytest.skip(f"unsupported on this host: KVM_CLOCK_REALTIME (best here: {local})")
    plan = MigrationPlan(*srv.address, psk=PSK, warmup_ns=0, strategy=local, negotiate="")
    m = await migrate(plan, kvm, caps)
    assert m.plan.strategy == dataclasses.replace(local, clock="plain"), m.plan.strategy
    report = compose(m, run_id="t", started_ns=0, command="migrate")
    assert report["strategy"].startswith("clock=plain,")
    assert report["strategy_chosen"] == "best both hosts support"
    # Control: the same part given by the options is refused, naming the destination's lack.
    with pytest.raises(DestinationUnsupported, match="KVM_CLOCK_REALTIME"):
        await migrate(dataclasses.replace(plan, negotiate="clock=realtime"), kvm, caps)
    assert srv.counters.vms_created == 1

"""The destination's PREPARE: a VM and its memory made ahead of the state, held through the
ROUNDs, released on every exit path (BYE in PREPARED, a vanishing source, a refusal)."""

from __future__ import annotations

import threading

import pytest
import trio
from agents_helpers import PSK, open_fds, settle

import protocol
from kvmcore import GuestConfig
from source_agent.migrate import run_source_guest

MiB = 1 << 20
STRATEGY = "clock=realtime,tsc=none,runstate=off"


def dest_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "dest-vcpu"]


async def prepared_channel(server, strategy: str = STRATEGY, memory_size: int = 2 * MiB):
    """A channel past HELLO/AUTH/clock sync and PREPARE; PREPARED (or the ERROR) read."""
    channel = await protocol.open_channel(*server.address, protocol.Session("source", PSK))
    await protocol.source_handshake(channel, agent_version="test", capabilities={},
                                    clock_rounds=1)
    try:
        await channel.send(protocol.Prepare(strategy, memory_size, MiB))
        return channel, await channel.receive()
    except BaseException:
        await channel.aclose()
        raise


async def source_state(kvm) -> dict:
    source = await trio.to_thread.run_sync(run_source_guest, kvm, GuestConfig(), 0)
    source.memory.close()
    return source.state.to_plain()


async def test_a_preparation_holds_one_vm_until_the_source_says_bye(server):
    fds = open_fds()
    channel, answer = await prepared_channel(server)
    assert isinstance(answer, protocol.Prepared) and answer.prepare_ns > 0
    # Negative control of the release below: the prepared VM and its thread exist.
    assert server.counters.live_vms == 1 and dest_threads() == ["dest-vcpu"]
    await channel.bye()
    await channel.aclose()
    await settle(server)
    c = server.counters
    assert (c.vms_created, c.live_vms, c.migrations) == (1, 0, 0)
    assert open_fds() == fds and dest_threads() == []


@pytest.mark.parametrize("step", ["after PREPARE", "after PREPARED", "mid ROUND",
                                  "after ROUND", "after MIGRATE"])
async def test_a_source_vanishing_while_prepared_leaves_nothing(server, kvm, step):
    plain = await source_state(kvm)
    fds = open_fds()
    channel = await protocol.open_channel(*server.address, protocol.Session("source", PSK))
    async with channel:
        await protocol.source_handshake(channel, agent_version="test", capabilities={},
                                        clock_rounds=1)
        await channel.send(protocol.Prepare(STRATEGY, 2 * MiB, MiB))
        if step != "after PREPARE":
            assert isinstance(await channel.receive(), protocol.Prepared)
            assert server.counters.live_vms == 1
        if step in ("mid ROUND", "after ROUND", "after MIGRATE"):
            await channel.send(protocol.Round(None))
            await channel.send(protocol.MemoryChunk(0, bytes(MiB)))
        if step in ("after ROUND", "after MIGRATE"):
            await channel.send(protocol.MemoryChunk(MiB, bytes(MiB)))
            await channel.send(channel.session.make_commit())
        if step == "after MIGRATE":
            await channel.send(protocol.Migrate(plain, STRATEGY, 2 * MiB, MiB,
                                                protocol.pack_runs([])))
    await settle(server)
    assert server.counters.live_vms == 0, step
    assert open_fds() == fds and dest_threads() == [], step


async def refusal(channel) -> protocol.PeerError:
    with pytest.raises(protocol.PeerError) as info:
        await channel.receive()
    await channel.aclose()
    return info.value


async def test_runs_before_the_whole_memory_are_refused_bad_state(server, kvm):
    """MIGRATE with runs in PREPARED before a ROUND of all the memory: the other pages would be
    zero. (Control: after such a ROUND the same MIGRATE is taken -- tests/agents/test_live_migration.)"""
    plain = await source_state(kvm)
    channel, _ = await prepared_channel(server)
    await channel.send(protocol.Migrate(plain, STRATEGY, 2 * MiB, MiB,
                                        protocol.pack_runs([(0, 4096)])))
    err = await refusal(channel)
    assert err.code == "bad_state" and "before a ROUND of the whole memory" in err.message
    await settle(server)
    assert server.counters.live_vms == 0 and server.counters.migrations == 0


async def test_a_migrate_with_another_strategy_than_prepared_is_refused(server, kvm):
    plain = await source_state(kvm)
    channel, _ = await prepared_channel(server)
    await channel.send(protocol.Migrate(plain, "clock=plain,tsc=none,runstate=off", 2 * MiB, MiB))
    err = await refusal(channel)
    assert err.code == "bad_strategy" and "not the prepared" in err.message
    await settle(server)
    assert server.counters.live_vms == 0


@pytest.mark.parametrize("strategy, memory_size, code", [
    ("fast", 2 * MiB, "bad_strategy"),
    (STRATEGY, 2 << 30, "limit"),             # over the server's 1 GiB default
])
async def test_a_preparation_refused_creates_nothing(server, strategy, memory_size, code):
    channel = await protocol.open_channel(*server.address, protocol.Session("source", PSK))
    await protocol.source_handshake(channel, agent_version="test", capabilities={},
                                    clock_rounds=1)
    with pytest.raises(protocol.PeerError) as info:
        await channel.send(protocol.Prepare(strategy, memory_size, MiB))
        await channel.receive()
    await channel.aclose()
    assert info.value.code == code
    await settle(server)
    assert server.counters.vms_created == 0


async def test_a_strategy_this_host_lacks_is_refused_at_prepare(server, caps):
    if caps.clock_guest:
        pytest.skip("this host has KVM_SET_CLOCK_GUEST: clock=guest is supported")
    with pytest.raises(protocol.PeerError) as info:
        await prepared_channel(server, "clock=guest,tsc=none,runstate=off")
    assert info.value.code == "unsupported"
    assert "unsupported on this host: KVM_SET_CLOCK_GUEST" in info.value.message
    await settle(server)
    assert server.counters.vms_created == 0

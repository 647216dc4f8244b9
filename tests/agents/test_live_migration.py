"""Live migration through both agents in-process: precopy rounds while a dirtying guest runs,
the memory checked across the hosts, and rollback -- real KVM, real TCP on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import trio
from agents_helpers import PSK, open_fds, settle

import dest_agent.session
from kvmcore import Strategy
from source_agent.migrate import MigrationPlan, RolledBack, migrate
from source_agent.netem import open_relay

MiB = 1 << 20
#: A guest that dirties its 8 MiB working set at 50 MiB/s: more than one round for sure with a
#: 0.1 ms downtime limit: that is ~45 pages at 1.8 GB/s, which the guest dirties in 3.5 ms, and
#: round 0 of 32 MiB never took less than 17 ms here (a 1 ms limit let a 17.8 ms round 0 converge
#: at once, its ~220 dirty pages fitting).
LIMIT_NS = 100_000
DIRTYING = {"mode": "precopy", "memory_size": 32 * MiB, "dirty_rate": 50 * MiB,
            "working_set": 8 * MiB, "downtime_limit_ns": LIMIT_NS, "max_rounds": 4,
            "warmup_ns": 5_000_000}


def plan_for(address, **kw) -> MigrationPlan:
    return MigrationPlan(host=address[0], port=address[1], psk=PSK,
                         strategy=Strategy("realtime", "none", "off"), **{**DIRTYING, **kw})


async def test_precopy_with_a_dirtying_guest_sends_rounds_and_the_memory_arrives_intact(
        server, kvm, caps):
    m = await migrate(plan_for(server.address), kvm, caps)
    stats, checks = m.stats, m.analysis.checks
    assert 2 <= len(stats.rounds) <= 4, stats.rounds
    assert stats.rounds[0].bytes == 32 * MiB                 # round 0: all of the memory
    assert all(0 < r.bytes < 32 * MiB for r in stats.rounds[1:])   # then the dirty pages
    assert stats.rounds[0].dirty_rate > 0 and stats.final.bytes > 0
    assert stats.converged is (stats.expected_downtime_ns <= LIMIT_NS)
    assert checks["memory_intact"].ok is True, checks["memory_intact"].detail
    assert m.memory_comparison.working_set_pages == 2048
    assert checks["sequence_continues"].ok and checks["never_backwards"].ok
    assert m.destination.phases.prepare_ns > 0 and m.destination.phases.rounds_receive_ns > 0
    assert stats.downtime_ns > 0 and stats.setup_ns < stats.total_ns
    await settle(server)
    c = server.counters
    assert (c.vms_created, c.live_vms, c.migrations) == (1, 0, 1)


async def test_a_destination_that_drops_the_last_dirty_set_fails_memory_intact(
        server, kvm, caps, monkeypatch):
    """Negative control of memory_intact: MIGRATE's memory (the pages dirtied since the last
    round) received into a scratch buffer instead of the guest's memory (a test-only hook).

    The workload's state (cursor, generation) is in its report page, which is in that set:
    the restored guest resumes from an older copy and replays the same writes, with the same
    stamps, which would hide their loss. Hence one round of 64 MiB and a 1 MiB working set: the
    guest goes round it several times meanwhile, and a pass writes each page at most once, so
    the replay cannot catch up before the first report."""
    monkeypatch.setattr(dest_agent.session, "_final_sink",
                        lambda memory: memoryview(bytearray(memory.size)))
    m = await migrate(plan_for(server.address, memory_size=64 * MiB, max_rounds=1,
                               working_set=MiB), kvm, caps)
    check = m.analysis.checks["memory_intact"]
    assert check.ok is False and "memory_intact" in m.analysis.failed
    assert "is behind the source's" in check.detail and "a write was lost" in check.detail
    assert m.stats.final.bytes > 0 and len(m.memory_comparison.mismatches) > 1


async def test_stop_copy_with_prepare_compares_the_memory_too(server, kvm, caps):
    m = await migrate(plan_for(server.address, mode="stop-copy", downtime_limit_ns=30_000_000,
                               max_rounds=10, memory_size=16 * MiB), kvm, caps)
    assert m.stats.rounds == [] and m.stats.final.bytes == 16 * MiB
    assert m.analysis.checks["memory_intact"].ok is True
    assert m.stats.destination_prepare_ns > 0 and m.destination.phases.prepare_ns > 0


@pytest.mark.parametrize("mode", ["precopy", "stop-copy"])
async def test_the_destination_gone_rolls_back_and_leaks_nothing(server, kvm, caps, mode):
    """The connection reset (RST, as a killed destination's) mid-precopy -- the guest running,
    round 0 half sent -- or after the stop -- stop-copy's MIGRATE half sent: the source stops
    the guest if it runs, runs it on, and frees everything; the destination releases its
    prepared VM."""
    plan = plan_for(server.address, mode=mode, memory_size=32 * MiB,
                    **({"downtime_limit_ns": 30_000_000, "max_rounds": 10}
                       if mode == "stop-copy" else {}))
    await migrate(plan, kvm, caps)                                        # warm
    await settle(server)
    fds = open_fds()
    async with open_relay(server.address) as relay:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cut_after, relay, 16 * MiB)   # half the memory: surely mid-way
            with pytest.raises(RolledBack) as info:
                await migrate(dataclasses.replace(plan, host=relay.address[0],
                                                  port=relay.address[1]), kvm, caps)
    failed = info.value
    assert failed.rollback.ok, failed.rollback
    assert failed.stats.final is None and failed.stats.rounds == []   # nothing sent in full
    assert "rolled back: the source guest resumed and runs on" in str(failed)
    await settle(server)
    assert server.counters.live_vms == 0
    assert open_fds() == fds
    # Both guests' own threads are joined (trio's idle workers expire by themselves).
    assert [t.name for t in threading.enumerate() if t.name.endswith("-vcpu")] == []


async def _cut_after(relay, up_bytes: int) -> None:
    with trio.fail_after(30):
        while relay.stats.up.bytes < up_bytes:
            await trio.sleep(0.005)
    # Negative control of the no-threads-left check: the guest's thread lives until the cut.
    assert any(t.name == "source-vcpu" for t in threading.enumerate())
    relay.cut()

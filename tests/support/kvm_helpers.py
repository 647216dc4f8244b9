"""Helpers for kvmcore's tests: the strategy skip and an in-process migration, all on the real
/dev/kvm (nothing here mocks it)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest

from kvmcore import (Analysis, Guest, GuestConfig, GuestMemory, HostCapabilities,
                     RestoreRecord, Snapshot, Strategy, System, VmState, analyse, capture,
                     restore)


def require(strategy: Strategy, caps: HostCapabilities) -> None:
    """Skip, naming the capability, when this host cannot do ``strategy`` (kvmcore's
    requirements table decides, as it does for the agents)."""
    missing = strategy.missing(caps)
    if missing:
        pytest.skip(f"unsupported on this host: {missing[0]}")


@dataclass
class Migration:
    before: Snapshot
    after: Snapshot
    state: VmState
    analysis: Analysis
    record: RestoreRecord
    memory_intact: bool


def migrate(kvm: System, caps: HostCapabilities, strategy: Strategy, gap_s: float, *,
            source_run_s: float = 0.0,
            config: GuestConfig = GuestConfig()) -> Migration:
    """An in-process migration through the wire form: capture, to_plain, a fresh
    GuestMemory filled by chunks, from_plain, ``gap_s`` of sleep, restore, run."""
    with Guest.create(kvm, config) as g:
        g.run_until_snapshot()
        if source_run_s:
            time.sleep(source_run_s)   # let the source kvmclock get ahead of a new VM's
        before = g.run_until_snapshot()
        state = capture(g)
    state2 = VmState.from_plain(state.to_plain())
    plan = strategy.check(caps, state2)           # before the memory exists, as an agent
    memory = GuestMemory.allocate(state2.memory_size)
    source = g.memory.view()
    chunk = 256 << 10
    for off in range(0, memory.size, chunk):
        memory.view()[off:off + chunk] = source[off:off + chunk]
    # The code and page tables must arrive untouched; the report page is the guest's.
    code = memory.read(0x10000, 0x1000)
    time.sleep(gap_s)
    with restore(kvm, plan, memory) as g2:
        after = g2.run_until_snapshot()
        record = g2.restore_record
        analysis = analyse(before, after, state2, record)
        intact = memory.read(0x10000, 0x1000) == code == g.memory.read(0x10000, 0x1000)
    del source
    g.memory.close()
    return Migration(before, after, state2, analysis, record, intact)

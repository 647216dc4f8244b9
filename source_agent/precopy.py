"""Precopy on the source: memory sent in ROUNDs while the guest runs, then the stop.

Why rounds: the downtime of stop-and-copy grows with the memory; here only the pages
the guest dirtied since the last round are left to send once it stops. Round 0 sends
all of it; each later round the pages the dirty log (kvmcore: KVM_GET_DIRTY_LOG, a VM
ioctl read from a worker thread while the vCPU runs on in its own) says were written
during the one before. After each round the dirty set is weighed against the
bandwidth that round achieved: once sending it would take no longer than the
downtime limit -- or the rounds run out -- the guest is stopped at its next report
and captured, and the caller sends MIGRATE with that set united with what the guest
wrote between the read and the stop.

A running guest's memory is sent with ``copy=True``: each batch is copied to the
channel's bounce buffer first, so the MAC covers exactly the bytes written; a page
changed meanwhile is in the next dirty set anyway. The last set, after the stop, goes
zero-copy (the caller's MIGRATE).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import protocol

from .source_guest import SourceGuest, SourceRun
from .stats import MigrationStats

if TYPE_CHECKING:
    from .migrate import MigrationPlan


async def precopy(channel: protocol.Channel, plan: MigrationPlan, guest: SourceGuest,
                  stats: MigrationStats) -> tuple[SourceRun, list[tuple[int, int]], int]:
    """Create and warm up the guest, send the rounds while it runs (recorded in ``stats``),
    stop and capture it; the run, the dirty runs still to send, and when round 0 started
    (perf_counter ns: the end of the setup)."""
    create_ns, reports = await guest.start_live(plan.warmup_ns)
    assert guest.memory is not None
    runs: list[tuple[int, int]] | None = None        # round 0: all of the memory
    size = guest.memory.size
    first = time.perf_counter_ns()
    while True:
        t0 = time.perf_counter_ns()
        await channel.send(protocol.Round(None if runs is None else protocol.pack_runs(runs)))
        view = guest.memory.view()
        try:
            await channel.send_memory(view, copy=True)
        finally:
            view.release()
        stats.add_round(size, time.perf_counter_ns() - t0)
        dirty = await guest.dirty()
        stats.dirtied(dirty.byte_count)
        expected = stats.expect(dirty.byte_count)
        converged = expected is not None and expected <= plan.downtime_limit_ns
        if converged or stats.round_count >= plan.max_rounds:
            stats.converged = converged
            break
        runs, size = dirty.runs(), dirty.byte_count
    before, state, stopped = await guest.stop_and_capture()
    t_log = time.perf_counter_ns()
    # With what was written between the read and the stop.
    final = (dirty | await guest.dirty()).runs()
    source = SourceRun(before, state, guest.memory, reports, create_ns, 0, stopped,
                       dirty_log_ns=time.perf_counter_ns() - t_log)
    return source, final, first

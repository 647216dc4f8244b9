"""The source guest's whole life in one dedicated thread, kept until the destination has it.

Why a thread of its own: every vCPU ioctl must come from one thread (KVM_RUN from a new
thread costs a synchronize_rcu() in the downtime), and the guest outlives any one step
of the migration: created and warmed up, captured (stopped, not destroyed), then either
destroyed once a validated REPORT says the destination has it, or resumed when anything
fails before that ("rolled back": its sequence continues here). Only ``--destroy-first``
(the seed's order) destroys it at capture, and so cannot roll back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import trio

from kvmcore import (
    DirtyBitmap,
    Guest,
    GuestConfig,
    GuestMemory,
    LiveRun,
    Snapshot,
    System,
    VcpuThread,
    VmState,
    capture,
)

#: Reports the guest makes after a rollback, to show it runs on.
ROLLBACK_REPORTS = 3


@dataclass
class SourceRun:
    """What the source guest did before it left: its last report and its state."""

    before: Snapshot
    state: VmState
    memory: GuestMemory       # the guest's, outliving its VM until compared and freed
    warmup_reports: int
    create_ns: int
    destroy_ns: int           # 0 until destroyed (at capture only with --destroy-first)
    #: CLOCK_REALTIME when the vCPU left its last KVM_RUN: where the downtime starts.
    stop_realtime_ns: int
    dirty_log_ns: int = 0     # precopy: reading the last dirty set, after the capture


@dataclass(frozen=True)
class Rollback:
    """The source guest resumed after a failed migration: its sequence must go on from where
    it stopped."""

    stopped_sequence: int
    resumed_sequences: tuple[int, ...]

    @property
    def ok(self) -> bool:
        seq = (self.stopped_sequence, *self.resumed_sequences)
        return len(seq) > 1 and all(a < b for a, b in zip(seq, seq[1:]))

    def to_plain(self) -> dict[str, Any]:
        return {"stopped_sequence": self.stopped_sequence,
                "resumed_sequences": list(self.resumed_sequences), "ok": self.ok}

    def __str__(self) -> str:
        if not self.ok:
            return (f"the source guest did not run on after the stop (sequence "
                    f"{self.stopped_sequence}, then {list(self.resumed_sequences)})")
        return (f"the source guest resumed and runs on (sequence {self.stopped_sequence} -> "
                f"{self.resumed_sequences[-1]})")


def warm_up(guest: Guest, warmup_ns: int) -> tuple[Snapshot, int]:
    """Run for ``warmup_ns`` (at least one report); the last report and how many there were."""
    before = guest.run_until_snapshot()
    reports = 1
    deadline = time.perf_counter_ns() + warmup_ns
    while time.perf_counter_ns() < deadline:
        before = guest.run_until_snapshot()
        reports += 1
    return before, reports


def run_source_guest(kvm: System, config: GuestConfig, warmup_ns: int) -> SourceRun:
    """The seed's order in one thread call: create, warm up, capture, destroy."""
    with Guest.create(kvm, config) as guest:
        before, reports = warm_up(guest, warmup_ns)
        state = capture(guest)
        t1 = time.perf_counter_ns()
    return SourceRun(before, state, guest.memory, reports, guest.timings["create"],
                     time.perf_counter_ns() - t1, before.host_realtime_ns)


class SourceGuest:
    """The guest and its thread (module docstring); ``async with`` releases both, and the
    memory, however the migration ended."""

    def __init__(self, kvm: System, config: GuestConfig) -> None:
        self.kvm, self.config = kvm, config
        self.thread = VcpuThread("source-vcpu")
        self.guest: Guest | None = None      # None before creation and once destroyed
        self.memory: GuestMemory | None = None
        self.last: Snapshot | None = None    # the guest's latest report
        self.live: LiveRun | None = None     # precopy: the guest running in its thread

    async def __aenter__(self) -> SourceGuest:
        return self

    async def __aexit__(self, *exc: object) -> None:
        # Shielded: a cancelled migration still stops, destroys and frees its guest.
        with trio.CancelScope(shield=True):
            try:
                if self.guest is not None:
                    await self.destroy()
            finally:
                if self.memory is not None:
                    self.memory.close()
                self.thread.close()

    async def create(self) -> int:
        """The guest, not yet run; its creation time (ns)."""
        self.guest = await self.thread.acall(Guest.create, self.kvm, self.config)
        self.memory = self.guest.memory
        return self.guest.timings["create"]

    async def warm_up_and_capture(self, warmup_ns: int) -> SourceRun:
        """Stop-copy: create, run for ``warmup_ns``, capture in the same call (the stop and
        the capture as close as they can be), the guest kept stopped."""
        create_ns = await self.create()
        before, reports, state = await self.thread.acall(self._warm_and_capture, warmup_ns)
        assert self.memory is not None
        return SourceRun(before, state, self.memory, reports, create_ns, 0,
                         before.host_realtime_ns)

    async def start_live(self, warmup_ns: int) -> tuple[int, int]:
        """Precopy: create, warm up, log dirty pages, then run freely in the thread
        (LiveRun); the creation time and the warm-up's reports."""
        create_ns = await self.create()
        assert self.guest is not None
        self.last, reports = await self.thread.acall(warm_up, self.guest, warmup_ns)
        await self.thread.acall(self.guest.start_dirty_log)
        self.live = LiveRun(self.guest, self.thread)
        self.live.start()
        return create_ns, reports

    async def dirty(self) -> DirtyBitmap:
        """The pages written since the last call (a VM ioctl: from any thread, the vCPU
        running on in its own)."""
        assert self.guest is not None
        return await trio.to_thread.run_sync(self.guest.dirty_bitmap)

    async def stop_and_capture(self) -> tuple[Snapshot, VmState, int]:
        """Precopy's stop: at the guest's next report, then the capture; the last report,
        the state and when the vCPU left KVM_RUN (CLOCK_REALTIME)."""
        assert self.live is not None and self.guest is not None
        self.last = await self._stop_live()
        stopped = self.live.stopped_realtime_ns
        assert stopped is not None
        return self.last, await self.thread.acall(capture, self.guest), stopped

    async def _stop_live(self) -> Snapshot | None:
        """Stop the live loop if it runs (its last report; None if it did not run)."""
        if self.live is None or not self.live.running:
            return None
        return await self.live.astop()

    def _warm_and_capture(self, warmup_ns: int) -> tuple[Snapshot, int, VmState]:
        assert self.guest is not None
        before, reports = warm_up(self.guest, warmup_ns)
        self.last = before
        return before, reports, capture(self.guest)

    async def destroy_first(self, warmup_ns: int) -> SourceRun:
        """``--destroy-first``: the seed's order, the VM gone before anything is sent."""
        run = await self.thread.acall(run_source_guest, self.kvm, self.config, warmup_ns)
        self.memory, self.last = run.memory, run.before
        return run

    async def destroy(self) -> int:
        """Destroy the VM (not the memory, still to be compared); how long it took (ns)."""
        try:
            await self._stop_live()
        finally:
            guest, self.guest = self.guest, None
            assert guest is not None
            t0 = time.perf_counter_ns()
            await self.thread.acall(guest.close)
        return time.perf_counter_ns() - t0

    async def roll_back(self, reports: int = ROLLBACK_REPORTS) -> Rollback:
        """Resume the stopped guest for ``reports`` reports: the migration failed, the guest
        stays here. (KvmError if it cannot run: then it is lost.)"""
        self.last = await self._stop_live() or self.last
        assert self.guest is not None and self.last is not None
        stopped = self.last.sequence
        snaps = await self.thread.acall(self._run_on, reports)
        return Rollback(stopped, tuple(s.sequence for s in snaps))

    def _run_on(self, reports: int) -> list[Snapshot]:
        assert self.guest is not None
        snaps = [self.guest.run_until_snapshot() for _ in range(reports)]
        self.last = snaps[-1]
        return snaps

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

from kvmcore import Guest, GuestConfig, GuestMemory, Snapshot, System, VmState, capture

from ._vcpu_thread import VcpuThread

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
                     time.perf_counter_ns() - t1)


class SourceGuest:
    """The guest and its thread (module docstring); ``async with`` releases both, and the
    memory, however the migration ended."""

    def __init__(self, kvm: System, config: GuestConfig) -> None:
        self.kvm, self.config = kvm, config
        self.thread = VcpuThread("source-vcpu")
        self.guest: Guest | None = None      # None before creation and once destroyed
        self.memory: GuestMemory | None = None
        self.last: Snapshot | None = None    # the guest's latest report

    async def __aenter__(self) -> SourceGuest:
        return self

    async def __aexit__(self, *exc: object) -> None:
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
        return SourceRun(before, state, self.memory, reports, create_ns, 0)

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
        guest, self.guest = self.guest, None
        assert guest is not None
        t0 = time.perf_counter_ns()
        await self.thread.acall(guest.close)
        return time.perf_counter_ns() - t0

    async def roll_back(self, reports: int = ROLLBACK_REPORTS) -> Rollback:
        """Resume the stopped guest for ``reports`` reports: the migration failed, the guest
        stays here. (KvmError if it cannot run: then it is lost.)"""
        assert self.guest is not None and self.last is not None
        stopped = self.last.sequence
        snaps = await self.thread.acall(self._run_on, reports)
        return Rollback(stopped, tuple(s.sequence for s in snaps))

    def _run_on(self, reports: int) -> list[Snapshot]:
        assert self.guest is not None
        snaps = [self.guest.run_until_snapshot() for _ in range(reports)]
        self.last = snaps[-1]
        return snaps

"""The source side of one migration, as a coroutine a command or a sweep can call.

Order (why): connect, HELLO/AUTH and clock sync come first, so a refused key or
an unreachable destination costs no VM; then PREPARE, so the destination refuses
what it cannot do, and makes its VM and memory, before the source guest exists
and off the downtime path. Then the guest, in its own thread (source_guest: every
vCPU ioctl from one thread), is created and warmed up;

* stop-copy: captured -- stopped, not destroyed -- then the optional extra gap,
  MIGRATE, the whole memory straight from guest RAM, COMMIT;
* precopy (source_agent.precopy): ROUNDs of memory while it runs, until the dirty
  set would take no longer than the downtime limit (or the rounds run out), then
  stopped, captured, and MIGRATE with the last dirty set.

The REPORT is validated field by field before anything in it is used; only then is
the source VM destroyed (its own phase, outside the downtime) and its memory
compared with the destination's digest (memory_intact). Any failure before that
resumes the source guest: the migration is "rolled back" and the guest runs on
here. With ``destroy_first`` (the seed's order) there is no PREPARE, the VM is
destroyed at capture, inside the downtime, and a failure loses the guest. The
analysis runs here, where the snapshot before, the state and the clock-sync
estimate are.
"""

from __future__ import annotations

import dataclasses
import math
import ssl
import time
from dataclasses import dataclass
from typing import Any

import trio

import protocol
from kvmcore import (
    DIGEST_MAX_MEMORY,
    DIGEST_NOT_COMPUTED,
    Analysis,
    DestinationReport,
    GuestConfig,
    HostCapabilities,
    KvmError,
    MemoryComparison,
    StateError,
    Strategy,
    Unsupported,
    System,
    analyse,
    compare_digest,
)
from kvmcore.analysis import DEFAULT_SLACK_NS

from agentcore import AGENT_VERSION
from agentcore.options import UsageError, format_duration

from .precopy import precopy
from .source_guest import Rollback, SourceGuest, SourceRun, run_source_guest
from .stats import MODES, MigrationStats

__all__ = ["DestinationUnsupported", "GuestLost", "Migration", "MigrationPlan",
           "PeerReportError", "RolledBack", "SourceRun", "migrate", "run_source_guest"]


class PeerReportError(protocol.RemoteProtocolError):
    """The destination's HELLO capabilities or REPORT failed validation (a peer fault)."""


class DestinationUnsupported(protocol.ProtocolError):
    """The destination's HELLO capabilities lack what the strategy needs: this side's decision,
    made before any guest exists (not a PeerError: the destination said nothing of it)."""

    def __init__(self, what: str) -> None:
        self.what = what
        super().__init__(f"unsupported on the destination host: {what} (its HELLO capabilities)")


class MigrationFailed(Exception):
    """The migration failed once the source guest existed: ``cause`` says why, the subclass
    what became of the guest. ``stats`` are the figures measured up to the failure."""

    def __init__(self, cause: BaseException, stats: MigrationStats, what: str) -> None:
        super().__init__(f"{cause or type(cause).__name__}; {what}")
        self.cause, self.stats, self.what = cause, stats, what


class RolledBack(MigrationFailed):
    """The source guest was resumed and runs on here: nothing was lost but the migration."""

    def __init__(self, cause: BaseException, stats: MigrationStats, rollback: Rollback) -> None:
        super().__init__(cause, stats, f"rolled back: {rollback}")
        self.rollback = rollback


class GuestLost(MigrationFailed):
    """The source guest is gone too: destroyed before the transfer (``--destroy-first``), or
    it could not be resumed."""


@dataclass(frozen=True)
class MigrationPlan:
    """One migration's parameters; a sweep builds one per point. Checked when made
    (UsageError naming the option), before any VM or connection exists."""

    host: str
    port: int
    psk: bytes
    strategy: Strategy
    memory_size: int = 2 << 20
    warmup_ns: int = 10_000_000
    gap_ns: int = 0
    chunk_size: int = 1 << 20
    clock_rounds: int = 8
    topology: str = "remote"
    ssl_context: ssl.SSLContext | None = None
    connect_timeout: float = 10.0
    handshake_timeout: float = 30.0
    message_timeout: float = 30.0
    idle_timeout: float = 60.0
    #: stop-copy (the guest stopped for the whole transfer) or precopy (rounds while it runs).
    mode: str = "stop-copy"
    #: The seed's order: the source VM destroyed at capture (stop-copy only; no rollback).
    destroy_first: bool = False
    #: Precopy stops the guest once the dirty set would take no longer than this to send...
    downtime_limit_ns: int = 30_000_000
    #: ... or after this many rounds (round 0, all memory, included).
    max_rounds: int = 10
    #: Not None: ``strategy`` is negotiated after HELLO -- these options' parts
    #: (``"tsc=offset"``, ``""``) laid over the best both hosts support (Strategy.resolve).
    negotiate: str | None = None
    #: The guest's dirtying workload (kvmcore.GuestConfig): bytes/s over ``working_set`` bytes.
    dirty_rate: int = 0
    working_set: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"--mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.destroy_first and self.mode != "stop-copy":
            raise UsageError("--destroy-first is the seed's stop-copy order (the source VM "
                             "destroyed before the transfer): it cannot be combined with "
                             f"--mode {self.mode}")
        if self.downtime_limit_ns <= 0:
            raise UsageError(f"--downtime-limit {format_duration(self.downtime_limit_ns / 1e9)}:"
                             " must be longer than 0")
        if not 1 <= self.max_rounds <= 1000:
            raise UsageError(f"--max-rounds {self.max_rounds}: must be between 1 and 1000 "
                             "(round 0, the whole memory, counts)")
        try:
            self.guest_config()
        except StateError as exc:
            option = {"working_set": "--working-set", "dirty_rate": "--dirty-rate"}.get(
                exc.field, "--memory")
            raise UsageError(f"{option}: {exc.reason}") from None

    @property
    def destination(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def guest_config(self) -> GuestConfig:
        """The source guest: its size, Xen when the strategy restores a runstate, the
        dirtying workload."""
        return dataclasses.replace(self.strategy.guest_config(self.memory_size),
                                   dirty_rate=self.dirty_rate, working_set=self.working_set)


@dataclass
class Migration:
    """Everything a report is made of (report.compose turns it into the stable dict)."""

    plan: MigrationPlan
    source_caps: HostCapabilities
    destination_caps: HostCapabilities
    destination_version: str
    clock: protocol.ClockEstimate
    source: SourceRun
    gap_ns: int
    encode_ns: int
    send_start_realtime_ns: int
    destination: DestinationReport   # the REPORT, validated
    analysis: Analysis
    source_phases: dict[str, int]     # connect, handshake, guest, send, report wait (ns)
    stats: MigrationStats
    #: compare_digest of the source's stopped memory and the REPORT's digest (None: none).
    memory_comparison: MemoryComparison | None


@dataclass
class _Sent:
    """One MIGRATE and its memory, as the source timed it."""

    gap_ns: int
    encode_ns: int
    send_start_realtime_ns: int
    send_ns: int


async def migrate(plan: MigrationPlan, kvm: System, caps: HostCapabilities) -> Migration:
    """Migrate one guest to ``plan``'s destination. Raises ProtocolError & co. while no guest
    exists; once it does, RolledBack (it runs on here) or GuestLost, with the cause."""
    session = protocol.Session("source", plan.psk)
    t_connect = time.perf_counter_ns()
    with trio.fail_after(plan.connect_timeout):
        channel = await protocol.open_channel(
            plan.host, plan.port, session, ssl_context=plan.ssl_context,
            message_timeout=plan.message_timeout, idle_timeout=plan.idle_timeout)
    async with channel:
        t_handshake = time.perf_counter_ns()
        hs = await protocol.source_handshake(
            channel, agent_version=AGENT_VERSION, capabilities=caps.to_plain(),
            clock_rounds=plan.clock_rounds, timeout=plan.handshake_timeout)
        assert hs.clock is not None
        dest_caps = _peer_caps(hs.peer.capabilities)
        # What the destination cannot do is refused now, not after the whole transfer.
        try:
            if plan.negotiate is not None:
                plan = dataclasses.replace(plan, strategy=Strategy.resolve(
                    plan.negotiate, caps, dest_caps))
            plan.strategy.check_pair(caps, dest_caps)
        except Unsupported as exc:
            await channel.bye()
            raise DestinationUnsupported(exc.what) from None
        stats = MigrationStats(plan.mode, plan.destroy_first)
        if plan.mode == "precopy":
            stats.downtime_limit_ns, stats.max_rounds = plan.downtime_limit_ns, plan.max_rounds
        if not plan.destroy_first:
            stats.destination_prepare_ns = await _prepare(channel, plan)
        t_guest = time.perf_counter_ns()
        async with SourceGuest(kvm, plan.guest_config()) as guest:
            try:
                final_runs, t_first = None, None
                if plan.destroy_first:
                    source = await guest.destroy_first(plan.warmup_ns)
                    stats.source_destroy_ns = source.destroy_ns
                elif plan.mode == "stop-copy":
                    source = await guest.warm_up_and_capture(plan.warmup_ns)
                else:
                    source, final_runs, t_first = await precopy(channel, plan, guest, stats)
                t_gap = time.perf_counter_ns()
                sent = await _send_stopped(channel, plan, source, hs.clock, final_runs)
                t_sent = time.perf_counter_ns()
                destination = await _receive_report(channel, plan)
                t_report = time.perf_counter_ns()
            except Exception as exc:
                await _fail(guest, exc, stats)
                raise
            final_bytes = (plan.memory_size if final_runs is None
                           else sum(length for _, length in final_runs))
            stats.add_final(final_bytes, sent.send_ns)
            if not plan.destroy_first:
                stats.source_destroy_ns = await guest.destroy()
            comparison = None
            if destination.memory is not None:
                comparison = await trio.to_thread.run_sync(compare_digest, source.memory,
                                                           destination.memory)
        await channel.bye()
    offset = round(hs.clock.offset_ns)
    stats.total_ns = t_report - t_connect
    # Up to the first memory sent: round 0, or (stop-copy) MIGRATE's.
    stats.setup_ns = (t_sent - sent.send_ns if t_first is None else t_first) - t_connect
    stats.downtime_ns = destination.after.host_realtime_ns - offset - source.stop_realtime_ns
    slack = DEFAULT_SLACK_NS + math.ceil(hs.clock.uncertainty_ns)
    analysis = analyse(source.before, destination.after, source.state,
                       destination.restore_record, clock_offset_ns=offset,
                       slack_ns=slack, uncertainty_ns=math.ceil(hs.clock.uncertainty_ns),
                       requested_gap_ns=plan.gap_ns,
                       hosts_have_xen=caps.xen_runstate and dest_caps.xen_runstate,
                       memory_comparison=comparison,
                       memory_reason=(DIGEST_NOT_COMPUTED if plan.memory_size > DIGEST_MAX_MEMORY
                                      else "the destination's REPORT has no memory digest"))
    source_phases = {"connect_ns": t_handshake - t_connect, "handshake_ns": t_guest - t_handshake,
                     "guest_ns": t_gap - t_guest, "send_ns": sent.send_ns,
                     "report_wait_ns": t_report - t_sent}
    return Migration(plan, caps, dest_caps, hs.peer.agent_version, hs.clock, source,
                     sent.gap_ns, sent.encode_ns, sent.send_start_realtime_ns, destination,
                     analysis, source_phases, stats, comparison)


async def _prepare(channel: protocol.Channel, plan: MigrationPlan) -> int:
    """PREPARE: the destination checks the strategy and makes its VM and memory before the
    source guest exists; what that took there (ns)."""
    await channel.send(protocol.Prepare(str(plan.strategy), plan.memory_size, plan.chunk_size))
    answer = await channel.receive()
    if not isinstance(answer, protocol.Prepared):
        raise PeerReportError(f"expected PREPARED from the destination, got {answer!r:.80}")
    return answer.prepare_ns


async def _fail(guest: SourceGuest, cause: Exception, stats: MigrationStats) -> None:
    """The migration failed before a validated REPORT: resume the source guest (RolledBack)
    or say it is lost (GuestLost); nothing to say while no guest existed yet."""
    if guest.last is None:
        return                      # the guest never ran: the cause is the whole story
    if guest.guest is None:
        raise GuestLost(cause, stats, "the source guest was destroyed before the transfer "
                        "(--destroy-first) and is lost") from cause
    try:
        rollback = await guest.roll_back()
    except KvmError as exc:
        raise GuestLost(cause, stats, f"resuming the source guest failed ({exc}): it is "
                        "lost") from cause
    raise RolledBack(cause, stats, rollback) from cause


async def _send_stopped(channel: protocol.Channel, plan: MigrationPlan, source: SourceRun,
                        clock: protocol.ClockEstimate,
                        runs: list[tuple[int, int]] | None = None) -> _Sent:
    """After the stop: the extra gap, MIGRATE, the memory (zero-copy: the guest is stopped)
    -- all of it, or ``runs`` of it -- and COMMIT."""
    # The clock-sync estimate travels in the state (only this side can make it: it alone
    # has all four timestamps); clock=realtime-synced reads it at the destination.
    source.state = dataclasses.replace(source.state, clock_sync={
        "offset_ns": round(clock.offset_ns), "uncertainty_ns": math.ceil(clock.uncertainty_ns)})
    t_gap = time.perf_counter_ns()
    if plan.gap_ns:
        await trio.sleep(plan.gap_ns / 1e9)
    t_encode = time.perf_counter_ns()
    message = protocol.Migrate(source.state.to_plain(), str(plan.strategy), plan.memory_size,
                               plan.chunk_size,
                               None if runs is None else protocol.pack_runs(runs))
    encode_ns = time.perf_counter_ns() - t_encode
    send_start, t_send = time.time_ns(), time.perf_counter_ns()
    await channel.send(message)
    view = source.memory.view()
    try:
        await channel.send_memory(view)
    finally:
        view.release()              # send_memory leaves no other view behind, however it ended
    return _Sent(t_encode - t_gap, encode_ns, send_start, time.perf_counter_ns() - t_send)


async def _receive_report(channel: protocol.Channel, plan: MigrationPlan) -> DestinationReport:
    report = await channel.receive()
    if not isinstance(report, protocol.Report):
        raise PeerReportError(f"expected REPORT from the destination, got {report!r:.80}")
    return _validate_report(report.report, plan.strategy, plan.memory_size)


def _peer_caps(plain: Any) -> HostCapabilities:
    try:
        return HostCapabilities.from_plain(dict(plain))
    except StateError as exc:
        raise PeerReportError(f"the destination's HELLO capabilities: {exc}") from None


def _validate_report(plain: Any, strategy: Strategy,
                     memory_size: int | None = None) -> DestinationReport:
    """The REPORT, validated field by field before use (the peer may be faulty or hostile);
    the restore it describes must be the one asked for, its memory digest of this memory."""
    try:
        return DestinationReport.from_plain(plain).check_answers(strategy,
                                                                 memory_size=memory_size)
    except StateError as exc:
        raise PeerReportError(f"the destination's REPORT: {exc.field}: {exc.reason}") from None

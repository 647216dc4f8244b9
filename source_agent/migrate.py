"""The source side of one migration, as a coroutine a command or a sweep can call.

Order (why): connect, HELLO/AUTH and clock sync come first, so a refused key or
an unreachable destination costs no VM; then, in one worker thread (every vCPU
ioctl from one thread), the guest is created, warmed up, captured and its VM
destroyed, as the seed does; then the optional extra gap; then MIGRATE, the
memory straight from guest RAM, COMMIT; the REPORT is validated field by field
before anything in it is used, and the analysis runs here, where the snapshot
before, the state and the clock-sync estimate are.
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
    Analysis,
    DestinationReport,
    Guest,
    GuestConfig,
    GuestMemory,
    HostCapabilities,
    Snapshot,
    StateError,
    Strategy,
    Unsupported,
    System,
    VmState,
    analyse,
    capture,
)
from kvmcore.analysis import DEFAULT_SLACK_NS

from agentcore import AGENT_VERSION


class PeerReportError(protocol.RemoteProtocolError):
    """The destination's HELLO capabilities or REPORT failed validation (a peer fault)."""


class DestinationUnsupported(protocol.ProtocolError):
    """The destination's HELLO capabilities lack what the strategy needs: this side's decision,
    made before any guest exists (not a PeerError: the destination said nothing of it)."""

    def __init__(self, what: str) -> None:
        self.what = what
        super().__init__(f"unsupported on the destination host: {what} (its HELLO capabilities)")


@dataclass(frozen=True)
class MigrationPlan:
    """One migration's parameters; a sweep builds one per point."""

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

    @property
    def destination(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass
class SourceRun:
    """What the source guest did before it left: its last report and its state."""

    before: Snapshot
    state: VmState
    memory: GuestMemory       # the guest's, outliving its VM until sent
    warmup_reports: int
    create_ns: int
    destroy_ns: int


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


def run_source_guest(kvm: System, config: GuestConfig, warmup_ns: int) -> SourceRun:
    """Worker thread: create, run for ``warmup_ns`` (at least one report), capture, destroy."""
    with Guest.create(kvm, config) as guest:
        before = guest.run_until_snapshot()
        reports = 1
        deadline = time.perf_counter_ns() + warmup_ns
        while time.perf_counter_ns() < deadline:
            before = guest.run_until_snapshot()
            reports += 1
        state = capture(guest)
        t1 = time.perf_counter_ns()
    return SourceRun(before, state, guest.memory, reports, guest.timings["create"],
                     time.perf_counter_ns() - t1)


async def migrate(plan: MigrationPlan, kvm: System, caps: HostCapabilities) -> Migration:
    """Migrate one guest to ``plan``'s destination; raises ProtocolError & co. on the way."""
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
            plan.strategy.check_host(dest_caps)
        except Unsupported as exc:
            await channel.bye()
            raise DestinationUnsupported(exc.what) from None
        config = GuestConfig(memory_size=plan.memory_size, xen=plan.strategy.runstate == "kernel")
        t_guest = time.perf_counter_ns()
        source = await trio.to_thread.run_sync(run_source_guest, kvm, config, plan.warmup_ns)
        # The clock-sync estimate travels in the state (only this side can make it: it alone
        # has all four timestamps); clock=realtime-synced reads it at the destination.
        source.state = dataclasses.replace(source.state, clock_sync={
            "offset_ns": round(hs.clock.offset_ns),
            "uncertainty_ns": math.ceil(hs.clock.uncertainty_ns)})
        memory = source.memory
        try:
            t_gap = time.perf_counter_ns()
            if plan.gap_ns:
                await trio.sleep(plan.gap_ns / 1e9)
            t_encode = time.perf_counter_ns()
            message = protocol.Migrate(source.state.to_plain(), str(plan.strategy),
                                       plan.memory_size, plan.chunk_size)
            encode_ns = time.perf_counter_ns() - t_encode
            send_start, t_send = time.time_ns(), time.perf_counter_ns()
            await channel.send(message)
            view = memory.view()
            try:
                await channel.send_memory(view)
            finally:
                view.release()
            t_sent = time.perf_counter_ns()
            report = await channel.receive()
            t_report = time.perf_counter_ns()
        finally:
            memory.close()  # send_memory leaves no view of it behind, however it ended
        if not isinstance(report, protocol.Report):
            raise PeerReportError(f"expected REPORT from the destination, got {report!r:.80}")
        await channel.bye()
    destination = _validate_report(report.report, plan.strategy)
    offset = round(hs.clock.offset_ns)
    slack = DEFAULT_SLACK_NS + math.ceil(hs.clock.uncertainty_ns)
    analysis = analyse(source.before, destination.after, source.state,
                       destination.restore_record, clock_offset_ns=offset,
                       slack_ns=slack, uncertainty_ns=math.ceil(hs.clock.uncertainty_ns),
                       requested_gap_ns=plan.gap_ns,
                       hosts_have_xen=caps.xen_runstate and dest_caps.xen_runstate)
    source_phases = {"connect_ns": t_handshake - t_connect, "handshake_ns": t_guest - t_handshake,
                     "guest_ns": t_gap - t_guest, "send_ns": t_sent - t_send,
                     "report_wait_ns": t_report - t_sent}
    return Migration(plan, caps, dest_caps, hs.peer.agent_version, hs.clock, source,
                     t_encode - t_gap, encode_ns, send_start, destination, analysis,
                     source_phases)


def _peer_caps(plain: Any) -> HostCapabilities:
    try:
        return HostCapabilities.from_plain(dict(plain))
    except StateError as exc:
        raise PeerReportError(f"the destination's HELLO capabilities: {exc}") from None


def _validate_report(plain: Any, strategy: Strategy) -> DestinationReport:
    """The REPORT, validated field by field before use (the peer may be faulty or hostile);
    the restore it describes must be the one asked for."""
    try:
        return DestinationReport.from_plain(plain).check_answers(strategy)
    except StateError as exc:
        raise PeerReportError(f"the destination's REPORT: {exc.field}: {exc.reason}") from None

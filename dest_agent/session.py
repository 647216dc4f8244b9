"""One destination session: everything a single connection may make this host do.

Order matters for security: nothing is allocated and no VM exists until the
source has proved the key (``protocol.destination_handshake``); guest memory is
allocated only for a MIGRATE within ``Limits.max_memory_size`` whose state and
strategy kvmcore has checked against this host (the one check: restore() trusts it). The VM lives only
inside one worker thread call (restore, run until the guest's first report,
close), so every vCPU ioctl comes from one thread and no exit path -- error,
disconnect, cancellation -- can leave it open: trio waits for the thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

import protocol
from kvmcore import (
    DestinationPhases,
    DestinationReport,
    GuestMemory,
    HostCapabilities,
    KvmError,
    RestorePlan,
    RestoreRecord,
    Snapshot,
    StateError,
    Strategy,
    StrategyError,
    System,
    Unsupported,
    VmState,
    restore,
)


@dataclass
class Counters:
    """Live and total figures of a server, readable in-process (tests, soak runs)."""

    live_sessions: int = 0             # open connections, authenticated or not
    live_unauthenticated: int = 0      # ... of which have not proved the key yet
    live_vms: int = 0
    sessions: int = 0
    migrations: int = 0
    vms_created: int = 0
    refused_busy: int = 0              # authenticated beyond --max-sessions
    refused_unauthenticated: int = 0   # beyond --max-unauthenticated(-per-address)
    failed_sessions: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str, delta: int = 1) -> None:
        """Thread-safe: VMs are counted from the worker thread that owns them."""
        with self._lock:
            setattr(self, name, getattr(self, name) + delta)


@dataclass(frozen=True)
class SessionConfig:
    """What every session of one server shares."""

    psk: bytes
    limits: protocol.Limits
    agent_version: str
    handshake_timeout: float = 10.0
    idle_timeout: float = 60.0
    message_timeout: float = 30.0
    max_run_time: float = 10.0


class SessionRefused(Exception):
    """This side refuses the MIGRATE (bad state, unsupported strategy): the peer gets ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


async def run_session(stream: trio.abc.Stream, kvm: System, caps: HostCapabilities,
                      config: SessionConfig, counters: Counters,
                      admit: Callable[[], None]) -> str:
    """Serve one connection to its end; returns the outcome for the log line.

    ``admit`` is called once the source has proved the key and raises SessionRefused
    (``busy``) when there is no room: only key holders count against the session
    limit, so strangers cannot keep them out.

    Raises only for this side's own bugs (after telling the peer "internal");
    everything the peer or the network can cause ends here as an outcome.
    """
    session = protocol.Session("destination", config.psk, limits=config.limits)
    async with protocol.Channel(stream, session, idle_timeout=config.idle_timeout,
                                message_timeout=config.message_timeout) as channel:
        migrations = 0
        try:
            await protocol.destination_handshake(
                channel, agent_version=config.agent_version, capabilities=caps.to_plain(),
                timeout=config.handshake_timeout)
            admit()
            while isinstance(message := await channel.receive(), protocol.Migrate):
                await _migration(channel, message, kvm, caps, counters, config.max_run_time)
                migrations += 1
            return f"done, {migrations} migration(s)"
        except SessionRefused as exc:
            await channel.send_error(protocol.Error(exc.code, str(exc)))
            return f"refused {exc.code}: {exc}"
        except protocol.ProtocolError as exc:
            # The channel has told the peer already where it was at fault.
            return f"ended after {migrations} migration(s): {type(exc).__name__}: {exc}"
        except Exception as exc:
            await channel.send_error(exc)
            raise


async def _migration(channel: protocol.Channel, migrate: protocol.Migrate, kvm: System,
                     caps: HostCapabilities, counters: Counters, max_run_time: float) -> None:
    """MIGRATE received: check it, then memory, COMMIT, restore and run, REPORT."""
    t_migrate, rt_migrate = time.perf_counter_ns(), time.time_ns()
    plan = _check(migrate, caps)                          # refused before any memory exists
    t_checked = time.perf_counter_ns()
    memory = GuestMemory.allocate(migrate.memory_size)    # within Limits.max_memory_size
    try:
        view = memory.view()
        try:
            await channel.receive_memory(view)            # COMMIT tag checked
        finally:
            view.release()
        t_commit, rt_commit = time.perf_counter_ns(), time.time_ns()
        after, record, close_ns = await trio.to_thread.run_sync(
            _restore_and_run, kvm, plan, memory, counters, max_run_time)
    finally:
        memory.close()  # receive_memory leaves no view of it behind, however it ended
    counters.add("migrations")
    phases = DestinationPhases(validate_ns=t_checked - t_migrate, receive_ns=t_commit - t_checked,
                               close_ns=close_ns, migrate_realtime_ns=rt_migrate,
                               commit_realtime_ns=rt_commit)
    await channel.send(protocol.Report(DestinationReport(after, record, phases).to_plain()))


def _check(migrate: protocol.Migrate, caps: HostCapabilities) -> RestorePlan:
    """kvmcore's checks of the peer's state and strategy against this host, once, at
    MIGRATE (before any guest memory exists), mapped to ERROR codes."""
    if migrate.runs is not None:
        # Part of the memory would stay zero: only a precopy destination, which keeps the
        # earlier rounds, may take runs (none does yet).
        raise SessionRefused("unsupported", "MIGRATE with runs (part of the memory): this "
                             "destination restores only a whole memory (stop-and-copy)")
    try:
        strategy = Strategy.parse_exact(migrate.strategy)
    except StrategyError as exc:
        raise SessionRefused("bad_strategy", str(exc)) from None
    try:
        strategy.check_host(caps)
        state = VmState.from_plain(dict(migrate.state))
        if state.memory_size != migrate.memory_size:
            raise StateError("memory_size", f"{state.memory_size:#x} but MIGRATE announces "
                             f"{migrate.memory_size:#x} bytes of memory")
        return strategy.check(caps, state)
    except Unsupported as exc:
        raise SessionRefused("unsupported", str(exc)) from None
    except StateError as exc:
        raise SessionRefused("bad_state", str(exc)) from None


def _restore_and_run(kvm: System, plan: RestorePlan, memory: GuestMemory, counters: Counters,
                     max_run_time: float) -> tuple[Snapshot, RestoreRecord, int]:
    """In one worker thread: the VM's whole life. KvmError becomes ERROR restore_failed."""
    try:
        guest = restore(kvm, plan, memory)
    except KvmError as exc:
        raise SessionRefused("restore_failed", str(exc)) from None
    counters.add("vms_created")
    counters.add("live_vms")
    try:
        # Bounded: a guest that never reports (code of the peer's choosing) is kicked out.
        after = guest.run_until_snapshot(timeout=max_run_time)
    except KvmError as exc:
        raise SessionRefused("restore_failed", f"restored guest: {exc}") from None
    finally:
        t0 = time.perf_counter_ns()
        guest.close()
        counters.add("live_vms", -1)
    assert guest.restore_record is not None
    return after, guest.restore_record, time.perf_counter_ns() - t0

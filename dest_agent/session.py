"""One destination session: everything a single connection may make this host do.

Order matters for security: nothing is allocated and no VM exists until the
source has proved the key (``protocol.destination_handshake``); guest memory is
allocated only for a PREPARE (or a MIGRATE, in the seed's order) within
``Limits.max_memory_size`` whose strategy kvmcore has checked against this host;
a state is restored only once kvmcore has checked it (the one check: restore()
trusts it).

A prepared VM lives in its own thread (kvmcore.VcpuThread: every vCPU ioctl
from one thread) from PREPARE -- memory allocated, VM created, off the downtime
path -- through the precopy ROUNDs received straight into its memory, to the
MIGRATE that restores into it, its first report, and its close. `Preparation`
owns the three (memory, VM, thread) and releases them on every exit path --
ERROR, disconnect, BYE in PREPARED, cancellation: trio waits for the thread.
A MIGRATE from READY (``--destroy-first``) is the seed's flow: the VM lives only
inside one worker thread call.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

import protocol
from kvmcore import (
    DIGEST_MAX_MEMORY,
    DestinationPhases,
    DestinationReport,
    Guest,
    GuestMemory,
    HostCapabilities,
    KvmError,
    MemoryDigest,
    RestorePlan,
    RestoreRecord,
    Snapshot,
    StateError,
    Strategy,
    StrategyError,
    System,
    Unsupported,
    VcpuThread,
    VmState,
    prepare,
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
            while not isinstance(message := await channel.receive(), protocol.Bye):
                if isinstance(message, protocol.Prepare):
                    if not await _prepared_migration(channel, message, kvm, caps, counters,
                                                     config.max_run_time):
                        return f"done, {migrations} migration(s); a preparation given up (BYE)"
                else:                           # MIGRATE from READY: the seed's order
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
    """MIGRATE from READY (the seed's order): check it, then memory, COMMIT, restore and
    run, REPORT."""
    t_migrate, rt_migrate = time.perf_counter_ns(), time.time_ns()
    if migrate.runs is not None:
        # Part of the memory would stay zero: only a prepared destination, which has the
        # earlier rounds, may take runs.
        raise SessionRefused("unsupported", "MIGRATE with runs (part of the memory) without a "
                             "PREPARE: only a prepared destination, which has received the "
                             "whole memory in a ROUND, takes part of it")
    plan = _check(migrate, _strategy(migrate.strategy, caps), caps)   # before any memory
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
        await _report(channel, counters, memory, after, record, validate_ns=t_checked - t_migrate,
                      receive_ns=t_commit - t_checked, close_ns=close_ns,
                      migrate_realtime_ns=rt_migrate, commit_realtime_ns=rt_commit)
    finally:
        memory.close()  # receive_memory leaves no view of it behind, however it ended


#: madvise(2) advice (Linux 5.14): fault the range in, writable, as a write to each page would.
MADV_POPULATE_WRITE = 23
_libc = ctypes.CDLL(None)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def populate(memory: GuestMemory) -> bool:
    """Fault all of a prepared memory in now, at PREPARE, off the downtime path (best effort);
    whether it was.

    Fresh anonymous memory is allocated and zeroed by the kernel at its first write, which
    would otherwise be the receive's: for 256 MiB (huge pages) about 45 ms of the
    destination's CPU inside the transfer, and so inside a stop-copy downtime. (ctypes drops
    the GIL meanwhile: other sessions run on.) A kernel without the advice (EINVAL), or
    short of memory now, leaves it to the receive, as before.
    """
    return _libc.madvise(memory.address, memory.size, MADV_POPULATE_WRITE) == 0


class Preparation:
    """PREPARE's memory, VM and their thread, held until the migration ends however it ends:
    ``async with`` closes the VM in its thread, then the memory, then joins the thread."""

    def __init__(self, kvm: System, strategy: Strategy, memory_size: int,
                 counters: Counters) -> None:
        self.kvm, self.strategy, self.counters = kvm, strategy, counters
        self.config = strategy.guest_config(memory_size)
        self.thread = VcpuThread("dest-vcpu")
        self.memory: GuestMemory | None = None
        self.guest: Guest | None = None

    async def __aenter__(self) -> Preparation:
        try:
            self.memory = GuestMemory.allocate(self.config.memory_size)   # within the limits
            self.guest = await self.thread.acall(self._prepare)
        except BaseException:
            await self.__aexit__()
            raise
        return self

    def _prepare(self) -> Guest:
        assert self.memory is not None
        populate(self.memory)
        try:
            guest = prepare(self.kvm, self.config, self.memory)
        except KvmError as exc:
            raise SessionRefused("restore_failed", f"preparing the VM: {exc}") from None
        self.counters.add("vms_created")
        self.counters.add("live_vms")
        return guest

    def close_vm(self) -> int:
        """In the thread: destroy the VM (idempotent); how long it took (ns)."""
        t0 = time.perf_counter_ns()
        guest, self.guest = self.guest, None
        if guest is not None:
            guest.close()
            self.counters.add("live_vms", -1)
        return time.perf_counter_ns() - t0

    async def __aexit__(self, *exc: object) -> None:
        try:
            with trio.CancelScope(shield=True):     # the VM closes even when cancelled
                await self.thread.acall(self.close_vm)
        finally:
            if self.memory is not None:
                self.memory.close()
            self.thread.close()


async def _prepared_migration(channel: protocol.Channel, message: protocol.Prepare,
                              kvm: System, caps: HostCapabilities, counters: Counters,
                              max_run_time: float) -> bool:
    """PREPARE: the strategy checked, memory and VM made, PREPARED; then precopy ROUNDs
    straight into that memory; then MIGRATE (restore into the prepared VM, run to the first
    report, REPORT) -- True -- or BYE (the source gave up) -- False."""
    t_prepare = time.perf_counter_ns()
    strategy = _strategy(message.strategy, caps)          # refused before any memory exists
    async with Preparation(kvm, strategy, message.memory_size, counters) as prepared:
        assert prepared.memory is not None
        prepare_ns = time.perf_counter_ns() - t_prepare
        await channel.send(protocol.Prepared(prepare_ns))
        rounds_ns = 0
        while isinstance(message := await channel.receive(), protocol.Round):
            t_round = time.perf_counter_ns()
            view = prepared.memory.view()
            try:
                await channel.receive_memory(view)
            finally:
                view.release()
            rounds_ns += time.perf_counter_ns() - t_round
        if isinstance(message, protocol.Bye):
            return False
        assert isinstance(message, protocol.Migrate)     # the session's state table
        t_migrate, rt_migrate = time.perf_counter_ns(), time.time_ns()
        whole = channel.session.prepared is not None and channel.session.prepared.whole_memory_sent
        if message.runs is not None and not whole:
            raise SessionRefused("bad_state", "MIGRATE with runs (part of the memory) before a "
                                 "ROUND of the whole memory: the rest would stay zero")
        if message.strategy != str(strategy):
            raise SessionRefused("bad_strategy", f"MIGRATE's strategy {message.strategy!r} is "
                                 f"not the prepared {str(strategy)!r}")
        plan = _check(message, strategy, caps)
        t_checked = time.perf_counter_ns()
        view = _final_sink(prepared.memory)
        try:
            await channel.receive_memory(view)
        finally:
            view.release()
        t_commit, rt_commit = time.perf_counter_ns(), time.time_ns()
        after, record, close_ns = await prepared.thread.acall(
            _restore_into, prepared, plan, max_run_time)
        await _report(channel, counters, prepared.memory, after, record,
                      validate_ns=t_checked - t_migrate, receive_ns=t_commit - t_checked,
                      close_ns=close_ns, migrate_realtime_ns=rt_migrate,
                      commit_realtime_ns=rt_commit, prepare_ns=prepare_ns,
                      rounds_receive_ns=rounds_ns)
    return True


async def _report(channel: protocol.Channel, counters: Counters, memory: GuestMemory,
                  after: Snapshot, record: RestoreRecord, **phases: int) -> None:
    """The guest ran on here: its memory's digest (off the downtime path, the VM closed),
    then the REPORT with the destination's phases -- the one REPORT both paths send."""
    digest, verify_ns = await trio.to_thread.run_sync(_digest, memory)
    counters.add("migrations")
    report = DestinationReport(after, record, DestinationPhases(**phases, verify_ns=verify_ns),
                               digest)
    await channel.send(protocol.Report(report.to_plain()))


def _final_sink(memory: GuestMemory) -> memoryview:
    """Where MIGRATE's memory goes: into the prepared memory. (A test-only hook: a test
    replaces this to play a destination that drops the last dirty set, which memory_intact
    must then fail.)"""
    return memory.view()


def _strategy(text: str, caps: HostCapabilities) -> Strategy:
    """The strategy a PREPARE or MIGRATE names, parsed and checked against this host."""
    try:
        strategy = Strategy.parse_exact(text)
    except StrategyError as exc:
        raise SessionRefused("bad_strategy", str(exc)) from None
    try:
        strategy.check_host(caps)
    except Unsupported as exc:
        raise SessionRefused("unsupported", str(exc)) from None
    return strategy


def _check(migrate: protocol.Migrate, strategy: Strategy, caps: HostCapabilities) -> RestorePlan:
    """kvmcore's checks of the peer's state against this host and the strategy, once, at
    MIGRATE (before any memory of it is received), mapped to ERROR codes."""
    try:
        state = VmState.from_plain(dict(migrate.state))
        if state.memory_size != migrate.memory_size:
            raise StateError("memory_size", f"{state.memory_size:#x} but MIGRATE announces "
                             f"{migrate.memory_size:#x} bytes of memory")
        return strategy.check(caps, state)
    except Unsupported as exc:
        raise SessionRefused("unsupported", str(exc)) from None
    except StateError as exc:
        raise SessionRefused("bad_state", str(exc)) from None


def _digest(memory: GuestMemory) -> tuple[MemoryDigest | None, int]:
    """The memory's digest for the REPORT (None above kvmcore's cap), and what it took."""
    t0 = time.perf_counter_ns()
    digest = MemoryDigest.of(memory) if memory.size <= DIGEST_MAX_MEMORY else None
    return digest, time.perf_counter_ns() - t0


def _run_to_first_report(guest: Guest, max_run_time: float) -> Snapshot:
    # Bounded: a guest that never reports (code of the peer's choosing) is kicked out.
    try:
        return guest.run_until_snapshot(timeout=max_run_time)
    except KvmError as exc:
        raise SessionRefused("restore_failed", f"restored guest: {exc}") from None


def _restore_into(prepared: Preparation, plan: RestorePlan, max_run_time: float
                  ) -> tuple[Snapshot, RestoreRecord, int]:
    """In the prepared VM's thread: restore into it, run to the first report, close it."""
    assert prepared.guest is not None and prepared.memory is not None
    try:
        guest = restore(prepared.kvm, plan, prepared.memory, prepared=prepared.guest)
        after = _run_to_first_report(guest, max_run_time)
    except StateError as exc:       # the state does not fit the VM prepared for it
        raise SessionRefused("bad_state", str(exc)) from None
    except KvmError as exc:
        raise SessionRefused("restore_failed", str(exc)) from None
    finally:
        close_ns = prepared.close_vm()
    assert guest.restore_record is not None
    return after, guest.restore_record, close_ns


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
        after = _run_to_first_report(guest, max_run_time)
    finally:
        t0 = time.perf_counter_ns()
        guest.close()
        counters.add("live_vms", -1)
    assert guest.restore_record is not None
    return after, guest.restore_record, time.perf_counter_ns() - t0

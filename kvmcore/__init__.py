"""kvmcore: run a real KVM guest from Python and carry its state, clock and TSC across a migration.

The only code in the testbed that touches /dev/kvm. Public API::

    from kvmcore import (System, probe, HostCapabilities, GuestConfig, Guest, Snapshot,
                         GuestMemory, VmState, Strategy, capture, restore, analyse,
                         KvmError, KvmIoctlError, Unsupported, StateError)

    with System() as kvm:
        caps = probe(kvm)                      # HostCapabilities; caps.to_plain()
        with Guest.create(kvm, GuestConfig(memory_size=2 << 20, xen=False)) as g:
            before = g.run_until_snapshot()    # Snapshot
            state = capture(g)                 # VmState (no memory: g.memory outlives g)
        plain = state.to_plain()               # msgpack-ready; the memory travels apart
        state2 = VmState.from_plain(plain)                  # validates; StateError
        plan = Strategy.best(caps, state2).check(caps, state2)  # or Strategy.resolve(...)
        mem = GuestMemory.allocate(state2.memory_size)      # only once the plan stands
        mem.write(0, g.memory.read(0, mem.size))            # or mem.view()[a:b] = chunk
        with restore(kvm, plan, mem) as g2:                 # Guest, resumed (not restarted)
            after = g2.run_until_snapshot()
            result = analyse(before, after, state2, g2.restore_record)
            result.to_plain()

The destination answers with a DestinationReport (the REPORT: ``after``, the
RestoreRecord, its phases; ``to_plain``/``from_plain`` like VmState). Lower level:
System / Vm / Vcpu (one method per ioctl), dirty logging (Guest.start_dirty_log,
dirty_bitmap -> DirtyBitmap, dirty_runs), compare_memory and the REPORT's
MemoryDigest / compare_digest (kvmcore.intact), kvmcore.xen (Xen ioctl argument packing,
the typed Runstate). Live migration: VcpuThread (one thread owns a guest), LiveRun (the
source guest running while its memory is sent), prepare + restore(..., prepared=). Per-phase timings: Guest.timings, VmState.timings,
RestoreRecord.timings / restore_ns, the first entry as ``after.host_run_ns``. See
docs/kvmcore.md.
"""

from __future__ import annotations

from ._layout import HUGE_PAGE, MAX_MEMORY, MIN_MEMORY, memory_size_problem
from .analysis import Analysis, Check, Measurement, analyse
from .caps import HostCapabilities, probe
from .deadline import install_kick_handler
from .dirty import DirtyBitmap
from .errors import (GuestError, GuestMemoryError, GuestTimeout, KvmError, KvmIoctlError,
                     ShortMsrAccess, StateError, StrategyError, Unsupported)
from .guest import Guest, GuestConfig
from .intact import (DIGEST_MAX_MEMORY, DIGEST_NOT_COMPUTED, MemoryComparison, MemoryDigest,
                     PageMismatch, compare_digest, compare_memory)
from .live import LiveRun
from .memory import GuestMemory
from .migrate import capture, prepare, restore
from .report_doc import DestinationPhases, DestinationReport, RestoreRecord
from .strategy import RestorePlan, Strategy
from .snapshot import Pvclock, Snapshot
from .state import VmState
from .system import System
from .vcpu import Vcpu
from .vcpu_thread import VcpuThread
from .vm import Vm

__all__ = [
    "HUGE_PAGE", "MAX_MEMORY", "MIN_MEMORY", "memory_size_problem",
    "Analysis", "Check", "DestinationPhases", "DirtyBitmap", "MemoryComparison", "PageMismatch",
    "DIGEST_MAX_MEMORY", "DIGEST_NOT_COMPUTED", "LiveRun", "MemoryDigest", "VcpuThread",
    "compare_digest", "compare_memory", "prepare", "DestinationReport", "Guest", "GuestConfig", "GuestError", "GuestMemory", "GuestMemoryError",
    "GuestTimeout", "ShortMsrAccess",
    "HostCapabilities", "KvmError", "KvmIoctlError", "Measurement", "Pvclock",
    "RestorePlan", "RestoreRecord", "Snapshot", "StateError", "Strategy", "StrategyError", "System", "Unsupported", "Vcpu",
    "Vm", "VmState", "analyse", "capture", "install_kick_handler", "probe", "restore",
]

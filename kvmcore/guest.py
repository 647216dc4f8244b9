"""The guest program, running: a one-vCPU VM in 64-bit long mode with identity paging.

The host prepares what firmware would (page tables, GDT, long-mode control
registers, CPUID), the same way the KVM selftests do in
tools/testing/selftests/kvm/lib/x86/processor.c; the guest program
(kvmcore/guest_program/) does the rest itself.
"""

from __future__ import annotations

import contextlib
import struct
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any

from . import xen
from ._kvm import lib
from ._layout import HUGE_PAGE, memory_size_problem
from .deadline import RunDeadline
from .dirty import PAGE_SIZE, DirtyBitmap
from .errors import GuestError, GuestTimeout, StateError, Unsupported
from .memory import GuestMemory
from .snapshot import Snapshot
from .vcpu import EXIT_NAMES

if TYPE_CHECKING:
    from .report_doc import RestoreRecord
    from .system import System
    from .vcpu import Vcpu
    from .vm import Vm

PAGE_PRESENT, PAGE_WRITE, PAGE_HUGE = 1 << 0, 1 << 1, 1 << 7
CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1, 1 << 1, 1 << 4, 1 << 5, 1 << 16, 1 << 31
CR4_PAE = 1 << 5
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
GDT_CODE64 = 0x00AF9B000000FFFF   # present, DPL0, execute/read, L=1, G=1
GDT_DATA = 0x00CF93000000FFFF     # present, DPL0, read/write, D/B=1, G=1
SEL_CODE, SEL_DATA = 0x08, 0x10
RFLAGS_RESERVED = 1 << 1
#: The one memory slot: all of guest RAM from guest-physical 0.
MEMORY_SLOT = 0

_image: bytes | None = None
_boot_pages: bytes | None = None


def guest_image() -> bytes:
    """guest.bin, built from kvmcore/guest_program/ by setup.py."""
    global _image
    if _image is None:
        _image = (resources.files("kvmcore") / "guest.bin").read_bytes()
    return _image


def boot_pages() -> bytes:
    """Guest memory from KVMCORE_PML4_GPA to the end of the GDT page: identity map of
    the first GiB with 2 MiB pages (PML4[0] -> PDPT[0] -> PD) and a flat GDT."""
    global _boot_pages
    if _boot_pages is None:
        pml4 = struct.pack("<Q", lib.KVMCORE_PDPT_GPA | PAGE_PRESENT | PAGE_WRITE)
        pdpt = struct.pack("<Q", lib.KVMCORE_PD_GPA | PAGE_PRESENT | PAGE_WRITE)
        pd = struct.pack("<512Q", *(i * HUGE_PAGE | PAGE_PRESENT | PAGE_WRITE | PAGE_HUGE
                                    for i in range(512)))
        gdt = struct.pack("<3Q", 0, GDT_CODE64, GDT_DATA)
        pages = bytearray(lib.KVMCORE_GDT_GPA + 0x1000 - lib.KVMCORE_PML4_GPA)
        for gpa, data in ((lib.KVMCORE_PML4_GPA, pml4), (lib.KVMCORE_PDPT_GPA, pdpt),
                          (lib.KVMCORE_PD_GPA, pd), (lib.KVMCORE_GDT_GPA, gdt)):
            offset = gpa - lib.KVMCORE_PML4_GPA
            pages[offset:offset + len(data)] = data
        _boot_pages = bytes(pages)
    return _boot_pages


def clocks_ns() -> tuple[int, int]:
    return time.clock_gettime_ns(time.CLOCK_REALTIME), time.monotonic_ns()


@dataclass(frozen=True)
class GuestConfig:
    """The guest's shape; both ends of a migration must agree on it."""

    memory_size: int = 2 << 20
    xen: bool = False        # configure KVM Xen emulation (shared_info + runstate area)
    #: The dirtying workload (abi.h struct kvmcore_config), written into guest memory
    #: before the first entry, so a restored guest carries it: bytes per second of
    #: kvmclock time over ``working_set`` bytes from KVMCORE_WORKSET_GPA. 0 = none.
    dirty_rate: int = 0
    working_set: int = 0

    def __post_init__(self) -> None:
        problem = memory_size_problem(self.memory_size)
        if problem:
            raise StateError("memory_size", problem)
        room = self.memory_size - lib.KVMCORE_WORKSET_GPA
        if self.working_set % PAGE_SIZE or not 0 <= self.working_set <= room:
            raise StateError("working_set", f"{self.working_set:#x} is not a multiple of "
                             f"{PAGE_SIZE:#x} in [0, {room:#x}] (memory above "
                             f"{lib.KVMCORE_WORKSET_GPA:#x})")
        if not 0 <= self.dirty_rate <= lib.KVMCORE_DIRTY_RATE_MAX:
            raise StateError("dirty_rate", f"{self.dirty_rate} is not in "
                             f"[0, {lib.KVMCORE_DIRTY_RATE_MAX}] bytes/s")
        if self.dirty_rate and not self.working_set:
            raise StateError("dirty_rate", "a dirty rate needs a working_set to write")


@dataclass
class Guest:
    """A running guest: its VM, vCPU and memory. Closing destroys the VM, not the memory
    (a captured VmState still refers to it)."""

    vm: Vm
    vcpu: Vcpu
    memory: GuestMemory
    config: GuestConfig
    #: The MSRs KVM_GET/SET_MSRS handle on this host (what capture may read).
    msr_indices: frozenset[int] = frozenset()
    timings: dict[str, int] = field(default_factory=dict)   # phase -> ns
    #: What restore() did, set by restore() (None: a fresh guest). The guest never writes
    #: it: its first entry is the host bracket of its first Snapshot.
    restore_record: RestoreRecord | None = None
    last_snapshot: Snapshot | None = None
    #: Dirty logging on the memory slot: None off, else whether KVM_CLEAR_DIRTY_LOG
    #: (manual protect) re-arms it rather than KVM_GET_DIRTY_LOG itself.
    dirty_log_manual: bool | None = None
    _manual_protect: bool = field(default=False, repr=False)   # what the VM has enabled

    @classmethod
    def create(cls, kvm: System, config: GuestConfig) -> Guest:
        """A new VM running the guest program from its first instruction."""
        t0 = time.perf_counter_ns()
        memory = GuestMemory.allocate(config.memory_size)
        guest = cls.with_memory(kvm, config, memory)
        t1 = time.perf_counter_ns()
        try:
            guest._load_program()
        except BaseException:
            guest.close()
            raise
        guest.timings.update(create=t1 - t0, setup=time.perf_counter_ns() - t1)
        return guest

    @classmethod
    def with_memory(cls, kvm: System, config: GuestConfig, memory: GuestMemory) -> Guest:
        """VM + memory slot + vCPU with CPUID (+ Xen config): what both a fresh and a
        restored guest need before their registers are set."""
        if config.xen:
            require_xen(kvm)
        vm = kvm.create_vm()
        try:
            vm.set_user_memory_region(MEMORY_SLOT, 0, memory.size, memory.address)
            vcpu = vm.create_vcpu(0)
            # Long mode needs CPUID.LM: KVM refuses EFER.LME without it.
            vcpu.set_cpuid2(kvm.cpuid())
            if config.xen:
                configure_xen(vm, vcpu)
        except BaseException:
            vm.close()
            raise
        return cls(vm, vcpu, memory, config, msr_indices=kvm.msr_indices())

    def _load_program(self) -> None:
        self.memory.write(lib.KVMCORE_CODE_GPA, guest_image())
        self.memory.write(lib.KVMCORE_PML4_GPA, boot_pages())
        config = self.memory.cast("struct kvmcore_config *", lib.KVMCORE_CONFIG_GPA)
        config.dirty_rate, config.working_set = self.config.dirty_rate, self.config.working_set

        sregs = self.vcpu.get_sregs()     # keep reset values for TR and LDT
        sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
        sregs.cr4 = CR4_PAE
        sregs.cr3 = lib.KVMCORE_PML4_GPA
        sregs.efer = EFER_LME | EFER_LMA
        sregs.gdt.base, sregs.gdt.limit = lib.KVMCORE_GDT_GPA, 3 * 8 - 1
        _flat_segment(sregs.cs, SEL_CODE, seg_type=11, long_mode=True)
        for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
            _flat_segment(seg, SEL_DATA, seg_type=3, long_mode=False)
        self.vcpu.set_sregs(sregs)

        regs = self.vcpu.get_regs()
        regs.rip, regs.rsp, regs.rflags = (lib.KVMCORE_CODE_GPA, lib.KVMCORE_STACK_TOP,
                                           RFLAGS_RESERVED)
        self.vcpu.set_regs(regs)

    # --- dirty logging on the memory slot (what pre-copy re-sends) ---

    def start_dirty_log(self, manual_protect: bool = False) -> None:
        """Log the guest's writes to its memory (KVM_SET_USER_MEMORY_REGION with
        KVM_MEM_LOG_DIRTY_PAGES on the one slot). ``manual_protect``: enable
        KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 first, so reading the log does not re-protect
        pages and dirty_bitmap() clears what it read with KVM_CLEAR_DIRTY_LOG (KVM then
        write-protects only the pages read, not the whole slot under one lock)."""
        if manual_protect != self._manual_protect:
            bits = self.vm.check_extension(lib.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
            if not bits & lib.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
                raise Unsupported("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2")
            # VM-wide and sticky: turned off again (args 0) for a later automatic log.
            self.vm.enable_cap(lib.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                               lib.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE if manual_protect else 0)
            self._manual_protect = manual_protect
        self._set_slot_flags(lib.KVM_MEM_LOG_DIRTY_PAGES)
        self.dirty_log_manual = manual_protect

    def stop_dirty_log(self) -> None:
        """Stop logging (the slot's flags back to 0); the log's contents are dropped."""
        self._set_slot_flags(0)
        self.dirty_log_manual = None

    def dirty_bitmap(self) -> DirtyBitmap:
        """The pages written since logging started or since the last call, and re-arm:
        the next call sees only later writes."""
        if self.dirty_log_manual is None:
            raise GuestError("dirty logging is off: start_dirty_log() first")
        dirty = self.vm.get_dirty_log(MEMORY_SLOT, self.memory.size // PAGE_SIZE)
        if self.dirty_log_manual and len(dirty):
            self.vm.clear_dirty_log(dirty)
        return dirty

    def dirty_runs(self) -> list[tuple[int, int]]:
        """dirty_bitmap() as page-aligned ``(offset, length)`` runs of guest memory,
        the form of MIGRATE ``runs`` (protocol.pack_runs)."""
        return self.dirty_bitmap().runs()

    def _set_slot_flags(self, flags: int) -> None:
        self.vm.set_user_memory_region(MEMORY_SLOT, 0, self.memory.size, self.memory.address,
                                       flags)

    def report_page(self) -> Any:
        return self.memory.cast("struct kvmcore_report *", lib.KVMCORE_REPORT_GPA)

    def run_until_snapshot(self, timeout: float | None = None) -> Snapshot:
        """Run until the guest's next report and return it. The `out` stays pending until
        the next KVM_RUN (or capture) completes it. With ``timeout`` (seconds), a guest
        that has not reported by then is kicked out of KVM_RUN and GuestTimeout raised
        (needs install_kick_handler(); see kvmcore.deadline)."""
        entry_realtime = time.clock_gettime_ns(time.CLOCK_REALTIME)
        t0 = time.perf_counter_ns()
        vcpu = self.vcpu
        with contextlib.ExitStack() as stack:
            deadline = (stack.enter_context(RunDeadline(vcpu.run_struct, timeout))
                        if timeout is not None else None)
            while True:
                reason = vcpu.run()
                if reason == lib.KVM_EXIT_IO:
                    io = vcpu.io_exit()
                    if io.out and io.port == lib.KVMCORE_REPORT_PORT:
                        break
                    raise GuestError(f"unexpected port I/O: {io}")
                if reason != lib.KVM_EXIT_INTR:
                    raise GuestError(
                        f"unexpected exit {EXIT_NAMES.get(reason, reason)} at rip "
                        f"{vcpu.get_regs().rip:#x}; exit data {vcpu.exit_detail().hex()}")
                if deadline is not None and deadline.expired:
                    raise GuestTimeout(f"the guest did not report within {timeout:g} s "
                                       f"(rip {vcpu.get_regs().rip:#x})")
                # Any other signal: just re-enter.
        realtime, monotonic = clocks_ns()
        elapsed = time.perf_counter_ns() - t0
        self.timings["run"] = elapsed
        report = self.report_page()
        if report.magic != lib.KVMCORE_REPORT_MAGIC:
            raise GuestError(f"report page magic {report.magic:#x} is not "
                             f"{lib.KVMCORE_REPORT_MAGIC:#x}")
        snap = Snapshot.from_report(report, entry_realtime, realtime, monotonic)
        if (io.data and int.from_bytes(io.data, "little") != snap.sequence & 0xFFFFFFFF):
            raise GuestError(f"port value {io.data.hex()} does not match sequence "
                             f"{snap.sequence}")
        self.last_snapshot = snap
        return snap

    def close(self) -> None:
        self.vm.close()

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _flat_segment(seg: Any, selector: int, seg_type: int, long_mode: bool) -> None:
    seg.base, seg.limit, seg.selector, seg.type = 0, 0xFFFFFFFF, selector, seg_type
    seg.present, seg.dpl, seg.s, seg.g, seg.avl, seg.unusable = 1, 0, 1, 1, 0, 0
    seg.l, seg.db = (1, 0) if long_mode else (0, 1)


def require_xen(kvm: System) -> int:
    """KVM_CAP_XEN_HVM bits, or Unsupported when shared_info/runstate are missing."""
    bits = kvm.check_extension(lib.KVM_CAP_XEN_HVM)
    needed = lib.KVM_XEN_HVM_CONFIG_SHARED_INFO | lib.KVM_XEN_HVM_CONFIG_RUNSTATE
    if bits & needed != needed:
        raise Unsupported("KVM_CAP_XEN_HVM" if not bits else
                          f"KVM_CAP_XEN_HVM SHARED_INFO|RUNSTATE (have "
                          f"{'|'.join(xen.hvm_flag_names(bits))})")
    return bits


def configure_xen(vm: Vm, vcpu: Vcpu) -> None:
    """Xen HVM config as the seed does: the hypercall MSR turns on runstate switching at
    vcpu_load; 64-bit layouts; shared_info and the runstate area in guest memory."""
    vm.xen_hvm_config(xen.hvm_config(lib.KVMCORE_XEN_HYPERCALL_MSR,
                                     lib.KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL))
    vm.xen_hvm_set_attr(xen.hvm_attr_long_mode(True))
    vm.xen_hvm_set_attr(xen.hvm_attr_shared_info(lib.KVMCORE_SHINFO_GPA >> 12))
    vcpu.xen_set_attr(xen.vcpu_attr_runstate_addr(lib.KVMCORE_RUNSTATE_GPA))

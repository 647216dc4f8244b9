"""Is a destination's guest memory the source's? Page by page, with the workload's stamps.

After a migration the destination guest has run on, so its memory is no longer
a byte copy of the source's stopped memory. What may differ is known exactly:

* the working set (abi.h ``struct kvmcore_config``): each page's first 8 bytes
  are the generation stamp of its last write. A page is intact when it equals
  the source's, or when its stamp lies in ``(source generation, destination
  generation]`` with the rest of the page unchanged -- the guest wrote it after
  resuming. A page whose stamp is older than the source's lost a write (a
  dropped dirty page); any other stamp is corruption.
* the guest's bookkeeping, written every loop by the guest or by KVM: the report,
  kvmclock, steal-time, Xen shared_info and runstate pages and the stack page.
  Not compared (the clock verdicts and ``sequence_continues`` judge them), only
  counted -- except that the destination's generation must not be behind.
* the page tables: the CPU sets accessed/dirty bits as it walks them, so their
  entries are compared with those two bits masked.

Everything else (code, GDT, config, untouched RAM) must be byte-identical.
``analysis.memory_intact`` turns a comparison into the verdict.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from ._kvm import ffi, lib
from .dirty import PAGE_SIZE

#: Pages the guest or KVM write on every loop (guest_program/guest.c, abi.h).
BOOKKEEPING_GPAS = (lib.KVMCORE_REPORT_GPA, lib.KVMCORE_PVCLOCK_GPA, lib.KVMCORE_STEAL_GPA,
                    lib.KVMCORE_SHINFO_GPA, lib.KVMCORE_RUNSTATE_GPA,
                    lib.KVMCORE_STACK_TOP - PAGE_SIZE)
PAGE_TABLE_GPAS = (lib.KVMCORE_PML4_GPA, lib.KVMCORE_PDPT_GPA, lib.KVMCORE_PD_GPA)
#: x86 page-table entry bits the CPU sets by itself: accessed (5) and dirty (6).
PTE_ACCESSED_DIRTY = (1 << 5) | (1 << 6)
_CHUNK = 2 << 20
_STAMP = struct.Struct("<Q")          # a stamp, and the other u64 fields read here
_ENTRIES = struct.Struct("<512Q")
_GENERATION_AT = lib.KVMCORE_REPORT_GPA + ffi.offsetof("struct kvmcore_report",
                                                        "dirty_generation")
_WORKING_SET_AT = lib.KVMCORE_CONFIG_GPA + ffi.offsetof("struct kvmcore_config", "working_set")


@dataclass(frozen=True)
class PageMismatch:
    """One page that is not the source's, and how it differs."""

    gpa: int
    reason: str

    def __str__(self) -> str:
        return f"page {self.gpa:#x}: {self.reason}"


@dataclass(frozen=True)
class MemoryComparison:
    """The result of compare_memory(): what was compared and every page that differs."""

    pages: int                     # pages in the guest's memory
    working_set_pages: int
    source_generation: int         # the source's dirty_generation when it stopped
    destination_generation: int    # the destination's when compared
    rewritten: int                 # working-set pages the guest wrote after resuming
    bookkeeping: int               # pages not compared (BOOKKEEPING_GPAS)
    mismatches: tuple[PageMismatch, ...]

    @property
    def ok(self) -> bool:
        return not self.mismatches


def compare_memory(source: Any, destination: Any) -> MemoryComparison:
    """Compare ``destination``'s memory with ``source``'s (each a GuestMemory or a
    buffer): the source stopped at capture, the destination restored from it and
    perhaps run since. The working set is read from the source's config page."""
    with _view(source) as src, _view(destination) as dst:
        if len(src) != len(dst):
            return MemoryComparison(len(src) // PAGE_SIZE, 0, 0, 0, 0, 0, (PageMismatch(
                0, f"destination has {len(dst)} bytes, source {len(src)}"),))
        (working_set,) = _STAMP.unpack_from(src, _WORKING_SET_AT)
        ws_lo = lib.KVMCORE_WORKSET_GPA
        ws_hi = min(ws_lo + working_set, len(src)) if working_set else ws_lo
        (src_gen,), (dst_gen,) = (_STAMP.unpack_from(src, _GENERATION_AT),
                                  _STAMP.unpack_from(dst, _GENERATION_AT))
        mismatches: list[PageMismatch] = []
        rewritten = 0
        if dst_gen < src_gen:
            mismatches.append(PageMismatch(lib.KVMCORE_REPORT_GPA, (
                f"the destination's generation {dst_gen} is behind the source's {src_gen}")))
        for chunk in range(0, len(src), _CHUNK):
            end = min(chunk + _CHUNK, len(src))
            if src[chunk:end] == dst[chunk:end]:
                continue
            for gpa in range(chunk, end, PAGE_SIZE):
                a, b = src[gpa:gpa + PAGE_SIZE], dst[gpa:gpa + PAGE_SIZE]
                if gpa in BOOKKEEPING_GPAS or a == b:
                    continue
                if gpa in PAGE_TABLE_GPAS:
                    if _masked(a) != _masked(b):
                        mismatches.append(PageMismatch(gpa, "page-table entries differ "
                                                       "beyond the accessed/dirty bits"))
                elif ws_lo <= gpa < ws_hi:
                    problem = _stamped_page(a, b, src_gen, dst_gen)
                    if problem:
                        mismatches.append(PageMismatch(gpa, problem))
                    else:
                        rewritten += 1
                else:
                    mismatches.append(PageMismatch(gpa, "differs (the guest never writes it)"))
        return MemoryComparison(len(src) // PAGE_SIZE, (ws_hi - ws_lo) // PAGE_SIZE, src_gen,
                                dst_gen, rewritten, len(BOOKKEEPING_GPAS), tuple(mismatches))


def _stamped_page(src: memoryview, dst: memoryview, src_gen: int, dst_gen: int) -> str | None:
    """Why a differing working-set page is not one the guest wrote after resuming."""
    (old,), (new,) = _STAMP.unpack_from(src), _STAMP.unpack_from(dst)
    if src[_STAMP.size:] != dst[_STAMP.size:]:
        return f"bytes after the stamp differ (stamp {new}, source {old})"
    if new < old:
        return f"stamp {new} is older than the source's {old}: a write was lost"
    if not src_gen < new <= dst_gen:
        return (f"stamp {new} (source {old}) is outside the writes after resuming, "
                f"({src_gen}, {dst_gen}]")
    return None


def _masked(page: memoryview) -> tuple[int, ...]:
    return tuple(e & ~PTE_ACCESSED_DIRTY for e in _ENTRIES.unpack(page))


def _view(memory: Any) -> memoryview:
    """A read-only byte view of a GuestMemory or any buffer (a context manager: released
    on exit, so the GuestMemory can still be closed)."""
    view = memory.view() if hasattr(memory, "view") else memoryview(memory)
    return view.cast("B").toreadonly()

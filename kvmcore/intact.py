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

Everything else (code, GDT, config, untouched RAM) must be identical.

Between hosts only the destination's MemoryDigest travels (in the REPORT): a
crc32 of each page normalised by these rules, and every working-set stamp whole.
compare_digest() judges it against the source's memory, and compare_memory()
is the same judgement with both digests made here: one home for the rules
(``_digest`` normalises, ``_compare`` judges). ``analysis.memory_intact``
turns a comparison into the verdict.
"""

from __future__ import annotations

import array
import dataclasses
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from ._kvm import ffi, lib
from ._layout import memory_size_problem
from ._schema import dataclass_from_plain
from .dirty import PAGE_SIZE
from .errors import GuestMemoryError, StateError

#: Pages the guest or KVM write on every loop (guest_program/guest.c, abi.h).
BOOKKEEPING_GPAS = (lib.KVMCORE_REPORT_GPA, lib.KVMCORE_PVCLOCK_GPA, lib.KVMCORE_STEAL_GPA,
                    lib.KVMCORE_SHINFO_GPA, lib.KVMCORE_RUNSTATE_GPA,
                    lib.KVMCORE_STACK_TOP - PAGE_SIZE)
PAGE_TABLE_GPAS = (lib.KVMCORE_PML4_GPA, lib.KVMCORE_PDPT_GPA, lib.KVMCORE_PD_GPA)
#: x86 page-table entry bits the CPU sets by itself: accessed (5) and dirty (6).
PTE_ACCESSED_DIRTY = (1 << 5) | (1 << 6)
#: The largest memory a MemoryDigest is made for: 4 bytes a page and 8 a working-set page
#: stay under 3 MiB, well inside one protocol frame (8 MiB). Above it there is no digest
#: and memory_intact is not measured (DIGEST_NOT_COMPUTED).
DIGEST_MAX_MEMORY = 1 << 30
DIGEST_NOT_COMPUTED = f"not computed above {DIGEST_MAX_MEMORY >> 30} GiB"
_STAMP = struct.Struct("<Q")          # a stamp, and the other u64 fields read here
_ENTRIES = struct.Struct("<512Q")
_GENERATION_AT = lib.KVMCORE_REPORT_GPA + ffi.offsetof("struct kvmcore_report",
                                                        "dirty_generation")
_WORKING_SET_AT = lib.KVMCORE_CONFIG_GPA + ffi.offsetof("struct kvmcore_config", "working_set")
_WORKSET_PAGE = lib.KVMCORE_WORKSET_GPA // PAGE_SIZE
_BOOKKEEPING_PAGES = frozenset(gpa // PAGE_SIZE for gpa in BOOKKEEPING_GPAS)
_PAGE_TABLE_PAGES = frozenset(gpa // PAGE_SIZE for gpa in PAGE_TABLE_GPAS)
assert array.array("I").itemsize == 4 and array.array("Q").itemsize == 8
assert struct.pack("=I", 1) == struct.pack("<I", 1), "the digest's arrays are little-endian"


@dataclass(frozen=True)
class MemoryDigest:
    """Per-page digests of a guest's memory, small enough for a REPORT (4 bytes a page).

    Each page normalised by the rules of the module docstring before its crc32:
    a working-set page without its stamp (the stamp is kept whole, in ``stamps``),
    a page table with the accessed/dirty bits masked, a bookkeeping page as 0.
    So two memories compare as compare_memory() compares them, one of them absent.
    """

    generation: int    # the workload's dirty_generation (report page)
    stamps: bytes      # u64 LE: each working-set page's stamp, in page order
    crcs: bytes        # u32 LE: each page's crc32, normalised

    @property
    def pages(self) -> int:
        return len(self.crcs) // 4

    @property
    def memory_size(self) -> int:
        return self.pages * PAGE_SIZE

    @classmethod
    def of(cls, memory: Any) -> MemoryDigest:
        """The digest of a GuestMemory (or any buffer) of at most DIGEST_MAX_MEMORY."""
        with _view(memory) as view:
            if len(view) > DIGEST_MAX_MEMORY:
                raise GuestMemoryError(f"no digest of {len(view):#x} bytes of guest memory: "
                                       f"{DIGEST_NOT_COMPUTED}")
            return _digest(view)

    def to_plain(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_plain(cls, plain: Any, path: str = "memory",
                   memory_size: int | None = None) -> MemoryDigest:
        """Validate a digest from the wire: the fields, whole u32/u64 arrays, a page count
        that is a guest memory size within the cap (and ``memory_size``, when given), no
        more stamps than working-set pages could have; StateError names the field."""
        digest: MemoryDigest = dataclass_from_plain(cls, plain, path)
        digest.check_size(memory_size, path)
        return digest

    def check_size(self, memory_size: int | None = None, path: str = "memory") -> None:
        """StateError unless the arrays are whole and fit a memory (of ``memory_size``)."""
        if len(self.crcs) % 4:
            raise StateError(f"{path}.crcs", f"{len(self.crcs)} bytes is not a whole number "
                             "of u32 page digests")
        if len(self.stamps) % 8:
            raise StateError(f"{path}.stamps", f"{len(self.stamps)} bytes is not a whole "
                             "number of u64 stamps")
        size = self.memory_size
        problem = memory_size_problem(size) or (
            f"above the digest cap {DIGEST_MAX_MEMORY:#x}" if size > DIGEST_MAX_MEMORY else
            f"but the memory has {memory_size:#x} bytes" if memory_size not in (None, size)
            else None)
        if problem:
            raise StateError(f"{path}.crcs", f"{self.pages} page digests ({size:#x} bytes): "
                             f"{problem}")
        if len(self.stamps) // 8 > self.pages - _WORKSET_PAGE:
            raise StateError(f"{path}.stamps", f"{len(self.stamps) // 8} stamps but only "
                             f"{self.pages - _WORKSET_PAGE} pages above the working set's start")


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
    perhaps run since. The working set is read from the source's config page.
    Page by page through both digests: a changed page is one whose crc32 changed, which
    misses a corrupted page only with probability 2^-32 (a lost write always shows: the
    stamps are compared whole)."""
    with _view(source) as src, _view(destination) as dst:
        return _compare(_digest(src), _digest(dst))


def compare_digest(source_memory: Any, destination: MemoryDigest) -> MemoryComparison:
    """compare_memory() against a destination known only by its digest (the REPORT's)."""
    with _view(source_memory) as src:
        return _compare(_digest(src), destination)


def _digest(view: memoryview) -> MemoryDigest:
    """The one home of the normalisation rules (module docstring), for any guest size."""
    size = len(view)
    problem = memory_size_problem(size)
    if problem:
        raise GuestMemoryError(f"no digest of {size:#x} bytes: not a guest memory ({problem})")
    (working_set,) = _STAMP.unpack_from(view, _WORKING_SET_AT)
    ws_lo = min(lib.KVMCORE_WORKSET_GPA, size)
    ws_hi = ws_lo + min(working_set, size - ws_lo) // PAGE_SIZE * PAGE_SIZE
    crc32 = zlib.crc32
    crcs = array.array("I", [crc32(view[o:o + PAGE_SIZE]) for o in range(0, ws_lo, PAGE_SIZE)])
    crcs.extend([crc32(view[o + _STAMP.size:o + PAGE_SIZE])
                 for o in range(ws_lo, ws_hi, PAGE_SIZE)])
    crcs.extend([crc32(view[o:o + PAGE_SIZE]) for o in range(ws_hi, size, PAGE_SIZE)])
    for page in _BOOKKEEPING_PAGES:
        crcs[page] = 0
    for page in _PAGE_TABLE_PAGES:
        entries = view[page * PAGE_SIZE:(page + 1) * PAGE_SIZE]
        crcs[page] = crc32(_ENTRIES.pack(*_masked(entries)))
    stamps = view[ws_lo:ws_hi].cast("Q")[::PAGE_SIZE // _STAMP.size].tobytes()
    (generation,) = _STAMP.unpack_from(view, _GENERATION_AT)
    return MemoryDigest(generation, stamps, crcs.tobytes())


def _compare(src: MemoryDigest, dst: MemoryDigest) -> MemoryComparison:
    """The one home of the verdict rules on a page (module docstring)."""
    pages, ws_pages = src.pages, len(src.stamps) // _STAMP.size
    src_gen, dst_gen = src.generation, dst.generation

    def result(rewritten: int, *mismatches: PageMismatch) -> MemoryComparison:
        return MemoryComparison(pages, ws_pages, src_gen, dst_gen, rewritten,
                                len(BOOKKEEPING_GPAS), mismatches)

    if dst.pages != pages:
        return result(0, PageMismatch(0, f"destination has {dst.memory_size} bytes, source "
                                         f"{src.memory_size}"))
    if len(dst.stamps) != len(src.stamps):
        return result(0, PageMismatch(lib.KVMCORE_CONFIG_GPA, (
            f"the destination's working set is {len(dst.stamps) // _STAMP.size} pages, the "
            f"source's {ws_pages}")))
    mismatches: list[PageMismatch] = []
    if dst_gen < src_gen:
        mismatches.append(PageMismatch(lib.KVMCORE_REPORT_GPA, (
            f"the destination's generation {dst_gen} is behind the source's {src_gen}")))
    src_crcs, dst_crcs = array.array("I", src.crcs), array.array("I", dst.crcs)
    src_stamps, dst_stamps = array.array("Q", src.stamps), array.array("Q", dst.stamps)
    changed = set() if src.crcs == dst.crcs else {
        page for page, (a, b) in enumerate(zip(src_crcs, dst_crcs)) if a != b}
    if src.stamps != dst.stamps:
        changed.update(_WORKSET_PAGE + i for i, (a, b) in enumerate(zip(src_stamps, dst_stamps))
                       if a != b)
    rewritten = 0
    for page in sorted(changed - _BOOKKEEPING_PAGES):
        gpa, in_ws = page * PAGE_SIZE, 0 <= page - _WORKSET_PAGE < ws_pages
        old, new = ((src_stamps[page - _WORKSET_PAGE], dst_stamps[page - _WORKSET_PAGE])
                    if in_ws else (0, 0))
        if page in _PAGE_TABLE_PAGES:
            problem = "page-table entries differ beyond the accessed/dirty bits"
        elif not in_ws:
            problem = "differs (the guest never writes it)"
        elif src_crcs[page] != dst_crcs[page]:
            problem = f"bytes after the stamp differ (stamp {new}, source {old})"
        else:
            problem = _stamp_problem(old, new, src_gen, dst_gen)
        if problem:
            mismatches.append(PageMismatch(gpa, problem))
        else:
            rewritten += 1
    return result(rewritten, *mismatches)


def _stamp_problem(old: int, new: int, src_gen: int, dst_gen: int) -> str | None:
    """Why a working-set page whose rest is unchanged is not one the guest wrote after
    resuming (None: it is)."""
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

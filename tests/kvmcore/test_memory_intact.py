"""memory_intact on the real kernel: a pre-copy done by hand with the dirty log (all memory
while the guest runs, a round of dirty pages, the last dirty set after the stop) gives a
destination whose every page is the source's or the guest's own later write; dropping one
page of the last dirty set is caught (the negative control the issue asks for)."""

from __future__ import annotations

import struct
import time

from kvmcore import Guest, GuestConfig, GuestMemory, Strategy, VmState, capture, restore
from kvmcore._kvm import lib
from kvmcore.analysis import memory_intact
from kvmcore.dirty import PAGE_SIZE
from kvmcore.intact import compare_memory

CONFIG = GuestConfig(memory_size=4 << 20, dirty_rate=8 << 20, working_set=2 << 20)


def copy_runs(src: GuestMemory, dst: GuestMemory, runs: list[tuple[int, int]]) -> None:
    for offset, length in runs:
        dst.write(offset, src.read(offset, length))


def run_for(g: Guest, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        g.run_until_snapshot()


def precopy(kvm, caps, *, drop: bool, resume_reports: int = 3):
    """Source and destination memory after a hand-made pre-copy; with ``drop``, one
    working-set page of the last dirty set is not sent. Returns (source memory,
    destination memory, the dropped page's gpa or None); the destination guest ran
    ``resume_reports`` reports."""
    with Guest.create(kvm, CONFIG) as g:
        g.run_until_snapshot()
        g.start_dirty_log()
        dest = GuestMemory.allocate(CONFIG.memory_size)
        copy_runs(g.memory, dest, [(0, CONFIG.memory_size)])       # round 0: everything
        run_for(g, 0.02)
        copy_runs(g.memory, dest, g.dirty_runs())                   # round 1
        run_for(g, 0.02)
        state = capture(g)                                          # the stop
        last = g.dirty_bitmap()
        stamped = [p * PAGE_SIZE for p in last.pages()
                   if p * PAGE_SIZE >= lib.KVMCORE_WORKSET_GPA]
        assert stamped, "the last dirty set has working-set pages"
        dropped = stamped[len(stamped) // 2] if drop else None
        copy_runs(g.memory, dest, last.runs() if dropped is None else
                  [(p * PAGE_SIZE, PAGE_SIZE) for p in last.pages() if p * PAGE_SIZE != dropped])
    state2 = VmState.from_plain(state.to_plain())
    plan = Strategy.best(caps, state2).check(caps, state2)
    with restore(kvm, plan, dest) as g2:
        for _ in range(resume_reports):
            g2.run_until_snapshot()
    return g.memory, dest, dropped


def test_exact_copy_is_intact(kvm):
    with Guest.create(kvm, CONFIG) as g:
        run_for(g, 0.02)
        copy = GuestMemory.allocate(CONFIG.memory_size)
        copy.write(0, g.memory.read(0, CONFIG.memory_size))
        result = compare_memory(g.memory, copy)
    assert result.ok and result.rewritten == 0 and result.source_generation > 0
    assert memory_intact(result).ok is True


def test_precopy_with_every_dirty_page_is_intact(kvm, caps):
    src, dest, _ = precopy(kvm, caps, drop=False)
    result = compare_memory(src, dest)
    check = memory_intact(result)
    assert check.ok is True, check.detail
    # The destination guest ran on and wrote pages of its own: allowed, and counted.
    assert result.destination_generation > result.source_generation
    assert result.rewritten > 0 and "rewritten after resuming" in check.detail


def test_precopy_that_drops_one_page_of_the_last_dirty_set_fails(kvm, caps):
    src, dest, dropped = precopy(kvm, caps, drop=True)
    result = compare_memory(src, dest)
    check = memory_intact(result)
    assert check.ok is False and check.failed
    assert [m.gpa for m in result.mismatches] == [dropped]
    assert "a write was lost" in check.detail and f"{dropped:#x}" in check.detail


def _stopped_copy(kvm):
    with Guest.create(kvm, CONFIG) as g:
        run_for(g, 0.02)
        src = bytearray(g.memory.read(0, CONFIG.memory_size))
    return src, bytearray(src)


def test_stamps_outside_the_writes_after_resuming_fail(kvm):
    src, dst = _stopped_copy(kvm)
    assert struct.unpack_from("<Q", src, lib.KVMCORE_WORKSET_GPA)[0] > 0   # stamped
    page = lib.KVMCORE_WORKSET_GPA + 5 * PAGE_SIZE
    # A stamp newer than the destination's own generation: nobody wrote it.
    struct.pack_into("<Q", dst, page, 1 << 40)
    assert [m.gpa for m in compare_memory(src, dst).mismatches] == [page]


def test_a_changed_byte_is_caught_wherever_it_is(kvm):
    src, _ = _stopped_copy(kvm)
    for gpa in (lib.KVMCORE_CODE_GPA + 17,                    # code
                lib.KVMCORE_CONFIG_GPA,                       # the workload's config
                lib.KVMCORE_WORKSET_GPA + 3 * PAGE_SIZE + 100,  # after a stamp
                CONFIG.memory_size - 1,                        # untouched RAM
                lib.KVMCORE_PD_GPA + 8 * 3):                   # a page-table entry
        dst = bytearray(src)
        dst[gpa] ^= 0x01
        result = compare_memory(src, dst)
        assert [m.gpa for m in result.mismatches] == [gpa & ~(PAGE_SIZE - 1)], hex(gpa)
    # What the guest and the CPU change by themselves is not a mismatch.
    dst = bytearray(src)
    dst[lib.KVMCORE_REPORT_GPA + 0x100] ^= 0xFF
    dst[lib.KVMCORE_PD_GPA + 8 * 3] ^= 1 << 6                  # the CPU's dirty bit
    assert compare_memory(src, dst).ok

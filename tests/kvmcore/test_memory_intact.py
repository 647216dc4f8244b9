"""memory_intact on the real kernel: a pre-copy done by hand with the dirty log (all memory
while the guest runs, a round of dirty pages, the last dirty set after the stop) gives a
destination whose every page is the source's or the guest's own later write; dropping one
page of the last dirty set is caught (the negative control the issue asks for)."""

from __future__ import annotations

import struct
import time

import msgpack
import pytest
from kvm_helpers import migrate

from kvmcore import (DIGEST_MAX_MEMORY, DIGEST_NOT_COMPUTED, Check, DestinationPhases,
                     DestinationReport, Guest, GuestConfig, GuestMemory, GuestMemoryError,
                     MemoryDigest, StateError, Strategy, VmState, analyse, capture,
                     compare_digest, restore)
from kvmcore._kvm import lib
from kvmcore.analysis import CHECK_NAMES, MEMORY_NOT_COMPARED, memory_intact
from kvmcore.dirty import PAGE_SIZE
from kvmcore.intact import PTE_ACCESSED_DIRTY, compare_memory

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


# --- between hosts: only the destination's MemoryDigest travels (in the REPORT) ---

def test_compare_digest_judges_as_compare_memory(kvm, caps):
    """The pre-copy above, judged from the destination's digest: the same verdict, the same
    mismatch (a dropped dirty page; the negative control), through the wire form."""
    for drop in (False, True):
        src, dest, dropped = precopy(kvm, caps, drop=drop)
        plain = msgpack.unpackb(msgpack.packb(MemoryDigest.of(dest).to_plain()))
        digest = MemoryDigest.from_plain(plain, memory_size=CONFIG.memory_size)
        by_digest, by_memory = compare_digest(src, digest), compare_memory(src, dest)
        assert by_digest == by_memory
        assert by_digest.ok is (not drop) and by_digest.rewritten > 0
        if drop:
            assert [m.gpa for m in by_digest.mismatches] == [dropped]
            assert "a write was lost" in by_digest.mismatches[0].reason
        dest.close()
        src.close()


def test_digest_tolerates_page_table_accessed_dirty_bits(kvm):
    src, dst = _stopped_copy(kvm)
    entry = lib.KVMCORE_PD_GPA + 8 * 3
    dst[entry] ^= PTE_ACCESSED_DIRTY                 # both bits the CPU sets itself
    dst[lib.KVMCORE_REPORT_GPA + 0x100] ^= 0xFF      # a bookkeeping page
    assert compare_digest(src, MemoryDigest.of(dst)).ok
    # Negative control: any other bit of the entry is a mismatch.
    dst[entry] ^= 1 << 2
    result = compare_digest(src, MemoryDigest.of(dst))
    assert [(m.gpa, m.reason) for m in result.mismatches] == [
        (lib.KVMCORE_PD_GPA, "page-table entries differ beyond the accessed/dirty bits")]


def test_digest_sizes_and_memories_that_do_not_match(kvm):
    src, dst = _stopped_copy(kvm)
    digest = MemoryDigest.of(dst)
    assert digest.pages == CONFIG.memory_size // PAGE_SIZE and digest.memory_size == len(dst)
    assert len(digest.stamps) == CONFIG.working_set // PAGE_SIZE * 8
    assert len(digest.crcs) == 4 * digest.pages
    assert DIGEST_MAX_MEMORY == 1 << 30 and DIGEST_NOT_COMPUTED == "not computed above 1 GiB"
    # A digest of another size is one mismatch, not an exception.
    smaller = MemoryDigest.of(bytes(2 << 20))
    result = compare_digest(src, smaller)
    assert not result.ok and "destination has" in result.mismatches[0].reason
    with pytest.raises(GuestMemoryError, match="not a guest memory"):
        compare_memory(src, bytes(PAGE_SIZE))
    with GuestMemory(DIGEST_MAX_MEMORY + PAGE_SIZE) as huge:      # mapped, never touched
        with pytest.raises(GuestMemoryError, match="not computed above 1 GiB"):
            MemoryDigest.of(huge)


@pytest.mark.parametrize("change, field, words", [
    ({"crcs": b"\0" * 5}, "memory.crcs", "not a whole number of u32"),
    ({"crcs": b"\0" * 4 * 100}, "memory.crcs", "is not a multiple of 2 MiB"),
    ({"crcs": b"\0" * 4 * 2048}, "memory.crcs", "but the memory has 0x400000 bytes"),
    ({"stamps": b"\0" * 7}, "memory.stamps", "not a whole number of u64"),
    ({"stamps": b"\0" * 8 * 1000}, "memory.stamps", "pages above the working set's start"),
    ({"stamps": "ab"}, "memory.stamps", "expected bytes"),
    ({"generation": -1}, "memory.generation", "outside"),
    ({"extra": 1}, "memory.extra", "unexpected field"),
])
def test_digest_from_plain_refuses(kvm, change, field, words):
    _, dst = _stopped_copy(kvm)
    plain = {**MemoryDigest.of(dst).to_plain(), **change}
    with pytest.raises(StateError) as info:
        MemoryDigest.from_plain(plain, memory_size=CONFIG.memory_size)
    assert info.value.field == field and words in info.value.reason
    # Control: the unchanged digest passes.
    assert MemoryDigest.from_plain(MemoryDigest.of(dst).to_plain(), memory_size=len(dst))


def test_the_report_carries_the_digest_and_older_reports_still_parse(kvm, caps):
    with Guest.create(kvm, CONFIG) as g:
        g.run_until_snapshot()
        state = capture(g)
    with restore(kvm, Strategy.best(caps, state).check(caps, state), g.memory) as g2:
        after = g2.run_until_snapshot()
        record = g2.restore_record
    digest = MemoryDigest.of(g.memory)
    g.memory.close()
    phases = DestinationPhases(1, 2, 3, 4, 5, prepare_ns=6, rounds_receive_ns=7, verify_ns=8)
    report = DestinationReport(after, record, phases, memory=digest)
    plain = msgpack.unpackb(msgpack.packb(report.to_plain()))
    assert DestinationReport.from_plain(plain) == report
    assert report.check_answers(Strategy.parse_exact(record.strategy),
                                memory_size=CONFIG.memory_size) is report
    with pytest.raises(StateError) as info:
        report.check_answers(Strategy.parse_exact(record.strategy), memory_size=8 << 20)
    assert info.value.field == "report.memory.crcs"
    # A REPORT from before digests and the live-migration phases: the defaults.
    old = {**plain, "phases": {k: v for k, v in plain["phases"].items()
                               if k not in ("prepare_ns", "rounds_receive_ns", "verify_ns")}}
    del old["memory"]
    parsed = DestinationReport.from_plain(old)
    assert parsed.memory is None and (parsed.phases.prepare_ns, parsed.phases.verify_ns) == (0, 0)
    # Control: a field older reports had is still required.
    del old["phases"]["close_ns"]
    with pytest.raises(StateError, match="report.phases.close_ns"):
        DestinationReport.from_plain(old)
    with pytest.raises(StateError, match="report.memory.crcs"):
        DestinationReport.from_plain({**plain, "memory": {**plain["memory"], "crcs": b"\0"}})


def test_analyse_decides_memory_intact_from_the_comparison(kvm, caps):
    src, dest, dropped = precopy(kvm, caps, drop=True)
    m = migrate(kvm, caps, Strategy.best(caps), 0.01)
    a = analyse(m.before, m.after, m.state, m.record)
    assert a.checks["memory_intact"] == Check(None, MEMORY_NOT_COMPARED)
    assert "memory_intact" in CHECK_NAMES and "memory_intact" not in a.failed
    b = analyse(m.before, m.after, m.state, m.record, memory_reason=DIGEST_NOT_COMPUTED)
    assert b.checks["memory_intact"].detail == DIGEST_NOT_COMPUTED
    lost = analyse(m.before, m.after, m.state, m.record,
                   memory_comparison=compare_digest(src, MemoryDigest.of(dest)))
    assert lost.checks["memory_intact"].ok is False and lost.failed == ["memory_intact"]
    assert f"{dropped:#x}" in lost.checks["memory_intact"].detail
    intact = analyse(m.before, m.after, m.state, m.record,
                     memory_comparison=compare_digest(src, MemoryDigest.of(src)))
    assert intact.checks["memory_intact"].ok is True and intact.failed == []
    dest.close()
    src.close()

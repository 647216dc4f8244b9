"""Dirty logging on the real kernel: KVM_GET_DIRTY_LOG reports exactly the pages the guest's
workload wrote (each page's generation stamp says which), round after round, and
KVM_CLEAR_DIRTY_LOG re-arms the log where KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is offered."""

from __future__ import annotations

import struct
import time

import pytest

from kvmcore import Guest, GuestConfig, StateError
from kvmcore._kvm import lib
from kvmcore.dirty import PAGE_SIZE, DirtyBitmap
from kvmcore.errors import GuestError

WORKSET_PAGE = lib.KVMCORE_WORKSET_GPA // PAGE_SIZE
DIRTYING = GuestConfig(memory_size=4 << 20, dirty_rate=8 << 20, working_set=2 << 20)


def stamps(g: Guest) -> list[int]:
    """Every working-set page's generation stamp (its first 8 bytes)."""
    data = g.memory.read(lib.KVMCORE_WORKSET_GPA, g.config.working_set)
    return [struct.unpack_from("<Q", data, off)[0] for off in range(0, len(data), PAGE_SIZE)]


def run_for(g: Guest, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        g.run_until_snapshot()


def one_round(g: Guest, seconds: float) -> tuple[set[int], set[int], DirtyBitmap]:
    """Run for ``seconds``; the working-set pages the log reports, those whose stamp moved."""
    before = stamps(g)
    run_for(g, seconds)
    dirty = g.dirty_bitmap()
    moved = {WORKSET_PAGE + i for i, (a, b) in enumerate(zip(before, stamps(g))) if a != b}
    logged = {p for p in dirty.pages() if p >= WORKSET_PAGE}
    return logged, moved, dirty


def test_dirty_log_reports_exactly_the_pages_the_workload_wrote(kvm):
    with Guest.create(kvm, DIRTYING) as g:
        g.run_until_snapshot()
        g.start_dirty_log()
        rounds = [one_round(g, 0.03) for _ in range(3)]
    for logged, moved, dirty in rounds:
        assert moved and logged == moved
        # The guest's own report page is written every loop, so it is in every round.
        assert lib.KVMCORE_REPORT_GPA // PAGE_SIZE in dirty.pages()
    # Two rounds see new pages: the workload moved on through the working set.
    assert rounds[1][0] - rounds[0][0] and rounds[2][0] - rounds[1][0]


def test_no_workload_dirties_no_working_set_page(kvm):
    """The control: the same guest with dirty_rate 0 writes only its bookkeeping pages."""
    config = GuestConfig(memory_size=4 << 20, dirty_rate=0, working_set=2 << 20)
    with Guest.create(kvm, config) as g:
        g.run_until_snapshot()
        g.start_dirty_log()
        logged, moved, dirty = one_round(g, 0.03)
        assert g.report_page().dirty_generation == 0
    assert logged == moved == set()
    assert len(dirty) and max(dirty.pages()) < WORKSET_PAGE


def test_dirty_runs_are_migrate_runs(kvm):
    """dirty_runs() is what protocol.pack_runs takes and parse_runs accepts."""
    from protocol import pack_runs
    from protocol._limits import Limits
    from protocol._memory import parse_runs

    with Guest.create(kvm, DIRTYING) as g:
        g.start_dirty_log()
        run_for(g, 0.02)
        runs = g.dirty_runs()
        assert parse_runs(pack_runs(runs), g.memory.size, Limits()) == runs


def test_rate_sets_the_pages_written(kvm):
    """8 MiB/s of kvmclock time is 2048 pages/s: the pages written between two reports
    follow the guest's own elapsed kvmclock (within the one page of credit carried)."""
    with Guest.create(kvm, DIRTYING) as g:
        g.run_until_snapshot()
        first = g.run_until_snapshot()
        gen0 = g.report_page().dirty_generation
        run_for(g, 0.05)
        last = g.last_snapshot
        written = g.report_page().dirty_generation - gen0
    assert last is not None and written > 0
    expected = DIRTYING.dirty_rate * (last.kvmclock_ns - first.kvmclock_ns) / 1e9 / PAGE_SIZE
    assert abs(written - expected) <= 1


def test_clear_dirty_log_rearms_with_manual_protect(kvm, caps):
    if "MANUAL_PROTECT_ENABLE" not in caps.dirty_log_manual_protect:
        pytest.skip("unsupported on this host: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2")
    with Guest.create(kvm, DIRTYING) as g:
        g.run_until_snapshot()
        g.start_dirty_log(manual_protect=True)
        logged, moved, _ = one_round(g, 0.03)
        assert moved and logged == moved           # dirty_bitmap() read and cleared
        logged2, moved2, _ = one_round(g, 0.03)
        assert moved2 and logged2 == moved2
        # With manual protect a read alone clears nothing: the guest stopped, the same
        # pages show twice until KVM_CLEAR_DIRTY_LOG (the negative control for clear).
        run_for(g, 0.01)
        pages = g.memory.size // PAGE_SIZE
        again = g.vm.get_dirty_log(0, pages)
        assert len(again) and g.vm.get_dirty_log(0, pages) == again
        g.vm.clear_dirty_log(again)
        assert len(g.vm.get_dirty_log(0, pages)) == 0
        # Back to an automatic log on the same VM: a read clears again.
        g.stop_dirty_log()
        g.start_dirty_log()
        run_for(g, 0.01)
        assert len(g.vm.get_dirty_log(0, pages)) and not len(g.vm.get_dirty_log(0, pages))


def test_stopped_log_is_refused_and_restarts_empty(kvm):
    with Guest.create(kvm, DIRTYING) as g:
        with pytest.raises(GuestError, match="dirty logging is off"):
            g.dirty_bitmap()
        g.start_dirty_log()
        run_for(g, 0.01)
        g.stop_dirty_log()
        run_for(g, 0.01)
        g.start_dirty_log()
        assert len(g.dirty_bitmap()) == 0        # nothing logged while it was off


def test_bitmap_runs_merge_adjacent_pages():
    bitmap = (0b1110_0011 | 1 << 70).to_bytes(16, "little")
    dirty = DirtyBitmap(0, 100, bitmap)
    assert dirty.pages() == [0, 1, 5, 6, 7, 70] and len(dirty) == 6
    assert dirty.runs() == [(0, 2 * PAGE_SIZE), (5 * PAGE_SIZE, 3 * PAGE_SIZE),
                            (70 * PAGE_SIZE, PAGE_SIZE)]
    assert DirtyBitmap(0, 100, bytes(16)).runs() == []
    # A run up to the slot's last page; bits past the slot (the last word's padding) are not
    # pages (negative control: page 99 is, page 100 is not).
    tail = DirtyBitmap(0, 100, (0b11 << 98 | 1 << 100 | 1 << 127).to_bytes(16, "little"))
    assert tail.pages() == [98, 99] and len(tail) == 2 and tail.runs() == [(98 * PAGE_SIZE,
                                                                           2 * PAGE_SIZE)]
    full = DirtyBitmap(0, 1 << 16, b"\xff" * (1 << 13))
    assert full.runs() == [(0, (1 << 16) * PAGE_SIZE)] and len(full.pages()) == 1 << 16
    with pytest.raises(ValueError):
        DirtyBitmap(0, 100, bytes(8))


@pytest.mark.parametrize("field, kwargs", [
    ("working_set", {"working_set": 100}),
    ("working_set", {"working_set": 2 << 20}),          # 2 MiB guest: only 1 MiB above 1 MiB
    ("dirty_rate", {"dirty_rate": 1 << 20}),            # no working set
    ("dirty_rate", {"dirty_rate": -1, "working_set": 4096}),
    ("dirty_rate", {"dirty_rate": (1 << 32) + 1, "working_set": 4096}),
])
def test_workload_config_is_checked(field, kwargs):
    with pytest.raises(StateError) as info:
        GuestConfig(memory_size=2 << 20, **kwargs)
    assert info.value.field == field

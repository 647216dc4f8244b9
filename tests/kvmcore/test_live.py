"""LiveRun on the real kernel: a dirtying guest running freely in its VcpuThread while this thread
reads the dirty log; stopped at a report, captured, resumed with its sequence continuing. And the
pre-copy the agents build on it: all memory copied while the guest runs, then each round's dirty
pages, then after the stop the last ones -- the copy is the source's memory exactly (and is not
without the last set: the negative control)."""

from __future__ import annotations

import struct
import threading
import time

import pytest

from kvmcore import (DirtyBitmap, Guest, GuestConfig, GuestError, GuestMemory, LiveRun,
                     VcpuThread, capture, compare_memory)
from kvmcore._kvm import lib
from kvmcore.dirty import PAGE_SIZE

CONFIG = GuestConfig(memory_size=4 << 20, dirty_rate=8 << 20, working_set=2 << 20)
WORKSET_PAGE = lib.KVMCORE_WORKSET_GPA // PAGE_SIZE


@pytest.fixture
def live(kvm):
    """A dirtying guest created in its VcpuThread, dirty log on, its LiveRun not started."""
    with VcpuThread("source-vcpu") as thread:
        guest = thread.call(Guest.create, kvm, CONFIG)
        try:
            thread.call(guest.run_until_snapshot)
            guest.start_dirty_log()
            run = LiveRun(guest, thread)
            yield run
            if run.running:
                run.stop()
        finally:
            thread.call(guest.close)
    guest.memory.close()


def written(live: LiveRun, pages: int = 16, timeout: float = 10.0) -> None:
    """Wait until the running guest has written ``pages`` more working-set pages (its
    generation counts them), however long its thread waits for a CPU on a loaded host."""
    report = live.guest.report_page()
    target = report.dirty_generation + pages
    deadline = time.monotonic() + timeout
    while report.dirty_generation < target:
        assert time.monotonic() < deadline, f"the guest did not run for {timeout} s"
        time.sleep(0.002)


def stamps(memory: GuestMemory) -> list[int]:
    data = memory.read(lib.KVMCORE_WORKSET_GPA, CONFIG.working_set)
    return [struct.unpack_from("<Q", data, off)[0] for off in range(0, len(data), PAGE_SIZE)]


def at_report(guest: Guest) -> bool:
    """The vCPU is stopped on the guest's report `out`, as after run_until_snapshot."""
    run = guest.vcpu.run_struct
    return (run.exit_reason == lib.KVM_EXIT_IO
            and guest.vcpu.io_exit().port == lib.KVMCORE_REPORT_PORT)


def test_stop_leaves_the_guest_at_a_report_and_resume_continues(live):
    g = live.guest
    live.start()
    written(live)
    assert live.running and live.reports > 1          # it ran without this thread's help
    t0 = time.clock_gettime_ns(time.CLOCK_REALTIME)
    stopped = live.stop()
    assert not live.running
    assert at_report(g) and g.last_snapshot is stopped is live.last
    assert t0 <= live.stopped_realtime_ns == stopped.host_realtime_ns
    # One report interval (a KVM_RUN: ~0.7 ms here, docs/kvmcore.md); the bound leaves room
    # for a loaded host's scheduling, not for a loop that ignores the request.
    assert live.stopped_realtime_ns - t0 < 1_000_000_000
    # Stopped means stopped: nothing runs, the report page stays as it is.
    generation = g.report_page().dirty_generation
    time.sleep(0.01)
    assert g.report_page().dirty_generation == generation and at_report(g)
    state = live.thread.call(capture, g)
    assert state.sequence == stopped.sequence
    reports = live.reports
    live.resume()                                         # the rollback path
    written(live)
    again = live.stop()
    assert live.reports > reports and again.sequence == stopped.sequence + (live.reports - reports)
    assert g.report_page().dirty_generation > generation  # the workload went on too


def test_stop_refuses_what_would_deadlock_or_make_no_sense(live):
    with pytest.raises(RuntimeError, match="not running"):
        live.stop()
    # A call already running in the vCPU thread when the loop is started (the loop queued
    # behind it) must not wait for the loop: it would wait for itself.
    go = threading.Event()

    def stop_from_the_vcpu_thread() -> None:
        go.wait()
        live.stop()

    refused = live.thread.submit(stop_from_the_vcpu_thread)
    live.start()
    with pytest.raises(RuntimeError, match="already running"):
        live.start()
    go.set()
    with pytest.raises(RuntimeError, match="wait for itself"):
        refused.result(timeout=10)
    # Control: the loop was not stopped by that refused call; it runs, and stops from here.
    reports = live.reports
    written(live)
    assert live.reports > reports
    live.stop()


def test_a_failing_guest_is_raised_by_stop(live):
    """Negative control: the loop's error (a corrupted report page) comes back to the caller."""
    live.start()
    time.sleep(0.005)
    live.guest.memory.write(lib.KVMCORE_REPORT_GPA, bytes(8))      # the magic
    with pytest.raises(GuestError, match="magic"):
        live.stop()
    assert not live.running


async def test_astop_from_trio(live):
    live.start()
    import trio

    await trio.sleep(0.01)
    stopped = await live.astop()
    assert at_report(live.guest) and stopped.sequence == live.last.sequence


def test_pages_written_during_a_round_are_in_the_next_read(live):
    """The log read from this thread while the vCPU runs in its own: every page whose stamp
    moved after one read is in the next one."""
    g = live.guest
    live.start()
    rounds = []
    g.dirty_bitmap()
    for _ in range(3):
        before = stamps(g.memory)        # after the last read
        written(live)
        after = stamps(g.memory)         # before the next one
        dirty = g.dirty_bitmap()
        moved = {WORKSET_PAGE + i for i, (a, b) in enumerate(zip(before, after)) if a != b}
        rounds.append((moved, set(dirty.pages())))
    live.stop()
    for moved, logged in rounds:
        assert moved and moved <= logged
    # Control: the read before a round does not already hold its pages (the check can fail).
    assert rounds[1][0] - rounds[0][1] and rounds[2][0] - rounds[1][1]


def precopy(live: LiveRun, *, send_last: bool, rounds: int = 3) -> tuple[GuestMemory, DirtyBitmap]:
    """A pre-copy into a second buffer as the agents do it: everything while running, each
    round's dirty pages, stop, capture, then the last dirty set (round n-1's log united with
    the one read after the capture) -- unless ``send_last`` is False."""
    g = live.guest
    copy = GuestMemory.allocate(CONFIG.memory_size)
    live.start()
    copy.write(0, g.memory.read(0, CONFIG.memory_size))       # round 0, guest running
    dirty = g.dirty_bitmap()
    for _ in range(rounds):
        for offset, length in dirty.runs():
            copy.write(offset, g.memory.read(offset, length))
        written(live)
        dirty = g.dirty_bitmap()
    written(live)                        # the guest writes on before it is stopped
    live.stop()
    live.thread.call(capture, g)
    final = dirty | g.dirty_bitmap()
    assert final.byte_count == sum(length for _, length in final.runs())
    if send_last:
        for offset, length in final.runs():
            copy.write(offset, g.memory.read(offset, length))
    return copy, final


def test_the_union_of_the_rounds_is_the_source_memory(live):
    copy, final = precopy(live, send_last=True)
    with copy:
        result = compare_memory(live.guest.memory, copy)
        assert result.ok, result.mismatches
        assert result.rewritten == 0 and result.source_generation > 0
        assert copy.read(0, CONFIG.memory_size) == live.guest.memory.read(0, CONFIG.memory_size)


def test_without_the_last_dirty_set_the_copy_is_not_intact(live):
    copy, final = precopy(live, send_last=False)
    with copy:
        result = compare_memory(live.guest.memory, copy)
    lost = {m.gpa for m in result.mismatches if "a write was lost" in m.reason}
    in_final = {p * PAGE_SIZE for p in final.pages() if p >= WORKSET_PAGE}
    assert not result.ok and lost and lost <= in_final


def test_union_needs_the_same_slot():
    a = DirtyBitmap(0, 64, (0b0101).to_bytes(8, "little"))
    b = DirtyBitmap(0, 64, (0b0110).to_bytes(8, "little"))
    assert (a | b).pages() == [0, 1, 2] and (a | b).byte_count == 3 * PAGE_SIZE
    assert a.byte_count == 2 * PAGE_SIZE and DirtyBitmap(0, 64, bytes(8)).byte_count == 0
    with pytest.raises(ValueError, match="slot"):
        a | DirtyBitmap(1, 64, bytes(8))
    with pytest.raises(ValueError, match="pages"):
        a | DirtyBitmap(0, 128, bytes(16))

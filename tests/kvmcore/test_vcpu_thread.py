"""VcpuThread: calls run in one thread, in order; errors come back to the caller; closing joins;
a cancelled acall still waits for its call. And the point of it on the real kernel: a guest created
and run through it has every KVM_RUN from that one thread."""

from __future__ import annotations

import threading
import time

import pytest
import trio

from kvmcore import Guest, GuestConfig, GuestError, VcpuThread


def test_calls_run_in_order_in_one_thread():
    seen: list[tuple[int, int]] = []

    def note(i: int) -> int:
        time.sleep(0.001 if i % 2 else 0)      # uneven calls: order must not depend on speed
        seen.append((i, threading.get_ident()))
        return i * i

    with VcpuThread("order") as thread:
        futures = [thread.submit(note, i) for i in range(20)]
        assert thread.call(note, 20) == 400
        assert [f.result() for f in futures] == [i * i for i in range(20)]
    assert [i for i, _ in seen] == list(range(21))
    assert {ident for _, ident in seen} == {thread.ident} != {threading.get_ident()}
    # Negative control: the same calls from threads of their own (alive together) are not
    # one thread, so the check above can fail.
    seen.clear()
    barrier = threading.Barrier(3)
    others = [threading.Thread(target=lambda i=i: (barrier.wait(), note(i))) for i in range(3)]
    for t in others:
        t.start()
    for t in others:
        t.join()
    assert len({ident for _, ident in seen}) == 3


def test_errors_are_raised_in_the_caller_and_the_thread_goes_on():
    with VcpuThread("errors") as thread:
        with pytest.raises(ZeroDivisionError):
            thread.call(lambda: 1 / 0)
        failed = thread.submit(lambda: {}["missing"])
        assert isinstance(failed.exception(), KeyError)
        assert thread.call(lambda: "still serving") == "still serving"   # control


def test_closing_runs_what_was_queued_then_joins_and_refuses_more():
    done: list[int] = []
    thread = VcpuThread("close")
    thread.submit(time.sleep, 0.02)
    thread.submit(done.append, 1)
    thread.close()
    assert done == [1] and not threading.Thread.is_alive(thread._thread)
    with pytest.raises(RuntimeError, match="closed"):
        thread.submit(done.append, 2)
    thread.close()                                  # idempotent
    assert done == [1]


def test_a_call_from_its_own_thread_is_refused_not_deadlocked():
    with VcpuThread("self") as thread:
        with pytest.raises(RuntimeError, match="wait for itself"):
            thread.call(thread.call, int)
        assert thread.call(int, "7") == 7               # control: from outside it works


async def test_acall_returns_and_a_cancelled_acall_waits_for_its_call():
    finished = threading.Event()

    def slow() -> str:
        time.sleep(0.1)
        finished.set()
        return "done"

    with VcpuThread("trio") as thread:
        assert await thread.acall(int, "3") == 3
        with pytest.raises(ZeroDivisionError):
            await thread.acall(lambda: 1 / 0)
        t0 = trio.current_time()
        results = []
        with trio.move_on_after(0.01) as scope:
            results.append(await thread.acall(slow))
            await trio.lowlevel.checkpoint()       # where the cancellation is delivered
        # Cancelled, yet not abandoned: acall returned only once the call had finished.
        assert scope.cancelled_caught and finished.is_set() and results == ["done"]
        assert trio.current_time() - t0 >= 0.09
        # Control: a call not yet submitted when cancelled is never run.
        finished.clear()
        with trio.CancelScope() as scope:
            scope.cancel()
            await thread.acall(slow)
        assert thread.call(finished.is_set) is False


def test_a_guest_lives_in_its_thread(kvm):
    """Creation, every KVM_RUN and close in the VcpuThread: the calls' thread is the same."""
    with VcpuThread("guest") as thread:
        guest = thread.call(Guest.create, kvm, GuestConfig())
        try:
            first = thread.call(guest.run_until_snapshot)
            second = thread.call(guest.run_until_snapshot)
            assert second.sequence == first.sequence + 1
            assert thread.call(threading.get_ident) == thread.ident
            # A guest error inside the thread reaches the caller as itself.
            thread.call(guest.memory.write, 0x5000, bytes(8))    # the report's magic
            with pytest.raises(GuestError, match="magic"):
                thread.call(guest.run_until_snapshot)
        finally:
            thread.call(guest.close)
        guest.memory.close()

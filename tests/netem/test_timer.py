"""The relay's timerfd sleeper: never early, not fooled by a timer left from a cancelled sleep."""

from __future__ import annotations

import statistics

import trio

from source_agent.netem._timer import Sleeper


async def test_never_early_and_closes_its_fd(fd_count):
    before = fd_count()
    lateness = []
    with Sleeper() as sleeper:
        assert fd_count() == before + 1
        for _ in range(20):
            deadline = trio.current_time() + 0.001
            await sleeper.sleep_until(deadline)
            lateness.append(trio.current_time() - deadline)
    assert min(lateness) >= 0
    assert statistics.median(lateness) < 0.010  # loaded-host bound; idle it is ~0.05 ms
    assert fd_count() == before


async def test_a_cancelled_sleep_leaves_no_early_wakeup():
    with Sleeper() as sleeper:
        with trio.move_on_after(0.001):
            await sleeper.sleep_until(trio.current_time() + 0.005)
        await trio.sleep(0.010)  # the abandoned timer has now expired: its fd is readable
        deadline = trio.current_time() + 0.020
        await sleeper.sleep_until(deadline)
        assert trio.current_time() >= deadline


async def test_past_deadline_returns_at_once():
    with Sleeper() as sleeper:
        start = trio.current_time()
        await sleeper.sleep_until(start - 1)
        assert trio.current_time() - start < 0.5


async def test_virtual_clock_uses_trio_sleep(autojump_clock):
    with Sleeper() as sleeper:
        start = trio.current_time()
        await sleeper.sleep_until(start + 100)
        assert trio.current_time() == start + 100

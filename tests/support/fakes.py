"""TEST DOUBLES for the agent layer (never for /dev/kvm): a run_point and a destination program.

`FakeAgent` stands where the agents' migration coroutine will: it really
connects through the sweep's injector to the destination (the echo in
fake_dest.py) and measures the RTT with ping-pongs, then returns a report
shaped like the agents' (wall_gap, measurements, downtime phases, verdicts,
outcome) with figures derived from the point, so the sweep's bookkeeping,
statistics and plots can be checked against known values.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import trio

FAKE_DEST = Path(__file__).with_name("fake_dest.py")


def fake_dest_argv(listen: str, psk_file: str | None) -> list[str]:
    argv = [sys.executable, str(FAKE_DEST), "serve", "--listen", listen]
    return argv + (["--psk-file", psk_file] if psk_file else [])


def measurement(value: int | None, mechanism: str, reason: str | None = None) -> dict[str, Any]:
    return {"value_ns": value, "mechanism": mechanism, "reason": reason}


def fake_check(value: int, expected: int, bound: int = 200_000) -> dict[str, Any]:
    ok = abs(value - expected) <= bound
    return {"ok": ok, "detail": "fake", "value_ns": value, "expected_ns": expected,
            "error_ns": value - expected, "lo_ns": expected - bound, "hi_ns": expected + bound,
            "decides": True}


def fake_report(point: Any, *, rtt_ns: int, outcome: str = "passed", xen: bool = False,
                error_ns: int = 0) -> dict[str, Any]:
    """A report shaped like the agents': gap = requested gap + 1 ms + RTT; jump = gap + error_ns."""
    gap = point.gap_ns + 1_000_000 + rtt_ns
    phases = {"capture_ns": 200_000, "gap_ns": point.gap_ns, "transfer_ns": rtt_ns + point.memory_size // 1000,
              "restore_ns": 300_000, "first_entry_ns": 50_000}
    phases["other_ns"] = 10_000
    phases["total_ns"] = sum(phases.values())
    phases["uncertainty_ns"] = 20_000
    return {
        "report_version": 1, "command": "sweep", "topology": "fake", "strategy": point.strategy,
        "memory_size": point.memory_size, "destination": "fake",
        "clock_sync": {"offset_ns": 0, "uncertainty_ns": 20_000, "rtt_ns": rtt_ns, "samples": 3},
        "wall_gap": measurement(gap, "fake: requested gap + 1 ms + rtt"),
        "downtime": phases,
        "measurements": {
            "kvmclock_jump": measurement(gap + error_ns, "fake"),
            "tsc_jump": measurement(gap, "fake"),
            "kvm_steal_delta": measurement(None, "fake", "not measured by the fake"),
            "xen_runnable_delta": (measurement(gap + 2 * error_ns, "fake") if xen else
                                   measurement(None, "fake", "not measurable on this host: no KVM Xen")),
        },
        "verdicts": {
            # As kvmcore.analysis.Check renders them: the figure, the host's over the same
            # events, and a 0.2 ms bound.
            "xen_runnable_in_window": (fake_check(gap + 2 * error_ns, gap) if xen else
                                       {"ok": None, "detail": "not measurable on this host: "
                                        "no KVM Xen"}),
            "kvmclock_follows_gap": fake_check(gap + error_ns, gap),
            "never_backwards": {"ok": outcome == "passed", "detail": "fake"}},
        "outcome": outcome, "exit_code": 0 if outcome == "passed" else 1,
        "error": None if outcome == "passed" else "verdict failed: never_backwards",
    }


class FakeAgent:
    """A run_point double. ``raise_on`` / ``fail_on``: point keys that raise / fail a verdict;
    ``sleep``: extra seconds per point (to interrupt a sweep mid-way); ``error_ns(point)`` the
    accounting error the report carries (default: 10 µs × repeat index)."""

    def __init__(self, *, raise_on: set[str] = frozenset(), fail_on: set[str] = frozenset(),
                 sleep: float = 0.0, xen: bool = False, pings: int = 3) -> None:
        self.raise_on, self.fail_on, self.sleep, self.xen, self.pings = raise_on, fail_on, sleep, xen, pings
        self.calls: list[tuple[str, tuple[str, int]]] = []

    async def __call__(self, point: Any, target: Any) -> dict[str, Any]:
        self.calls.append((point.key, target.address))
        if point.key in self.raise_on:
            raise ConnectionRefusedError(f"fake: refused at {point.key}")
        stream = await trio.open_tcp_stream(*target.address)
        async with stream:
            rtts = []
            for _ in range(self.pings):
                start = trio.current_time()
                await stream.send_all(b"p" * 64)
                got = 0
                while got < 64:
                    data = await stream.receive_some(64 - got)
                    assert data, "fake destination closed mid-ping"
                    got += len(data)
                rtts.append(trio.current_time() - start)
        await trio.sleep(self.sleep)
        return fake_report(point, rtt_ns=round(min(rtts) * 1e9), xen=self.xen,
                           outcome="failed" if point.key in self.fail_on else "passed",
                           error_ns=10_000 * point.repeat)

"""kvmcore.xen's pure helpers used by the lane's tests: runstate area layouts and the runnable
window. Run on any host (no KVM Xen needed)."""
from __future__ import annotations

import struct

from kvmcore import xen


def test_runstate_area_layouts() -> None:
    assert xen.RUNSTATE_AREA_SIZE == {True: 0x30, False: 0x2c}
    rs = xen.Runstate(1, 100, 60, 30, 10, 0)
    wide = struct.pack("<IIQ4Q", 1, 0xDEADBEEF, 100, 60, 30, 10, 0)   # padding ignored
    packed = struct.pack("<IQ4Q", 1, 100, 60, 30, 10, 0)
    assert xen.parse_runstate_area(wide, True) == rs
    assert xen.parse_runstate_area(packed, False) == rs
    # Negative control: each layout misreads the other.
    assert xen.parse_runstate_area(wide[:0x2c], False) != rs
    assert xen.parse_runstate_area(packed + bytes(4), True) != rs


def test_runnable_window() -> None:
    lo, hi = xen.runnable_window(10_000_000, 2_000_000, open_ns=100_000)
    # [gap + open, gap + open + first entry] +- 50 us + 1000 ppm of the upper end.
    assert (lo, hi) == (10_100_000 - 62_100, 12_100_000 + 62_100)
    lo2, hi2 = xen.runnable_window(10_000_000, 2_000_000, open_ns=100_000, uncertainty_ns=1000)
    assert (lo2, hi2) == (lo - 1000, hi + 1000)
    lo3, hi3 = xen.runnable_window(10_000_000, 2_000_000, open_ns=100_000, slack_ppm=5000)
    assert (lo3, hi3) == (10_100_000 - 110_500, 12_100_000 + 110_500)
    # Negative control: a delta that hides the gap (clock=plain) is outside.
    assert not lo <= 3_000_000 <= hi

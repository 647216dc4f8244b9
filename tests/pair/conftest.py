"""Shared set-up of the pair's tests (tests/pair).

The pure parts of tools/xen_pair run everywhere. Tests marked `pair` boot two lane machines under
QEMU/TCG (about a minute and a half on two loaded cores): they run when KVM_TESTBED_RUN_PAIR=1,
which `./dev pair` (no arguments) sets; otherwise they are skipped, saying how to run them.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# tools/xen_pair and tools/xen_lane.py are importable through pyproject's pytest pythonpath.

SKIP_REASON = "boots the pair (two QEMU machines, ~90 s): run ./dev pair (KVM_TESTBED_RUN_PAIR=1)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).resolve().parent
    if os.environ.get("KVM_TESTBED_RUN_PAIR") != "1":
        skip = pytest.mark.skip(reason=SKIP_REASON)
    elif shutil.which("qemu-system-x86_64") is None:
        skip = pytest.mark.skip(reason="unsupported on this host: qemu-system-x86_64 (.ci/xen-lane)")
    else:
        return
    for item in items:
        if item.get_closest_marker("pair") and item.path.is_relative_to(here):
            item.add_marker(skip)

"""Shared set-up of the kernel Xen lane's tests (tests/xen).

Tests marked `xen_lane` need a kernel with KVM Xen. This machine's kernel has none, so they run inside
the lane (tools/xen_lane.py boots one and sets KVM_TESTBED_LANE=xen). Outside the lane they are
skipped, naming the missing capability, unless the host kernel has it after all. Inside the lane they
are never skipped: a lane kernel without KVM Xen must fail loudly, not pass by skipping.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from xen_lane_probe import UNSUPPORTED, in_lane, xen_hvm_bits

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # This hook sees the whole session's items; only this directory's are ours to skip.
    if in_lane() or xen_hvm_bits():
        return
    skip = pytest.mark.skip(reason=UNSUPPORTED)
    for item in items:
        if "xen_lane" in item.keywords and item.path.is_relative_to(HERE):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def lane_tool() -> ModuleType:
    """tools/xen_lane.py as a module (it is a script, not part of the installed package)."""
    path = REPO / "tools" / "xen_lane.py"
    spec = importlib.util.spec_from_file_location("xen_lane_tool", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module

"""Shared set-up of the kernel Xen lane's tests (tests/xen).

Tests marked `xen_lane` need a kernel with KVM Xen. This machine's kernel has none, so they run inside
the lane (tools/xen_lane.py boots one and sets KVM_TESTBED_LANE=xen). Outside the lane they are
skipped, naming the missing capability, unless the host kernel has it after all. Inside the lane they
are never skipped: a lane kernel without KVM Xen must fail loudly, not pass by skipping.
"""
from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import pytest

from xen_lane_probe import (CLOCK_GUEST_UNSUPPORTED, UNSUPPORTED, clock_guest_patched, in_lane,
                             xen_hvm_bits)

if TYPE_CHECKING:
    from kvmcore import System

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


@pytest.fixture(scope="session", autouse=True)
def xen_static_key_pinned() -> Iterator[None]:
    """Inside the lane, one Xen-configured VM lives for the whole session.

    KVM flips static keys -- patches kernel text through int3 breakpoints -- when the first VM is
    created and the last destroyed (`preempt_notifier_key`, inline in __schedule) and when the
    first VM configures the Xen hypercall MSR (`kvm_xen_enabled`). Under QEMU's multi-threaded
    TCG that patching once oopsed the lane kernel (int3 in __schedule), so the tests keep both
    keys on instead of flipping them with every VM they create and destroy (subprocesses' VMs
    included). docs/xen-lane.md has the evidence."""
    if not in_lane():
        yield
        return
    from kvmcore import Guest, GuestConfig, System
    with System() as kvm, Guest.create(kvm, GuestConfig(xen=True)):
        yield


@pytest.fixture(scope="module")
def clock_guest_kvm() -> Iterator[System]:
    """/dev/kvm (a kvmcore System) with KVM_[GS]ET_CLOCK_GUEST, for a module's tests: a skip
    naming the ioctl where they are absent, a failure where the lane loaded the patched modules
    and the probe does not find them."""
    from kvmcore import System, probe
    with System() as kvm:
        caps = probe(kvm)
        if clock_guest_patched():
            assert caps.clock_guest is True, f"patched modules loaded, yet {caps.clock_guest_detail}"
        elif not caps.clock_guest:
            pytest.skip(CLOCK_GUEST_UNSUPPORTED)
        yield kvm


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

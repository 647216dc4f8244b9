"""Host side: a real boot of the lane propagates the command's exit status (about 10-30 s a boot,
so only with KVM_TESTBED_RUN_LANE=1; never inside the lane itself)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    os.environ.get("KVM_TESTBED_RUN_LANE") != "1" or os.environ.get("KVM_TESTBED_LANE"),
    reason="boots the Xen lane (~20 s): set KVM_TESTBED_RUN_LANE=1 to run",
)


def run_lane(results: Path, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "xen_lane.py"), "--results", str(results),
         "--timeout", "150", "--", *command],
        capture_output=True, text=True, timeout=200)


@pytest.mark.parametrize("command, status", [
    (["/bin/sh", "-c", "echo in-lane=$KVM_TESTBED_LANE; exit 7"], 7),
    (["/bin/sh", "-c", "echo in-lane=$KVM_TESTBED_LANE; true"], 0),  # negative control of the above
])
def test_exit_status_propagates(tmp_path: Path, command: list[str], status: int) -> None:
    proc = run_lane(tmp_path, *command)
    assert proc.returncode == status, proc.stderr
    assert "in-lane=xen" in proc.stdout  # the output is shown, and came from inside
    assert (tmp_path / "status").read_text().strip() == str(status)
    assert not (tmp_path / "lane").exists()  # scratch (initramfs, job, HOME) is cleaned up


def test_kernel_panic_is_retried_once_then_fails(tmp_path: Path) -> None:
    """A panic on the console (here a deliberate one: sysrq crash) -> one retry, then status 125."""
    proc = run_lane(tmp_path, "/bin/sh", "-c", "echo c > /proc/sysrq-trigger; sleep 30")
    assert proc.returncode == 125, proc.stderr
    assert "retrying once" in proc.stderr and "oops/panic on the console twice" in proc.stderr
    assert (tmp_path / "console-oops-1.log").is_file() and (tmp_path / "console-oops-2.log").is_file()


def test_timeout_kills_qemu(tmp_path: Path) -> None:
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "xen_lane.py"), "--results", str(tmp_path),
         "--timeout", "20", "--", "sleep", "600"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 124, proc.stderr
    assert time.monotonic() - start < 40
    # No QEMU left behind that still uses this results directory.
    leftover = subprocess.run(["pgrep", "-f", f"path={tmp_path}"], capture_output=True, text=True)
    assert leftover.stdout == ""

"""Host side: a real boot of the lane propagates the command's exit status (about 10-30 s a boot,
so only with KVM_TESTBED_RUN_LANE=1; never inside the lane itself)."""
from __future__ import annotations

import os
import subprocess
import sys
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

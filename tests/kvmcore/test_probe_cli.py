"""The probe's command line: both spellings, from the checkout root, and its errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]


def probe(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "kvm-probe"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, check=False)


def test_the_module_form_works_from_the_checkout_root():
    # What a README reader types, standing in the checkout: the source tree is on
    # sys.path first, so it must be the package (the compiled bindings beside it).
    proc = subprocess.run([sys.executable, "-m", "kvmcore", "probe"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "default_strategy" in proc.stdout


def test_console_script_prints_the_default_strategy():
    proc = probe()
    assert proc.returncode == 0, proc.stderr
    assert any(line.split()[:1] == ["default_strategy"] and "clock=" in line
               for line in proc.stdout.splitlines())


@pytest.mark.parametrize(("device", "line"), [
    ("/nonexistent/kvm", "cannot open /nonexistent/kvm: No such file or directory"),
    ("/dev/null", "/dev/null is not usable: KVM_GET_API_VERSION failed: ENOTTY "
                  "(Inappropriate ioctl for device)"),
])
def test_no_usable_device_is_one_line_and_exit_2(device, line):
    proc = probe("--device", device)
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", f"kvm-probe: {line}\n")
    # Negative control: the real device probes.
    assert probe("--device", "/dev/kvm").returncode == 0

"""The README's commands as a reader types them, standing in the checkout root.

The source tree is then first on sys.path, so it must be the installed package
(./dev installs it in editable mode): a plain install would leave ./kvmcore
without its compiled bindings and every ``python -m`` form would fail.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("argv", [
    ["-m", "kvmcore", "probe", "--help"],
    ["-m", "source_agent", "--help"],
    ["-m", "source_agent", "loopback", "--help"],
    ["-m", "source_agent.sweep", "--help"],
    ["-m", "dest_agent", "serve", "--help"],
])
def test_module_forms_work_from_the_checkout_root(argv):
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


@pytest.mark.parametrize("script", ["source-agent", "dest-agent", "kvm-probe"])
def test_every_documented_command_has_a_console_script(script):
    proc = subprocess.run([str(BIN / script), "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr


def test_set_up_leaves_no_build_products_in_the_checkout():
    leftovers = [p.name for p in REPO.iterdir() if p.name == "build" or p.suffix == ".egg-info"]
    assert leftovers == []

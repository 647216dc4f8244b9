"""Every benchmark still runs (tiny sizes, nothing timed): figures are printed, never asserted.

The benches are not part of the suite's speed claims, but a bench that no longer starts
(a renamed path, an API that moved) is a broken promise of the README's Development
section; this catches it on every run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
SMALL = {
    "kvmcore_cycle.py": ["--cycles", "1", "--sizes", "2"],     # includes the C reference
    "agents_loopback.py": ["--runs", "1", "--no-c"],
    "live_migration.py": ["--runs", "1", "--big-mib", "16", "--no-c"],
    "data_path.py": ["--mib", "2", "--runs", "1"],
    "memory_mac.py": ["--sizes-mib", "2"],
    "protocol_fuzz.py": ["--inputs", "200"],
    "protocol_throughput.py": ["--sizes-mib", "2"],
    "relay_overhead.py": ["--pings", "5", "--megabytes", "2"],
    "soak.py": ["--runs", "3"],
    "sweep_throughput.py": ["--repeat", "1"],
}


def run_bench(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCH / name), *args], capture_output=True,
                          text=True, timeout=180, check=False)


def test_every_bench_is_listed():
    scripts = {p.name for p in BENCH.glob("*.py") if p.name != "protocol_common.py"}
    assert scripts == set(SMALL)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_bench_runs_at_a_tiny_size(name):
    proc = run_bench(name, *SMALL[name])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()


def test_a_broken_bench_is_seen():
    # Negative control: an option the bench does not take fails it.
    assert run_bench("kvmcore_cycle.py", "--no-such-option").returncode != 0

"""The report a user gets inside the lane, as the docs tell them to get it:
`source-agent loopback --runstate kernel --tsc offset --json` with the default results database.

In the lane HOME (so the default database) is on the writable 9p share, which has no shared
mmap: SQLite's WAL fails there with "disk I/O error". The store then uses the rollback journal
(source_agent.results.ResultsStore._leave_wal); the run is recorded with its verdicts, the headline
verdict xen_runnable_in_window among them.
"""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest

# Compiled into the lane's PYTHONPYCACHEPREFIX on the host (see test_xen_migration.py).
import source_agent.__main__  # noqa: F401
from source_agent.results import ResultsStore, default_db_path

BIN = Path(sys.executable).parent


def wal_error(directory: Path) -> str | None:
    """What SQLite says when a WAL database is used in ``directory`` (None: it works)."""
    path = directory / "wal-probe.sqlite3"
    try:
        with closing(sqlite3.connect(path)) as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("CREATE TABLE t (x)")
        return None
    except sqlite3.OperationalError as exc:
        return str(exc)
    finally:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


@pytest.mark.xen_lane
def test_loopback_report_with_the_default_database() -> None:
    db = default_db_path()
    db.parent.mkdir(parents=True, exist_ok=True)
    # Negative control: the filesystem really lacks what WAL needs (else this test shows nothing).
    assert wal_error(db.parent) == "disk I/O error", "the default database's filesystem has WAL"
    run = subprocess.run([str(BIN / "source-agent"), "loopback", "--runstate", "kernel",
                          "--tsc", "offset", "--gap", "10ms", "--json"],
                         capture_output=True, text=True, timeout=240, env=dict(os.environ))
    assert run.returncode == 0, run.stderr + run.stdout[-2000:]
    report = json.loads(run.stdout)
    window = report["verdicts"]["xen_runnable_in_window"]
    print(f"xen_runnable_in_window: {window['detail']}")
    assert window["ok"] is True and window["decides"] is True
    # The default clock is the best the host has: KVM_SET_CLOCK_GUEST with the lane's
    # --clock-guest modules (docs/clock-guest.md), else KVM_SET_CLOCK with REALTIME.
    clock = "guest" if os.environ.get("KVM_TESTBED_CLOCK_GUEST") == "patched" else "realtime"
    assert report["strategy"] == f"clock={clock},tsc=offset,runstate=kernel"
    store = ResultsStore(db)
    assert store.journal_mode == "delete"
    [row] = [r for r in store.runs() if r["run_id"] == report["run_id"]]
    assert row["outcome"] == "passed"
    stored = {v["name"]: v for v in store.verdicts() if v["run_id"] == report["run_id"]}
    assert stored["xen_runnable_in_window"]["ok"] is True
    assert stored["xen_runnable_in_window"]["value_ns"] == window["value_ns"]

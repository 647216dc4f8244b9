"""The results store's sweep registry (register_sweep / sweep_config), added for resumable sweeps."""

from __future__ import annotations

import sqlite3

from source_agent.results import ResultsStore, RunRecord


def _run(run_id: str, sweep: str) -> RunRecord:
    return RunRecord(run_id=run_id, started_at="2026-11-27T10:00:00.000Z",
                     finished_at="2026-11-27T10:00:00.000Z", command="sweep", outcome="passed",
                     exit_code=0, report={}, sweep=sweep, point="p")


def test_the_first_registration_wins_and_later_ones_read_it(tmp_path):
    store = ResultsStore(tmp_path / "r.db")
    assert store.sweep_config("s") is None
    first = {"axes": {"latency": ["0ms", "5ms"]}, "topology": "loopback"}
    assert store.register_sweep("s", first, "2026-11-27T10:00:00.000Z") == first
    store.record(_run("1", "s"))
    other = {"axes": {"latency": ["1ms"]}, "topology": "netns"}
    assert store.register_sweep("s", other, "2026-11-27T11:00:00.000Z") == first  # not overwritten
    assert store.sweep_config("s") == first
    assert store.register_sweep("t", other, "2026-11-27T11:00:00.000Z") == other
    assert store.integrity_check() == "ok"


def test_a_database_from_before_sweeps_gains_the_table_on_first_use(tmp_path):
    path = tmp_path / "r.db"
    ResultsStore(path)  # the runs table only
    con = sqlite3.connect(path)
    try:
        assert con.execute("SELECT name FROM sqlite_master WHERE name = 'sweeps'").fetchone() is None
    finally:
        con.close()
    store = ResultsStore(path)
    assert store.sweep_config("s") is None  # reading does not create it
    store.register_sweep("s", {"axes": {}}, "2026-11-27T10:00:00.000Z")
    assert store.sweep_config("s") == {"axes": {}}


def test_a_name_without_any_run_is_not_bound_by_its_settings(tmp_path):
    """Issue 10 item 12: a sweep that stopped before its first run (older versions stored its
    settings at once) does not refuse the corrected rerun; once it has a run, it does."""
    store = ResultsStore(tmp_path / "r.db")
    refused = {"axes": {}, "topology": "netns"}
    store.register_sweep("s", refused, "2026-11-27T10:00:00.000Z")
    corrected = {"axes": {}, "topology": "loopback"}
    assert store.register_sweep("s", corrected, "2026-11-27T10:01:00.000Z") == corrected
    store.record(_run("1", "s"))
    assert store.register_sweep("s", refused, "2026-11-27T10:02:00.000Z") == corrected  # control

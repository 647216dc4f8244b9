"""The results store's sweep registry (register_sweep / sweep_config), added for resumable sweeps."""

from __future__ import annotations

import sqlite3

from source_agent.results import ResultsStore


def test_the_first_registration_wins_and_later_ones_read_it(tmp_path):
    store = ResultsStore(tmp_path / "r.db")
    assert store.sweep_config("s") is None
    first = {"axes": {"latency": ["0ms", "5ms"]}, "topology": "loopback"}
    assert store.register_sweep("s", first, "2026-11-27T10:00:00.000Z") == first
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

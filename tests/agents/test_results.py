"""The results store keeps every run, failed ones too, and never loses one already stored."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from contextlib import closing

import pytest

from source_agent.results import (
    ResultsStore,
    ResultsStoreError,
    RunRecord,
    export_csv,
    export_json,
    iter_csv_rows,
)


def run(run_id: str, *, outcome: str = "passed", started: str = "2026-11-27T10:00:00Z", **kw) -> RunRecord:
    return RunRecord(
        run_id=run_id, started_at=started, finished_at=started, command="migrate",
        outcome=outcome,
        exit_code={"passed": 0, "failed": 1, "error": 3, "rolled back": 3}[outcome],
        report={"run_id": run_id, "nested": {"x": [1, 2]}}, **kw,
    )


def test_runs_are_stored_and_listed_oldest_first(tmp_path):
    store = ResultsStore(tmp_path / "r.db")
    store.record(run("b", started="2026-11-27T10:00:02Z", wall_gap_ns=10_000_000))
    store.record(run("a", started="2026-11-27T10:00:01Z", outcome="error", error="peer reset"))
    rows = store.runs()
    assert [r["run_id"] for r in rows] == ["a", "b"]
    assert rows[0]["outcome"] == "error" and rows[0]["error"] == "peer reset"
    assert rows[1]["wall_gap_ns"] == 10_000_000
    assert rows[1]["report"] == {"run_id": "b", "nested": {"x": [1, 2]}}
    assert [r["run_id"] for r in store.runs(limit=1)] == ["b"]


def test_duplicate_run_id_is_refused_and_the_stored_run_survives(tmp_path):
    store = ResultsStore(tmp_path / "r.db")
    store.record(run("a", wall_gap_ns=1))
    with pytest.raises(sqlite3.IntegrityError):
        store.record(run("a", wall_gap_ns=2))
    assert [(r["run_id"], r["wall_gap_ns"]) for r in store.runs()] == [("a", 1)]
    assert store.integrity_check() == "ok"


def test_bad_outcome_is_refused_by_the_schema(tmp_path):
    store = ResultsStore(tmp_path / "r.db")
    with pytest.raises(sqlite3.IntegrityError):
        store.record(dataclasses.replace(run("a"), outcome="maybe"))
    assert store.runs() == []


def test_a_file_that_is_not_a_database_is_a_clear_error_and_is_left_alone(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"my precious notes, not sqlite" * 100)
    with pytest.raises(ResultsStoreError, match="cannot use as a results database"):
        ResultsStore(path)
    assert path.read_bytes() == b"my precious notes, not sqlite" * 100


def test_database_is_in_wal_mode(tmp_path):
    ResultsStore(tmp_path / "r.db")
    con = sqlite3.connect(tmp_path / "r.db")
    try:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        con.close()


def test_sweep_points_done_counts_passed_and_failed_but_not_errored(tmp_path):
    store = ResultsStore(tmp_path / "r.db")
    store.record(run("1", sweep="s", point="p1"))
    store.record(run("2", sweep="s", point="p2", outcome="failed"))
    store.record(run("3", sweep="s", point="p3", outcome="error"))
    store.record(run("4", sweep="other", point="p4"))
    store.record(run("5", sweep="s", point="p5", outcome="rolled back"))
    assert store.points_done("s") == {"p1", "p2"}


#: The runs table as schema version 1 wrote it (before "rolled back" and the migration columns).
V1_RUNS = """
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY, started_at TEXT NOT NULL, finished_at TEXT NOT NULL,
    command TEXT NOT NULL, sweep TEXT, point TEXT,
    outcome TEXT NOT NULL CHECK (outcome IN ('passed', 'failed', 'error')),
    exit_code INTEGER NOT NULL, error TEXT, destination TEXT, strategy TEXT, memory_size INTEGER,
    wall_gap_ns INTEGER, kvmclock_jump_ns INTEGER, tsc_jump_ns INTEGER, steal_delta_ns INTEGER,
    runnable_delta_ns INTEGER, downtime_ns INTEGER, report TEXT NOT NULL) STRICT;
CREATE INDEX runs_by_sweep ON runs (sweep, point);
PRAGMA user_version=1;
INSERT INTO runs VALUES ('old', '2026-11-27T10:00:00Z', '2026-11-27T10:00:01Z', 'migrate', 's',
    'p', 'passed', 0, NULL, 'h:1', 'clock=realtime,tsc=none,runstate=off', 2097152, 10, 11, 12,
    13, NULL, 14, '{"run_id": "old", "z": 1, "a": 2}');
"""


def test_a_version_1_database_reads_as_is_and_is_upgraded_keeping_its_runs(tmp_path):
    path = tmp_path / "r.db"
    with closing(sqlite3.connect(path)) as con:
        con.executescript(V1_RUNS)
    # Negative control: version 1's schema refuses the new outcome.
    with closing(sqlite3.connect(path)) as con, pytest.raises(sqlite3.IntegrityError):
        con.execute("INSERT INTO runs (run_id, started_at, finished_at, command, outcome, "
                    "exit_code, report) VALUES ('x', 't', 't', 'c', 'rolled back', 3, '{}')")
    before = ResultsStore(path, read_only=True).runs()     # a reader never upgrades
    assert before[0]["mode"] is None and before[0]["downtime_ns"] == 14
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 1
    store = ResultsStore(path)                              # a writer does, in place
    with closing(sqlite3.connect(path)) as con:
        assert con.execute("PRAGMA user_version").fetchone()[0] == 2
        assert con.execute("SELECT report FROM runs").fetchone()[0] == (
            '{"run_id": "old", "z": 1, "a": 2}')           # byte for byte
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert "runs_by_sweep" in {r[1] for r in con.execute("PRAGMA index_list(runs)")}
    assert store.runs() == before
    store.record(run("new", outcome="rolled back", started="2026-11-28T10:00:00Z", mode="precopy",
                     rounds=3, converged=1))
    rows = store.runs()
    assert [(r["run_id"], r["outcome"], r["mode"], r["rounds"]) for r in rows] == [
        ("old", "passed", None, None), ("new", "rolled back", "precopy", 3)]
    assert store.verdicts() == []                           # backfilled from the old run
    assert ResultsStore(path).runs() == rows                # opening again changes nothing


def test_exports_round_trip(tmp_path):
    store = ResultsStore(tmp_path / "r.db")
    store.record(run("a", wall_gap_ns=5))
    store.record(run("b", started="2026-11-27T11:00:00Z", outcome="failed"))
    rows = store.runs()
    assert json.loads(export_json(rows)) == rows
    parsed = list(iter_csv_rows(export_csv(rows)))
    assert [p["run_id"] for p in parsed] == ["a", "b"]
    assert parsed[0]["wall_gap_ns"] == "5" and parsed[1]["wall_gap_ns"] == ""
    assert json.loads(parsed[0]["report"]) == rows[0]["report"]


def test_a_normal_disk_keeps_wal_and_full_sync(tmp_path):
    """The 9p fallback (rollback journal) must not reach a normal disk: WAL stays."""
    store = ResultsStore(tmp_path / "r.db")
    assert store.journal_mode == "wal"
    with store._connect() as con:
        assert con.execute("PRAGMA synchronous").fetchone()[0] == 2      # FULL


def _verdicts_report(run_id: str) -> dict:
    return {"run_id": run_id, "verdicts": {
        "kvmclock_follows_gap": {"ok": True, "detail": "in", "value_ns": 10, "expected_ns": 9,
                                 "error_ns": 1, "lo_ns": 5, "hi_ns": 15, "decides": True},
        "a_verdict_added_later": {"ok": False, "detail": "out", "decides": False},
        "xen_runnable_in_window": {"ok": None, "detail": "not measurable on this host: no KVM Xen"}}}


def test_verdicts_are_stored_one_row_per_name_whatever_the_name(tmp_path):
    store = ResultsStore(tmp_path / "r.db")
    store.record(dataclasses.replace(run("a", sweep="s"), report=_verdicts_report("a")))
    store.record(run("b"))                      # no verdicts (an errored sweep run): no rows
    rows = store.verdicts()
    assert [(r["run_id"], r["name"], r["ok"], r["decides"]) for r in rows] == [
        ("a", "kvmclock_follows_gap", True, True), ("a", "a_verdict_added_later", False, False),
        ("a", "xen_runnable_in_window", None, True)]
    assert rows[0]["value_ns"] == 10 and rows[0]["lo_ns"] == 5 and rows[0]["hi_ns"] == 15
    assert [r["name"] for r in store.verdicts(name="kvmclock_follows_gap", sweep="s")] == [
        "kvmclock_follows_gap"]
    assert store.verdicts(sweep="other") == []


def test_a_run_and_its_verdicts_are_one_transaction(tmp_path):
    store = ResultsStore(tmp_path / "r.db")
    bad = _verdicts_report("a")
    bad["verdicts"]["kvmclock_follows_gap"]["ok"] = 2      # the schema's CHECK refuses it
    with pytest.raises(sqlite3.IntegrityError):
        store.record(dataclasses.replace(run("a"), report=bad))
    assert store.runs() == [] and store.verdicts() == []


def test_a_database_from_before_the_verdicts_table_is_backfilled(tmp_path):
    path = tmp_path / "r.db"
    ResultsStore(path).record(dataclasses.replace(run("a"), report=_verdicts_report("a")))
    with sqlite3.connect(path) as con:
        con.execute("DROP TABLE verdicts")       # as written by the tool before it existed
    con.close()
    assert sorted(r["name"] for r in ResultsStore(path).verdicts()) == [
        "a_verdict_added_later", "kvmclock_follows_gap", "xen_runnable_in_window"]


def test_without_wal_support_a_wal_database_is_switched_to_the_rollback_journal(tmp_path,
                                                                               monkeypatch):
    """Where the probe finds no WAL (the lane's 9p share: tests/xen/test_xen_report.py runs it
    for real), a database left in WAL mode is switched back and keeps every run."""
    path = tmp_path / "r.db"
    ResultsStore(path).record(run("a"))                      # written in WAL mode
    assert path.read_bytes()[18:20] == b"\x02\x02"           # the header says WAL
    monkeypatch.setattr(ResultsStore, "_wal_works", lambda self: False)
    store = ResultsStore(path)
    assert store.journal_mode == "delete"
    assert path.read_bytes()[18:20] == b"\x01\x01"           # rollback journal now
    store.record(run("b", started="2026-11-27T10:00:05Z"))
    assert [r["run_id"] for r in store.runs()] == ["a", "b"]
    assert store.integrity_check() == "ok"
    # Negative control: with the probe succeeding, the same database goes back to WAL.
    monkeypatch.undo()
    assert ResultsStore(path).journal_mode == "wal"


def test_the_wal_probe_leaves_nothing_behind(tmp_path):
    ResultsStore(tmp_path / "r.db")
    assert sorted(p.name for p in tmp_path.iterdir() if "probe" in p.name) == []

"""``source-agent results``: a reading command never writes, refuses foreign databases, filters,
and ``show`` prints a stored report exactly as its run printed it (issue 10 items 15, 18)."""

from __future__ import annotations

import hashlib
import json
import sqlite3

import pytest

from source_agent.results import ResultsStore, RunRecord
from source_agent.results_cli import parse_since


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(directory) -> set[str]:
    return {p.name for p in directory.iterdir()}


def test_show_prints_the_stored_report_exactly_as_the_run_printed_it(cli, tmp_path):
    """Negative control: a report stored with sorted keys (as before) does not reproduce --json."""
    db = tmp_path / "r.db"
    as_json = cli("source-agent", "loopback", "--json", "--db", str(db))
    assert as_json.code == 0, as_json.stderr
    run_id = as_json.json()["run_id"]
    shown = cli("source-agent", "results", "show", run_id, "--json", "--db", str(db))
    assert shown.code == 0 and shown.stdout == as_json.stdout
    assert json.dumps(as_json.json(), indent=2, sort_keys=True) + "\n" != as_json.stdout
    tables = cli("source-agent", "loopback", "--db", str(db))
    assert tables.code == 0, tables.stderr
    [latest] = ResultsStore(db, read_only=True).runs(limit=1)
    shown = cli("source-agent", "results", "show", latest["run_id"][:17], "--db", str(db))
    assert shown.code == 0 and shown.stdout == tables.stdout      # a unique prefix is enough


def test_show_of_an_error_run_and_of_a_missing_one(cli, tmp_path):
    db = tmp_path / "r.db"
    failed = cli("source-agent", "migrate", "--to", "127.0.0.1:1", "--db", str(db))
    assert failed.code == 3
    [row] = ResultsStore(db, read_only=True).runs()
    shown = cli("source-agent", "results", "show", row["run_id"], "--db", str(db))
    assert shown.code == 0 and shown.stdout == failed.stdout and "error" in shown.stdout
    missing = cli("source-agent", "results", "show", "19990101T000000-00000000", "--db", str(db))
    assert missing.code == 2 and "no run '19990101T000000-00000000'" in missing.stderr
    no_id = cli("source-agent", "results", "show", "--db", str(db))
    assert no_id.code == 2 and "RUN_ID" in no_id.stderr


def test_a_foreign_database_is_refused_and_left_byte_for_byte_alone(cli, tmp_path):
    """Issue 10 item 15. Negative control: the testbed's own database is read."""
    foreign = tmp_path / "foreign.sqlite"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE notes (body TEXT)")
    con.execute("INSERT INTO notes VALUES ('mine')")
    con.commit()
    con.close()
    before = _digest(foreign)
    for action in (("list",), ("export",), ("show", "x")):
        run = cli("source-agent", "results", *action, "--db", str(foreign))
        assert run.code == 2 and "not a testbed results database" in run.stderr, run.stderr
        assert "Traceback" not in run.stderr and run.stdout == ""
    # Neither does a run write its tables into it.
    run = cli("source-agent", "migrate", "--to", "127.0.0.1:1", "--db", str(foreign))
    assert run.code == 2 and "not a testbed results database" in run.stderr
    assert _digest(foreign) == before and _files(tmp_path) == {"foreign.sqlite"}
    ours = tmp_path / "ours.db"
    ResultsStore(ours)
    assert cli("source-agent", "results", "list", "--db", str(ours)).code == 0


def test_reading_never_creates_or_changes_a_file(cli, tmp_path):
    """Read-only: no database from a typo, no -wal/-shm left beside a quiet one, nothing changed."""
    run = cli("source-agent", "results", "list", "--db", str(tmp_path / "typo.db"))
    assert run.code == 2 and "no results database there" in run.stderr
    assert _files(tmp_path) == set()
    db = tmp_path / "r.db"
    ResultsStore(db).record(RunRecord(run_id="a", started_at="2026-11-27T10:00:00.000Z",
                                      finished_at="2026-11-27T10:00:00.000Z", command="migrate",
                                      outcome="passed", exit_code=0, report={}))
    files, before = _files(tmp_path), _digest(db)
    for action in (("list",), ("export", "--format", "csv"), ("show", "a", "--json")):
        assert cli("source-agent", "results", *action, "--db", str(db)).code == 0
    assert _files(tmp_path) == files and _digest(db) == before
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    run = cli("source-agent", "results", "list", "--db", str(empty))
    assert run.code == 2 and "no testbed results in it" in run.stderr


def _stored(db, run_id: str, started: str, outcome: str, sweep: str | None) -> None:
    ResultsStore(db).record(RunRecord(
        run_id=run_id, started_at=started, finished_at=started, command="sweep" if sweep else "migrate",
        outcome=outcome,
        exit_code={"passed": 0, "failed": 1, "error": 3, "rolled back": 3}[outcome],
        report={"run_id": run_id}, sweep=sweep, point="p" if sweep else None))


def test_list_and_export_filter_by_sweep_outcome_and_time(cli, tmp_path):
    db = tmp_path / "r.db"
    _stored(db, "old", "2026-11-26T23:59:59.999Z", "passed", "lat")
    _stored(db, "new-error", "2026-11-27T00:00:00.000Z", "error", "lat")
    _stored(db, "new-other", "2026-11-27T10:00:00.000Z", "passed", "size")
    _stored(db, "new-migrate", "2026-11-28T10:00:00.000Z", "failed", None)
    _stored(db, "back", "2026-11-28T11:00:00.000Z", "rolled back", None)

    def ids(*argv: str) -> list[str]:
        run = cli("source-agent", "results", "export", "--db", str(db), *argv)
        assert run.code == 0, run.stderr
        return [r["run_id"] for r in json.loads(run.stdout)]

    assert ids() == ["old", "new-error", "new-other", "new-migrate", "back"]   # control
    assert ids("--sweep", "lat") == ["old", "new-error"]
    assert ids("--outcome", "error") == ["new-error"]
    assert ids("--outcome", "rolled back") == ["back"]
    assert ids("--since", "2026-11-27") == ["new-error", "new-other", "new-migrate", "back"]
    assert ids("--since", "2026-11-27T11:00+01:00") == ["new-other", "new-migrate", "back"]
    assert ids("--sweep", "lat", "--since", "2026-11-27", "--outcome", "passed") == []
    assert ids("--since", "1min") == []
    listing = cli("source-agent", "results", "list", "--db", str(db), "--sweep", "size")
    assert listing.code == 0 and "new-other" in listing.stdout and "old" not in listing.stdout
    bad = cli("source-agent", "results", "list", "--db", str(db), "--since", "yesterday")
    assert bad.code == 2 and "--since 'yesterday'" in bad.stderr


@pytest.mark.parametrize("text, expected", [
    ("2026-11-27", "2026-11-27T00:00:00.000Z"),
    ("2026-11-27T12:30:05.25Z", "2026-11-27T12:30:05.250Z"),
    ("2026-11-27T12:30+02:00", "2026-11-27T10:30:00.000Z"),
    ("2h", "2026-11-27T10:00:00.000Z"),
])
def test_since_forms(text, expected):
    assert parse_since(text, now_ns=1_795_780_800 * 10**9) == expected

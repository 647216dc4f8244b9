"""The results store: every run the source agent drives, kept in SQLite.

Why SQLite: experiments run for hours and get interrupted. A write-ahead-log
database with one transaction per run means a run is either wholly present or
wholly absent after a crash or a ``kill -9``, and readers (``source-agent
results``) never block a sweep that is writing.

Each run is one row. The columns are the figures people filter and plot on;
the full report (whatever the agents measured, with mechanisms and verdicts)
is kept alongside as JSON so nothing is lost when the report grows. Failed
runs are recorded too, with the error, so a sweep's denominator is honest.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import time
import urllib.parse
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

#: 2: outcome "rolled back" (the source guest resumed after a failed migration), and the
#: migration's mode, rounds and convergence (source_agent.stats). A version-1 database is
#: upgraded in place, in one transaction, its runs kept as they were (the new columns NULL).
SCHEMA_VERSION = 2
#: Outcomes a run may have: its verdicts passed or failed; it failed before a verdict with the
#: source guest lost or never made (error) or resumed and running on (rolled back).
OUTCOMES = ("passed", "failed", "error", "rolled back")
#: The outcomes of a run that completed (has figures and verdicts); the others are retried.
COMPLETED = ("passed", "failed")

_RUNS_TABLE = """
CREATE TABLE {table} (
    run_id            TEXT PRIMARY KEY,
    started_at        TEXT NOT NULL,
    finished_at       TEXT NOT NULL,
    command           TEXT NOT NULL,
    sweep             TEXT,
    point             TEXT,
    outcome           TEXT NOT NULL CHECK (outcome IN ({outcomes})),
    exit_code         INTEGER NOT NULL,
    error             TEXT,
    destination       TEXT,
    strategy          TEXT,
    memory_size       INTEGER,
    wall_gap_ns       INTEGER,
    kvmclock_jump_ns  INTEGER,
    tsc_jump_ns       INTEGER,
    steal_delta_ns    INTEGER,
    runnable_delta_ns INTEGER,
    downtime_ns       INTEGER,
    report            TEXT NOT NULL,
    mode              TEXT,
    rounds            INTEGER,
    converged         INTEGER CHECK (converged IN (0, 1))
) STRICT;
"""
_SCHEMA = _RUNS_TABLE.format(table="runs", outcomes=", ".join(f"'{o}'" for o in OUTCOMES)) + """
CREATE INDEX IF NOT EXISTS runs_by_sweep ON runs (sweep, point);
"""

#: One row per verdict of a run, whatever its name: a new verdict (kvmcore.analysis.Check)
#: needs no schema change. ok: 1 passed, 0 failed, NULL not measurable / not run.
_VERDICTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS verdicts (
    run_id      TEXT NOT NULL REFERENCES runs (run_id),
    name        TEXT NOT NULL,
    ok          INTEGER CHECK (ok IN (0, 1)),
    decides     INTEGER NOT NULL CHECK (decides IN (0, 1)),
    value_ns    INTEGER,
    expected_ns INTEGER,
    lo_ns       INTEGER,
    hi_ns       INTEGER,
    detail      TEXT NOT NULL,
    PRIMARY KEY (run_id, name)
) STRICT
"""
VERDICT_COLUMNS = ("run_id", "name", "ok", "decides", "value_ns", "expected_ns", "lo_ns",
                   "hi_ns", "detail")

#: Sweeps and their configuration (axes, topology), created on first use by register_sweep.
_SWEEPS_SCHEMA = """
CREATE TABLE IF NOT EXISTS sweeps (
    name       TEXT PRIMARY KEY,
    created_at TEXT NOT NULL,
    config     TEXT NOT NULL
) STRICT
"""

#: Columns of a version-1 database: every testbed database has them.
COLUMNS_V1 = (
    "run_id", "started_at", "finished_at", "command", "sweep", "point", "outcome",
    "exit_code", "error", "destination", "strategy", "memory_size", "wall_gap_ns",
    "kvmclock_jump_ns", "tsc_jump_ns", "steal_delta_ns", "runnable_delta_ns",
    "downtime_ns", "report",
)
#: Columns in the order ``results`` exports them.
COLUMNS = (*COLUMNS_V1, "mode", "rounds", "converged")


def record_columns(report: Mapping[str, Any]) -> dict[str, Any]:
    """The indexed columns of a run, taken from its report (the agents' or a sweep's)."""
    def value(name: str) -> Any:
        entry = report.get(name, (report.get("measurements") or {}).get(name))
        return entry.get("value_ns") if isinstance(entry, Mapping) else None

    downtime = report.get("downtime")
    migration = report.get("migration")
    migration = migration if isinstance(migration, Mapping) else {}
    converged = migration.get("converged")
    return {
        "destination": report.get("destination"), "strategy": report.get("strategy"),
        "memory_size": report.get("memory_size"), "wall_gap_ns": value("wall_gap"),
        "kvmclock_jump_ns": value("kvmclock_jump"), "tsc_jump_ns": value("tsc_jump"),
        "steal_delta_ns": value("kvm_steal_delta"),
        "runnable_delta_ns": value("xen_runnable_delta"),
        "downtime_ns": downtime.get("total_ns") if isinstance(downtime, Mapping) else None,
        "mode": migration.get("mode"),
        "rounds": len(migration["rounds"]) if isinstance(migration.get("rounds"), list) else None,
        "converged": None if converged is None else int(converged),
    }


class ResultsStoreError(Exception):
    """The results database cannot be opened or is not one of ours."""


def verdict_rows(run_id: str, report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The verdicts table's rows for one report (its ``verdicts``, as the report renders
    kvmcore.analysis.Check); a report without verdicts (a sweep's errored run) has none."""
    verdicts = report.get("verdicts")
    if not isinstance(verdicts, Mapping):
        return []
    rows = []
    for name, v in verdicts.items():
        ok = v.get("ok")
        rows.append({"run_id": run_id, "name": name, "ok": None if ok is None else int(ok),
                     "decides": int(v.get("decides", True)), "detail": str(v.get("detail", "")),
                     **{key: v.get(key) for key in ("value_ns", "expected_ns", "lo_ns", "hi_ns")}})
    return rows


def default_db_path() -> Path:
    """``$XDG_DATA_HOME/kvm-testbed/results.sqlite3`` (``~/.local/share`` if unset)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "kvm-testbed" / "results.sqlite3"


@dataclass(frozen=True)
class RunRecord:
    """One run as stored: the indexed figures plus the whole report."""

    run_id: str
    started_at: str
    finished_at: str
    command: str
    outcome: str
    exit_code: int
    report: Mapping[str, Any]
    sweep: str | None = None
    point: str | None = None
    error: str | None = None
    destination: str | None = None
    strategy: str | None = None
    memory_size: int | None = None
    wall_gap_ns: int | None = None
    kvmclock_jump_ns: int | None = None
    tsc_jump_ns: int | None = None
    steal_delta_ns: int | None = None
    runnable_delta_ns: int | None = None
    downtime_ns: int | None = None
    mode: str | None = None
    rounds: int | None = None
    converged: int | None = None

    def row(self) -> dict[str, Any]:
        values = {name: getattr(self, name) for name in COLUMNS}
        # In the report's own key order, so `results show --json` prints what the run printed.
        values["report"] = json.dumps(self.report)
        return values


def timestamp(ns: int) -> str:
    """The store's time format, ``2026-11-27T12:52:25.151Z``: UTC, milliseconds, so that text
    order is time order (``--since`` compares it as text)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns / 1e9)) + f".{ns // 1_000_000 % 1000:03d}Z"


def _identify(con: sqlite3.Connection, path: Path) -> int | None:
    """The schema version of the testbed's database (1 or 2), None if it is empty;
    ResultsStoreError for anyone else's database (so neither a reader nor a writer ever adds
    our tables to it)."""
    tables = [row[0] for row in con.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    if "runs" not in tables:
        if tables:
            raise ResultsStoreError(f"{path}: not a testbed results database (it has tables "
                                    f"{', '.join(tables)} and no 'runs'); left untouched")
        return None
    columns = {row[1] for row in con.execute("PRAGMA table_info(runs)")}
    missing = [name for name in COLUMNS_V1 if name not in columns]
    if missing:
        raise ResultsStoreError(f"{path}: not a testbed results database (its 'runs' table lacks "
                                f"{', '.join(missing)}); left untouched")
    version = con.execute("PRAGMA user_version").fetchone()[0]
    if version not in (1, SCHEMA_VERSION):
        raise ResultsStoreError(f"{path}: results schema version {version}, this tool reads 1 "
                                f"and {SCHEMA_VERSION} and writes {SCHEMA_VERSION}")
    return int(version)


def _upgrade_from_1(con: sqlite3.Connection) -> None:
    """Version 1 -> 2 inside the caller's transaction: the runs table rebuilt with the new
    outcome and columns (SQLite cannot alter a CHECK), every row copied as it was."""
    outcomes = ", ".join(f"'{o}'" for o in OUTCOMES)
    con.execute(_RUNS_TABLE.format(table="runs_v2", outcomes=outcomes))
    con.execute(f"INSERT INTO runs_v2 ({', '.join(COLUMNS_V1)}) "
                f"SELECT {', '.join(COLUMNS_V1)} FROM runs")
    con.execute("DROP TABLE runs")
    con.execute("ALTER TABLE runs_v2 RENAME TO runs")
    con.execute("CREATE INDEX runs_by_sweep ON runs (sweep, point)")
    con.execute(f"PRAGMA user_version={SCHEMA_VERSION}")


class ResultsStore:
    """A handle on the results database; cheap to open, safe to share across runs.

    Each :meth:`record` is its own transaction on its own connection, so a
    crash between runs loses nothing and a crash during one loses only that one.

    ``read_only=True`` (the ``results`` commands) never creates or changes
    anything: the file must exist and be the testbed's, and every connection is
    opened read-only by SQLite itself.
    """

    #: "wal" where the filesystem has the shared memory WAL needs, else "delete" (see _leave_wal);
    #: None for a read-only store, which changes nothing.
    journal_mode: str | None = None
    #: What a query selects for COLUMNS (a read-only store of version 1 has NULLs for some).
    _select = ", ".join(COLUMNS)

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        try:
            if read_only:
                self._open_read_only()
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            wal = self._wal_works()
            if not wal:
                self.journal_mode = self._leave_wal()
            with closing(self._connect()) as con:
                version = _identify(con, self.path)     # before anything is written to it
                if wal:
                    self.journal_mode = str(con.execute("PRAGMA journal_mode=WAL").fetchone()[0])
                if version is None:
                    # Tables and version in one transaction: a reader opening the file
                    # meanwhile sees either an empty database or the whole schema, never
                    # tables at "version 0".
                    con.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} {_VERDICTS_SCHEMA}; "
                                      f"PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")
                    return
                con.execute("BEGIN IMMEDIATE")
                try:
                    if _identify(con, self.path) == 1:      # again, under the write lock
                        _upgrade_from_1(con)
                    if con.execute("SELECT 1 FROM sqlite_master WHERE name = 'verdicts'"
                                   ).fetchone() is None:
                        con.execute(_VERDICTS_SCHEMA)
                        self._backfill_verdicts(con)
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
                con.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise ResultsStoreError(f"{self.path}: cannot use as a results database: {exc}") from exc
        except OSError as exc:
            raise ResultsStoreError(f"{self.path}: {exc.strerror or exc}") from exc

    def _open_read_only(self) -> None:
        if not self.path.is_file():     # reading must not create a database from a typo
            raise ResultsStoreError(f"{self.path}: no results database there")
        with closing(self._connect()) as con:
            version = _identify(con, self.path)
            if version is None:
                raise ResultsStoreError(f"{self.path}: an empty database, no testbed results in it")
        # A reader never upgrades: a version-1 database reads with the new columns NULL.
        self._select = ", ".join(c if version == SCHEMA_VERSION or c in COLUMNS_V1
                                 else f"NULL AS {c}" for c in COLUMNS)

    def _leave_wal(self) -> str:
        """The rollback journal, for a filesystem where WAL does not work (see below).

        WAL maps a shared-memory index (``-shm``) next to the database; a filesystem without
        shared mmap (9p, as the Xen lane's writable share) fails that with "disk I/O error".
        There the rollback journal (DELETE, synchronous=FULL) keeps the same guarantee -- a
        run is wholly present or wholly absent after a crash -- only readers then wait for a
        writer's commit (busy_timeout) instead of reading alongside it. On a normal disk
        nothing changes: WAL. The filesystem is probed with a scratch database beside this
        one, never with this one: switching it to WAL on such a filesystem would break every
        other process using it. (WAL itself is set in __init__, once the file is known to be
        the testbed's: a foreign database is never written to.)"""
        # A bare connection with exclusive locking (the WAL index then lives in heap memory),
        # so a database left in WAL mode can be switched back; any other statement first
        # (even PRAGMA synchronous) would read the index through the failing shared memory.
        with closing(sqlite3.connect(self.path, timeout=30, isolation_level=None)) as con:
            con.execute("PRAGMA locking_mode=EXCLUSIVE")
            return str(con.execute("PRAGMA journal_mode=DELETE").fetchone()[0])

    def _wal_works(self) -> bool:
        """Whether a WAL database works in this database's directory (a scratch one)."""
        probe = self.path.with_name(f".{self.path.name}.wal-probe-{os.getpid()}")
        try:
            with closing(sqlite3.connect(probe, isolation_level=None)) as con:
                con.execute("PRAGMA journal_mode=WAL")
                con.execute("CREATE TABLE probe (x)")
            return True
        except sqlite3.OperationalError as exc:
            if "disk I/O error" not in str(exc):
                raise
            return False
        finally:
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(f"{probe}{suffix}").unlink(missing_ok=True)

    def _backfill_verdicts(self, con: sqlite3.Connection) -> None:
        """Fill the verdicts table from the reports of a database written before it existed."""
        for run_id, report in con.execute("SELECT run_id, report FROM runs").fetchall():
            self._insert_verdicts(con, verdict_rows(run_id, json.loads(report)))

    @staticmethod
    def _insert_verdicts(con: sqlite3.Connection, rows: list[dict[str, Any]]) -> None:
        con.executemany(f"INSERT INTO verdicts ({', '.join(VERDICT_COLUMNS)}) VALUES "
                        f"({', '.join(':' + c for c in VERDICT_COLUMNS)})", rows)

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: record() issues BEGIN IMMEDIATE / COMMIT itself, so each
        # run is exactly one transaction.
        if self.read_only:
            con = sqlite3.connect(self._read_only_uri(), uri=True, timeout=30, isolation_level=None)
        else:
            con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        con.execute("PRAGMA busy_timeout=30000")
        con.execute("PRAGMA synchronous=FULL")
        return con

    def _read_only_uri(self) -> str:
        """``mode=ro``; and ``immutable=1`` when no write-ahead log exists (no writer is open), since
        a read-only open of a WAL database otherwise leaves ``-wal``/``-shm`` files beside it."""
        uri = f"file:{urllib.parse.quote(str(self.path.resolve()))}?mode=ro"
        return uri if os.path.exists(f"{self.path}-wal") else uri + "&immutable=1"

    def record(self, run: RunRecord) -> None:
        """Store one run atomically; a run id already present is an error, not an overwrite."""
        row = run.row()
        placeholders = ", ".join(f":{name}" for name in COLUMNS)
        with closing(self._connect()) as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                con.execute(f"INSERT INTO runs ({', '.join(COLUMNS)}) VALUES ({placeholders})", row)
                self._insert_verdicts(con, verdict_rows(run.run_id, run.report))
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    def runs(self, *, sweep: str | None = None, outcome: str | None = None, since: str | None = None,
             limit: int | None = None) -> list[dict[str, Any]]:
        """Stored runs, oldest first, as dicts (``report`` decoded).

        ``since`` is a `timestamp` (runs started at or after it); ``limit`` keeps the latest.
        """
        query = f"SELECT {self._select} FROM runs"
        where, args = [], []
        for clause, value in (("sweep = ?", sweep), ("outcome = ?", outcome),
                              ("started_at >= ?", since)):
            if value is not None:
                where.append(clause)
                args.append(value)
        if where:
            query += " WHERE " + " AND ".join(where)
        # Newest first so LIMIT keeps the latest runs; reversed below.
        query += " ORDER BY started_at DESC, run_id DESC"
        if limit is not None:
            query += " LIMIT ?"
            args.append(limit)
        with closing(self._connect()) as con:
            rows = con.execute(query, args).fetchall()
        rows.reverse()
        return [_decode(dict(zip(COLUMNS, row))) for row in rows]

    def run(self, run_id: str) -> dict[str, Any]:
        """The run with this id, or the only one whose id starts with it; ResultsStoreError else."""
        pattern = run_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        with closing(self._connect()) as con:
            rows = con.execute(f"SELECT {self._select} FROM runs WHERE run_id = ? OR run_id "
                               "LIKE ? ESCAPE '\\' ORDER BY run_id LIMIT 3", (run_id, pattern)).fetchall()
        exact = [row for row in rows if row[0] == run_id]
        if exact or len(rows) == 1:
            return _decode(dict(zip(COLUMNS, (exact or rows)[0])))
        if not rows:
            raise ResultsStoreError(f"{self.path}: no run {run_id!r}")
        raise ResultsStoreError(f"{self.path}: {run_id!r} is the start of several run ids "
                                f"({', '.join(row[0] for row in rows[:2])}, ...): give more of it")

    def verdicts(self, *, name: str | None = None, sweep: str | None = None
                 ) -> list[dict[str, Any]]:
        """Stored verdict rows (VERDICT_COLUMNS), oldest run first; ``ok`` as True/False/None."""
        query = (f"SELECT {', '.join('v.' + c for c in VERDICT_COLUMNS)} FROM verdicts v "
                 "JOIN runs r USING (run_id) WHERE (? IS NULL OR v.name = ?) AND "
                 "(? IS NULL OR r.sweep = ?) ORDER BY r.started_at, r.run_id, v.rowid")
        with closing(self._connect()) as con:
            rows = con.execute(query, (name, name, sweep, sweep)).fetchall()
        result = [dict(zip(VERDICT_COLUMNS, row)) for row in rows]
        for row in result:
            row["ok"] = None if row["ok"] is None else bool(row["ok"])
            row["decides"] = bool(row["decides"])
        return result

    def points_done(self, sweep: str) -> set[str]:
        """Sweep points that already have a passed or failed run (an errored or rolled-back
        one did not complete: a rerun retries it)."""
        with closing(self._connect()) as con:
            rows = con.execute(
                f"SELECT DISTINCT point FROM runs WHERE sweep = ? AND outcome IN "
                f"({', '.join(repr(o) for o in COMPLETED)})", (sweep,)
            ).fetchall()
        return {row[0] for row in rows if row[0] is not None}

    def integrity_check(self) -> str:
        with closing(self._connect()) as con:
            return con.execute("PRAGMA integrity_check").fetchone()[0]

    def register_sweep(self, name: str, config: Mapping[str, Any], created_at: str) -> dict[str, Any]:
        """Remember a sweep's configuration under its name; return what is stored for it.

        The first call for a name stores ``config`` and returns it; later calls
        return the stored one unchanged, so the caller can refuse a rerun whose
        axes differ (mixing two experiments' points under one name would make
        every summary of it wrong). A name with no run stored is not an
        experiment yet (its sweep stopped before the first point): its config is
        replaced, so a corrected rerun is not refused. The table is created on
        first use, so databases written before sweeps existed stay valid.
        """
        with closing(self._connect()) as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                con.execute(_SWEEPS_SCHEMA)
                row = con.execute("SELECT config FROM sweeps WHERE name = ?", (name,)).fetchone()
                if row is not None and con.execute("SELECT 1 FROM runs WHERE sweep = ? LIMIT 1",
                                                   (name,)).fetchone() is None:
                    con.execute("DELETE FROM sweeps WHERE name = ?", (name,))
                    row = None
                if row is None:
                    con.execute("INSERT INTO sweeps (name, created_at, config) VALUES (?, ?, ?)",
                                (name, created_at, json.dumps(config, sort_keys=True)))
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
        return dict(config) if row is None else json.loads(row[0])

    def sweep_config(self, name: str) -> dict[str, Any] | None:
        """The configuration stored by `register_sweep` for ``name``, or None."""
        with closing(self._connect()) as con:
            if con.execute("SELECT 1 FROM sqlite_master WHERE name = 'sweeps'").fetchone() is None:
                return None
            row = con.execute("SELECT config FROM sweeps WHERE name = ?", (name,)).fetchone()
        return None if row is None else json.loads(row[0])


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    row["report"] = json.loads(row["report"])
    return row


def export_json(runs: Iterable[Mapping[str, Any]]) -> str:
    return json.dumps(list(runs), indent=2, sort_keys=True) + "\n"


def export_csv(runs: Iterable[Mapping[str, Any]]) -> str:
    """One line per run; the report column holds the report as compact JSON."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for run in runs:
        row = dict(run)
        row["report"] = json.dumps(row["report"], sort_keys=True, separators=(",", ":"))
        writer.writerow(row)
    return out.getvalue()


def iter_csv_rows(text: str) -> Iterator[dict[str, str]]:
    """Parse what :func:`export_csv` wrote (used by tests and by people's scripts)."""
    yield from csv.DictReader(io.StringIO(text))

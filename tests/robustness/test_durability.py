"""kill -9 of the source agent during a sweep: the results store stays whole and loses nothing.

Three rounds against one database: a `source-agent sweep` runs until it has committed a few
more runs, is killed with SIGKILL at a varying point inside a run, and the next round resumes it.
After every kill: ``PRAGMA integrity_check`` is ok; every run committed before the kill, and as
many as the sweep had reported done, are there, whole (their report parses); the destination
agent the sweep started (and its guard) are gone; the next round skips exactly those runs.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time
from contextlib import closing
from pathlib import Path

from robustness_helpers import Agent, source_argv, wait_for

ROUNDS = 3
RUNS_PER_ROUND = 3                        # committed runs to see before each kill
KILL_OFFSETS = (0.0, 0.07, 0.15)          # s after the last observed commit: varies where it lands


def runs(db: Path) -> dict[str, dict]:
    if not db.exists():
        return {}
    with closing(sqlite3.connect(db, timeout=5)) as con:
        con.row_factory = sqlite3.Row
        return {r["run_id"]: dict(r) for r in con.execute("SELECT * FROM runs")}


def integrity(db: Path) -> str:
    """``PRAGMA integrity_check``'s verdict ("ok"), or what SQLite raised reading the file."""
    try:
        with closing(sqlite3.connect(db)) as con:
            return "; ".join(row[0] for row in con.execute("PRAGMA integrity_check"))
    except sqlite3.DatabaseError as exc:
        return f"{type(exc).__name__}: {exc}"


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (children of all its threads, recursively)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except FileNotFoundError:
            continue
        for task in tasks:
            try:
                children = Path(f"/proc/{parent}/task/{task}/children").read_text().split()
            except FileNotFoundError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.add(child)
                    todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_kill_9_during_a_sweep_keeps_every_completed_run(tmp_path, agents):
    db = tmp_path / "results.sqlite3"
    for round_, offset in enumerate(KILL_OFFSETS[:ROUNDS]):
        before_round = runs(db)
        sweep = Agent(source_argv("sweep", "durable", "--db", str(db), "--latency", "0ms",
                                  "--repeat", "500", "--format", "json"),
                      tmp_path / f"sweep{round_}.log", env={"XDG_DATA_HOME": str(tmp_path)})
        agents.append(sweep)
        # The sweep resumed: it skips exactly the runs the previous kills left behind.
        sweep.wait_log(r"point\(s\) to run", 60)
        if before_round:
            assert f"{len(before_round)} already done" in sweep.log(), sweep.log()
        wait_for(lambda: len(runs(db)) >= len(before_round) + RUNS_PER_ROUND, 60,
                 f"{RUNS_PER_ROUND} more committed runs")
        below = descendants(sweep.pid)
        assert below, "the sweep's destination agent should be running below it"
        time.sleep(offset)
        committed = set(runs(db))
        sweep.kill()                                           # SIGKILL, reaped
        after = runs(db)
        assert integrity(db) == "ok"
        assert committed <= set(after)
        reported = len(re.findall(r"^sweep durable: \[\d+/\d+\]", sweep.log(), re.M))
        assert len(after) >= len(before_round) + reported, (len(after), reported)
        for run in after.values():
            report = json.loads(run["report"])
            assert run["sweep"] == "durable" and report["run_id"] == run["run_id"]
            assert run["outcome"] == "passed", run["error"]
        # The destination agent and its guard die with the sweep (no orphan keeps serving).
        wait_for(lambda: not any(alive(pid) for pid in below), 15,
                 f"the sweep's processes {sorted(below)} to exit")
    assert len(runs(db)) >= ROUNDS * RUNS_PER_ROUND
    # Negative control of the integrity check: a damaged copy of the same database fails it.
    with closing(sqlite3.connect(db)) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    damaged = tmp_path / "damaged.sqlite3"
    data = bytearray(db.read_bytes())
    page = int.from_bytes(data[16:18], "big") or 65536
    data[2 * page:2 * page + 64] = b"\xa5" * 64          # the root page of the runs table
    damaged.write_bytes(bytes(data))
    assert integrity(damaged) != "ok"

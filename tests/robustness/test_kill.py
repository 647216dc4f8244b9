"""kill -9 of either agent at a chosen protocol point (real processes, real TCP, real KVM).

The point is reached for sure: the paced launcher stops the process there (SIGSTOP) and says so,
and the test checks the process state before it sends SIGKILL. The destination is observed from
outside through /proc: its VMs are its ``anon_inode:kvm-vm`` descriptors.
"""

from __future__ import annotations

import json
import re
import sqlite3
from contextlib import closing

import pytest
import trio
from agents_helpers import PSK, run_cli
from robustness_helpers import Agent, Resources, source_argv, vm_count, wait_for

from kvmcore import Strategy
from source_agent.migrate import MigrationPlan, migrate

MiB = 1 << 20


def migrate_in_process(dest, kvm, caps) -> None:
    """One complete migration to ``dest`` from this process (cheaper than a source process)."""
    plan = MigrationPlan(host=dest.address[0], port=dest.address[1], psk=PSK, warmup_ns=0,
                         strategy=Strategy("realtime", "none", "off"))
    m = trio.run(migrate, plan, kvm, caps)
    assert m.analysis.checks["sequence_continues"].ok


def back_to(dest, base: Resources) -> Resources:
    """Wait (bounded) until the destination's fds, sockets and VMs are back to ``base`` and its
    threads no more than then (trio's idle worker threads expire on their own)."""
    def settled() -> Resources | None:
        now = Resources.of(dest.pid)
        ok = (now.fds, now.sockets, now.vms) == (base.fds, base.sockets, base.vms) \
            and now.threads <= base.threads
        return now if ok else None
    return wait_for(settled, 20, f"destination resources back to {base}")


@pytest.mark.parametrize("phase", ["connected", "handshake", "memory", "report"])
def test_source_killed_at_each_phase_leaves_the_destination_serving(phase, dest, agents, key,
                                                                    kvm, caps):
    d = dest()
    migrate_in_process(d, kvm, caps)            # warm: the worker thread, lazy imports
    d.wait_sessions(1)
    base = Resources.of(d.pid)
    assert base.vms == 0
    source = Agent(source_argv("migrate", "--to", d.target, "--psk-file", str(key), "--no-db",
                               "--memory", "8MiB", pause=phase), d.log_path.with_name("src.log"))
    agents.append(source)
    source.wait_paused(phase)
    # The destination really holds the session (negative control of the "back to base" check:
    # one more socket is seen while the source lives).
    wait_for(lambda: Resources.of(d.pid).sockets == base.sockets + 1, 10, "the session's socket")
    if phase == "report":
        # COMMIT was sent: the destination restores, runs, sends the REPORT, then waits for BYE.
        wait_for(lambda: "restore" not in d.log() and vm_count(d.pid) == 0, 10, "restore done")
    source.kill()
    lines = d.wait_sessions(2)
    assert "done" not in lines[1], lines[1]
    expected_migrations = 1 if phase == "report" else 0
    assert f"after {expected_migrations} migration(s)" in lines[1], lines[1]
    back_to(d, base)
    assert d.alive()
    migrate_in_process(d, kvm, caps)            # still serving
    assert d.wait_sessions(3)[2].startswith("done, 1 migration(s)")


def results(db) -> list[dict]:
    with closing(sqlite3.connect(db)) as con:
        con.row_factory = sqlite3.Row
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return [dict(r) for r in con.execute("SELECT * FROM runs ORDER BY started_at")]


@pytest.mark.parametrize("order", ["default", "--destroy-first"])
def test_destination_killed_mid_restore_rolls_back_and_is_recorded(order, dest, agents, key,
                                                                   tmp_path):
    """After the stop: the source guest is resumed and runs on (rolled back, exit 3); with
    --destroy-first it was destroyed before the transfer and is lost (error, exit 3)."""
    db = tmp_path / "results.sqlite3"
    argv = ("migrate", "--psk-file", str(key), "--db", str(db), "--json",
            *([order] if order != "default" else []))
    # Negative control: the same source and options against an unpaced destination pass.
    plain = dest(name="plain")
    control = Agent(source_argv(*argv, "--to", plain.target), tmp_path / "control.log")
    agents.append(control)
    code, _ = control.finish(60)
    assert code == 0, control.log()

    d = dest(pause="restore")
    assert vm_count(d.pid) == 0
    source = Agent(source_argv(*argv, "--to", d.target), tmp_path / "src.log")
    agents.append(source)
    d.wait_paused("restore")
    assert vm_count(d.pid) == 1                 # mid-restore: the VM exists, the vCPU not run yet
    d.kill()
    code, out = source.finish(60)
    assert code == 3, source.log()
    report = json.loads(out)
    outcome = "rolled back" if order == "default" else "error"
    assert report["outcome"] == outcome and report["exit_code"] == 3
    # A clear peer error: names the destination and what happened to the connection...
    assert d.target in report["error"], report["error"]
    assert any(w in report["error"] for w in ("closed", "broke", "reset")), report["error"]
    # ... and what became of the source guest.
    if order == "default":
        rollback = report["rollback"]
        assert rollback["ok"] and rollback["resumed_sequences"][0] > rollback["stopped_sequence"]
        assert "rolled back: the source guest resumed and runs on" in report["error"]
    else:
        assert "rollback" not in report
        assert "destroyed before the transfer (--destroy-first) and is lost" in report["error"]
    assert report["migration"]["destroy_first"] is (order != "default")
    assert f"source-agent: error: {report['error']}" in source.log()
    rows = results(db)
    assert [(r["outcome"], r["exit_code"]) for r in rows] == [("passed", 0), (outcome, 3)]
    assert rows[1]["error"] == report["error"] and rows[1]["run_id"] == report["run_id"]


def test_destination_killed_mid_precopy_rolls_back_the_running_guest(dest, agents, key,
                                                                      tmp_path):
    """kill -9 of the destination while the source guest runs (sending precopy's round 0): the
    source stops it, runs it on (rolled back, exit 3), and records it so."""
    db = tmp_path / "results.sqlite3"
    d = dest(pause="round")
    # 64 MiB: more than the sockets hold, so the source is still sending round 0 when killed.
    source = Agent(source_argv("migrate", "--to", d.target, "--psk-file", str(key), "--db",
                               str(db), "--json", "--mode", "precopy", "--memory", "64MiB",
                               "--dirty-rate", "50MiB/s", "--working-set", "8MiB"),
                   tmp_path / "src.log")
    agents.append(source)
    d.wait_paused("round")
    assert vm_count(d.pid) == 1                 # the prepared VM
    d.kill()
    code, out = source.finish(60)
    assert code == 3, source.log()
    report = json.loads(out)
    assert report["outcome"] == "rolled back" and report["rollback"]["ok"], report["error"]
    migration = report["migration"]
    assert migration["mode"] == "precopy" and migration["final"] is None   # never stopped
    assert migration["rounds"] == []            # round 0 was never sent in full
    assert [(r["outcome"], r["mode"]) for r in results(db)] == [("rolled back", "precopy")]
    # As a person reads it: the stored run's tables say what became of the guest.
    shown = run_cli("source-agent", "results", "show", report["run_id"], "--db", str(db),
                    cwd=tmp_path)
    assert shown.code == 0, shown.stderr
    assert "rolled back (exit 3)" in shown.stdout and "migration: precopy" in shown.stdout
    assert re.search(r"rollback +source guest resumed: sequence \d+ -> [\d, ]+ \(runs on\)",
                     shown.stdout), shown.stdout

"""End to end with the real agents and real KVM: dest-agent as a subprocess, migrations through the relay.

No double anywhere: the sweep starts ``python -m dest_agent serve`` (in a
namespace for netns), and every point is a real migration by
source_agent.migrate. Skipped only where the agents are not installed or the
host has no /dev/kvm.
"""

from __future__ import annotations

import argparse
import json
import os

import pytest

from source_agent.netem import netns_unsupported
from source_agent.results import ResultsStore
from source_agent.sweep import cli, ktap
from source_agent.sweep.plots import check_png

pytest.importorskip("source_agent.migrate", reason="the agents (source_agent.migrate) are not installed")
if not os.path.exists("/dev/kvm"):
    pytest.skip("unsupported on this host: /dev/kvm", allow_module_level=True)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="source-agent")
    cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["sweep", *argv])


async def test_a_real_loopback_sweep_completes_records_plots_and_resumes(tmp_path, capsys):
    db = tmp_path / "r.db"
    argv = ("real", "--latency", "0,1,5ms", "--repeat", "2", "--db", str(db), "--format", "json",
            "--plot-dir", str(tmp_path / "plots"))
    code = await cli.run(parse(*argv))
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(out)
    assert (summary["ran"], summary["skipped"], summary["errors"]) == (6, 0, 0)
    runs = ResultsStore(db).runs(sweep="real")
    assert len(runs) == 6 and {r["outcome"] for r in runs} == {"passed"}
    for run in runs:
        report = run["report"]
        assert report["run_id"] == run["run_id"]
        assert run["wall_gap_ns"] > 0 and run["kvmclock_jump_ns"] > 0 and run["downtime_ns"] > 0
        latency = report["sweep"]["config"]["latency"]
        # The clock sync measured the RTT through the relay: never below the configured 2 × latency.
        assert report["clock_sync"]["rtt_ns"] >= 2 * latency * 1e9
        assert report["sweep"]["injector"]["injector"] == "relay"
    for point in summary["points"]:
        assert point["accounting_error_basis"] in ("kvmclock", "xen_runnable")
        assert point["downtime"]["n"] == 2
    for path in summary["plots"]:
        if path.endswith(".png"):
            check_png(path)
    code = await cli.run(parse("real", "--latency", "0,1,5ms", "--repeat", "2", "--db", str(db),
                               "--format", "ktap"))
    out, err = capsys.readouterr()
    assert code == 0 and "6 already done (skipped)" in err
    assert [r.ok for r in ktap.parse(out)] == [True, True, True]


async def test_a_real_netns_sweep_reaches_the_agent_inside_the_namespace(tmp_path, capsys):
    if netns_unsupported():
        pytest.skip(f"unsupported on this host: {netns_unsupported()}")
    db = tmp_path / "r.db"
    code = await cli.run(parse("ns", "--topology", "netns", "--latency", "0,2ms", "--repeat", "1",
                               "--db", str(db), "--format", "json"))
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["ran"] == 2
    runs = ResultsStore(db).runs(sweep="ns")
    assert {r["outcome"] for r in runs} == {"passed"}
    # The agent inside the namespace, not the relay in the root namespace the source connected to.
    assert all(r["destination"].startswith("10.201.") for r in runs)
    assert all(r["report"]["sweep"]["via"].startswith("127.0.0.1:") for r in runs)
    assert all(r["report"]["sweep"]["injector"]["target"] == r["destination"] for r in runs)


async def test_a_strategy_that_hides_the_gap_fails_its_point(tmp_path, capsys):
    """Negative control end to end: clock=plain restores kvmclock without the gap, so its
    kvmclock_follows_gap verdict fails; the point is ``not ok`` in KTAP and the exit code is 1."""
    code = await cli.run(parse("strat", "--strategy", "best", "--strategy", "clock=plain",
                               "--gap", "20ms", "--repeat", "1", "--db", str(tmp_path / "r.db"),
                               "--format", "ktap"))
    out, err = capsys.readouterr()
    assert code == 1, err
    best, plain = ktap.parse(out)
    assert best.ok and best.description == "strategy=best"
    assert not plain.ok and plain.description == "strategy=clock=plain"
    assert "kvmclock_follows_gap" in plain.directive


@pytest.fixture
def keyed_destination(tmp_path):
    """A real ``dest-agent serve`` on 127.0.0.1 that demands a key: ``(HOST:PORT, key file)``."""
    import re
    import subprocess
    import sys

    key = tmp_path / "dest.key"
    key.write_text("0123456789abcdef0123456789abcdef\n")
    key.chmod(0o600)
    agent = subprocess.Popen([sys.executable, "-P", "-m", "dest_agent", "serve", "--listen",
                              "127.0.0.1:0", "--psk-file", str(key)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for line in agent.stderr:
            match = re.search(rb"serving on ([0-9.]+):([0-9]+)", line)
            if match:
                break
        else:
            raise AssertionError(f"dest-agent exited {agent.wait()} before serving")
        yield f"127.0.0.1:{int(match.group(2))}", key
    finally:
        agent.kill()
        agent.wait()
        agent.stderr.close()


async def test_a_remote_sweep_with_a_wrong_or_missing_key_stops_at_once_with_exit_3(
        tmp_path, capsys, keyed_destination):
    """Issue 10 item 13: as migrate does (exit 3), not one error run per point and exit 1.

    Negative control: the right key passes every point. Every run records the --to address, not
    the relay's ephemeral port it went through.
    """
    to, key = keyed_destination
    wrong = tmp_path / "wrong.key"
    wrong.write_text("fedcba9876543210fedcba9876543210\n")
    wrong.chmod(0o600)
    for name, psk in (("missing", ()), ("wrong", ("--psk-file", str(wrong)))):
        db = tmp_path / f"{name}.db"
        code = await cli.run(parse(name, "--topology", "remote", "--to", to, *psk, "--latency",
                                   "0,1ms", "--repeat", "1", "--db", str(db)))
        err = capsys.readouterr().err
        assert code == 3, err
        assert "sweep stopped" in err and "authentication" in err
        [run] = ResultsStore(db).runs(sweep=name)
        assert run["outcome"] == "error" and run["destination"] == to
    db = tmp_path / "right.db"
    code = await cli.run(parse("right", "--topology", "remote", "--to", to, "--psk-file", str(key),
                               "--latency", "0,1ms", "--repeat", "1", "--db", str(db)))
    assert code == 0, capsys.readouterr().err
    runs = ResultsStore(db).runs(sweep="right")
    assert [r["destination"] for r in runs] == [to, to]
    assert all(r["report"]["destination"] == to != r["report"]["sweep"]["via"] for r in runs)


async def test_a_real_sweep_over_modes_and_dirty_rates(tmp_path, capsys):
    """Both modes, with and without a dirtying guest, through the real agents: every run passes
    (memory_intact included), records its mode and rounds, and the live figure is drawn."""
    db = tmp_path / "r.db"
    code = await cli.run(parse("live", "--mode", "stop-copy,precopy", "--dirty-rate", "0,20MiB/s",
                               "--working-set", "4MiB", "--memory", "16MiB", "--repeat", "1",
                               "--db", str(db), "--format", "json", "--plot-dir",
                               str(tmp_path / "plots")))
    out, err = capsys.readouterr()
    assert code == 0, err
    runs = ResultsStore(db).runs(sweep="live")
    assert len(runs) == 4 and {r["outcome"] for r in runs} == {"passed"}, [r["error"] for r in runs]
    for run in runs:
        config = run["report"]["sweep"]["config"]
        assert run["mode"] == config["mode"] == run["report"]["migration"]["mode"]
        assert run["report"]["verdicts"]["memory_intact"]["ok"] is True
        assert (run["rounds"] > 0) == (config["mode"] == "precopy")
    plots = json.loads(out)["plots"]
    assert any(path.endswith("live-live.png") for path in plots)
    check_png(tmp_path / "plots" / "live-live.png")


async def test_a_point_whose_destination_fails_after_the_stop_is_recorded_rolled_back(
        tmp_path, nursery, kvm, caps, monkeypatch):
    """The agents' run_point turns a rollback into the run's report (outcome, statistics,
    rollback record) instead of an anonymous error (a rerun retries it: test_results)."""
    from agents_helpers import PSK, key_file

    import dest_agent.session
    from dest_agent import AGENT_VERSION, DestinationServer, ServerConfig
    from source_agent.sweep.agent import agent_run_point
    from source_agent.sweep.plan import PointConfig
    from source_agent.sweep.runner import Target

    def refuse(memory):
        raise dest_agent.session.SessionRefused("restore_failed", "refused for the test")
    monkeypatch.setattr(dest_agent.session, "_final_sink", refuse)
    server = DestinationServer(kvm, caps, ServerConfig(psk=PSK, port=0), AGENT_VERSION)
    await nursery.start(server.serve)
    target = Target(*server.address, str(key_file(tmp_path / "key")), "loopback", "dest")
    point = PointConfig(0.0, 0.0, None, 2 << 20, 0, "best", 0)
    report = await agent_run_point(warmup_ns=0)(point, target)
    assert report["outcome"] == "rolled back" and report["rollback"]["ok"], report
    assert "refused for the test" in report["error"]
    assert report["migration"]["mode"] == "stop-copy" and report["migration"]["final"] is None
    monkeypatch.undo()                                       # control: the same point passes
    assert (await agent_run_point(warmup_ns=0)(point, target))["outcome"] == "passed"

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
    assert all(r["destination"].startswith("127.0.0.1:") for r in runs)  # the relay, in the root namespace
    assert all(r["report"]["sweep"]["injector"]["target"].startswith("10.201.") for r in runs)


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

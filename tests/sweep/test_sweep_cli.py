"""The sweep command: options, exit codes, formats, plots, Ctrl-C (in a child process)."""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakes import FakeAgent, fake_dest_argv
from sweep_helpers import SWEEP_SCRIPT, dest_pids

from source_agent.netem import _ip, netns_unsupported
from source_agent.results import ResultsStore
from source_agent.sweep import cli, ktap
from source_agent.sweep.plots import check_png
from source_agent.sweep.progress import PlainProgress, RichProgress, make_progress

SCRIPT = SWEEP_SCRIPT


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="source-agent")
    cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["sweep", *argv])


async def run(*argv: str, agent=None) -> int:
    return await cli.run(parse(*argv), run_point=agent or FakeAgent(), dest_argv=fake_dest_argv)


async def test_json_summary_and_plots(tmp_path, capsys):
    code = await run("lat", "--latency", "0,1,5ms", "--repeat", "2", "--db", str(tmp_path / "r.db"),
                     "--format", "json", "--plot-dir", str(tmp_path / "plots"))
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(out)
    assert (summary["ran"], summary["skipped"], summary["planned"]) == (6, 0, 6)
    assert summary["injector"]["kind"] == "relay"
    assert summary["injectors_recorded"] == [summary["injector"]]
    assert [p["point"].split()[0] for p in summary["points"]] == ["latency=0ms", "latency=1ms",
                                                                   "latency=5ms"]
    first = summary["points"][0]
    assert first["runs"] == 2 and first["accounting_error_basis"] == "kvmclock"
    # The fake reports an accounting error of 10 µs × repeat: 0 and 10 µs.
    assert first["accounting_error"] == {"n": 2, "median_ns": 5000.0, "p5_ns": 500.0, "p95_ns": 9500.0}
    assert len(summary["plots"]) == 4
    for path in summary["plots"]:
        if path.endswith(".png"):
            check_png(Path(path))
    assert "sweep lat: [6/6]" in err   # plain progress lines: stderr is not a terminal here
    assert len(ResultsStore(tmp_path / "r.db").runs(sweep="lat")) == 6


async def test_ktap_output_and_a_failed_point_gives_exit_1(tmp_path, capsys):
    from source_agent.sweep.plan import Axes, SweepPlan

    bad = SweepPlan("k", Axes(latency=(0.0, 0.001)), 1).points()[1].key
    code = await run("k", "--latency", "0ms,1ms", "--repeat", "1", "--db", str(tmp_path / "r.db"),
                     "--format", "ktap", agent=FakeAgent(fail_on={bad}))
    out, _ = capsys.readouterr()
    assert code == 1
    results = ktap.parse(out)
    assert [r.ok for r in results] == [True, False]
    assert "verdict failed: never_backwards" in results[1].directive


async def test_table_names_the_failed_verdicts_of_each_point(tmp_path, capsys):
    from source_agent.sweep.plan import Axes, SweepPlan

    bad = SweepPlan("v", Axes(latency=(0.0, 0.001)), 1).points()[1].key
    code = await run("v", "--latency", "0ms,1ms", "--repeat", "1", "--db", str(tmp_path / "r.db"),
                     agent=FakeAgent(fail_on={bad}))
    out, _ = capsys.readouterr()
    assert code == 1
    rows = [line for line in out.splitlines() if "latency=" in line]
    assert "never_backwards 1/1" in rows[1]
    assert "never_backwards" not in rows[0]          # the passing point names none


async def test_rerun_says_how_many_points_were_skipped(tmp_path, capsys):
    args = ("t", "--latency", "0,1ms", "--repeat", "2", "--db", str(tmp_path / "r.db"))
    assert await run(*args) == 0
    capsys.readouterr()
    agent = FakeAgent()
    assert await run(*args, agent=agent) == 0
    out, err = capsys.readouterr()
    assert agent.calls == []
    assert "4 already done (skipped)" in err
    assert "ran 0, skipped 4 (already done)" in out


@pytest.mark.parametrize("argv, message", [
    (("--latency", "0,1,5"), "--latency: '1' has no unit (expected e.g. '5ms')"),
    (("--bandwidth", "0mbit"), "--bandwidth: '0mbit' must be more than 0 (write 'unlimited' for "
                               "no cap)"),
    (("--latency", "1ms", "--jitter", "5ms"), "--jitter 5ms is more than --latency 1ms"),
    (("--memory", "3MiB"), "--memory: '3MiB' must be a multiple of 2MiB"),
    (("--topology", "remote"), "--to HOST:PORT is required"),
    # The agents' one address grammar (agentcore.options.parse_host_port).
    (("--topology", "remote", "--to", "nowhere:x"), "--to: address 'nowhere:x': expected HOST:PORT"),
    (("--topology", "remote", "--to", "::1:7400"), "an IPv6 address goes in brackets"),
    (("--topology", "remote", "--to", "h:0"), "--to: 'h:0': port 0 is not a destination agent's"),
    (("--injector", "tc"), "--injector tc needs --topology netns"),
    (("--psk-file", "/nonexistent/key"), "/nonexistent/key"),
])
async def test_bad_options_exit_2_naming_the_option(tmp_path, capsys, argv, message):
    assert await run("x", *argv, "--db", str(tmp_path / "r.db")) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r.db").exists()   # refused before anything, the store included


async def test_a_plot_dir_that_cannot_be_one_is_refused_before_any_point(tmp_path, capsys):
    """Issue 10 item 12: not after every point ran ("[Errno 17] File exists")."""
    (tmp_path / "taken").write_text("not a directory")
    agent = FakeAgent()
    for plot_dir, message in ((tmp_path / "taken", "exists and is not a directory"),
                              (tmp_path / "taken" / "sub", "taken is not a directory")):
        assert await run("p", "--repeat", "1", "--db", str(tmp_path / "r.db"),
                         "--plot-dir", str(plot_dir), agent=agent) == 2
        assert f"--plot-dir {plot_dir}: " in capsys.readouterr().err
        assert agent.calls == [] and not (tmp_path / "r.db").exists()
    # Negative control: a directory still to be made is fine (made once the plots are drawn).
    assert await run("p", "--repeat", "1", "--db", str(tmp_path / "r.db"),
                     "--plot-dir", str(tmp_path / "new" / "plots"), agent=agent) == 0
    assert len(list((tmp_path / "new" / "plots").iterdir())) == 4


async def test_other_axes_under_an_existing_name_exit_2_and_say_what_differs(tmp_path, capsys):
    db = str(tmp_path / "r.db")
    assert await run("n", "--latency", "0ms", "--repeat", "1", "--db", db) == 0
    assert await run("n", "--latency", "5ms", "--repeat", "1", "--db", db) == 2
    assert "--latency: stored 0ms, now 5ms" in capsys.readouterr().err


async def test_without_the_agents_the_command_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "source_agent.sweep.agent", None)  # as if not installed
    assert await cli.run(parse("x", "--db", str(tmp_path / "r.db"))) == 2
    assert "the migration agents are not installed here" in capsys.readouterr().err


def test_progress_is_rich_on_a_terminal_and_plain_otherwise():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(make_progress("s", io.StringIO()), PlainProgress)
    tty = Tty()
    progress = make_progress("s", tty)
    assert isinstance(progress, RichProgress)
    from source_agent.sweep.plan import Axes, SweepPlan

    point = SweepPlan("s", Axes(), 1).points()[0]
    with progress:
        progress.start(1, 2)
        progress.point_started(0, point)
        progress.point_finished(0, point, {"outcome": "passed", "wall_gap": {"value_ns": 2_000_000}})
    assert "2 point(s) already done" in tty.getvalue() and "passed (gap 2.0 ms)" in tty.getvalue()


class SweepChild:
    """The sweep command (with the agent-layer doubles) in a child process, 10 points of ~0.3 s."""

    def __init__(self, tmp_path: Path, topology: str) -> None:
        if topology == "netns" and netns_unsupported():
            pytest.skip(f"unsupported on this host: {netns_unsupported()}")
        self.db = tmp_path / "r.db"
        self.argv = [sys.executable, str(SCRIPT), "c", "--latency", "0,1,2,3,4ms", "--repeat", "2",
                     "--db", str(self.db), "--topology", topology]
        self.process = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        env={**os.environ, "FAKE_AGENT_SLEEP": "0.3"})

    def wait_for_runs(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.communicate()
            if self.db.exists() and len(ResultsStore(self.db).runs(sweep="c")) >= count:
                return
            time.sleep(0.05)
        raise AssertionError(f"fewer than {count} runs after {timeout}s")

    def rerun_resumes(self, done: int) -> None:
        """A rerun runs exactly the rest; afterwards no namespace of the first process exists."""
        rerun = subprocess.run(self.argv, capture_output=True, timeout=120, check=False)
        assert rerun.returncode == 0, rerun.stderr
        assert f"{10 - done} point(s) to run, {done} already done (skipped)".encode() in rerun.stderr
        assert len(ResultsStore(self.db).runs(sweep="c")) == 10
        prefix = f"{_ip.PREFIX}{self.process.pid}-"
        assert [n for n in _ip.namespaces() if n.startswith(prefix)] == []


def completed_runs(db: Path) -> int:
    """Runs stored, after checking the DB is intact and holds only completed (passed) runs."""
    store = ResultsStore(db)
    assert store.integrity_check() == "ok"
    runs = store.runs(sweep="c")
    assert {r["outcome"] for r in runs} == {"passed"}
    return len(runs)


@pytest.mark.parametrize("topology", ["loopback", "netns"])
def test_ctrl_c_stops_cleanly_with_130_and_a_rerun_resumes(tmp_path, topology):
    child = SweepChild(tmp_path, topology)
    try:
        child.wait_for_runs(2)
        child.process.send_signal(signal.SIGINT)
        _, err = child.process.communicate(timeout=60)
    finally:
        child.process.kill()
    assert child.process.returncode == 130, err
    assert b"interrupted; rerun the same command to resume" in err
    done = completed_runs(child.db)
    assert 2 <= done < 10
    prefix = f"{_ip.PREFIX}{child.process.pid}-"
    assert [n for n in _ip.namespaces() if n.startswith(prefix)] == []  # gone before the rerun
    assert dest_pids() == set()
    child.rerun_resumes(done)


@pytest.mark.parametrize("topology", ["loopback", "netns"])
def test_kill_9_of_the_sweep_loses_no_completed_run_and_leaves_no_agent(tmp_path, topology):
    """Issue 7, durability: SIGKILL runs no code, yet the DB is intact and nothing keeps serving."""
    child = SweepChild(tmp_path, topology)
    try:
        child.wait_for_runs(2)
        assert dest_pids(), "the destination should be running mid-sweep"
        child.process.kill()
        child.process.communicate(timeout=30)
    finally:
        child.process.kill()
    done = completed_runs(child.db)
    assert done >= 2
    deadline = time.monotonic() + 10
    while dest_pids() and time.monotonic() < deadline:   # the guard polls every 0.2 s
        time.sleep(0.05)
    assert dest_pids() == set()
    child.rerun_resumes(done)  # its stale cleanup removes the dead sweep's namespace

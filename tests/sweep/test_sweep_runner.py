"""The runner over a loopback destination (the fake agent program) and the fake run_point."""

from __future__ import annotations

import io
import sqlite3

import pytest
import trio
from fakes import FakeAgent
from sweep_helpers import Recorder, dest_pids, small_plan, sweep

from source_agent.results import ResultsStore
from source_agent.results_cli import print_report
from source_agent.sweep.runner import SweepConfigError, run_sweep
from source_agent.sweep.topology import DestinationError


async def test_small_loopback_sweep_completes_and_every_run_is_stored(tmp_path, agent):
    store = ResultsStore(tmp_path / "r.db")
    plan = small_plan()
    progress = Recorder()
    outcome = await sweep(plan, store, agent, progress=progress)
    assert (outcome.planned, outcome.ran, outcome.skipped, outcome.errors) == (6, 6, 0, 0)
    assert progress.total == 6 and len(progress.finished) == 6
    runs = store.runs(sweep="s")
    assert sorted(r["point"] for r in runs) == sorted(p.key for p in plan.points())
    assert {r["outcome"] for r in runs} == {"passed"}
    assert all(r["command"] == "sweep" and r["wall_gap_ns"] > 0 and r["downtime_ns"] > 0 for r in runs)
    injector = runs[0]["report"]["sweep"]["injector"]
    assert injector["injector"] == "relay" and "loopback" in injector["reason"]
    # Every run went through its own relay: the fake's ping-pongs crossed it.
    assert all(r["report"]["sweep"]["injector"]["accepted"] == 1 for r in runs)
    assert dest_pids() == set()


async def test_measured_rtt_follows_the_configured_latency(tmp_path, agent):
    store = ResultsStore(tmp_path / "r.db")
    await sweep(small_plan(latency=(0.0, 0.005, 0.02), repeat=1), store, agent)
    rtt = {r["report"]["sweep"]["config"]["latency"]: r["report"]["clock_sync"]["rtt_ns"] / 1e9
           for r in store.runs(sweep="s")}
    assert rtt[0.0] < 0.002                        # the relay's copy path adds < 2 ms
    for latency in (0.005, 0.02):
        assert 2 * latency <= rtt[latency] <= 2 * latency + 0.015  # never early; bounded late


async def test_a_rerun_skips_finished_points_and_a_larger_repeat_adds_only_new_ones(tmp_path):
    store = ResultsStore(tmp_path / "r.db")
    await sweep(small_plan(), store, FakeAgent())
    again = FakeAgent()
    outcome = await sweep(small_plan(), store, again)
    assert (outcome.ran, outcome.skipped) == (0, 6) and again.calls == []
    more = FakeAgent()
    outcome = await sweep(small_plan(repeat=3), store, more)
    assert (outcome.ran, outcome.skipped) == (3, 6)
    assert {key.rsplit(" ", 1)[1] for key, _ in more.calls} == {"rep=2"}
    assert len(store.runs(sweep="s")) == 9


async def test_a_rerun_with_other_axes_under_the_same_name_is_refused(tmp_path, agent):
    store = ResultsStore(tmp_path / "r.db")
    await sweep(small_plan(repeat=1), store, agent)
    with pytest.raises(SweepConfigError, match=r"--latency: stored 0ms,1ms,5ms, now 0ms,2ms"):
        await sweep(small_plan(latency=(0.0, 0.002), repeat=1), store, FakeAgent())
    assert len(store.runs(sweep="s")) == 3  # nothing added, nothing lost


async def test_an_interrupted_sweep_leaves_the_db_consistent_with_every_completed_run(tmp_path):
    store = ResultsStore(tmp_path / "r.db")
    agent = FakeAgent(sleep=0.2)
    progress = Recorder()
    with trio.move_on_after(0.9) as scope:
        await sweep(small_plan(), store, agent, progress=progress)
    assert scope.cancelled_caught
    assert store.integrity_check() == "ok"
    stored = {r["point"] for r in store.runs(sweep="s")}
    completed = {key for key, _ in progress.finished}
    assert stored == completed and 0 < len(stored) < 6
    # The run in flight was not half-written: the DB holds exactly the completed ones.
    con = sqlite3.connect(tmp_path / "r.db")
    try:
        assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == len(completed)
    finally:
        con.close()
    assert dest_pids() == set()
    # Resuming runs exactly the rest.
    rest = FakeAgent()
    outcome = await sweep(small_plan(), store, rest)
    assert outcome.skipped == len(completed) and outcome.ran == 6 - len(completed)
    assert {r["point"] for r in store.runs(sweep="s")} == {p.key for p in small_plan().points()}


async def test_a_raising_run_point_is_recorded_as_an_error_and_retried_on_rerun(tmp_path):
    store = ResultsStore(tmp_path / "r.db")
    plan = small_plan(repeat=1)
    bad = plan.points()[1].key
    outcome = await sweep(plan, store, FakeAgent(raise_on={bad}, fail_on={plan.points()[2].key}))
    assert (outcome.ran, outcome.errors, outcome.stopped) == (3, 1, None)
    by_point = {r["point"]: r for r in store.runs(sweep="s")}
    assert by_point[bad]["outcome"] == "error"
    assert "ConnectionRefusedError: fake: refused" in by_point[bad]["error"]
    assert by_point[plan.points()[2].key]["outcome"] == "failed"
    retry = FakeAgent()
    outcome = await sweep(plan, store, retry)
    assert [key for key, _ in retry.calls] == [bad] and outcome.skipped == 2


async def test_consecutive_errors_stop_the_sweep(tmp_path):
    store = ResultsStore(tmp_path / "r.db")
    plan = small_plan(latency=(0.0, 0.001, 0.002, 0.003, 0.004), repeat=1)
    agent = FakeAgent(raise_on={p.key for p in plan.points()})
    outcome = await sweep(plan, store, agent, max_consecutive_errors=3)
    assert outcome.ran == 3 and outcome.stopped.startswith("3 errors in a row")
    assert len(agent.calls) == 3


async def test_a_point_that_hangs_times_out_as_an_error(tmp_path):
    store = ResultsStore(tmp_path / "r.db")
    outcome = await sweep(small_plan(latency=(0.0,), repeat=1), store, FakeAgent(sleep=30),
                          point_timeout=0.5)
    assert outcome.errors == 1
    assert store.runs(sweep="s")[0]["error"] == "point timed out after 0.5s"


async def test_a_destination_that_cannot_start_is_a_clear_error(tmp_path, agent, monkeypatch):
    monkeypatch.setenv("FAKE_DEST_REFUSE", "1")
    with pytest.raises(DestinationError, match=r"exited \(2\) before serving: .*refusing to start"):
        await sweep(small_plan(), ResultsStore(tmp_path / "r.db"), agent)
    assert agent.calls == [] and dest_pids() == set()


async def test_a_destination_dying_mid_sweep_stops_it_and_keeps_the_runs(tmp_path, agent, monkeypatch):
    monkeypatch.setenv("FAKE_DEST_EXIT_AFTER", "2")
    store = ResultsStore(tmp_path / "r.db")
    with pytest.raises(DestinationError, match=r"exited \(7\) mid-sweep"):
        await sweep(small_plan(), store, FakeAgent(sleep=0.3))
    assert store.integrity_check() == "ok"
    assert 1 <= len(store.runs(sweep="s")) <= 2
    assert dest_pids() == set()


async def test_nothing_starts_when_every_point_is_done(tmp_path, agent):
    store = ResultsStore(tmp_path / "r.db")
    await sweep(small_plan(repeat=1), store, agent)

    def no_destination(listen, psk_file):
        raise AssertionError("the destination must not be started")

    outcome = await sweep(small_plan(repeat=1), store, FakeAgent(), dest_argv=no_destination)
    assert outcome.ran == 0 and outcome.injector is None


async def test_a_sweep_refused_at_set_up_leaves_no_settings_to_refuse_its_corrected_rerun(tmp_path):
    """Issue 10 item 12: the injector's refusal comes before the sweep's settings are stored.

    Negative control: the same name with other settings is still refused once a run is stored.
    """
    from source_agent.sweep.injector import InjectorError

    store = ResultsStore(tmp_path / "r.db")

    async def refuse(topology):
        raise InjectorError("--injector tc: unsupported on this host: sch_netem")

    with pytest.raises(InjectorError):
        await run_sweep(small_plan(topology="netns", repeat=1), store, FakeAgent(),
                        endpoint=None, choose=refuse, progress=Recorder())
    assert store.sweep_config("s") is None
    outcome = await sweep(small_plan(repeat=1), store, FakeAgent())   # corrected: loopback
    assert outcome.ran == 3
    with pytest.raises(SweepConfigError, match="topology: stored 'loopback', now 'netns'"):
        await sweep(small_plan(topology="netns", repeat=1), store, FakeAgent())


async def test_a_sweep_whose_destination_never_started_does_not_bind_its_name(tmp_path, monkeypatch):
    """The settings are stored only with the destination up; a name with no run is replaceable."""
    store = ResultsStore(tmp_path / "r.db")
    monkeypatch.setenv("FAKE_DEST_REFUSE", "1")
    with pytest.raises(DestinationError):
        await sweep(small_plan(repeat=1), store, FakeAgent())
    monkeypatch.delenv("FAKE_DEST_REFUSE")
    outcome = await sweep(small_plan(latency=(0.0, 0.002), repeat=1), store, FakeAgent())
    assert outcome.ran == 2 and store.sweep_config("s")["axes"]["latency"] == ["0ms", "2ms"]


async def test_a_point_that_says_every_later_one_would_fail_stops_the_sweep(tmp_path):
    """SweepStop (the agents raise it for a refused key): one error run, then the sweep stops."""
    from source_agent.sweep.runner import SweepStop

    class Refused(FakeAgent):
        async def __call__(self, point, target):
            self.calls.append((point.key, target.address))
            raise SweepStop(f"{target.destination}: the destination refused the authentication")

    store = ResultsStore(tmp_path / "r.db")
    agent = Refused()
    outcome = await sweep(small_plan(repeat=1), store, agent)
    assert len(agent.calls) == 1 and outcome.errors == 1
    [run] = store.runs(sweep="s")
    assert outcome.stopped == run["error"] and "refused the authentication" in run["error"]
    assert run["destination"] == run["report"]["destination"] != run["report"]["sweep"]["via"]
    shown = io.StringIO()               # `results show` can print an errored sweep run too
    print_report(run["report"], as_json=False, file=shown)
    assert run["run_id"] in shown.getvalue() and "refused the authentication" in shown.getvalue()
    # Negative control: an ordinary error does not stop the sweep.
    outcome = await sweep(small_plan(repeat=1), store, FakeAgent(raise_on={"none"}))
    assert outcome.stopped is None and outcome.ran == 3

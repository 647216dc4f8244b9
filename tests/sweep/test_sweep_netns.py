"""netns topology: the destination runs inside a namespace; the namespace is gone afterwards, always."""

from __future__ import annotations

import os

import pytest
import trio
from fakes import FakeAgent
from sweep_helpers import small_plan, sweep

from source_agent.netem import _ip, netem_unsupported, netns_unsupported
from source_agent.results import ResultsStore
from source_agent.sweep.injector import InjectorError, choose_injector
from source_agent.sweep.topology import DestinationError


@pytest.fixture(autouse=True)
def need_netns():
    reason = netns_unsupported()
    if reason is not None:
        pytest.skip(f"unsupported on this host: {reason}")


def ours() -> list[str]:
    return [n for n in _ip.namespaces() if n.startswith(f"{_ip.PREFIX}{os.getpid()}-")]


async def test_a_netns_sweep_reaches_the_destination_inside_and_removes_the_namespace(tmp_path, agent):
    store = ResultsStore(tmp_path / "r.db")
    outcome = await sweep(small_plan(topology="netns"), store, agent)
    assert (outcome.ran, outcome.errors) == (6, 0)
    runs = store.runs(sweep="s")
    injector = runs[0]["report"]["sweep"]["injector"]
    # The relay forwarded to the namespace's address, on the veth /30 the topology made.
    assert injector["target"].startswith("10.201.") and injector["target"].endswith(":7400")
    if netem_unsupported() is not None:
        assert injector["injector"] == "relay" and "sch_netem" in injector["reason"]
    assert ours() == []


async def test_the_namespace_is_removed_after_a_failed_sweep(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_DEST_EXIT_AFTER", "1")
    with pytest.raises(DestinationError, match="mid-sweep"):
        await sweep(small_plan(topology="netns"), ResultsStore(tmp_path / "r.db"),
                    FakeAgent(sleep=0.3))
    assert ours() == []


async def test_the_namespace_is_removed_after_a_destination_that_never_started(tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_DEST_REFUSE", "1")
    with pytest.raises(DestinationError, match="before serving"):
        await sweep(small_plan(topology="netns"), ResultsStore(tmp_path / "r.db"), FakeAgent())
    assert ours() == []


async def test_the_namespace_is_removed_after_a_cancelled_sweep(tmp_path):
    store = ResultsStore(tmp_path / "r.db")
    seen_inside = []

    class Watching(FakeAgent):
        async def __call__(self, point, target):
            seen_inside.append(len(ours()))
            return await super().__call__(point, target)

    with trio.move_on_after(1.5):
        await sweep(small_plan(topology="netns"), store, Watching(sleep=0.3))
    assert seen_inside and set(seen_inside) == {1}  # the namespace existed while it ran
    assert ours() == []
    assert store.integrity_check() == "ok"


async def test_tc_is_refused_where_it_would_shape_a_host_interface_or_netem_is_missing():
    with pytest.raises(InjectorError, match="needs --topology netns"):
        await choose_injector("tc", "loopback")
    if netem_unsupported() is not None:
        with pytest.raises(InjectorError, match="unsupported on this host: sch_netem"):
            await choose_injector("tc", "netns")
        chosen = await choose_injector("auto", "netns")
        assert chosen.kind == "relay" and chosen.reason.startswith("unsupported on this host: sch_netem")
    else:
        assert (await choose_injector("auto", "netns")).kind == "tc"

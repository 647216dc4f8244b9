"""The tc injector's wiring: both veth ends shaped for a point, and unshaped after it, even on cancel.

This host has no sch_netem, so the qdisc commands themselves cannot run here
(source_agent.netem's own tests cover their argv); apply/remove are recorded
instead, which checks what the sweep asks of them.
"""

from __future__ import annotations

import pytest
import trio

from source_agent.netem import Link, Topology
from source_agent.sweep import injector
from source_agent.sweep.injector import Injector, inject
from source_agent.sweep.plan import PointConfig
from source_agent.sweep.topology import Endpoint

TOPOLOGY = Topology("netem-1-abcdef", "nmabcdefh", "nmabcdefg", "10.201.0.1", "10.201.0.2")
POINT = PointConfig(0.005, 0.001, 12.5e6, 2 << 20, 0, "best", 0)


@pytest.fixture
def calls(monkeypatch):
    seen: list[tuple] = []

    async def apply(dev, link, *, netns=None):
        seen.append(("apply", dev, link, netns))

    async def remove(dev, *, netns=None):
        seen.append(("remove", dev, netns))

    monkeypatch.setattr(injector, "apply_netem", apply)
    monkeypatch.setattr(injector, "remove_netem", remove)
    return seen


def endpoint() -> Endpoint:
    return Endpoint("netns", TOPOLOGY.ns_address, 7400, None, TOPOLOGY)


async def test_tc_shapes_both_ends_for_the_point_and_removes_them(calls):
    link = Link(0.005, 0.001, 12.5e6)
    async with inject(Injector("tc", "sch_netem available"), endpoint(), POINT) as injection:
        assert injection.address == (TOPOLOGY.ns_address, 7400)  # no relay in the path
        assert calls == [("apply", "nmabcdefh", link, None),
                         ("apply", "nmabcdefg", link, "netem-1-abcdef")]
        described = injection.describe()
        assert described["injector"] == "tc" and described["up_link"] == str(link)
    assert calls[2:] == [("remove", "nmabcdefh", None), ("remove", "nmabcdefg", "netem-1-abcdef")]


async def test_tc_qdiscs_are_removed_when_the_point_is_cancelled(calls):
    with trio.move_on_after(0.1):
        async with inject(Injector("tc", "test"), endpoint(), POINT):
            await trio.sleep_forever()
    assert [c[0] for c in calls] == ["apply", "apply", "remove", "remove"]

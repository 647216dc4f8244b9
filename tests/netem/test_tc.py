"""tc netem: probed on a throwaway namespace, commands built exactly, applied only where supported."""

from __future__ import annotations


import pytest
import trio

from source_agent.netem import Link, Unsupported
from source_agent.netem import _ip
from source_agent.netem.netns import netns_unsupported, open_topology
from source_agent.netem.tc import (
    apply_netem, netem_commands, netem_unsupported, probe_qdisc, remove_command, remove_netem,
    require_netem,
)


def test_commands_for_delay_jitter_and_rate():
    commands = netem_commands("veth0", Link.parse("5ms", "1ms", "100mbit"), netns="ns1")
    assert commands == [
        ["tc", "-n", "ns1", "qdisc", "replace", "dev", "veth0", "root", "handle", "1:", "netem",
         "delay", "5000us", "1000us", "rate", "100000000bit"],
        ["tc", "-n", "ns1", "qdisc", "replace", "dev", "veth0", "parent", "1:1", "pfifo",
         "limit", "1000"],
    ]


def test_commands_without_jitter_need_no_fifo_child():
    assert netem_commands("veth0", Link(0.02)) == [
        ["tc", "qdisc", "replace", "dev", "veth0", "root", "handle", "1:", "netem",
         "delay", "20000us"]]
    assert remove_command("veth0", netns="ns1") == ["tc", "-n", "ns1", "qdisc", "del", "dev",
                                                    "veth0", "root"]


#: The probe itself needs a throwaway namespace.
needs_netns = pytest.mark.skipif(netns_unsupported() is not None,
                                 reason=f"unsupported on this host: {netns_unsupported()}")


@needs_netns
def test_probe_names_what_tc_said_and_leaves_nothing():
    before = set(_ip.namespaces())
    reason = probe_qdisc("netem", "delay", "1ms")
    if reason is not None:
        assert reason.startswith("sch_netem (tc said: ") and reason.endswith(")")
        with pytest.raises(Unsupported, match=r"^unsupported on this host: sch_netem \(tc said: "):
            require_netem()
    else:
        require_netem()
    assert set(_ip.namespaces()) == before


@needs_netns
def test_probe_can_say_yes():
    """Negative control: a qdisc every kernel has probes as supported."""
    assert probe_qdisc("pfifo") is None


@needs_netns
def test_probe_reports_an_unknown_qdisc():
    assert probe_qdisc("nosuchqdisc").startswith("sch_nosuchqdisc (tc said: ")


# A skipif, not pytest.skip inside the trio test: pytest-trio loses the skip message.
@pytest.mark.skipif(netem_unsupported() is not None,
                    reason=f"unsupported on this host: {netem_unsupported()}")
async def test_netem_delay_on_a_veth_pair(rtt, start_ns_echo):
    async with open_topology() as topology, trio.open_nursery() as nursery:
        await apply_netem(topology.host_if, Link(0.010))
        await apply_netem(topology.ns_if, Link(0.010), netns=topology.namespace)
        target = await start_ns_echo(topology, nursery)
        with trio.fail_after(20):
            async with await trio.open_tcp_stream(*target) as stream:
                rtts = await rtt(stream, 5)
        assert 0.020 <= min(rtts) and sorted(rtts)[2] < 0.020 + 0.015
        await remove_netem(topology.host_if)
        nursery.cancel_scope.cancel()


@pytest.mark.skipif(netem_unsupported() is None, reason="sch_netem is supported here")
@needs_netns
async def test_apply_raises_unsupported_before_running_tc():
    with pytest.raises(Unsupported, match=r"^unsupported on this host: sch_netem \(tc said: "):
        await apply_netem("no-such-dev", Link(0.010))

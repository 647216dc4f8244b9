"""The netns topology exists while its block runs and is gone after every way out of it."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from contextlib import asynccontextmanager
from functools import partial
from typing import AsyncIterator

import pytest
import trio

from source_agent.netem import open_relay
from source_agent.netem import _ip
from source_agent.netem.netns import (
    Topology, _create, _destroy, cleanup_stale, leftovers, link_exists, namespace_exists,
    netns_unsupported, open_topology,
)


pytestmark = pytest.mark.skipif(
    netns_unsupported() is not None, reason=f"unsupported on this host: {netns_unsupported()}")

#: A child that holds a topology open until signalled, printing its namespace first.
HOLDER = textwrap.dedent("""
    import trio
    from source_agent.netem.netns import open_topology
    async def main():
        async with open_topology(clean_stale=False) as topology:
            print(topology.namespace, topology.host_if, flush=True)
            await trio.sleep(60)
    trio.run(main)
""")

async def test_gone_after_normal_exit():
    async with open_topology() as topology:
        assert set(leftovers(topology)) == {f"namespace {topology.namespace}",
                                             f"link {topology.host_if}"}  # negative control
        assert topology.host_address.startswith("10.201.")
        assert not trio.lowlevel.currently_ki_protected()  # the caller's block stays interruptible
    assert leftovers(topology) == []


async def test_gone_after_an_exception_inside():
    with pytest.raises(RuntimeError, match="experiment failed"):
        async with open_topology() as topology:
            raise RuntimeError("experiment failed")
    assert leftovers(topology) == []


async def test_gone_after_cancellation_and_keyboard_interrupt():
    with trio.CancelScope() as scope:
        async with open_topology() as cancelled:
            scope.cancel()
            await trio.sleep(10)
    with pytest.raises(KeyboardInterrupt):
        async with open_topology() as interrupted:
            raise KeyboardInterrupt
    assert leftovers(cancelled) == [] and leftovers(interrupted) == []


@asynccontextmanager
async def holder() -> AsyncIterator[tuple[trio.Process, str]]:
    """A child process holding a topology; killed and reaped on the way out whatever happens."""
    # -P: the installed package, never the checkout (whose kvmcore has no built extension).
    process = await trio.lowlevel.open_process([sys.executable, "-P", "-c", HOLDER],
                                               stdout=subprocess.PIPE)
    try:
        async with process.stdout:
            line = b""
            with trio.fail_after(20):
                while not line.endswith(b"\n"):
                    chunk = await process.stdout.receive_some(200)
                    assert chunk, "holder exited before creating its topology"
                    line += chunk
            yield process, line.decode().split()[0]
    finally:
        process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


@pytest.mark.parametrize("presses", [1, 2])
async def test_gone_after_ctrl_c_of_the_owning_process(presses):
    """Ctrl-C, pressed once or twice in quick succession, leaves nothing behind."""
    async with holder() as (process, namespace):
        assert namespace_exists(namespace)
        for _ in range(presses):
            process.send_signal(signal.SIGINT)
            await trio.sleep(0.005)
        with trio.fail_after(20):
            await process.wait()
    assert not namespace_exists(namespace)


async def test_stale_namespace_of_a_killed_run_is_cleaned_up_and_live_ones_are_not():
    async with holder() as (process, namespace):
        process.kill()
        await process.wait()
    assert namespace_exists(namespace)  # kill -9 leaves it: the case cleanup is for
    mine = await trio.to_thread.run_sync(_create, _ip.unique_namespace())  # our pid: alive
    try:
        removed = await trio.to_thread.run_sync(cleanup_stale)
        assert namespace in removed
        assert not namespace_exists(namespace)
        assert mine.namespace not in removed and namespace_exists(mine.namespace)
    finally:
        await trio.to_thread.run_sync(_destroy, mine.namespace)
    assert leftovers(mine) == []


def test_a_stray_host_link_of_ours_is_cleaned_up():
    """A crash between creating the veth pair and moving its end leaves both ends in the root namespace."""
    token = _ip.token_of(_ip.unique_namespace())
    host_if, other = f"nm{token}h", f"nm{token}x"  # the peer's name matches nothing of ours
    _ip.run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", other])
    try:
        assert link_exists(host_if)  # negative control
        assert host_if in cleanup_stale()
        assert not link_exists(host_if) and not link_exists(other)
    finally:
        _ip.run(["ip", "link", "delete", host_if], check=False)


async def test_processes_inside_die_with_the_topology():
    async with open_topology() as topology:
        stray = subprocess.Popen(topology.exec_argv(["sleep", "600"]))
        async with trio.open_nursery() as nursery:
            owned = await nursery.start(partial(topology.run, ["sleep", "600"]))
            nursery.cancel_scope.cancel()
    assert owned.returncode is not None
    assert stray.wait(timeout=10) == -signal.SIGKILL
    assert leftovers(topology) == []


async def test_relay_reaches_a_server_inside_the_namespace(rtt, start_ns_echo):
    async with open_topology() as topology, trio.open_nursery() as nursery:
        target = await start_ns_echo(topology, nursery)
        with trio.fail_after(20):
            async with open_relay(target, delay="5ms") as relay:
                async with await trio.open_tcp_stream(*relay.address) as stream:
                    rtts = await rtt(stream, 5)
        assert min(rtts) >= 0.010
        assert relay.stats.up.bytes == relay.stats.down.bytes == 5 * 64
        nursery.cancel_scope.cancel()
    assert leftovers(topology) == []


def test_topology_exec_argv():
    topology = Topology("netem-1-abcdef", "nmabcdefh", "nmabcdefg", "10.201.0.1", "10.201.0.2")
    assert topology.exec_argv(["dest-agent", "--port", "0"]) == [
        "ip", "netns", "exec", "netem-1-abcdef", "dest-agent", "--port", "0"]

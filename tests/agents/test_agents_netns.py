"""Two hosts on one machine: the destination agent in a second network namespace, joined by veth.

The source runs in this (root) namespace; the destination agent is the real
console script started inside the namespace, on a non-loopback address, so it
needs (and gets) a key file. The topology comes from source_agent.netem
(torn down on every exit path); the test checks that nothing of it remains.
"""

from __future__ import annotations

import json
import subprocess
from functools import partial

import pytest
import trio
from agents_helpers import BIN, key_file

from source_agent import netem
from source_agent.netem.netns import leftovers

PORT = 7400


async def wait_listening(host: str, port: int, timeout: float = 15.0) -> None:
    with trio.fail_after(timeout):
        while True:
            try:
                stream = await trio.open_tcp_stream(host, port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return


async def test_migration_to_a_destination_in_another_namespace(tmp_path):
    reason = await trio.to_thread.run_sync(netem.netns_unsupported)
    if reason is not None:
        pytest.skip(f"unsupported on this host: {reason}")
    key = key_file(tmp_path / "key")
    async with netem.open_topology() as topo, trio.open_nursery() as nursery:
        dest = await nursery.start(partial(
            topo.run, [str(BIN / "dest-agent"), "serve", "--listen",
                       f"{topo.ns_address}:{PORT}", "--psk-file", str(key)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False))
        await wait_listening(topo.ns_address, PORT)
        done = await trio.run_process(
            [str(BIN / "source-agent"), "migrate", "--to", f"{topo.ns_address}:{PORT}",
             "--psk-file", str(key), "--topology", "netns", "--gap", "10ms", "--json",
             "--no-db"], capture_stdout=True, capture_stderr=True, check=False,
            cwd=tmp_path)
        # Negative control: the same destination refuses a source without the key.
        refused = await trio.run_process(
            [str(BIN / "source-agent"), "migrate", "--to", f"{topo.ns_address}:{PORT}",
             "--no-db"], capture_stdout=True, capture_stderr=True, check=False, cwd=tmp_path)
        dest.terminate()
        nursery.cancel_scope.cancel()
    assert done.returncode == 0, done.stderr.decode()
    report = json.loads(done.stdout)
    assert report["topology"] == "netns"
    assert report["destination"] == f"{topo.ns_address}:{PORT}"
    assert report["verdicts"]["kvmclock_follows_gap"]["ok"] is True
    assert report["wall_gap"]["value_ns"] >= 10_000_000 - report["wall_gap"]["uncertainty_ns"]
    assert refused.returncode == 3 and b"auth" in refused.stderr.lower()
    assert leftovers(topo) == []

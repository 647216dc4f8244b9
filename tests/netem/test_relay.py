"""The relay on real loopback TCP: measured RTT, overhead, rate, partition, cut, shutdown.

Timing tolerances are for a loaded 2-core CI machine shared with other jobs:
the *lower* bounds are exact (the relay must never deliver early), the upper
bounds allow scheduler hiccups of several milliseconds, and medians of
repeated pings (bounded counts) keep a single stall from failing a test.
"""

from __future__ import annotations

import json
import socket
import statistics

import pytest
import trio

from source_agent.netem import ImpairmentError, Link, open_relay

#: Slack above the configured RTT for the median (scheduling on a busy 2-core host).
RTT_SLACK = 0.015
#: The most the relay may add to the median loopback RTT at 0 ms (measured: ~0.2 ms idle).
ZERO_DELAY_BUDGET = 0.002
PINGS = 30


@pytest.mark.parametrize("one_way", [0.0, 0.005, 0.020])
async def test_measured_rtt_matches_configured_delay(echo_port, rtt, one_way):
    async with open_relay(("127.0.0.1", echo_port), delay=one_way) as relay:
        async with await trio.open_tcp_stream(*relay.address) as stream:
            with trio.fail_after(10):
                rtts = await rtt(stream, PINGS)
    assert min(rtts) >= 2 * one_way  # never early: exact
    assert statistics.median(rtts) <= 2 * one_way + RTT_SLACK
    for direction in (relay.stats.up, relay.stats.down):  # what the relay itself measured
        assert direction.bytes == PINGS * 64
        if one_way == 0:
            assert direction.batches_held == 0 and direction.held_mean is None  # copy path
        else:
            assert direction.batches_held == PINGS
            assert direction.held_min >= one_way
            assert direction.held_mean <= one_way + RTT_SLACK / 2


async def test_zero_delay_adds_little_over_a_direct_connection(echo_port, rtt):
    with trio.fail_after(10):
        async with await trio.open_tcp_stream("127.0.0.1", echo_port) as direct:
            direct_rtts = await rtt(direct, 100)
        async with open_relay(("127.0.0.1", echo_port)) as relay:
            async with await trio.open_tcp_stream(*relay.address) as relayed:
                relayed_rtts = await rtt(relayed, 100)
    added = statistics.median(relayed_rtts) - statistics.median(direct_rtts)
    assert added < ZERO_DELAY_BUDGET, f"relay at 0 ms added {added * 1e3:.3f} ms"
    assert relay.stats.up.bytes == relay.stats.down.bytes == 100 * 64
    report = relay.report()
    assert report["injector"] == "relay" and report["up_link"] == "delay 0ms rate unlimited"
    assert report["up"]["bytes"] == report["down"]["bytes"] == 100 * 64
    assert report["accepted"] == 1 and report["up"]["held_mean"] is None
    json.dumps(report, allow_nan=False)  # storable as-is in the results store


async def test_asymmetric_links(echo_port, rtt):
    """``up`` and ``down`` override one direction each; the RTT is their sum."""
    async with open_relay(("127.0.0.1", echo_port), up=Link(0.010), down=Link(0.002)) as relay:
        async with await trio.open_tcp_stream(*relay.address) as stream:
            with trio.fail_after(10):
                rtts = await rtt(stream, 10)
    assert min(rtts) >= 0.012
    assert statistics.median(rtts) <= 0.012 + RTT_SLACK


@pytest.mark.parametrize("rate", [None, "16mbit"])
async def test_rate_limit_bounds_throughput(sink, rate):
    """16mbit = 2 MB/s: 1 MB must take at least ~0.5 s at the sink; unlimited (control) is far faster."""
    total, limit = 1_000_000, 2_000_000
    async with open_relay(("127.0.0.1", sink.port), rate=rate) as relay:
        with trio.fail_after(10):
            async with await trio.open_tcp_stream(*relay.address) as stream:
                start = trio.current_time()
                await stream.send_all(b"r" * total)
            await sink.done.wait()
    elapsed = sink.last - start
    assert sink.received == total
    if rate is None:
        assert elapsed < 0.2
    else:
        # Upper bound on throughput is exact up to one 20 kB burst; the lower
        # bound only rules out gross slowness (half the rate) on a busy host.
        assert (total - 20_000) / limit <= elapsed <= 2 * total / limit


@pytest.mark.parametrize("delay", ["0ms", "1ms"])  # the copy path and the queued path
async def test_partition_silences_and_heal_resumes(echo_port, rtt, delay):
    async with open_relay(("127.0.0.1", echo_port), delay=delay) as relay:
        async with await trio.open_tcp_stream(*relay.address) as stream:
            with trio.fail_after(10):
                await rtt(stream, 2)
                relay.partition()
                assert relay.partitioned
                await stream.send_all(b"during partition")
                with trio.move_on_after(0.3) as silent:
                    await stream.receive_some(100)
                assert silent.cancelled_caught, "bytes crossed a partition"
                relay.heal()
                received = b""
                while len(received) < 16:
                    received += await stream.receive_some(100)
                assert received == b"during partition"
                await rtt(stream, 2)


async def test_connection_opened_during_partition_waits_for_heal(echo_port, rtt):
    async with open_relay(("127.0.0.1", echo_port)) as relay:
        relay.partition()
        async with await trio.open_tcp_stream(*relay.address) as stream:
            await stream.send_all(b"hello")
            with trio.move_on_after(0.2) as silent:
                await stream.receive_some(100)
            assert silent.cancelled_caught
            assert relay.stats.accepted == 1 and relay.stats.active == 0
            relay.heal()
            with trio.fail_after(5):
                assert await stream.receive_some(100) == b"hello"


async def test_many_concurrent_connections(echo_port, rtt, fds_after, fd_count):
    """50 clients at once (the robustness suite uses ~100); each gets its own pipes and all finish."""
    before = fd_count()
    async with open_relay(("127.0.0.1", echo_port), delay="2ms") as relay:
        async def client():
            async with await trio.open_tcp_stream(*relay.address) as stream:
                assert min(await rtt(stream, 3)) >= 0.004

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for _ in range(50):
                    nursery.start_soon(client)
            while relay.stats.active:  # the relay notices each close a moment later
                await trio.sleep(0.01)
    stats = relay.stats
    assert (stats.accepted, stats.active, stats.connect_failures) == (50, 0, 0)
    assert stats.up.bytes == stats.down.bytes == 50 * 3 * 64
    assert await fds_after(before) == before


async def test_cut_resets_every_connection_and_keeps_listening(echo_port, rtt):
    async with open_relay(("127.0.0.1", echo_port)) as relay:
        first = await trio.open_tcp_stream(*relay.address)
        second = await trio.open_tcp_stream(*relay.address)
        async with first, second:
            with trio.fail_after(5):
                await rtt(first, 1)
                await rtt(second, 1)
                assert relay.cut() == 2
                for stream in (first, second):
                    with pytest.raises(trio.BrokenResourceError):
                        await stream.receive_some(100)
        async with await trio.open_tcp_stream(*relay.address) as third:
            with trio.fail_after(5):
                await rtt(third, 1)
    assert relay.stats.accepted == 3


async def test_jitter_keeps_a_real_tcp_stream_in_order(echo_port):
    """Numbered 4-byte records sent in bursts through 5 ms ± 5 ms come back in order."""
    records = 4000
    expected = b"".join(i.to_bytes(4, "big") for i in range(records))
    async with open_relay(("127.0.0.1", echo_port), delay="5ms", jitter="5ms", seed=7) as relay:
        async with await trio.open_tcp_stream(*relay.address) as stream:
            with trio.fail_after(20):
                async with trio.open_nursery() as nursery:
                    async def send():
                        for start in range(0, len(expected), 1000):
                            await stream.send_all(expected[start:start + 1000])
                            await trio.sleep(0.001)
                    nursery.start_soon(send)
                    received = b""
                    while len(received) < len(expected):
                        received += await stream.receive_some(65536)
    assert received == expected
    assert relay.stats.up.held_max > relay.stats.up.held_min + 0.001  # jitter was applied


async def test_half_close_is_forwarded_both_ways(echo_port):
    async with open_relay(("127.0.0.1", echo_port), delay="1ms") as relay:
        async with await trio.open_tcp_stream(*relay.address) as stream:
            with trio.fail_after(5):
                await stream.send_all(b"last words")
                await stream.send_eof()
                received = b""
                while data := await stream.receive_some(100):
                    received += data
    assert received == b"last words"


async def test_unreachable_target_is_reported_and_contained():
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    async with open_relay(("127.0.0.1", dead_port)) as relay:
        for _ in range(2):
            async with await trio.open_tcp_stream(*relay.address) as stream:
                with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
                    await stream.receive_some(100)
    assert relay.stats.connect_failures == 2
    assert f"connect to 127.0.0.1:{dead_port}" in relay.stats.last_error


async def test_exit_closes_listener_and_connections(echo_port, rtt, fd_count, fds_after):
    before = fd_count()
    async with open_relay(("127.0.0.1", echo_port), delay="1ms") as relay:
        client = await trio.open_tcp_stream(*relay.address)
        await rtt(client, 1)
        assert fd_count() > before  # negative control: the check sees open sockets
    async with client:
        with trio.fail_after(5):
            assert await client.receive_some(100) == b""  # the relay closed its side
    assert await fds_after(before) == before
    with pytest.raises(OSError):
        await trio.open_tcp_stream(*relay.address)


async def test_bad_options_fail_before_listening(fd_count):
    before = fd_count()
    with pytest.raises(ImpairmentError, match="^delay: '5' has no unit"):
        async with open_relay(("127.0.0.1", 9), delay="5"):
            pass
    with pytest.raises(ImpairmentError, match="^buffer: "):
        async with open_relay(("127.0.0.1", 9), buffer=0):
            pass
    assert fd_count() == before


async def test_an_error_in_the_block_surfaces_as_itself(echo_port, fd_count, fds_after):
    """Not wrapped in the relay's ExceptionGroup; the relay is still shut down."""
    before = fd_count()
    with pytest.raises(LookupError, match="^experiment failed$"):
        async with open_relay(("127.0.0.1", echo_port)) as relay:
            raise LookupError("experiment failed")
    assert await fds_after(before) == before
    with pytest.raises(OSError):
        await trio.open_tcp_stream(*relay.address)


async def test_outer_cancellation_stops_the_relay(echo_port, rtt, fd_count, fds_after):
    before = fd_count()
    with trio.move_on_after(0.2) as scope:
        async with open_relay(("127.0.0.1", echo_port), delay="1ms") as relay:
            async with await trio.open_tcp_stream(*relay.address) as stream:
                await rtt(stream, 1)
                await trio.sleep(10)
    assert scope.cancelled_caught
    assert await fds_after(before) == before

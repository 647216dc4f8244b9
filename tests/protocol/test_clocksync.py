"""The clock offset estimator, as a pure function and through the channel."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from protocol_helpers import PSK, StreamWrapper

import protocol
from protocol import Channel, ClockSample, Session, estimate_clock_offset

MS = 1_000_000


def exchange(t1: int, offset: int, out: int, back: int, processing: int = 0) -> ClockSample:
    """A sample with destination clock = source clock + offset and the given one-way delays."""
    t2 = t1 + out + offset
    t3 = t2 + processing
    t4 = t3 - offset + back
    return ClockSample(t1, t2, t3, t4)


def test_symmetric_delays_give_the_exact_offset() -> None:
    estimate = estimate_clock_offset([exchange(0, 5 * MS, 2 * MS, 2 * MS, processing=7 * MS)])
    assert estimate.offset_ns == 5 * MS
    assert estimate.rtt_ns == 4 * MS  # the destination's processing time is not network time
    assert estimate.uncertainty_ns == 2 * MS


def test_asymmetric_delays_stay_within_the_bound() -> None:
    estimate = estimate_clock_offset([exchange(0, -3 * MS, 9 * MS, 1 * MS)])
    assert estimate.offset_ns != -3 * MS  # control: asymmetry does bias the point estimate...
    assert abs(estimate.offset_ns - (-3 * MS)) <= estimate.uncertainty_ns  # ...within the bound


def test_minimum_rtt_sample_wins() -> None:
    samples = [
        exchange(0, 10 * MS, 40 * MS, 1 * MS),  # queued on the way out: badly biased
        exchange(100 * MS, 10 * MS, 1 * MS, 1 * MS),
        exchange(200 * MS, 10 * MS, 30 * MS, 1 * MS),
    ]
    estimate = estimate_clock_offset(samples)
    assert estimate.offset_ns == 10 * MS
    assert estimate.rtt_ns == 2 * MS
    assert estimate.samples == 3
    assert estimate.consistent
    # Control: averaging the offsets instead would be far off.
    mean = sum(s.offset_ns for s in samples) / len(samples)
    assert abs(mean - 10 * MS) > 5 * MS


def test_a_clock_step_between_samples_is_flagged_inconsistent() -> None:
    samples = [exchange(0, 10 * MS, 1 * MS, 1 * MS), exchange(100 * MS, 60 * MS, 1 * MS, 1 * MS)]
    assert not estimate_clock_offset(samples).consistent
    assert estimate_clock_offset(samples[:1]).consistent  # control


@pytest.mark.parametrize(
    "sample",
    [ClockSample(0, 10, 5, 20), ClockSample(10, 0, 0, 5), ClockSample(0, 0, 100, 50)],
)
def test_non_causal_samples_are_refused(sample: ClockSample) -> None:
    with pytest.raises(ValueError, match="not causally ordered"):
        estimate_clock_offset([sample])


def test_no_samples_is_an_error() -> None:
    with pytest.raises(ValueError, match="no clock samples"):
        estimate_clock_offset([])


class DelayedStream(StreamWrapper):
    """A stream whose every write arrives ``delay`` seconds later (for asymmetric paths)."""

    def __init__(self, inner: trio.abc.Stream, delay: float) -> None:
        super().__init__(inner)
        self.delay = delay

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.sleep(self.delay)
        await self.inner.send_all(data)


async def test_channel_clock_sync_recovers_a_known_offset(autojump_clock: trio.testing.MockClock) -> None:
    true_offset = 1_500 * MS
    left, right = trio.testing.memory_stream_pair()

    def source_clock() -> int:
        return int(trio.current_time() * 1e9)

    def destination_clock() -> int:
        return source_clock() + true_offset

    source = Channel(DelayedStream(left, 0.003), Session("source", PSK), clock=source_clock)
    destination = Channel(DelayedStream(right, 0.001), Session("destination", PSK), clock=destination_clock)
    result: list[protocol.Handshake] = []

    async def src() -> None:
        result.append(
            await protocol.source_handshake(source, agent_version="s", capabilities={}, clock_rounds=5)
        )
        await source.send(protocol.Bye())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(src)
        await protocol.destination_handshake(destination, agent_version="d", capabilities={})
        assert isinstance(await destination.receive(), protocol.Bye)
    (handshake,) = result
    clock = handshake.clock
    assert clock is not None
    assert clock.rtt_ns == pytest.approx(4 * MS, abs=1000)
    assert abs(clock.offset_ns - true_offset) <= clock.uncertainty_ns + 1000
    assert clock.offset_ns == pytest.approx(true_offset + 1 * MS, abs=1000)  # (out - back) / 2: the bias
    assert len(handshake.samples) == 5

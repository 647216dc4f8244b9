"""Link values parse from tc's vocabulary and bad input names the field and the reason."""

from __future__ import annotations

import math
import random

import pytest

from source_agent.netem import (
    ImpairmentError, Link, format_duration, format_rate, parse_duration, parse_rate,
)


@pytest.mark.parametrize("text, seconds", [
    ("5ms", 0.005), ("1ms", 0.001), ("250us", 250e-6), ("250µs", 250e-6), ("1.5s", 1.5),
    ("0ms", 0.0), (" 20 ms ", 0.020), ("100ns", 100e-9), ("2MS", 0.002),
])
def test_durations(text, seconds):
    assert math.isclose(parse_duration(text), seconds)


@pytest.mark.parametrize("text, bytes_per_second", [
    ("100mbit", 12.5e6), ("1gbit", 125e6), ("8kbit", 1000), ("800bit", 100),
    ("10mbps", 10e6), ("1mibit", 2**20 / 8), ("1kibps", 1024), ("100Mbit", 12.5e6),
])
def test_rates_follow_tc_units(text, bytes_per_second):
    assert math.isclose(parse_rate(text), bytes_per_second)


@pytest.mark.parametrize("call, message", [
    (lambda: parse_duration("5", "delay"), "delay: '5' has no unit"),
    (lambda: parse_duration("5 parsecs", "delay"), "delay: unknown unit 'parsecs'"),
    (lambda: parse_duration("fast", "jitter"), "jitter: cannot parse 'fast'"),
    (lambda: parse_duration(-0.001, "delay"), "delay: must be finite and >= 0"),
    (lambda: parse_duration(math.nan, "delay"), "delay: must be finite"),
    (lambda: parse_duration(True, "delay"), "delay: expected a number"),
    (lambda: parse_rate("0mbit"), "rate: '0mbit' must be more than 0"),
    (lambda: parse_rate(0), "rate: must be > 0"),
    (lambda: parse_rate("100mbits"), "rate: unknown unit 'mbits'"),
    (lambda: parse_rate(math.inf), "rate: must be finite"),
    (lambda: Link(delay=-1.0), "delay: must be finite and >= 0"),
    (lambda: Link(rate=0), "rate: must be > 0"),
    (lambda: Link.parse(jitter="1 week"), "jitter: unknown unit 'week'"),
])
def test_bad_values_name_the_field(call, message):
    with pytest.raises(ImpairmentError, match="^" + message.replace("(", r"\(")):
        call()


def test_impairment_error_is_a_value_error():
    with pytest.raises(ValueError):
        Link.parse(delay="soon")


def test_parse_and_str_round_trip():
    link = Link.parse("5ms", "1ms", "100mbit")
    assert (link.delay, link.jitter, link.rate) == (0.005, 0.001, 12.5e6)
    assert str(link) == "delay 5ms jitter 1ms rate 100mbit"
    assert str(Link()) == "delay 0ms rate unlimited"
    assert format_duration(250e-6) == "250us" and format_duration(2.0) == "2s"
    assert format_rate(100) == "800bit"


def test_zero_link_takes_the_fast_path_and_any_impairment_does_not():
    assert Link().is_zero
    assert not Link(delay=1e-6).is_zero
    assert not Link(jitter=1e-6).is_zero
    assert not Link(rate=1e9).is_zero


def test_sampled_delay_stays_within_jitter_and_never_negative():
    rng = random.Random(1)
    samples = [Link(0.005, 0.001).sample_delay(rng) for _ in range(1000)]
    assert 0.004 <= min(samples) < 0.0045 and 0.0055 < max(samples) <= 0.006
    assert min(Link(0.001, 0.005).sample_delay(rng) for _ in range(1000)) == 0.0


def test_netem_imports_on_its_own_with_only_the_neutral_agentcore():
    """The one unit grammar lives in agentcore; netem must not pull in KVM, the wire or the agents."""
    import subprocess
    import sys

    code = ("import sys, source_agent.netem; print(sorted(m.split('.')[0] for m in sys.modules "
            "if m.split('.')[0] in ('kvmcore', 'protocol', 'dest_agent', 'agentcore') "
            "or m.startswith('source_agent.') and not m.startswith('source_agent.netem')))")
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert set(eval(out)) <= {"agentcore"}   # noqa: S307 - our own subprocess's repr of a list

"""Axes parse strictly, with errors naming the option; point keys are stable and distinct."""

from __future__ import annotations

import pytest

from source_agent.sweep.plan import (
    Axes,
    AxisError,
    SweepPlan,
    config_mismatch,
    parse_byte_rates,
    parse_byte_sizes,
    parse_durations,
    parse_modes,
    parse_rates,
    parse_sizes,
    strategies,
)


def test_a_unit_on_the_last_item_is_the_lists_unit():
    assert parse_durations("--latency", "0,1,5,20,100ms") == (0.0, 0.001, 0.005, 0.02, 0.1)
    assert parse_durations("--latency", "0ms, 250us,1ms") == (0.0, 0.00025, 0.001)
    assert parse_sizes("--memory", "2,16MiB") == (2 << 20, 16 << 20)
    assert parse_rates("--bandwidth", "unlimited,100mbit,10mbps") == (None, 12.5e6, 10e6)


@pytest.mark.parametrize("option, text, message", [
    ("--latency", "5", "--latency: '5' has no unit (expected e.g. '5ms')"),
    ("--latency", "0,5", "--latency: '5' has no unit"),
    ("--latency", "1ms,5,20ms", "--latency: '5' has no unit"),
    ("--latency", "5parsecs", "--latency: unknown unit 'parsecs'"),
    ("--latency", "1ms,,2ms", "--latency: empty value"),
    ("--latency", "1ms,1000us", "--latency: '1000us' repeats a value already given"),
    ("--latency", "30s", "--latency: '30s' is over 10s (a unit typo?)"),
    ("--jitter", "-1ms", "--jitter: cannot parse '-1ms'"),
    ("--bandwidth", "100mbits", "--bandwidth: unknown unit 'mbits'"),
    ("--bandwidth", "0mbit", "--bandwidth: '0mbit' must be more than 0 (write 'unlimited' for no cap)"),
    ("--bandwidth", "100", "--bandwidth: '100' has no unit (expected e.g. '100mbit')"),
    ("--memory", "3MiB", "--memory: '3MiB' must be a multiple of 2MiB"),
    ("--memory", "2GiB", "--memory: '2GiB' must be a multiple of 2MiB between 2MiB and 1GiB"),
    ("--memory", "16", "--memory: '16' must be a multiple of 2MiB"),   # a bare size is bytes
    ("--memory", "3MiB,4MiB", "--memory: '3MiB' must be"),
])
def test_bad_axis_values_name_the_option_and_the_value(option, text, message):
    parse = {"--latency": parse_durations, "--jitter": parse_durations,
             "--bandwidth": parse_rates, "--memory": parse_sizes}[option]
    with pytest.raises(AxisError) as caught:
        parse(option, text)
    assert str(caught.value).startswith(message)


def test_strategies_are_canonical_and_checked():
    assert strategies("--strategy", []) == ("best",)
    assert strategies("--strategy", ["best", "tsc=none,clock=plain"]) == ("best", "clock=plain,tsc=none")
    with pytest.raises(AxisError, match="repeats a strategy"):
        strategies("--strategy", ["clock=plain,tsc=none", "tsc=none,clock=plain"])
    with pytest.raises(AxisError, match=r"clock='sundial': choose one of"):
        strategies("--strategy", ["clock=sundial"])


def test_every_combination_repeats_and_keys_are_distinct_and_stable():
    axes = Axes(latency=(0.0, 0.005), memory=(2 << 20, 16 << 20), gap_ns=(0, 10_000_000),
                strategy=("best", "clock=plain"))
    plan = SweepPlan("s", axes, 3)
    points = plan.points()
    assert len(points) == plan.combination_count * 3 == 48
    assert len({p.key for p in points}) == 48
    assert len({p.combination for p in points}) == 16
    # Repeat-major: all combinations once, then again.
    assert [p.repeat for p in points[:16]] == [0] * 16 and points[16].repeat == 1
    assert points[0].key == ("latency=0ms jitter=0ms bandwidth=unlimited memory=2MiB gap=0ms "
                             "strategy=best rep=0")
    # The same values spelled differently give the same keys.
    again = SweepPlan("s", Axes(latency=parse_durations("--latency", "0,5000us"),
                                memory=parse_sizes("--memory", "2MiB,16MiB"),
                                gap_ns=(0, 10_000_000), strategy=strategies("--strategy", [
                                    "best", "clock=plain"])), 3)
    assert [p.key for p in again.points()] == [p.key for p in points]


def test_config_mismatch_names_each_difference_and_ignores_repeat():
    a = SweepPlan("s", Axes(latency=(0.0, 0.001)), 2)
    assert config_mismatch(a.config(), SweepPlan("s", Axes(latency=(0.0, 0.001)), 9).config()) == []
    b = SweepPlan("s", Axes(latency=(0.002,), jitter=(0.001,)), 2, "netns")
    assert config_mismatch(a.config(), b.config()) == [
        "topology: stored 'loopback', now 'netns'",
        "--jitter: stored 0ms, now 1ms",
        "--latency: stored 0ms,1ms, now 2ms",
    ]


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "a b"}, "sweep name 'a b'"),
    ({"repeat": 0}, "--repeat: 0"),
    ({"topology": "remote"}, "--to HOST:PORT is required"),
    ({"destination": "h:1"}, "--to HOST:PORT is required with --topology remote, and only there"),
])
def test_bad_plans_are_refused(kwargs, message):
    fields = {"name": "s", "axes": Axes(), "repeat": 1, **kwargs}
    with pytest.raises(AxisError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SweepPlan(**fields)


def test_labels_name_only_the_axes_that_vary():
    plan = SweepPlan("s", Axes(latency=(0.0, 0.005), memory=(2 << 20, 16 << 20)), 1)
    assert [plan.label(p) for p in plan.points()] == [
        "latency=0ms memory=2MiB", "latency=0ms memory=16MiB",
        "latency=5ms memory=2MiB", "latency=5ms memory=16MiB"]
    single = SweepPlan("s", Axes(gap_ns=(5_000_000,)), 1)
    assert single.label(single.points()[0]) == "latency=0ms"


def test_a_bare_zero_is_zero_in_every_duration_axis():
    """Issue 10 item 16: "(default 0ms)" and a bare 0 agree. Negative control: a bare 5 is not 5ms."""
    assert parse_durations("--gap", "0") == (0.0,)
    assert parse_durations("--latency", "0,5ms") == (0.0, 0.005)
    with pytest.raises(AxisError, match="'5' has no unit"):
        parse_durations("--latency", "5")


def test_a_jitter_above_a_latency_is_refused_naming_both():
    """Issue 10 item 16: the relay clamps a delay at 0, so such a point would not be what was asked."""
    with pytest.raises(AxisError, match=r"^--jitter 2ms is more than --latency 1ms"):
        Axes(latency=(0.001, 0.005), jitter=(0.0, 0.002))
    assert Axes(latency=(0.002, 0.005), jitter=(0.0, 0.002)).jitter == (0.0, 0.002)   # control


def test_the_live_axes_leave_old_keys_and_stored_axes_as_they_were():
    """A sweep without --mode/--dirty-rate/--working-set keeps the keys and the stored config it
    had before these axes existed (so it resumes); with them, each is in the key and label."""
    old = SweepPlan("s", Axes(latency=(0.0, 0.005)), 1)
    assert [p.key for p in old.points()] == [
        "latency=0ms jitter=0ms bandwidth=unlimited memory=2MiB gap=0ms strategy=best rep=0",
        "latency=5ms jitter=0ms bandwidth=unlimited memory=2MiB gap=0ms strategy=best rep=0"]
    assert set(old.config()["axes"]) == {"latency", "jitter", "bandwidth", "memory", "gap",
                                         "strategy"}
    live = SweepPlan("s", Axes(mode=parse_modes("--mode", "stop-copy,precopy"),
                               dirty_rate=parse_byte_rates("--dirty-rate", "0,50MiB/s"),
                               working_set=parse_byte_sizes("--working-set", "8MiB"),
                               memory=(16 << 20,)), 1)
    points = live.points()
    assert len(points) == live.combination_count == 4
    assert len({p.key for p in points}) == 4
    assert [live.label(p) for p in points] == [
        "mode=stop-copy dirty_rate=0", "mode=stop-copy dirty_rate=50MiB/s",
        "mode=precopy dirty_rate=0", "mode=precopy dirty_rate=50MiB/s"]
    assert points[3].key.endswith("mode=precopy dirty_rate=50MiB/s working_set=8MiB rep=0")
    assert config_mismatch(live.config(), old.config())        # negative control: they differ


@pytest.mark.parametrize("axes, message", [
    ({"dirty_rate": (50 << 20,)}, "--dirty-rate: a dirty rate needs a working_set"),
    ({"working_set": (8 << 20,)}, "--working-set: 0x800000 is not a multiple of 0x1000 in "
                                  "[0, 0x100000]"),               # above a 2 MiB guest's room
])
def test_a_workload_the_guest_cannot_run_is_refused_before_the_sweep(axes, message):
    with pytest.raises(AxisError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Axes(**axes)
    Axes(**{**axes, "memory": (16 << 20,), "working_set": (8 << 20,)})   # control: it fits


def test_bad_live_axis_values_name_the_option():
    with pytest.raises(AxisError, match="--mode: 'live': choose one of stop-copy, precopy"):
        parse_modes("--mode", "live")
    with pytest.raises(AxisError, match="--dirty-rate: cannot parse 'fast'"):
        parse_byte_rates("--dirty-rate", "fast")
    assert parse_byte_rates("--dirty-rate", "0,10,50MiB/s") == (0, 10 << 20, 50 << 20)

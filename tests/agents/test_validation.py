"""What the agents add below them: strict from_plain for the REPORT, check_host, the key file
loader, option parsing and the strategy's wire token -- each with the case it must refuse."""

from __future__ import annotations

import copy

import pytest
from agents_helpers import key_file

import protocol
from kvmcore import (
    DestinationPhases,
    DestinationReport,
    Guest,
    GuestConfig,
    RestoreRecord,
    Snapshot,
    StateError,
    Strategy,
    StrategyError,
    Unsupported,
    capture,
    restore,
)
from source_agent.migrate import PeerReportError, _validate_report
from agentcore.options import (
    UsageError,
    format_duration,
    format_rate,
    format_size,
    parse_bandwidth,
    parse_duration_ns,
    parse_guest_memory,
    parse_host_port,
    parse_rate,
    parse_size,
    parse_timeout,
)


@pytest.fixture
def migrated(kvm, caps):
    """A real before/after/record triple from an in-process migration."""
    with Guest.create(kvm, GuestConfig()) as g:
        before = g.run_until_snapshot()
        state = capture(g)
    plan = Strategy("realtime", "none", "off").check(caps, state)
    with restore(kvm, plan, g.memory) as g2:
        after = g2.run_until_snapshot()
        record = g2.restore_record
    g.memory.close()
    return before, after, record


PHASES = DestinationPhases(validate_ns=1, receive_ns=2, close_ns=3, migrate_realtime_ns=4,
                           commit_realtime_ns=5)


def test_snapshot_record_and_report_round_trip(migrated):
    _, after, record = migrated
    assert Snapshot.from_plain(after.to_plain()) == after
    assert RestoreRecord.from_plain(record.to_plain()) == record
    report = DestinationReport(after, record, PHASES)
    assert DestinationReport.from_plain(report.to_plain()) == report


@pytest.mark.parametrize("path, value, words", [
    (("tsc",), -1, "'snapshot.tsc'"),
    (("sequence",), "1", "expected an integer"),
    (("sequence",), True, "expected an integer"),
    (("pvclock", "tsc_shift"), 200, "'snapshot.pvclock.tsc_shift'"),
    (("pvclock", "flags"), 256, "outside [0, 255]"),
    (("runstate",), [0, 0, 0, 0, 0, 0], "'snapshot.runstate': expected a dict"),
    (("runstate", "time_runnable"), -1, "'snapshot.runstate.time_runnable'"),
    (("extra",), 1, "unexpected field"),
])
def test_snapshot_from_plain_refuses(migrated, path, value, words):
    plain = copy.deepcopy(migrated[1].to_plain())
    target = plain
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(StateError) as info:
        Snapshot.from_plain(plain)
    assert words in str(info.value)


@pytest.mark.parametrize("field, value, words", [
    ("strategy", "clock=sundial", "choose one of"),
    ("strategy", 7, "expected a string"),
    ("restore_ns", -5, "outside"),
    ("clock_after", {}, "missing"),
    ("tsc_offset_applied", "soon", "expected an integer"),
    ("runstate_restored", {"state": 1}, "'restore_record.runstate_restored.state_entry_time'"),
    ("timings", {"create": None}, "'restore_record.timings.create'"),
])
def test_restore_record_from_plain_refuses(migrated, field, value, words):
    plain = migrated[2].to_plain()
    plain[field] = value
    with pytest.raises(StateError) as info:
        RestoreRecord.from_plain(plain)
    assert words in str(info.value)


def test_report_validation_names_the_field(migrated):
    _, after, record = migrated
    good = DestinationReport(after, record, PHASES).to_plain()
    asked = Strategy.parse_exact(record.strategy)
    assert _validate_report(good, asked).after == after               # negative control
    relabelled = {**good, "restore_record": {**good["restore_record"],
                                             "strategy": "clock=plain,tsc=none,runstate=off"}}
    for bad, words in (({**good, "phases": {**good["phases"], "close_ns": -1}},
                        "report.phases.close_ns: -1 outside"),
                       ({**good, "after": {}}, "report.after.sequence: missing"),
                       ({**good, "x": 1}, "report.x: unexpected field"),
                       (relabelled, "but 'clock=realtime"),
                       ({**good, "restore_record": {**good["restore_record"],
                                                    "strategy": "clock=sundial"}},
                        "report.restore_record.strategy")):
        with pytest.raises(PeerReportError) as info:
            _validate_report(bad, asked)
        assert words in str(info.value)


def test_report_says_each_fact_once(migrated, caps):
    """What the REPORT used to repeat is refused now, and each fact has one home: the
    destination's capabilities (its HELLO's), the first entry (the after snapshot's
    bracket), restore()'s duration (the record's) and the capture instant (the source's)."""
    _, after, record = migrated
    good = DestinationReport(after, record, PHASES).to_plain()
    _validate_report(good, Strategy.parse_exact(record.strategy))     # negative control
    for bad, words in (({**good, "capabilities": caps.to_plain()}, "report.capabilities"),
                       ({**good, "phases": {**good["phases"], "restore_ns": 1}},
                        "report.phases.restore_ns: unexpected"),
                       ({**good, "phases": {**good["phases"], "first_entry_ns": 1}},
                        "report.phases.first_entry_ns: unexpected"),
                       ({**good, "restore_record": {**good["restore_record"],
                                                    "source_capture_realtime_ns": 1}},
                        "report.restore_record.source_capture_realtime_ns: unexpected")):
        with pytest.raises(PeerReportError, match=words):
            _validate_report(bad, Strategy.parse_exact(record.strategy))
    assert after.host_run_ns > 0 and after.host_entry_realtime_ns > 0


def test_check_host_refuses_only_what_the_host_lacks(caps):
    Strategy.best(caps).check_host(caps)                            # negative control
    lacking = [(s, what) for s, what in (
        (Strategy(clock="guest", tsc="none"), "KVM_SET_CLOCK_GUEST"),
        (Strategy(tsc="offset"), "KVM_VCPU_TSC_OFFSET"),
        (Strategy(tsc="none", runstate="kernel"), "KVM_CAP_XEN_HVM"),
    ) if s.missing(caps)]
    if not lacking:
        pytest.skip("this host supports every strategy part")
    for strategy, what in lacking:
        with pytest.raises(Unsupported, match=f"unsupported on this host: {what}"):
            strategy.check_host(caps)


def test_load_psk(tmp_path):
    assert protocol.load_psk(key_file(tmp_path / "k", b"  0123456789abcdef  ")) == b"0123456789abcdef"
    for path, words in ((key_file(tmp_path / "a", mode=0o640), "mode 0640"),
                        (key_file(tmp_path / "b", mode=0o604), "mode 0604"),
                        (key_file(tmp_path / "c", b"x" * 15), "15 bytes"),
                        (tmp_path, "not a regular file"),
                        (tmp_path / "nope", "cannot open")):
        with pytest.raises(protocol.KeyFileError, match=words):
            protocol.load_psk(path)


@pytest.mark.parametrize("text, ns", [("10ms", 10_000_000), ("1.5s", 1_500_000_000),
                                      ("250us", 250_000), ("0ns", 0), ("2m", 120_000_000_000),
                                      ("0", 0), ("2h", 7_200_000_000_000), (" 20 MS ", 20_000_000)])
def test_durations(text, ns):
    assert parse_duration_ns(text) == ns


@pytest.mark.parametrize("text, size", [("2MiB", 2 << 20), ("4096", 4096), ("1GiB", 1 << 30),
                                        ("1k", 1000), ("0.5KiB", 512)])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("parse, text", [(parse_duration_ns, "10"), (parse_duration_ns, "-1ms"),
                                         (parse_duration_ns, "1 fortnight"),
                                         (parse_size, "2MiB?"), (parse_size, "0.3B"),
                                         (parse_timeout, "0s"), (parse_timeout, "0"),
                                         (parse_guest_memory, "64GiB"), (parse_guest_memory, "0"),
                                         (parse_rate, "0mbit"), (parse_rate, "100"),
                                         (parse_bandwidth, "0bit"),
                                         (parse_host_port, "host:"), (parse_host_port, "::1")])
def test_bad_values_are_usage_errors(parse, text):
    with pytest.raises(UsageError):
        parse(text)


def test_one_grammar_for_sizes_rates_and_their_spellings():
    """What sweeps store and every option reads: parse(format(x)) == x."""
    assert parse_guest_memory("1GiB") == 1 << 30 and parse_timeout("1ms") == 0.001
    assert parse_rate("100mbit") == 12.5e6 and parse_rate("10mbps") == 10e6   # bps is bytes
    assert parse_bandwidth("unlimited") is None and parse_bandwidth("1gbit") == 125e6
    for size in (2 << 20, 3 << 30, 1536):
        assert parse_size(format_size(size)) == size
    for rate in (12.5e6, 125e6, 1000.0):
        assert parse_rate(format_rate(rate)) == rate
    for secs in (0.0, 0.005, 250e-6, 2.0):
        assert parse_duration_ns(format_duration(secs)) == round(secs * 1e9)


def test_bandwidth_zero_says_what_to_write_instead():
    with pytest.raises(UsageError, match=r"^'0mbit' must be more than 0 \(write 'unlimited'"):
        parse_bandwidth("0mbit")


def test_host_port_forms():
    assert parse_host_port("10.0.0.2:7400") == ("10.0.0.2", 7400)
    assert parse_host_port("[::1]:80") == ("::1", 80)
    assert parse_host_port("example", default_port=7400) == ("example", 7400)


def test_strategy_on_the_wire_is_its_canonical_text_and_nothing_else():
    s = Strategy("plain", "adjust", "off")
    assert Strategy.parse_exact(str(s)) == s
    for text in ("clock=plain,tsc=adjust", "tsc=adjust,clock=plain,runstate=off",
                 "clock=plain,tsc=adjust,runstate=off,", "clock=sundial,tsc=none,runstate=off",
                 "plain.adjust.off"):
        with pytest.raises(StrategyError):
            Strategy.parse_exact(text)


def test_a_strategy_part_given_twice_is_refused():
    with pytest.raises(StrategyError, match="clock= given twice"):
        Strategy.parse("clock=none,clock=guest")
    assert Strategy.parse("clock=none,tsc=none") == Strategy("none", "none", "off")   # control

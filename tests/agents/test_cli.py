"""The commands as a user runs them: console scripts in a subprocess, real KVM, real TCP."""

from __future__ import annotations

import json
import re
import socket

import pytest
from agents_helpers import key_file

from source_agent.results import ResultsStore, iter_csv_rows

REPORT_KEYS = {"report_version", "run_id", "command", "started_at", "topology", "destination",
               "strategy", "memory_size", "gap_requested_ns", "clock_sync", "wall_gap",
               "downtime", "measurements", "verdicts", "hosts", "outcome", "exit_code", "error"}
PHASES = {"capture_ns", "encode_ns", "transfer_ns", "restore_ns", "first_entry_ns", "total_ns"}


def test_loopback_json_report_is_complete_and_passes(cli, tmp_path):
    run = cli("source-agent", "loopback", "--json")
    assert run.code == 0, run.stderr
    report = run.json()
    assert REPORT_KEYS <= report.keys()
    assert report["outcome"] == "passed" and report["error"] is None
    assert report["topology"] == "loopback" and report["destination"].startswith("127.0.0.1:")
    assert PHASES <= report["downtime"].keys()
    assert all(v >= 0 for k, v in report["downtime"].items() if k != "other_ns")
    assert set(report["measurements"]) >= {"kvmclock_jump", "tsc_jump", "kvm_steal_delta",
                                           "xen_runnable_delta"}
    for m in report["measurements"].values():
        assert m["mechanism"] and (m["value_ns"] is not None or m["reason"])
    assert all(v["ok"] in (True, None) for v in report["verdicts"].values())
    assert report["verdicts"]["never_backwards"]["ok"] is True
    assert report["verdicts"]["sequence_continues"]["ok"] is True
    assert report["hosts"]["source"]["tsc_khz"] > 0
    # Recorded under the XDG data directory by default.
    rows = ResultsStore(tmp_path / "xdg" / "kvm-testbed" / "results.sqlite3").runs()
    assert [(r["run_id"], r["outcome"], r["exit_code"]) for r in rows] == [
        (report["run_id"], "passed", 0)]


def test_unmeasurable_runnable_is_shown_and_does_not_fail(cli, caps):
    if caps.xen_runstate:
        pytest.skip("this host has KVM Xen runstate: the verdict is measurable here")
    report = cli("source-agent", "loopback", "--json", "--no-db").json()
    assert report["measurements"]["xen_runnable_delta"] == {
        "value_ns": None, "mechanism": "Xen runstate",
        "reason": "not measurable on this host: no KVM Xen"}
    assert report["verdicts"]["seed_runnable"]["ok"] is None
    assert report["verdicts"]["xen_runnable_in_window"] == {
        "ok": None, "detail": "not measurable on this host: no KVM Xen", "value_ns": None,
        "expected_ns": None, "error_ns": None, "lo_ns": None, "hi_ns": None, "decides": True}
    assert report["exit_code"] == 0


def test_report_shows_every_verdict_in_ms_and_the_raw_pvclock_records(cli):
    """Item 11: the table has every verdict (tsc_follows_gap too) with its bracket in ms and the
    margin; the JSON has the pvclock records the guest read before and after."""
    text = cli("source-agent", "loopback", "--no-db").stdout
    table = text[text.index("verdicts"):text.index("hosts")]
    for name in ("xen_runnable_in_window", "seed_runnable", "kvmclock_follows_gap",
                 "tsc_follows_gap", "never_backwards", "sequence_continues"):
        assert name in table
    assert "not measurable on this host: no KVM Xen" in table
    assert re.search(r"within host bracket \[\d+\.\d{3} ms, \d+\.\d{3} ms\] \+- \d+\.\d{3} ms",
                     table), table
    assert " ns" not in table          # negative control of the old form: "[13777301, ...] ns"
    report = cli("source-agent", "loopback", "--no-db", "--json").json()
    fields = {"version", "tsc_timestamp", "system_time", "tsc_to_system_mul", "tsc_shift",
              "flags"}
    assert set(report["pvclock"]) == {"before", "after"}
    assert set(report["pvclock"]["before"]) == set(report["pvclock"]["after"]) == fields
    # The records are the guest's, not copies: the destination's was written after the source's.
    assert report["pvclock"]["after"]["version"] % 2 == 0
    assert report["pvclock"]["after"]["system_time"] > report["pvclock"]["before"]["system_time"]
    check = report["verdicts"]["kvmclock_follows_gap"]
    assert check["value_ns"] == report["measurements"]["kvmclock_jump"]["value_ns"]
    assert check["expected_ns"] == report["measurements"]["host_interval"]["value_ns"]
    assert check["lo_ns"] <= check["value_ns"] <= check["hi_ns"]


@pytest.mark.parametrize("gap_ms", [10, 50])
def test_gap_appears_in_wall_gap_and_kvmclock_jump(cli, gap_ms):
    run = cli("source-agent", "loopback", "--json", "--no-db", "--gap", f"{gap_ms}ms")
    assert run.code == 0, run.stderr
    r = run.json()
    gap = gap_ms * 1_000_000
    assert r["gap_requested_ns"] == gap
    assert r["downtime"]["gap_ns"] >= gap
    assert r["wall_gap"]["value_ns"] >= gap - r["wall_gap"]["uncertainty_ns"]
    # Within the stated bound: the guest's kvmclock jump lies in the host bracket.
    lo, _ = r["bound"]["host_bracket_ns"]
    assert lo >= gap - r["wall_gap"]["uncertainty_ns"]
    assert r["verdicts"]["kvmclock_follows_gap"]["ok"] is True
    assert r["measurements"]["kvmclock_jump"]["value_ns"] >= gap - r["clock_sync"]["uncertainty_ns"]


def test_clock_none_fails_never_backwards_with_exit_1(cli):
    # In the seed's order the destination VM is created at MIGRATE, its own kvmclock near 0:
    # backwards by the source's kvmclock then, about its warm-up -- long enough that a loaded
    # host's restore and first entry (the destination's kvmclock) cannot make up for it.
    run = cli("source-agent", "loopback", "--json", "--clock", "none", "--warmup", "300ms",
              "--destroy-first")
    assert run.code == 1
    r = run.json()
    assert r["verdicts"]["never_backwards"]["ok"] is False
    assert r["outcome"] == "failed" and "never_backwards" in r["error"]
    # Prepared at PREPARE, before the source guest existed, the VM's kvmclock is ahead of the
    # source's instead: forwards, by the wrong amount -- still a failed run.
    r = cli("source-agent", "loopback", "--json", "--clock", "none", "--no-db").json()
    assert r["exit_code"] == 1 and r["verdicts"]["kvmclock_follows_gap"]["ok"] is False


def test_clock_plain_fails_kvmclock_follows_the_gap(cli):
    run = cli("source-agent", "loopback", "--json", "--no-db", "--clock", "plain", "--gap", "10ms")
    assert run.code == 1
    r = run.json()
    assert r["verdicts"]["kvmclock_follows_gap"]["ok"] is False
    assert r["verdicts"]["never_backwards"]["ok"] is True   # only the gap is hidden


def test_human_report_has_the_tables_and_only_the_report_on_stdout(cli):
    run = cli("source-agent", "loopback", "--no-db")
    assert run.code == 0, run.stderr
    for title in ("downtime by phase", "what the guest saw", "verdicts", "hosts",
                  "kvmclock_follows_gap", "wall gap"):
        assert title in run.stdout
    assert "dest_agent" not in run.stdout


def test_connection_refused_exits_3_and_is_recorded_with_its_error(cli, tmp_path):
    with socket.socket() as s:                  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    db = tmp_path / "runs.db"
    run = cli("source-agent", "migrate", "--to", f"127.0.0.1:{port}", "--db", str(db), "--json")
    assert run.code == 3, run.stderr
    assert "error" in run.stderr and f"127.0.0.1:{port}" in run.stderr
    [row] = ResultsStore(db).runs()
    assert row["outcome"] == "error" and row["exit_code"] == 3
    assert "refused" in row["error"].lower() or "connect" in row["error"].lower()
    assert run.json()["error"] == row["error"]
    # Listed and exported.
    listing = cli("source-agent", "results", "list", "--db", str(db))
    assert listing.code == 0 and row["run_id"] in listing.stdout
    csv_rows = list(iter_csv_rows(cli("source-agent", "results", "export", "--db", str(db),
                                      "--format", "csv").stdout))
    assert [r["outcome"] for r in csv_rows] == ["error"]
    exported = json.loads(cli("source-agent", "results", "export", "--db", str(db)).stdout)
    assert exported[0]["run_id"] == row["run_id"]


@pytest.mark.parametrize("args, message", [
    (["loopback", "--gap", "10"], "argument --gap: '10' has no unit (expected e.g. '5ms')"),
    (["loopback", "--gap", "soon"], "argument --gap: cannot parse 'soon'"),
    (["loopback", "--memory", "3MiB"], "argument --memory: '3MiB' must be a multiple of 2MiB "
                                       "between 2MiB and 1GiB"),
    (["loopback", "--memory", "2 parsecs"], "unknown unit 'parsecs' in '2 parsecs'"),
    (["loopback", "--handshake-timeout", "0s"], "argument --handshake-timeout: '0s' must be longer "
                                                "than 0"),
    (["loopback", "--clock", "sundial"], "invalid choice: 'sundial'"),
    (["migrate"], "--to"),
    (["migrate", "--to", "127.0.0.1:http"], "expected HOST:PORT"),
    (["migrate", "--to", "127.0.0.1:99999"], "PORT in 0..65535"),
    (["loopback", "--mode", "live"], "invalid choice: 'live'"),
    (["loopback", "--mode", "precopy", "--destroy-first"],
     "--destroy-first is the seed's stop-copy order (the source VM destroyed before the "
     "transfer): it cannot be combined with --mode precopy"),
    (["loopback", "--max-rounds", "3"], "--max-rounds applies to --mode precopy only"),
    (["loopback", "--downtime-limit", "5ms"], "--downtime-limit applies to --mode precopy only"),
    (["loopback", "--mode", "precopy", "--max-rounds", "0"], "--max-rounds 0: must be between 1"),
    (["loopback", "--mode", "precopy", "--downtime-limit", "0"],
     "--downtime-limit 0ms: must be longer than 0"),
    (["loopback", "--dirty-rate", "fast"], "argument --dirty-rate: cannot parse 'fast'"),
    (["loopback", "--dirty-rate", "50MiB/s"], "--dirty-rate: a dirty rate needs a working_set"),
    (["loopback", "--dirty-rate", "1MiB/s", "--working-set", "3000"], "--working-set: 0xbb8 is "
                                                                       "not a multiple of 0x1000"),
])
def test_bad_command_line_exits_2_with_a_clear_message(cli, args, message):
    run = cli("source-agent", *args, "--no-db")
    assert run.code == 2
    assert message in run.stderr
    assert run.stdout == ""


def test_destroy_first_keeps_the_seeds_order_and_the_default_destroys_after_the_report(cli):
    """--destroy-first: the source VM's destruction is a downtime phase, as in the seed; by
    default it comes after the REPORT, outside the downtime (the migration statistics)."""
    seed = cli("source-agent", "loopback", "--destroy-first", "--json", "--no-db").json()
    assert seed["outcome"] == "passed", seed["error"]
    assert seed["migration"]["destroy_first"] is True
    assert seed["downtime"]["destroy_ns"] == seed["migration"]["source_destroy_ns"] > 0
    live = cli("source-agent", "loopback", "--json", "--no-db").json()
    assert live["outcome"] == "passed", live["error"]
    assert "destroy_ns" not in live["downtime"] and live["migration"]["source_destroy_ns"] > 0
    for report in (seed, live):
        m = report["migration"]
        assert m["mode"] == "stop-copy" and m["rounds"] == [] and m["converged"] is None
        assert m["downtime_ns"] == report["downtime"]["total_ns"] > 0
        assert m["final"]["bytes"] == report["memory_size"] and m["bandwidth"] > 0
        assert 0 < m["setup_ns"] < m["total_ns"]


def test_precopy_from_the_command_line_reports_its_rounds_everywhere(cli, tmp_path):
    """The statistics in the JSON, the tables and the results store, from one document."""
    db = tmp_path / "r.db"
    argv = ("source-agent", "loopback", "--mode", "precopy", "--memory", "16MiB",
            "--dirty-rate", "20MiB/s", "--working-set", "4MiB", "--db", str(db))
    report = cli(*argv, "--json").json()
    assert report["outcome"] == "passed", report["error"]
    m = report["migration"]
    assert m["mode"] == "precopy" and m["rounds"][0]["bytes"] == 16 << 20
    assert m["downtime_limit_ns"] == 30_000_000 and m["max_rounds"] == 10
    assert m["converged"] is (len(m["rounds"]) < 10) and m["destination_prepare_ns"] > 0
    assert "dirty_log_ns" in report["downtime"] and "destroy_ns" not in report["downtime"]
    assert report["verdicts"]["memory_intact"]["ok"] is True
    [row] = ResultsStore(db).runs()
    assert (row["mode"], row["rounds"], row["converged"]) == (
        "precopy", len(m["rounds"]), int(m["converged"]))
    text = cli(*argv).stdout
    assert "migration: precopy" in text and "memory sent" in text and "after the stop" in text
    assert re.search(r"rounds +│ +\d+ of at most 10", text), text


def test_strategy_this_host_cannot_do_exits_2_before_connecting(cli, caps):
    if caps.tsc_offset_applies:
        pytest.skip("this host applies TSC offsets: tsc=offset is supported")
    # Negative control for "before connecting": the destination is unreachable, yet 2, not 3.
    run = cli("source-agent", "migrate", "--to", "127.0.0.1:1", "--tsc", "offset", "--json")
    assert run.code == 2
    assert "unsupported on this host: KVM_VCPU_TSC_OFFSET" in run.stderr
    assert run.json()["outcome"] == "error"


def test_key_file_checks(cli, tmp_path):
    loose = key_file(tmp_path / "loose", mode=0o644)
    short = key_file(tmp_path / "short", b"0123456789")
    good = key_file(tmp_path / "good")
    for tool, args in (("source-agent", ["migrate", "--to", "127.0.0.1:1", "--no-db"]),
                       ("dest-agent", ["serve", "--listen", "127.0.0.1:0"])):
        run = cli(tool, *args, "--psk-file", str(loose))
        assert run.code == 2 and "mode 0644" in run.stderr and "chmod 600" in run.stderr
        run = cli(tool, *args, "--psk-file", str(short))
        assert run.code == 2 and "key is 10 bytes, at least 16" in run.stderr
        run = cli(tool, *args, "--psk-file", str(tmp_path / "missing"))
        assert run.code == 2 and "cannot open" in run.stderr
    # Negative control: the good key passes the checks, the run then fails on the network.
    run = cli("source-agent", "migrate", "--to", "127.0.0.1:1", "--no-db", "--psk-file", str(good))
    assert run.code == 3


def test_dest_agent_refuses_a_non_loopback_address_without_a_key(cli):
    run = cli("dest-agent", "serve", "--listen", "0.0.0.0:7400")
    assert run.code == 2
    assert "not a loopback address" in run.stderr and "--psk-file" in run.stderr
    run = cli("dest-agent", "serve", "--listen", "127.0.0.1:0", "--max-memory", "3MiB")
    assert run.code == 2 and "multiple of 2MiB" in run.stderr


@pytest.mark.parametrize("option, value, message", [
    ("--max-memory", "64GiB", "'64GiB' must be a multiple of 2MiB between 2MiB and 1GiB"),
    ("--handshake-timeout", "0s", "'0s' must be longer than 0"),
    ("--idle-timeout", "0", "'0' must be longer than 0"),
])
def test_dest_agent_refuses_values_no_session_could_use(cli, option, value, message):
    """Issue 10 item 16: guests are capped at 1 GiB; a 0 timeout would fail every session."""
    run = cli("dest-agent", "serve", "--listen", "127.0.0.1:0", option, value)
    assert run.code == 2 and f"argument {option}: {message}" in run.stderr, run.stderr


def test_errors_quote_the_value_as_typed_and_a_bare_zero_is_zero(cli):
    """Issue 10 item 16. Negative control for the zero: a bare 10 still needs its unit."""
    run = cli("source-agent", "loopback", "--no-db", "--memory", "3MiB")
    assert run.code == 2 and "'3MiB'" in run.stderr and "3145728" not in run.stderr
    run = cli("source-agent", "loopback", "--no-db", "--json", "--gap", "0", "--warmup", "0")
    assert run.code == 0, run.stderr
    assert run.json()["gap_requested_ns"] == 0


@pytest.mark.parametrize("tool, command", [("source-agent", "migrate"),
                                           ("source-agent", "loopback"),
                                           ("source-agent", "results"),
                                           ("dest-agent", "serve")])
def test_help_explains_options_with_an_example(cli, tool, command):
    run = cli(tool, command, "--help")
    assert run.code == 0
    assert "examples:" in run.stdout and "exit codes" in run.stdout or command == "results"
    assert "examples:" in run.stdout


def test_dest_agent_on_a_port_in_use_exits_2_with_a_message(cli):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        run = cli("dest-agent", "serve", "--listen", f"127.0.0.1:{port}", timeout=30)
    assert run.code == 2, run
    assert "cannot serve" in run.stderr and "Address already in use" in run.stderr
    assert "Traceback" not in run.stderr

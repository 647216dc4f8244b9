"""Unit tests of tools/xen_pair's pure parts and the report's clock_reference key (no boot)."""
from __future__ import annotations

import json

import pytest

from agentcore.options import UsageError
from source_agent.report import CLOCK_REFERENCE_ENV, clock_reference
from xen_pair import machine, timeref
from xen_pair.scenario import Scenario, parse_script, signed_duration_ns


def test_the_probe_with_the_smallest_round_trip_is_kept() -> None:
    # Guest 1000 ns ahead; the slow probe (rtt 5000) would say 3000 ahead, the fast one (rtt 200) 1000.
    probes = [(0, 5500, 5000), (10_000, 11_100, 10_200)]
    ref = timeref.best_probe(probes)
    assert (ref.offset_ns, ref.uncertainty_ns, ref.probes) == (1000, 100, 2)


def test_a_probe_only_bounds_the_offset_by_half_its_round_trip() -> None:
    """Negative control: with the slow probe alone the bound widens, it does not shrink."""
    ref = timeref.best_probe([(0, 5500, 5000)])
    assert (ref.offset_ns, ref.uncertainty_ns) == (3000, 2500)
    assert abs(1000 - ref.offset_ns) <= ref.uncertainty_ns  # the truth is still inside


def test_a_host_clock_stepping_back_in_a_probe_is_refused() -> None:
    with pytest.raises(ValueError, match="backwards"):
        timeref.best_probe([(100, 150, 50)])


def test_difference_of_two_references_adds_their_uncertainties() -> None:
    dst, src = timeref.Reference(250_100, 300, 10), timeref.Reference(100, 200, 12)
    assert dst.minus(src) == timeref.Reference(250_000, 500, 10)


def test_measure_keeps_probing_for_the_duration() -> None:
    clock = iter(range(0, 10**9 * 3, 10**8))  # 100 ms a read: ~1 s is 3 reads a probe
    ref = timeref.measure(lambda: 7, lambda: next(clock), duration_s=1.0)
    assert 2 <= ref.probes <= 4


@pytest.mark.parametrize("text, ns", [("+250ms", 250_000_000), ("-250ms", -250_000_000),
                                      ("5s", 5_000_000_000), ("0", 0)])
def test_skew_is_signed(text: str, ns: int) -> None:
    assert signed_duration_ns(text) == ns


def test_a_skew_without_a_unit_is_refused() -> None:
    with pytest.raises(UsageError, match="no unit"):
        signed_duration_ns("-250")


def test_script_lines_are_scenarios() -> None:
    text = "# three\n\n-- --json\n--skew -250ms --latency 5ms --jitter 1ms -- --clock realtime\n" \
           "--rate 100mbit\n"
    a, b, c = parse_script(text)
    assert a == Scenario(migrate_args=("--json",))
    assert (b.skew_ns, b.netem(), b.migrate_args) == (
        -250_000_000, ["delay", "5000us", "1000us"], ("--clock", "realtime"))
    assert c.netem() == ["rate", "100000000bit"] and c.migrate_args == ()
    assert a.netem() == []


@pytest.mark.parametrize("text, message", [
    ("-- --json\n--skew soon\n", "s.txt:2: cannot parse 'soon'"),
    ("--bogus 1\n", "s.txt:1: unrecognized arguments: --bogus 1"),
    ("# nothing\n", "s.txt: no scenarios"),
])
def test_a_bad_script_line_is_named(text: str, message: str) -> None:
    with pytest.raises(UsageError) as e:
        parse_script(text, "s.txt")
    assert message in str(e.value)


def test_src_listens_and_dst_connects_on_loopback() -> None:
    src, dst = machine.link_args(0, 4321), machine.link_args(1, 4321)
    assert "socket,id=link,listen=127.0.0.1:4321" in src
    assert "socket,id=link,connect=127.0.0.1:4321" in dst
    assert src[-1] != dst[-1]  # different MACs on one link


def test_report_carries_the_clock_reference_only_when_the_pair_gives_one() -> None:
    reference = {"destination_minus_source": {"offset_ns": 250_000_000, "uncertainty_ns": 400}}
    assert clock_reference({CLOCK_REFERENCE_ENV: json.dumps(reference)}) == {
        "clock_reference": reference}
    assert clock_reference({}) == {}  # negative control: no pair, no key


def test_a_malformed_clock_reference_is_reported_not_raised() -> None:
    got = clock_reference({CLOCK_REFERENCE_ENV: "[1, 2"})
    assert "not a JSON object" in got["clock_reference"]["error"]


def test_a_negative_skew_needs_no_equals_sign() -> None:
    from xen_pair.scenario import split_dashdash
    assert split_dashdash(["--skew", "-250ms", "--", "--skew", "-1"]) == (
        ["--skew=-250ms"], ["--skew", "-1"])  # the migrate arguments are left alone


def test_the_link_port_is_seen_listening_only_in_listen_state() -> None:
    from xen_pair.run import listening
    table = ("  sl  local_address rem_address   st\n"
             "   0: 0100007F:10E1 00000000:0000 0A 00000000:00000000\n"
             "   1: 0100007F:1F90 0100007F:9C40 01 00000000:00000000\n")
    assert listening(0x10E1, table)
    assert not listening(0x1F90, table)  # control: established, not listening
    assert not listening(4322, table)


def test_bad_usage_exits_2_before_anything_boots(tmp_path, capsys) -> None:
    from xen_pair import cli
    with pytest.raises(SystemExit) as e:
        cli.main(["--skew", "soon", "--"])
    assert e.value.code == 2 and "cannot parse 'soon'" in capsys.readouterr().err
    script = tmp_path / "s.txt"
    script.write_text("--latency 5 -- --json\n")
    assert cli.main(["--script", str(script), "--results", str(tmp_path / "r")]) == 2
    assert f"{script}:1: '5' has no unit" in capsys.readouterr().err
    assert cli.main(["--script", str(tmp_path / "missing.txt")]) == 2
    assert "No such file" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing was booted or written


# The retry on a kernel oops (tools/xen_pair/run.py retry_after), on real sockets and files:
# a machine whose kernel died mid-scenario surfaces as a broken control socket, and only its
# console tells an oops (worth one more boot) from a plain failure.

def broken_pipe() -> BrokenPipeError:
    """The error a write to a dead machine's control socket raises (a real one)."""
    import socket
    ours, theirs = socket.socketpair()
    theirs.close()
    try:
        for _ in range(64):
            ours.sendall(b'{"op": "time"}\n' * 4096)
    except BrokenPipeError as e:
        return e
    finally:
        ours.close()
    raise AssertionError("writing to a closed socket did not break the pipe")


def machines_with_consoles(tmp_path, dst_console: str):
    from xen_pair.machine import Machine
    ms = [Machine(n, i, tmp_path / n) for i, n in enumerate(("src", "dst"))]
    for m, text in zip(ms, ("[    1.0] Linux version 6.12\n", dst_console)):
        m.results.mkdir()
        (m.results / "console.log").write_text(text)
    return ms


OOPS_LINE = ("[   62.102938] int3: 0000 [#1] PREEMPT SMP NOPTI\n"
             "[   62.103001] RIP: 0010:__schedule+0x2f1/0x1530\n")


def test_an_oops_behind_a_broken_control_socket_is_retried(tmp_path) -> None:
    from xen_pair.run import retry_after
    machines = machines_with_consoles(tmp_path, "[    1.0] boot\n" + OOPS_LINE)
    facts: dict = {}
    assert retry_after(1, machines, broken_pipe(), facts) is True
    assert facts["oops_1"].startswith("[   62.102938] int3: 0000")
    assert facts["error_1"].startswith("BrokenPipeError")
    assert "int3: 0000" in (tmp_path / "dst" / "console-oops-1.log").read_text()


def test_a_broken_control_socket_without_an_oops_is_the_error(tmp_path) -> None:
    """Negative control: the same broken pipe with clean consoles is raised, not retried."""
    from xen_pair.run import retry_after
    machines = machines_with_consoles(tmp_path, "[    1.0] boot\n[   62.0] all well\n")
    with pytest.raises(BrokenPipeError):
        retry_after(1, machines, broken_pipe(), {})
    assert retry_after(1, machines, None, {}) is False  # a clean attempt: done


def test_an_oops_on_the_second_boot_fails_the_pair(tmp_path) -> None:
    from xen_pair.machine import PairError
    from xen_pair.run import retry_after
    machines = machines_with_consoles(tmp_path, OOPS_LINE)
    with pytest.raises(PairError, match="kernel oops/panic twice: .*int3"):
        retry_after(2, machines, broken_pipe(), {})


def test_the_injected_oops_line_is_an_oops() -> None:
    import xen_lane
    from xen_pair.run import INJECTED_OOPS
    assert xen_lane.find_oops(f"[   62.0] {INJECTED_OOPS}\n")
    assert xen_lane.find_oops("[   62.0] testbed --inject-oops\n") is None  # control


def test_tsc_reference_reads_this_machines_tsc() -> None:
    """The TSC reference's host side: the guest agent's rdtsc, counting at the TSC rate."""
    from xen_pair.machine import HOST_RDTSC, host_tsc_khz
    a, b = HOST_RDTSC(), HOST_RDTSC()
    assert 0 < a <= b
    khz = host_tsc_khz(0.05)
    assert 100_000 < khz < 10_000_000, khz  # 0.1-10 GHz


def test_sweep_skews_are_signed_distinct_durations() -> None:
    from xen_pair.scenario import split_dashdash
    from xen_pair.skew_sweep import parse_skews, sweep_name
    assert parse_skews("-250ms, 0,+250ms") == [-250_000_000, 0, 250_000_000]
    assert [sweep_name(ms * 1_000_000) for ms in (-250, 0, 250)] == [
        "pair-skew-m250ms", "pair-skew-0ms", "pair-skew-p250ms"]
    for bad, why in (("5", "no unit"), ("0,0", "distinct"), ("", "distinct")):
        with pytest.raises(UsageError, match=why):
            parse_skews(bad)
    assert split_dashdash(["--sweep-skew", "-250ms,0", "--"]) == (["--sweep-skew=-250ms,0"], [])


def test_the_skew_figure_is_a_real_png(tmp_path) -> None:
    """The drawing (not the figures: those come from a run, docs/pair.md): two strategies
    against three skews give a checked, non-blank PNG and an SVG."""
    from xen_pair.skew_sweep import plot
    rows = [{"skew_reference_ns": ms * 1_000_000, "strategy": strategy, "failed": int(bad),
             "error_median_ns": err, "error_p5_ns": err - 500_000, "error_p95_ns": err + 500_000}
            for ms in (-250, 0, 250)
            for strategy, err, bad in (("clock=realtime,runstate=off", ms * 1_000_000, ms != 0),
                                       ("clock=realtime-synced,runstate=off", 300_000, False))]
    png, svg = plot(rows, tmp_path / "fig")
    assert png.stat().st_size > 1000 and svg.read_text().startswith("<?xml")


def test_a_sweep_without_json_is_named() -> None:
    from xen_pair.run import Outcome
    from xen_pair.skew_sweep import points
    o = Outcome(Scenario(skew_ns=250_000_000), 2, "", "source-agent: error: no /dev/kvm\n",
                {"destination_minus_source": {"offset_ns": 0}}, {}, 1.0)
    with pytest.raises(ValueError, match=r"skew \+250 ms printed no JSON \(exit 2\).*kvm"):
        points([o])


def test_the_table_shows_each_scenario_from_its_report() -> None:
    """The README's table from scenarios.json: figures from the report and the reference; a
    refused scenario with its error (the strategy's '|' escaped for markdown)."""
    from xen_pair.table import markdown
    verdict = {"ok": True, "decides": True, "value_ns": None}
    report = {"strategy": "clock=realtime,tsc=none,runstate=off", "outcome": "passed",
              "clock_sync": {"offset_ns": 249_500_000, "uncertainty_ns": 3_000_000},
              "verdicts": {"kvmclock_follows_gap": {**verdict, "ok": False, "error_ns": 248_000_000},
                           "xen_runnable_in_window": verdict}}
    ran = {"scenario": {"skew_ns": 250_000_000, "migrate_args": ["--json"]}, "status": 1,
           "stdout": json.dumps(report), "stderr": "",
           "reference_before": {"destination_minus_source": {"offset_ns": 249_800_000,
                                                             "uncertainty_ns": 400_000}}}
    refused = {"scenario": {"skew_ns": 0, "migrate_args": ["--runstate", "kernel"]}, "status": 3,
               "stdout": json.dumps({"outcome": "error", "error": "unsupported on the "
                                     "destination host: KVM_CAP_XEN_HVM SHARED_INFO|RUNSTATE"}),
               "stderr": "", "direction": "lane-to-host", "reference_before": {}}
    lines = markdown([ran, refused]).splitlines()
    assert lines[2] == ("| +250 ms | clock=realtime, tsc=none, runstate=off | +249.800 ms ± "
                        "0.400 ms | +249.500 ms ± 3.000 ms | -0.300 ms | +248.000 ms | "
                        "n/a (runstate off) | **fail**: kvmclock_follows_gap |")
    assert lines[3].startswith("| +0 ms | lane-to-host: `--runstate kernel` |")
    assert "SHARED_INFO\\|RUNSTATE" in lines[3] and lines[3].count(" | ") == 7


def test_the_agent_can_hold_an_empty_vm() -> None:
    """guest_agent.hold_a_vm on this machine's real /dev/kvm: a VM descriptor (KVM answers
    KVM_CHECK_EXTENSION on it: KVM_CAP_USER_MEMORY = 3 is always there)."""
    import fcntl
    import os
    from xen_pair.guest_agent import hold_a_vm
    if not os.path.exists("/dev/kvm"):
        pytest.skip("unsupported on this host: /dev/kvm")
    vm = hold_a_vm()
    assert vm is not None and vm >= 0
    try:
        assert fcntl.ioctl(vm, 0xAE03, 3) == 1  # KVM_CHECK_EXTENSION(KVM_CAP_USER_MEMORY)
    finally:
        os.close(vm)

"""The heterogeneous pair (issue 12 item 4): this machine's own kernel and one lane machine,
both directions on one boot (tools/xen_pair/hetero.py, `./dev pair --hetero`).

Here this machine is PVM: no Xen, and a TSC offset that is accepted but not applied (the guest
reads the host TSC); the lane machine has KVM Xen and applies the offset. So the best strategy
both support is clock=realtime,tsc=none,runstate=off; each host's own best is refused by the
other, by the agents, before any VM exists, naming the side and the capability. The hosts'
TSCs differ by this machine's whole TSC (hours), and with tsc=none a guest that crosses between
a host that applies the offset and one that does not sees exactly that difference.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from xen_pair.hetero import DIRECTIONS, run_hetero
from xen_pair.run import Outcome, PairOptions
from xen_pair.scenario import Scenario

REPO = Path(__file__).resolve().parents[2]
SCENARIOS = {"negotiated": ("--json", "--gap", "20ms"),
             "tsc offset": ("--json", "--tsc", "offset"),
             "runstate kernel": ("--json", "--runstate", "kernel")}
#: dst 250 ms ahead of src: set on the lane machine, whichever side it is.
SKEWED = {"synced +250ms": ("--json", "--gap", "20ms", "--clock", "realtime-synced")}
SKEW_NS = 250_000_000

pytestmark = pytest.mark.pair


@pytest.fixture(scope="module")
def hetero() -> tuple[dict[tuple[str, str], Outcome], dict]:
    options = PairOptions(python=sys.executable, results=REPO / "results" / "pair-hetero",
                          timeout=900)
    scenarios = [Scenario(migrate_args=a) for a in SCENARIOS.values()] + \
        [Scenario(skew_ns=SKEW_NS, migrate_args=a) for a in SKEWED.values()]
    outcomes, facts = run_hetero(options, scenarios)
    print(f"hetero: {facts}")
    keys = [(d, name) for d in DIRECTIONS for name in (*SCENARIOS, *SKEWED)]
    return dict(zip(keys, outcomes, strict=True)), facts


@pytest.fixture(scope="module")
def host_caps():
    from kvmcore import System, probe
    with System() as kvm:
        return probe(kvm)


def test_the_best_strategy_both_support_is_chosen_and_named(hetero, host_caps):
    runs, facts = hetero
    if host_caps.xen_runstate or host_caps.tsc_offset_applies:
        pytest.skip("this machine is not the PVM host the heterogeneous pair is about "
                    "(it has Xen or applies the TSC offset)")
    for direction in DIRECTIONS:
        o = runs[direction, "negotiated"]
        r = o.report()
        assert r is not None, o.stderr[-800:]
        print(f"{direction}: {o.negotiated}; report strategy {r['strategy']}, exit {o.status}, "
              f"kvmclock {r['verdicts']['kvmclock_follows_gap']['detail']}")
        assert o.negotiated["common"] == "clock=realtime,tsc=none,runstate=off"
        assert r["strategy"] == o.negotiated["common"]
        lane_best = (o.negotiated["destination_best"] if direction == "host-to-lane"
                     else o.negotiated["source_best"])
        assert lane_best == "clock=realtime,tsc=offset,runstate=kernel"  # control: more there
        assert o.status == 0, r["verdicts"]
        assert r["verdicts"]["kvmclock_follows_gap"]["ok"] is True


@pytest.mark.parametrize("scenario, capability", [("tsc offset", "KVM_VCPU_TSC_OFFSET applied"),
                                                  ("runstate kernel", "KVM_CAP_XEN_HVM")])
def test_a_strategy_one_side_lacks_is_refused_before_any_vm(hetero, host_caps, scenario,
                                                            capability):
    """This machine lacks both. As the source it refuses at once (exit 2, "unsupported on
    this host", before it connects: the lane's dest-agent sees no session for it); as the
    destination, the source refuses from its HELLO (exit 3, "unsupported on the destination
    host", before creating its guest: this machine's dest-agent ends the session after 0
    migrations). The negotiated scenario is the control: it passes both ways."""
    if host_caps.xen_runstate or host_caps.tsc_offset_applies:
        pytest.skip("this machine has the capability the refusal is about")
    runs, _ = hetero
    source_side = runs["host-to-lane", scenario]
    dest_side = runs["lane-to-host", scenario]
    print(f"host-to-lane {scenario}: exit {source_side.status}: {source_side.stderr.strip()}")
    print(f"lane-to-host {scenario}: exit {dest_side.status}: {dest_side.stderr.strip()}")
    assert source_side.status == 2
    assert f"unsupported on this host: {capability}" in source_side.stderr
    assert dest_side.status == 3
    assert f"unsupported on the destination host: {capability}" in dest_side.stderr
    for o in (source_side, dest_side):
        assert o.report()["outcome"] == "error" and o.report()["strategy"] is None
    log = (REPO / "results" / "pair-hetero" / "host" / "dest-agent.log").read_text()
    assert "0 migration(s)" in log
    assert runs["lane-to-host", "negotiated"].status == 0  # control


def test_tsc_none_between_the_hosts_shows_their_tsc_difference(hetero):
    """Where one host applies the TSC offset (a new vCPU's TSC starts near 0) and the other
    does not (the guest reads the host TSC), tsc=none hands the guest the hosts' TSC
    difference: the jump is the report's hosts_tsc within the lane machine's own TSC (its
    uptime, at most the run's length). hosts_tsc agrees with the TSC reference in ticks."""
    runs, facts = hetero
    for direction in DIRECTIONS:
        o = runs[direction, "negotiated"]
        r = o.report()
        khz = r["hosts"]["source"]["tsc_khz"]
        jump = r["measurements"]["tsc_jump"]["value_ns"]
        hosts = r["hosts_tsc"]["value_ns"]
        tsc_ref = o.reference_before["tsc"]["destination_minus_source"]
        ref_ticks, ref_u = tsc_ref["offset_ticks"], tsc_ref["uncertainty_ticks"]
        report_ticks = hosts * khz / 1e6
        bound_ticks = (r["hosts_tsc"]["uncertainty_ns"] + 1e6) * khz / 1e6 + ref_u
        print(f"{direction}: hosts' TSCs differ by {hosts / 1e9:+.3f} s (report), reference "
              f"{ref_ticks / khz / 1e3:+.3f} s; tsc=none jump {jump / 1e9:+.3f} s")
        assert abs(report_ticks - ref_ticks) <= bound_ticks
        assert abs(hosts) > 10 * facts["total_s"] * 1e9       # this machine's TSC: hours
        assert abs(jump - hosts) <= (facts["total_s"] + 1) * 1e9
        assert "not carried" in r["measurements"]["tsc_jump"]["mechanism"]


def test_a_skew_between_the_hosts_is_set_on_the_lane_and_synced_away(hetero):
    """dst 250 ms ahead: the lane machine's clock is stepped (+250 ms as the destination,
    -250 ms as the source; this machine's is the reference), the agents' estimate agrees with
    the reference, and clock=realtime-synced (the rest negotiated) keeps it out of the kvmclock.
    The skew-0 negotiated runs are the control for the estimate (near 0 there)."""
    runs, _ = hetero
    for direction in DIRECTIONS:
        o = runs[direction, "synced +250ms"]
        r = o.report()
        assert r is not None, o.stderr[-800:]
        ref = o.reference_before["destination_minus_source"]
        sync = r["clock_sync"]
        check = r["verdicts"]["kvmclock_follows_gap"]
        lane = o.reference_before["destination" if direction == "host-to-lane" else "source"]
        print(f"{direction} +250 ms: lane clock {lane['offset_ns'] / 1e6:+.3f} ms from the host's;"
              f" estimate {sync['offset_ns'] / 1e6:+.3f} +- {sync['uncertainty_ns'] / 1e6:.3f} "
              f"ms, reference {ref['offset_ns'] / 1e6:+.3f} ms; {r['strategy']}: {check['detail']}")
        assert abs(ref["offset_ns"] - SKEW_NS) < 5e6
        assert abs(sync["offset_ns"] - ref["offset_ns"]) <= sync["uncertainty_ns"] + \
            ref["uncertainty_ns"]
        assert r["strategy"] == "clock=realtime-synced,tsc=none,runstate=off"
        assert o.status == 0 and check["ok"] is True, check["detail"]
        control = runs[direction, "negotiated"].report()["clock_sync"]
        assert abs(control["offset_ns"]) < 5e6

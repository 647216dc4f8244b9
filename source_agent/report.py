"""The report: one stable, JSON-ready dict per run, and its human rendering.

Keys are stable (docs/agents.md lists them): tools and the results store read
them. Every figure carries its mechanism; a figure this pair of hosts cannot
produce is null with the reason, and a verdict that depends on it is null
("not measurable"), which does not fail the run.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from kvmcore import Measurement
from kvmcore.analysis import CHECK_NAMES, HOST_BRACKET_RULE

from .migrate import Migration
from .results import timestamp

#: 3: ``migration`` (the statistics, source_agent.stats); ``downtime`` from the source stop
#: (``stop_ns`` first), ``destroy_ns`` in it only with --destroy-first; outcome "rolled back".
#: 2: ``restore_record`` without the first entry and the capture instant, which it repeated
#: (the downtime and the ``after`` snapshot's bracket have them), and without the source's
#: TSC kHz; ``destination_phases`` without restore_ns and first_entry_ns (in ``downtime``).
REPORT_VERSION = 3


#: Set by the pair (tools/xen_pair): the hosts' clocks measured against a third clock over a path
#: apart from the agents' link, as JSON. Copied into the report as ``clock_reference``.
CLOCK_REFERENCE_ENV = "KVM_TESTBED_CLOCK_REFERENCE"


def clock_reference(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """``{"clock_reference": ...}`` when the run has an outside time reference, else ``{}``
    (the key is optional: only the pair can measure the hosts' clocks independently)."""
    text = environ.get(CLOCK_REFERENCE_ENV)
    if not text:
        return {}
    try:
        reference = json.loads(text)
    except ValueError:
        reference = None
    if not isinstance(reference, dict):
        return {"clock_reference": {"error": f"{CLOCK_REFERENCE_ENV} is not a JSON object"}}
    return {"clock_reference": reference}


def _measurement(m: Measurement, **extra: Any) -> dict[str, Any]:
    return {"value_ns": m.value_ns, "mechanism": m.mechanism, "reason": m.reason, **extra}


def compose(m: Migration, *, run_id: str, started_ns: int, command: str) -> dict[str, Any]:
    """The report of a completed migration (outcome passed or failed by its verdicts)."""
    a, plan, dest = m.analysis, m.plan, m.destination
    state, after = m.source.state, dest.after
    offset = round(m.clock.offset_ns)
    uncertainty = round(m.clock.uncertainty_ns)
    # From the source stop (its vCPU leaving the last KVM_RUN) to the destination's first
    # report: the guest's downtime, phase by phase.
    capture_start = state.capture_realtime_ns - state.timings["before_clock"]
    phases = {"stop_ns": capture_start - m.source.stop_realtime_ns,
              "capture_ns": state.timings["capture"]}
    if plan.mode == "precopy":      # the last dirty set, read after the capture
        phases["dirty_log_ns"] = m.source.dirty_log_ns
    if plan.destroy_first:          # else after the REPORT, outside the downtime (migration)
        phases["destroy_ns"] = m.source.destroy_ns
    phases.update({
        "gap_ns": m.gap_ns,
        "encode_ns": m.encode_ns,
        "transfer_ns": dest.phases.commit_realtime_ns - offset - m.send_start_realtime_ns,
        "validate_ns": dest.phases.validate_ns,
        "restore_ns": dest.restore_record.restore_ns,
        "first_entry_ns": after.host_run_ns,
    })
    total = m.stats.downtime_ns
    assert total is not None
    phases["other_ns"] = total - sum(phases.values())
    phases["total_ns"] = total
    phases["uncertainty_ns"] = uncertainty

    failed = a.failed
    return {
        "report_version": REPORT_VERSION,
        "run_id": run_id,
        "command": command,
        "started_at": timestamp(started_ns),
        "topology": plan.topology,
        "destination": plan.destination,
        "destination_agent_version": m.destination_version,
        "strategy": a.strategy,
        # How it was chosen: negotiated after HELLO (the options' parts over the best both
        # hosts support), or as given (options, sweep point, loopback: this host's best).
        "strategy_chosen": "best both hosts support" if plan.negotiate is not None else "as given",
        "memory_size": plan.memory_size,
        "warmup_reports": m.source.warmup_reports,
        "gap_requested_ns": plan.gap_ns,
        "clock_sync": {"offset_ns": offset, "uncertainty_ns": uncertainty,
                       "rtt_ns": m.clock.rtt_ns, "samples": m.clock.samples,
                       "consistent": m.clock.consistent},
        **clock_reference(),
        # How far the hosts' clocks disagree, in kvmcore.analysis's words.
        "hosts_clocks": _measurement(a.hosts_clock_offset, uncertainty_ns=uncertainty)
        if a.hosts_clock_offset else None,
        # How far the hosts' TSCs disagree (destination minus source, ns at the source's rate).
        "hosts_tsc": _measurement(a.hosts_tsc_offset, uncertainty_ns=uncertainty)
        if a.hosts_tsc_offset else None,
        "wall_gap": _measurement(a.wall_gap, uncertainty_ns=uncertainty),
        "downtime": phases,
        "measurements": {
            "kvmclock_jump": _measurement(a.kvmclock_jump),
            "tsc_jump": _measurement(a.tsc_jump),
            "kvm_steal_delta": _measurement(a.kvm_steal_delta),
            "xen_runnable_delta": _measurement(a.xen_runnable_delta),
            "host_interval": _measurement(a.host_interval),
        },
        "bound": {"host_bracket_ns": list(a.host_bracket_ns), "detail": HOST_BRACKET_RULE},
        "guest_saw_backwards": a.guest_saw_backwards,
        "backwards_step_ns": a.backwards_step_ns,
        "verdicts": {name: check.to_plain() for name, check in a.checks.items()},
        # The raw records a kernel engineer debugs a jump with, as the guest read them.
        "pvclock": {"before": m.source.before.pvclock.to_plain(),
                    "after": after.pvclock.to_plain()},
        "hosts": {"source": m.source_caps.to_plain(), "destination": m.destination_caps.to_plain()},
        "migration": m.stats.to_plain(),
        "source_phases": m.source_phases,
        "destination_phases": dataclasses.asdict(dest.phases),
        "restore_record": dest.restore_record.to_plain(),
        "outcome": "failed" if failed else "passed",
        "exit_code": 1 if failed else 0,
        "error": f"verdict failed: {', '.join(failed)}" if failed else None,
    }


def error_report(*, run_id: str, started_ns: int, command: str, topology: str,
                 destination: str | None, strategy: str | None, exit_code: int,
                 error: str, outcome: str = "error", **extra: Any) -> dict[str, Any]:
    """The report of a run that did not complete: same top-level keys, figures null.
    ``outcome`` "rolled back" when the source guest was resumed (``extra``: ``rollback``,
    and the ``migration`` statistics measured up to the failure)."""
    return {
        "report_version": REPORT_VERSION, "run_id": run_id, "command": command,
        "started_at": timestamp(started_ns), "topology": topology, "destination": destination,
        "strategy": strategy, "outcome": outcome, "exit_code": exit_code, "error": error,
        "verdicts": {name: {"ok": None, "detail": "not run"} for name in CHECK_NAMES},
        **extra,
    }

"""The README's "Two hosts" table from a run's scenarios.json (`./dev pair --table FILE`).

One row a scenario: the skew asked for, the strategy the report names, the reference's dst - src
next to the agents' estimate, the kvmclock error (kvmclock_follows_gap's value - expected), the
Xen runnable delta against its window, and the verdicts. Figures only from the reports and the
references the run recorded; a scenario that did not report says so.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _ms(ns: float | None, signed: bool = True) -> str:
    return "–" if ns is None else f"{ns / 1e6:{'+' if signed else ''}.3f} ms"


def row(o: dict[str, Any], report: dict[str, Any] | None) -> str:
    skew = f"{o['scenario']['skew_ns'] / 1e6:+.0f} ms"
    direction = o.get("direction", "src->dst")
    where = "" if direction == "src->dst" else f"{direction}: "
    if report is None or report.get("outcome") == "error" or "clock_sync" not in report:
        why = ((report or {}).get("error") or o["stderr"].strip()[-120:]).replace("|", "\\|")
        asked = " ".join(o["scenario"]["migrate_args"])
        return (f"| {skew} | {where}`{asked}` | – | – | – | – | – | refused (exit {o['status']}): "
                f"{why} |")
    ref = o["reference_before"]["destination_minus_source"]
    sync = report["clock_sync"]
    verdicts = report["verdicts"]
    kvmclock = verdicts["kvmclock_follows_gap"]
    runnable = verdicts["xen_runnable_in_window"]
    if runnable.get("value_ns") is None:
        window = "n/a (runstate off)"
    else:
        window = (f"{_ms(runnable['value_ns'], False)} in [{_ms(runnable['lo_ns'], False)}, "
                  f"{_ms(runnable['hi_ns'], False)}]: {'pass' if runnable['ok'] else '**fail**'}")
    failed = [name for name, v in verdicts.items() if v.get("ok") is False and v.get("decides", True)]
    outcome = "pass" if not failed else "**fail**: " + ", ".join(failed)
    return (f"| {skew} | {where}{report['strategy'].replace(',', ', ')} | {_ms(ref['offset_ns'])} ± "
            f"{_ms(ref['uncertainty_ns'], False)} | {_ms(sync['offset_ns'])} ± "
            f"{_ms(sync['uncertainty_ns'], False)} | {_ms(sync['offset_ns'] - ref['offset_ns'])} | "
            f"{_ms(kvmclock.get('error_ns'))} | {window} | {outcome} |")


HEADER = ("| skew | strategy | reference dst − src | agents' estimate | estimate − reference | "
          "kvmclock error | Δrunnable vs window | verdicts |\n|---|---|---|---|---|---|---|---|")


def markdown(outcomes: Sequence[dict[str, Any]]) -> str:
    import json
    rows = []
    for o in outcomes:
        try:
            report = json.loads(o["stdout"])
        except ValueError:
            report = None
        rows.append(row(o, report))
    return "\n".join([HEADER, *rows]) + "\n"

"""KTAP version 1 output, so a sweep plugs into kernel test tooling (kunit.py parse, kselftest runners).

One test per combination (all its repeats): ``ok`` when every run passed,
``not ok`` with the first problem when any failed or errored, ``# SKIP`` when
nothing could be measured (no run, or no accounting figure on this pair of
hosts). The per-point figures and each verdict's passed/failed/not measurable
counts go in diagnostic lines (``# ...``) just before the result line they
belong to, as KTAP places a test's diagnostics.
See Documentation/dev-tools/ktap.rst.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .summary import BASES, PointSummary, Stats

_RESULT = re.compile(r"^(ok|not ok) ([0-9]+)(?: ([^#]*?))?\s*(?:#\s*(.*))?$")
_PLAN = re.compile(r"^1\.\.([0-9]+)$")


def _clean(text: str) -> str:
    """A description or reason on one line without ``#`` (which would start a directive)."""
    return " ".join(text.replace("#", "").split())


def _ms(stats: Stats) -> str:
    return (f"median {stats.median / 1e6:.3f} ms (p5 {stats.p5 / 1e6:.3f}, "
            f"p95 {stats.p95 / 1e6:.3f}, n={stats.n})")


def result_line(number: int, summary: PointSummary) -> str:
    name = _clean(summary.label or summary.name)
    if summary.runs == 0:
        return f"ok {number} {name} # SKIP not run"
    if summary.failed or summary.errors:
        reason = summary.problems[0] if summary.problems else "a run failed"
        return (f"not ok {number} {name} # {summary.failed} failed, {summary.errors} errored "
                f"of {summary.runs}: {_clean(reason)}")
    if summary.accounting_error is None:
        return f"ok {number} {name} # SKIP not measurable: no accounting figure (wall gap or jump)"
    return f"ok {number} {name}"


def render(sweep: str, summaries: list[PointSummary]) -> str:
    lines = ["KTAP version 1", f"# sweep {sweep}: {len(summaries)} points", f"1..{len(summaries)}"]
    for number, summary in enumerate(summaries, 1):
        if summary.accounting_error is not None and summary.basis is not None:
            basis = BASES.get(summary.basis, summary.basis)
            lines.append(f"# accounting error, {basis}: {_ms(summary.accounting_error)}")
        if summary.downtime is not None:
            lines.append(f"# downtime: {_ms(summary.downtime)}")
        for name, c in summary.verdicts.items():
            lines.append(f"# verdict {name}: {c['passed']} passed, {c['failed']} failed, "
                         f"{c['not_measurable']} not measurable")
        lines.append(result_line(number, summary))
    return "\n".join(lines) + "\n"


class KtapError(ValueError):
    """The text is not well-formed KTAP v1 (message names the line)."""


@dataclass(frozen=True)
class Result:
    ok: bool
    number: int
    description: str
    directive: str | None


def parse(text: str) -> list[Result]:
    """Parse a top-level KTAP v1 document; KtapError unless the plan matches the results.

    Checks what consumers rely on: the version line first, exactly one plan,
    results numbered 1..N in order, and as many of them as the plan says.
    """
    lines = text.splitlines()
    if not lines or lines[0] != "KTAP version 1":
        raise KtapError("line 1: expected 'KTAP version 1'")
    planned: int | None = None
    results: list[Result] = []
    for number, line in enumerate(lines[1:], 2):
        if not line or line.startswith("#"):
            continue
        if (plan := _PLAN.match(line)) is not None:
            if planned is not None:
                raise KtapError(f"line {number}: a second plan")
            planned = int(plan.group(1))
            continue
        match = _RESULT.match(line)
        if match is None:
            raise KtapError(f"line {number}: not a result, plan or diagnostic: {line!r}")
        if int(match.group(2)) != len(results) + 1:
            raise KtapError(f"line {number}: test {match.group(2)}, expected {len(results) + 1}")
        results.append(Result(match.group(1) == "ok", int(match.group(2)),
                              match.group(3) or "", match.group(4)))
    if planned is None:
        raise KtapError("no plan line (1..N)")
    if planned != len(results):
        raise KtapError(f"plan says {planned} tests, found {len(results)}")
    return results

"""The human form of a report: rich tables on stdout (plain text when not a terminal)."""

from __future__ import annotations

from typing import IO, Any

from rich.console import Console
from rich.table import Table

from kvmcore import analysis


class ReportConsole(Console):
    """rich's Console, except that a reader who left (`| head`) is left to the caller: rich's
    own answer is SystemExit(1), and 1 means "a verdict failed" here."""

    def on_broken_pipe(self) -> None:
        raise BrokenPipeError


def ms(ns: int | None) -> str:
    """A figure as the verdicts spell theirs (kvmcore.analysis.ms); "-" when not measured."""
    return "-" if ns is None else analysis.ms(ns)


def _verdict(v: dict[str, Any]) -> str:
    """PASS / FAIL / n/a; a check that does not decide the run says so instead of FAIL."""
    if v["ok"] is False and v.get("decides") is False:
        return "[yellow]fail (info)[/]"
    return {True: "[green]PASS[/]", False: "[red]FAIL[/]", None: "[yellow]n/a[/]"}[v["ok"]]


def render(report: dict[str, Any], file: IO[str]) -> None:
    console = ReportConsole(file=file, width=120, highlight=False)
    head = Table(show_header=False, box=None, pad_edge=False)
    head.add_row("run", f"{report['run_id']}  {report['started_at']}  ({report['command']})")
    head.add_row("topology", f"{report['topology']} -> {report.get('destination') or '-'}")
    head.add_row("strategy", str(report.get("strategy") or "-"))
    head.add_row("outcome", f"{report['outcome']} (exit {report['exit_code']})")
    if report.get("error"):
        head.add_row("error", report["error"])
    console.print(head)
    if "measurements" not in report:
        return
    sync = report["clock_sync"]
    gap = report["wall_gap"]
    console.print(f"wall gap {ms(gap['value_ns'])} +- {ms(gap['uncertainty_ns'])} "
                  f"(clock offset {ms(sync['offset_ns'])}, rtt {ms(sync['rtt_ns'])}, "
                  f"{report['memory_size'] >> 20} MiB guest, gap requested "
                  f"{ms(report['gap_requested_ns'])})")
    if report.get("hosts_clocks"):
        console.print(f"host clocks {report['hosts_clocks']['mechanism']}")

    down = Table(title="downtime by phase", title_justify="left")
    down.add_column("phase")
    down.add_column("time", justify="right")
    for key, value in report["downtime"].items():
        down.add_row(key.removesuffix("_ns"), ms(value))
    console.print(down)

    meas = Table(title="what the guest saw", title_justify="left")
    for col in ("measurement", "value", "mechanism / reason"):
        meas.add_column(col, justify="right" if col == "value" else "left")
    for name, m in report["measurements"].items():
        meas.add_row(name, ms(m["value_ns"]), m["reason"] or m["mechanism"])
    console.print(meas)

    verdicts = Table(title="verdicts", title_justify="left")
    for col in ("verdict", "result", "detail"):
        verdicts.add_column(col)
    for name, v in report["verdicts"].items():
        verdicts.add_row(name, _verdict(v), v["detail"])
    console.print(verdicts)

    hosts = Table(title="hosts", title_justify="left")
    for col in ("", "source", "destination"):
        hosts.add_column(col)
    src, dst = report["hosts"]["source"], report["hosts"]["destination"]
    for key in ("kernel_release", "kvm_modules", "clocksource", "tsc_khz", "master_clock",
                "xen_hvm", "clock_guest", "tsc_offset_applies", "steal_time"):
        hosts.add_row(key, _short(src[key]), _short(dst[key]))
    console.print(hosts)


def _short(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "-"
    return str(value)

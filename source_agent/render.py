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
    chosen = report.get("strategy_chosen")
    head.add_row("strategy", str(report.get("strategy") or "-")
                 + (f"  ({chosen})" if chosen == "best both hosts support" else ""))
    head.add_row("outcome", f"{report['outcome']} (exit {report['exit_code']})")
    if report.get("error"):
        head.add_row("error", report["error"])
    if report.get("rollback"):
        rb = report["rollback"]
        head.add_row("rollback", f"source guest resumed: sequence {rb['stopped_sequence']} -> "
                     f"{', '.join(map(str, rb['resumed_sequences'])) or '-'} "
                     f"({'runs on' if rb['ok'] else 'did NOT run on'})")
    console.print(head)
    if report.get("migration"):
        _migration(console, report["migration"])
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


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / (1 << 20):.1f}"


def _migration(console: Console, m: dict[str, Any]) -> None:
    """The statistics (source_agent.stats), as query-migrate would list them."""
    table = Table(title=f"migration: {m['mode']}" + (" (destroy first)" if m["destroy_first"]
                                                      else ""),
                  title_justify="left", show_header=False)
    table.add_column("figure")
    table.add_column("value", justify="right")
    converged = {True: "yes", False: "no (max rounds)", None: "-"}[m["converged"]]
    for name, value in (("total", ms(m["total_ns"])), ("setup", ms(m["setup_ns"])),
                        ("downtime", ms(m["downtime_ns"])),
                        ("expected downtime", ms(m["expected_downtime_ns"])),
                        ("downtime limit", ms(m["downtime_limit_ns"])),
                        ("bandwidth", f"{_mib(m['bandwidth'])} MiB/s"),
                        ("rounds", f"{len(m['rounds'])}" + (f" of at most {m['max_rounds']}"
                                                            if m["max_rounds"] else "")),
                        ("converged", converged),
                        ("destination prepare (outside the downtime)",
                         ms(m["destination_prepare_ns"])),
                        ("source destroy (" + ("inside" if m["destroy_first"] else "outside")
                         + " the downtime)", ms(m["source_destroy_ns"]))):
        table.add_row(name, value)
    console.print(table)
    if not m["rounds"] and not m["final"]:
        return
    rounds = Table(title="memory sent", title_justify="left")
    for col in ("round", "pages", "MiB", "time", "MiB/s", "dirtied MiB/s"):
        rounds.add_column(col, justify="left" if col == "round" else "right")
    numbered = [(str(i), r) for i, r in enumerate(m["rounds"])]
    for label, r in numbered + ([("after the stop", m["final"])] if m["final"] else []):
        rounds.add_row(label, str(r["pages"]), _mib(r["bytes"]), ms(r["ns"]),
                       _mib(r["bytes"] * 1e9 / r["ns"] if r["ns"] > 0 else None),
                       _mib(r["dirty_rate"]))
    console.print(rounds)


def _short(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "-"
    return str(value)

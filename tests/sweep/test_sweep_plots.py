"""Figures are written as valid, non-blank PNG (and SVG); broken PNGs are detected."""

from __future__ import annotations

import pytest
from fakes import fake_report

from source_agent.sweep.plan import Axes, SweepPlan
from source_agent.sweep.plots import PlotError, check_png, write_plots
from source_agent.results import record_columns as columns


def _runs(plan, xen=False, fail=frozenset()):
    """Fake runs; a point whose strategy is in ``fail`` hides the gap and fails its verdict."""
    runs = []
    for point in plan.points():
        hidden = point.strategy in fail
        report = fake_report(point, rtt_ns=round(2 * point.latency * 1e9) + 100_000, xen=xen,
                             error_ns=-(point.gap_ns + 1_000_000) if hidden else
                             10_000 * point.repeat, outcome="failed" if hidden else "passed")
        report["sweep"] = {"combination": point.combination, "config": point.to_plain()}
        if point.strategy == "best":             # as the agents report it: what it resolved to
            report["strategy"] = "clock=realtime,tsc=none,runstate=off"
        runs.append({"outcome": report["outcome"], "report": report, **columns(report)})
    return runs


def _legend(figure) -> list[str]:
    return [t.get_text() for legend in figure.legends for t in legend.get_texts()]


def test_every_varied_axis_gets_its_own_encoding_and_failures_are_marked():
    """Item 10: a strategy sweep no longer draws both strategies as "0ms one-way"."""
    from source_agent.sweep.plots import accounting_figure

    plan = SweepPlan("s", Axes(strategy=("best", "clock=plain"), latency=(0.0, 0.005)), 1)
    figure = accounting_figure(plan, _runs(plan, fail={"clock=plain"}))
    legend = _legend(figure)
    assert "colour: strategy" in legend and "marker: latency" in legend
    assert any(t.startswith("best → ") for t in legend)
    assert any(t.startswith("clock=plain") for t in legend)
    assert "0ms" in legend and "5ms" in legend
    assert "ringed red: run failed a verdict" in legend
    assert "y = −x: gap hidden (clock=plain)" in legend
    # Negative controls: nothing failed, no ring explained; a memory sweep is not about latency.
    assert "ringed red: run failed a verdict" not in _legend(accounting_figure(plan, _runs(plan)))
    memory = SweepPlan("m", Axes(memory=(2 << 20, 16 << 20)), 1)
    legend = _legend(accounting_figure(memory, _runs(memory)))
    assert "colour: memory" in legend and "2MiB" in legend
    assert not any("latency" in t or "one-way" in t for t in legend)
    assert not any(t.startswith("marker:") for t in legend)


def test_a_third_varied_axis_is_a_panel_each():
    from source_agent.sweep.plots import accounting_figure

    plan = SweepPlan("s", Axes(strategy=("best", "clock=plain"), latency=(0.0, 0.005),
                               memory=(2 << 20, 16 << 20, 32 << 20)), 1)
    figure = accounting_figure(plan, _runs(plan))
    assert [ax.get_title() for ax in figure.axes] == ["memory 2MiB", "memory 16MiB",
                                                      "memory 32MiB"]


def test_a_correct_strategy_sits_at_zero_and_a_hidden_gap_at_minus_the_gap():
    from source_agent.sweep.plots import accounting_figure

    plan = SweepPlan("s", Axes(strategy=("best", "clock=plain"), gap_ns=(0, 50_000_000)), 1)
    (ax,) = accounting_figure(plan, _runs(plan, fail={"clock=plain"})).axes
    dots = [tuple(xy) for c in ax.collections if c.get_offsets().shape[0] == 1
            and c.get_facecolor().size for xy in c.get_offsets()]
    errors = sorted(round(y, 3) for _, y in dots)
    assert errors[-2:] == [0.0, 0.0]                  # best: error 0 at both gaps
    assert min(errors) < -50                          # clock=plain: about minus the gap


@pytest.mark.parametrize("xen", [False, True])
def test_plots_are_valid_png_and_svg(tmp_path, xen):
    plan = SweepPlan("s", Axes(latency=(0.0, 0.005, 0.02), memory=(2 << 20, 16 << 20)), 2)
    paths = write_plots(plan, _runs(plan, xen), tmp_path)
    assert sorted(p.name for p in paths) == ["s-accounting.png", "s-accounting.svg",
                                             "s-downtime.png", "s-downtime.svg"]
    width, height = check_png(tmp_path / "s-accounting.png")
    assert (width, height) == (920, 480)          # the panel and the legend right of it
    assert check_png(tmp_path / "s-downtime.png") == (1100, 480)
    svg = (tmp_path / "s-accounting.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "</svg>" in svg and len(svg) > 10_000
    label = "Xen runnable delta − (wall gap + open)" if xen else "kvmclock jump − host interval"
    # matplotlib draws text as glyph paths and keeps the string in a comment.
    assert f"<!-- accounting error: {label}" in svg
    other = "kvmclock jump − host interval" if xen else "Xen runnable delta − (wall gap + open)"
    assert f"<!-- accounting error: {other}" not in svg  # negative control: label follows basis


def test_a_sweep_over_modes_and_dirty_rates_draws_downtime_per_mode(tmp_path):
    """The live figure: downtime against the dirty rate and against the guest size, a line per
    mode; drawn only when the sweep varies the mode or the dirty rate (negative control above:
    a latency sweep writes two figures)."""
    from source_agent.sweep.plots import live_figure

    plan = SweepPlan("s", Axes(mode=("stop-copy", "precopy"), dirty_rate=(0, 50 << 20),
                               working_set=(8 << 20,), memory=(16 << 20, 64 << 20)), 2)
    runs = _runs(plan)
    for run in runs:                    # precopy: a fifth of stop-copy's downtime
        config = run["report"]["sweep"]["config"]
        down = 10_000_000 + config["dirty_rate"] // 10 + config["memory_size"] // 5
        run["report"]["migration"] = {"mode": config["mode"], "downtime_ns":
                                      down // 5 if config["mode"] == "precopy" else down}
    paths = write_plots(plan, runs, tmp_path)
    assert "s-live.png" in {p.name for p in paths}
    check_png(tmp_path / "s-live.png")
    figure = live_figure(plan, runs)
    by_dirty_rate, by_memory = figure.axes[:2]
    lines = {line.get_label(): list(line.get_ydata()) for line in by_dirty_rate.get_lines()}
    assert set(lines) == {"stop-copy", "precopy"}
    # Medians at memory 16 MiB (held): 0 and 50 MiB/s, each mode its own.
    assert lines["stop-copy"] == pytest.approx([13.3554432, 18.598323])
    assert lines["precopy"] == pytest.approx([v / 5 for v in lines["stop-copy"]], rel=1e-3)
    assert "guest memory, MiB" in by_memory.get_xlabel()


def test_a_truncated_png_is_detected(tmp_path):
    plan = SweepPlan("s", Axes(latency=(0.0, 0.005)), 1)
    write_plots(plan, _runs(plan), tmp_path)
    data = (tmp_path / "s-accounting.png").read_bytes()
    for cut in (len(data) - 12, len(data) // 2, 20):
        (tmp_path / "t.png").write_bytes(data[:cut])
        with pytest.raises(PlotError, match="truncated|missing"):
            check_png(tmp_path / "t.png")
    corrupt = bytearray(data)
    corrupt[100] ^= 0xFF
    (tmp_path / "c.png").write_bytes(bytes(corrupt))
    with pytest.raises(PlotError, match="bad CRC"):
        check_png(tmp_path / "c.png")
    (tmp_path / "n.png").write_bytes(b"GIF89a" + data[6:])
    with pytest.raises(PlotError, match="bad signature"):
        check_png(tmp_path / "n.png")


def test_a_blank_png_is_detected(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4))
    FigureCanvasAgg(figure)
    figure.savefig(tmp_path / "blank.png")
    with pytest.raises(PlotError, match="blank"):
        check_png(tmp_path / "blank.png")


def test_plots_without_any_measurable_run_still_draw(tmp_path):
    plan = SweepPlan("s", Axes(latency=(0.0,)), 1)
    runs = _runs(plan)
    runs[0]["wall_gap_ns"] = None
    write_plots(plan, runs, tmp_path)
    assert check_png(tmp_path / "s-accounting.png")


def test_downtime_figure_has_a_panel_per_varied_axis():
    from source_agent.sweep.plots import downtime_figure

    def panels(**axes):
        plan = SweepPlan("s", Axes(**axes), 1)
        return [ax.get_xlabel().split(" (")[0] for ax in downtime_figure(plan, []).axes]

    assert panels(latency=(0.0, 0.005), memory=(2 << 20, 16 << 20)) == ["one-way latency",
                                                                         "guest memory"]
    assert panels(latency=(0.0, 0.005)) == ["one-way latency"]
    # Item 10: no latency panel when latency was not varied; a strategy panel when it was.
    assert panels(strategy=("best", "clock=plain")) == ["strategy"]
    assert panels(gap_ns=(0, 20_000_000)) == ["extra gap"]
    assert panels() == ["one combination"]


def test_downtime_bars_say_how_many_runs_failed():
    from source_agent.sweep.plots import downtime_figure

    plan = SweepPlan("s", Axes(strategy=("best", "clock=plain")), 2)
    (ax,) = downtime_figure(plan, _runs(plan, fail={"clock=plain"})).axes
    assert [t.get_text() for t in ax.texts] == ["2/2 failed a verdict"]
    (ax,) = downtime_figure(plan, _runs(plan)).axes
    assert len(ax.texts) == 0                         # negative control

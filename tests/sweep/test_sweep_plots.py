"""Figures are written as valid, non-blank PNG (and SVG); broken PNGs are detected."""

from __future__ import annotations

import pytest
from fakes import fake_report

from source_agent.sweep.plan import Axes, SweepPlan
from source_agent.sweep.plots import PlotError, check_png, write_plots
from source_agent.sweep.runner import columns


def _runs(plan, xen=False):
    runs = []
    for point in plan.points():
        report = fake_report(point, rtt_ns=round(2 * point.latency * 1e9) + 100_000, xen=xen,
                             error_ns=10_000 * point.repeat)
        report["sweep"] = {"combination": point.combination, "config": point.to_plain()}
        runs.append({"outcome": "passed", "report": report, **columns(report)})
    return runs


@pytest.mark.parametrize("xen", [False, True])
def test_plots_are_valid_png_and_svg(tmp_path, xen):
    plan = SweepPlan("s", Axes(latency=(0.0, 0.005, 0.02), memory=(2 << 20, 16 << 20)), 2)
    paths = write_plots(plan, _runs(plan, xen), tmp_path)
    assert sorted(p.name for p in paths) == ["s-accounting.png", "s-accounting.svg",
                                             "s-downtime.png", "s-downtime.svg"]
    width, height = check_png(tmp_path / "s-accounting.png")
    assert (width, height) == (640, 480)
    assert check_png(tmp_path / "s-downtime.png") == (1100, 480)
    svg = (tmp_path / "s-accounting.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "</svg>" in svg and len(svg) > 10_000
    label = "Xen runnable delta − (wall gap + open)" if xen else "kvmclock jump − host interval"
    # matplotlib draws text as glyph paths and keeps the string in a comment.
    assert f"<!-- accounting error: {label}" in svg
    other = "kvmclock jump − host interval" if xen else "Xen runnable delta − (wall gap + open)"
    assert f"<!-- accounting error: {other}" not in svg  # negative control: label follows basis


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

    both = SweepPlan("s", Axes(latency=(0.0, 0.005), memory=(2 << 20, 16 << 20)), 1)
    latency_only = SweepPlan("s", Axes(latency=(0.0, 0.005)), 1)
    assert len(downtime_figure(both, []).axes) == 2
    assert len(downtime_figure(latency_only, []).axes) == 1

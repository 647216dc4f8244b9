"""The sweep's figures (PNG and SVG), drawn with matplotlib's Agg canvas — no display needed.

1. ``NAME-accounting``: what the guest was told it lost against what it lost —
   accounted steal (Xen runnable delta) or, where there is no Xen, the kvmclock
   jump, the axis saying which — against the measured wall gap, one dot per
   run coloured by latency, with the y = x line of perfect accounting.
2. ``NAME-downtime``: downtime split by phase (median of each phase), against
   latency and against guest memory size, side by side.

`check_png` verifies a written PNG chunk by chunk (signature, CRCs, IEND) and
that it decodes to an image that is not blank, because a figure that silently
came out empty or truncated would be worse than none.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from source_agent.netem import format_duration

from .plan import SweepPlan, format_bandwidth, format_size
from .summary import accounting_error, percentile

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Parts of the report's downtime that are not phases.
NOT_PHASES = ("total_ns", "uncertainty_ns")
#: Phases in the order they happen (the store keeps the report with sorted keys); any phase
#: not listed here is stacked after these, alphabetically.
PHASE_ORDER = ("capture_ns", "destroy_ns", "gap_ns", "encode_ns", "transfer_ns", "validate_ns",
               "restore_ns", "first_entry_ns", "other_ns")


class PlotError(Exception):
    """A figure could not be drawn, or a written PNG is not a valid, non-blank image."""


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _config(run: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = run.get("report", {}).get("sweep", {}).get("config", {})
    return config


def _completed(runs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [run for run in runs if run["outcome"] != "error"]


def accounting_figure(plan: SweepPlan, runs: Sequence[dict[str, Any]]) -> Any:
    figure = _figure(6.4, 4.8)
    ax = figure.add_subplot()
    points: dict[str, list[tuple[float, float, float]]] = {}
    for run in _completed(runs):
        measured = accounting_error(run)
        if measured is None:
            continue
        basis, error = measured
        gap_ms = run["wall_gap_ns"] / 1e6
        points.setdefault(basis, []).append((gap_ms, gap_ms + error / 1e6, _config(run)["latency"]))
    if not points:
        ax.text(0.5, 0.5, "no accounting figure measurable", ha="center", transform=ax.transAxes)
    latencies = list(plan.axes.latency)
    colours = {lat: f"C{i % 10}" for i, lat in enumerate(latencies)}
    markers = {"xen_runnable": "o", "kvmclock": "^"}
    every = [value for series in points.values() for x, y, _ in series for value in (x, y)]
    for basis, series in points.items():
        for latency in latencies:
            mine = [(x, y) for x, y, lat in series if lat == latency]
            if mine:
                label = f"{format_duration(latency)} one-way"
                if len(points) > 1:
                    label += " (Xen)" if basis == "xen_runnable" else " (kvmclock)"
                ax.scatter(*zip(*mine), s=24, color=colours[latency], marker=markers[basis],
                           label=label, alpha=0.8)
    if every:
        low, high = min(every), max(every)
        ax.plot([low, high], [low, high], color="0.4", linestyle="--", linewidth=1, label="y = x")
    ylabel = {"xen_runnable": "accounted steal (Xen runnable delta), ms",
              "kvmclock": "kvmclock jump (no Xen on this host), ms"}
    ax.set_ylabel(ylabel[next(iter(points))] if len(points) == 1 else
                  "accounted steal (o) / kvmclock jump (^), ms")
    ax.set_xlabel("measured gap (wall clock, offset-corrected), ms")
    ax.set_title(f"{plan.name}: what the guest was told vs what it lost")
    ax.grid(True, alpha=0.3)
    if points:
        ax.legend(fontsize="small", title="latency")
    if "kvmclock" in points:
        # Say on the figure why the kvmclock points sit a little above y = x.
        ax.set_xlabel(ax.get_xlabel() + "\n(the kvmclock jump runs from the guest's last report "
                      "before the gap to its first after:\nit also holds the guest's running "
                      "time on both sides)", fontsize="small")
    return figure


def _phase_medians(runs: Sequence[dict[str, Any]]) -> dict[str, float]:
    values: dict[str, list[int]] = {}
    for run in runs:
        downtime = run.get("report", {}).get("downtime") or {}
        for key, value in downtime.items():
            if key.endswith("_ns") and key not in NOT_PHASES and isinstance(value, int):
                values.setdefault(key, []).append(value)
    # A phase measured as a small negative difference of clocks is drawn as zero.
    return {key: max(0.0, percentile(v, 50)) / 1e6 for key, v in values.items()}


def _stacked(ax: Any, labels: list[str], groups: list[list[dict[str, Any]]], xlabel: str) -> None:
    medians = [_phase_medians(group) for group in groups]
    seen = {name for m in medians for name in m}
    phases = [p for p in PHASE_ORDER if p in seen] + sorted(seen.difference(PHASE_ORDER))
    bottoms = [0.0] * len(labels)
    for i, phase in enumerate(phases):
        heights = [m.get(phase, 0.0) for m in medians]
        ax.bar(labels, heights, bottom=bottoms, color=f"C{i % 10}", label=phase.removesuffix("_ns"))
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    ax.set_xlabel(xlabel)
    ax.set_ylabel("downtime, ms (median of each phase)")
    ax.grid(True, axis="y", alpha=0.3)


#: Axis name in the plan -> key in PointConfig.to_plain() and how to spell a value.
_AXES: dict[str, tuple[str, Callable[[Any], str]]] = {"latency": ("latency", format_duration), "jitter": ("jitter", format_duration),
         "bandwidth": ("bandwidth", format_bandwidth), "memory": ("memory_size", format_size),
         "gap_ns": ("gap_ns", lambda ns: format_duration(ns / 1e9)), "strategy": ("strategy", str)}


def _slice(plan: SweepPlan, runs: Sequence[dict[str, Any]], vary: str) -> tuple[list[list[dict[str, Any]]], str]:
    """Runs grouped by ``vary``'s values, every other axis held at its first value.

    Taking a median across other axes (say, across latencies when plotting
    against memory) would mix populations and show a bar no experiment had;
    holding them fixed makes each panel a one-factor experiment, named in its label.
    """
    fixed = {axis: getattr(plan.axes, axis)[0] for axis in _AXES if axis != vary}
    held = [run for run in _completed(runs)
            if all(_config(run).get(_AXES[axis][0]) == value for axis, value in fixed.items())]
    key = _AXES[vary][0]
    groups = [[run for run in held if _config(run).get(key) == value]
              for value in getattr(plan.axes, vary)]
    varying = [f"{axis.removesuffix('_ns')} {_AXES[axis][1](value)}" for axis, value in fixed.items()
               if len(getattr(plan.axes, axis)) > 1]
    return groups, ", ".join(varying)


def downtime_figure(plan: SweepPlan, runs: Sequence[dict[str, Any]]) -> Any:
    """Downtime by phase against latency and against guest size: a panel for each axis the
    sweep varied (a single bar repeating the other panel would show nothing), latency if none."""
    panels = [(vary, label) for vary, label in (("latency", "one-way latency"),
                                                ("memory", "guest memory"))
              if len(getattr(plan.axes, vary)) > 1] or [("latency", "one-way latency")]
    figure = _figure(5.5 * len(panels), 4.8)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (vary, label) in zip(axes, panels):
        groups, held = _slice(plan, runs, vary)
        spell = _AXES[vary][1]
        _stacked(ax, [spell(v) for v in getattr(plan.axes, vary)], groups,
                 label + (f" (at {held})" if held else ""))
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        axes[-1].legend(handles[::-1], labels[::-1], fontsize="small", title="phase",
                        loc="upper left", bbox_to_anchor=(1.01, 1))
    figure.suptitle(f"{plan.name}: downtime by phase")
    return figure


def write_plots(plan: SweepPlan, runs: Sequence[dict[str, Any]], directory: Path) -> list[Path]:
    """Draw both figures as PNG and SVG into ``directory``; returns the paths, each PNG checked."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, figure in ((f"{plan.name}-accounting", accounting_figure(plan, runs)),
                         (f"{plan.name}-downtime", downtime_figure(plan, runs))):
        for suffix in ("png", "svg"):
            path = directory / f"{stem}.{suffix}"
            figure.savefig(path, format=suffix)
            written.append(path)
        check_png(directory / f"{stem}.png")
    return written


def check_png(path: Path, *, min_size: int = 1000) -> tuple[int, int]:
    """(width, height) of a complete, non-blank PNG; PlotError naming what is wrong otherwise."""
    data = Path(path).read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        raise PlotError(f"{path}: not a PNG (bad signature)")
    offset, chunks = len(PNG_SIGNATURE), []
    while offset < len(data):
        if offset + 8 > len(data):
            raise PlotError(f"{path}: truncated chunk header at byte {offset}")
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        end = offset + 12 + length
        if end > len(data):
            raise PlotError(f"{path}: truncated {kind!r} chunk at byte {offset}")
        body = data[offset + 8:end - 4]
        if zlib.crc32(kind + body) != struct.unpack(">I", data[end - 4:end])[0]:
            raise PlotError(f"{path}: bad CRC in {kind!r} chunk at byte {offset}")
        chunks.append(kind)
        offset = end
        if kind == b"IEND":
            break
    if not chunks or chunks[0] != b"IHDR" or chunks[-1] != b"IEND" or b"IDAT" not in chunks:
        raise PlotError(f"{path}: missing IHDR, IDAT or IEND (truncated?)")
    if len(data) < min_size:
        raise PlotError(f"{path}: only {len(data)} bytes, expected a drawn figure")
    from matplotlib.image import imread

    pixels = imread(path)
    if float(pixels[..., :3].std()) < 0.01:
        raise PlotError(f"{path}: the image is blank")
    width, height = struct.unpack(">II", data[16:24])
    return width, height

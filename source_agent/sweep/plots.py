"""The sweep's figures (PNG and SVG), drawn with matplotlib's Agg canvas — no display needed.

1. ``NAME-accounting``: the accounting error (what the guest was told it lost
   minus what it lost, over the same events: summary.accounting) against the
   measured wall gap, one dot per run with its verdict's bound as an error bar.
   A correct strategy sits on y = 0 within its bar at every gap; one that hides
   the gap (clock=plain) on y = −x, which is drawn too.
2. ``NAME-downtime``: downtime split by phase (median of each phase), one panel
   per axis the sweep varied (a single bar when none was).

Every axis the sweep varied gets its own encoding -- colour, then marker, then
a facet (a panel) -- named in the legends; the measured gap is the x axis, so
the gap axis needs none. A run that failed a verdict is ringed in red (and a
downtime bar says how many of its runs failed): the figure never shows a
failing strategy as if it were a result.

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
from source_agent.results import COMPLETED

from .plan import LIVE_DEFAULTS, SweepPlan, format_bandwidth, format_byte_rate, format_size
from .summary import accounting, percentile

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
    """A run's point as stored (a run recorded before the live axes has their defaults)."""
    config: dict[str, Any] = run.get("report", {}).get("sweep", {}).get("config", {})
    return {**LIVE_DEFAULTS, **config}


def _completed(runs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [run for run in runs if run["outcome"] in COMPLETED]


#: Axes a figure encodes, in the order they are given colour, marker, facet (gap: the x axis).
ENCODED_AXES = ("strategy", "mode", "latency", "memory", "dirty_rate", "working_set", "jitter",
                "bandwidth")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
FAILED_RING = {"s": 110, "facecolors": "none", "edgecolors": "red", "linewidths": 1.4}
YLABEL = {"xen_runnable": "accounting error: Xen runnable delta − (wall gap + open), ms",
          "kvmclock": "accounting error: kvmclock jump − host interval\n"
                      "(same two guest reports; no Xen on this host), ms"}


def varied_axes(plan: SweepPlan, among: Sequence[str] = ENCODED_AXES) -> list[str]:
    """The axes of ``among`` this sweep gives more than one value."""
    return [axis for axis in among if len(getattr(plan.axes, axis)) > 1]


def _value_label(axis: str, value: Any, run: dict[str, Any] | None = None) -> str:
    text = _AXES[axis][1](value)
    if axis == "strategy" and run is not None and text != run.get("report", {}).get("strategy"):
        text += f" → {run['report'].get('strategy')}"      # what it resolved to on this host
    return text


def accounting_figure(plan: SweepPlan, runs: Sequence[dict[str, Any]]) -> Any:
    varied = varied_axes(plan)
    colour_axis = varied[0] if varied else None
    marker_axis = varied[1] if len(varied) > 1 else None
    facet_axis = varied[2] if len(varied) > 2 else None
    rest = varied[3:]           # beyond three encodings: spelled out in the colour's label
    facets = list(getattr(plan.axes, facet_axis)) if facet_axis else [None]
    figure = _figure(6.4 * len(facets) + 2.8, 4.8)
    axes = figure.subplots(1, len(facets), squeeze=False, sharey=True)[0]
    plotted = [(run, acc) for run in _completed(runs) if (acc := accounting(run)) is not None
               and run.get("wall_gap_ns") is not None]
    bases = {acc.basis for _, acc in plotted}
    colour_of: dict[str, str] = {}
    marker_of: dict[str, str] = {}
    every_x: list[float] = []
    any_failed = False
    for ax, facet in zip(axes, facets):
        mine = [(run, acc) for run, acc in plotted if facet_axis is None
                or _config(run).get(_AXES[facet_axis][0]) == facet]
        for run, acc in mine:
            config = _config(run)
            key = " ".join([_value_label(colour_axis, config.get(_AXES[colour_axis][0]), run)]
                           + [f"{a} {_AXES[a][1](config.get(_AXES[a][0]))}" for a in rest]
                           ) if colour_axis else "all runs"
            colour = colour_of.setdefault(key, f"C{len(colour_of) % 10}")
            mkey = _value_label(marker_axis, config.get(_AXES[marker_axis][0])) \
                if marker_axis else ""
            marker = marker_of.setdefault(mkey, MARKERS[len(marker_of) % len(MARKERS)])
            x, y = run["wall_gap_ns"] / 1e6, acc.error_ns / 1e6
            every_x.append(x)
            if acc.low_ns is not None and acc.high_ns is not None:
                # The bound itself, not a bar from the dot to it: a dot off its bar failed.
                ax.vlines([x], acc.low_ns / 1e6, acc.high_ns / 1e6, colors=colour, alpha=0.4,
                          linewidth=3)
            ax.scatter([x], [y], s=28, color=colour, marker=marker, alpha=0.85, zorder=3)
            if run["outcome"] == "failed":
                any_failed = True
                ax.scatter([x], [y], zorder=4, marker="o", **FAILED_RING)
        ax.axhline(0, color="0.3", linewidth=1, linestyle="-")
        ax.set_xlabel("measured wall gap (offset-corrected), ms")
        ax.grid(True, alpha=0.3)
        if facet_axis is not None:
            ax.set_title(f"{facet_axis.removesuffix('_ns')} {_AXES[facet_axis][1](facet)}",
                         fontsize="medium")
    if every_x:
        high = max(every_x) * 1.05
        for ax in axes:
            ax.plot([0, high], [0, -high], color="0.5", linestyle="--", linewidth=1)
            ax.set_xlim(0, high)
    else:
        axes[0].text(0.5, 0.5, "no accounting figure measurable", ha="center",
                     transform=axes[0].transAxes)
    axes[0].set_ylabel(YLABEL[next(iter(bases))] if len(bases) == 1 else
                       "accounting error (Xen runnable or kvmclock, per run), ms")
    title = f"{plan.name}: what the guest was told minus what it lost"
    if facet_axis is None:
        axes[0].set_title(title)    # a suptitle would run under the legend
    else:
        figure.suptitle(title, x=0.4)
    _accounting_legend(figure, colour_axis, colour_of, marker_axis, marker_of, any_failed)
    return figure


def _accounting_legend(figure: Any, colour_axis: str | None, colour_of: dict[str, str],
                       marker_axis: str | None, marker_of: dict[str, str],
                       any_failed: bool) -> None:
    """One legend right of the panels explaining every mark: a heading per encoding (colour:
    axis, marker: axis), then the reference lines, the bound and the red ring."""
    from matplotlib.lines import Line2D

    def handle(**kw: Any) -> Any:
        return Line2D([], [], linestyle="none", **kw)

    entries: list[tuple[Any, str]] = []
    headings = []
    if colour_axis:
        headings.append(len(entries))
        entries.append((handle(), f"colour: {colour_axis.removesuffix('_ns')}"))
        entries += [(handle(marker="o", color=c), k) for k, c in colour_of.items()]
    if marker_axis:
        headings.append(len(entries))
        entries.append((handle(), f"marker: {marker_axis.removesuffix('_ns')}"))
        entries += [(handle(marker=m, color="0.3"), k) for k, m in marker_of.items()]
    headings.append(len(entries))
    entries.append((handle(), "marks"))
    entries += [(Line2D([], [], color="0.3", linewidth=1), "y = 0: gap accounted exactly"),
                (Line2D([], [], color="0.5", linestyle="--", linewidth=1),
                 "y = −x: gap hidden (clock=plain)"),
                (Line2D([], [], color="0.5", alpha=0.5, linewidth=3), "bar: the verdict's bound")]
    if any_failed:
        entries.append((handle(marker="o", markersize=10, markerfacecolor="none",
                               markeredgecolor="red"), "ringed red: run failed a verdict"))
    legend = figure.legend([h for h, _ in entries], [t for _, t in entries], fontsize="small",
                           loc="outside right upper")
    for i, text in enumerate(legend.get_texts()):
        if i in headings:
            text.set_fontweight("bold")


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
         "gap_ns": ("gap_ns", lambda ns: format_duration(ns / 1e9)), "strategy": ("strategy", str),
         "mode": ("mode", str), "dirty_rate": ("dirty_rate", format_byte_rate),
         "working_set": ("working_set", format_size)}


def _slice(plan: SweepPlan, runs: Sequence[dict[str, Any]], vary: str,
           hold: Sequence[str] = ()) -> tuple[list[list[dict[str, Any]]], str]:
    """Runs grouped by ``vary``'s values, every other axis held at its first value.

    Taking a median across other axes (say, across latencies when plotting
    against memory) would mix populations and show a bar no experiment had;
    holding them fixed makes each panel a one-factor experiment, named in its label.
    """
    fixed = {axis: getattr(plan.axes, axis)[0] for axis in _AXES
             if axis != vary and axis not in hold}
    held = [run for run in _completed(runs)
            if all(_config(run).get(_AXES[axis][0]) == value for axis, value in fixed.items())]
    key = _AXES[vary][0]
    groups = [[run for run in held if _config(run).get(key) == value]
              for value in getattr(plan.axes, vary)]
    varying = [f"{axis.removesuffix('_ns')} {_AXES[axis][1](value)}" for axis, value in fixed.items()
               if len(getattr(plan.axes, axis)) > 1]
    return groups, ", ".join(varying)


DOWNTIME_AXES = ("latency", "memory", "mode", "dirty_rate", "working_set", "strategy", "gap_ns",
                 "jitter", "bandwidth")
AXIS_TITLES = {"latency": "one-way latency", "memory": "guest memory", "strategy": "strategy",
               "gap_ns": "extra gap", "jitter": "jitter", "bandwidth": "bandwidth cap",
               "mode": "mode", "dirty_rate": "guest dirty rate", "working_set": "working set"}


def downtime_figure(plan: SweepPlan, runs: Sequence[dict[str, Any]]) -> Any:
    """Downtime by phase: a panel for each axis the sweep varied (the others held at their
    first value), one bar of the single combination when none was."""
    panels = varied_axes(plan, DOWNTIME_AXES) or [None]
    figure = _figure(5.5 * len(panels) + (1.0 if len(panels) == 1 else 0), 4.8)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, vary in zip(axes, panels):
        if vary is None:
            done = _completed(runs)
            _stacked(ax, ["this sweep"], [done], "one combination (no axis varied)")
            _mark_failed(ax, [done])
            continue
        groups, held = _slice(plan, runs, vary)
        spell = _AXES[vary][1]
        _stacked(ax, [spell(v) for v in getattr(plan.axes, vary)], groups,
                 AXIS_TITLES[vary] + (f" (at {held})" if held else ""))
        _mark_failed(ax, groups)
        if vary == "strategy":
            ax.tick_params(axis="x", labelsize="small", labelrotation=10)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        axes[-1].legend(handles[::-1], labels[::-1], fontsize="small", title="phase",
                        loc="upper left", bbox_to_anchor=(1.01, 1))
    figure.suptitle(f"{plan.name}: downtime by phase")
    return figure


def _mark_failed(ax: Any, groups: Sequence[Sequence[dict[str, Any]]]) -> None:
    """Over each bar, in red, how many of its runs failed a verdict (nothing if none did)."""
    if any(run["outcome"] == "failed" for group in groups for run in group):
        ax.margins(y=0.08)          # room above the bars for the note
    for i, group in enumerate(groups):
        failed = sum(run["outcome"] == "failed" for run in group)
        if failed:
            top = sum(_phase_medians(group).values())
            ax.annotate(f"{failed}/{len(group)} failed a verdict", (i, top), ha="center",
                        va="bottom", color="red", fontsize="small",
                        xytext=(0, 2), textcoords="offset points")


#: The live-migration figure's panels: the guest's downtime against these axes, a line per mode.
LIVE_AXES = ("dirty_rate", "memory")


def _downtime_ms(run: dict[str, Any]) -> float | None:
    """The guest's downtime (the migration statistics' figure, source stop -> first report)."""
    value = (run.get("report", {}).get("migration") or {}).get("downtime_ns")
    return value / 1e6 if isinstance(value, int) else None


def live_figure(plan: SweepPlan, runs: Sequence[dict[str, Any]]) -> Any:
    """Downtime against the dirty rate and against the guest size, one line per mode (median
    of the repeats, every run a dot; the other axes held at their first value)."""
    figure = _figure(5.5 * len(LIVE_AXES) + 1.5, 4.8)
    axes = figure.subplots(1, len(LIVE_AXES), squeeze=False)[0]
    for ax, vary in zip(axes, LIVE_AXES):
        values = list(getattr(plan.axes, vary))
        xs = [v / (1 << 20) for v in values]
        for i, mode in enumerate(plan.axes.mode):
            groups, held = _slice(plan, [r for r in runs if _config(r)["mode"] == mode], vary,
                                  hold=("mode",))
            medians = []
            for x, group in zip(xs, groups):
                figures = [d for r in group if (d := _downtime_ms(r)) is not None]
                ax.scatter([x] * len(figures), figures, color=f"C{i}", s=14, alpha=0.5)
                medians.append(percentile(figures, 50) if figures else float("nan"))
            ax.plot(xs, medians, color=f"C{i}", marker="o", label=mode)
        unit = "MiB/s" if vary == "dirty_rate" else "MiB"
        ax.set_xlabel(f"{AXIS_TITLES[vary]}, {unit}" + (f" (at {held})" if held else ""))
        ax.set_ylabel("downtime, ms (source stop -> first report)")
        ax.grid(True, alpha=0.3)
    axes[-1].legend(title="mode", fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    figure.suptitle(f"{plan.name}: downtime by mode")
    return figure


def write_plots(plan: SweepPlan, runs: Sequence[dict[str, Any]], directory: Path) -> list[Path]:
    """Draw the figures as PNG and SVG into ``directory`` (the live one when the sweep varies
    the mode or the dirty rate); returns the paths, each PNG checked."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    figures = [(f"{plan.name}-accounting", accounting_figure(plan, runs)),
               (f"{plan.name}-downtime", downtime_figure(plan, runs))]
    if varied_axes(plan, ("mode", "dirty_rate")):
        figures.append((f"{plan.name}-live", live_figure(plan, runs)))
    for stem, figure in figures:
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

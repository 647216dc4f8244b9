"""What a sweep runs: its axes, every point (combination × repeat), and each point's stable key.

The key is what makes a sweep resumable: it is derived only from the point's
values in canonical spelling (``latency=5ms jitter=0ms bandwidth=unlimited
memory=2MiB gap=0ms strategy=best rep=1``), never from the order of the
options or of the values on the command line, so a rerun recognises the
points it already ran.

Values are parsed here once, before any namespace, process or VM exists,
with errors that name the option and the offending value.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from agentcore.options import (
    UsageError,
    format_duration,
    format_rate,
    format_size,
    parse_bandwidth,
    parse_byte_rate,
    parse_guest_memory,
    parse_size as parse_bytes,
    seconds,
)
from source_agent.netem import Link

T = TypeVar("T")

TOPOLOGIES = ("loopback", "netns", "remote")
INJECTORS = ("auto", "relay", "tc")

#: The default guest: one 2 MiB page (guest sizes are checked by agentcore's parse_guest_memory).
MEMORY_STEP = 2 << 20
#: One-way latency and gap above this are almost certainly a unit typo (``5s`` for ``5ms``),
#: and each would stall a point for minutes.
DURATION_MAX = 10.0
STRATEGY_PARTS = ("clock", "tsc", "runstate")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def injector_conflict(injector: str, topology: str) -> str | None:
    """Why ``injector`` cannot work on ``topology`` on any host, or None (the host's own lack of
    ``sch_netem`` is found by probing, in `injector.choose_injector`)."""
    if injector == "tc" and topology != "netns":
        return (f"--injector tc needs --topology netns: on {topology} it would shape an "
                "interface of the host")
    return None


class AxisError(ValueError):
    """A sweep option is malformed or out of range; the message names the option and the value."""


_BARE = re.compile(r"[0-9]*\.?[0-9]+")
_WITH_UNIT = re.compile(r"[0-9]*\.?[0-9]+\s*([A-Za-zµ]+(?:/s)?)")


def _split(option: str, text: str) -> list[str]:
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or any(not item for item in items):
        raise AxisError(f"{option}: empty value in {text!r} (expected a comma-separated list)")
    return items


def _shared_unit(items: list[str]) -> list[str]:
    """``0,1,5,20,100ms`` means ``0ms,1ms,...``: a unit on the last item only is the list's unit.

    Only when every other item is a bare number; a list that mixes bare and
    unit-carrying items otherwise (``1ms,5,20ms``) is left for the parser to
    refuse, naming the bare one.
    """
    last = _WITH_UNIT.fullmatch(items[-1])
    if last is None or not all(_BARE.fullmatch(item) for item in items[:-1]):
        return items
    return [item + last.group(1) for item in items[:-1]] + items[-1:]


def _axis(option: str, text: str, parse: Callable[[str], T]) -> tuple[T, ...]:
    """Parse every item; refuse duplicates, which would silently double a point's repeats."""
    values: list[T] = []
    for item in _shared_unit(_split(option, text)):
        value = parse(item)
        if value in values:
            raise AxisError(f"{option}: {item!r} repeats a value already given")
        values.append(value)
    return tuple(values)


def _item(option: str, parse: Callable[[str], T]) -> Callable[[str], T]:
    """One axis item through agentcore's grammar, its error as an AxisError naming the option."""
    def parse_item(item: str) -> T:
        try:
            return parse(item)
        except UsageError as exc:
            raise AxisError(f"{option}: {exc}") from None
    return parse_item


def _duration(option: str) -> Callable[[str], float]:
    in_seconds = _item(option, seconds)

    def parse(item: str) -> float:
        value = in_seconds(item)
        if value > DURATION_MAX:
            raise AxisError(f"{option}: {item!r} is over {DURATION_MAX:g}s (a unit typo?)")
        return value
    return parse


def parse_durations(option: str, text: str) -> tuple[float, ...]:
    """``"0,1,5ms"`` -> seconds (0, 0.001, 0.005); ``"1,5"`` is refused (``'1' has no unit``)."""
    return _axis(option, text, _duration(option))


def parse_rates(option: str, text: str) -> tuple[float | None, ...]:
    """``"unlimited,100mbit"`` -> (None, 12.5e6) bytes per second (tc's units; ``bps`` is bytes)."""
    return _axis(option, text, _item(option, parse_bandwidth))


def parse_size(option: str, item: str) -> int:
    """``"16MiB"`` -> bytes: a guest size, whole 2 MiB pages up to 1 GiB (agentcore's grammar)."""
    return _item(option, parse_guest_memory)(item)


def parse_sizes(option: str, text: str) -> tuple[int, ...]:
    return _axis(option, text, lambda item: parse_size(option, item))


def parse_byte_rates(option: str, text: str) -> tuple[int, ...]:
    """``"0,10,50MiB/s"`` -> bytes per second (a guest's dirtying rate; 0 is none)."""
    return _axis(option, text, _item(option, parse_byte_rate))


def parse_byte_sizes(option: str, text: str) -> tuple[int, ...]:
    """``"4,8MiB"`` -> bytes (a working set; agentcore's size grammar)."""
    return _axis(option, text, _item(option, parse_bytes))


def parse_modes(option: str, text: str) -> tuple[str, ...]:
    from source_agent.stats import MODES

    def parse(item: str) -> str:
        if item not in MODES:
            raise AxisError(f"{option}: {item!r}: choose one of {', '.join(MODES)}")
        return item
    return _axis(option, text, parse)


def format_byte_rate(rate: int) -> str:
    return f"{format_size(rate)}/s" if rate else "0"


def parse_strategy(option: str, text: str) -> str:
    """``best`` or overrides of the host's best, ``clock=plain,tsc=none``, in canonical part order.

    Canonical so that ``tsc=none,clock=plain`` is the same point as
    ``clock=plain,tsc=none``; checked against kvmcore's choices now, so a typo
    fails before the sweep starts rather than at its first point.
    """
    from kvmcore.strategy import CHOICES as choices
    if text.strip() == "best":
        return "best"
    parts: dict[str, str] = {}
    for item in _split(option, text):
        part, sep, value = item.partition("=")
        if not sep or part not in choices:
            raise AxisError(f"{option}: {item!r} is not PART=VALUE with PART one of "
                            f"{', '.join(STRATEGY_PARTS)} (or use 'best')")
        if value not in choices[part]:
            raise AxisError(f"{option}: {part}={value!r}: choose one of {', '.join(choices[part])}")
        if part in parts:
            raise AxisError(f"{option}: {part} given twice in {text!r}")
        parts[part] = value
    return ",".join(f"{part}={parts[part]}" for part in STRATEGY_PARTS if part in parts)


def format_bandwidth(rate: float | None) -> str:
    return "unlimited" if rate is None else format_rate(rate)


#: The live-migration axes and their defaults: a point at the default leaves them out of its
#: key and a sweep out of its stored axes, so sweeps recorded before these axes resume as they
#: were.
LIVE_DEFAULTS = {"mode": "stop-copy", "dirty_rate": 0, "working_set": 0}


@dataclass(frozen=True)
class PointConfig:
    """One migration of the sweep: the network and guest it runs with, and which repeat it is.

    ``latency`` and ``jitter`` are one-way, in seconds (so the RTT is about
    twice the latency); ``bandwidth`` is bytes per second or None (unlimited);
    ``strategy`` is ``best`` or overrides in `parse_strategy`'s canonical form;
    ``mode`` stop-copy or precopy, with the guest dirtying ``dirty_rate`` bytes/s over
    ``working_set`` bytes.
    """

    latency: float
    jitter: float
    bandwidth: float | None
    memory_size: int
    gap_ns: int
    strategy: str
    repeat: int
    mode: str = "stop-copy"
    dirty_rate: int = 0
    working_set: int = 0

    def parts(self) -> list[tuple[str, str]]:
        """(axis, value as spelled) for every axis, in key order."""
        return [("latency", format_duration(self.latency)),
                ("jitter", format_duration(self.jitter)),
                ("bandwidth", format_bandwidth(self.bandwidth)),
                ("memory", format_size(self.memory_size)),
                ("gap", format_duration(self.gap_ns / 1e9)), ("strategy", self.strategy),
                ("mode", self.mode), ("dirty_rate", format_byte_rate(self.dirty_rate)),
                ("working_set", format_size(self.working_set) if self.working_set else "0")]

    @property
    def combination(self) -> str:
        """The key shared by every repeat of this combination (what the summary groups by)."""
        return " ".join(f"{axis}={text}" for axis, text in self.parts()
                        if axis not in LIVE_DEFAULTS or getattr(self, axis) != LIVE_DEFAULTS[axis])

    @property
    def key(self) -> str:
        """Stable across reruns: the combination plus the repeat index."""
        return f"{self.combination} rep={self.repeat}"

    @property
    def link(self) -> Link:
        """What each direction of the path does (both directions alike)."""
        return Link(self.latency, self.jitter, self.bandwidth)

    def to_plain(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Axes:
    """The values of every axis, in the order given (plots and tables keep that order)."""

    latency: tuple[float, ...] = (0.0,)
    jitter: tuple[float, ...] = (0.0,)
    bandwidth: tuple[float | None, ...] = (None,)
    memory: tuple[int, ...] = (MEMORY_STEP,)
    gap_ns: tuple[int, ...] = (0,)
    strategy: tuple[str, ...] = ("best",)
    mode: tuple[str, ...] = ("stop-copy",)
    dirty_rate: tuple[int, ...] = (0,)
    working_set: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        # The relay and netem never send a byte before it arrived: a jitter above the latency
        # would be clamped at 0, so the point's delays would not be the ones asked for.
        if self.latency and self.jitter and max(self.jitter) > min(self.latency):
            raise AxisError(f"--jitter {format_duration(max(self.jitter))} is more than --latency "
                            f"{format_duration(min(self.latency))}: jitter is ± around the latency "
                            "and a delay cannot go below 0, so every jitter must be at most every "
                            "latency")
        from kvmcore import GuestConfig, StateError     # kvmcore's one rule for the guest

        for memory, rate, working_set in itertools.product(self.memory, self.dirty_rate,
                                                           self.working_set):
            try:
                GuestConfig(memory, dirty_rate=rate, working_set=working_set)
            except StateError as exc:
                raise AxisError(f"--{exc.field.replace('_', '-')}: {exc.reason} (at --memory "
                                f"{format_size(memory)}, --dirty-rate "
                                f"{format_byte_rate(rate)}, --working-set "
                                f"{format_size(working_set)})") from None

    def combinations(self) -> Iterable[tuple[Any, ...]]:
        return itertools.product(self.latency, self.jitter, self.bandwidth, self.memory,
                                 self.gap_ns, self.strategy, self.mode, self.dirty_rate,
                                 self.working_set)

    def describe(self) -> dict[str, list[str]]:
        """Canonical spellings, as stored with the sweep and compared on a rerun (the live
        axes only where they leave their default)."""
        described = {
            "latency": [format_duration(v) for v in self.latency],
            "jitter": [format_duration(v) for v in self.jitter],
            "bandwidth": [format_bandwidth(v) for v in self.bandwidth],
            "memory": [format_size(v) for v in self.memory],
            "gap": [format_duration(v / 1e9) for v in self.gap_ns],
            "strategy": list(self.strategy),
            "mode": list(self.mode),
            "dirty_rate": [format_byte_rate(v) for v in self.dirty_rate],
            "working_set": [format_size(v) if v else "0" for v in self.working_set],
        }
        for axis, default in LIVE_DEFAULTS.items():
            if getattr(self, axis) == (default,):
                del described[axis]
        return described


@dataclass(frozen=True)
class SweepPlan:
    """A named sweep: its axes, how often each combination repeats, and where it runs."""

    name: str
    axes: Axes
    repeat: int
    topology: str = "loopback"
    destination: str | None = None  # HOST:PORT for remote
    injector: str = "auto"

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise AxisError(f"sweep name {self.name!r}: use 1-64 letters, digits, '_', '.', '-' "
                            "(it names files)")
        if not 1 <= self.repeat <= 1000:
            raise AxisError(f"--repeat: {self.repeat} is not between 1 and 1000")
        if self.topology not in TOPOLOGIES:
            raise AxisError(f"--topology: {self.topology!r}: choose one of {', '.join(TOPOLOGIES)}")
        if (self.topology == "remote") != (self.destination is not None):
            raise AxisError("--to HOST:PORT is required with --topology remote, and only there")
        if self.injector not in INJECTORS:
            raise AxisError(f"--injector: {self.injector!r}: choose one of {', '.join(INJECTORS)}")
        conflict = injector_conflict(self.injector, self.topology)
        if conflict:
            raise AxisError(conflict)

    def points(self) -> list[PointConfig]:
        """Every point, repeat-major: all combinations once, then all again.

        Interleaving repeats spreads slow drifts of the machine (load from other
        jobs, thermal) over every combination instead of biasing whichever
        combination happened to run during them.
        """
        return [PointConfig(latency, jitter, bandwidth, memory, gap, strategy, repeat, mode,
                            dirty_rate, working_set)
                for repeat in range(self.repeat)
                for (latency, jitter, bandwidth, memory, gap, strategy, mode, dirty_rate,
                     working_set) in self.axes.combinations()]

    @property
    def combination_count(self) -> int:
        return math.prod(len(values) for values in dataclasses.astuple(self.axes))

    def label(self, point: PointConfig) -> str:
        """The combination spelled with only the axes this sweep varies (for tables, KTAP, progress).

        The full key stays the identity in the store; the label is what a
        reader needs to tell this sweep's points apart.
        """
        varying = {axis for axis, values in self.axes.describe().items() if len(values) > 1}
        return " ".join(f"{axis}={text}" for axis, text in point.parts()
                        if axis in (varying or {"latency"}))

    def config(self) -> dict[str, Any]:
        """What must match on a rerun under the same name (``--repeat`` may change: see docs)."""
        return {"axes": self.axes.describe(), "topology": self.topology,
                "destination": self.destination}


def config_mismatch(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Human lines naming each difference between a stored sweep config and this run's."""
    lines = []
    for field in ("topology", "destination"):
        if stored.get(field) != wanted.get(field):
            lines.append(f"{field}: stored {stored.get(field)!r}, now {wanted.get(field)!r}")
    stored_axes, wanted_axes = stored.get("axes", {}), wanted.get("axes", {})
    for axis in sorted(set(stored_axes) | set(wanted_axes)):
        if stored_axes.get(axis) != wanted_axes.get(axis):
            lines.append(f"--{axis.replace('_', '-')}: stored {','.join(stored_axes.get(axis, []))}, "
                         f"now {','.join(wanted_axes.get(axis, []))}")
    return lines


def strategies(option: str, values: Sequence[str]) -> tuple[str, ...]:
    """The ``--strategy`` axis: the option is repeated (a strategy itself contains commas)."""
    parsed: list[str] = []
    for text in values:
        value = parse_strategy(option, text)
        if value in parsed:
            raise AxisError(f"{option}: {text!r} repeats a strategy already given")
        parsed.append(value)
    return tuple(parsed) or ("best",)

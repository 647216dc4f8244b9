"""Strategy: how restore() rebuilds each part of the guest's time, and what each choice needs.

Parts and choices:

- clock: ``guest``    KVM_SET_CLOCK_GUEST with the source's pvclock (kvmclock as a
                      function of guest TSC; the unmerged series);
         ``realtime`` KVM_SET_CLOCK with KVM_CLOCK_REALTIME: KVM advances the kvmclock by
                      the CLOCK_REALTIME elapsed since the source's KVM_GET_CLOCK;
         ``realtime-synced`` the same, with the source's realtime first translated into
                      the destination's timescale by the measured clock-sync offset
                      (``VmState.clock_sync``, dst - src): the hosts' clock difference
                      stays out of the kvmclock;
         ``plain``    KVM_SET_CLOCK without it, as QEMU does: the gap is hidden;
         ``none``     the new VM's own kvmclock (starts near 0: goes backwards).
- tsc:   ``offset``   devices/vcpu.rst's KVM_VCPU_TSC_OFFSET algorithm: the guest TSC
                      advances with the kvmclock as restored;
         ``adjust``   the seed's MSR_IA32_TSC_ADJUST (a host-initiated write only stores the
                      MSR, it does not move the TSC: kept to show exactly that);
         ``none``     the new vCPU's TSC as KVM sets it.
- runstate: ``kernel`` Xen RUNSTATE_DATA restored with the state forced to runnable (as
                      the seed): KVM accounts the gap as runnable at the first vcpu_load;
            ``off``   not restored (always, for a guest without Xen).

`REQUIREMENTS` is the one table of what a choice needs from a host and from a
captured state. `Strategy.best`, `check_host`, `check`, `resolve` (both command
lines' overrides) and the tests' skips all read it, so a new choice is one entry
here and one branch in restore().
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._kvm import lib
from .errors import StateError, StrategyError, Unsupported

if TYPE_CHECKING:
    from .caps import HostCapabilities
    from .guest import GuestConfig
    from .state import VmState

PARTS = ("clock", "tsc", "runstate")
#: Each part's choices, most faithful first: `best` takes the first one the host can do.
CHOICES: dict[str, tuple[str, ...]] = {
    # realtime-synced after realtime: it needs what realtime does and a clock-sync estimate
    # besides, so `best` (which checks the host only, before any clock sync) keeps realtime.
    "clock": ("guest", "realtime", "realtime-synced", "plain", "none"),
    "tsc": ("offset", "adjust", "none"),
    "runstate": ("kernel", "off"),
}
#: Choices `best` never picks: kept to show what they do wrong, asked for by name only.
NOT_BEST = frozenset({("clock", "none"), ("tsc", "adjust")})


@dataclass(frozen=True)
class Requirement:
    """What one choice needs: a host capability, and a field of the captured state."""

    #: The capability, in the words after "unsupported on this host: ".
    capability: Callable[[HostCapabilities], str]
    host: Callable[[HostCapabilities], bool]
    #: The VmState field it reads, whether the state has it, and why it is needed.
    state_field: str
    state: Callable[[VmState], bool]
    state_reason: str


def _offset_applies(caps: HostCapabilities) -> str:
    return f"KVM_VCPU_TSC_OFFSET applied to the guest TSC ({caps.tsc_offset_detail})"


def _has_set_clock_realtime(caps: HostCapabilities) -> bool:
    return "REALTIME" in caps.adjust_clock_flags


def _captured_realtime(state: VmState) -> bool:
    return bool(state.clock["flags"] & lib.KVM_CLOCK_REALTIME)


REQUIREMENTS: dict[tuple[str, str], Requirement] = {
    ("clock", "guest"): Requirement(
        lambda caps: "KVM_SET_CLOCK_GUEST", lambda caps: bool(caps.clock_guest),
        "clock_guest", lambda s: s.clock_guest is not None,
        "clock=guest needs the source's KVM_GET_CLOCK_GUEST record; the state has none"),
    ("clock", "realtime"): Requirement(
        lambda caps: "KVM_CLOCK_REALTIME in KVM_SET_CLOCK", _has_set_clock_realtime,
        "clock.flags", _captured_realtime,
        "clock=realtime needs the source's KVM_GET_CLOCK realtime (KVM_CLOCK_REALTIME not set)"),
    ("clock", "realtime-synced"): Requirement(
        lambda caps: "KVM_CLOCK_REALTIME in KVM_SET_CLOCK", _has_set_clock_realtime,
        "clock_sync", lambda s: (_captured_realtime(s) and s.clock_sync is not None
                                 and s.synced_realtime_ns is not None),
        "clock=realtime-synced needs the source's KVM_GET_CLOCK realtime and its clock-sync "
        "estimate of the destination's clock (clock_sync), the translated realtime within u64"),
    ("tsc", "offset"): Requirement(
        _offset_applies, lambda caps: caps.tsc_offset_attr and caps.tsc_offset_applies,
        "tsc_offset",
        lambda s: s.tsc_offset is not None and bool(s.clock["flags"] & lib.KVM_CLOCK_HOST_TSC),
        "tsc=offset needs the source's TSC offset and KVM_GET_CLOCK host_tsc"),
    ("tsc", "adjust"): Requirement(
        lambda caps: "MSR_IA32_TSC_ADJUST", lambda caps: caps.tsc_adjust_msr,
        "msrs.MSR_IA32_TSC_ADJUST", lambda s: "MSR_IA32_TSC_ADJUST" in s.msrs,
        "tsc=adjust needs it; missing"),
    ("runstate", "kernel"): Requirement(
        lambda caps: "KVM_CAP_XEN_HVM SHARED_INFO|RUNSTATE", lambda caps: caps.xen_runstate,
        "runstate", lambda s: s.runstate is not None,
        "runstate=kernel needs a Xen-configured guest"),
}
#: How far apart (kHz) KVM_SET_CLOCK_GUEST lets the record's TSC rate and the vCPU's be
#: (kernel-facts.md; the series' rule, tools/clock_guest's patch): beyond it, ERANGE.
CLOCK_GUEST_KHZ_TOLERANCE = 1
#: A Xen-configured guest needs a Xen host whatever its runstate choice.
XEN_GUEST = REQUIREMENTS["runstate", "kernel"]


@dataclass(frozen=True)
class Strategy:
    """How restore() rebuilds each part of the guest's time (module docstring)."""

    clock: str = "realtime"
    tsc: str = "offset"
    runstate: str = "off"

    def __post_init__(self) -> None:
        for part in PARTS:
            if getattr(self, part) not in CHOICES[part]:
                raise StrategyError(f"strategy {part}={getattr(self, part)!r}: choose one of "
                                    f"{', '.join(CHOICES[part])}")

    def __str__(self) -> str:
        return ",".join(f"{part}={getattr(self, part)}" for part in PARTS)

    def choices(self) -> list[tuple[str, str]]:
        return [(part, getattr(self, part)) for part in PARTS]

    @classmethod
    def parse(cls, text: str, base: Strategy | None = None) -> Strategy:
        """``"clock=realtime,tsc=offset,runstate=off"``; parts left out come from ``base``."""
        parts = dataclasses.asdict(base or cls())
        given: set[str] = set()
        for item in filter(None, (s.strip() for s in text.split(","))):
            key, sep, value = item.partition("=")
            if not sep or key not in parts:
                raise StrategyError(f"strategy item {item!r}: expected clock=, tsc= or "
                                    "runstate=")
            if key in given:
                raise StrategyError(f"strategy {text!r}: {key}= given twice")
            given.add(key)
            parts[key] = value
        return cls(**parts)

    @classmethod
    def parse_exact(cls, text: str) -> Strategy:
        """Only the canonical form ``str()`` writes, all three parts in order (the wire's)."""
        strategy = cls.parse(text)
        if str(strategy) != text:
            raise StrategyError(f"strategy {text!r}: expected exactly "
                                "'clock=CLOCK,tsc=TSC,runstate=RUNSTATE'")
        return strategy

    @classmethod
    def best(cls, caps: HostCapabilities, state: VmState | None = None) -> Strategy:
        """The most faithful strategy this host supports (for ``state``, if given)."""
        return cls._best_on((caps,), state)

    @classmethod
    def best_common(cls, *hosts: HostCapabilities) -> Strategy:
        """The most faithful strategy every one of ``hosts`` supports: between a source and a
        destination that differ (a kernel without Xen and one with it), each part is the
        first choice both can do."""
        return cls._best_on(hosts)

    @classmethod
    def _best_on(cls, hosts: tuple[HostCapabilities, ...],
                 state: VmState | None = None) -> Strategy:
        def usable(part: str, choice: str) -> bool:
            need = REQUIREMENTS.get((part, choice))
            return (part, choice) not in NOT_BEST and (need is None or (
                all(need.host(caps) for caps in hosts)
                and (state is None or need.state(state))))
        return cls(**{part: next(c for c in CHOICES[part] if usable(part, c))
                      for part in PARTS})

    @classmethod
    def resolve(cls, overrides: str, caps: HostCapabilities,
                *others: HostCapabilities) -> Strategy:
        """The host's best with ``overrides`` (``"clock=plain"``, ``""`` or ``"best"``) laid
        over it, checked against the host: what a command line asks for, refused
        (Unsupported) before any VM or connection exists. With ``others`` (a destination's
        HELLO capabilities), the best all of them support instead, checked against each,
        ``caps`` first: the parts the options leave open are negotiated, the parts they give
        are refused where a host lacks them."""
        best = cls.best_common(caps, *others)
        strategy = best if overrides in ("", "best") else cls.parse(overrides, best)
        for host in (caps, *others):
            strategy.check_host(host)
        return strategy

    def guest_config(self, memory_size: int) -> GuestConfig:
        """The guest this strategy migrates: Xen-configured iff runstate=kernel. The one
        home of that rule, for the source creating its guest and the destination preparing
        a VM at PREPARE (before any state says whether it is Xen)."""
        from .guest import GuestConfig

        return GuestConfig(memory_size=memory_size, xen=self.runstate == "kernel")

    def missing(self, caps: HostCapabilities) -> list[str]:
        """The capabilities this host lacks for this strategy (empty: it can do it)."""
        return [need.capability(caps) for choice in self.choices()
                if (need := REQUIREMENTS.get(choice)) is not None and not need.host(caps)]

    def check_host(self, caps: HostCapabilities) -> None:
        """Raise Unsupported for a part this host cannot do, whatever the state.

        What a source agent asks before it creates a guest or connects, and a destination
        at MIGRATE before it allocates memory, so that a strategy the host lacks fails
        first, with nothing to undo."""
        missing = self.missing(caps)
        if missing:
            raise Unsupported(missing[0])

    def check_pair(self, source: HostCapabilities, destination: HostCapabilities) -> None:
        """check_host(destination), and what only both hosts' figures decide: clock=guest's
        record must meet a vCPU at its own TSC rate (KVM_SET_CLOCK_GUEST is ERANGE beyond
        CLOCK_GUEST_KHZ_TOLERANCE) unless the destination scales it. A source asks this
        after HELLO, before any guest exists: Unsupported, naming the destination's lack."""
        self.check_host(destination)
        problem = self._rate_problem(source.tsc_khz, destination)
        if problem:
            raise Unsupported(problem)

    def _rate_problem(self, record_khz: int, caps: HostCapabilities) -> str | None:
        if (self.clock != "guest" or caps.tsc_control or not record_khz
                or abs(record_khz - caps.tsc_khz) <= CLOCK_GUEST_KHZ_TOLERANCE):
            return None
        return (f"KVM_SET_CLOCK_GUEST at the source's TSC rate: {record_khz} kHz against "
                f"this host's {caps.tsc_khz} kHz, more than {CLOCK_GUEST_KHZ_TOLERANCE} kHz "
                "apart (ERANGE), and no KVM_CAP_TSC_CONTROL to scale it")

    def check(self, caps: HostCapabilities, state: VmState) -> RestorePlan:
        """The plan restore() carries out, once this host and ``state`` allow it: Unsupported
        (host) or StateError (state) otherwise. A destination calls this at MIGRATE, before
        it allocates or receives any guest memory, and restore() trusts the result."""
        self.check_host(caps)
        if state.runstate is not None and not XEN_GUEST.host(caps):
            raise Unsupported(XEN_GUEST.capability(caps))
        for choice in self.choices():
            need = REQUIREMENTS.get(choice)
            if need is not None and not need.state(state):
                raise StateError(need.state_field, need.state_reason)
        # The TSC rate: carried where the rates differ and this host can scale
        # (KVM_CAP_TSC_CONTROL, KVM_SET_TSC_KHZ); else the analysis names the ppm not carried.
        scale = (state.tsc_khz if caps.tsc_control and state.tsc_khz
                 and state.tsc_khz != caps.tsc_khz else None)
        problem = self._rate_problem(state.tsc_khz, caps)
        if problem:
            raise Unsupported(problem)
        return RestorePlan(self, state, scale)


@dataclass(frozen=True)
class RestorePlan:
    """A strategy checked against this host and a captured state (made by Strategy.check
    only): what restore() carries out, with nothing left to check."""

    strategy: Strategy
    state: VmState
    #: KVM_SET_TSC_KHZ to the source's rate (None: the rates agree or this host cannot scale).
    tsc_khz: int | None = None

"""The heterogeneous pair: this machine's own kernel (its KVM as it is: here PVM, no Xen, a TSC
offset that is not applied) as one host, one lane machine (Debian 6.12, KVM Xen, nested SVM) as
the other, both directions on one boot.

The lane machine gets QEMU's user-mode network (slirp) beside its control port: a host port is
forwarded to its dest-agent (`hostfwd=tcp:127.0.0.1:PORT-10.0.2.15:7400`), and its source-agent
reaches this machine's dest-agent at 10.0.2.2, which slirp maps to the host's 127.0.0.1. No
privileges, nothing on the host's own interfaces.

Before any VM exists, both sides' capabilities (`kvmcore probe --json`) give the best strategy
both support (`Strategy.best_common`); a scenario that names no strategy part gets it, one that
asks for a part a side lacks is refused by the agents themselves, naming the side and the
capability (the source: "unsupported on this host"; the destination, from its HELLO:
"unsupported on the destination host").
"""
from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import xen_lane
from kvmcore import HostCapabilities, Strategy

from . import guest_agent, timeref
from .machine import Machine, PairError
from .run import (DEST_PORT, Outcome, Pair, PairOptions, booted_at_most_twice, free_port,
                  inject_oops, pair_run, prepare, progress, write_key)
from .scenario import Scenario

#: The lane machine's address on its user-mode network, and the host as it sees it.
LANE_ADDRESS, HOST_FROM_LANE = "10.0.2.15", "10.0.2.2"
DIRECTIONS = ("host-to-lane", "lane-to-host")


def uplink_args(forwarded_port: int) -> list[str]:
    """slirp with a host port forwarded to the lane machine's dest-agent (no iPXE ROM)."""
    return ["-netdev", f"user,id=uplink,net=10.0.2.0/24,"
                       f"hostfwd=tcp:127.0.0.1:{forwarded_port}-{LANE_ADDRESS}:{DEST_PORT}",
            "-device", "virtio-net-pci,netdev=uplink,mac=52:54:00:12:00:10,romfile="]


class LocalHost(Machine):
    """This machine as a pair host: the agent's requests served here by the same code the
    machines run (guest_agent.handle), its clock the reference itself (offset 0 exactly), and
    never stepped (it is not ours to set)."""

    def __init__(self, results: Path) -> None:
        super().__init__("host", -1, results)
        self.address = "127.0.0.1"
        self._children: list[subprocess.Popen] = []
        self._rdtsc = guest_agent.make_rdtsc()

    def call(self, request: dict[str, Any], deadline: float) -> dict[str, Any]:
        if request.get("op") == "settime":
            raise PairError("host: this machine's clock is the reference; it is never stepped "
                            "(the skew is set on the lane machine)")
        # The agents' HOME (their results database) under the results, not the user's.
        request = {**request, "env": {"HOME": str(self.results / "home"),
                                      **request.get("env", {})}}
        (self.results / "home").mkdir(parents=True, exist_ok=True)
        reply = guest_agent.handle(request, self._children, self._rdtsc)
        if "error" in reply:
            raise PairError(f"host: {request.get('op')} failed: {reply['error']}")
        return reply

    def reference(self, deadline: float, duration_s: float = 1.0) -> timeref.Reference:
        return timeref.Reference(0, 0, 1)

    def tsc_reference(self, deadline: float, khz: int) -> timeref.Reference:
        return timeref.Reference(0, 0, 1)

    def stop(self, timeout: float = 60) -> None:
        for child in self._children:
            child.terminate()
        for child in self._children:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()

    @property
    def console(self) -> str:
        return ""  # this machine's kernel is not the one under test for an oops


def capabilities(m: Machine, python: str, deadline: float) -> HostCapabilities:
    """A side's capability document, as its agents would send it in HELLO."""
    reply = m.run([python, "-P", "-m", "kvmcore", "probe", "--json"], deadline)
    if reply["rc"] != 0:
        raise PairError(f"{m.name}: kvmcore probe exited {reply['rc']}: {reply['stderr'][-300:]}")
    doc = json.loads(reply["stdout"])
    doc.pop("default_strategy", None)
    return HostCapabilities.from_plain(doc)


def negotiate(src: HostCapabilities, dst: HostCapabilities) -> dict[str, Any]:
    """Each side's best, and the best both support (what a scenario without a strategy gets)."""
    common = Strategy.best_common(src, dst)
    return {"source_best": str(Strategy.best(src)), "destination_best": str(Strategy.best(dst)),
            "common": str(common),
            "source_lacks": Strategy.best(dst).missing(src),
            "destination_lacks": Strategy.best(src).missing(dst)}


class HeteroPair(Pair):
    """One direction of the heterogeneous pair: the lane machine and this machine, in either
    role. The skew is set on the lane machine (this machine's clock is the reference)."""

    def __init__(self, src: Machine, dst: Machine, options: PairOptions, deadline: float,
                 direction: str, target: str, listen: str, negotiated: dict[str, Any]) -> None:
        super().__init__(src, dst, options, deadline, target, listen)
        self.direction, self.negotiated = direction, negotiated
        self.key = options.results / f"psk-{direction}"
        self.lane = src if isinstance(dst, LocalHost) else dst

    def apply(self, scenario: Scenario) -> None:
        """The skew on the lane machine, whose clock both directions share (so its state is
        the machine's, not this direction's): +skew as the destination, -skew as the source."""
        if scenario.netem():
            raise PairError("the heterogeneous pair has no netem (one side is this machine's "
                            "own loopback)")
        want = scenario.skew_ns if self.lane is self.dst else -scenario.skew_ns
        if want != self.lane.clock_target_ns:
            self._set_clock(self.lane, want)
            self.lane.clock_target_ns = want
        self.skew_ns = scenario.skew_ns

    def migrate_args(self, scenario: Scenario) -> tuple[str, ...]:
        """The negotiated strategy for the parts the scenario leaves out."""
        given = set(scenario.migrate_args)
        strategy = Strategy.parse(self.negotiated["common"])
        extra = [word for part, choice in strategy.choices() if f"--{part}" not in given
                 for word in (f"--{part}", choice)]
        return (*scenario.migrate_args, *extra)

    def scenario(self, scenario: Scenario) -> Outcome:
        outcome = super().scenario(scenario)
        outcome.direction, outcome.negotiated = self.direction, self.negotiated
        return outcome


def set_up_lane(lane: Machine, deadline: float) -> dict[str, Any]:
    """The lane machine's user-mode NIC (static: slirp's fixed addresses) and its clock."""
    nic = lane.sh("ls /sys/class/net | grep -v '^lo$' | head -n1", deadline).strip()
    if not nic:
        raise PairError("lane has no network interface (virtio_net not loaded?)")
    lane.nic = nic
    lane.sh(f"ip link set {nic} up && ip addr add {LANE_ADDRESS}/24 dev {nic} && "
            f"ip route add default via {HOST_FROM_LANE}", deadline)
    return {"lane_boot_offset_ms": lane.reference(deadline, 0.3).offset_ns / 1e6}


def directions_of(which: str) -> tuple[str, ...]:
    return DIRECTIONS if which == "both" else (which,)


def run_hetero(options: PairOptions, scenarios: Sequence[Scenario], which: str = "both",
               on_outcome: Callable[[Outcome], None] = lambda outcome: None,
               ) -> tuple[list[Outcome], dict[str, Any]]:
    """Boot one lane machine beside this machine, negotiate, run every scenario in each
    direction asked for; one retry on a kernel oops (the lane machine's)."""
    with pair_run(options) as run:
        host = LocalHost(options.results / "host")
        host.results.mkdir(parents=True, exist_ok=True)
        host_caps = capabilities(host, options.python, run.deadline)

        def machines() -> list[Machine]:
            lane = Machine("lane", 0, options.results / "lane")
            lane.results.mkdir(parents=True, exist_ok=True)
            prepare(lane, options.python, run.pycache)
            return [lane, host]

        def attempt_with(attempt: int, ms: Sequence[Machine]) -> None:
            lane, deadline = ms[0], run.deadline
            forwarded, host_port = free_port(), free_port()
            progress(f"booting the lane machine beside this one (attempt {attempt}/2)")
            qemu = xen_lane.qemu_command(run.kernel.image, run.initrd, lane.results)
            lane.start([*qemu, *uplink_args(forwarded)], deadline)
            run.facts.update(lane_ready_s=round(lane.wait_ready(deadline), 2), attempts=attempt,
                             lane_held_vm=lane.held_vm)
            run.facts.update(set_up_lane(lane, deadline))
            lane_caps = capabilities(lane, options.python, deadline)
            pairs = []
            for direction in directions_of(which):
                src, dst = (host, lane) if direction == "host-to-lane" else (lane, host)
                negotiated = (negotiate(host_caps, lane_caps) if src is host
                              else negotiate(lane_caps, host_caps))
                target, listen = ((f"127.0.0.1:{forwarded}", f"{LANE_ADDRESS}:{DEST_PORT}")
                                  if dst is lane else
                                  (f"{HOST_FROM_LANE}:{host_port}", f"127.0.0.1:{host_port}"))
                pair = HeteroPair(src, dst, options, deadline, direction, target, listen,
                                  negotiated)
                pair._set_clock(lane, 0)
                lane.clock_target_ns = 0
                write_key(pair.key)
                run.facts[f"{direction} dest_agent_start_s"] = pair.serve()
                run.facts[f"{direction} negotiated"] = negotiated
                progress(f"{direction}: strategy {negotiated['common']} (source's best "
                         f"{negotiated['source_best']}, destination's "
                         f"{negotiated['destination_best']})")
                pairs.append(pair)
            if options.inject_oops and attempt == 1:
                inject_oops(lane)
            for pair in pairs:
                for i, scenario in enumerate(scenarios, start=1):
                    progress(f"{pair.direction} scenario {i}/{len(scenarios)}: "
                             f"{scenario.label()}")
                    run.outcomes.append(pair.scenario(scenario))
                    on_outcome(run.outcomes[-1])

        booted_at_most_twice(run, machines, attempt_with)
        return run.outcomes, run.facts

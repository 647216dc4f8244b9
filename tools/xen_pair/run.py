"""Boot the pair, set it up, run scenarios on it, and keep everything on the host.

Order of work: both machines boot (dst --boot-gap after src, so its TSC lags src's by that much);
each gets its link address; both clocks are stepped onto the host's clock through the control
channel, then dst's by the scenario's skew, and both are measured again (the reference, recorded
in the report as `clock_reference`); dst serves `dest-agent serve` with a fresh key; src runs
`source-agent migrate --to dst`. Results: <results>/{src,dst}/console.log, scenarios.json.
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import xen_lane

from . import timeref
from .machine import Machine, PairError, host_tsc_khz, link_args
from .scenario import Scenario

AGENT = Path(__file__).resolve().parent / "guest_agent.py"
DEST_PORT = 7400
# How far a stepped clock may land from its target beyond the measurement's own bound: the step
# is computed from a probe bounded by its own uncertainty (a few hundred us seen).
STEP_TOLERANCE_NS = 2_000_000


@dataclasses.dataclass(frozen=True)
class PairOptions:
    python: str
    results: Path
    timeout: float = 600
    boot_gap_s: float = 0.0
    kernel: xen_lane.Kernel | None = None
    #: Testing the retry: on the first attempt, once the pair is set up, this machine ("src"
    #: or "dst") is killed and a fake oops line is written to its console (INJECTED_OOPS).
    inject_oops: str | None = None
    #: Load kvm/kvm-amd built with the project's KVM_[GS]ET_CLOCK_GUEST (tools/kvm_modules.py,
    #: as `./dev lane --clock-guest`): clock=guest becomes the machines' best.
    clock_guest: bool = False


#: What --inject-oops writes to a console: a line xen_lane.find_oops takes for an oops.
INJECTED_OOPS = "BUG: testbed --inject-oops: this kernel was killed on purpose"


@dataclasses.dataclass
class Outcome:
    """One scenario's result: the source's exit status and stdout, and the references."""

    scenario: Scenario
    status: int
    stdout: str
    stderr: str
    reference_before: dict[str, Any]
    reference_after: dict[str, Any]
    seconds: float
    #: Which way it went ("src->dst"; the heterogeneous pair: "host->lane", "lane->host")
    #: and, there, the strategy negotiated for it.
    direction: str = "src->dst"
    negotiated: dict[str, Any] | None = None

    def report(self) -> dict[str, Any] | None:
        """The source's JSON report, if it printed one."""
        try:
            return json.loads(self.stdout)
        except ValueError:
            return None

    def to_plain(self) -> dict[str, Any]:
        return {"scenario": dataclasses.asdict(self.scenario), "status": self.status,
                "stdout": self.stdout, "stderr": self.stderr, "seconds": round(self.seconds, 2),
                "reference_before": self.reference_before, "reference_after": self.reference_after,
                "direction": self.direction, "negotiated": self.negotiated}


def progress(message: str) -> None:
    print(f"[pair] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def warm_agents_bytecode(python: str, pycache: Path) -> None:
    """Compile the project and its virtualenv into the lane's pycache prefix on the host: the
    agents' start-up under TCG is dominated by compiling otherwise (the root is read-only)."""
    code = ("import sys, compileall, site; dirs = [*site.getsitepackages(), sys.argv[1]];"
            " [compileall.compile_dir(d, quiet=2, workers=1) for d in dirs]")
    env = {**os.environ, "PYTHONPYCACHEPREFIX": str(pycache)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    try:
        subprocess.run([python, "-c", code, str(xen_lane.REPO)], env=env, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300,
                       check=False)
    except (OSError, subprocess.TimeoutExpired) as e:  # costs start-up time only
        progress(f"warning: could not pre-compile on the host ({e}); the agents start slower")


def prepare(machine: Machine, python: str, pycache: Path) -> None:
    """The lane's per-machine files: results/<name>/lane/{path,tmp-binds,job.sh}."""
    scratch = machine.results / "lane"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    (scratch / "path").write_text(f"{machine.results}\n")
    (scratch / "tmp-binds").write_text("".join(
        f"{n}\n" for n in xen_lane.tmp_binds([xen_lane.REPO, python, machine.results])))
    env = xen_lane.lane_environment(os.environ, machine.results, pycache)
    env["KVM_TESTBED_LANE"] = "pair"
    env.pop("KVM_TESTBED_RUN_PAIR", None)  # never boot a pair from inside the pair
    (scratch / "job.sh").write_text(xen_lane.job_script([python, "-P", str(AGENT)], xen_lane.REPO, env))


class Pair:
    """A booted pair (use `boot_pair`); `scenario` runs one migration on it. `target` is the
    destination agent as src reaches it (default dst's link address), `listen` where it
    serves on dst (default the same)."""

    def __init__(self, src: Machine, dst: Machine, options: PairOptions, deadline: float,
                 target: str | None = None, listen: str | None = None) -> None:
        self.src, self.dst, self.options, self.deadline = src, dst, options, deadline
        self.target = target or f"{dst.address}:{DEST_PORT}"
        self.listen = listen or self.target
        self.skew_ns = 0
        self.netem: list[str] = []
        self.key = options.results / "psk"
        self.host_tsc_khz = host_tsc_khz()

    def setup(self) -> dict[str, Any]:
        """Addresses, clocks onto the host's, the key, dest-agent serve; returns measurements."""
        facts: dict[str, Any] = {}
        for m in (self.src, self.dst):
            nic = m.sh("ls /sys/class/net | grep -v '^lo$' | head -n1", self.deadline).strip()
            if not nic:
                raise PairError(f"{m.name} has no network interface (virtio_net not loaded?)")
            m.nic = nic
            m.sh(f"ip link set {nic} up && ip addr add {m.address}/24 dev {nic}", self.deadline)
            facts[f"{m.name}_boot_offset_ms"] = m.reference(self.deadline, 0.3).offset_ns / 1e6
            self._set_clock(m, 0)
        facts["ping_ms"] = self.ping()
        write_key(self.key)
        facts["dest_agent_start_s"] = self.serve()
        return facts

    def serve(self) -> float:
        """`dest-agent serve` on dst with the key; seconds until src can connect to it."""
        serve = [self.options.python, "-P", "-m", "dest_agent", "serve", "--listen",
                 self.listen, "--psk-file", str(self.key)]
        log = self.dst.results / "dest-agent.log"
        log.unlink(missing_ok=True)
        t = time.monotonic()
        pid = self.dst.call({"op": "spawn", "argv": serve, "log": str(log)}, self.deadline)["pid"]
        # Its own word first: a forwarded port (slirp's hostfwd) accepts a connection on the
        # host side before anything listens behind it, so a connect alone proves nothing.
        while "serving on" not in (log.read_text(errors="replace") if log.exists() else ""):
            rc = self.dst.call({"op": "poll", "pid": pid}, self.deadline)["rc"]
            if rc is not None or time.monotonic() > self.deadline:
                tail = log.read_text(errors="replace").strip().splitlines()[-3:] \
                    if log.exists() else []
                raise PairError(f"dest-agent on {self.dst.name} " + (
                    f"exited {rc}" if rc is not None else "did not serve before the deadline")
                    + f": {' | '.join(tail)}")
            time.sleep(0.2)
        self.wait_for_dest()
        return round(time.monotonic() - t, 2)

    def ping(self) -> float | None:
        """Round trip src -> dst over the link, best of 5 (ms); the link must carry packets."""
        for _ in range(3):  # the first packets may wait for ARP under TCG
            out = self.src.sh(f"busybox ping -c 5 -i 0.2 -W 2 {self.dst.address} || true",
                              self.deadline)
            times = [float(x) for x in re.findall(r"time=([\d.]+) ms", out)]
            if times:
                break
        else:
            raise PairError(f"src cannot ping dst at {self.dst.address} over the link: {out.strip()}")
        return min(times)

    def wait_for_dest(self) -> None:
        host, _, port = self.target.rpartition(":")
        probe = ("import socket,sys,time\nfor _ in range(600):\n try:\n  socket.create_connection("
                 f"('{host}',{port}),1).close(); sys.exit(0)\n"
                 " except OSError: time.sleep(0.2)\nsys.exit(1)")
        if self.src.run([self.options.python, "-c", probe], self.deadline)["rc"] != 0:
            log = self.dst.results / "dest-agent.log"
            tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
            raise PairError(f"dest-agent on {self.dst.name} never answered at {self.target} "
                            f"from {self.src.name}: {' | '.join(tail)}")

    def _set_clock(self, m: Machine, skew_ns: int) -> timeref.Reference:
        """Step m's CLOCK_REALTIME to host + skew_ns (two rounds: the first step is coarse)."""
        for _ in range(2):
            ref = m.reference(self.deadline, 0.3)
            m.step_clock(skew_ns - ref.offset_ns, self.deadline)
        ref = m.reference(self.deadline)
        if abs(ref.offset_ns - skew_ns) > ref.uncertainty_ns + STEP_TOLERANCE_NS:
            raise PairError(f"{m.name}'s clock is {ref.offset_ns / 1e6:+.3f} ms from the host's "
                            f"after stepping it to {skew_ns / 1e6:+.3f} ms")
        return ref

    def references(self) -> dict[str, Any]:
        src, dst = self.src.reference(self.deadline), self.dst.reference(self.deadline)
        return {"source": src.to_plain(), "destination": dst.to_plain(),
                "destination_minus_source": dst.minus(src).to_plain(),
                "skew_requested_ns": self.skew_ns,
                "mechanism": "each machine's CLOCK_REALTIME read over a virtio-serial port, "
                             "bracketed by the physical host's CLOCK_REALTIME (best of ~1 s)",
                "tsc": self.tsc_references()}

    def tsc_references(self) -> dict[str, Any]:
        """Each machine's TSC minus the physical host's, in ticks (and dst - src in ms at the
        host's rate): under TCG a machine's TSC is the host's less its value when that
        QEMU started, so a later boot shows as a TSC behind by the boot gap."""
        khz = self.host_tsc_khz
        src, dst = (m.tsc_reference(self.deadline, khz) for m in (self.src, self.dst))
        diff = dst.minus(src)

        def ticks(ref: timeref.Reference) -> dict[str, int]:
            return {"offset_ticks": ref.offset_ns, "uncertainty_ticks": ref.uncertainty_ns,
                    "probes": ref.probes}
        return {"source": ticks(src), "destination": ticks(dst),
                "destination_minus_source": ticks(diff), "host_tsc_khz": khz,
                "destination_minus_source_ns": diff.offset_ns * 1_000_000 // khz,
                "mechanism": "each machine's rdtsc read over the virtio-serial port, bracketed "
                             "by the physical host's rdtsc (ticks; best of ~0.3 s)"}

    def set_skew(self, skew_ns: int) -> None:
        """dst's clock minus src's := skew_ns (src stays on the host's clock)."""
        self._set_clock(self.dst, skew_ns)

    def migrate_args(self, scenario: Scenario) -> tuple[str, ...]:
        return scenario.migrate_args

    def apply(self, scenario: Scenario) -> None:
        if scenario.skew_ns != self.skew_ns:
            self.set_skew(scenario.skew_ns)
            self.skew_ns = scenario.skew_ns
        if scenario.netem() != self.netem:
            for m in (self.src, self.dst):
                change = ["qdisc", "replace", "dev", m.nic, "root", "netem", *scenario.netem()] \
                    if scenario.netem() else ["qdisc", "del", "dev", m.nic, "root"]
                m.sh("tc " + " ".join(change), self.deadline)
            self.netem = scenario.netem()

    def scenario(self, scenario: Scenario) -> Outcome:
        self.apply(scenario)
        before = self.references()
        argv = [self.options.python, "-P", "-m", "source_agent", "migrate",
                "--to", self.target, "--psk-file", str(self.key),
                "--topology", "pair", *self.migrate_args(scenario)]
        t = time.monotonic()
        reply = self.src.run(argv, self.deadline,
                             env={"KVM_TESTBED_CLOCK_REFERENCE": json.dumps(before)})
        seconds = time.monotonic() - t
        return Outcome(scenario, reply["rc"], reply["stdout"], reply["stderr"], before,
                       self.references(), seconds)


def write_key(path: Path) -> None:
    """A fresh 32-byte key, mode 600, for both agents."""
    path.write_text(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
    path.chmod(0o600)


def listening(port: int, proc_net_tcp: str) -> bool:
    """Whether /proc/net/tcp's text has a socket in LISTEN (0A) on 127.0.0.1:port. Read, not
    probed: QEMU's socket netdev takes the first connection as its peer."""
    want = f"0100007F:{port:04X}"
    return any(f[1] == want and f[3] == "0A" for f in
               (line.split() for line in proc_net_tcp.splitlines()[1:]) if len(f) > 3)


def wait_listening(port: int, deadline: float) -> None:
    while not listening(port, Path("/proc/net/tcp").read_text()):
        if time.monotonic() > deadline:
            raise PairError(f"src's QEMU never listened on 127.0.0.1:{port} for the link")
        time.sleep(0.05)


def boot_machines(machines: Sequence[Machine], options: PairOptions, kernel: xen_lane.Kernel,
                  initrd: Path, deadline: float) -> dict[str, Any]:
    """Start src, then (--boot-gap later) dst, on one fresh link; wait for both agents."""
    link = free_port()
    timings: dict[str, Any] = {}
    for m in machines:
        if m.index == 1 and options.boot_gap_s:
            progress(f"waiting {options.boot_gap_s:g} s before booting dst (--boot-gap)")
            time.sleep(options.boot_gap_s)
        qemu = xen_lane.qemu_command(kernel.image, initrd, m.results)
        m.start([*qemu, *link_args(m.index, link)], deadline)
        if m.index == 0:  # dst's QEMU connects once, at start: a refused connect leaves it unlinked
            wait_listening(link, deadline)
            timings["src_listening_s"] = round(time.monotonic() - (m.started_at or 0), 3)
    # Under TCG each machine's TSC counts from its QEMU's start of execution (after its set-up:
    # src's takes src_listening_s and more), so the TSC difference lies between the boot gap
    # and this.
    timings["qemu_start_gap_s"] = round(machines[1].started_at - machines[0].started_at, 3)
    for m in machines:
        timings[f"{m.name}_ready_s"] = round(m.wait_ready(deadline), 2)
        timings[f"{m.name}_held_vm"] = m.held_vm
        progress(f"{m.name} up: agent ready {timings[f'{m.name}_ready_s']} s after QEMU started")
    return timings


def pair_kernel(options: PairOptions) -> xen_lane.Kernel:
    """The lane's kernel (cached, fetched on first use), with the clock-guest modules if asked."""
    root = xen_lane.cache_root()
    kernel = options.kernel or xen_lane.cached_kernel(root) or xen_lane.fetch_debian_kernel(root)
    if options.clock_guest:
        import kvm_modules  # tools/, beside xen_lane
        kernel = kvm_modules.clock_guest_kernel(kernel, root, xen_lane)
    progress(f"kernel: {kernel.label}")
    return kernel


def inject_oops(machine: Machine) -> None:
    """--inject-oops: kill the machine, as a kernel that died would, and leave the line an
    oops leaves on its console (after QEMU exited, so its own writes cannot cover it)."""
    progress(f"--inject-oops: killing {machine.name} and writing an oops line to its console")
    machine.kill()
    with (machine.results / "console.log").open("a") as console:
        console.write(f"\n[   62.000000] {INJECTED_OOPS}\n")


def retry_after(attempt: int, machines: Sequence[Machine], error: Exception | None,
                facts: dict[str, Any]) -> bool:
    """After an attempt (its machines stopped): True to boot again, once, when a console
    shows a kernel oops -- whatever the error it surfaced as (a broken control socket, a torn
    reply, or none); else the attempt's error is raised, or nothing happens (it succeeded).
    The consoles of an oopsed attempt are kept as console-oops-N.log."""
    oops = next((o for m in machines if (o := xen_lane.find_oops(m.console))), None)
    if oops:
        facts[f"oops_{attempt}"] = oops
        if error is not None:
            facts[f"error_{attempt}"] = f"{type(error).__name__}: {error}"
        for m in machines:
            if (m.results / "console.log").exists():
                shutil.copy(m.results / "console.log", m.results / f"console-oops-{attempt}.log")
        if attempt == 1:
            progress(f"kernel oops on a machine, retrying once: {oops}")
            return True
        raise PairError(f"kernel oops/panic twice: {oops}")
    if error is not None:
        raise error
    return False


@dataclasses.dataclass
class PairRun:
    """What every run of the pair (or the heterogeneous pair) shares: the deadline, the kernel
    and its initramfs, the agents' bytecode; the outcomes and facts it writes out at the end."""

    options: PairOptions
    t0: float
    deadline: float
    kernel: xen_lane.Kernel
    initrd: Path
    pycache: Path
    facts: dict[str, Any] = dataclasses.field(default_factory=dict)
    outcomes: list[Outcome] = dataclasses.field(default_factory=list)


@contextlib.contextmanager
def pair_run(options: PairOptions) -> Iterator[PairRun]:
    """Set a run up; on the way out (however it ends) scenarios.json and timings.json."""
    t0 = time.monotonic()
    kernel = pair_kernel(options)
    options.results.mkdir(parents=True, exist_ok=True)
    initrd = options.results / "initrd.cpio"
    xen_lane.build_initramfs(kernel, initrd, Path("/bin/busybox"))
    pycache = xen_lane.cache_root() / "pycache"
    progress("compiling the agents' bytecode on the host")
    warm_agents_bytecode(options.python, pycache)
    run = PairRun(options, t0, t0 + options.timeout, kernel, initrd, pycache)
    try:
        yield run
    finally:
        run.facts["total_s"] = round(time.monotonic() - t0, 2)
        (options.results / "scenarios.json").write_text(
            json.dumps([o.to_plain() for o in run.outcomes], indent=1) + "\n")
        (options.results / "timings.json").write_text(json.dumps(run.facts, indent=1) + "\n")
        initrd.unlink(missing_ok=True)


def booted_at_most_twice(run: PairRun, machines_for: Callable[[], Sequence[Machine]],
                         attempt_with: Callable[[int, Sequence[Machine]], None]) -> None:
    """`attempt_with(attempt, machines)` on fresh machines; once more if a console shows a
    kernel oops (retry_after). The machines are stopped after each attempt."""
    for attempt in (1, 2):
        machines = machines_for()
        run.outcomes = []
        error: Exception | None = None
        try:
            attempt_with(attempt, machines)
        except (xen_lane.LaneError, OSError, ValueError) as e:
            # A machine whose kernel died mid-scenario shows up as a broken control socket
            # (OSError) or a torn reply (ValueError): the consoles decide whether that was an
            # oops, worth one retry, or a failure to report.
            error = e
        finally:
            for m in machines:
                m.stop()
        if not retry_after(attempt, machines, error, run.facts):
            return


def run_pair(options: PairOptions, scenarios: Sequence[Scenario],
             on_outcome: Callable[[Outcome], None] = lambda outcome: None,
             session: Callable[[Pair], list[Outcome]] | None = None,
             ) -> tuple[list[Outcome], dict[str, Any]]:
    """Boot the pair, run the scenarios in order (or `session` on the set-up pair: the skew
    sweep), stop it; one retry on a kernel oops."""
    with pair_run(options) as run:
        def machines() -> list[Machine]:
            ms = [Machine(n, i, options.results / n) for i, n in enumerate(("src", "dst"))]
            for m in ms:
                m.results.mkdir(parents=True, exist_ok=True)
                prepare(m, options.python, run.pycache)
            return ms

        def attempt_with(attempt: int, ms: Sequence[Machine]) -> None:
            progress(f"booting src and dst (attempt {attempt}/2)")
            run.facts.update(boot_machines(ms, options, run.kernel, run.initrd, run.deadline),
                             attempts=attempt)
            pair = Pair(ms[0], ms[1], options, run.deadline)
            run.facts.update(pair.setup())
            progress(f"pair ready after {time.monotonic() - run.t0:.1f} s: ping "
                     f"{run.facts['ping_ms']} ms, dest-agent up in "
                     f"{run.facts['dest_agent_start_s']} s")
            if options.inject_oops and attempt == 1:
                inject_oops(next(m for m in ms if m.name == options.inject_oops))
            if session is not None:
                run.outcomes.extend(session(pair))
            for i, scenario in enumerate(scenarios, start=1):
                progress(f"scenario {i}/{len(scenarios)}: {scenario.label()}")
                run.outcomes.append(pair.scenario(scenario))
                on_outcome(run.outcomes[-1])

        booted_at_most_twice(run, machines, attempt_with)
        return run.outcomes, run.facts

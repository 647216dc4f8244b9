"""VmState's wire form: round trip, and bad input refused before any VM exists."""

from __future__ import annotations

import copy

import msgpack
import pytest
from common_helpers import open_fds

from kvmcore import Guest, GuestConfig, GuestMemory, StateError, Strategy, VmState, capture, restore
from kvmcore import xen
from kvmcore.state import FORMAT_VERSION


@pytest.fixture(scope="module")
def captured():
    """A real capture: its plain form (through msgpack) and its memory bytes."""
    from kvmcore import System

    with System() as kvm, Guest.create(kvm, GuestConfig()) as g:
        g.run_until_snapshot()
        state = capture(g)
    wire = msgpack.packb(state.to_plain())
    image = g.memory.read(0, g.memory.size)
    g.memory.close()
    return wire, image


def fresh(captured):
    wire, image = captured
    plain = msgpack.unpackb(wire)
    memory = GuestMemory.allocate(len(image))
    memory.write(0, image)
    return plain, memory


def test_plain_form_is_msgpack_ready_and_round_trips(captured):
    plain, memory = fresh(captured)
    state = VmState.from_plain(plain)
    assert state.to_plain() == plain
    assert state.format_version == FORMAT_VERSION
    assert "memory" not in plain and plain["memory_size"] == memory.size
    assert all(isinstance(k, str) for k in plain)


def test_valid_state_restores_and_resumes(kvm, caps, captured):
    plain, memory = fresh(captured)
    state = VmState.from_plain(plain)
    with restore(kvm, Strategy.best(caps, state).check(caps, state), memory) as g:
        assert g.run_until_snapshot().sequence == plain["sequence"] + 1


def corrupt(plain, path, value=..., delete=False):
    """Set (or delete) a dotted path in a deep copy of ``plain``."""
    bad = copy.deepcopy(plain)
    *parents, last = path.split(".")
    node = bad
    for key in parents:
        node = node[key]
    if delete:
        del node[last]
    else:
        node[last] = value
    return bad


CASES = [
    ("wrong version", dict(path="format_version", value=FORMAT_VERSION + 1), "format_version"),
    ("version as bool", dict(path="format_version", value=True), "format_version"),
    ("missing field", dict(path="clock", delete=True), "state.clock"),
    ("missing nested field", dict(path="regs.rip", delete=True), "state.regs.rip"),
    ("extra field", dict(path="surprise", value=1), "state.surprise"),
    ("extra nested field", dict(path="clock.extra", value=1), "state.clock.extra"),
    ("wrong type", dict(path="tsc_khz", value="2.4GHz"), "state.tsc_khz"),
    ("bool for int", dict(path="sequence", value=False), "state.sequence"),
    ("out of range", dict(path="regs.rip", value=1 << 64), "state.regs.rip"),
    ("negative", dict(path="clock.clock", value=-1), "state.clock.clock"),
    ("segment byte too big", dict(path="sregs.cs.type", value=256), "state.sregs.cs.type"),
    ("truncated bytes", dict(path="fpu.xmm", value=[b"\0" * 15] * 16), "state.fpu.xmm[0]"),
    ("unknown MSR", dict(path="msrs.MSR_MADE_UP", value=0), "state.msrs.MSR_MADE_UP"),
    ("missing MSR", dict(path="msrs.MSR_KVM_SYSTEM_TIME_NEW", delete=True),
     "state.msrs.MSR_KVM_SYSTEM_TIME_NEW"),
    ("memory size beyond the guest maximum", dict(path="memory_size", value=2 << 30), "memory_size"),
    ("unaligned memory size", dict(path="memory_size", value=(2 << 20) + 4096),
     "memory_size"),
]


@pytest.mark.parametrize("what,change,field", CASES, ids=[c[0] for c in CASES])
def test_bad_state_is_refused_before_a_vm_exists(captured, what, change, field):
    plain, memory = fresh(captured)
    fds = open_fds()
    with pytest.raises(StateError) as info:
        VmState.from_plain(corrupt(plain, **change))
    assert info.value.field == field, str(info.value)
    assert field.split(".")[-1].split("[")[0] in str(info.value)
    assert open_fds() == fds   # no VM, no vCPU: nothing was opened


def test_truncated_plain_is_refused(captured):
    plain, memory = fresh(captured)
    truncated = dict(list(plain.items())[: len(plain) // 2])
    with pytest.raises(StateError, match="missing"):
        VmState.from_plain(truncated)
    with pytest.raises(StateError):
        VmState.from_plain([1, 2, 3])


def test_memory_of_another_size_is_refused_before_a_vm_exists(kvm, caps, captured):
    plain, memory = fresh(captured)
    state = VmState.from_plain(plain)
    plan = Strategy.best(caps, state).check(caps, state)
    fds = open_fds()
    with GuestMemory.allocate(4 << 20) as other:
        with pytest.raises(StateError, match="memory_size"):
            restore(kvm, plan, other)
    assert open_fds() == fds
    with restore(kvm, plan, memory):                    # control: the right size restores
        pass


def test_negative_control_the_unchanged_state_passes(captured):
    """The corruption cases fail because of the corruption: the same path, unchanged."""
    plain, memory = fresh(captured)
    for _, change, _ in CASES:
        if change.get("delete") or change["path"] in ("surprise", "clock.extra",
                                                      "msrs.MSR_MADE_UP"):
            continue
        path = change["path"]
        node = plain
        for key in path.split("."):
            node = node[key]
        VmState.from_plain(corrupt(plain, path, node))


RUNSTATE = {"state": 1, "state_entry_time": 60, "time_running": 30, "time_runnable": 20,
            "time_blocked": 10, "time_offline": 0}


def test_the_runstate_travels_as_its_typed_value(captured):
    """A Xen guest's runstate is an xen.Runstate on both sides of the wire, its fields by
    name (no xen wrapper, no tuple); a bad field is named down to the runstate's field."""
    plain, memory = fresh(captured)
    memory.close()
    xen_plain = {**plain, "runstate": dict(RUNSTATE)}
    state = VmState.from_plain(xen_plain)
    assert state.runstate == xen.Runstate(**RUNSTATE)
    assert state.to_plain() == xen_plain
    assert VmState.from_plain(plain).runstate is None               # control: a non-Xen guest
    for change, field in ((dict(path="runstate.time_runnable", value=-1),
                           "state.runstate.time_runnable"),
                          (dict(path="runstate.state", delete=True), "state.runstate.state"),
                          (dict(path="runstate.state", value=1 << 32), "state.runstate.state"),
                          (dict(path="runstate.extra", value=0), "state.runstate.extra")):
        with pytest.raises(StateError) as info:
            VmState.from_plain(corrupt(xen_plain, **change))
        assert info.value.field == field, str(info.value)
    with pytest.raises(StateError, match="'state.xen': unexpected field"):     # version 2's form
        VmState.from_plain({**plain, "xen": {"runstate": dict(RUNSTATE)}})


def test_the_capture_instant_is_kept_once(kvm):
    """clock.realtime is the capture instant; version 2 repeated it as capture_realtime_ns.
    The capture's timings stay at the source: no destination reads them."""
    with Guest.create(kvm, GuestConfig()) as g:
        g.run_until_snapshot()
        captured = capture(g)
    g.memory.close()
    plain = captured.to_plain()
    state = VmState.from_plain(plain)
    assert state.capture_realtime_ns == plain["clock"]["realtime"] > 0
    assert 0 < captured.timings["before_clock"] <= captured.timings["capture"]
    assert "timings" not in plain and state.timings == {}
    for extra in ("capture_realtime_ns", "timings"):
        with pytest.raises(StateError, match=f"'state.{extra}': unexpected field"):
            VmState.from_plain({**plain, extra: {} if extra == "timings" else 1})

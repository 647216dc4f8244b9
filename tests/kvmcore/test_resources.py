"""No fd leaks: guests, migrations and failures give every descriptor back."""

from __future__ import annotations

import os

import pytest
from common_helpers import open_fds
from kvm_helpers import migrate

from kvmcore import (Guest, GuestConfig, GuestMemory, GuestMemoryError, KvmIoctlError, Strategy,
                     System, capture, probe, restore)


def test_open_fds_sees_a_leak():
    """Negative control: the counter notices one leaked descriptor."""
    before = open_fds()
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        assert open_fds() == before + 1
    finally:
        os.close(fd)
    assert open_fds() == before


def test_create_destroy_cycles_leak_nothing(kvm):
    Guest.create(kvm, GuestConfig()).close()          # warm-up: lazy imports, caches
    before = open_fds()
    for _ in range(20):
        with Guest.create(kvm, GuestConfig()) as g:
            g.run_until_snapshot()
    assert open_fds() == before


def test_migrations_and_probe_leak_nothing(kvm, caps):
    migrate(kvm, caps, Strategy.best(caps), 0)
    before = open_fds()
    for _ in range(5):
        migrate(kvm, caps, Strategy.best(caps), 0)
    with System() as other:
        probe(other)
    assert open_fds() == before


def test_restore_refused_by_the_kernel_leaks_nothing(kvm, caps):
    """A state that passes validation but that KVM refuses (CR0.PG without CR0.PE) fails
    inside restore, after the VM exists: the error names the ioctl, and the half-built
    VM is closed."""
    with Guest.create(kvm, GuestConfig()) as g:
        g.run_until_snapshot()
        state = capture(g)
    state.sregs["cr0"] = 1 << 31
    plan = Strategy.best(caps, state).check(caps, state)
    before = open_fds()
    with pytest.raises(KvmIoctlError, match="KVM_SET_SREGS"):
        restore(kvm, plan, g.memory)
    assert open_fds() == before
    g.memory.close()


def test_memory_outlives_the_vm_and_refuses_to_close_under_a_view(kvm):
    with Guest.create(kvm, GuestConfig()) as g:
        g.run_until_snapshot()
    view = g.memory.view()
    assert bytes(view[0x10000:0x10004])           # still readable after the VM is gone
    try:
        g.memory.close()
    except BufferError:
        pass
    else:
        raise AssertionError("memory closed while a view was alive")
    view.release()
    g.memory.close()
    assert g.memory.closed


def test_closed_guest_memory_raises_instead_of_touching_the_unmapped_region():
    memory = GuestMemory.allocate(4096)
    memory.write(0, b"x")                       # control: open memory works
    assert memory.read(0, 1) == b"x"
    memory.close()
    for use in (lambda: memory.write(0, b"x"), lambda: memory.read(0, 1),
                lambda: memory.cast("char *", 0), memory.view):
        with pytest.raises(GuestMemoryError, match="guest memory is closed"):
            use()

"""A run with a time limit: a guest that never reports is kicked out of KVM_RUN."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from kvmcore import Guest, GuestConfig, GuestTimeout, install_kick_handler
from kvmcore.deadline import KICK_SIGNAL

JMP_SELF = b"\xeb\xfe"   # x86 `jmp .`


@pytest.fixture(autouse=True)
def kick_handler():
    previous = signal.getsignal(KICK_SIGNAL)
    install_kick_handler()
    yield
    signal.signal(KICK_SIGNAL, previous)


def spinning_guest(guest: Guest) -> None:
    """Complete the pending report `out`, then make the next instruction loop for ever."""
    guest.vcpu.complete_pending_io()
    rip = guest.vcpu.get_regs().rip          # identity-mapped: the address is the offset
    guest.memory.write(rip, JMP_SELF)


def test_a_guest_that_never_reports_is_stopped_at_the_deadline(kvm):
    with Guest.create(kvm, GuestConfig()) as guest:
        guest.run_until_snapshot()
        spinning_guest(guest)
        start = time.monotonic()
        with pytest.raises(GuestTimeout, match="did not report within 0.2 s"):
            guest.run_until_snapshot(timeout=0.2)
        assert 0.2 <= time.monotonic() - start < 5
        assert guest.vcpu.run_struct.immediate_exit == 0    # disarmed: a later run can enter


def test_control_a_reporting_guest_is_not_disturbed_by_a_deadline(kvm):
    with Guest.create(kvm, GuestConfig()) as guest:
        first = guest.run_until_snapshot(timeout=5)
        second = guest.run_until_snapshot(timeout=5)
        assert second.sequence == first.sequence + 1
        assert guest.vcpu.run_struct.immediate_exit == 0


def test_control_the_spinning_guest_does_not_return_by_itself(kvm):
    """Before its deadline the spinning guest is still in KVM_RUN: the kick is what ends it."""
    with Guest.create(kvm, GuestConfig()) as guest:
        guest.run_until_snapshot()
        spinning_guest(guest)
        outcome: list[BaseException] = []

        def run() -> None:
            try:
                guest.run_until_snapshot(timeout=1.5)
            except GuestTimeout as exc:
                outcome.append(exc)

        worker = threading.Thread(target=run)
        worker.start()
        worker.join(0.5)
        assert worker.is_alive(), "the spinning guest returned before its deadline"
        worker.join(10)
        assert not worker.is_alive() and len(outcome) == 1


def test_a_deadline_needs_the_handler(kvm):
    signal.signal(KICK_SIGNAL, signal.SIG_DFL)
    with Guest.create(kvm, GuestConfig()) as guest:
        with pytest.raises(RuntimeError, match="install_kick_handler"):
            guest.run_until_snapshot(timeout=1)

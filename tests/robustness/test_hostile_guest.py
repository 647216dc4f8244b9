"""An authenticated but hostile source: the guest it sends is code of its choosing.

The destination runs whatever the memory and registers say inside KVM. What bounds that run is
part of the trust model (docs/security.md).
"""

from __future__ import annotations

import time

import trio
from agents_helpers import PSK
from robustness_helpers import vm_count

import protocol
from kvmcore import GuestConfig
from source_agent.migrate import run_source_guest

JMP_SELF = b"\xeb\xfe"          # x86 `jmp .`: loops forever, never reaches the report `out`


async def send_guest(d, kvm, patch: bytes | None) -> protocol.Message | None:
    """Handshake with the real key, send a real captured guest (its code at RIP replaced by
    ``patch``), and wait up to 5 s for the destination's answer (None if there was none)."""
    channel = await protocol.open_channel(*d.address, protocol.Session("source", PSK))
    async with channel:
        await protocol.source_handshake(channel, agent_version="hostile", capabilities={},
                                        clock_rounds=1)
        source = await trio.to_thread.run_sync(run_source_guest, kvm, GuestConfig(), 0)
        memory = source.memory
        view = memory.view()
        try:
            rip = source.state.regs["rip"]            # identity-mapped: the address is the offset
            if patch:
                view[rip:rip + len(patch)] = patch
            await channel.send(protocol.Migrate(source.state.to_plain(), "clock=realtime,tsc=none,runstate=off",
                                                memory.size, 1 << 20))
            await channel.send_memory(view)
        finally:
            view.release()
            memory.close()
        with trio.move_on_after(5):
            try:
                return await channel.receive()
            except protocol.PeerError as exc:
                return protocol.Error(exc.code, exc.message)
    return None


async def test_control_the_unpatched_guest_reports(dest, kvm):
    d = dest()
    assert isinstance(await send_guest(d, kvm, None), protocol.Report)
    assert vm_count(d.pid) == 0


async def test_a_guest_that_never_reports_is_stopped_and_released(dest, kvm):
    """--max-run-time bounds the restored guest's run: its vCPU is kicked out of KVM_RUN,
    the source gets ERROR restore_failed, the VM is released."""
    d = dest("--max-run-time", "1s")
    start = time.monotonic()
    answer = await send_guest(d, kvm, JMP_SELF)
    assert isinstance(answer, protocol.Error), (
        f"no answer after {time.monotonic() - start:.1f} s; the destination still holds "
        f"{vm_count(d.pid)} VM(s)")
    assert answer.code == "restore_failed" and "did not report within 1 s" in answer.message
    assert vm_count(d.pid) == 0
    # The destination still serves: a well-behaved guest goes through.
    assert isinstance(await send_guest(d, kvm, None), protocol.Report)

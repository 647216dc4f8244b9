"""Run an agent's real command line, stopping the whole process at one protocol point.

    python paced.py dest restore -- serve --listen 127.0.0.1:0 ...
    python paced.py source connected|handshake|memory|report -- migrate --to HOST:PORT ...

At the point it writes ``PAUSED <point>`` to stderr and sends itself SIGSTOP, so the test knows
the phase was reached (it checks the process state is ``T`` too) and kills it with SIGKILL
there: no sleep-and-hope. Test-only; the agents' code is wrapped from outside, never changed.

- dest ``restore``: right after kvmcore's ``restore`` has returned the VM (the VM exists, its
  vCPU has not run yet) -- "mid-restore".
- dest ``round``: before receiving the first memory stream of a session (precopy's round 0,
  the VM prepared, the source guest running and sending it) -- "mid-precopy".
- source ``connected``: the TCP connection is up, nothing sent.
- source ``handshake``: HELLO, AUTH and clock sync done, no VM created yet.
- source ``memory``: MIGRATE sent and at least half of the memory handed to the kernel.
- source ``report``: COMMIT sent, waiting for the REPORT.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from typing import Any


def pause(point: str, detail: str = "") -> None:
    sys.stderr.write(f"PAUSED {point} {detail}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGSTOP)


class _CountingStream:
    """Delegates to the channel's stream; pauses once ``limit`` bytes have been sent through it."""

    def __init__(self, stream: Any, limit: int) -> None:
        self._stream, self._limit, self._sent = stream, limit, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    async def send_all(self, data: Any) -> None:
        await self._stream.send_all(data)
        self._sent += len(memoryview(data).cast("B"))
        if self._sent >= self._limit:
            pause("memory", f"{self._sent} bytes sent")
            self._limit = float("inf")


def _pause_after(function: Any, point: str) -> Any:
    """``function`` (a coroutine function), pausing at ``point`` once it has returned."""
    @functools.wraps(function)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = await function(*args, **kwargs)
        pause(point)
        return result
    return wrapper


def install_source(point: str) -> None:
    import protocol

    if point == "connected":
        protocol.open_channel = _pause_after(protocol.open_channel, point)
    elif point == "handshake":
        protocol.source_handshake = _pause_after(protocol.source_handshake, point)
    elif point in ("memory", "report"):
        real_send_memory = protocol.Channel.send_memory

        @functools.wraps(real_send_memory)
        async def send_memory(self: Any, memory: Any) -> Any:
            if point == "memory":
                self.stream = _CountingStream(self.stream, len(memoryview(memory)) // 2)
            commit = await real_send_memory(self, memory)
            if point == "report":
                pause(point)
            return commit
        protocol.Channel.send_memory = send_memory
    else:
        raise SystemExit(f"paced.py: unknown source point {point!r}")


def install_dest(point: str) -> None:
    import dest_agent.session as session

    if point == "round":
        import protocol

        real_receive_memory = protocol.Channel.receive_memory
        streams = [0]

        @functools.wraps(real_receive_memory)
        async def receive_memory(self: Any, into: Any) -> Any:
            streams[0] += 1
            if streams[0] == 1:
                pause(point)
            return await real_receive_memory(self, into)
        protocol.Channel.receive_memory = receive_memory
        return
    if point != "restore":
        raise SystemExit(f"paced.py: unknown dest point {point!r}")
    real_restore = session.restore

    @functools.wraps(real_restore)
    def restore(*args: Any, **kwargs: Any) -> Any:
        guest = real_restore(*args, **kwargs)
        pause(point)
        return guest
    session.restore = restore


def main() -> int:
    role, point, separator, *argv = sys.argv[1:]
    if separator != "--":
        raise SystemExit("usage: paced.py ROLE POINT -- ARGS...")
    if role == "source":
        install_source(point)
        from source_agent.cli import main as cli_main
    else:
        install_dest(point)
        from dest_agent.cli import main as cli_main
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())

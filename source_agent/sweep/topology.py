"""Where the destination agent runs: loopback, a network namespace, or a remote host.

For ``loopback`` and ``netns`` the sweep starts ``dest-agent serve`` itself, as
a subprocess (inside the namespace for ``netns``), and owns it: the process
lives in a nursery under the sweep, so it is killed on every way out — end of
sweep, error, Ctrl-C — and the namespace is deleted after it by
`open_topology`. For ``remote`` the agent is the user's, at ``--to``.

The destination reports the address it bound (``--listen HOST:0`` picks a free
port, so parallel sweeps cannot clash) on stderr as ``serving on HOST:PORT``;
we read that line, then keep draining stderr so the agent can never block on
a full pipe, and keep its last lines for the error message if it dies.
"""

from __future__ import annotations

import collections
import os
import re
import secrets
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import trio

from source_agent.netem import Topology, open_topology

from . import _guard
from ._groups import single_error

#: The dest-agent's startup log line (dest_agent/server.py) that carries the bound address.
SERVING = re.compile(rb"serving on \[?([0-9A-Fa-f.:]+?)\]?:([0-9]+)\b")
#: The port the agent listens on inside our namespace (nothing else lives there).
NETNS_PORT = 7400
START_TIMEOUT = 30.0

DestArgv = Callable[[str, "str | None"], list[str]]


class DestinationError(Exception):
    """The destination agent could not be started, or exited while the sweep needed it."""


def agent_argv(listen: str, psk_file: str | None) -> list[str]:
    """``dest-agent serve`` with this interpreter, so the namespace runs the same install."""
    # -P: the installed package, never a checkout in the working directory.
    argv = [sys.executable, "-P", "-m", "dest_agent", "serve", "--listen", listen]
    return argv + (["--psk-file", psk_file] if psk_file else [])


def guarded(argv: list[str]) -> list[str]:
    """``argv`` under `_guard`, which kills it if this process dies without running any code (kill -9)."""
    # Run by path, not ``-m``: importing the package would cost the guard trio and netem at start.
    return [sys.executable, _guard.__file__, str(os.getpid()), "--", *argv]


@dataclass
class Endpoint:
    """The destination as the sweep reaches it (before any injector)."""

    topology: str
    host: str
    port: int
    psk_file: str | None
    netns: Topology | None = None
    log: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=20))
    process: trio.Process | None = None  # the agent we started (None for remote)

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def destination(self) -> str:
        """``HOST:PORT`` as a run records it (``[v6]:PORT`` for an IPv6 address)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def died(self) -> DestinationError:
        code = self.process.returncode if self.process else None
        return DestinationError(f"the destination agent exited ({code}) mid-sweep: "
                                f"{' | '.join(self.log) or '(no output)'}")

    async def check(self, grace: float = 1.0) -> None:
        """Raise DestinationError if the agent we started exits within ``grace`` seconds.

        Called after a failed point: a dead destination makes every later point
        fail the same way, and saying so beats three identical connection errors.
        """
        if self.process is None:
            return
        with trio.move_on_after(grace):
            await self.process.wait()
        if self.process.returncode is not None:
            raise self.died()


async def _read_address(process: trio.Process, endpoint: Endpoint) -> tuple[str, int]:
    """Read stderr lines until ``serving on HOST:PORT``; DestinationError if it exits first."""
    assert process.stderr is not None
    buffer = b""
    while True:
        data = await process.stderr.receive_some(4096)
        if not data:
            await process.wait()
            raise DestinationError(f"the destination agent exited ({process.returncode}) before "
                                   f"serving: {' | '.join(endpoint.log) or '(no output)'}")
        buffer += data
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            endpoint.log.append(line.decode(errors="replace"))
            match = SERVING.search(line)
            if match:
                return match.group(1).decode(), int(match.group(2))


async def _drain(process: trio.Process, endpoint: Endpoint) -> None:
    assert process.stderr is not None
    async for data in process.stderr:
        endpoint.log.extend(data.decode(errors="replace").splitlines())


async def _supervise(process: trio.Process, endpoint: Endpoint) -> None:
    """Raise DestinationError when the agent exits on its own (cancellation kills it instead)."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_drain, process, endpoint)
        await process.wait()
        nursery.cancel_scope.cancel()
    raise endpoint.died()


def _write_key(directory: str) -> str:
    """A fresh random key file, mode 600 (the agents refuse anything readable by others)."""
    path = os.path.join(directory, "sweep.psk")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as key:
        key.write(secrets.token_hex(32) + "\n")
    return path


@asynccontextmanager
async def open_endpoint(topology: str, *, to: tuple[str, int] | None = None,
                        psk_file: str | None = None, dest_argv: DestArgv = agent_argv,
                        start_timeout: float = START_TIMEOUT) -> AsyncIterator[Endpoint]:
    """The destination for a whole sweep; started (and stopped) here unless ``remote``.

    ``netns`` without ``--psk-file`` makes a throwaway key: the agent refuses a
    non-loopback address without one, rightly, and the source reads the same file.
    """
    if topology == "remote":
        assert to is not None
        yield Endpoint("remote", to[0], to[1], psk_file)
        return
    body_error: BaseException | None = None
    with single_error():
        async with AsyncExitStack() as stack:
            netns = None
            if topology == "netns":
                netns = await stack.enter_async_context(open_topology())
                if psk_file is None:
                    psk_file = _write_key(stack.enter_context(tempfile.TemporaryDirectory()))
            listen = f"{netns.ns_address}:{NETNS_PORT}" if netns else "127.0.0.1:0"
            endpoint = Endpoint(topology, "", 0, psk_file, netns)
            argv = guarded(dest_argv(listen, psk_file))
            run = netns.run if netns else trio.run_process
            async with trio.open_nursery() as nursery:
                process = await nursery.start(partial(
                    run, argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE, check=False))
                endpoint.process = process
                with trio.move_on_after(start_timeout) as waited:
                    endpoint.host, endpoint.port = await _read_address(process, endpoint)
                if waited.cancelled_caught:
                    raise DestinationError(f"the destination agent did not report its address "
                                           f"within {start_timeout:g}s: {' | '.join(endpoint.log)}")
                nursery.start_soon(_supervise, process, endpoint)
                try:
                    yield endpoint
                except BaseException as exc:  # noqa: BLE001 - re-raised below, outside the nursery
                    body_error = exc
                finally:
                    nursery.cancel_scope.cancel()
    if body_error is not None:
        raise body_error

"""The destination server: a trio TCP server whose every connection is a session.

Why a class: tests, the loopback command and sweeps run the server in-process
and need its real address (port 0) and its live counters; the CLI is a thin
wrapper. A session's failure is caught at the connection (trio.serve_tcp would
otherwise take the whole server down with it), logged, and counted.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import time
from dataclasses import dataclass
from functools import partial

import trio

import protocol
from agentcore.options import UsageError
from kvmcore import HostCapabilities, System, install_kick_handler

from .admission import Admission
from .session import Counters, SessionConfig, run_session

log = logging.getLogger("dest_agent")

__all__ = ["Counters", "DestinationServer", "ServerConfig", "is_loopback_host", "session_limits"]


def is_loopback_host(host: str) -> bool:
    """Whether every address ``host`` resolves to is loopback: the only addresses served
    without a key file. Decided by the addresses, not the spelling ("127.example.com" may
    resolve anywhere); a name that does not resolve is not loopback."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(_is_loopback_address(info[4][0]) for info in infos)


def _is_loopback_address(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _check_keyless(host: str, bound: list[str]) -> None:
    """The bind-time check behind is_loopback_host: what the listeners really bound (a name
    may resolve differently at bind time than when the options were checked)."""
    outside = [address for address in bound if not _is_loopback_address(address)]
    if outside:
        raise UsageError(f"--listen {host} bound {', '.join(outside)}, not a loopback address: "
                         "a pre-shared key is required there (--psk-file PATH)")


@dataclass(frozen=True)
class ServerConfig:
    """Everything `dest-agent serve` takes; the defaults are the safe ones."""

    psk: bytes
    host: str = "127.0.0.1"
    port: int = 7400
    max_sessions: int = 4              # authenticated sessions
    max_unauthenticated: int = 64      # connections that have not proved the key yet
    max_unauthenticated_per_address: int = 8
    max_memory: int = 1 << 30          # kvmcore's guest maximum
    max_frame_size: int = 8 << 20      # protocol.Limits' default
    handshake_timeout: float = 10.0
    idle_timeout: float = 60.0
    message_timeout: float = 30.0
    max_run_time: float = 10.0         # the restored guest must report within this
    ssl_context: ssl.SSLContext | None = None


def session_limits(config: ServerConfig) -> protocol.Limits:
    """The protocol's bounds for one session: memory and frame size as configured, and the
    largest MEMORY chunk that fits such a frame (a source asking for more gets ERROR limit)."""
    return protocol.Limits(max_memory_size=config.max_memory, max_frame_size=config.max_frame_size,
                           max_chunk_size=protocol.Limits.chunk_fitting(config.max_frame_size))


class DestinationServer:
    """Serve migrations on ``config.host:config.port`` until cancelled.

    ``kvm`` and ``caps`` are probed once by the caller (probing creates a VM, which
    must not happen per connection).
    """

    def __init__(self, kvm: System, caps: HostCapabilities, config: ServerConfig,
                 agent_version: str) -> None:
        self.kvm = kvm
        self.caps = caps
        self.config = config
        self.counters = Counters()
        self.address: tuple[str, int] | None = None
        self.admission = Admission(config, self.counters)
        self._session_config = SessionConfig(
            psk=config.psk, limits=session_limits(config),
            agent_version=agent_version, handshake_timeout=config.handshake_timeout,
            idle_timeout=config.idle_timeout, message_timeout=config.message_timeout,
            max_run_time=config.max_run_time)

    async def serve(self, *, task_status: trio.TaskStatus[tuple[str, int]]
                    = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, report the bound address through ``task_status``, serve until cancelled."""
        # A guest is code of the peer's choosing: its run has a time limit, enforced by
        # kicking the vCPU thread with a signal that needs a handler (main thread only).
        install_kick_handler()
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(
                trio.serve_tcp, self._handle, self.config.port, host=self.config.host))
            bound = [listener.socket.getsockname() for listener in listeners]
            if not self.config.psk:
                _check_keyless(self.config.host, [address[0] for address in bound])
            self.address = (bound[0][0], bound[0][1])
            log.info("serving on %s:%d (max %d sessions, %d MiB guest memory each; max %d "
                     "unauthenticated connections, %d per address)", *self.address,
                     self.config.max_sessions, self.config.max_memory >> 20,
                     self.config.max_unauthenticated,
                     self.config.max_unauthenticated_per_address)
            if not self.config.psk:
                log.warning("serving without a key: any local user can make this host run "
                            "VMs of their choosing; give --psk-file to require the key")
            task_status.started(self.address)

    async def _handle(self, stream: trio.SocketStream) -> None:
        """One connection, never raising: its end is logged as one line."""
        start = time.perf_counter()
        try:
            address, port = stream.socket.getpeername()[:2]
            peer = f"{address}:{port}"
        except OSError:
            address = peer = "?"
        counters = self.counters
        counters.add("sessions")
        counters.add("live_sessions")
        ticket = self.admission.enter(address)
        try:
            if isinstance(ticket, str):
                counters.add("refused_unauthenticated")
                outcome = await _refuse_busy(self._wrap(stream), ticket)
            else:
                outcome = await run_session(self._wrap(stream), self.kvm, self.caps,
                                            self._session_config, counters, ticket.admit)
        except Exception as exc:   # our bug: log it, keep serving
            counters.add("failed_sessions")
            log.exception("session %s: internal error", peer)
            outcome = f"internal error: {type(exc).__name__}: {exc}"
        finally:
            if not isinstance(ticket, str):
                ticket.release()
            counters.add("live_sessions", -1)
            await _linger_and_close(stream)
        log.info("session %s: %s (%.1f ms)", peer, outcome, (time.perf_counter() - start) * 1e3)

    def _wrap(self, stream: trio.SocketStream) -> trio.abc.Stream:
        if self.config.ssl_context is None:
            return stream
        return trio.SSLStream(stream, self.config.ssl_context, server_side=True)


async def _refuse_busy(stream: trio.abc.Stream, why: str) -> str:
    """ERROR busy before anything else: the session is never started."""
    channel = protocol.Channel(stream, protocol.Session("destination", b""), message_timeout=1.0)
    await channel.send_error(protocol.Error("busy", why))
    return f"refused busy: {why}"


async def _linger_and_close(stream: trio.SocketStream) -> None:
    """Close after the peer has read what we sent: closing with its unread bytes in our
    receive queue would send a RST, and the peer could lose our last ERROR. Bounded."""
    with trio.move_on_after(0.5):
        try:
            while await stream.receive_some(64 * 1024):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
            pass
    with trio.CancelScope(shield=True):
        await trio.aclose_forcefully(stream)

"""The trio adapter: a `Channel` drives a `Session` over any trio stream.

Timeouts: the peer must start a frame within ``idle_timeout`` of this side
starting to wait for one, and finish it within ``message_timeout`` of its
first byte (a client dripping bytes is dropped then); every write must finish
within ``message_timeout``.  When this side finds the peer at fault (a
protocol error, a failed proof, a version mismatch, a timeout), the channel
sends the peer an ERROR saying so before raising, so both users see why.
"""

from __future__ import annotations

import contextlib
import math
import os
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import trio

from ._clocksync import ClockEstimate, ClockSample, estimate_clock_offset
from ._errors import (
    AuthenticationFailed,
    ConnectionClosed,
    LocalProtocolError,
    PeerError,
    ProtocolError,
    ProtocolTimeout,
    RemoteProtocolError,
    VersionMismatch,
)
from ._limits import KiB
from ._messages import (
    Auth,
    Bye,
    ClockSyncReply,
    ClockSyncRequest,
    Commit,
    Error,
    Hello,
    MemoryChunk,
    Message,
    name_of,
)
from ._session import END_OF_STREAM, NEED_DATA, Session, State, _byte_view

__all__ = [
    "Channel",
    "Handshake",
    "destination_handshake",
    "open_channel",
    "source_handshake",
    "tls_client_context",
    "tls_server_context",
]

_ERROR_SEND_TIMEOUT = 1.0

#: Deferred memory hashing: the source builds (and hashes) up to this many
#: bytes of chunks ahead of the one it writes; the destination starts a hash
#: job once this many received bytes are pending (or the memory is complete).
_HASH_AHEAD = 4 << 20
_HASH_MIN = 256 << 10
#: Socket buffers asked for while memory streams (the kernel caps them at
#: net.core.wmem_max / rmem_max): fewer wake-ups per MiB on fast links.
_STREAM_BUFFER = 4 << 20


class _HashJob:
    """A session's memory hash job running in a trio worker thread (hashlib releases the GIL).

    `wait` is shielded from cancellation: the job reads guest memory, which
    must not be unmapped under it, and it is short (at most a few MiB).
    """

    def __init__(self, session: Session, job: Callable[[], None]) -> None:
        self._session = session
        self._done = trio.Event()
        self._outcome: Any = None
        token = trio.lowlevel.current_trio_token()

        def deliver(outcome: Any) -> None:
            def finished() -> None:
                self._outcome = outcome
                self._done.set()

            try:
                token.run_sync_soon(finished)
            except trio.RunFinishedError:  # pragma: no cover - the run ended first
                pass

        trio.lowlevel.start_thread_soon(job, deliver)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    async def wait(self) -> None:
        with trio.CancelScope(shield=True):
            await self._done.wait()
        self._session.memory_hash_done()
        self._outcome.unwrap()


class Channel:
    """One connection: a `Session` driven over a trio `Stream`.

    ``clock`` stamps CLOCK_SYNC exchanges (nanoseconds of wall time by
    default, since the testbed measures wall gaps between hosts).  A
    destination channel answers CLOCK_REQUESTs itself inside `receive`.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        session: Session,
        *,
        message_timeout: float = 30.0,
        idle_timeout: float = 60.0,
        receive_size: int = 256 * KiB,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.stream = stream
        self.session = session
        self.message_timeout = message_timeout
        self.idle_timeout = idle_timeout
        self.receive_size = receive_size
        self.clock = clock
        self._frame_started: float | None = None
        self._broken: str | None = None
        self._hash_job: _HashJob | None = None
        self._rbuf: memoryview | None = None  # plain TCP: the one receive buffer
        if session.role == "destination":
            # Hash the memory received in worker threads beside the I/O (see _HashJob);
            # the sink stays the session's until COMMIT anyway.
            session.defer_memory_hash = True

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- sending ---------------------------------------------------------------

    async def send(self, message: Message) -> None:
        """Send one message within ``message_timeout``."""
        self._check_usable()
        await self._write(self.session.send_iov(message), message)

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise LocalProtocolError(f"channel unusable: {self._broken}")

    def _socket_fd(self) -> int | None:
        """The fd of a plain TCP stream, for direct non-blocking I/O; None for other streams."""
        stream = self.stream
        if not isinstance(stream, trio.SocketStream):
            return None
        fd = stream.socket.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("the stream is closed")
        return fd

    async def _write(self, pieces: list[bytes | memoryview], message: Message) -> None:
        self._check_usable()
        # A frame cut short by cancellation or an error leaves the stream
        # unframed: nothing more may be written to it.
        self._broken = f"a {name_of(message)} frame was cut short"
        try:
            fd = self._socket_fd()
            if fd is not None:
                # Plain TCP: one writev of the whole frame, straight away.  The
                # kernel usually takes a small frame whole, and then the send
                # costs no cancel scope and no trip through trio's scheduler.
                await trio.lowlevel.checkpoint_if_cancelled()
                try:
                    pieces = _unsent(pieces, _writev(fd, pieces))
                except BlockingIOError:
                    pass
            if pieces:
                with trio.CancelScope(deadline=trio.current_time() + self.message_timeout) as scope:
                    if fd is None:
                        for piece in pieces:
                            await self.stream.send_all(piece)
                    else:
                        while pieces:
                            await trio.lowlevel.wait_writable(fd)
                            try:
                                pieces = _unsent(pieces, _writev(fd, pieces))
                            except BlockingIOError:
                                pass
                if scope.cancelled_caught:
                    self.session._fail("send timeout")
                    raise ProtocolTimeout(
                        f"sending {name_of(message)} to the {self.session.peer_role} took over "
                        f"{self.message_timeout} s"
                    )
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            # The peer usually closed because it failed and said why first: an
            # ERROR already received is the error to report, not the broken pipe.
            peer_error = await self._pending_peer_error()
            self.session._fail(f"stream broke while sending {name_of(message)}")
            if peer_error is not None:
                raise peer_error from exc
            raise ConnectionClosed(
                f"stream to the {self.session.peer_role} broke while sending {name_of(message)}: "
                f"{_reason(exc)}"
            ) from exc
        self._broken = None

    async def _pending_peer_error(self) -> ProtocolError | None:
        """An ERROR the peer sent before the stream broke, if it can still be read."""
        with trio.move_on_after(_ERROR_SEND_TIMEOUT):
            while True:
                try:
                    event = self.session.next_event()
                    if isinstance(event, Error):
                        return _peer_error(self.session.peer_role, event)
                    if event is END_OF_STREAM:
                        return None
                    if event is not NEED_DATA:
                        continue  # a message sent before the ERROR: look further
                    data = await self.stream.receive_some(self.receive_size)
                except (ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
                    return None
                if not data:
                    return None
                self.session.receive_data(data)
        return None

    async def send_memory(self, memory: Any) -> Commit:
        """Send ``memory`` (any contiguous buffer, e.g. guest RAM) as chunks after MIGRATE, then COMMIT.

        The chunk data goes to the stream straight from ``memory``: no copy of
        the whole memory is made.  The COMMIT digest is computed in worker
        threads while the chunks are written (chunks are framed up to
        ``_HASH_AHEAD`` bytes ahead so the hashing keeps ahead of the writes).
        Returns the COMMIT sent.
        """
        self._check_usable()
        session = self.session
        progress = session.memory_progress
        if progress is None:
            raise LocalProtocolError(
                f"send_memory needs a MIGRATE sent first (state {session.state.name})"
            )
        offset, size, chunk_size = progress
        view = _byte_view(memory)
        if len(view) < size:
            raise LocalProtocolError(f"memory buffer holds {len(view)} bytes, memory_size is {size}")
        _grow_buffer(self.stream, "SO_SNDBUF")
        queued: list[tuple[list[bytes | memoryview], MemoryChunk]] = []
        ahead = 0
        defer, session.defer_memory_hash = session.defer_memory_hash, True
        completed = False
        try:
            while offset < size or queued:
                # Frame chunks ahead of the writes, so the hash job has work beside them.
                while offset < size and ahead < _HASH_AHEAD:
                    chunk = MemoryChunk(offset=offset, data=view[offset : offset + chunk_size])
                    queued.append((session.send_iov(chunk), chunk))
                    offset += len(chunk.data)
                    ahead += len(chunk.data)
                await self._hash_step(start_only=True)
                pieces, chunk = queued.pop(0)
                ahead -= len(chunk.data)
                await self._write(pieces, chunk)
            await self._hash_rest()
            completed = True
        finally:
            if self._hash_job is not None:
                await self._hash_job.wait()
                self._hash_job = None
            session.defer_memory_hash = defer
            if not completed:  # the caller may close its buffer now: no view of it stays here
                session.abandon_memory_hash()
        commit = session.make_commit()
        await self.send(commit)
        return commit

    async def _hash_rest(self) -> None:
        """Finish the digest: wait for the running job, then hash what is left.

        A short tail (under ``_HASH_MIN``) is hashed right here: another job would
        cost a thread wake-up and a trio wake-up, which take milliseconds on a
        loaded host. A long one (the link outran the hash) goes to a thread too, so
        the event loop -- every other session on this server -- is not held up.
        """
        if self._hash_job is not None:
            job, self._hash_job = self._hash_job, None
            await job.wait()
        if self.session.memory_hash_pending >= _HASH_MIN:
            work = self.session.memory_hash_job()
            if work is not None:
                await _HashJob(self.session, work).wait()
            return
        work = self.session.memory_hash_job()
        if work is not None:
            try:
                work()
            finally:
                self.session.memory_hash_done()

    async def _hash_step(self, *, start_only: bool) -> None:
        """Start a hash job if none runs and bytes are pending; else (unless ``start_only``) wait for it."""
        job = self._hash_job
        if job is not None:
            if start_only and not job.done:
                return
            self._hash_job = None
            await job.wait()
        work = self.session.memory_hash_job()
        if work is not None:
            self._hash_job = _HashJob(self.session, work)

    async def send_error(self, exc: BaseException) -> None:
        """Tell the peer why the session ends on this side; best effort, never raises."""
        if self._broken is not None or isinstance(exc, (ConnectionClosed, PeerError)):
            return
        try:
            pieces = self.session.send_iov(Error.from_exception(exc))
        except ProtocolError:
            return
        with trio.move_on_after(_ERROR_SEND_TIMEOUT):
            try:
                for piece in pieces:
                    await self.stream.send_all(piece)
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
                pass

    # -- receiving -------------------------------------------------------------

    async def receive(self) -> Message:
        """The next message from the peer (a destination answers CLOCK_REQUESTs on the way).

        An ERROR from the peer is raised: `VersionMismatch` or
        `AuthenticationFailed` for those codes, `PeerError` otherwise.
        """
        # One cancel scope for the whole call (a destination answering clock
        # syncs stays in here): its deadline is set only while waiting.
        with trio.CancelScope() as scope:
            while True:
                try:
                    message = await self._receive_one(scope)
                except ProtocolError as exc:
                    scope.deadline = math.inf  # report this error, not a timeout
                    if not isinstance(exc, ProtocolTimeout):
                        await self.send_error(exc)  # tell the peer what it did wrong
                    raise
                if isinstance(message, ClockSyncRequest) and self.session.role == "destination":
                    t2 = self.clock()
                    scope.deadline = math.inf  # the reply has its own deadline
                    await self.send(ClockSyncReply(t1=message.t1, t2=t2, t3=self.clock()))
                    continue
                if isinstance(message, Error):
                    raise _peer_error(self.session.peer_role, message)
                return message
        raise await self._timed_out()

    async def receive_memory(self, into: Any) -> Commit:
        """After MIGRATE: receive every chunk straight into ``into`` (guest RAM), then COMMIT.

        The COMMIT's digest has been checked when this returns.
        """
        self.session.receive_memory_into(into)
        _grow_buffer(self.stream, "SO_RCVBUF")
        try:
            while True:
                message = await self.receive()
                if isinstance(message, Commit):
                    return message
                assert isinstance(message, MemoryChunk), message  # the session allows nothing else
        except BaseException:
            job, self._hash_job = self._hash_job, None
            try:
                if job is not None:  # an error mid-stream: the job reads ``into``; let it end
                    with contextlib.suppress(Exception):  # the first error is the one to report
                        await job.wait()
            finally:
                self.session.abandon_memory_hash()
            raise

    async def _receive_one(self, scope: trio.CancelScope) -> Message:
        """The next event; waits under ``scope`` (the caller's), whose deadline this sets."""
        if self._hash_job is not None or self.session.memory_hash_pending:
            await self._hash_received()
        event: Message = self._next_event()
        if event is not NEED_DATA:
            return event
        session = self.session
        fd = self._stream_fd()
        if fd is not None:
            # Plain TCP: read what is already there without waiting; only a
            # wait for more needs the deadline (and the scheduler).
            await trio.lowlevel.checkpoint_if_cancelled()
            while self._read_now(fd):
                if self._hash_job is not None or session.memory_hash_pending:
                    await self._hash_received()
                event = self._next_event()
                if event is not NEED_DATA:
                    return event
        idle_deadline = trio.current_time() + self.idle_timeout
        scope.deadline = idle_deadline
        while True:
            if session.buffered:
                if self._frame_started is None:
                    self._frame_started = trio.current_time()
                scope.deadline = self._frame_started + self.message_timeout
            elif scope.deadline != idle_deadline:
                scope.deadline = idle_deadline
            if fd is None:
                await self._receive_some()
            else:
                await self._wait_readable(fd)
                if not self._read_now(fd):
                    continue
            if self._hash_job is not None or session.memory_hash_pending:
                await self._hash_received()
            event = self._next_event()
            if event is not NEED_DATA:
                return event

    async def _timed_out(self) -> ProtocolTimeout:
        """The receive deadline passed: tell the peer, fail the session, return the error."""
        session = self.session
        if session.buffered:
            waiting = f"the rest of a frame (message_timeout {self.message_timeout} s)"
        else:
            waiting = f"a message (idle_timeout {self.idle_timeout} s)"
        timeout = ProtocolTimeout(
            f"waited too long for {waiting} from the {session.peer_role} (state {session.state.name})"
        )
        await self.send_error(timeout)
        session._fail(str(timeout))
        return timeout

    def _stream_fd(self) -> int | None:
        try:
            return self._socket_fd()
        except trio.ClosedResourceError as exc:
            raise self._broke(exc) from exc

    def _broke(self, exc: BaseException) -> ConnectionClosed:
        session = self.session
        session._fail("stream broke")
        return ConnectionClosed(
            f"stream from the {session.peer_role} broke (state {session.state.name}): {_reason(exc)}"
        )

    async def _wait_readable(self, fd: int) -> None:
        try:
            await trio.lowlevel.wait_readable(fd)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise self._broke(exc) from exc

    def _read_now(self, fd: int) -> bool:
        """Read what the socket holds without waiting: False if nothing was there.

        Inside a MEMORY frame's data the bytes go from the kernel straight into
        the caller's buffer (guest RAM), one copy in all; other bytes go through
        one reusable buffer into the session.
        """
        session = self.session
        try:
            window = session.memory_window()
            if window is not None:
                count = os.readv(fd, [window])
                if count:
                    session.memory_received(count)
                else:
                    session.receive_data(b"")
                return True
            if self._rbuf is None:
                self._rbuf = memoryview(bytearray(self.receive_size))
            limit = session.memory_read_limit()
            count = os.readv(fd, [self._rbuf if limit is None else self._rbuf[:limit]])
            session.receive_data(self._rbuf[:count])
            return True
        except BlockingIOError:
            return False
        except OSError as exc:
            broken = trio.BrokenResourceError(f"socket connection broken: {exc}")
            broken.__cause__ = exc
            raise self._broke(broken) from broken

    async def _receive_some(self) -> None:
        try:
            data = await self.stream.receive_some(self.receive_size)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise self._broke(exc) from exc
        self.session.receive_data(data)

    async def _hash_received(self) -> None:
        """Destination: keep a hash job running over the memory received; finish it before COMMIT."""
        session = self.session
        if session.state is State.COMMIT:  # all memory is in: the digest is due with the COMMIT
            await self._hash_rest()
        elif session.memory_hash_pending >= _HASH_MIN or self._hash_job is not None:
            await self._hash_step(start_only=True)

    def _next_event(self) -> Any:
        session = self.session
        event = session.next_event()
        if event is END_OF_STREAM:
            raise ConnectionClosed(
                f"the {session.peer_role} closed the stream (state {session.state.name})"
            )
        if event is not NEED_DATA:
            self._frame_started = trio.current_time() if session.buffered else None
        return event

    # -- clock sync and closing ------------------------------------------------

    async def sync_clock(self, rounds: int = 8) -> tuple[ClockEstimate, list[ClockSample]]:
        """Source side: ``rounds`` CLOCK_SYNC exchanges; the minimum-RTT estimate and the samples."""
        if rounds < 1:
            raise ValueError("rounds must be at least 1")
        samples = []
        for _ in range(rounds):
            t1 = self.clock()
            await self.send(ClockSyncRequest(t1=t1))
            reply = await self.receive()
            t4 = self.clock()
            assert isinstance(reply, ClockSyncReply), reply  # the session allows nothing else
            samples.append(ClockSample(t1=t1, t2=reply.t2, t3=reply.t3, t4=t4))
        try:
            return estimate_clock_offset(samples), samples
        except ValueError as exc:
            raise ProtocolError(f"clock sync with the {self.session.peer_role} failed: {exc}") from None

    async def bye(self) -> None:
        """Say BYE (between migrations) and close the stream."""
        try:
            await self.send(Bye())
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Close the stream; safe to call twice and after the peer went away."""
        try:
            await self.stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def _writev(fd: int, pieces: list[bytes | memoryview]) -> int:
    """os.writev, a broken connection raised as trio does (BrokenResourceError)."""
    try:
        return os.writev(fd, pieces)
    except BlockingIOError:
        raise
    except OSError as exc:
        raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc


def _unsent(pieces: list[bytes | memoryview], sent: int) -> list[bytes | memoryview]:
    """What remains of ``pieces`` once their first ``sent`` bytes are written."""
    for i, piece in enumerate(pieces):
        size = len(piece)
        if sent < size:
            return [memoryview(piece)[sent:], *pieces[i + 1 :]]
        sent -= size
    return []


def _grow_buffer(stream: trio.abc.Stream, option: str) -> None:
    """Ask for a ``_STREAM_BUFFER``-byte socket buffer on a TCP stream; best effort."""
    if isinstance(stream, trio.SocketStream):
        import socket  # noqa: PLC0415

        try:
            if stream.socket.getsockopt(socket.SOL_SOCKET, getattr(socket, option)) < _STREAM_BUFFER:
                stream.setsockopt(socket.SOL_SOCKET, getattr(socket, option), _STREAM_BUFFER)
        except OSError:  # pragma: no cover - a platform without it
            pass


def _reason(exc: BaseException) -> str:
    """Why a stream broke: trio's BrokenResourceError often has no text of its own and carries
    the reason (a TLS alert, a reset) as its cause, which would otherwise be lost."""
    seen: BaseException | None = exc
    while seen is not None:
        if str(seen):
            return str(seen) if seen is exc else f"{type(seen).__name__}: {seen}"
        seen = seen.__cause__ or seen.__context__
    return type(exc).__name__


def _peer_error(peer: str, error: Error) -> ProtocolError:
    if error.code == VersionMismatch.error_code:
        return VersionMismatch(f"the {peer} refused the session: {error.message}")
    if error.code == AuthenticationFailed.error_code:
        return AuthenticationFailed(f"the {peer} refused the authentication: {error.message}")
    return PeerError(error.code, error.message)


@dataclass(frozen=True)
class Handshake:
    """What HELLO, AUTH and clock sync established."""

    #: The peer's HELLO: its agent version and capability summary.
    peer: Hello
    #: Destination clock minus source clock (source side only; None on the destination).
    clock: ClockEstimate | None
    samples: tuple[ClockSample, ...] = ()


async def source_handshake(
    channel: Channel,
    *,
    agent_version: str,
    capabilities: Mapping[str, Any],
    clock_rounds: int = 8,
    timeout: float = 30.0,
) -> Handshake:
    """Source side of HELLO, AUTH and ``clock_rounds`` clock syncs, all within ``timeout``."""
    session = channel.session

    async def steps() -> Handshake:
        await channel.send(session.make_hello(agent_version, dict(capabilities)))
        try:
            peer = await channel.receive()
        except RemoteProtocolError as exc:
            # A web server's or an SSH banner's first bytes read as a huge frame length.
            raise type(exc)(f"{exc} (no HELLO came back: is the peer a destination agent of "
                            "this testbed, at this port?)") from exc
        assert isinstance(peer, Hello), peer
        await channel.send(session.make_auth())
        proof = await channel.receive()
        assert isinstance(proof, Auth), proof
        if not clock_rounds:
            return Handshake(peer=peer, clock=None)
        estimate, samples = await channel.sync_clock(clock_rounds)
        return Handshake(peer=peer, clock=estimate, samples=tuple(samples))

    return await _within(channel, timeout, steps)


async def destination_handshake(
    channel: Channel,
    *,
    agent_version: str,
    capabilities: Mapping[str, Any],
    timeout: float = 30.0,
) -> Handshake:
    """Destination side of HELLO and AUTH within ``timeout``; clock syncs are served by `receive`."""
    session = channel.session

    async def steps() -> Handshake:
        peer = await channel.receive()
        assert isinstance(peer, Hello), peer
        await channel.send(session.make_hello(agent_version, dict(capabilities)))
        proof = await channel.receive()
        assert isinstance(proof, Auth), proof
        await channel.send(session.make_auth())
        return Handshake(peer=peer, clock=None)

    return await _within(channel, timeout, steps)


async def _within(channel: Channel, timeout: float, steps: Callable[[], Awaitable[Handshake]]) -> Handshake:
    """Run the handshake ``steps`` under an overall deadline; on expiry tell the peer and raise."""
    with trio.move_on_after(timeout):
        return await steps()
    session = channel.session
    exc = ProtocolTimeout(
        f"handshake with the {session.peer_role} took over {timeout} s (state {session.state.name})"
    )
    await channel.send_error(exc)
    session._fail(str(exc))
    raise exc


def tls_server_context(
    certfile: str, keyfile: str, *, client_ca_file: str | None = None
) -> ssl.SSLContext:
    """TLS for the destination; with ``client_ca_file`` the source must present a certificate.

    OSError names the file that cannot be read; ValueError names the files that do not make
    a certificate and its key (OpenSSL alone says "[SSL] PEM lib")."""
    _readable(certfile, keyfile, client_ca_file)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    _load_chain(context, certfile, keyfile)
    if client_ca_file is not None:
        _load_ca(context, client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def tls_client_context(
    ca_file: str, *, certfile: str | None = None, keyfile: str | None = None
) -> ssl.SSLContext:
    """TLS for the source, trusting ``ca_file``; ``certfile``/``keyfile`` for mutual TLS.
    Errors as for tls_server_context."""
    _readable(ca_file, certfile, keyfile)
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    _load_ca(context, ca_file)
    if certfile is not None:
        _load_chain(context, certfile, keyfile)
    return context


def _readable(*paths: str | None) -> None:
    """Open each file once: the OSError then names it (ssl's own errors do not)."""
    for path in paths:
        if path is not None:
            with open(path, "rb"):
                pass


def _load_chain(context: ssl.SSLContext, certfile: str, keyfile: str | None) -> None:
    try:
        context.load_cert_chain(certfile, keyfile)
    except ssl.SSLError as exc:
        key = keyfile or certfile
        with open(key, "rb") as f:
            has_key = b"PRIVATE KEY-----" in f.read(1 << 20)
        why = f"no PEM private key in {key}" if not has_key else exc.reason or str(exc)
        raise ValueError(f"certificate {certfile} with key {key}: {why} (each must be PEM, the "
                         "key the certificate's private key)") from None


def _load_ca(context: ssl.SSLContext, ca_file: str) -> None:
    try:
        context.load_verify_locations(ca_file)
    except ssl.SSLError as exc:
        raise ValueError(f"CA certificates {ca_file}: {exc.reason or exc} (expected PEM "
                         "certificates)") from None


async def open_channel(
    host: str,
    port: int,
    session: Session,
    *,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    **channel_options: Any,
) -> Channel:
    """Connect over TCP (and TLS if ``ssl_context``) and return a `Channel` for ``session``."""
    stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
    if ssl_context is not None:
        stream = trio.SSLStream(stream, ssl_context, server_hostname=server_hostname or host)
    return Channel(stream, session, **channel_options)

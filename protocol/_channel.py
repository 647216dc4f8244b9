"""The trio adapter: a `Channel` drives a `Session` over any trio stream.

Timeouts: the peer must start a frame within ``idle_timeout`` of this side
starting to wait for one, and finish it within ``message_timeout`` of its
first byte (a client dripping bytes is dropped then); every write must finish
within ``message_timeout``.  When this side finds the peer at fault (a
protocol error, a failed proof, a version mismatch, a timeout), the channel
sends the peer an ERROR saying so before raising, so both users see why.

The bytes go through one small interface (`_io.ByteIO`: the fd fast path
for plain TCP, ``send_all``/``receive_some`` for anything else); the memory
MAC is computed by the session as the bytes go by.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import trio

from ._clocksync import ClockEstimate, ClockSample, estimate_clock_offset
from ._errors import (
    ConnectionClosed,
    LocalProtocolError,
    PeerError,
    ProtocolError,
    ProtocolTimeout,
    peer_error,
)
from ._io import open_io
from ._limits import KiB
from ._memory import byte_view
from ._messages import (
    MAX_TEXT,
    Bye,
    ClockSyncReply,
    ClockSyncRequest,
    Commit,
    Error,
    MemoryChunk,
    Message,
    Prepare,
    name_of,
)
from ._session import Session
from ._state import END_OF_STREAM, NEED_DATA

__all__ = ["Channel"]

#: `send_memory` writes MEMORY frames in batches of at most this many frames (3 iovecs
#: each, under Linux's IOV_MAX of 1024) or, past this many data bytes, as soon as reached.
_BATCH_FRAMES = 256
_BATCH_BYTES = 1 << 20

#: How long the best-effort ERROR of `Channel.send_error` may take.
_ERROR_SEND_TIMEOUT = 1.0


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
        self.session = session
        self.message_timeout = message_timeout
        self.idle_timeout = idle_timeout
        self.receive_size = receive_size
        self.clock = clock
        self.stream = stream
        self._frame_started: float | None = None
        self._broken: str | None = None
        #: `send_memory(copy=True)`'s bounce buffer: made at its first use, kept for the next.
        self._bounce: bytearray | None = None

    @property
    def stream(self) -> trio.abc.Stream:
        """The stream the channel drives; setting another (a wrapper, say) picks its I/O path."""
        return self._stream

    @stream.setter
    def stream(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._io = open_io(stream, self.receive_size)

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- sending ---------------------------------------------------------------

    async def send(self, message: Message) -> None:
        """Send one message within ``message_timeout``."""
        self._check_usable()
        await self._write(self.session.send_iov(message), message)
        if isinstance(message, Prepare):
            # Memory streams follow. Grown now, not at the first of them, so that a stop-copy's
            # MIGRATE finds the peer's window open: grown only at send_memory/receive_memory,
            # a 2 MiB memory went through the 128 KiB buffers of a fresh connection in
            # window-sized pieces, a wake-up of each side per piece, inside the downtime.
            self._io.grow_buffer("SO_SNDBUF")

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise LocalProtocolError(f"channel unusable: {self._broken}")

    async def _write(self, pieces: list[bytes | memoryview], message: Message) -> None:
        """Write one frame's ``pieces`` (consumed) within ``message_timeout``.

        What the stream takes at once costs no cancel scope and no trip
        through trio's scheduler (`ByteIO.send_now`); only a real wait runs
        under the deadline.
        """
        self._check_usable()
        # A frame cut short by cancellation or an error leaves the stream
        # unframed: nothing more may be written to it.
        self._broken = f"a {name_of(message)} frame was cut short"
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._io.send_now(pieces)
            if pieces:
                with trio.CancelScope(deadline=trio.current_time() + self.message_timeout) as scope:
                    await self._io.send(pieces)
                if scope.cancelled_caught:
                    self.session.fail("send timeout")
                    raise ProtocolTimeout(
                        f"sending {name_of(message)} to the {self.session.peer_role} took over "
                        f"{self.message_timeout} s"
                    )
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            pieces.clear()  # no view of the caller's memory stays in the traceback
            # The peer usually closed because it failed and said why first: an
            # ERROR already received is the error to report, not the broken pipe.
            pending = await self._pending_peer_error()
            self.session.fail(f"stream broke while sending {name_of(message)}")
            if pending is not None:
                raise pending from exc
            raise ConnectionClosed(
                f"stream to the {self.session.peer_role} broke while sending {name_of(message)}: "
                f"{_reason(exc)}"
            ) from exc
        finally:
            pieces.clear()
        self._broken = None

    async def _pending_peer_error(self) -> ProtocolError | None:
        """An ERROR the peer sent before the stream broke, if it can still be read."""
        with trio.move_on_after(_ERROR_SEND_TIMEOUT):
            while True:
                try:
                    event = self.session.next_event()
                    if isinstance(event, Error):
                        return peer_error(self.session.peer_role, event.code, event.message)
                    if event is END_OF_STREAM:
                        return None
                    if event is not NEED_DATA:
                        continue  # a message sent before the ERROR: look further
                    data = await self._io.receive_some()
                except (ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
                    return None
                if not data:
                    return None
                self.session.receive_data(data)
        return None

    async def send_memory(self, memory: Any, *, copy: bool = False) -> Commit:
        """Send ``memory`` (any contiguous buffer, e.g. guest RAM) after ROUND or MIGRATE, then COMMIT.

        The chunks the session says are due -- every run of the ROUND or
        MIGRATE, in order -- go to the stream by ``writev`` (header, data,
        tag; several small chunks per call).  With ``copy`` False the data is
        ``memory`` itself, no copy made: for a guest that is stopped.  With
        ``copy`` True (a guest still running, writing its memory meanwhile)
        each batch is first copied into a bounce buffer the channel owns, then
        MACed and written from there, so the tag covers exactly the bytes
        written: a page the guest changes during the write is sent as it was
        at the copy (the dirty log sends it again later).  Returns the COMMIT
        sent.  However it ends, no view of ``memory`` made here or by the
        session outlives the call: the caller may unmap it.
        """
        self._check_usable()
        session = self.session
        progress = session.memory_progress
        if progress is None:
            raise LocalProtocolError(
                f"send_memory needs a ROUND or MIGRATE sent first (state {session.state.name})"
            )
        view = byte_view(memory)
        if len(view) < progress[1]:
            raise LocalProtocolError(f"memory buffer holds {len(view)} bytes, memory_size is {progress[1]}")
        bounce = self._bounce_view(progress[2]) if copy else None
        self._io.grow_buffer("SO_SNDBUF")
        chunks: list[MemoryChunk] = []
        try:
            due = session.memory_due()
            while due is not None:
                # Small chunks (a dirty round's single pages) share a writev: one
                # system call per batch, not per page.
                pieces: list[bytes | memoryview] = []
                batched = 0
                while due is not None and len(chunks) < _BATCH_FRAMES and batched < _BATCH_BYTES:
                    offset, size = due
                    if bounce is None:
                        data = view[offset : offset + size]
                    elif batched + size <= len(bounce):
                        data = bounce[batched : batched + size]
                        data[:] = view[offset : offset + size]
                    else:
                        break  # the bounce buffer is full: write this batch first
                    chunks.append(MemoryChunk(offset=offset, data=data))
                    pieces += session.send_iov(chunks[-1])
                    batched += size
                    due = session.memory_due()
                await self._write(pieces, chunks[-1])
                for chunk in chunks:
                    _release(chunk)
                chunks.clear()
        except BaseException as exc:
            session.fail(f"the memory stream was abandoned ({type(exc).__name__})")
            raise
        finally:
            for chunk in chunks:
                _release(chunk)
            chunks.clear()
            view.release()
            if bounce is not None:
                bounce.release()
        commit = session.make_commit()
        await self.send(commit)
        return commit

    def _bounce_view(self, chunk_size: int) -> memoryview:
        """A view of the bounce buffer, large enough for a batch (one chunk at least)."""
        size = max(_BATCH_BYTES, chunk_size)
        if self._bounce is None or len(self._bounce) < size:
            self._bounce = bytearray(size)
        return memoryview(self._bounce)

    async def send_error(self, error: BaseException | Error) -> None:
        """Tell the peer why the session ends on this side; best effort, never raises.

        ``error`` is the exception that ended the session (sent as
        `Error.from_exception` makes it) or the `Error` to send, its message
        cut to the 4096 characters allowed.  Nothing is sent when the peer
        cannot be told (the stream broke or is unframed) or needs not be
        (it ended the session itself: `ConnectionClosed`, `PeerError`).  The
        write is given ``_ERROR_SEND_TIMEOUT`` (1 s).
        """
        if self._broken is not None or isinstance(error, (ConnectionClosed, PeerError)):
            return
        if isinstance(error, Error):
            message = Error(code=error.code, message=error.message[:MAX_TEXT])
        else:
            message = Error.from_exception(error)
        try:
            pieces = self.session.send_iov(message)
        except ProtocolError:
            return
        with trio.move_on_after(_ERROR_SEND_TIMEOUT):
            try:
                await self._io.send(pieces)
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
                    raise peer_error(self.session.peer_role, message.code, message.message)
                if isinstance(message, Prepare):
                    self._io.grow_buffer("SO_RCVBUF")  # as `send` does: memory streams follow
                return message
        raise await self._timed_out()

    async def receive_memory(self, into: Any) -> Commit:
        """After ROUND or MIGRATE: receive every chunk straight into ``into`` (guest RAM), then COMMIT.

        The COMMIT's tag has been checked when this returns.  If it raises
        (cancellation included) the session has failed and no view of
        ``into`` made here or by the session outlives the call.
        """
        self.session.receive_memory_into(into)
        self._io.grow_buffer("SO_RCVBUF")
        try:
            while True:
                message = await self.receive()
                if isinstance(message, Commit):
                    return message
                assert isinstance(message, MemoryChunk), message  # the session allows nothing else
                _release(message)  # a view of ``into``; nothing here reads it
        except BaseException as exc:
            self.session.fail(f"the memory stream was abandoned ({type(exc).__name__})")
            raise

    async def _receive_one(self, scope: trio.CancelScope) -> Message:
        """The next event; waits under ``scope`` (the caller's), whose deadline this sets."""
        event = self._next_event()
        if event is not NEED_DATA:
            return event
        session = self.session
        # Read what is already there without waiting; only a wait for more
        # needs the deadline (and the scheduler).
        await trio.lowlevel.checkpoint_if_cancelled()
        while self._receive_now():
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
            try:
                await self._io.receive(session)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise self._broke(exc) from exc
            event = self._next_event()
            if event is not NEED_DATA:
                return event

    def _receive_now(self) -> bool:
        try:
            return self._io.receive_now(self.session)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise self._broke(exc) from exc

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
        session.fail(str(timeout))
        return timeout

    def _broke(self, exc: BaseException) -> ConnectionClosed:
        session = self.session
        session.fail("stream broke")
        return ConnectionClosed(
            f"stream from the {session.peer_role} broke (state {session.state.name}): {_reason(exc)}"
        )

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


def _release(chunk: MemoryChunk | None) -> None:
    """Release a chunk's view of the caller's memory (made here, read by no one after)."""
    if chunk is not None and isinstance(chunk.data, memoryview):
        chunk.data.release()


def _reason(exc: BaseException) -> str:
    """Why a stream broke: trio's BrokenResourceError often has no text of its own and carries
    the reason (a TLS alert, a reset) as its cause, which would otherwise be lost."""
    seen: BaseException | None = exc
    while seen is not None:
        if str(seen):
            return str(seen) if seen is exc else f"{type(seen).__name__}: {seen}"
        seen = seen.__cause__ or seen.__context__
    return type(exc).__name__

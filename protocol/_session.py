"""The sans-IO session: bytes in, messages out, no I/O (in the manner of h11).

Both sides run the same state machine over the one conversation; each
message, sent or received, moves it on.  A message the current state does
not allow is refused with an error naming the state and the message: a
`LocalProtocolError` if this side tried to send it, a `RemoteProtocolError`
if the peer did.

    source                                   destination
    HELLO ----------------------------------->
          <----------------------------------- HELLO     (or ERROR version)
    AUTH  ----------------------------------->
          <----------------------------------- AUTH      (or ERROR auth)
    CLOCK_REQUEST --------------------------->           } repeated,
          <----------------------------------- CLOCK_REPLY } at most max_clock_sync_rounds
    PREPARE --------------------------------->           } optional (without it,
          <----------------------------------- PREPARED  } MIGRATE from READY)
    ROUND, MEMORY × n, COMMIT --------------->           } precopy rounds, 0 or more
    MIGRATE, MEMORY × n, COMMIT ------------->
          <----------------------------------- REPORT    (or ERROR)
    ... more clock syncs or migrations ...
    BYE   -----------------------------------> (either side in READY; the source in PREPARED)

ERROR may be sent by either side in any state before BYE; it ends the session.

This module frames messages, MACs them and feeds them through the state table
(`_state.py`); one ROUND's or MIGRATE's memory (its runs, the chunk rule, the MAC,
the receive path straight into the caller's buffer) is `_memory.MemoryStream`.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace
from typing import Any

from ._auth import TAG_SIZE, FrameMac, derive_keys, make_proof, memory_key, transcript_hash, verify_proof
from ._errors import (
    AuthenticationFailed,
    ConnectionClosed,
    FieldError,
    IntegrityError,
    LimitError,
    LimitExceeded,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    VersionMismatch,
)
from ._frames import LENGTH, MEMORY_HEADER_SIZE, memory_header, pack, parse_memory_header, unpack
from ._limits import Limits
from ._memory import MemoryStream, byte_view, parse_runs
from ._messages import (
    NONCE_SIZE,
    PROTOCOL_VERSION,
    ROLES,
    Auth,
    Bye,
    ClockSyncReply,
    ClockSyncRequest,
    Commit,
    Error,
    Hello,
    MemoryChunk,
    Message,
    Migrate,
    Prepare,
    Prepared,
    Report,
    Role,
    Round,
    from_wire,
    name_of,
    validate,
)
from ._state import COVERED, END_OF_STREAM, NEED_DATA, State, next_state, refusal

__all__ = ["END_OF_STREAM", "NEED_DATA", "Preparation", "Session", "State"]

Event = Message | type[NEED_DATA] | type[END_OF_STREAM]


@dataclass(frozen=True)
class Preparation:
    """What a PREPARE announced (`Session.prepared`), and whether all memory has followed.

    ROUNDs and the MIGRATE of the preparation use its ``memory_size`` and
    ``chunk_size``.  ``whole_memory_sent`` turns true once a ROUND covering all
    of memory (runs None) has been committed: before that the destination's
    memory holds no copy of the guest's, so a MIGRATE with runs would restore
    a guest from pages never sent; the destination checks it.
    """

    strategy: str
    memory_size: int
    chunk_size: int
    whole_memory_sent: bool = False


class Session:
    """One side of one connection: feed it bytes, get messages; give it messages, get bytes.

    ``psk`` is the pre-shared key; an empty key is allowed for loopback use
    and authenticates nothing (anyone who can connect knows it).  The session
    never does I/O and never reads a clock; `protocol.Channel` drives it over
    a trio stream.
    """

    #: The version this side speaks (a class attribute so tests can play a future agent).
    protocol_version: int = PROTOCOL_VERSION

    def __init__(
        self,
        role: Role,
        psk: bytes,
        *,
        limits: Limits | None = None,
        nonce: bytes | None = None,
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be 'source' or 'destination', not {role!r}")
        if not isinstance(psk, bytes):
            raise TypeError("psk must be bytes")
        self.role: Role = role
        self.peer_role: Role = "destination" if role == "source" else "source"
        self.limits = limits if limits is not None else Limits()
        self.state = State.AWAIT_SOURCE_HELLO
        #: The peer's HELLO once received: its agent version and capabilities.
        self.peer_hello: Hello | None = None
        #: What ended the session, once state is ERROR.
        self.failure: str | None = None
        self._psk = psk
        self._nonce = nonce if nonce is not None else secrets.token_bytes(NONCE_SIZE)
        if len(self._nonce) != NONCE_SIZE:
            raise ValueError(f"nonce must be {NONCE_SIZE} bytes")
        self._hello_bodies: dict[Role, bytes] = {}
        self._transcript: bytes | None = None
        self._send_mac: FrameMac | None = None
        self._recv_mac: FrameMac | None = None
        self._keys: dict[Role, bytes] = {}
        self._buf = bytearray()
        self._eof = False
        self._clock_t1: int | None = None
        self._clock_rounds = 0
        self._memory: MemoryStream | None = None
        #: Where the current memory stream's chunks are due, and where its COMMIT is
        #: (MEMORY and COMMIT for a MIGRATE's, ROUND_MEMORY and ROUND_COMMIT for a ROUND's).
        self._streaming = State.MEMORY
        self._committing = State.COMMIT
        #: Memory streams (ROUNDs and MIGRATEs) so far in this session: each one's memory
        #: MAC has its own one-time key, the n-th stream's (docs/security.md).
        self._memory_streams = 0
        #: The PREPARE in force (from PREPARE until its migration's REPORT or BYE), else None.
        self.prepared: Preparation | None = None
        self._sent_error = False

    # -- building the messages only the session can fill in ------------------

    def make_hello(self, agent_version: str, capabilities: dict[str, Any]) -> Hello:
        """This side's HELLO, carrying the protocol version, the role and the session's nonce."""
        return Hello(
            protocol_version=self.protocol_version,
            agent_version=agent_version,
            role=self.role,
            capabilities=capabilities,
            nonce=self._nonce,
        )

    def make_auth(self) -> Auth:
        """This side's AUTH proof; the destination can build it only once the source proved."""
        due = State.AWAIT_SOURCE_AUTH if self.role == "source" else State.AWAIT_DESTINATION_AUTH
        if self.state is not due or self._transcript is None:
            raise LocalProtocolError(f"cannot build AUTH in state {self.state.name} ({self.role})")
        return Auth(proof=make_proof(self._psk, self.role, self._transcript))

    def make_commit(self) -> Commit:
        """The COMMIT closing the memory stream sent so far (its memory MAC's tag)."""
        if self.state is not self._committing or self._memory is None or self.role != "source":
            raise LocalProtocolError(f"cannot build COMMIT in state {self.state.name} ({self.role})")
        return Commit(tag=self._memory.finish())

    # -- failure -----------------------------------------------------------------

    def fail(self, reason: str) -> None:
        """Mark the session failed (state ERROR) for a reason found outside it.

        For the I/O layer (as h11's ``send_failed``): a write cut short, a
        timeout, a broken stream, a memory stream abandoned half way.  Only an
        ERROR may be sent afterwards.  The first reason is the one kept.  The
        session lets go of the caller's memory buffer: every view of it made
        here is released (those a hash job still reads once it is done), so
        the caller can unmap it.
        """
        self.state = State.ERROR
        if self.failure is None:
            self.failure = reason
        if self._memory is not None:
            self._memory.release()

    # -- sending ---------------------------------------------------------------

    def send(self, message: Message) -> bytes:
        """The bytes that carry ``message`` to the peer; the state moves on."""
        return b"".join(self.send_iov(message))

    def send_iov(self, message: Message) -> list[bytes | memoryview]:
        """Like `send`, as pieces to write in order; a MEMORY chunk's data is not copied.

        A MEMORY chunk's pieces are its header, the caller's data itself (to be
        written with ``writev``, straight from guest memory) and its tag; the
        data is MACed here, so it must not change until it is written.
        """
        if self.state is State.ERROR and not (isinstance(message, Error) and not self._sent_error):
            raise LocalProtocolError(
                f"cannot send {name_of(message)} in state ERROR (session failed: {self.failure})"
            )
        try:
            validate(message, self.limits)
        except FieldError as exc:
            raise LocalProtocolError(str(exc)) from None
        if isinstance(message, MemoryChunk):
            data = byte_view(message.data)
            try:
                return self._send_memory_iov(message.offset, data)
            except BaseException:
                data.release()  # refused: no view of the caller's memory stays behind
                raise
        try:
            body = pack(message.to_wire())
        except (ValueError, TypeError, OverflowError) as exc:  # validate() should prevent this
            raise LocalProtocolError(f"{name_of(message)} cannot be encoded: {exc}") from None
        length = len(body) + (TAG_SIZE if self._send_mac is not None else 0)
        if length > self.limits.max_frame_size:
            raise LocalProtocolError(
                f"{name_of(message)} needs a {length}-byte frame, over max_frame_size "
                f"{self.limits.max_frame_size}"
            )
        self._advance(self.role, message, local=True)
        if isinstance(message, Hello):
            self._hello_bodies[self.role] = body
            self._after_hellos()
        frame = LENGTH.pack(length) + body
        if self._send_mac is not None:
            frame += self._send_mac.tag(length, [body])  # small messages: one write, one segment
        if isinstance(message, Auth):
            self._send_mac = FrameMac(self._keys[self.role])
        if isinstance(message, Error):
            self._sent_error = True
        return [frame]

    def _send_memory_iov(self, offset: int, data: memoryview) -> list[bytes | memoryview]:
        """A MEMORY chunk's pieces: header, the caller's data itself, tag; the state's check,
        then the stream's."""
        header = memory_header(offset, len(data))
        length = len(header) + len(data) + (TAG_SIZE if self._send_mac is not None else 0)
        if length > self.limits.max_frame_size:
            raise LocalProtocolError(
                f"MEMORY needs a {length}-byte frame, over max_frame_size {self.limits.max_frame_size}"
            )
        stream = self._memory
        if next_state(self.state, self.role, MemoryChunk) is None or stream is None:
            self._refuse(self.role, MemoryChunk, local=True)
        assert stream is not None
        stream.check(offset, len(data), LocalProtocolError)
        stream.hash(stream.track(data))
        if stream.advance(len(data)):
            self.state = self._committing
        pieces: list[bytes | memoryview] = [LENGTH.pack(length) + header, data]
        if self._send_mac is not None:
            pieces.append(self._send_mac.tag(length, [header]))
        return pieces

    # -- receiving -------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes read from the stream; ``b""`` means the peer closed it."""
        if self._eof and data:
            raise LocalProtocolError("receive_data after end of stream")
        if not data:
            self._eof = True
            return
        stream = self._memory
        if stream is not None and stream.partial is not None and not self._buf:
            # Inside a MEMORY frame's data: straight to the sink, not via the buffer.
            view = byte_view(data)
            if stream.partial.got < stream.partial.size:
                take = stream.absorb(view)
                data = view[take:]
                if not data:
                    return
        self._buf += data

    def memory_window(self) -> memoryview | None:
        """The part of the memory buffer the next received bytes belong to, if any.

        Non-None only inside a MEMORY frame's data when nothing else is
        buffered: the caller may then receive straight into it (``recv_into``)
        and report the count with `memory_received`, so the bytes are copied
        once, from the kernel into guest memory.
        """
        stream = self._memory
        if stream is None or self._buf:
            return None
        return stream.window()

    def memory_read_limit(self) -> int | None:
        """At most this many bytes should be read next, so that MEMORY data lands straight in the sink.

        Non-None on a destination with a sink between chunks: reading only up
        to the end of the next MEMORY header (and the tag before it) lets the
        caller then receive the data itself into `memory_window`, instead of
        reading it into a buffer and copying it twice.
        """
        stream = self._memory
        if stream is None or stream.sink is None or self.role != "destination":
            return None
        partial = stream.partial
        header = LENGTH.size + MEMORY_HEADER_SIZE
        if partial is None:
            need = header - len(self._buf) if self.state is self._streaming else 0
        elif partial.got == partial.size and stream.covered + partial.size < stream.total:
            need = (TAG_SIZE if self._recv_mac is not None else 0) + header - len(self._buf)
        else:
            return None
        return need if need > 0 else None

    def memory_received(self, count: int) -> None:
        """Account ``count`` bytes the caller wrote at the start of `memory_window()`."""
        window = self.memory_window()
        if window is None or not 0 < count <= len(window):
            raise LocalProtocolError(f"memory_received({count}) outside the memory window")
        assert self._memory is not None
        self._memory.received(self._memory.track(window[:count]))

    def memory_due(self) -> tuple[int, int] | None:
        """``(offset, size)`` of the MEMORY chunk due next (the stream's rule), else None."""
        stream = self._memory
        if stream is None or self.state is not self._streaming:
            return None
        return stream.offset, stream.due

    @property
    def memory_progress(self) -> tuple[int, int, int] | None:
        """``(offset, memory_size, chunk_size)`` of the memory stream in progress, else None."""
        stream = self._memory
        if stream is None or (self.state is not self._streaming and self.state is not self._committing):
            return None
        return stream.offset, stream.size, stream.chunk_size

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as messages (non-zero: a frame has begun)."""
        stream = self._memory
        if stream is not None and stream.partial is not None:
            return len(self._buf) + LENGTH.size + MEMORY_HEADER_SIZE + stream.partial.got
        return len(self._buf)

    def receive_memory_into(self, buffer: Any) -> None:
        """Write the coming MEMORY chunks' data straight into ``buffer`` at their offsets.

        Call after ROUND or MIGRATE was received and before its first chunk; ``buffer``
        is any writable, contiguous buffer of at least ``memory_size`` bytes
        (the guest's RAM, say), so the whole memory is never held twice.  The
        data is MACed as it arrives.  If the session fails, it releases every
        view of ``buffer`` it made (`fail`).
        """
        stream = self._memory
        if (
            stream is None
            or stream.covered
            or self.role != "destination"
            or (self.state is not self._streaming and self.state is not self._committing)
        ):
            raise LocalProtocolError(
                f"receive_memory_into is for a destination before the first MEMORY chunk of a ROUND or MIGRATE "
                f"(state {self.state.name}, {self.role})"
            )
        view = byte_view(buffer)
        if view.readonly:
            raise LocalProtocolError("receive_memory_into needs a writable buffer")
        if len(view) < stream.size:
            raise LocalProtocolError(
                f"receive_memory_into buffer holds {len(view)} bytes, memory_size is {stream.size}"
            )
        stream.receive_into(view)

    def next_event(self) -> Event:
        """The next message from the peer, or `NEED_DATA`, or `END_OF_STREAM`.

        Raises a `RemoteProtocolError` (or one of its kin) if the peer broke
        the protocol; the session is then in state ERROR.
        """
        if self.state is State.ERROR:
            if not self._buf:
                return END_OF_STREAM if self._eof else NEED_DATA
            raise RemoteProtocolError(f"cannot receive in state ERROR (session failed: {self.failure})")
        try:
            return self._next_event()
        except ProtocolError as exc:
            # Views of the buffer may live on in the traceback: start a new one.
            self._buf = bytearray()
            self.fail(str(exc))
            raise

    def _next_event(self) -> Event:
        stream = self._memory
        if stream is not None and stream.partial is not None:
            return self._continue_partial(stream)
        buf = self._buf
        if len(buf) < LENGTH.size:
            if not self._eof:
                return NEED_DATA
            if not buf and self.state is State.CLOSED:
                return END_OF_STREAM
            raise ConnectionClosed(
                f"peer ({self.peer_role}) closed the stream in state {self.state.name}"
                + (" in the middle of a frame" if buf else "")
            )
        (length,) = LENGTH.unpack_from(buf)
        if self._recv_mac is None:      # the peer has not proved the key yet
            limit, limit_name = (min(self.limits.max_frame_size,
                                     self.limits.max_unauthenticated_frame_size),
                                 "max_unauthenticated_frame_size")
        else:
            limit, limit_name = self.limits.max_frame_size, "max_frame_size"
        if length > limit:
            raise LimitExceeded(
                f"frame of {length} bytes from the {self.peer_role} exceeds {limit_name} "
                f"{limit} (state {self.state.name})"
            )
        tag_size = TAG_SIZE if self._recv_mac is not None else 0
        if length <= tag_size:
            raise RemoteProtocolError(f"empty frame from the {self.peer_role} (state {self.state.name})")
        end = LENGTH.size + length
        if len(buf) < end:
            if self._eof:
                raise self._closed_mid_frame()
            if stream is not None and self._begin_partial(stream, length, tag_size):
                return self._continue_partial(stream)
            return NEED_DATA
        with memoryview(buf) as view:
            message = self._read_frame(view, length, end - tag_size, end)
        del buf[:end]
        return message

    def _closed_mid_frame(self) -> ConnectionClosed:
        return ConnectionClosed(
            f"peer ({self.peer_role}) closed the stream in the middle of a frame (state {self.state.name})"
        )

    def _begin_partial(self, stream: MemoryStream, length: int, tag_size: int) -> bool:
        """Start streaming an incomplete MEMORY frame's data into the sink, if it is one.

        Only a header that is exactly what the state demands (the expected
        offset and size) qualifies; anything else waits for its whole frame
        and is judged there, MAC first.  The header's MAC is checked when the
        frame ends; the data it announces is written where the state says
        it belongs, and is trusted only once COMMIT's tag matches.
        """
        if (
            stream.sink is None
            or self.state is not self._streaming
            or self.role != "destination"
            or len(self._buf) < LENGTH.size + MEMORY_HEADER_SIZE
        ):
            return False
        header = bytes(self._buf[LENGTH.size : LENGTH.size + MEMORY_HEADER_SIZE])
        try:
            layout = parse_memory_header(memoryview(header), partial=True)
        except FieldError:
            return False
        if layout is None:
            return False
        offset, size = layout
        if length != MEMORY_HEADER_SIZE + size + tag_size or not stream.begin(length, header, offset, size):
            return False
        del self._buf[: LENGTH.size + MEMORY_HEADER_SIZE]
        return True

    def _continue_partial(self, stream: MemoryStream) -> Event:
        partial = stream.partial
        assert partial is not None
        buf = self._buf
        if partial.got < partial.size and buf:
            with memoryview(buf) as view:
                take = stream.absorb(view)
            del buf[:take]
        tag_size = TAG_SIZE if self._recv_mac is not None else 0
        if partial.got < partial.size or len(buf) < tag_size:
            if self._eof:
                raise self._closed_mid_frame()
            return NEED_DATA
        with memoryview(buf) as view:
            self._verify_frame(partial.length, memoryview(partial.header), view[:tag_size])
        del buf[:tag_size]
        offset, data = stream.end_partial()
        self.state = self._committing if stream.complete else self._streaming
        return MemoryChunk(offset=offset, data=data)

    def _read_frame(self, view: memoryview, length: int, body_end: int, end: int) -> Message:
        body = view[LENGTH.size : body_end]
        try:
            layout = parse_memory_header(body)
        except FieldError as exc:
            # Not a well-formed MEMORY frame: it must then carry a MAC over its
            # whole body, and a frame failing that is an authentication failure.
            self._verify_frame(length, body, view[body_end:end])
            raise RemoteProtocolError(f"{exc} (from the {self.peer_role})") from None
        self._verify_frame(length, body if layout is None else body[:MEMORY_HEADER_SIZE], view[body_end:end])
        if layout is not None:
            return self._read_memory(layout[0], body[MEMORY_HEADER_SIZE:])
        try:
            obj = unpack(body, self.limits)
            if self.state is State.AWAIT_DESTINATION_HELLO or self.state is State.AWAIT_SOURCE_HELLO:
                self._check_version(obj)
            message = from_wire(obj, self.limits)
        except LimitError as exc:
            raise LimitExceeded(f"{exc} (from the {self.peer_role}, state {self.state.name})") from None
        except FieldError as exc:
            raise RemoteProtocolError(
                f"{exc} (from the {self.peer_role}, state {self.state.name})"
            ) from None
        if isinstance(message, MemoryChunk):
            raise RemoteProtocolError("MEMORY message not in its fixed layout (uint64 offset, bin32 data)")
        self._advance(self.peer_role, message, local=False)
        if isinstance(message, Hello):
            self._hello_bodies[self.peer_role] = bytes(body)
            self.peer_hello = message
            self._after_hellos()
        elif isinstance(message, Auth):
            self._recv_mac = FrameMac(self._keys[self.peer_role])
        return message

    def _verify_frame(self, length: int, maced: memoryview, tag: memoryview) -> None:
        if self._recv_mac is not None and not self._recv_mac.verify(length, [maced], tag):
            raise AuthenticationFailed(
                f"frame {self._recv_mac.seq - 1} from the {self.peer_role} fails its MAC "
                f"(state {self.state.name}): altered, replayed, reordered or injected"
            )

    def _read_memory(self, offset: int, data: memoryview) -> MemoryChunk:
        """A whole MEMORY frame arrived (its header's MAC verified): the state's check, the stream's."""
        stream = self._memory
        if next_state(self.state, self.peer_role, MemoryChunk) is None or stream is None:
            self._refuse(self.peer_role, MemoryChunk, local=False)
        assert stream is not None
        stream.check(offset, len(data), RemoteProtocolError)
        stream.hash(data)
        if stream.sink is not None:
            chunk = MemoryChunk(offset=offset, data=stream.store(offset, data))
        else:
            chunk = MemoryChunk(offset=offset, data=bytes(data))
        if stream.advance(len(data)):
            self.state = self._committing
        return chunk

    def _check_version(self, obj: Any) -> None:
        # Before the strict field checks: a later version's HELLO may have other fields.
        if isinstance(obj, dict) and obj.get("type") == "hello":
            version = obj.get("protocol_version")
            if type(version) is int and 0 <= version <= 0xFFFF and version != self.protocol_version:
                raise VersionMismatch(
                    f"the {self.peer_role} speaks protocol version {version}, this {self.role} "
                    f"speaks version {self.protocol_version}: upgrade one of the two agents"
                )

    # -- the state machine -----------------------------------------------------

    def _refuse(self, sender: Role, kind: type[Message], *, local: bool) -> None:
        error: type[ProtocolError] = LocalProtocolError if local else RemoteProtocolError
        who = "this side" if local else "the peer"
        raise error(f"{who} ({sender}) " + refusal(self.state, sender, kind))

    def _advance(self, sender: Role, message: Message, *, local: bool) -> None:
        """Move the state on for ``message`` (not MEMORY) from ``sender``, or raise naming both."""
        error: type[ProtocolError] = LocalProtocolError if local else RemoteProtocolError
        if isinstance(message, Error):
            if self.state is State.CLOSED:
                who = "this side" if local else "the peer"
                raise error(f"{who} ({sender}) sent ERROR in state CLOSED, after BYE")
            self.fail(f"{sender} sent ERROR {message.code!r}: {message.message}")
            return
        following = next_state(self.state, sender, type(message))
        if following is None:
            self._refuse(sender, type(message), local=local)
        assert following is not None
        limit_error: type[ProtocolError] = LocalProtocolError if local else LimitExceeded
        if isinstance(message, Hello):
            self._check_hello(message, local)
        elif isinstance(message, Auth):
            if not local:
                self._verify_auth(message)
        elif isinstance(message, ClockSyncRequest):
            if self._clock_rounds >= self.limits.max_clock_sync_rounds:
                raise limit_error(
                    f"more than {self.limits.max_clock_sync_rounds} CLOCK_REQUESTs in a row"
                )
            self._clock_rounds += 1
            self._clock_t1 = message.t1
        elif isinstance(message, ClockSyncReply):
            if message.t1 != self._clock_t1:
                raise error(f"CLOCK_REPLY echoes t1={message.t1}, the request had t1={self._clock_t1}")
            if message.t3 < message.t2:
                raise error(f"CLOCK_REPLY sent (t3={message.t3}) before received (t2={message.t2})")
        elif isinstance(message, Prepare):
            self._check_chunk_fits(message, limit_error)
            self._clock_rounds = 0
            self.prepared = Preparation(message.strategy, message.memory_size, message.chunk_size)
        elif isinstance(message, Round):
            prepared = self.prepared
            assert prepared is not None  # PREPARED has one
            runs = self._parse_runs(message.runs, prepared.memory_size, "ROUND.runs", error, limit_error)
            following = self._start_stream(prepared.memory_size, prepared.chunk_size, runs, following)
        elif isinstance(message, Migrate):
            self._check_chunk_fits(message, limit_error)
            prepared = self.prepared
            if self.state is State.PREPARED and prepared is not None and (
                (message.memory_size, message.chunk_size) != (prepared.memory_size, prepared.chunk_size)
            ):
                raise error(
                    f"MIGRATE announces memory_size {message.memory_size} and chunk_size "
                    f"{message.chunk_size} in state PREPARED, where PREPARE announced memory_size "
                    f"{prepared.memory_size} and chunk_size {prepared.chunk_size}"
                )
            runs = self._parse_runs(message.runs, message.memory_size, "MIGRATE.runs", error, limit_error)
            self._clock_rounds = 0
            following = self._start_stream(message.memory_size, message.chunk_size, runs, following)
        elif isinstance(message, Commit):
            stream, self._memory = self._memory, None
            assert stream is not None
            if not stream.verify(message.tag):
                if local:
                    raise LocalProtocolError("COMMIT.tag differs from the memory sent")
                raise IntegrityError(
                    "COMMIT.tag differs from the Poly1305 tag of the memory received: "
                    "the memory stream was corrupted"
                )
            if self.state is State.ROUND_COMMIT and stream.runs == [(0, stream.size)] and self.prepared:
                self.prepared = replace(self.prepared, whole_memory_sent=True)
        elif isinstance(message, (Report, Bye)):
            self._clock_rounds = 0
            self.prepared = None  # the migration, or the preparation BYE gives up, is over
        self.state = following

    def _check_chunk_fits(self, message: Prepare | Migrate, limit_error: type[ProtocolError]) -> None:
        if message.chunk_size + MEMORY_HEADER_SIZE + TAG_SIZE + LENGTH.size > self.limits.max_frame_size:
            raise limit_error(f"{name_of(message)}.chunk_size {message.chunk_size} does not fit max_frame_size")

    def _parse_runs(
        self,
        runs: bytes | None,
        memory_size: int,
        name: str,
        error: type[ProtocolError],
        limit_error: type[ProtocolError],
    ) -> list[tuple[int, int]]:
        try:
            return parse_runs(runs, memory_size, self.limits, name)
        except LimitError as exc:
            raise limit_error(f"{exc} (state {self.state.name})") from None
        except FieldError as exc:
            raise error(f"{exc} (state {self.state.name})") from None

    def _start_stream(self, memory_size: int, chunk_size: int, runs: list[tuple[int, int]], streaming: State) -> State:
        """Open the memory stream a ROUND or MIGRATE announced, under the next one-time key;
        the state it leads to (its COMMIT's at once when it has no runs)."""
        key = memory_key(self._keys["source"], self._memory_streams)
        self._memory_streams += 1
        self._memory = MemoryStream(memory_size, chunk_size, runs, key)
        self._streaming, self._committing = streaming, COVERED[streaming]
        return self._committing if self._memory.complete else streaming

    def _check_hello(self, hello: Hello, local: bool) -> None:
        if local:
            if hello.nonce != self._nonce or hello.role != self.role:
                raise LocalProtocolError("HELLO must come from Session.make_hello (nonce and role)")
            if hello.protocol_version != self.protocol_version:
                raise LocalProtocolError(f"HELLO.protocol_version must be {self.protocol_version}")
            return
        if hello.role != self.peer_role:
            raise RemoteProtocolError(f"peer HELLO says it is a {hello.role}; this side is the {self.role}")
        if hello.nonce == self._nonce:
            raise AuthenticationFailed("peer HELLO carries this side's own nonce: a reflection")

    def _after_hellos(self) -> None:
        if len(self._hello_bodies) == 2:
            self._transcript = transcript_hash(
                self._hello_bodies["source"], self._hello_bodies["destination"]
            )
            source_key, destination_key = derive_keys(self._psk, self._transcript)
            self._keys = {"source": source_key, "destination": destination_key}

    def _verify_auth(self, auth: Auth) -> None:
        assert self._transcript is not None
        if not verify_proof(self._psk, self.peer_role, self._transcript, auth.proof):
            raise AuthenticationFailed(
                f"the {self.peer_role} failed to prove the pre-shared key (wrong key, "
                "replayed or reflected proof)"
            )


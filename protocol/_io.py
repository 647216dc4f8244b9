"""The byte I/O a `Channel` needs, behind one small interface (as httpcore's backends).

Two implementations:

* `SocketIO`, for a plain `trio.SocketStream`: non-blocking ``writev``/``readv``
  on its fd.  A frame the kernel takes at once, or bytes already there, cost
  no cancel scope and no trip through trio's scheduler; MEMORY data is read
  straight into the session's memory window (kernel to guest RAM, one copy).
* `StreamIO`, for any other `trio.abc.Stream` (TLS, memory streams):
  ``send_all`` / ``receive_some``; nothing moves without waiting.

Both raise trio's own errors for a broken or closed stream
(`trio.BrokenResourceError`, `trio.ClosedResourceError`, or the `OSError` a
wait ends with); the channel turns them into protocol errors.  Pieces are consumed in place, so the caller holds
the only list of what is left to write (and can drop it at once).
"""

from __future__ import annotations

import os
import socket

import trio

from ._session import Session

__all__ = ["ByteIO", "SocketIO", "StreamIO", "open_io"]

#: Socket buffers asked for while memory streams (the kernel caps them at
#: net.core.wmem_max / rmem_max): fewer wake-ups per MiB on fast links.
_STREAM_BUFFER = 4 << 20

Pieces = list[bytes | memoryview]


class ByteIO:
    """What the channel asks of a stream; the base class is the generic `trio.abc.Stream` path."""

    def __init__(self, stream: trio.abc.Stream, receive_size: int) -> None:
        self.stream = stream
        self.receive_size = receive_size

    def send_now(self, pieces: Pieces) -> None:
        """Write what the stream takes without waiting, removing it from ``pieces``."""

    async def send(self, pieces: Pieces) -> None:
        """Write all of ``pieces`` (waiting as needed), removing each from the list once written."""
        while pieces:
            await self.stream.send_all(pieces[0])
            del pieces[0]

    def receive_now(self, session: Session) -> bool:
        """Give the session the bytes already there, without waiting; False if there were none."""
        return False

    async def receive(self, session: Session) -> None:
        """Wait for bytes and give them to the session (``b""``: the peer closed the stream)."""
        session.receive_data(await self.receive_some())

    async def receive_some(self) -> bytes | bytearray:
        """Wait for bytes and return them (``b""``: the peer closed): for a look past a failure."""
        return await self.stream.receive_some(self.receive_size)

    def grow_buffer(self, option: str) -> None:
        """Ask for bigger socket buffers for a memory stream (``SO_SNDBUF``/``SO_RCVBUF``)."""


class StreamIO(ByteIO):
    """Any other `trio.abc.Stream` (TLS, memory streams): the generic path of `ByteIO` itself."""


class SocketIO(ByteIO):
    """A plain TCP stream driven through its fd, without waiting when the kernel allows."""

    stream: trio.SocketStream

    def __init__(self, stream: trio.SocketStream, receive_size: int) -> None:
        super().__init__(stream, receive_size)
        self._rbuf: memoryview | None = None  # the one receive buffer, made on first use

    def _fd(self) -> int:
        fd = self.stream.socket.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("the stream is closed")
        return fd

    def send_now(self, pieces: Pieces) -> None:
        try:
            _consume(pieces, _writev(self._fd(), pieces))
        except BlockingIOError:
            pass

    async def send(self, pieces: Pieces) -> None:
        fd = self._fd()
        while pieces:
            await trio.lowlevel.wait_writable(fd)
            try:
                _consume(pieces, _writev(fd, pieces))
            except BlockingIOError:
                pass

    def receive_now(self, session: Session) -> bool:
        """Read what the socket holds; inside a MEMORY frame's data, straight into the sink."""
        fd = self._fd()
        try:
            window = session.memory_window()
            if window is not None:
                count = os.readv(fd, [window])
                del window
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
            raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc

    async def receive(self, session: Session) -> None:
        while True:
            await trio.lowlevel.wait_readable(self._fd())
            if self.receive_now(session):
                return

    def grow_buffer(self, option: str) -> None:
        try:
            level, name = socket.SOL_SOCKET, getattr(socket, option)
            if self.stream.socket.getsockopt(level, name) < _STREAM_BUFFER:
                self.stream.setsockopt(level, name, _STREAM_BUFFER)
        except OSError:  # pragma: no cover - a platform without it
            pass


def open_io(stream: trio.abc.Stream, receive_size: int) -> ByteIO:
    """The I/O for ``stream``: the fd path for plain TCP, the generic one for anything else."""
    if isinstance(stream, trio.SocketStream):
        return SocketIO(stream, receive_size)
    return StreamIO(stream, receive_size)


def _writev(fd: int, pieces: Pieces) -> int:
    """os.writev, a broken connection raised as trio does (BrokenResourceError)."""
    try:
        return os.writev(fd, pieces)
    except BlockingIOError:
        raise
    except OSError as exc:
        raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc


def _consume(pieces: Pieces, sent: int) -> None:
    """Remove the first ``sent`` bytes from ``pieces``, in place (no named view outlives it)."""
    while pieces:
        size = len(pieces[0])
        if sent < size:
            if sent:
                pieces[0] = memoryview(pieces[0])[sent:]
            return
        sent -= size
        del pieces[0]

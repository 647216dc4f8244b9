"""One MIGRATE's memory stream: what is due next, the digest, and the zero-copy receive path.

Apart from the session's framing and MAC (`_session.py`), which only hands
this class the pieces of MEMORY frames.  It owns:

* the rule of the stream, written once (`due`, `check`): chunks are contiguous
  from offset 0, each ``chunk_size`` bytes but the last (the remainder);
* the COMMIT digest, hashed here or, deferred, by the caller's jobs
  (`take_job`), in order either way;
* the receive path into the caller's buffer (the *sink*, guest RAM): a MEMORY
  frame whose header is the one due is written straight into the sink as its
  data arrives (`begin`, `window`, `absorb`), one copy from the kernel;
* every view of the caller's buffer made here, so that a failed stream can
  release them all (`release`): the caller can then unmap its buffer, whatever
  tracebacks or chunks still refer to those views.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Callable
from typing import Any

from ._errors import LocalProtocolError, ProtocolError

__all__ = ["MemoryStream", "byte_view"]


def byte_view(data: Any) -> memoryview:
    """A flat byte view of a contiguous buffer (guest RAM, bytes, an array)."""
    view = memoryview(data)
    if not view.c_contiguous:
        raise LocalProtocolError("memory buffers must be contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


class _Partial:
    """A MEMORY frame whose header has arrived and whose data goes straight to the sink."""

    __slots__ = ("length", "header", "offset", "size", "got")

    def __init__(self, length: int, header: bytes, offset: int, size: int) -> None:
        self.length = length
        self.header = header
        self.offset = offset
        self.size = size
        self.got = 0


class MemoryStream:
    """Progress of one MIGRATE's memory: the next offset, the digest so far, the sink.

    With deferred hashing, the bytes sent or received but not hashed yet stay
    here as views (of the caller's buffer, or one range of the sink) until a
    job (`take_job`) or `finish` hashes them, in order.
    """

    def __init__(self, size: int, chunk_size: int) -> None:
        self.size = size
        self.chunk_size = chunk_size
        self.offset = 0
        self.digest = hashlib.sha256()
        #: The caller's buffer the received data is written into (`receive_into`).
        self.sink: memoryview | None = None
        #: Received bytes are hashed by the caller's jobs (set with the sink).
        self.defer_received = False
        #: The MEMORY frame being streamed into the sink, if any.
        self.partial: _Partial | None = None
        self.pending: list[memoryview] = []
        self.pending_bytes = 0
        self.pending_at = 0  # with a sink: the pending bytes are sink[pending_at : + pending_bytes]
        #: A job over earlier bytes runs somewhere (its views are `_lent`).
        self.hashing = False
        self.released = False
        self._lent: list[memoryview] = []
        self._views: list[weakref.ref[memoryview]] = []

    # -- the rule of the stream ------------------------------------------------

    @property
    def due(self) -> int:
        """The size the next chunk must have: ``chunk_size``, or the remainder for the last."""
        return min(self.chunk_size, self.size - self.offset)

    def expects(self, offset: int, size: int) -> bool:
        """Whether a chunk of ``size`` bytes at ``offset`` is the one due."""
        return offset == self.offset and size == self.due

    def check(self, offset: int, size: int, error: type[ProtocolError]) -> None:
        """Raise ``error`` naming what differs unless the chunk is the one due."""
        if offset != self.offset:
            raise error(f"MEMORY chunk at offset {offset}, expected offset {self.offset}")
        if size != self.due:
            raise error(f"MEMORY chunk at offset {offset} has {size} bytes, expected {self.due}")

    def advance(self, size: int) -> bool:
        """Count a chunk of ``size`` bytes (already checked); True once the memory is complete."""
        self.offset += size
        return self.offset == self.size

    # -- hashing -----------------------------------------------------------------

    def hash(self, view: memoryview, at: int, defer: bool) -> None:
        """Account the memory bytes ``view`` (at offset ``at``), sent or received, in order."""
        if not defer:
            if self.pending_bytes:  # keep the order: what is pending comes first
                if self.hashing:
                    raise LocalProtocolError("memory hashed here while a hash job is still running")
                for earlier in self._take():
                    self.digest.update(earlier)
            self.digest.update(view)
        elif self.sink is not None:  # received pieces are contiguous in the sink: one range
            if not self.pending_bytes:
                self.pending_at = at
            self.pending_bytes += len(view)
        else:  # sent pieces: views of the caller's buffer, tracked by the session already
            self.pending.append(view)
            self.pending_bytes += len(view)

    def take_job(self) -> Callable[[], None] | None:
        """A job hashing the bytes pending so far, in order; None if there are none."""
        if not self.pending_bytes:
            return None
        if self.hashing:
            raise LocalProtocolError("memory_hash_job while the previous job is still running")
        views = self._lent = self._take()
        self.hashing = True
        digest = self.digest

        def job() -> None:
            for view in views:
                digest.update(view)

        return job

    def job_done(self) -> None:
        """The job from `take_job` has returned: its views are no longer read."""
        self.hashing = False
        lent, self._lent = self._lent, []
        if self.released:
            for view in lent:
                view.release()

    def finish(self) -> bytes:
        """The digest of everything, hashing what is pending here and now."""
        if self.hashing:
            raise LocalProtocolError("the memory digest is needed while a hash job is still running")
        for view in self._take():
            self.digest.update(view)
        return self.digest.digest()

    def _take(self) -> list[memoryview]:
        if self.sink is not None and self.pending_bytes:
            views = [self.track(self.sink[self.pending_at : self.pending_at + self.pending_bytes])]
        else:
            views = self.pending
        self.pending, self.pending_bytes = [], 0
        return views

    # -- receiving straight into the sink ---------------------------------------

    def receive_into(self, view: memoryview, defer: bool) -> None:
        """Write the coming chunks' data into ``view``; ``defer``: the caller's jobs hash it."""
        self.sink = self.track(view)
        self.defer_received = defer

    def begin(self, length: int, header: bytes, offset: int, size: int) -> bool:
        """Stream the data of a MEMORY frame whose header arrived, if it is the chunk due."""
        if self.sink is None or not self.expects(offset, size):
            return False
        self.partial = _Partial(length, header, offset, size)
        return True

    def window(self) -> memoryview | None:
        """The part of the sink the partial frame's next data bytes belong to, if any."""
        partial = self.partial
        if partial is None or partial.got >= partial.size or self.sink is None:
            return None
        return self.track(self.sink[partial.offset + partial.got : partial.offset + partial.size])

    def absorb(self, piece: memoryview) -> int:
        """Copy what of ``piece`` belongs to the partial frame's data into the sink; how much."""
        partial = self.partial
        assert partial is not None and self.sink is not None
        take = min(len(piece), partial.size - partial.got)
        start = partial.offset + partial.got
        target = self.track(self.sink[start : start + take])
        target[:] = piece[:take]
        self.received(target)
        return take

    def received(self, view: memoryview) -> None:
        """The partial frame's next ``len(view)`` data bytes are in the sink (``view``)."""
        partial = self.partial
        assert partial is not None
        self.hash(view, partial.offset + partial.got, self.defer_received)
        partial.got += len(view)

    def end_partial(self) -> tuple[int, memoryview]:
        """The partial frame ended (its MAC verified): its offset and data in the sink."""
        partial = self.partial
        assert partial is not None and self.sink is not None
        self.partial = None
        self.advance(partial.size)
        return partial.offset, self.track(self.sink[partial.offset : partial.offset + partial.size])

    def store(self, offset: int, data: memoryview) -> memoryview:
        """Copy a whole chunk (the one due) from the frame buffer into the sink; the sink's view."""
        assert self.sink is not None
        target = self.track(self.sink[offset : offset + len(data)])
        target[:] = data
        return target

    # -- failure -------------------------------------------------------------------

    def track(self, view: memoryview) -> memoryview:
        """Note ``view`` (of the caller's buffer) so that `release` can release it."""
        self._views.append(weakref.ref(view))
        return view

    def release(self) -> None:
        """The stream failed: release every view of the caller's buffer made here.

        Views a running job reads are released when it is done (`job_done`);
        chunks handed out (``MemoryChunk.data``) are released too, since the
        data they show was never vouched for by a COMMIT.
        """
        self.released = True
        self.partial = None
        self.sink = None
        self.pending, self.pending_bytes = [], 0
        lent = {id(view) for view in self._lent}
        views, self._views = self._views, []
        for ref in views:
            view = ref()
            if view is not None and id(view) not in lent:
                try:
                    view.release()
                except BufferError:  # the caller holds an export of a chunk it was given: theirs
                    pass

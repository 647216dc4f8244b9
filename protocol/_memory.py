"""One memory stream (a ROUND's or a MIGRATE's): which runs it covers, what is due next, its MAC,
the receive path.

Apart from the session's framing and frame MAC (`_session.py`), which only
hands this class the pieces of MEMORY frames.  It owns:

* the runs (``MIGRATE.runs``, ``ROUND.runs``): page-aligned ``(offset, length)``
  ranges of guest memory, ascending and disjoint, inside ``memory_size`` --
  all of it when absent (stop-and-copy, precopy's round 0) or the pages
  dirtied since the last round (precopy), possibly none.  `parse_runs`
  checks them before anything is allocated;
* the rule of the stream, written once (`due`, `check`): each run in order,
  as chunks of ``chunk_size`` bytes but its last (the run's remainder);
* the memory MAC: Poly1305 over the data bytes in stream order, under the
  stream's one-time key (`_auth.memory_key`); COMMIT carries its tag.  It is
  computed inline, as the bytes go by: at 6-12 GB/s per core here it costs
  less than the socket copy, and less than handing it to ``trio.to_thread``
  jobs did (docs/protocol.md, "Cost");
* the receive path into the caller's buffer (the *sink*, guest RAM): a MEMORY
  frame whose header is the one due is written straight into the sink as its
  data arrives (`begin`, `window`, `absorb`), one copy from the kernel;
* every view of the caller's buffer made here, so that a failed stream can
  release them all (`release`): the caller can then unmap its buffer, whatever
  tracebacks or chunks still refer to those views.

The frame MAC binds each chunk's header (offset, size) and the chunks' order;
the memory MAC binds the data; the ROUND or MIGRATE (frame-MACed) binds the runs.
"""

from __future__ import annotations

import hmac
import struct
import weakref
from collections.abc import Iterable
from typing import Any

from cryptography.hazmat.primitives.poly1305 import Poly1305

from ._errors import FieldError, LimitError, LocalProtocolError, ProtocolError
from ._limits import PAGE_SIZE, Limits

__all__ = ["MEMORY_TAG_SIZE", "MemoryStream", "byte_view", "pack_runs", "parse_runs"]

#: Bytes of the memory MAC's tag (COMMIT.tag).
MEMORY_TAG_SIZE = 16
#: One run on the wire: offset and length, unsigned 64-bit big-endian.
_RUN = struct.Struct(">QQ")

Runs = list[tuple[int, int]]


def byte_view(data: Any) -> memoryview:
    """A flat byte view of a contiguous buffer (guest RAM, bytes, an array)."""
    view = memoryview(data)
    if not view.c_contiguous:
        raise LocalProtocolError("memory buffers must be contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def pack_runs(runs: Iterable[tuple[int, int]]) -> bytes:
    """``MIGRATE.runs`` or ``ROUND.runs`` for these ``(offset, length)`` runs (checked when sent).

    No runs at all is allowed (``b""``): a last precopy round may find nothing dirty.
    """
    try:
        return b"".join(_RUN.pack(offset, length) for offset, length in runs)
    except struct.error as exc:
        raise LocalProtocolError(f"runs: {exc}") from None


def parse_runs(runs: bytes | None, memory_size: int, limits: Limits, name: str = "MIGRATE.runs") -> Runs:
    """The runs of a MIGRATE or a ROUND (``name`` says which), checked; all of memory when None.

    FieldError (LimitError for the count) naming the first run at fault:
    runs must be page-aligned, ascending, disjoint and inside ``memory_size``;
    there may be none (``b""``: a stream of no memory, COMMIT at once).  The
    count is checked before any run is unpacked.
    """
    if runs is None:
        return [(0, memory_size)]
    if len(runs) % _RUN.size:
        raise FieldError(f"{name}: {len(runs)} bytes is not a whole number of 16-byte runs")
    count = len(runs) // _RUN.size
    if count > limits.max_memory_runs:
        raise LimitError(f"{name}: {count} runs exceeds the limit {limits.max_memory_runs}")
    parsed: Runs = []
    end = 0
    for index, (offset, length) in enumerate(_RUN.iter_unpack(runs)):
        where = f"{name}[{index}] ({offset}, {length})"
        if offset % PAGE_SIZE or length % PAGE_SIZE or not length:
            raise FieldError(f"{where}: offset and length must be multiples of {PAGE_SIZE}, length > 0")
        if offset < end:
            what = "overlaps" if offset >= parsed[-1][0] else "is out of order after"
            raise FieldError(f"{where}: {what} the run before, which ends at {end}")
        end = offset + length
        if end > memory_size:
            raise FieldError(f"{where}: ends at {end}, outside memory_size {memory_size}")
        parsed.append((offset, length))
    return parsed


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
    """Progress of one memory stream: the run and offset due next, the MAC so far, the sink."""

    def __init__(self, size: int, chunk_size: int, runs: Runs, key: bytes) -> None:
        self.size = size
        self.chunk_size = chunk_size
        self.runs = runs
        #: Bytes the runs cover in all, and covered so far.
        self.total = sum(length for _, length in runs)
        self.covered = 0
        self._run = 0
        #: The offset the next chunk must have (no runs: nothing is due, the stream is complete).
        self.offset, length = runs[0] if runs else (0, 0)
        self._run_end = self.offset + length
        self._mac: Poly1305 | None = Poly1305(key)
        self._tag = b""
        #: The caller's buffer the received data is written into (`receive_into`).
        self.sink: memoryview | None = None
        #: The MEMORY frame being streamed into the sink, if any.
        self.partial: _Partial | None = None
        self.released = False
        self._views: list[weakref.ref[memoryview]] = []

    # -- the rule of the stream ------------------------------------------------

    @property
    def complete(self) -> bool:
        """Every run has been covered: COMMIT is due."""
        return self.covered == self.total

    @property
    def due(self) -> int:
        """The size the next chunk must have: ``chunk_size``, or the run's remainder (0: none due)."""
        return min(self.chunk_size, self._run_end - self.offset)

    def expects(self, offset: int, size: int) -> bool:
        """Whether a chunk of ``size`` bytes at ``offset`` is the one due."""
        return offset == self.offset and size == self.due and not self.complete

    def check(self, offset: int, size: int, error: type[ProtocolError]) -> None:
        """Raise ``error`` naming what differs unless the chunk is the one due."""
        if offset != self.offset:
            raise error(f"MEMORY chunk at offset {offset}, expected offset {self.offset} (run {self._run})")
        if size != self.due:
            raise error(f"MEMORY chunk at offset {offset} has {size} bytes, expected {self.due}")

    def advance(self, size: int) -> bool:
        """Count a chunk of ``size`` bytes (already checked); True once every run is covered."""
        self.offset += size
        self.covered += size
        if self.offset == self._run_end and self._run + 1 < len(self.runs):
            self._run += 1
            self.offset, length = self.runs[self._run]
            self._run_end = self.offset + length
        return self.complete

    # -- the MAC -----------------------------------------------------------------

    def hash(self, view: memoryview) -> None:
        """Account the memory bytes ``view``, sent or received, in stream order."""
        if self._mac is None:
            raise LocalProtocolError("memory MACed after its tag was taken")
        self._mac.update(view)

    def finish(self) -> bytes:
        """The tag over everything; no byte may be MACed after (a Poly1305 key serves one message)."""
        if self._mac is not None:
            mac, self._mac = self._mac, None
            self._tag = mac.finalize()
        return self._tag

    def verify(self, tag: bytes) -> bool:
        """Whether ``tag`` (a COMMIT's) is the tag of the memory received (constant time)."""
        return hmac.compare_digest(self.finish(), bytes(tag))

    # -- receiving straight into the sink ---------------------------------------

    def receive_into(self, view: memoryview) -> None:
        """Write the coming chunks' data into ``view`` at their offsets."""
        self.sink = self.track(view)

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
        self.hash(view)
        partial.got += len(view)

    def end_partial(self) -> tuple[int, memoryview]:
        """The partial frame ended (its frame MAC verified): its offset and data in the sink."""
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

        Chunks handed out (``MemoryChunk.data``) are released too, since the
        data they show was never vouched for by a COMMIT.
        """
        self.released = True
        self.partial = None
        self.sink = None
        views, self._views = self._views, []
        for ref in views:
            view = ref()
            if view is not None:
                try:
                    view.release()
                except BufferError:  # the caller holds an export of a chunk it was given: theirs
                    pass

"""The COMMIT digest hashed in worker threads beside the I/O, the threads owned by a nursery.

SHA-256 bounds the memory stream (docs/protocol.md, Cost); hashlib releases
the GIL, so a worker thread hashes while the event loop moves bytes.  The
session hands out jobs over the bytes sent or received so far
(`Session.memory_hash_job`); a `MemoryHasher` runs one at a time, each a task
of the nursery that `Channel.send_memory` / `receive_memory` opens.  A job
reads the caller's buffer (guest RAM), so none may outlive those calls: the
nursery waits for it on every way out, error and cancellation included
(`trio.to_thread.run_sync` cannot be abandoned), and only then may the caller
unmap its memory.  A failed job fails its nursery as any task does; the channel
raises the first error of the stream, the job's or the stream's own, not the
nursery's group (`_channel._abandon`).
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from ._session import Session

__all__ = ["HASH_AHEAD", "HASH_MIN", "MemoryHasher"]

#: The source frames (and hashes) up to this many bytes of chunks ahead of the
#: one it writes; the destination starts a job once this many received bytes
#: are pending (or the memory is complete).
HASH_AHEAD = 4 << 20
HASH_MIN = 256 << 10


class MemoryHasher:
    """Runs a session's memory hash jobs, one at a time, as tasks of ``nursery``."""

    def __init__(self, session: Session, nursery: trio.Nursery) -> None:
        self._session = session
        self._nursery = nursery
        self._idle = trio.Event()
        self._idle.set()

    @property
    def running(self) -> bool:
        """A job is running."""
        return not self._idle.is_set()

    def start(self, min_bytes: int = 1) -> None:
        """Start a job over the bytes pending, unless one runs or fewer than ``min_bytes`` are."""
        if self.running or self._session.memory_hash_pending < min_bytes:
            return
        job = self._session.memory_hash_job()
        if job is not None:
            self._idle = trio.Event()
            self._nursery.start_soon(self._run, job, self._idle)

    async def _run(self, job: Callable[[], None], idle: trio.Event) -> None:
        try:
            await trio.to_thread.run_sync(job)
        finally:
            self._session.memory_hash_done()
            idle.set()

    async def finish(self) -> None:
        """Complete the digest: wait for the running job, then hash what is left.

        A short tail (under ``HASH_MIN``) is hashed right here: another job
        would cost a thread wake-up and a trio wake-up, which take milliseconds
        on a loaded host.  A long one (the link outran the hash) goes to a
        thread too, so the event loop -- every other session on this server --
        is not held up.
        """
        await self._idle.wait()
        session = self._session
        if session.memory_hash_pending >= HASH_MIN:
            self.start()
            await self._idle.wait()
            return
        job = session.memory_hash_job()
        if job is not None:
            try:
                job()
            finally:
                session.memory_hash_done()

"""LiveRun: the source guest running freely in its VcpuThread while the caller does other things.

Pre-copy sends the memory while the guest keeps writing it: the vCPU runs report
after report in its own thread, and the caller reads the dirty log (VM ioctls,
allowed from any thread) and sends rounds. A stop is a request the loop sees
between two reports: the guest exits to the host at every report (an ``out``),
so it stops within one report interval and always *at* a report, exactly as
after ``Guest.run_until_snapshot`` -- capture() can follow at once. No kick is
needed for that (a kick would stop it between reports: docs/kvmcore.md has the
stop latencies measured with and without a dirtying workload).
"""

from __future__ import annotations

import concurrent.futures
import threading

from .guest import Guest
from .snapshot import Snapshot
from .vcpu_thread import VcpuThread


class LiveRun:
    """Runs ``guest`` in ``thread`` until a stop is requested; ``resume`` runs it again.

    ``reports`` counts the reports of every run; ``last`` is the latest Snapshot;
    ``stopped_realtime_ns`` is CLOCK_REALTIME when the loop left its last KVM_RUN
    (the last report's host exit stamp): where the source's downtime starts."""

    def __init__(self, guest: Guest, thread: VcpuThread) -> None:
        self.guest = guest
        self.thread = thread
        self.reports = 0
        self.last: Snapshot | None = None
        self.stopped_realtime_ns: int | None = None
        self._stop = threading.Event()
        self._loop: concurrent.futures.Future[Snapshot] | None = None

    @property
    def running(self) -> bool:
        """Whether a loop was started and has not been stopped (it may have failed)."""
        return self._loop is not None

    def start(self) -> None:
        """Submit the loop to the guest's thread (behind what is queued there)."""
        if self._loop is not None:
            raise RuntimeError("LiveRun already running: stop() it first")
        self._stop.clear()
        self.stopped_realtime_ns = None
        self._loop = self.thread.submit(self._run)

    def resume(self) -> None:
        """After a stop (a rollback, even after a capture): the loop again, the guest's
        sequence continuing from the report it stopped at."""
        self.start()

    def _run(self) -> Snapshot:
        # At least one report per run, so a stop always has a fresh Snapshot to return.
        while True:
            snapshot = self.guest.run_until_snapshot()
            self.last = snapshot
            self.reports += 1
            if self._stop.is_set():
                self.stopped_realtime_ns = snapshot.host_realtime_ns
                return snapshot

    def request_stop(self) -> None:
        """Ask the loop to stop at its next report (any thread; returns at once)."""
        self._stop.set()

    def stop(self) -> Snapshot:
        """Request the stop and wait until the loop has left KVM_RUN at a report; that
        report's Snapshot. Any thread but the guest's own. Whatever the loop raised
        (a GuestError) is raised here, and the run counts as stopped."""
        if self._loop is None:
            raise RuntimeError("LiveRun is not running: start() it first")
        if self.thread.in_thread():
            raise RuntimeError("LiveRun.stop() from the vCPU thread would wait for itself")
        self.request_stop()
        try:
            return self._loop.result()
        finally:
            self._loop = None

    async def astop(self) -> Snapshot:
        """``stop`` from trio, waiting in a worker thread (not abandoned on cancellation:
        the guest is stopped when it returns or raises)."""
        import trio

        return await trio.to_thread.run_sync(self.stop)

"""VcpuThread: one dedicated thread that owns one guest's life, from creation to close.

Every vCPU ioctl, KVM_RUN above all, should come from the same thread: KVM
remembers the thread that last ran a vCPU (``vcpu->pid``) and, when KVM_RUN
comes from another one, swaps it under a ``synchronize_rcu()`` -- a wait of
a grace period in the middle of a migration's downtime. trio's worker threads
are pooled and any of them may take the next call, so a guest driven from trio
gets this thread instead: calls run here, one after the other, in the order
they were submitted. VM ioctls (the dirty log) may still come from any thread.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Call = tuple[concurrent.futures.Future, Callable[..., Any], tuple[Any, ...]]


class VcpuThread:
    """A thread that runs the functions given to it, in order, until closed.

    ``submit`` returns a concurrent.futures.Future; ``call`` waits for it and
    re-raises what the function raised; ``acall`` does the same from trio,
    the trio task woken by this thread -- and a cancelled ``acall`` still waits for
    its call to finish, so no guest is left half-created or mid-run behind it.
    Closing (or leaving the ``with``) runs what was already submitted, then joins.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    @property
    def ident(self) -> int | None:
        """The thread's identifier (for a signal that kicks its vCPU out of KVM_RUN)."""
        return self._thread.ident

    def in_thread(self) -> bool:
        """Whether the caller is this thread (which must not wait for its own calls)."""
        return threading.current_thread() is self._thread

    def _serve(self) -> None:
        while (item := self._calls.get()) is not None:
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as exc:   # handed to the caller, whatever it is
                future.set_exception(exc)
            else:
                future.set_result(result)
            del item, future, fn, args     # no reference kept until the next call

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """Queue ``fn(*args)`` behind the calls already submitted; RuntimeError once closed."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"VcpuThread {self.name!r} is closed")
            self._calls.put((future, fn, args))
        return future

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in this thread; blocks until done and returns or re-raises."""
        if self.in_thread():
            raise RuntimeError(f"VcpuThread {self.name!r}: a call from its own thread "
                               "would wait for itself")
        return self.submit(fn, *args).result()

    async def acall(self, fn: Callable[..., T], *args: Any) -> T:
        """``call`` from trio. Not abandoned on cancellation: the call finishes first,
        then the cancellation is delivered (at the caller's next checkpoint).

        The trio task itself waits for the call, woken by this thread when it is done
        (``run_sync_soon``): no trio worker thread in between, whose two more wake-ups
        (trio -> worker -> here, and back) would cost a migration's downtime a scheduler
        round trip each on a busy host. (trio is imported here: kvmcore itself does not
        need it.)"""
        import trio

        await trio.lowlevel.checkpoint_if_cancelled()
        future = self.submit(fn, *args)
        task, token = trio.lowlevel.current_task(), trio.lowlevel.current_trio_token()
        future.add_done_callback(lambda _: token.run_sync_soon(trio.lowlevel.reschedule, task))
        await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        return future.result()

    def close(self) -> None:
        """Refuse new calls, let the queued ones run, join the thread (idempotent)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._calls.put(None)
        if not self.in_thread():
            self._thread.join()

    def __enter__(self) -> VcpuThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

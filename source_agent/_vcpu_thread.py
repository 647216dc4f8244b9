"""INTERIM (until pc-kvmcore's kvmcore.VcpuThread lands; then this file is deleted).

One dedicated thread per guest: every vCPU ioctl from the same thread (KVM resets
``vcpu->pid`` with a synchronize_rcu() when KVM_RUN comes from a new one). The API is
the contract's (design/precopy.md), so the switch is one import.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")


class VcpuThread:
    """A single worker thread; calls run in order; closing joins it."""

    def __init__(self, name: str) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        return self._pool.submit(fn, *args)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        return self.submit(fn, *args).result()

    async def acall(self, fn: Callable[..., T], *args: Any) -> T:
        """Wait in a trio worker thread; a cancellation waits for the call to end."""
        future = self.submit(fn, *args)
        return await trio.to_thread.run_sync(future.result)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> VcpuThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""The asyncio transport over shared memory: ``AsyncShmTransport``.

A call answered within the short spin never leaves the loop's thread; a slower
one is waited for in a thread of a small pool of our own, so the loop is never
blocked for longer than the spin.  A call whose task is cancelled (``task.cancel()``,
``asyncio.wait_for``) is settled as a timed-out call is: withdrawn if no worker has
claimed it (it never runs), else left to the worker; its waiting thread is free at
once (``PendingCall.cancel``), so cancelled calls never hold the pool's threads.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from ..transport import no_options
from .transport import ShmTransport


_waiters: ThreadPoolExecutor | None = None


def _waiter_pool() -> ThreadPoolExecutor:
    """Threads that wait for slow shared-memory calls: our own, so that asyncio.run()
    does not wait for them at exit the way it waits for its default executor."""
    global _waiters
    if _waiters is None:
        _waiters = ThreadPoolExecutor(32, thread_name_prefix="speedysvc-wait")
    return _waiters


class AsyncShmTransport:
    scheme = "shm"

    def __init__(self, service: str):
        self.shm = ShmTransport(service)

    def __repr__(self) -> str:
        return f"<AsyncShmTransport {self.shm.service!r}>"

    async def call(self, name: bytes, payload, flags: int, codec, timeout):
        done, result = self.shm.begin(name, payload, flags, codec, timeout)
        if done:
            return result
        job = _waiter_pool().submit(result)
        try:
            return await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            # settled as a timed-out call is: withdrawn if no worker claimed it, else left to the worker
            if job.cancel():        # never started: give its channel back (or to the worker holding it)
                result.abandon()
            else:                   # its thread waits: it returns at once, and the thread is free
                result.cancel()
            raise

    async def aclose(self) -> None:
        self.shm.close()


def open_shm(address, options: dict) -> AsyncShmTransport:
    """The ``shm://`` scheme's asyncio factory (see ``speedysvc.transport``)."""
    no_options(address, options)
    return AsyncShmTransport(address.service)

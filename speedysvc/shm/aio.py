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

from ..errors import ServiceNotUp
from ..transport import no_options
from ..waiting import UP_TOO_LATE, Waiting
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

    def __init__(self, service: str, wait: float | None = None):
        self.shm = ShmTransport(service, wait)

    def __repr__(self) -> str:
        return f"<AsyncShmTransport {self.shm.service!r}>"

    async def call(self, name: bytes, payload, flags: int, codec, timeout, _waiting: bool = False):
        try:
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
        except ServiceNotUp as e:   # not up (the call was not sent, or withdrawn unseen)
            if _waiting or getattr(e, "waited", False):
                raise
            return await self._when_up(e, name, payload, flags, codec, timeout)

    async def _when_up(self, error, name: bytes, payload, flags: int, codec, timeout):
        """``ShmTransport._when_up`` for the event loop: the pauses are the loop's."""
        try:
            return await self._when_up_counted(error, name, payload, flags, codec, timeout)
        except ServiceNotUp:
            self.shm.count_refused()
            raise

    async def _when_up_counted(self, error, name: bytes, payload, flags: int, codec, timeout):
        shm = self.shm
        wait = Waiting(shm.service, shm.wait, timeout)
        if wait.bound <= 0:   # no waiting; but a service restarted and up again is not "not up"
            if shm._look() is not None:
                raise error
            return await self.call(name, payload, flags, codec, timeout, True)
        reason = str(error)
        while True:
            await asyncio.sleep(wait.pause(reason))
            now = shm._look()   # (a look at /dev/shm and /proc: no blocking worth a thread)
            if now is not None:
                reason = now
            else:
                left = wait.remaining(UP_TOO_LATE)
                try:
                    return await self.call(name, payload, flags, codec, left, True)
                except ServiceNotUp as e:
                    if getattr(e, "waited", False):
                        raise
                    reason = str(e)

    async def aclose(self) -> None:
        self.shm.close()


def open_shm(address, options: dict) -> AsyncShmTransport:
    """The ``shm://`` scheme's asyncio factory (see ``speedysvc.transport``)."""
    wait = options.pop("wait", None)
    no_options(address, options)
    return AsyncShmTransport(address.service, wait)

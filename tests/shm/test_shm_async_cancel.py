"""Cancelling an awaited call over shared memory (``task.cancel()``, ``asyncio.wait_for``): a call
no worker has claimed is withdrawn and never runs; a claimed one is left to its worker and the
thread that waited for it is free at once, so cancelled calls cannot use up the waiting threads."""
import asyncio
import time

import pytest

from speedysvc import LocalService, connect_async
from speedysvc import _shmcore as core
from conftest import channel_states, wait_until
from services import Other
from shm_services import Counter

CALLS = 40   # more than the asyncio transport's 32 waiting threads


def run(coro, timeout=120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def until(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("how", ["task.cancel()", "asyncio.wait_for"])
def test_cancelled_calls_that_no_worker_claimed_never_run(how):
    with LocalService(Counter, workers=1) as svc:
        async def main():
            client = connect_async(Counter, timeout=60)
            try:
                blocker = asyncio.ensure_future(client.hold(1.5))   # the one worker is busy
                await until(lambda: any(w["busy"] for w in svc.segment.workers()))
                if how == "task.cancel()":
                    tasks = [asyncio.ensure_future(client.slow(0.01)) for _ in range(CALLS)]
                    await until(lambda: svc.segment.pending_calls() == CALLS)
                    for t in tasks:
                        t.cancel()
                    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
                    assert all(isinstance(o, asyncio.CancelledError) for o in outcomes), outcomes
                else:
                    outcomes = await asyncio.gather(*(asyncio.wait_for(client.slow(0.01), 0.5) for _ in range(CALLS)),
                                                    return_exceptions=True)
                    assert all(isinstance(o, asyncio.TimeoutError) for o in outcomes), outcomes
                # withdrawn, all of them, by the threads that waited for them, which are free again
                # (the calls' bits stay in the bitmap until a worker looks)
                await until(lambda: not [slot for slot, (_, code) in channel_states(svc).items()
                                         if code == core.ST_REQUEST], timeout=5)
                assert any(w["busy"] for w in svc.segment.workers())   # (still in the blocker)
                await blocker
                await asyncio.sleep(0.3)   # (a call left posted would run now)
                ran = await client.count()
                chans = client._transport.shm._channels
                return ran, len(chans.owned), len(chans.free)
            finally:
                await client.aclose()

        ran, owned, free = run(main())
        assert ran == 0, f"{ran} of {CALLS} cancelled calls ran"
        assert owned == free, f"{owned - free} channel(s) owned but never given back"
        assert wait_until(lambda: not channel_states(svc))


def test_cancelled_claimed_calls_free_their_waiting_threads_at_once():
    with LocalService(Counter, workers=CALLS, start_timeout=120, stop_timeout=1) as svc, \
            LocalService(Other, workers=1):
        async def main():
            client, other = connect_async(Counter, timeout=120), connect_async(Other, timeout=10)
            try:
                assert await other.sleep(0, "warm") == "warm"
                tasks = [asyncio.ensure_future(client.hold(60)) for _ in range(CALLS)]
                await until(lambda: sum(w["busy"] for w in svc.segment.workers()) == CALLS, timeout=60)
                for t in tasks:
                    t.cancel()
                outcomes = await asyncio.gather(*tasks, return_exceptions=True)
                assert all(isinstance(o, asyncio.CancelledError) for o in outcomes), outcomes
                # an unrelated call slow enough to need a waiting thread, within its own timeout
                t = time.monotonic()
                answer = await asyncio.wait_for(other.sleep(0.3, "unrelated"), 5)
                elapsed = time.monotonic() - t
                # the cancelled calls were left to their workers, which hold them still
                states = channel_states(svc)
                return answer, elapsed, states, client._transport.shm._channels.owned
            finally:
                await client.aclose()
                await other.aclose()

        answer, elapsed, states, owned = run(main())
        assert answer == "unrelated"
        assert not owned   # every channel was left to the worker holding its call
        assert len(states) == CALLS   # (the workers free them when their calls end)

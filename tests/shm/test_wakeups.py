"""A posted call never waits for a busy worker while another sleeps (docs/shm-protocol.md: a
post wakes a sleeping worker unless none sleeps), even when it comes at the moment a worker
that just answered spins for its caller's next call."""
import time

from speedysvc import LocalService, codecs
from speedysvc.shm import ShmTransport
from services import Kitchen

M = codecs.MSGPACK


def test_calls_posted_while_a_worker_spins_are_not_held_behind_a_slow_one():
    """A call answered (its worker now spins for the next), then at once a slow call and a quick
    one: whichever the spinning worker takes, the other worker runs the other, so the quick one
    is answered while the slow one still runs (never after it; a wake-up skipped because a
    worker spins, as a change of the spin policy might, fails here).  Many times over, as the
    channels and the worker that spins change."""
    with LocalService(Kitchen, workers=2) as svc:
        t = ShmTransport(svc.service)
        try:
            for i in range(100):
                done, value = t.collect(t.post(b"echo_msgpack", M.dumps([i]), M.flags, None), M)
                assert (value if done else value()) == i
                if i % 2:   # (posted in either order)
                    quick = t.post(b"echo_msgpack", M.dumps([i]), M.flags, None)
                    slow = t.post(b"sleep", M.dumps([0.15, "slept"]), M.flags, None)
                else:
                    slow = t.post(b"sleep", M.dumps([0.15, "slept"]), M.flags, None)
                    quick = t.post(b"echo_msgpack", M.dumps([i]), M.flags, None)
                done, value = t.collect(quick, M)
                assert (value if done else value()) == i
                done, value = t.collect(slow, M)
                assert not done, f"the quick call of round {i} was answered only after the slow one"
                assert value() == "slept"
        finally:
            t.close()


def test_a_promise_nobody_keeps_does_not_lose_the_call():
    """A worker killed -9 while it spins leaves its promise (H_SPIN_UNTIL) behind: a call posted
    under it wakes nobody, and the sleeping workers find it when their sleep ends (they wake at
    least once a second); it is answered, not lost.  Here the promise is stale by 30 s, far
    longer than any spin."""
    from speedysvc import _shmcore as core
    from speedysvc import connect
    from conftest import wait_until
    with LocalService(Kitchen, workers=1) as svc, connect(Kitchen, timeout=20) as c:
        assert c.echo_msgpack("warm") == "warm"
        seg = svc.segment
        assert wait_until(lambda: seg.region.load32(core.H_SLEEPERS) == 1)   # (the worker sleeps)
        seg.region.store64(core.H_SPIN_UNTIL, time.monotonic_ns() + 30_000_000_000)
        try:
            assert c.echo_msgpack("under a dead promise") == "under a dead promise"
        finally:
            seg.region.store64(core.H_SPIN_UNTIL, 0)

"""Timeouts of calls over shared memory: a call that waits too long is withdrawn or abandoned
(its channel is reclaimed), and what a timeout may be."""
import threading
import time

import pytest

from speedysvc import CallTimeout, LocalService, connect
from conftest import channel_states, wait_until
from services import Kitchen, Other


def test_queued_call_times_out_and_is_withdrawn():
    with LocalService(Kitchen, workers=1) as svc, connect(Kitchen) as busy, connect(Kitchen) as c:
        th = threading.Thread(target=busy.sleep, args=(1.0,))
        th.start()
        assert wait_until(lambda: any(w["busy"] for w in svc.segment.workers()))
        t = time.monotonic()
        with pytest.raises(CallTimeout):
            c.with_timeout(0.3).count()
        assert time.monotonic() - t < 1.0
        th.join()
        assert c.count() == 1   # the timed-out call never ran


def test_timeout_on_a_slow_call_then_the_channel_is_reclaimed():
    with LocalService(Kitchen, workers=1) as svc, connect(Kitchen) as c:
        t = time.monotonic()
        with pytest.raises(CallTimeout, match="timed out"):
            c.with_timeout(0.3).sleep(1.5)
        assert time.monotonic() - t < 1.2
        # the abandoned call finishes in the worker, which then frees that channel;
        # the client carries on with a fresh one meanwhile
        assert c.echo_msgpack("x") == "x"
        assert wait_until(lambda: len(channel_states(svc)) == 1, timeout=5)


def test_per_call_timeout_with_send():
    with LocalService(Kitchen, workers=1), connect(Kitchen, timeout=10) as c:
        with pytest.raises(TimeoutError):
            c.send(Kitchen.sleep, [2], timeout=0.2)
        assert c.send(Kitchen.sleep, [0, "ok"], timeout=5) == "ok"
        assert c.with_timeout(None).timeout is None and c.timeout == 10


@pytest.mark.parametrize("bad", [float("nan"), -1, 1e9, "5"])
def test_bad_timeouts_are_refused(bad):
    with pytest.raises(ValueError, match="timeout"):
        connect(Other, timeout=bad)


def test_infinite_timeout_means_none():
    assert connect(Other, timeout=float("inf")).timeout is None

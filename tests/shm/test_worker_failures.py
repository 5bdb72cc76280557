"""Workers that die (kill -9, mid-call, mid-growth of a channel), exit, fail to start or run out
of file descriptors: the call in hand fails fast and clearly, the others are served."""
import os
import signal
import threading
import time

import pytest

from speedysvc import LocalService, ServiceUnavailable, WorkerDied, connect
from conftest import wait_until
from services import Kitchen


def test_worker_killed_mid_call_fails_fast_and_others_serve():
    with LocalService(Kitchen, workers=2) as svc, connect(Kitchen) as c:
        result = {}

        def slow_call():
            t = time.monotonic()
            try:
                c.sleep(30)
            except BaseException as e:
                result["error"] = e
            result["elapsed"] = time.monotonic() - t

        th = threading.Thread(target=slow_call)
        th.start()
        assert wait_until(lambda: any(w["busy"] for w in svc.segment.workers()))
        busy = [w["pid"] for w in svc.segment.workers() if w["busy"]][0]
        os.kill(busy, signal.SIGKILL)
        th.join(10)
        assert isinstance(result["error"], WorkerDied), result
        assert str(busy) in str(result["error"])
        assert result["elapsed"] < 5
        # the surviving worker serves, on the same client and a new one
        assert c.echo_msgpack("after") == "after"
        with connect(Kitchen) as c2:
            assert c2.whoami() != busy


def test_worker_killing_itself_with_sigkill(tmp_path):
    with LocalService(Kitchen, workers=1) as svc, connect(Kitchen, timeout=20) as c:
        t = time.monotonic()
        with pytest.raises(WorkerDied):
            c.die()
        assert time.monotonic() - t < 5
        svc.add_worker()
        assert c.echo_msgpack(1) == 1


def test_no_worker_left_fails_instead_of_hanging():
    """Nobody restarts LocalService's workers: with none alive, a call without a timeout fails."""
    with LocalService(Kitchen, workers=1) as svc, connect(Kitchen) as c:
        assert c.echo_msgpack(1) == 1
        os.kill(svc.pids[0], signal.SIGKILL)
        svc.processes[0].wait()
        t = time.monotonic()
        with pytest.raises(ServiceUnavailable, match="no worker"):
            c.echo_msgpack(2)
        assert time.monotonic() - t < 3
        # the call was taken back, not left for a future worker to run
        svc.add_worker()
        assert c.count() == 1


def test_worker_that_fails_to_start_is_reported():
    from services import EchoServer

    class Broken(EchoServer):
        name = "broken"

        def __init__(self):
            raise RuntimeError("cannot load the model")

    Broken.__module__ = "services"  # workers look it up there and fail to find it
    with pytest.raises(RuntimeError, match="exited with code"):
        LocalService(Broken, workers=1, start_timeout=20).start()


@pytest.mark.parametrize("mode", ["after_grow", "after_create"])
def test_worker_killed_while_growing_a_channel(mode):
    from services import DiesWhileGrowing
    env = dict(os.environ, SPEEDYSVC_TEST_DIE=mode)
    with LocalService(DiesWhileGrowing, workers=2, env=env), connect(DiesWhileGrowing, timeout=20) as c:
        assert c.echo("warm") == "warm"
        with pytest.raises(WorkerDied):
            c.big(3 << 20)
        # the channel was not reused half-grown: calls of every size work
        assert c.echo("hello") == "hello"
        assert c.size_of(b"x" * (2 << 20)) == 2 << 20
        assert c.size_of(b"x" * (2 << 20)) == 2 << 20


def test_worker_that_cannot_map_a_channel_fails_the_call_clearly():
    from services import FdHog
    with LocalService(FdHog, workers=1) as svc:
        with connect(FdHog) as first:
            first.use_up_fds()
        with connect(FdHog) as c:   # a new channel the worker cannot open
            t = time.monotonic()
            with pytest.raises(ServiceUnavailable, match="could not map"):
                c.echo("hi")
            assert time.monotonic() - t < 5
        time.sleep(1.5)   # housekeeping runs with no descriptor to spare
        assert svc.processes[0].poll() is None, "the worker died"

"""A caller learns within 0.1 s that the worker running its call died (README's errors table,
docs/shm-protocol.md), whenever the worker dies: at once (while the caller still waits in C),
or just after the caller last made sure it was alive."""
import os
import signal
import time

import pytest

from speedysvc import LocalService, WorkerDied, connect
from speedysvc.shm import ServiceSegment
from services import Kitchen

# README, "Errors": a worker's death is noticed within this long
WORKER_DIED_BOUND = 0.1


@pytest.fixture
def kitchen2():
    with LocalService(Kitchen, workers=2) as svc:
        yield svc


@pytest.mark.parametrize("how", ["generated method", "send"])
def test_a_worker_that_dies_as_it_takes_the_call(kitchen2, how):
    """The worker kills itself as soon as it runs the call: the caller is still in its first wait."""
    with connect(Kitchen, timeout=20) as c:
        assert c.echo_msgpack("warm") == "warm"   # attached, with a free channel: the call runs in C
        for _ in range(2):
            t = time.monotonic()
            with pytest.raises(WorkerDied):
                c.die() if how == "generated method" else c.send(Kitchen.die, [])
            elapsed = time.monotonic() - t
            assert elapsed <= WORKER_DIED_BOUND, f"WorkerDied came {elapsed * 1000:.0f} ms after the worker died"
            kitchen2.add_worker()


def test_a_worker_that_dies_just_after_its_caller_checked_on_it(kitchen2, monkeypatch):
    """The worst moment: right after the waiting caller found the worker alive."""
    killed = []
    check = ServiceSegment.worker_alive

    def check_then_kill(seg, pid):
        alive = check(seg, pid)
        if alive and not killed:
            os.kill(pid, signal.SIGKILL)
            killed.append(time.monotonic())
        return alive

    monkeypatch.setattr(ServiceSegment, "worker_alive", check_then_kill)
    with connect(Kitchen, timeout=20) as c:
        with pytest.raises(WorkerDied):
            c.sleep(30)
        elapsed = time.monotonic() - killed[0]
    assert elapsed <= WORKER_DIED_BOUND, f"WorkerDied came {elapsed * 1000:.0f} ms after the worker died"

"""The C extension's primitives (atomics, futexes, mappings) and how callers and workers wait:
spinning a little, then sleeping in the kernel."""
import os
import threading
import time

import pytest

from speedysvc import LocalService, connect, shm
from speedysvc import _shmcore as core
from services import Kitchen


@pytest.fixture
def region():
    name = f"{shm.PREFIX}.{shm.USER}.coretest"
    r, _ = shm.create_segment(name, 4096)
    yield r
    shm.unlink_segment(name)


def test_atomics(region):
    assert region.load32(0) == 0
    region.store32(0, 7)
    assert region.cas32(0, 7, 9) is True
    assert region.cas32(0, 7, 11) is False
    assert region.load32(0) == 9
    assert region.add32(0, 5) == 9 and region.load32(0) == 14
    region.store64(8, 2**40)
    assert region.add64(8, 1) == 2**40 and region.load64(8) == 2**40 + 1


def test_bounds_and_alignment_are_checked(region):
    with pytest.raises(ValueError):
        region.load32(4096)
    with pytest.raises(ValueError):
        region.load32(2)
    with pytest.raises(ValueError):
        region.store64(-8, 1)


def test_futex_wait_times_out_and_wakes(region):
    t = time.monotonic()
    assert region.wait32(0, 0, 0.05) is False
    assert time.monotonic() - t >= 0.04
    assert region.wait32(0, 1, 1.0) is True  # value differs: returns at once

    def waker():
        time.sleep(0.05)
        region.store32(0, 1)
        region.wake32(0)

    threading.Thread(target=waker).start()
    t = time.monotonic()
    assert region.wait32(0, 0, 5.0) is True
    assert time.monotonic() - t < 2


def test_futex_wakes_another_process(region):
    pid = os.fork()
    if pid == 0:
        time.sleep(0.05)
        region.store32(0, 1)
        region.wake32(0)
        os._exit(0)
    assert region.wait32(0, 0, 5.0) is True
    os.waitpid(pid, 0)


def test_memoryview_of_a_mapping_and_release(region):
    view = memoryview(region)
    view[:3] = b"abc"
    assert bytes(view[:3]) == b"abc"
    with pytest.raises(BufferError):
        region.release()
    view.release()
    region.release()
    assert region.size == 0


def test_spin_setting():
    old = core.get_spin()[0]
    try:
        core.set_spin(0)
        assert core.get_spin() == (0.0, 0.0, 0.0)
        with pytest.raises(ValueError):
            core.set_spin(-1)
    finally:
        core.set_spin(old)


def test_calls_work_without_spinning():
    old = core.get_spin()[0]
    core.set_spin(0)
    try:
        with LocalService(Kitchen, workers=1), connect(Kitchen) as c:
            assert [c.echo_msgpack(i) for i in range(200)] == list(range(200))
    finally:
        core.set_spin(old)


def test_idle_service_with_a_connected_client_sleeps():
    import psutil
    with LocalService(Kitchen, workers=2) as svc, connect(Kitchen) as c:
        for i in range(1000):
            c.echo_msgpack(i)
        procs = [psutil.Process(p) for p in svc.pids]
        time.sleep(0.2)
        before = [sum(p.cpu_times()[:2]) for p in procs]
        me = time.process_time()
        time.sleep(2.0)
        used = [sum(p.cpu_times()[:2]) - b for p, b in zip(procs, before)]
        assert max(used) < 0.1, used  # well under 5 % of a core each
        assert time.process_time() - me < 0.1

"""The C extension's primitives and the segments' security properties."""
import os
import stat
import threading
import time

import pytest

from speedysvc import LocalService, SpeedysvcError, connect, shm
from speedysvc import _shmcore as core
from conftest import our_segments
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


def test_segments_are_private_and_named_after_service_and_user():
    with LocalService(Kitchen, workers=1), connect(Kitchen) as c:
        c.echo_msgpack(1)
        names = our_segments()
        assert f"{shm.PREFIX}.{shm.USER}.kitchen" in names
        assert any(n.startswith(f"{shm.PREFIX}.{shm.USER}.kitchen.{os.getpid()}-") for n in names)
        for n in names:
            mode = stat.S_IMODE(os.stat(os.path.join(shm.SHM_DIR, n)).st_mode)
            assert mode == 0o600, (n, oct(mode))
    assert not our_segments()


def test_service_names_are_validated():
    class Bad(Kitchen):
        name = "../etc"

    with pytest.raises(ValueError, match="name"):
        connect(Bad)
    with pytest.raises(ValueError, match="name"):
        LocalService(Bad)


def test_not_a_speedysvc_segment_is_refused():
    name = f"{shm.PREFIX}.{shm.USER}.impostor"
    r, _ = shm.create_segment(name, core.H_CHANNELS + 64)
    try:
        with pytest.raises(SpeedysvcError, match="not a speedysvc segment"):
            shm.ServiceSegment.attach("impostor")
    finally:
        r.release()
        shm.unlink_segment(name)


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


def test_forked_child_gets_its_own_channels():
    with LocalService(Kitchen, workers=1), connect(Kitchen) as c:
        assert c.echo_msgpack("parent") == "parent"
        pid = os.fork()
        if pid == 0:
            ok = c.echo_msgpack("child") == "child"
            c.close()
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert c.echo_msgpack("parent again") == "parent again"


def test_calls_posted_together_are_collected_in_any_order():
    """ShmTransport.post / collect (the TCP gateway posts the calls of one read together):
    each collected answer is its own call's; a request larger than the channel's data
    segment, and a call left in flight, finish through the returned callable; nothing stays
    busy afterwards."""
    from speedysvc import codecs
    from speedysvc.shm import ShmTransport
    m = codecs.MSGPACK
    with LocalService(Kitchen, workers=2) as svc:
        t = ShmTransport(svc.service)
        try:
            small = [t.post(b"echo_msgpack", m.dumps([i]), m.flags, None) for i in range(6)]
            big_arg = "y" * (8 << 20)   # larger than a new channel's data segment: posted later
            big = t.post(b"echo_msgpack", m.dumps([big_arg]), m.flags, None)
            slow = t.post(b"sleep", m.dumps([0.3, "slept"]), m.flags, None)
            results = {}
            for i in (5, 0, 3, 1, 4, 2):
                done, value = t.collect(small[i], m)
                results[i] = value if done else value()
            assert results == {i: i for i in range(6)}
            done, value = t.collect(big, m)
            assert (value if done else value()) == big_arg
            done, value = t.collect(slow, m)
            assert not done and value() == "slept"
            seg = t._channels.seg
            assert all(seg.region.load32(seg.channel_offset(ch.slot) + core.C_STATE) & core.ST_CODE
                       in (core.ST_IDLE, core.ST_RESPONSE) for ch in t._channels.free)
            assert len(t._channels.free) == len(t._channels.owned)   # every channel given back
        finally:
            t.close()

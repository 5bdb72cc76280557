"""A client's channels: its own after fork(), calls posted together and collected in any order,
an answer that waits in shared memory until taken, and a clear error when none is free."""
import os
import threading
import time

import pytest

from speedysvc import CallTimeout, LocalService, ServiceUnavailable, connect, shm
from speedysvc import _shmcore as core
from conftest import channel_states
from services import Kitchen


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


def test_an_answer_waited_for_can_stay_in_shared_memory_until_taken():
    """``ShmTransport.begin``'s pending call: ``wait()`` (in a thread) leaves a large answer
    in the channel, ``size`` says how large, ``take()`` copies it out once; ``abandon()``
    after ``wait()`` gives the channel back unread.  Neither ever gives a channel back twice."""
    from speedysvc import codecs
    import msgpack
    with LocalService(Kitchen, workers=1) as svc:
        t = shm.ShmTransport(Kitchen.name)
        try:
            args = msgpack.packb([3 << 20])
            done, pending = t.begin(b"big", args, codecs.MSGPACK.flags, codecs.MSGPACK, 10)
            assert not done                        # (answers above 64 KiB are never taken at once)
            th = threading.Thread(target=pending.wait)
            th.start()
            th.join(10)
            assert pending.size >= 3 << 20
            states = channel_states(svc)
            assert sum(1 for _, st in states.values() if st == core.ST_RESPONSE) >= 1
            free_before = len(t._channels.free)
            assert pending.take() == b"z" * (3 << 20)
            assert len(t._channels.free) == free_before + 1
            pending.abandon()                      # already settled: a no-op
            assert len(t._channels.free) == free_before + 1

            # never taken: the channel is still reusable, even though the worker moved it to a
            # larger segment for the answer
            t2 = shm.ShmTransport(Kitchen.name)
            try:
                done, pending = t2.begin(b"big", args, codecs.MSGPACK.flags, codecs.MSGPACK, 10)
                assert not done
                pending.wait()
                pending.abandon()
                pending.abandon()
                assert len(t2._channels.free) == 1
                for n in (5, 100_000, 5):
                    assert t2.call(b"big", msgpack.packb([n]), codecs.MSGPACK.flags, codecs.MSGPACK, 10) == b"z" * n
            finally:
                t2.close()

            # a small answer that came late waits in the channel too; an error is raised by wait()
            done, pending = t.begin(b"sleep", msgpack.packb([0.3, "tag"]), codecs.MSGPACK.flags, codecs.MSGPACK, 10)
            assert not done
            pending.wait()
            assert pending.size == len(msgpack.packb("tag")) and pending.take() == "tag"
            assert len(t._channels.free) == free_before + 1
            done, pending = t.begin(b"sleep", msgpack.packb([1.5]), codecs.MSGPACK.flags, codecs.MSGPACK, 0.5)
            with pytest.raises(CallTimeout):
                pending.wait()
        finally:
            t.close()


def test_all_channels_in_use_is_a_clear_error_and_passes():
    from services import Limited
    with LocalService(Limited, workers=2, max_channels=2), connect(Limited) as c:
        threads = [threading.Thread(target=c.sleep, args=(1.0,)) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        with pytest.raises(ServiceUnavailable, match="no free channel"):
            c.whoami()
        for t in threads:
            t.join()
        assert c.whoami() > 0   # the channels came back to the pool

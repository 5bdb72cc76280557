"""Dead workers, dead clients, timeouts, interrupts and restarts: no hang, no leak."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from speedysvc import CallTimeout, LocalService, ServiceUnavailable, WorkerDied, connect, shm
from speedysvc import _shmcore as core
from conftest import channel_states, our_segments, wait_until
from services import Kitchen, Other


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


def test_client_killed_mid_call_frees_its_channel():
    code = textwrap.dedent("""
        import sys
        from speedysvc import connect
        from services import Kitchen
        c = connect(Kitchen)
        c.echo_msgpack(1)
        print("ready", flush=True)
        c.sleep(1.0)
    """)
    with LocalService(Kitchen, workers=1) as svc:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env)
        assert proc.stdout.readline().strip() == b"ready"
        assert wait_until(lambda: any(w["busy"] for w in svc.segment.workers()))
        name_prefix = f"{shm.PREFIX}.{shm.USER}.kitchen.{proc.pid}-"
        assert any(n.startswith(name_prefix) for n in our_segments())
        proc.kill()
        proc.wait()
        # the worker finishes the call, notices the caller is gone and reclaims the channel
        assert wait_until(lambda: not channel_states(svc), timeout=6)
        assert not any(n.startswith(name_prefix) for n in our_segments())
        with connect(Kitchen) as c:
            assert c.echo_msgpack(2) == 2


def test_client_killed_while_idle_is_reaped():
    code = "from speedysvc import connect\nfrom services import Kitchen\nc = connect(Kitchen)\nc.echo_msgpack(1)\n" \
           "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n"
    with LocalService(Kitchen, workers=1) as svc:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        subprocess.run([sys.executable, "-c", code], env=env)
        assert wait_until(lambda: not channel_states(svc), timeout=6)


def test_interrupted_call_gives_the_channel_back(kitchen_like=None):
    with LocalService(Kitchen, workers=1) as svc, connect(Kitchen) as c:
        def interrupt(signum, frame):
            raise KeyboardInterrupt

        old = signal.signal(signal.SIGALRM, interrupt)
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            with pytest.raises(KeyboardInterrupt):
                c.sleep(1.0)
        finally:
            signal.signal(signal.SIGALRM, old)
        assert c.echo_msgpack("next") == "next"
        assert wait_until(lambda: len(channel_states(svc)) == 1, timeout=5)


def test_a_slow_call_does_not_hold_up_another_client():
    with LocalService(Other, workers=2), connect(Other) as a, connect(Other) as b:
        th = threading.Thread(target=a.sleep, args=(2,))
        th.start()
        time.sleep(0.2)
        t = time.monotonic()
        assert b.whoami() > 0
        assert time.monotonic() - t < 1.0
        th.join()


def test_stop_lets_running_calls_finish_and_refuses_new_ones():
    svc = LocalService(Other, workers=1).start()
    c = connect(Other)
    result = {}
    th = threading.Thread(target=lambda: result.setdefault("v", c.sleep(0.5, "done")))
    th.start()
    time.sleep(0.2)
    svc.stop()
    th.join(5)
    assert result.get("v") == "done"
    with pytest.raises(ServiceUnavailable):
        c.whoami()
    c.close()


def test_restarted_service_is_picked_up_by_a_connected_client():
    with connect(Other) as c:
        with LocalService(Other, workers=1) as first:
            assert c.whoami() in first.pids
        with pytest.raises(ServiceUnavailable):
            c.whoami()
        with LocalService(Other, workers=1) as second:
            assert c.whoami() in second.pids


def test_service_owner_killed_clients_get_unavailable_and_next_start_cleans_up():
    code = textwrap.dedent("""
        import time
        from speedysvc import LocalService
        from services import Other
        svc = LocalService(Other, workers=1).start()
        print("up", flush=True)
        time.sleep(60)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env)
    try:
        assert owner.stdout.readline().strip() == b"up"
        seg = shm.ServiceSegment.attach("other")
        worker_pids = [w["pid"] for w in seg.workers()]
        with connect(Other, timeout=10) as c:
            assert c.whoami() in worker_pids
            owner.kill()
            owner.wait()
            # workers notice their parent died and exit
            assert wait_until(lambda: not any(shm.process_alive(p) for p in worker_pids), timeout=5)
            t = time.monotonic()
            with pytest.raises(ServiceUnavailable):
                c.whoami()
            assert time.monotonic() - t < 3
        # stale segments are there now; a new owner removes them and serves
        assert any(n.endswith(".other") for n in our_segments())
        with LocalService(Other, workers=1) as svc, connect(Other) as c:
            assert c.whoami() in svc.pids
    finally:
        owner.kill()


def test_second_owner_of_a_running_service_is_refused():
    from speedysvc import ServiceAlreadyRunning
    with LocalService(Other, workers=1):
        with pytest.raises(ServiceAlreadyRunning):
            LocalService(Other, workers=1).start()


def test_worker_that_fails_to_start_is_reported():
    from services import EchoServer

    class Broken(EchoServer):
        name = "broken"

        def __init__(self):
            raise RuntimeError("cannot load the model")

    Broken.__module__ = "services"  # workers look it up there and fail to find it
    with pytest.raises(RuntimeError, match="exited with code"):
        LocalService(Broken, workers=1, start_timeout=20).start()


def test_raw_method_returning_something_else():
    from services import RawOdd
    from speedysvc import EncodeError
    with LocalService(RawOdd, workers=1) as svc, connect(RawOdd, timeout=10) as c:
        pid = svc.pids[0]
        for _ in range(2):   # first through the Python path, then through the C loop
            assert c.to_bytearray(b"abc") == b"abc"
            with pytest.raises(EncodeError, match="bytes-like"):
                c.to_str(b"x")
            with pytest.raises(EncodeError):
                c.to_none(b"x")
        assert c.ok(b"fine") == b"fine" and svc.pids == [pid]


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


def test_client_dies_while_its_call_runs_and_another_client_takes_the_slot():
    """The call's channel is left to the worker holding it, not handed to the next client."""
    code = textwrap.dedent("""
        from speedysvc import connect
        from services import Kitchen
        c = connect(Kitchen)
        c.echo_msgpack(1)
        print("ready", flush=True)
        c.sleep(1.5)
    """)
    with LocalService(Kitchen, workers=2, max_channels=2) as svc:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env)
        assert proc.stdout.readline().strip() == b"ready"
        assert wait_until(lambda: any(w["busy"] for w in svc.segment.workers()))
        proc.kill()
        proc.wait()
        time.sleep(1.2)   # the workers reap meanwhile
        with connect(Kitchen, timeout=5) as c:
            for i in range(20):
                assert c.big(10 + i) == b"z" * (10 + i)
            assert wait_until(lambda: not any(w["busy"] for w in svc.segment.workers()), timeout=5)
            for i in range(20):
                assert c.big(3 << 20 if i % 5 == 0 else i) == b"z" * (3 << 20 if i % 5 == 0 else i)
        assert wait_until(lambda: not channel_states(svc), timeout=6)


def test_close_while_another_thread_calls():
    with LocalService(Kitchen, workers=1) as svc:
        for _ in range(30):
            c = connect(Kitchen)
            c.echo_msgpack(0)
            outcome = []

            def loop():
                try:
                    while True:
                        c.echo_msgpack(1)
                except Exception as e:
                    outcome.append(e)

            th = threading.Thread(target=loop)
            th.start()
            time.sleep(0.002)
            c.close()
            th.join(5)
            assert not th.is_alive(), "a call hung after close()"
            assert "closed" in str(outcome[0])
        assert wait_until(lambda: not channel_states(svc), timeout=5)


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


def test_calls_made_while_local_service_starts_wait_for_the_workers():
    svc = LocalService(Other, workers=1)
    starter = threading.Thread(target=svc.start)
    starter.start()
    errors = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with connect(Other) as c:
                    assert c.sleep(0, "ok") == "ok"
                break
            except ServiceUnavailable as e:
                errors.append(str(e))
                time.sleep(0.005)
        assert not [e for e in errors if "not running" not in e and "not a speedysvc" not in e], errors
    finally:
        starter.join()
        svc.stop()


def test_local_service_started_from_a_thread_that_ends_keeps_its_workers():
    holder = []
    th = threading.Thread(target=lambda: holder.append(LocalService(Other, workers=1).start()))
    th.start()
    th.join()
    svc = holder[0]
    try:
        time.sleep(1.5)
        assert all(p.poll() is None for p in svc.processes)
        with connect(Other) as c:
            assert c.whoami() in svc.pids
    finally:
        svc.stop()


@pytest.mark.parametrize("bad", [float("nan"), -1, 1e9, "5"])
def test_bad_timeouts_are_refused(bad):
    with pytest.raises(ValueError, match="timeout"):
        connect(Other, timeout=bad)


def test_infinite_timeout_means_none():
    assert connect(Other, timeout=float("inf")).timeout is None


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

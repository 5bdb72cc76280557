"""Clients that die (kill -9, mid-call or idle), are interrupted by a signal or closed while
another thread calls: their channels come back, no call hangs, nothing leaks."""
import signal
import subprocess
import threading
import time

import pytest

from speedysvc import LocalService, connect, shm
from conftest import channel_states, our_segments, wait_until
from services import Kitchen
from shm_helpers import python_child


def test_client_killed_mid_call_frees_its_channel():
    code = """
        import sys
        from speedysvc import connect
        from services import Kitchen
        c = connect(Kitchen)
        c.echo_msgpack(1)
        print("ready", flush=True)
        c.sleep(1.0)
    """
    with LocalService(Kitchen, workers=1) as svc:
        proc = python_child(code, stdout=subprocess.PIPE)
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
        python_child(code).wait()
        assert wait_until(lambda: not channel_states(svc), timeout=6)


def test_client_dies_while_its_call_runs_and_another_client_takes_the_slot():
    """The call's channel is left to the worker holding it, not handed to the next client."""
    code = """
        from speedysvc import connect
        from services import Kitchen
        c = connect(Kitchen)
        c.echo_msgpack(1)
        print("ready", flush=True)
        c.sleep(1.5)
    """
    with LocalService(Kitchen, workers=2, max_channels=2) as svc:
        proc = python_child(code, stdout=subprocess.PIPE)
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

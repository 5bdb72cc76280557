"""Clients wait for a service that is not up yet (``connect(..., wait=)``, speedysvc.waiting):
started before the service or its manager, during a hard restart, after their manager was
restarted; and fail at once, with the reason, for a service stopped on purpose or failed.
Over shared memory and TCP, blocking and asyncio."""
import asyncio
import signal
import threading
import time

import pytest

from speedysvc import (LocalService, ServiceNotUp, ServiceUnavailable, connect, connect_async, shm)
from speedysvc import _shmcore as core
from conftest import free_port, wait_until
from manager_fixture import chatty_ini, run_seed_script
from services import Chatty, CrashOnStart, Other

# generous: the machine is shared; what matters is that a call that must not wait returns long
# before the timeout it was given (LONG)
AT_ONCE = 5.0
LONG = 30.0


class Later:
    """A LocalService started ``delay`` seconds from now, in a thread; stopped on exit."""

    def __init__(self, delay=0.5, **kw):
        self.svc = LocalService(Other, workers=1, **kw)
        self.timer = threading.Timer(delay, self.svc.start)

    def __enter__(self):
        self.timer.start()
        return self.svc

    def __exit__(self, *exc):
        self.timer.cancel()
        self.timer.join()
        self.svc.stop()


def test_a_client_started_before_its_service_waits_for_it():
    with Later(0.5) as svc, connect(Other, timeout=LONG) as c:
        t = time.monotonic()
        pid = c.whoami()
        assert time.monotonic() - t >= 0.3 and pid in svc.pids


def test_a_call_without_a_timeout_waits_up_to_the_default():
    with Later(0.5) as svc, connect(Other) as c:
        assert c.timeout is None
        assert c.whoami() in svc.pids
        assert c.send("sleep", [0, "sent"]) == "sent"   # the plain path too


def test_wait_zero_fails_at_once():
    with connect(Other, timeout=LONG, wait=0) as c:
        t = time.monotonic()
        with pytest.raises(ServiceNotUp, match="not running"):
            c.whoami()
        assert time.monotonic() - t < AT_ONCE


def test_the_wait_bound_is_honoured_when_nothing_comes():
    for kw, bound in ((dict(wait=0.5), 0.5), (dict(timeout=0.5), 0.5), (dict(wait=0.5, timeout=LONG), 0.5)):
        with connect(Other, **kw) as c:
            t = time.monotonic()
            with pytest.raises(ServiceNotUp, match=r"did not come up within 0\.5 s: no manager or process"):
                c.whoami()
            took = time.monotonic() - t
            assert bound <= took < bound + AT_ONCE, (kw, took)


def test_waiting_looks_at_a_growing_pace(monkeypatch):
    """5 ms doubling up to 100 ms between looks: a wait of 1 s looks about 15 times, not
    thousands (the pace is a promise of the docs; a loaded machine only makes it slower)."""
    from speedysvc.shm.transport import ShmTransport
    looks = []
    look = ShmTransport._look
    monkeypatch.setattr(ShmTransport, "_look", lambda self: looks.append(time.monotonic()) or look(self))
    with connect(Other, wait=1.0) as c:
        with pytest.raises(ServiceNotUp):
            c.whoami()
    assert 5 <= len(looks) <= 25, len(looks)
    gaps = [b - a for a, b in zip(looks, looks[1:])]
    assert max(gaps) >= 0.09 and min(gaps) < 0.05   # (from 5 ms up to its ceiling of 0.1 s)


def test_wait_is_checked():
    for bad in (-1, float("nan"), "1", 10 ** 6):
        with pytest.raises(ValueError, match="wait"):
            connect(Other, wait=bad)


def test_what_a_client_sees_in_each_state_of_the_segment():
    """The segment's states and reason field, as a client reads them (this process owns it)."""
    seg = shm.ServiceSegment.create("other")
    try:
        with connect(Other, wait=0.3, timeout=LONG) as c:
            for state, restarting, reason, expect, waits in (
                    (core.SVC_STARTING, False, "", "it is starting", True),
                    (core.SVC_STOPPING, True, "", "it is restarting", True),
                    (core.SVC_STOPPED, True, "", "it is restarting", True),
                    (core.SVC_STOPPING, False, "going down", "is stopping: going down", False),
                    (core.SVC_STOPPED, False, "maintenance until noon", "is stopped: maintenance until noon", False),
                    (core.SVC_FAILED, False, "3 workers in a row died", "failed: 3 workers in a row died", False)):
                seg.set_reason(reason)
                seg.set_owner_flag(core.OWNER_RESTARTING, restarting)
                seg.set_state(state)
                assert seg.reason == reason and seg.restarting == restarting
                t = time.monotonic()
                with pytest.raises(ServiceUnavailable, match=expect) as info:
                    c.whoami()
                took = time.monotonic() - t
                if waits:
                    assert isinstance(info.value, ServiceNotUp) and "did not come up within 0.3 s" in str(info.value)
                    assert took >= 0.3
                else:
                    assert not isinstance(info.value, ServiceNotUp) and took < AT_ONCE
        # a reason longer than the field is cut, on a character's boundary
        seg.set_reason("é" * core.REASON_SIZE)
        assert seg.reason == "é" * ((core.REASON_SIZE - 1) // 2)
    finally:
        seg.destroy()


def test_asyncio_client_before_its_service():
    async def main():
        ac = connect_async(Other, timeout=LONG)
        try:
            return await ac.whoami()
        finally:
            await ac.aclose()

    with Later(0.5) as svc:
        assert asyncio.run(main()) in svc.pids


def test_asyncio_client_wait_bound_and_wait_zero():
    async def main(**kw):
        ac = connect_async(Other, **kw)
        t = time.monotonic()
        try:
            with pytest.raises(ServiceNotUp) as info:
                await ac.whoami()
            return str(info.value), time.monotonic() - t
        finally:
            await ac.aclose()

    said, took = asyncio.run(main(wait=0.5))
    assert "did not come up within 0.5 s" in said and 0.5 <= took < 0.5 + AT_ONCE
    said, took = asyncio.run(main(wait=0, timeout=LONG))
    assert "not running" in said and took < AT_ONCE


def test_tcp_client_before_the_gateway_listens():
    port = free_port()
    addr = f"tcp://127.0.0.1:{port}"
    with Later(0.5, tcp=f"127.0.0.1:{port}") as svc:
        with connect(Other, addr, timeout=LONG) as c:
            assert c.whoami() in svc.pids

        async def main():
            ac = connect_async(Other, addr, timeout=LONG)
            try:
                return await ac.whoami()
            finally:
                await ac.aclose()
        assert asyncio.run(main()) in svc.pids


def test_tcp_clients_connected_before_a_restart_wait_for_the_new_gateway():
    """The gateway goes away (its clients are told) and comes back on the same port: a call made
    meanwhile on a connected client waits for it, blocking and asyncio alike."""
    port = free_port()
    addr = f"tcp://127.0.0.1:{port}"
    box = {"first": LocalService(Other, workers=1, tcp=f"127.0.0.1:{port}").start()}
    c = connect(Other, addr, timeout=LONG)

    async def main():
        loop = asyncio.get_running_loop()
        ac = connect_async(Other, addr, timeout=LONG)
        try:
            first = box["first"]
            assert await ac.whoami() in first.pids
            assert c.whoami() in first.pids
            await loop.run_in_executor(None, first.stop)
            box["later"] = later = Later(0.5, tcp=f"127.0.0.1:{port}")
            second = later.__enter__()
            assert await loop.run_in_executor(None, c.whoami) in second.pids
            assert await ac.whoami() in second.pids
        finally:
            await ac.aclose()

    try:
        asyncio.run(main())
    finally:
        c.close()
        box["first"].stop()
        if "later" in box:
            box["later"].__exit__(None, None, None)


def test_tcp_client_waits_while_nothing_listens_up_to_its_bound():
    addr = f"tcp://127.0.0.1:{free_port()}"
    with connect(Other, addr, wait=0.5) as c:
        t = time.monotonic()
        with pytest.raises(ServiceNotUp, match=r"within 0\.5 s: nothing accepts connections"):
            c.whoami()
        assert 0.5 <= time.monotonic() - t < 0.5 + AT_ONCE

    async def main():
        ac = connect_async(Other, addr, wait=0.5)
        t = time.monotonic()
        try:
            with pytest.raises(ServiceNotUp, match=r"within 0\.5 s: nothing accepts connections"):
                await ac.whoami()
            return time.monotonic() - t
        finally:
            await ac.aclose()
    assert 0.5 <= asyncio.run(main()) < 0.5 + AT_ONCE


# ---- under the manager ------------------------------------------------------------------------

SEED_BACK_TO_BACK = """\
import signal, subprocess, sys
mgr = subprocess.Popen([sys.executable, "-m", "speedysvc.service", "service.ini"])
try:
    out = subprocess.run([sys.executable, "echoclient.py"], capture_output=True, text=True, timeout=120)
    sys.stdout.write(out.stdout)
    sys.stderr.write(out.stderr)
finally:
    mgr.send_signal(signal.SIGTERM)
    code = mgr.wait(60)
sys.exit(out.returncode or code)
"""


def test_seed_commands_back_to_back_without_a_sleep(tmp_path):
    """The Quick Example's two commands typed as a script: the manager started in the
    background and the client at once, before the manager has created anything."""
    out = run_seed_script(tmp_path, SEED_BACK_TO_BACK)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout == "Hello World!\n", out.stderr[-3000:]


def test_a_stopped_service_fails_at_once_with_its_reason_and_serves_again_after_start(running):
    m = running(chatty_ini(1, 1))
    with connect(Chatty, timeout=LONG) as attached:
        assert attached.whoami()
        assert m.cli("stop", "Chatty").returncode == 0
        for c in (attached, connect(Chatty, timeout=LONG), connect(Chatty)):
            t = time.monotonic()
            with pytest.raises(ServiceUnavailable, match="service 'chatty' is stopped: stopped on request") as info:
                c.whoami()
            assert not isinstance(info.value, ServiceNotUp)
            assert time.monotonic() - t < AT_ONCE
        assert m.cli("start", "Chatty").returncode == 0
        assert attached.whoami() in {w["pid"] for w in m.service("Chatty")["worker_list"]}


FAILING_INI = """
    [CrashOnStart]
    import_from=services
    restart_backoff=0.05
    crash_limit=2

    [web monitor]
    port={port}
"""


def test_a_failed_service_fails_at_once_with_the_failure_reason(running):
    m = running(FAILING_INI, wait_ready=False)
    m.wait(lambda: m.service("CrashOnStart")["state"] == "failed", 60, "the service to be marked failed")
    with connect(CrashOnStart, timeout=LONG) as c:
        t = time.monotonic()
        with pytest.raises(ServiceUnavailable, match="service 'crash_on_start' failed: 2 workers in a row died "
                                                     "while starting"):
            c.never()
        assert time.monotonic() - t < AT_ONCE


def test_calls_during_a_hard_restart_under_load_do_not_fail(running):
    """Stop-then-start (``ServicePool.restart``): callers with a timeout wait for the new
    workers, whether the call found the old service stopping, stopped, or gone."""
    m = running(chatty_ini(2, 2))
    before = {w["pid"] for w in m.service("Chatty")["worker_list"]}
    stop = threading.Event()
    results, errors = [], []

    def caller():
        with connect(Chatty, timeout=LONG) as c:
            while not stop.is_set():
                try:
                    results.append(c.sleep(0.01, "ok"))
                except Exception as e:
                    errors.append(repr(e))

    async def async_caller():
        ac = connect_async(Chatty, timeout=LONG)
        try:
            while not stop.is_set():
                try:
                    results.append(await ac.sleep(0.01, "ok"))
                except Exception as e:
                    errors.append(repr(e))
        finally:
            await ac.aclose()

    threads = [threading.Thread(target=caller) for _ in range(4)]
    threads.append(threading.Thread(target=lambda: asyncio.run(async_caller())))
    for t in threads:
        t.start()
    try:
        assert wait_until(lambda: len(results) > 20, 20)
        for _ in range(2):
            assert m.cli("restart", "--hard", "Chatty").returncode == 0
            n = len(results)
            assert wait_until(lambda: len(results) > n + 20, 30)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    after = {w["pid"] for w in m.service("Chatty")["worker_list"]}
    assert not errors, errors[:5]
    assert not before & after   # the workers were replaced: it was a restart


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_an_attached_client_follows_its_manager_restarted(running, how):
    first = running(chatty_ini(1, 1))
    with connect(Chatty, timeout=LONG) as c:
        old = c.whoami()
        first.stop(how)
        if how == signal.SIGKILL:   # its workers notice their parent is gone and leave
            assert wait_until(lambda: not shm.process_alive(old), 10)
        box = {}
        call = threading.Thread(target=lambda: box.setdefault("pid", c.whoami()))
        call.start()
        time.sleep(0.3)   # the call is waiting for a manager
        assert call.is_alive()
        second = running(chatty_ini(1, 1))
        call.join(LONG)
        assert box.get("pid") in {w["pid"] for w in second.service("Chatty")["worker_list"]}

"""TCP served by the workers themselves (speedysvc.tcp.inworker): a call crosses two processes.

Each worker listens on the service's port (SO_REUSEPORT; LocalService holds the port) and runs a
call in its own process when idle, else posts it over shared memory to the pool.  Its TCP thread
and its shared-memory loop take turns (the worker entry's W_PHASE): one call at a time per
process, and a shared-memory call never waits behind a TCP call while another worker is idle.
"""
import threading
import time

import pytest

from speedysvc import _shmcore as core
from speedysvc import connect
from speedysvc.shm.worker import HOUSEKEEPING_INTERVAL
import tcp_helpers
import worker_clients
from tcp_helpers import call_in_thread, check, connect_to
from tcp_services import TcpEcho, TcpTurns

serve = tcp_helpers.serve


def phase(svc, pid):
    """The phase word of worker ``pid``'s entry (W_PHASE)."""
    entry = next(w for w in svc.segment.workers() if w["pid"] == pid)
    return svc.segment.region.load32(svc.segment.worker_offset(entry["index"]) + core.W_PHASE)


def busy_worker(svc, timeout=20.0):
    """The pid of the first worker seen busy (in a call), waiting up to ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = [w["pid"] for w in svc.segment.workers() if w["busy"]]
        if busy:
            return busy[0]
        time.sleep(0.002)
    raise AssertionError("no worker became busy")


def test_workers_serve_tcp_without_a_gateway_process(serve):
    svc = serve(TcpEcho, workers=2, tcp_in_workers=True)
    assert svc.tcp_process is None and svc.tcp_reservation is not None
    assert not svc.tcp_address.endswith(":0")
    with connect_to(svc) as c:
        check(c)
        for i in range(200):
            assert c.echo(i) == i
    # every call was run by a worker: counted in its entry and in the method's statistics
    assert sum(w["calls"] for w in svc.segment.workers()) >= 200 + 3
    assert svc.segment.method_stats()["echo"]["calls"] >= 200 + 2


def test_every_worker_accepts_connections(serve):
    """The kernel spreads connections over the workers' listeners: with enough connections each
    worker runs calls of its own connections in its own process."""
    svc = serve(TcpTurns, workers=2, tcp_in_workers=True)
    clients = [connect_to(svc, TcpTurns) for _ in range(16)]
    try:
        pids = {c.whoami() for c in clients}
    finally:
        for c in clients:
            c.close()
    assert pids == set(svc.pids)


def test_a_shm_call_is_not_held_behind_a_tcp_call(serve, tmp_path):
    """With 2 workers, one runs a slow TCP call in its process; shared-memory calls meanwhile all
    go to the other worker, and every one is answered while the TCP call still runs (a woken
    worker that runs a TCP call passes the wake-up on; its loop claims nothing meanwhile)."""
    svc = serve(TcpTurns, workers=2, tcp_in_workers=True)
    with connect_to(svc, TcpTurns, timeout=60) as tc, connect(TcpTurns) as sc:
        assert tc.whoami() in svc.pids   # (connected and served once)
        tc.hold(0)   # (known to be quick: a method no worker ran yet goes to the pool)
        release = str(tmp_path / "release")   # (the hold ends once the checks are done)
        th, outcome = call_in_thread(tc.hold, 30.0, release)
        holder = busy_worker(svc)
        other, = set(svc.pids) - {holder}
        assert phase(svc, holder) & core.PHASE_TCP   # run by the TCP thread, in the worker's process
        answered, slowest = [], 0.0
        # calls apart, so that both workers' loops are asleep when each comes: a wake-up the
        # holder kept for itself would leave the call to the other worker's next look at the
        # bitmap, up to a second (HOUSEKEEPING_INTERVAL) later
        for _ in range(150):
            time.sleep(0.01)
            t = time.monotonic()
            answered.append(sc.whoami())
            slowest = max(slowest, time.monotonic() - t)
        assert th.is_alive(), "the shared-memory calls waited for the TCP call"
        assert set(answered) == {other}
        assert slowest < HOUSEKEEPING_INTERVAL / 2, f"a shared-memory call waited {slowest:.2f} s"
        open(release, "w").close()
        th.join(60)
        assert outcome == {"value": holder}
    with connect(TcpTurns) as sc:   # neither worker ever ran two calls at once (each is asked)
        assert {sc.most_at_once() for _ in range(40)} == {1}


def test_one_call_at_a_time_per_process_under_mixed_load(serve):
    """TCP and shared-memory callers at once on 2 workers: no process ever runs two calls at once,
    and every call is answered."""
    svc = serve(TcpTurns, workers=2, tcp_in_workers=True)
    errors, stop = [], threading.Event()

    def tcp_caller():
        try:
            with connect_to(svc, TcpTurns) as c:
                while not stop.is_set():
                    c.hold(0.0005)
        except Exception as e:   # noqa: BLE001 - reported below
            errors.append(e)

    def shm_caller():
        try:
            with connect(TcpTurns) as c:
                while not stop.is_set():
                    c.hold(0.0005)
        except Exception as e:   # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=f) for f in (tcp_caller, tcp_caller, shm_caller, shm_caller)]
    for th in threads:
        th.start()
    time.sleep(3)
    stop.set()
    for th in threads:
        th.join(30)
    assert not errors
    with connect(TcpTurns) as c:
        most = {c.most_at_once() for _ in range(40)}
    assert most == {1}


@pytest.mark.parametrize("pipelined", [32])
def test_one_connections_pipelined_calls_spread_over_the_pool(serve, pipelined):
    """Calls of one connection in flight together: the busy worker posts them to the others."""
    import asyncio

    from speedysvc import connect_async

    svc = serve(TcpTurns, workers=2, tcp_in_workers=True)

    async def main():
        c = connect_async(TcpTurns, svc.tcp_address, timeout=30)
        try:
            return await asyncio.gather(*(c.hold(0.05) for _ in range(pipelined)))
        finally:
            await c.aclose()

    pids = asyncio.run(main())
    assert set(pids) == set(svc.pids)


def test_calls_in_flight_stay_within_max_inflight_across_the_workers(serve):
    """max_inflight (half the service's channels, so that shared-memory callers always find one)
    holds for the calls every serving worker posts together, not per worker: with 4 workers and
    8 channels, TCP clients pipelining slow calls over connections spread on every worker keep
    at most 4 in flight, and a shared-memory caller gets a channel
    meanwhile.  (Per worker, the 4 workers could post 16 calls and take every channel.)"""
    import asyncio

    from speedysvc import connect_async
    from speedysvc.tcp.options import inflight_for

    svc = serve(TcpEcho, workers=4, max_channels=8, tcp_in_workers=True)
    limit = inflight_for(8)
    seg = svc.segment
    stop, seen = threading.Event(), {"inflight": 0}

    def watch():   # the sum over the workers' TCP records, as often as we can read it
        while not stop.is_set():
            seen["inflight"] = max(seen["inflight"], seg.tcp_totals()["inflight"])
            time.sleep(0.001)

    async def flood():
        clients = [connect_async(TcpEcho, svc.tcp_address, timeout=60) for _ in range(12)]
        try:
            for c in clients:   # (each learns, in whichever worker it lands, that sleep is slow)
                await c.sleep(0.01)
            return await asyncio.gather(*(c.sleep(0.3, i) for c in clients for i in range(6)))
        finally:
            for c in clients:
                await c.aclose()

    watcher = threading.Thread(target=watch)
    watcher.start()
    result = {}
    flooder = threading.Thread(target=lambda: result.setdefault("answers", asyncio.run(flood())))
    flooder.start()
    try:
        assert wait_for(lambda: seg.tcp_totals()["inflight"] >= limit, 20), "the TCP calls never filled their room"
        with connect(TcpEcho, timeout=20) as shm_client:   # a channel is free for it
            for i in range(5):
                assert shm_client.echo(i) == i
        flooder.join(60)
    finally:
        stop.set()
        watcher.join(10)
    assert sorted(result["answers"]) == sorted(i for _ in range(12) for i in range(6))
    assert 0 < seen["inflight"] <= limit, seen
    assert wait_for(lambda: seg.tcp_totals()["inflight"] == 0, 10)


def wait_for(predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return False


def clients_by_worker(svc, n_workers, most=64):
    return worker_clients.clients_by_worker(lambda: connect_to(svc, TcpTurns, timeout=20), n_workers, most)


def test_a_tcp_serving_worker_killed_mid_call_fails_only_its_callers(serve):
    """kill -9 of a worker that serves TCP, in a call of its own connection (run in its process):
    that caller gets ConnectionLost or WorkerDied at once (typed, well within its timeout), the
    other worker's clients keep getting answers meanwhile and after, and the caller's next call
    connects again, to the worker alive.  (Under the manager the worker is also replaced:
    tests/manager/test_manager_tcp_in_workers.py.)"""
    import os
    import signal

    from speedysvc import ConnectionLost, WorkerDied

    svc = serve(TcpTurns, workers=2, tcp_in_workers=True)
    clients = clients_by_worker(svc, 2)
    victim, survivor = list(clients)
    clients[victim].hold(0)   # (known to be quick: a method no worker ran yet goes to the pool)
    try:
        t, outcome = call_in_thread(clients[victim].hold, 30)
        assert busy_worker(svc) == victim
        started = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        for i in range(20):   # the other worker's client, while the victim's call fails
            assert clients[survivor].whoami() == survivor
        t.join(15)
        assert not t.is_alive(), "the call hangs after its worker died"
        assert isinstance(outcome.get("error"), (ConnectionLost, WorkerDied)), outcome
        assert time.monotonic() - started < 10
        assert clients[survivor].hold(0, None) == survivor
        assert clients[victim].whoami() == survivor   # connected again, to the worker alive
    finally:
        for c in clients.values():
            c.close()


def test_a_worker_killed_in_a_call_another_worker_posted_fails_only_that_call(serve):
    """A worker that serves TCP posts the calls it cannot run itself to the pool; the worker
    running one of them is killed -9: that call gets WorkerDied (the connection lives in the
    other worker), the other calls of the connection their answers, and it goes on."""
    import asyncio
    import os
    import signal

    from speedysvc import WorkerDied, connect_async

    svc = serve(TcpTurns, workers=2, tcp_in_workers=True)
    clients = clients_by_worker(svc, 2)
    home, other = list(clients)
    for c in clients.values():   # each worker learns that ``hold`` is slow: it posts its calls
        c.hold(0.01)
        c.close()
    result = {}

    async def main():
        c = connect_async(TcpTurns, svc.tcp_address, timeout=30)
        try:
            while await c.whoami() != home:   # a connection served by ``home``
                await c.aclose()
                c = connect_async(TcpTurns, svc.tcp_address, timeout=30)
            result["connected"] = True
            calls = [asyncio.ensure_future(c.hold(3)) for _ in range(2)]
            got = await asyncio.gather(*calls, return_exceptions=True)
            got.append(await c.whoami())   # the connection goes on
            return got
        finally:
            await c.aclose()

    th = threading.Thread(target=lambda: result.setdefault("got", asyncio.run(main())))
    th.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (
            result.get("connected") and any(w["busy"] and w["pid"] == other for w in svc.segment.workers())):
        time.sleep(0.002)
    assert any(w["busy"] and w["pid"] == other for w in svc.segment.workers()), "no posted call reached the other worker"
    os.kill(other, signal.SIGKILL)
    th.join(30)
    assert not th.is_alive()
    *calls, after = result["got"]
    assert [type(r) for r in calls].count(WorkerDied) == 1, calls
    assert [r for r in calls if not isinstance(r, BaseException)] == [home], calls
    assert after == home


def test_an_answer_that_views_the_calls_own_buffer_is_sent_without_a_copy():
    """A raw method that answers with its argument's view of a large frame's own buffer: sent
    as it is (the buffer is the call's, nothing writes to it after); a view of anything else,
    which the service may change once the method returns, is copied."""
    from types import SimpleNamespace
    from speedysvc.tcp import framing as fr
    from speedysvc.tcp.inworker import InProcess
    me = SimpleNamespace(max_payload=1 << 30)
    own = fr.lazy_buffer(1 << 20, 5)
    own[:3] = b"abc"
    view = memoryview(own).toreadonly()[:3]
    status, out = InProcess.finish(me, 0, view, own=own)
    assert out is view and bytes(out) == b"abc"
    other = bytearray(b"abc")
    status, out = InProcess.finish(me, 0, memoryview(other), own=own)
    other[:] = b"xyz"
    assert out.__class__ is bytes and out == b"abc"
    status, out = InProcess.finish(me, 0, memoryview(own)[::2], own=own)   # strided: not sendable as it is
    assert out.__class__ is bytes and out[:2] == b"ac"
    status, out = InProcess.finish(me, 0, memoryview(own)[:3], own=None)   # not known to be the call's
    assert out.__class__ is bytes
    status, out = InProcess.finish(me, 0, memoryview(bytes(b"ab")), own=b"ab")   # a small frame's bytes
    assert out.__class__ is bytes and out == b"ab"
    # a view of memory no object owns (PyMemoryView_FromMemory: its .obj is None), beside an
    # argument that is no mapping either: copied
    import ctypes
    from_memory = ctypes.pythonapi.PyMemoryView_FromMemory
    from_memory.restype, from_memory.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int]
    raw = ctypes.create_string_buffer(b"xyz")
    loose = from_memory(ctypes.addressof(raw), 3, 0x100)   # PyBUF_READ
    assert loose.obj is None
    status, out = InProcess.finish(me, 0, loose, own=b"xyz")
    assert out.__class__ is bytes and out == b"xyz"

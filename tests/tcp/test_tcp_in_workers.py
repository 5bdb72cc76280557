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

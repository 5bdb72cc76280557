"""Processes that stop or die under connected TCP clients: the service restarted on the same port,
stopped or SIGTERMed with calls in flight, its gateway or a worker killed -9, its owner killed:
calls fail quickly and clearly, clients reconnect, nothing outlives its owner."""
import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from speedysvc import ConnectionLost, LocalService, ServiceUnavailable, WorkerDied, connect, connect_async
from speedysvc.errors import decode_exception
from speedysvc.tcp import framing as fr
from conftest import free_port, wait_until
import tcp_helpers
from tcp_helpers import (InProcessGateway, MSGPACK, MiB, RawClient, busy_channels, call_in_thread, compressed_call,
                         guarded, logs_clean, msgpack_args, run)
from tcp_services import TcpEcho, TcpKitchen, TcpRestart

tcp_mode = tcp_helpers.tcp_mode

serve, kitchen, client = tcp_helpers.serve, tcp_helpers.kitchen, tcp_helpers.client
server_logs_clean = tcp_helpers.server_logs_clean


def test_service_restarted_on_the_same_port_under_a_connected_client():
    port = free_port()
    addr = f"tcp://127.0.0.1:{port}"
    svc = LocalService(TcpRestart, workers=1, tcp=f"127.0.0.1:{port}").start()
    try:
        assert svc.tcp_address == addr
        c = connect(TcpRestart, addr, timeout=10, wait=0)   # (wait=0: "nobody there" below fails at once)
        assert c.echo("first") == "first"
        old_pids = set(svc.pids)
        svc.stop()

        # nobody there: a clear error, quickly
        t = time.monotonic()
        with pytest.raises(ServiceUnavailable):
            c.echo("down")
        assert time.monotonic() - t < 3

        svc = LocalService(TcpRestart, workers=1, tcp=f"127.0.0.1:{port}").start()
        assert svc.tcp_address == addr
        assert c.echo("second") == "second"       # the same client object reconnected
        assert c.whoami() not in old_pids
        c.close()
    finally:
        svc.stop()


def test_async_client_reconnects_after_a_restart_on_the_same_port():
    port = free_port()
    addr = f"tcp://127.0.0.1:{port}"
    box = {"svc": LocalService(TcpRestart, workers=1, tcp=f"127.0.0.1:{port}").start()}

    async def main():
        loop = asyncio.get_running_loop()
        ac = connect_async(TcpRestart, addr, timeout=10, wait=0)
        try:
            assert await ac.echo("first") == "first"
            await loop.run_in_executor(None, box["svc"].stop)
            with pytest.raises(ServiceUnavailable):
                await ac.echo("down")
            box["svc"] = await loop.run_in_executor(
                None, lambda: LocalService(TcpRestart, workers=1, tcp=f"127.0.0.1:{port}").start())
            assert await ac.echo("second") == "second"
            assert await ac.whoami() in box["svc"].pids
        finally:
            await ac.aclose()

    try:
        run(main(), timeout=40)
    finally:
        box["svc"].stop()


def test_calls_in_flight_during_a_stop_fail_instead_of_hanging(tcp_mode):
    """A stop with calls in flight that outlast its stop_timeout: they fail (not hang) within a
    few seconds.  A gateway tells its clients why (go-away: "... is stopping"); workers that
    serve TCP stop with the calls (their clients may see their connection lost, no reason
    given, or, for a call the worker holding the connection had posted to another worker,
    that one's death: ``WorkerDied``, a call that may have run, as the connection's loss)."""
    with LocalService(TcpRestart, workers=2, tcp="127.0.0.1:0", stop_timeout=1) as svc:
        addr = svc.tcp_address
        c = connect(TcpRestart, addr)          # no timeout: only the stop can end the call
        assert c.echo(1) == 1
        result = {}

        def sync_call():
            try:
                result["sync"] = c.sleep(4, "finished")
            except BaseException as e:
                result["sync"] = e
            result["sync_at"] = time.monotonic()

        def async_call():
            async def main():
                ac = connect_async(TcpRestart, addr)
                try:
                    assert await ac.echo(2) == 2
                    return await ac.sleep(4, "finished")
                except BaseException as e:
                    return e
                finally:
                    await ac.aclose()
            result["async"] = asyncio.run(main())
            result["async_at"] = time.monotonic()

        threads = [threading.Thread(target=sync_call), threading.Thread(target=async_call)]
        for th in threads:
            th.start()
        time.sleep(0.5)
        stopper = threading.Thread(target=svc.stop)
        t = time.monotonic()
        stopper.start()
        for th in threads:
            th.join(15)
        stopper.join(30)
        assert not any(th.is_alive() for th in threads), "a call hung"
        for kind in ("sync", "async"):
            allowed = (ConnectionLost, ServiceUnavailable) + ((WorkerDied,) if tcp_mode == "workers" else ())
            assert isinstance(result[kind], allowed), result
            assert result[f"{kind}_at"] - t < 3, f"{kind} call failed only after {result[f'{kind}_at'] - t:.1f} s"
        if tcp_mode == "gateway":
            assert "stopping" in str(result["sync"])
        c.close()


def test_tcp_server_exits_promptly_on_sigterm_with_a_call_in_flight():
    """After SIGTERM the TCP gateway waits up to stop_timeout for calls in flight,
    tells its clients and exits; it must not wait for the slow call itself."""
    with LocalService(TcpRestart, workers=1, tcp="127.0.0.1:0", stop_timeout=1, tcp_in_workers=False) as svc:
        c = connect(TcpRestart, svc.tcp_address)
        assert c.echo(1) == 1
        outcome = []

        def slow_call():
            try:
                outcome.append(c.sleep(4.5))
            except BaseException as e:
                outcome.append(e)

        th = threading.Thread(target=slow_call, daemon=True)
        th.start()
        time.sleep(0.5)
        proc = svc.tcp_process
        t = time.monotonic()
        proc.terminate()
        try:
            proc.wait(4)
        except subprocess.TimeoutExpired:
            pass
        elapsed = time.monotonic() - t
        th.join(10)
        c.close()
        assert outcome and isinstance(outcome[0], ServiceUnavailable), outcome
        assert proc.returncode == 0 and elapsed < 3, \
            f"the TCP server exited (code {proc.returncode}) only {elapsed:.1f} s after SIGTERM, stop_timeout=1"


def test_a_call_without_timeout_fails_when_the_gateway_is_killed(serve):
    """No timeout and the gateway process dies (kill -9) mid-call: the blocking read ends
    with ConnectionLost at once, not a hang; the next call finds nobody listening."""
    # (its worker still sleeps at the end; with TCP served by the workers, see test_tcp_in_workers.py)
    svc = serve(TcpKitchen, workers=1, stop_timeout=1.0, tcp_in_workers=False)
    c = connect(TcpKitchen, svc.tcp_address, wait=0)   # (wait=0: the next call fails at once)
    try:
        assert c.echo_msgpack(1) == 1
        th, outcome = call_in_thread(c.sleep, 20, "never")
        time.sleep(0.3)
        t = time.monotonic()
        os.kill(svc.tcp_process.pid, 9)
        th.join(10)
        assert not th.is_alive(), "the call hangs after its gateway died"
        assert isinstance(outcome.get("error"), ConnectionLost), outcome
        assert time.monotonic() - t < 3
        with pytest.raises(ServiceUnavailable):
            c.echo_msgpack(2)
    finally:
        c.close()


def test_worker_killed_mid_call_over_tcp_fails_that_call_and_the_connection_goes_on(serve):
    """kill -9 of the worker running a TCP call from a gateway: the caller gets WorkerDied well
    within its timeout, and the same connection is served by the other worker afterwards.  (A
    worker that serves TCP itself and is killed: test_tcp_in_workers.py.)"""
    import signal as _signal
    kitchen = serve(TcpKitchen, workers=2, tcp_in_workers=False)
    client = connect(TcpKitchen, kitchen.tcp_address, timeout=20)
    pids = set(kitchen.pids)
    started = time.monotonic()
    t, outcome = call_in_thread(client.sleep, 30, "never")
    from conftest import wait_until
    from speedysvc import shm as _shm
    seg = _shm.ServiceSegment.attach(TcpKitchen.name)
    assert wait_until(lambda: any(w["busy"] for w in seg.workers()), 10)
    busy = next(w["pid"] for w in seg.workers() if w["busy"])
    os.kill(busy, _signal.SIGKILL)
    t.join(15)
    assert not t.is_alive()
    assert isinstance(outcome.get("error"), WorkerDied), outcome
    assert time.monotonic() - started < 10
    assert client.echo_msgpack([1, "after"]) == [1, "after"]
    assert client.whoami() in pids - {busy}
    client.close()


@logs_clean
def test_worker_killed_while_calls_posted_together_are_in_flight():
    """A read brings a slow call and several quick ones (posted together, collected after);
    the worker running the slow one is killed -9: that call gets WorkerDied, every other
    one its answer, the connection goes on and no channel stays busy.  (A gateway's posting;
    with TCP served by the workers, see test_tcp_in_workers.py.)"""
    import signal
    with guarded(tcp_in_workers=False) as svc, RawClient(svc) as raw:
        raw.welcome()
        body = msgpack_args(30, "never")
        wire = [fr.call_header(1, b"sleep", MSGPACK.flags, 0, len(body)) + body]
        for i in range(2, 12):
            body = msgpack_args(i)
            wire.append(fr.call_header(i, b"echo", MSGPACK.flags, 0, len(body)) + body)
        raw.send(b"".join(wire))
        seg = svc.segment
        assert wait_until(lambda: any(w["busy"] for w in seg.workers()), 10)
        busy = next(w["pid"] for w in seg.workers() if w["busy"])
        os.kill(busy, signal.SIGKILL)
        got = {f.call_id: (f.arg, bytes(f.payload)) for f in raw.read_frames(11, timeout=20)}
        assert sorted(got) == list(range(1, 12))
        status, payload = got.pop(1)
        assert status == 1 and isinstance(decode_exception(payload), WorkerDied), decode_exception(payload)
        assert got == {i: (0, MSGPACK.dumps(i)) for i in range(2, 12)}
        raw.call(20, "echo", msgpack_args("after"))
        assert raw.reply()[:2] == (0, MSGPACK.dumps("after"))
        assert wait_until(lambda: not busy_channels(svc), 10), busy_channels(svc)


@logs_clean
def test_worker_killed_during_a_call_inflated_in_a_thread():
    """A large compressed call (inflated and waited for in a thread) whose worker is killed -9:
    that call gets WorkerDied, the connection goes on, the budget and the calls in flight are
    back to nothing."""
    import signal
    with guarded(max_payload=64 * MiB, tcp=None, workers=2) as svc, \
            InProcessGateway(TcpEcho.name, max_payload=64 * MiB) as gw:
        raw = RawClient(gw.tcp_address).welcome(compression="zstd")
        compressed_call(raw, 1, "sleep", msgpack_args(30, bytes(8 * MiB)), "zstd")
        seg = svc.segment
        assert wait_until(lambda: any(w["busy"] for w in seg.workers()), 10)
        os.kill(next(w["pid"] for w in seg.workers() if w["busy"]), signal.SIGKILL)
        status, payload, _ = raw.reply(timeout=20)
        assert status == 1 and isinstance(decode_exception(payload), WorkerDied), decode_exception(payload)
        raw.call(2, "echo", msgpack_args("after"))
        assert raw.reply()[:2] == (0, MSGPACK.dumps("after"))
        assert gw.read(lambda s: (s.inflight, s.inflate.inflating, s.parking.count)) == (0, 0, 0)
        raw.close()


def test_tcp_gateway_does_not_outlive_a_killed_owner(tmp_path):
    """The workers notice their owner died, and so does ``python -m speedysvc.tcp.serve``: else it
    would keep the port and its shared-memory channels (and the service segment would stay in
    /dev/shm)."""
    script = tmp_path / "owner.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "from speedysvc import LocalService\n"
        "from tcp_services import TcpEcho\n"
        "svc = LocalService(TcpEcho, workers=1, tcp='127.0.0.1:0', tcp_in_workers=False).start()\n"
        "print(svc.tcp_process.pid, svc.pids[0], flush=True)\n"
        "time.sleep(60)\n")
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True)
    gateway, worker = map(int, owner.stdout.readline().split())
    owner.kill()
    owner.wait()
    owner.stdout.close()
    def alive(pid):   # a zombie waiting to be reaped has exited
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if not alive(gateway) and not alive(worker):
                break
            time.sleep(0.1)
        worker_alive, gateway_alive = alive(worker), alive(gateway)
        assert (worker_alive, gateway_alive) == (False, False), \
            f"15 s after its owner was killed: worker alive {worker_alive}, TCP gateway alive {gateway_alive}"
    finally:
        for pid in (gateway, worker):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        time.sleep(1)
        from speedysvc import shm
        shm.remove_service_segments(TcpEcho.name)   # the killed owner could not


def test_tcp_gateway_whose_owner_died_while_it_started_exits():
    """The owner may die between starting the gateway and the gateway's first look at its
    parent; by then the gateway is someone else's child, so it is told its owner's pid."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    gateway = subprocess.Popen([sys.executable, "-m", "speedysvc.tcp.serve", TcpEcho.name, "--port", "0",
                                "--exit-with-parent", str(gone.pid)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert gateway.stdout.readline().startswith("listening on ")
        assert gateway.wait(10) == 0
    finally:
        if gateway.poll() is None:
            gateway.kill()
            gateway.wait()
        gateway.stdout.close()

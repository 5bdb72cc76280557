"""Services whose workers serve TCP themselves (tcp_in_workers = yes) under a real manager: the
manager holds the port and passes the options to the workers, which listen with SO_REUSEPORT;
their TCP counts live in the service segment (one record per worker entry) and the manager sums
them for its status and /metrics; the limits hold across the worker processes; a worker killed
-9 in a call fails only its callers and is replaced; restarts under TCP load."""
import os
import signal
import threading
import time
import urllib.request

import pytest

from speedysvc import connect
from speedysvc.errors import ConnectionLost, ServiceUnavailable, WorkerDied
from worker_clients import clients_by_worker


def ini(workers=2, extra=""):
    return f"""
        [Other]
        import_from=services
        bind_tcp=127.0.0.1
        tcp_in_workers=yes
        min_proc_num={workers}
        max_proc_num={workers}
        {extra}

        [web monitor]
        port={{port}}
    """


def tcp_client(**kw):
    from services import Other
    kw.setdefault("timeout", 20)
    return connect(Other, "tcp://127.0.0.1", **kw)


def clients_on_every_worker(m, n_workers, most=64):
    return clients_by_worker(tcp_client, n_workers, most)


def metric(m, line_start):
    with urllib.request.urlopen(m.url + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(line_start):
                return float(line.rsplit(" ", 1)[1])
    return None


def test_workers_serve_tcp_and_the_manager_sums_their_counts(running):
    m = running(ini(workers=2))
    status = m.service("Other")
    from services import Other
    assert status["tcp"].startswith(f"127.0.0.1:{Other.port}") and status["tcp_server"]["in_workers"] is True
    m.wait(lambda: m.service("Other")["tcp_server"]["listening_workers"] == 2, what="both workers listening")
    workers = {w["pid"] for w in status["worker_list"]}
    clients = clients_on_every_worker(m, 2)
    assert set(clients) == workers
    try:
        for c in clients.values():
            for i in range(50):
                assert c.sleep(0, i) == i
        m.wait(lambda: m.service("Other")["tcp_server"]["calls"] >= 102, what="the calls counted")
        t = m.service("Other")["tcp_server"]
        assert t["connections"] == 2 and t["connections_total"] >= 2
        assert m.service("Other")["tcp"].endswith("(2 clients)")
        # a call run in a worker's own process counts in the method's statistics like any other
        sleep_row = next(r for r in m.service("Other")["methods"] if r["name"] == "sleep")
        assert sleep_row["calls"] >= 100
        assert metric(m, 'speedysvc_tcp_connections{service="Other"}') == 2.0
        assert metric(m, 'speedysvc_tcp_events_total{event="calls",service="Other"}') >= 102
    finally:
        for c in clients.values():
            c.close()
    m.wait(lambda: m.service("Other")["tcp_server"]["connections"] == 0, what="the clients gone")


def test_tcp_max_connections_holds_across_the_worker_processes(running):
    m = running(ini(workers=4, extra="tcp_max_connections=3"))
    m.wait(lambda: m.service("Other")["tcp_server"]["listening_workers"] == 4, what="4 workers listening")
    admitted, refused = [], 0
    try:
        for _ in range(10):
            c = tcp_client(wait=0)
            try:
                c.whoami()
                admitted.append(c)
            except ServiceUnavailable as e:
                assert "too many TCP clients" in str(e)
                refused += 1
                c.close()
        assert len(admitted) == 3 and refused == 7
        assert m.service("Other")["tcp_server"]["connections"] == 3
        admitted.pop().close()   # room for one more, on whichever worker it lands
        m.wait(lambda: m.service("Other")["tcp_server"]["connections"] == 2, what="the client gone")
        c = tcp_client(wait=0)
        assert c.whoami()
        admitted.append(c)
    finally:
        for c in admitted:
            c.close()
    m.wait(lambda: m.service("Other")["tcp_server"]["refused"] >= 7, what="the refusals counted")


def test_tcp_max_connections_holds_when_the_workers_admit_at_the_same_instant(running):
    """Clients that finish their handshakes together on 4 workers: a worker counts a new client
    before it reads the sum (TcpServer.become_client), so two workers taking the last place
    at once never both keep it.  Each round, 32 connections read the server's hello, then send
    their client hellos all at once (the workers admit them side by side): never more than 4
    are welcomed, the others are refused with "too many TCP clients", and the manager's count
    agrees."""
    import socket

    from speedysvc.tcp import framing as fr
    from services import Other
    service = Other.service_name()
    m = running(ini(workers=4, extra="tcp_max_connections=4"))
    m.wait(lambda: m.service("Other")["tcp_server"]["listening_workers"] == 4, what="4 workers listening")

    def read_hello(sock):
        reader = fr.HelloReader()
        while True:
            data = sock.recv(65536)
            if not data:
                raise EOFError("closed in the handshake")
            msg = reader.feed(data)
            if msg is not None:
                return msg

    for round_ in range(8):
        socks = [socket.create_connection(("127.0.0.1", Other.port), timeout=20) for _ in range(32)]
        try:
            for s in socks:
                assert read_hello(s)[0] == fr.SERVER_HELLO
            hellos = [fr.pack_hello(fr.CLIENT_HELLO, {"service": service, "compression": "", "compress_min": 4096,
                                                      "nonce": fr.new_nonce(), "proof": None}) for _ in socks]
            for s, hello in zip(socks, hellos):   # (as close together as one process can)
                s.sendall(hello)
            answers = [read_hello(s) for s in socks]
            welcomed = sum(a[0] == fr.WELCOME for a in answers)
            refused = [a[2] for a in answers if a[0] == fr.REFUSED]
            assert welcomed <= 4, f"round {round_}: {welcomed} clients admitted under a limit of 4"
            assert welcomed + len(refused) == len(socks)
            assert all(b"too many TCP clients" in body["error"] for body in refused)
            m.wait(lambda: m.service("Other")["tcp_server"]["connections"] == welcomed, what="the clients counted")
        finally:
            for s in socks:
                s.close()
        m.wait(lambda: m.service("Other")["tcp_server"]["connections"] == 0, what="the clients gone")


def test_a_tcp_worker_killed_mid_call_fails_its_callers_only_and_is_replaced(running):
    m = running(ini(workers=2))
    m.wait(lambda: m.service("Other")["tcp_server"]["listening_workers"] == 2, what="both workers listening")
    clients = clients_on_every_worker(m, 2)
    caller = list(clients)[0]
    outcome = {}

    def slow_call():
        try:
            outcome["value"] = clients[caller].sleep(30)
        except Exception as e:   # noqa: BLE001 - the test checks the type
            outcome["error"] = e

    th = threading.Thread(target=slow_call)
    th.start()
    # (a slow method's calls, and one no worker has run yet, are posted to the pool: either
    # worker may run it; the one that does is killed)
    m.wait(lambda: any(w["busy"] for w in m.service("Other")["worker_list"]), what="a worker in the call")
    victim = next(w["pid"] for w in m.service("Other")["worker_list"] if w["busy"])
    survivor = next(pid for pid in clients if pid != victim)
    calls_before = m.service("Other")["tcp_server"]["calls"]
    os.kill(victim, signal.SIGKILL)
    th.join(30)
    assert isinstance(outcome.get("error"), (ConnectionLost, WorkerDied)), outcome
    # the other worker's client keeps going, and the killed worker's share of the clients is gone
    assert clients[survivor].sleep(0, "on") == "on"
    m.wait(lambda: victim not in {w["pid"] for w in m.service("Other")["worker_list"]}
           and m.service("Other")["tcp_server"]["listening_workers"] == 2, what="a new worker listening")
    assert m.service("Other")["tcp_server"]["calls"] >= calls_before   # (the totals did not drop)
    # the victim's client connects again (to a worker alive), and the new worker serves TCP
    assert clients[victim].whoami() != victim
    new_pids = {w["pid"] for w in m.service("Other")["worker_list"]} - {survivor}
    more = clients_on_every_worker(m, 2)
    assert set(more) == new_pids | {survivor}
    for c in list(clients.values()) + list(more.values()):
        c.close()
    m.wait(lambda: m.service("Other")["tcp_server"]["connections"] == 0, what="no client left counted")


@pytest.mark.parametrize("hard", [False, True])
def test_a_restart_under_tcp_load(running, hard):
    """Callers keep calling over TCP through a rolling (or hard) restart, each on a client of one
    address.  Rolling: no call is lost (a call a leaving worker never started is answered as not
    run, and the client sends it again on a new connection, to a worker that stays or came).
    Hard: each call is answered, or fails with ServiceUnavailable / ConnectionLost (a call the
    stopping workers had not started while none listened, a connection they closed).  The
    callers go on, and the new workers serve them."""
    m = running(ini(workers=2))
    m.wait(lambda: m.service("Other")["tcp_server"]["listening_workers"] == 2, what="both workers listening")
    old = {w["pid"] for w in m.service("Other")["worker_list"]}
    stop, answered, failed, wrong = threading.Event(), [], [], []

    def caller():
        with tcp_client(timeout=30) as c:
            while not stop.is_set():
                try:
                    answered.append(c.whoami())
                except (ServiceUnavailable, ConnectionLost) as e:
                    failed.append(e)
                except Exception as e:   # noqa: BLE001 - reported below
                    wrong.append(e)
                    return

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for th in threads:
        th.start()
    time.sleep(1.0)
    assert m.cli("restart", *(["--hard"] if hard else []), "Other").returncode == 0
    new = {w["pid"] for w in m.service("Other")["worker_list"]}
    assert not new & old
    mark = len(answered)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not set(answered[mark:]) & new:
        time.sleep(0.05)
    stop.set()
    for th in threads:
        th.join(60)
    assert not wrong, wrong
    assert set(answered[mark:]) & new, "no call reached the new workers"
    if not hard:
        assert not failed, failed
    # what failed was a call the stopping worker had not started, or its connection closed as it
    # left (the client connects again at its next call)
    assert all("stopping" in str(e) or "restarting" in str(e) for e in failed), failed

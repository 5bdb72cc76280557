"""Clients over several endpoints (speedysvc.tcp.balanced; README, "Running on several
hosts"), against real managers of one service on loopback addresses 127.0.0.1-3 (each its
own "host", with a namespace of its own): balancing, ejection and taking back, calls that
never ran sent elsewhere, idempotent calls sent again once, the resolver followed."""
import asyncio
import collections
import os
import signal
import threading
import time

import pytest

from speedysvc import (ConnectionLost, ServiceUnavailable, WorkerDied, connect, connect_async, json_method,
                       msgpack_method)
from speedysvc import pickle_method, raw_method
from speedysvc.methods import method_spec
from speedysvc.tcp import balanced
from speedysvc.tcp.client import TcpTransport
from conftest import wait_until
from services import Spread
from spread_hosts import Host

ADDRESSES = [f"127.0.0.{i}" for i in (1, 2, 3)]
ALL = "tcp://" + ",".join(ADDRESSES)
# the hosts of the tests that kill or stop them (the module's three stay up meanwhile)
OWN = [f"127.0.0.{i}" for i in (11, 12, 13)]
OWN_ALL = "tcp://" + ",".join(OWN)


def start_hosts(tmp_path, addresses, tag=""):
    hosts = []
    try:
        for i, address in enumerate(addresses):
            hosts.append(Host(tmp_path / f"h{i + 1}{tag}", f"h{i + 1}{tag}", address))
        for h in hosts:
            h.wait_ready()
    except BaseException:
        for h in hosts:
            h.stop()
        raise
    return hosts


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """Three hosts for the tests that leave them as they found them."""
    hosts = start_hosts(tmp_path_factory.mktemp("three"), ADDRESSES, tag="m")
    yield hosts
    for h in hosts:
        h.stop()


@pytest.fixture
def fresh(tmp_path):
    """Three hosts of this test's own (it may kill or stop them)."""
    hosts = start_hosts(tmp_path, OWN)
    yield hosts
    for h in hosts:
        h.stop()


def spread_of(answers) -> dict:
    counts = collections.Counter(answers)
    return {k: v / len(answers) for k, v in counts.items()}


def state(client, address):
    return next(e for e in client.endpoints() if e["address"].startswith(f"tcp://{address}:"))


def test_addresses_and_the_decorator():
    """The syntax: one address keeps the plain transport; several, a list, a resolver make a
    balanced one; idempotent= on every decorator reaches the client's method description."""
    with connect(Spread, "tcp://127.0.0.1") as c:
        assert isinstance(c._transport, TcpTransport) and c.endpoints() is None
    for address in (ALL, [f"tcp://{a}" for a in ADDRESSES], "tcp://127.0.0.1:5555,127.0.0.2"):
        with connect(Spread, address) as c:
            assert isinstance(c._transport, balanced.BalancedTransport)
    with connect(Spread, "tcp://127.0.0.1", resolve_every=1) as c:
        assert isinstance(c._transport, balanced.BalancedTransport)
    with connect(Spread, ALL) as c:
        assert c._transport.idempotent == {b"where", b"where_slowly"}
    assert method_spec(Spread.where).idempotent and not method_spec(Spread.once).idempotent
    for deco in (json_method, msgpack_method, pickle_method, raw_method):
        assert method_spec(deco(idempotent=True)(lambda self, x: x)).idempotent
        assert not method_spec(deco(lambda self, x: x)).idempotent
        with pytest.raises(TypeError):
            deco(idempotent="yes")
    for bad, error in (("tcp://a,shm://", ValueError), (["127.0.0.1"], ValueError), ([b"tcp://a"], TypeError),
                       ("tcp://a,,b", ValueError)):
        with pytest.raises(error):
            connect(Spread, bad)
    with pytest.raises(ValueError, match="resolve_every"):
        connect(Spread, ALL, resolve_every=0)
    with pytest.raises(TypeError, match="resolver"):
        connect(Spread, ALL, resolver="dns")


def test_calls_spread_evenly_and_go_to_the_least_busy(three):
    """One caller after another: within 15 % of a third each (in turn when all are idle); many
    callers at once: each host its part (least outstanding gives a host that answers faster
    more, so not a third each on a loaded machine, where one host's process may wait for a CPU
    for a while: at least a twentieth each); while one host holds a slow call, none
    goes there."""
    with connect(Spread, ALL, timeout=30) as c:
        answers = [c.where() for _ in range(600)]
        assert set(spread_of(answers)) == {"h1m", "h2m", "h3m"}
        assert all(abs(share - 1 / 3) <= 0.15 / 3 for share in spread_of(answers).values()), spread_of(answers)
        together = []

        def caller():
            for _ in range(150):
                together.append(c.once())
        threads = [threading.Thread(target=caller) for _ in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert len(together) == 600
        assert len(spread_of(together)) == 3 and min(spread_of(together).values()) >= 1 / 20, spread_of(together)
        slow = []
        t = threading.Thread(target=lambda: slow.append(c.once_slowly(1.5)))
        t.start()
        wait_until(lambda: sum(e["inflight"] for e in c.endpoints()) == 1, 10)
        busy = next(e for e in c.endpoints() if e["inflight"] == 1)
        busy_host = "h" + busy["address"].split(".")[3][0] + "m"
        meanwhile = [c.where() for _ in range(50)]
        t.join()
        assert slow == [busy_host] and busy_host not in meanwhile
        for e in c.endpoints():
            assert e["healthy"] and e["errors"] == 0 and e["last_error"] is None and e["inflight"] == 0
            assert e["calls"] >= 300


def test_a_dead_address_is_ejected_and_its_calls_go_elsewhere(three):
    """Nothing listens on 127.0.0.4: its calls never ran (refused), so they go to the others
    at once; it is ejected, probed with a growing pause, and says why."""
    with connect(Spread, ALL + ",127.0.0.4", timeout=10, wait=0) as c:
        answers = [c.once() for _ in range(200)]
        assert len(answers) == 200 and "?" not in answers
        dead = state(c, "127.0.0.4")
        assert not dead["healthy"] and dead["calls"] == 0 and "refused" in dead["last_error"]
        errors = dead["errors"]
        time.sleep(1.0)
        [c.once() for _ in range(20)]   # (probes run while calls are made)
        time.sleep(0.5)
        assert errors < state(c, "127.0.0.4")["errors"] <= errors + 1 + 1.5 / balanced.EJECT_FIRST


def test_every_endpoint_down_fails_within_the_timeout_naming_each(tmp_path):
    """No endpoint up: ServiceUnavailable within the call's timeout (or at once with wait=0),
    with each endpoint's last error."""
    dead = "tcp://127.0.0.5,127.0.0.6"
    with connect(Spread, dead, timeout=1.0) as c:
        t = time.monotonic()
        with pytest.raises(ServiceUnavailable) as raised:
            c.where()
        took = time.monotonic() - t
        assert 0.9 <= took <= 1.0 + 2.0, took
        text = str(raised.value)
        assert "127.0.0.5" in text and "127.0.0.6" in text and text.count("refused") >= 2
        assert len(raised.value.endpoints) == 2
    with connect(Spread, dead, wait=0) as c:
        t = time.monotonic()
        with pytest.raises(ServiceUnavailable, match="no endpoint could take the call"):
            c.where()
        assert time.monotonic() - t < 2.0

    async def main():
        ac = connect_async(Spread, dead, timeout=1.0)
        try:
            with pytest.raises(ServiceUnavailable, match="127.0.0.6"):
                await ac.where()
        finally:
            await ac.aclose()
    asyncio.run(main())


def test_a_resolver_s_new_address_gets_calls_within_one_interval(three):
    """The resolver is asked again every ``resolve_every``: an address it adds gets calls
    within one interval (and a margin), one it drops gets none after."""
    answer = ["127.0.0.1"]
    asked = []

    def resolver(host, port):
        asked.append((host, port))
        return list(answer)

    every = 0.5
    with connect(Spread, "tcp://spread.example", resolver=resolver, resolve_every=every, timeout=10) as c:
        assert {c.where() for _ in range(20)} == {"h1m"}
        assert asked[0] == ("spread.example", Spread.port)
        answer[:] = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
        t = time.monotonic()
        seen = set()
        while seen != {"h1m", "h2m", "h3m"} and time.monotonic() - t < every + 2.0:
            seen.add(c.where())
            time.sleep(0.005)
        assert seen == {"h1m", "h2m", "h3m"}, seen
        assert {e["host"] for e in c.endpoints()} == {"spread.example"}
        answer[:] = ["127.0.0.3"]
        time.sleep(every + 0.1)
        c.where()   # (the call that finds the interval over resolves again)
        assert {c.where() for _ in range(30)} == {"h3m"}
        assert [e["address"].split(":")[1] for e in c.endpoints()] == ["//127.0.0.3"]
        calls = len(asked)

        def failing(host, port):
            raise OSError("no such host")
        c._transport.resolver = failing
        time.sleep(every + 0.1)
        assert c.where() == "h3m"   # a failed resolution keeps what the host had
        assert len(asked) == calls


def test_a_resolver_that_answers_nothing_usable_is_reported():
    """A resolver that raises, or answers something other than a list of addresses: the call
    fails with ServiceUnavailable saying so (after its wait: pods may come back)."""
    for resolver in (lambda host, port: None, lambda host, port: "127.0.0.1", lambda host, port: 1 / 0):
        with connect(Spread, "tcp://spread.example", resolver=resolver, wait=0) as c:
            with pytest.raises(ServiceUnavailable, match="cannot resolve spread.example"):
                c.where()
    with connect(Spread, "tcp://spread.example", resolver=lambda host, port: [], timeout=0.5) as c:
        t = time.monotonic()
        with pytest.raises(ServiceUnavailable, match="no address"):
            c.where()
        assert 0.4 <= time.monotonic() - t <= 0.5 + 2.0


def test_the_asyncio_client_balances_and_fails_over(three):
    async def main():
        ac = connect_async(Spread, [f"tcp://{a}" for a in ADDRESSES] + ["tcp://127.0.0.4"], timeout=10, wait=0)
        try:
            answers = await asyncio.gather(*(ac.where() for _ in range(300)))   # (the dead one's go elsewhere)
            assert set(answers) == {"h1m", "h2m", "h3m"}
            assert min(spread_of(answers).values()) >= 1 / 6, spread_of(answers)
            answers = [await ac.once() for _ in range(60)]
            assert all(abs(s - 1 / 3) <= 0.15 / 3 for s in spread_of(answers).values()), spread_of(answers)
            assert not next(e for e in ac.endpoints() if "127.0.0.4" in e["address"])["healthy"]
        finally:
            await ac.aclose()

        async def resolver(host, port):
            return ["127.0.0.2"]
        ac = connect_async(Spread, "tcp://x", resolver=resolver, timeout=10)
        try:
            assert await ac.where() == "h2m"
        finally:
            await ac.aclose()
    asyncio.run(main())


def in_flight_everywhere(c, method, seconds, n=3):
    """Start ``n`` slow calls from threads, one on each endpoint (least outstanding): their outcomes."""
    outcomes = [None] * n

    def call(i):
        try:
            outcomes[i] = ("ok", getattr(c, method)(seconds))
        except Exception as e:   # noqa: BLE001 - the test checks the type
            outcomes[i] = ("error", e)
    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    wait_until(lambda: [e["inflight"] for e in c.endpoints()] == [1] * n, 10)
    return threads, outcomes


def test_a_call_lost_in_flight_is_sent_again_only_if_idempotent(fresh):
    """kill -9 of a host's manager with one call in flight there: the idempotent call is
    answered by another host; the other raises ConnectionLost, or WorkerDied when the worker
    that runs it dies before the one holding its connection (workers serving TCP: a slow call
    is posted to another worker); the calls after go to the others."""
    h1, h2, h3 = fresh
    with connect(Spread, OWN_ALL, timeout=20) as c:
        threads, idem = in_flight_everywhere(c, "where_slowly", 2.0)
        h1.kill()
        [t.join() for t in threads]
        assert all(kind == "ok" for kind, _ in idem), idem
        assert sorted(v for _, v in idem) in (["h2", "h2", "h3"], ["h2", "h3", "h3"]), idem
        ejected = state(c, OWN[0])
        assert not ejected["healthy"] and ejected["errors"] >= 1 and "ConnectionLost" in ejected["last_error"]

    with connect(Spread, f"tcp://{OWN[1]},{OWN[2]}", timeout=20) as c:
        threads, once = in_flight_everywhere(c, "once_slowly", 2.0, n=2)
        h2.kill()
        [t.join() for t in threads]
        lost = [v for kind, v in once if kind == "error"]
        assert len(lost) == 1 and isinstance(lost[0], (ConnectionLost, WorkerDied)), once
        assert [v for kind, v in once if kind == "ok"] == ["h3"]
        assert {c.once() for _ in range(20)} == {"h3"}


def test_a_host_that_answers_nothing_is_ejected_within_its_connect_timeout_and_taken_back(fresh):
    """A host whose processes are stopped with SIGSTOP accepts connections (the kernel does) and
    answers nothing, as a host cut off does: it is ejected within the connect timeout, its calls in flight fail
    once its probe does (an idempotent one is answered elsewhere), and after SIGCONT it gets
    calls again within the longest pause between probes."""
    h1, h2, h3 = fresh
    connect_timeout = 1.0
    with connect(Spread, OWN_ALL, timeout=15, connect_timeout=connect_timeout) as c:
        [c.where() for _ in range(30)]   # (connected to each)
        stop_all = threading.Event()
        answers = []
        failures = []

        def load():
            while not stop_all.is_set():
                try:
                    answers.append((time.monotonic(), c.where_slowly(0.01)))
                except Exception as e:   # noqa: BLE001
                    failures.append(e)
        threads = [threading.Thread(target=load) for _ in range(3)]
        [t.start() for t in threads]
        try:
            time.sleep(0.5)
            h1.freeze()
            stopped = time.monotonic()
            wait_until(lambda: not state(c, OWN[0])["healthy"], connect_timeout + 5)
            ejected_after = time.monotonic() - stopped
            time.sleep(connect_timeout * 2 + 1)
            h1.freeze(False)
            resumed = time.monotonic()
            wait_until(lambda: any(t > resumed and who == "h1" for t, who in answers[-200:]),
                       balanced.EJECT_MAX + connect_timeout + 5)
            back_after = time.monotonic() - resumed
        finally:
            stop_all.set()
            [t.join() for t in threads]
        assert ejected_after <= connect_timeout + 2.0, ejected_after
        assert back_after <= balanced.EJECT_MAX + connect_timeout + 3.0, back_after
        assert not failures, failures[:3]   # where_slowly is idempotent: each was answered somewhere


def test_the_asyncio_client_sends_a_lost_call_again_only_if_idempotent(fresh):
    h1, h2, h3 = fresh

    async def main():
        ac = connect_async(Spread, OWN_ALL, timeout=20)
        try:
            idem = [asyncio.ensure_future(ac.where_slowly(2.0)) for _ in range(3)]
            await asyncio.sleep(0.5)
            assert [e["inflight"] for e in ac.endpoints()] == [1, 1, 1]
            h1.kill()
            assert sorted(await asyncio.gather(*idem)) in (["h2", "h2", "h3"], ["h2", "h3", "h3"])
            once = [asyncio.ensure_future(ac.once_slowly(2.0)) for _ in range(2)]
            await asyncio.sleep(0.5)
            assert sorted(e["inflight"] for e in ac.endpoints()) == [0, 1, 1]
            h2.kill()
            got = await asyncio.gather(*once, return_exceptions=True)
            errors = [g for g in got if isinstance(g, BaseException)]   # (see the blocking client's test)
            assert len(errors) == 1 and isinstance(errors[0], (ConnectionLost, WorkerDied)), got
            assert [g for g in got if not isinstance(g, BaseException)] == ["h3"], got
            assert {await ac.once() for _ in range(10)} == {"h3"}
        finally:
            await ac.aclose()
    asyncio.run(main())


def test_a_call_whose_worker_dies_is_sent_again_only_if_idempotent_and_its_host_stays(tmp_path):
    """Hosts whose TCP is served by a gateway (so the host answers ``WorkerDied`` when the
    worker running a call is killed -9, rather than losing the connection): the idempotent
    call is answered by the other host, the other raises WorkerDied, and the host, which
    replaces its worker, is not ejected."""
    hosts = [Host(tmp_path / f"g{i + 1}", f"g{i + 1}", OWN[i], extra="tcp_in_workers=no") for i in (0, 1)]
    try:
        for h in hosts:
            h.wait_ready()
        g1 = hosts[0]

        def kill_g1_workers():
            for pid in g1.processes():
                if pid != g1.proc.pid:
                    os.kill(pid, signal.SIGKILL)

        with connect(Spread, f"tcp://{OWN[0]},{OWN[1]}", timeout=30) as c:
            threads, idem = in_flight_everywhere(c, "where_slowly", 3.0, n=2)
            kill_g1_workers()
            [t.join() for t in threads]
            assert idem == [("ok", "g2"), ("ok", "g2")], idem   # g1's was sent again, to g2
            assert state(c, OWN[0])["healthy"], state(c, OWN[0])
            # the host took new workers: it answers again
            assert wait_until(lambda: "g1" in {c.where() for _ in range(20)}, 60)

            threads, once = in_flight_everywhere(c, "once_slowly", 3.0, n=2)
            kill_g1_workers()
            [t.join() for t in threads]
            lost = [v for kind, v in once if kind == "error"]
            assert len(lost) == 1 and isinstance(lost[0], WorkerDied), once
            assert [v for kind, v in once if kind == "ok"] == ["g2"], once
    finally:
        for h in hosts:
            h.stop()

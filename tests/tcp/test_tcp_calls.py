"""Calls over TCP between real processes and real sockets, with the blocking client and the
asyncio client: codecs, arguments, errors, large payloads, many calls on one connection, many
connections, threads and processes sharing a client, addresses, and the client's methods."""
import asyncio
import os
import random
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from speedysvc import BadArguments, DecodeError, connect, connect_async
from speedysvc import _shmcore as core
from speedysvc.errors import encode_exception
from speedysvc.tcp import framing as fr
import tcp_helpers
from tcp_helpers import CountingProxy, Interrupted, fake_service, run, tcp_service
from tcp_services import TcpEcho, TcpError, TcpKitchen, TcpOther

serve, kitchen, client, proxy = tcp_helpers.serve, tcp_helpers.kitchen, tcp_helpers.client, tcp_helpers.proxy


JSON_VALUES = [None, True, 0, -1, 2**62, 1.5, "", "héllo ✓", [1, [2, [3]]], {"a": {"b": [1, 2]}}]


MSGPACK_VALUES = JSON_VALUES + [b"\x00\xffbytes", {1: "int key"}, {"nested": [b"a", {2: b"b"}]}, b"y" * 100_000]


RAW_VALUES = [b"", b"x", bytes(range(256)) * 10, bytearray(b"mutable"), memoryview(b"view"), os.urandom(300_000)]


def test_echo_json_over_tcp(client):
    for value in JSON_VALUES:
        assert client.echo_json(value) == value
    assert client.send(TcpKitchen.echo_json, [{"via": "send"}]) == {"via": "send"}


def test_echo_msgpack_over_tcp(client):
    for value in MSGPACK_VALUES:
        assert client.echo_msgpack(value) == value


def test_echo_raw_over_tcp(client):
    for value in RAW_VALUES:
        result = client.echo_raw(value)
        assert type(result) is bytes
        assert result == bytes(value)
    assert client.raw_upper(b"abc") == b"ABC"


def test_keyword_arguments_over_tcp(client, kitchen):
    assert client.add(1) == 11
    assert client.add(1, 2) == 3
    assert client.add(1, b=5) == 6
    assert client.add(a=2, b=3, scale=10) == 50
    assert client.send("add", [1], {"b": 1}) == 2
    with pytest.raises(BadArguments):
        client.add()

    async def main():
        ac = connect_async(TcpKitchen, kitchen.tcp_address)
        try:
            assert await ac.add(a=2, b=3, scale=10) == 50
            assert await ac.send("add", [1], {"scale": 3}) == 33
        finally:
            await ac.aclose()
    run(main())


def test_exceptions_keep_their_type_and_remote_traceback(client, kitchen):
    with pytest.raises(ValueError, match="bad input") as info:
        client.fail_value("bad input")
    tb = info.value.remote_traceback
    assert "fail_value" in tb and "raise ValueError(message)" in tb
    assert "bad input" in str(info.value.__cause__)

    with pytest.raises(TcpError) as info:
        client.fail_custom(42)
    assert type(info.value) is TcpError
    assert info.value.code == 42 and info.value.detail == "custom detail"
    assert "fail_custom" in info.value.remote_traceback
    assert client.echo_msgpack("after") == "after"   # the connection carries on

    async def main():
        ac = connect_async(TcpKitchen, kitchen.tcp_address)
        try:
            with pytest.raises(TcpError) as info:
                await ac.fail_custom(7)
            assert info.value.code == 7 and "fail_custom" in info.value.remote_traceback
            assert await ac.echo_msgpack(1) == 1
        finally:
            await ac.aclose()
    run(main())


def test_32_mib_payload_over_tcp(client, kitchen):
    data = random.Random(1).randbytes(32 << 20)
    assert client.echo_raw(data) == data
    assert client.size_of(data) == len(data)
    assert len(client.big(20 << 20)) == 20 << 20
    assert client.echo_msgpack("small after big") == "small after big"

    async def main():
        ac = connect_async(TcpKitchen, kitchen.tcp_address)
        try:
            assert await ac.echo_raw(data) == data
        finally:
            await ac.aclose()
    run(main())


def test_async_client_pipelines_200_calls_on_one_connection(serve):
    svc = serve(TcpKitchen, workers=4)
    with CountingProxy(svc.tcp_address) as proxy:
        results, order, elapsed = run(pipeline_200(proxy.address))
        connections = proxy.connections
    for i, result in enumerate(results):
        if i % 20 == 0:
            assert result == i
        elif i % 3 == 0:
            assert result == bytes([i % 256]) * (i * 500)
        else:
            assert result == {"i": i, "s": "x" * i}
    assert sorted(order) == list(range(200))
    # the slow calls did not hold up the quick ones behind them, and ran side by side
    assert all(i % 20 for i in order[:15]) and order.index(0) > 15, order
    assert elapsed < 3.0, f"10 calls of 0.4 s on 4 workers took {elapsed:.2f} s"
    assert connections == 1


async def pipeline_200(address):
    """200 calls from as many tasks on one async client; (results, completion order, elapsed)."""
    ac = connect_async(TcpKitchen, address, timeout=20)
    order = []

    async def one(i):
        if i % 20 == 0:
            result = await ac.sleep(0.4, i)
        elif i % 3 == 0:
            result = await ac.echo_raw(bytes([i % 256]) * (i * 500))
        else:
            result = await ac.echo_msgpack({"i": i, "s": "x" * i})
        order.append(i)
        return result

    try:
        t = time.monotonic()
        results = await asyncio.gather(*(one(i) for i in range(200)))
        elapsed = time.monotonic() - t
    finally:
        await ac.aclose()
    return results, order, elapsed


def test_50_threads_share_one_sync_client(proxy):
    errors = []
    barrier = threading.Barrier(50)
    with connect(TcpKitchen, proxy.address, timeout=30) as c:
        def worker(t):
            try:
                rnd = random.Random(t)
                barrier.wait(10)
                for i in range(20):
                    if i % 5 == 4:
                        data = rnd.randbytes(rnd.choice([10, 5000, 100_000]))
                        assert c.echo_raw(data) == data
                    else:
                        value = {"thread": t, "i": i, "pad": "p" * rnd.randrange(200)}
                        assert c.echo_msgpack(value) == value
            except BaseException as e:
                errors.append((t, repr(e)))

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(50)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert not any(th.is_alive() for th in threads), "a thread hung"
        assert not errors, errors[:5]
    assert proxy.connections == 1


def test_threads_calling_now_and_then_share_one_sync_client(proxy):
    """Calls from a few threads that often leave the connection idle for a moment
    (the client then checks whether the server closed it)."""
    errors = []
    with connect(TcpKitchen, proxy.address, timeout=20) as c:
        def worker(t):
            rnd = random.Random(t)
            for i in range(800):
                try:
                    assert c.echo_msgpack([t, i]) == [t, i]
                except BaseException as e:
                    errors.append(repr(e))
                if rnd.random() < 0.5:
                    time.sleep(rnd.random() * 1e-4)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert not any(th.is_alive() for th in threads), "a thread hung"
    assert not errors, f"{len(errors)} calls failed, e.g. {errors[:3]}"
    assert proxy.connections == 1


def test_300_connections_at_once(kitchen):
    clients = [connect(TcpKitchen, kitchen.tcp_address, timeout=20) for _ in range(300)]
    try:
        with ThreadPoolExecutor(60) as pool:
            results = list(pool.map(lambda ic: ic[1].echo_msgpack(ic[0]), enumerate(clients)))
        assert results == list(range(300))
        conns = {id(c._transport._conn) for c in clients}
        assert len(conns) == 300
        # all still open and usable
        for i, c in enumerate(clients[::25]):
            assert c.echo_json(i) == i
    finally:
        for c in clients:
            c.close()
    with connect(TcpKitchen, kitchen.tcp_address, timeout=10) as c:
        assert c.echo_msgpack("after") == "after"


def test_tcp_client_used_in_both_processes_after_fork():
    """After fork() parent and child call through the same TCP client at once, and each gets its
    own answers (ShmTransport re-attaches after fork; a TcpTransport that kept the parent's socket
    and call id counter would have both processes read each other's replies)."""
    with tcp_service(TcpEcho) as svc, connect(TcpEcho, svc.tcp_address, timeout=1) as c:
        assert c.echo("warm") == "warm"

        def hammer(tag):
            bad = 0
            for i in range(200):
                try:
                    if c.echo([tag, i]) != [tag, i]:
                        bad += 1
                except Exception:
                    bad += 1
                if bad >= 3:
                    break
            return bad

        old = signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(Interrupted("stuck")))
        pid = os.fork()
        if pid == 0:
            bad = 99    # (stuck in recv_into: poll() said readable, then the parent took the bytes)
            try:
                signal.alarm(20)
                bad = hammer("child")
            finally:
                os._exit(min(bad, 99))
        try:
            signal.alarm(25)
            bad_parent = hammer("parent")
            _, status = os.waitpid(pid, 0)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        bad_child = os.waitstatus_to_exitcode(status)
        assert (bad_parent, bad_child) == (0, 0), \
            f"wrong answers or errors after fork: parent {bad_parent}, child {bad_child} (of 200 calls each)"


def test_async_tcp_client_works_in_a_second_event_loop():
    """An AsyncClient works under any loop, over TCP as over shm: it does not keep the connection
    (and the asyncio.Lock) of the first loop, which asyncio.run() closed, or the next call would
    never get its reply (CallTimeout here; a hang without a timeout)."""
    with tcp_service(TcpEcho) as svc:
        c = connect_async(TcpEcho, svc.tcp_address, timeout=3)

        async def main():
            return await c.echo("hi")

        assert asyncio.run(main()) == "hi"
        assert asyncio.run(main()) == "hi"


def test_default_port_is_the_class_port(serve):
    svc = serve(TcpOther, workers=1, tcp="127.0.0.1")
    assert svc.tcp_address == f"tcp://127.0.0.1:{TcpOther.port}"
    with connect(TcpOther, "tcp://127.0.0.1", timeout=10) as o:     # no port: the class's
        assert o.whoami() in svc.pids


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
def test_ipv6_loopback(serve):
    svc = serve(TcpOther, workers=1, tcp="[::1]:0")
    port = int(svc.tcp_address.rsplit(":", 1)[1])
    with connect(TcpOther, f"tcp://[::1]:{port}", timeout=10) as o:
        assert o.whoami() in svc.pids
    # the address LocalService reports is one connect() accepts
    assert svc.tcp_address == f"tcp://[::1]:{port}"
    with connect(TcpOther, svc.tcp_address, timeout=10) as o:
        assert o.whoami() in svc.pids


def test_tcp_methods_look_like_bound_methods_and_hand_odd_calls_on(client):
    """A TCP client's methods are made on first use and kept on the client; they carry the
    server method's name, docstring and signature, and whatever they do not encode
    themselves (keywords, a raw argument that is not bytes, an unencodable argument) gets
    the generic method's answer."""
    import inspect
    import weakref
    from speedysvc import EncodeError
    m = client.add
    assert client.add is m and "add" in vars(client)
    assert type(m) is core.TcpMethod   # the usual call in C
    assert (m.__name__, m.__qualname__, m.__doc__) == ("add", "add", "Add two numbers.")
    assert list(inspect.signature(m).parameters) == ["a", "b", "scale"]
    assert weakref.ref(m)() is m
    assert m(1) == 11 and m(1, b=2, scale=3) == 9
    assert client.echo_raw(b"bytes") == b"bytes"
    assert client.echo_raw(bytearray(b"a bytearray")) == b"a bytearray"   # the generic way
    with pytest.raises(EncodeError, match="raw method echo_raw"):
        client.echo_raw("text")
    with pytest.raises(EncodeError, match="echo_msgpack"):
        client.echo_msgpack(object())
    assert client.echo_msgpack([1, "ok"]) == [1, "ok"]


def test_a_tcp_method_kept_after_close_refuses(kitchen):
    c = connect(TcpKitchen, kitchen.tcp_address, timeout=10)
    m = c.echo_msgpack
    assert m("before") == "before"
    c.close()
    with pytest.raises(Exception, match="closed"):
        m("after")


def test_the_asyncio_client_returns_a_large_reply_without_copying_it():
    """On asyncio's own loop, whose selector holds its view of the read buffer while it hands
    the bytes on, the asyncio client still returns a large reply as the bytes it was received
    into: the memory the call takes in this process peaks at about the reply's size, not twice."""
    import tracemalloc
    size = 32 << 20
    with tcp_service(TcpKitchen, workers=1, max_payload=64 << 20) as svc:
        async def main():
            ac = connect_async(TcpKitchen, svc.tcp_address, timeout=30)
            try:
                assert await ac.zeros(b"1000") == bytes(1000)
                tracemalloc.start()
                try:
                    got = await ac.zeros(str(size).encode())
                    peak = tracemalloc.get_traced_memory()[1]
                finally:
                    tracemalloc.stop()
                assert got.__class__ is bytes and len(got) == size and got.count(0) == size
                assert peak < 1.5 * size, f"receiving {size} bytes took {peak} bytes at most"
            finally:
                await ac.aclose()
        loop = asyncio.new_event_loop()   # (asyncio's own loop, whatever the policy)
        try:
            loop.run_until_complete(main())
        finally:
            loop.close()


def test_tcp_methods_take_every_reply_a_server_may_send():
    """The C method takes a reply that is a success it decodes at once; every other reply goes
    the Python way: a success that does not decode (a clear DecodeError), an error (raised
    with its type), a reply in pieces, and one for another call first (not ours: skipped).
    The calls the C method sends and those Python sends share one sequence of ids."""
    import msgpack
    seen = []

    def replies(call_id, payload):
        seen.append(call_id)
        arg = msgpack.unpackb(payload)[0]
        if arg == "undecodable":
            return [fr.reply_header(call_id, 0, 2) + b"\xc1\xc1"]
        if arg == "error":
            body = encode_exception(ValueError("from the server"))
            return [fr.reply_header(call_id, core.STATUS_ERROR, len(body)) + body]
        body = msgpack.packb(arg)
        reply = fr.reply_header(call_id, 0, len(body)) + body
        if arg == "pieces":
            return [reply[:5], reply[5:]]
        if arg == "stray first":
            stray = msgpack.packb("stray")
            return [fr.reply_header((call_id + 1000) & 0xFFFFFFFF, 0, len(stray)) + stray + reply]
        return [reply]

    listener, th, address = fake_service(replies)
    try:
        with connect(TcpKitchen, address, timeout=5) as c:
            m = c.echo_msgpack
            assert type(m) is core.TcpMethod
            assert m("first") == "first"   # (connects through Python: no connection yet)
            assert m("usual") == "usual"
            with pytest.raises(DecodeError, match="echo_msgpack"):
                m("undecodable")
            with pytest.raises(ValueError, match="from the server"):
                m("error")
            assert m("pieces") == "pieces"
            assert m("stray first") == "stray first"
            assert c.send("echo_msgpack", ["through send"]) == "through send"   # Python's call
            assert m("after") == "after"
        assert len(set(seen)) == len(seen) and seen == sorted(seen)   # one sequence, no id twice
    finally:
        listener.close()
        th.join(5)


@pytest.mark.parametrize("args, error", [
    ((), TypeError),
    ((None, "not bytes", None, None, bytes, 0, None, 0, print, print), TypeError),
    ((None, b"m", None, None, bytes, -1, None, 0, print, print), OverflowError),
    ((None, b"m", None, None, bytes, 1 << 40, None, 0, print, print), OverflowError),
    ((None, b"m", None, None, bytes, 0, None, 1 << 40, print, print), OverflowError),
    ((None, b"m", None, None, bytes, 0, None, -1, print, print), OverflowError),
    ((None, b"m", None, "no", bytes, 0, None, 0, print, print), TypeError),
    ((None, b"m", None, None, bytes, 0, None, 0, print, "no"), TypeError),
    ((None, b"", None, None, bytes, 0, None, 0, print, print), ValueError),
    ((None, b"m" * 65, None, None, bytes, 0, None, 0, print, print), ValueError),
])
def test_tcp_method_checks_its_arguments(args, error):
    with pytest.raises(error):
        core.TcpMethod(*args)


@pytest.mark.parametrize("args, error", [
    ((), TypeError),
    ((None, "not bytes", 0, None, 0, b"x"), TypeError),
    ((None, b"m", 0, None, 0, bytearray(b"x")), TypeError),
    ((None, b"", 0, None, 0, b"x"), ValueError),
    ((None, b"m", 1 << 40, None, 0, b"x"), ValueError),
    ((None, b"m", 0, None, -1, b"x"), OverflowError),
    ((None, b"m", 0, None, 0, b"x"), AttributeError),   # (not a transport: it has no _conn)
])
def test_call_usual_checks_its_arguments(args, error):
    with pytest.raises(error):
        core.call_usual(*args)


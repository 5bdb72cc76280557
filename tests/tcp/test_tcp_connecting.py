"""Connecting and disconnecting: nobody listening, another service or something else on the
port, a peer that never answers, and a client closed while its calls are in flight: clear
errors, quickly, from the blocking client and the asyncio client."""
import asyncio
import socket
import threading
import time

import pytest

from speedysvc import (CallTimeout, ConnectionLost, LocalService, ProtocolError, ServiceUnavailable, connect,
                       connect_async)
from speedysvc.tcp import framing as fr
from speedysvc.tcp.protocol import DEFAULT_CONNECT_TIMEOUT
from conftest import free_port
import tcp_helpers
from tcp_helpers import fake_server, run
from tcp_services import TcpKitchen, TcpOther

serve, kitchen = tcp_helpers.serve, tcp_helpers.kitchen


def test_nobody_listening_is_service_unavailable_quickly():
    addr = f"tcp://127.0.0.1:{free_port()}"
    with connect(TcpKitchen, addr, wait=0) as c:   # (wait=0: no waiting for a listener, test_client_wait.py)
        t = time.monotonic()
        with pytest.raises(ServiceUnavailable, match="cannot connect") as info:
            c.echo_msgpack(1)
        assert time.monotonic() - t < 2
        assert addr in str(info.value)

    async def main():
        ac = connect_async(TcpKitchen, addr, wait=0)
        try:
            t = time.monotonic()
            with pytest.raises(ServiceUnavailable, match="cannot connect"):
                await ac.echo_msgpack(1)
            assert time.monotonic() - t < 2
        finally:
            await ac.aclose()
    run(main())


def test_port_serving_another_service_is_service_unavailable_naming_both():
    with LocalService(TcpOther, workers=1, tcp="127.0.0.1:0") as other:
        with connect(TcpKitchen, other.tcp_address, timeout=10) as c:
            with pytest.raises(ServiceUnavailable) as info:
                c.echo_msgpack(1)
            msg = str(info.value)
            assert "tcpt_other" in msg and "tcpt_kitchen" in msg

        async def main():
            ac = connect_async(TcpKitchen, other.tcp_address)
            try:
                with pytest.raises(ServiceUnavailable, match="tcpt_other") as info:
                    await ac.echo_msgpack(1)
                assert "tcpt_kitchen" in str(info.value)
            finally:
                await ac.aclose()
        run(main())
        with connect(TcpOther, other.tcp_address, timeout=10) as o:
            assert o.whoami() in other.pids


def test_a_listener_that_never_answers_is_service_unavailable_within_connect_timeout():
    listener = socket.create_server(("127.0.0.1", 0))     # accepts (backlog) but never speaks
    addr = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
    try:
        with connect(TcpKitchen, addr, connect_timeout=0.5) as c:
            t = time.monotonic()
            with pytest.raises(ServiceUnavailable, match="handshake"):
                c.echo_msgpack(1)
            assert time.monotonic() - t < 2

        async def main():
            ac = connect_async(TcpKitchen, addr, connect_timeout=0.5)
            try:
                t = time.monotonic()
                with pytest.raises(ServiceUnavailable, match="handshake"):
                    await ac.echo_msgpack(1)
                assert time.monotonic() - t < 2
            finally:
                await ac.aclose()
        run(main())
    finally:
        listener.close()


def dribbling_listener(stop: threading.Event):
    """A listener whose every connection gets a server hello one byte every 0.2 s (and none
    of them gets any further): its address."""
    listener = socket.create_server(("127.0.0.1", 0))
    hello = fr.pack_hello(fr.SERVER_HELLO, {"versions": [fr.VERSION], "service": TcpKitchen.name,
                                            "compression": [], "auth": False, "nonce": fr.new_nonce(),
                                            "max_payload": 1 << 20})

    def dribble(conn):
        with conn:
            for i in range(len(hello)):
                if stop.wait(0.2):
                    return
                try:
                    conn.sendall(hello[i:i + 1])
                except OSError:
                    return
            stop.wait()

    def accept():
        with listener:
            listener.settimeout(0.1)
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except socket.timeout:
                    continue
                threading.Thread(target=dribble, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return f"tcp://127.0.0.1:{listener.getsockname()[1]}"


@pytest.mark.parametrize("peer", ["silent", "dribbling"])
def test_a_calls_timeout_bounds_connecting_and_the_handshake(peer):
    """``connect(..., timeout=0.5)``: a call raises CallTimeout after about 0.5 s against a peer
    that never completes the handshake, not after the connect timeout (10 s by default); the
    calls of other threads waiting for that connection too; and the connect timeout bounds
    the whole handshake, not each read of it."""
    assert DEFAULT_CONNECT_TIMEOUT >= 5
    stop = threading.Event()
    if peer == "silent":
        listener = socket.create_server(("127.0.0.1", 0))     # accepts (backlog) but never speaks
        addr = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
    else:
        listener, addr = None, dribbling_listener(stop)
    try:
        with connect(TcpKitchen, addr, timeout=0.5) as c:
            t = time.monotonic()
            threads = [tcp_helpers.call_in_thread(c.echo_msgpack, i) for i in range(3)]
            for th, _ in threads:
                th.join(DEFAULT_CONNECT_TIMEOUT + 5)
            elapsed = time.monotonic() - t
            for _, outcome in threads:
                assert isinstance(outcome.get("error"), CallTimeout), outcome
                assert "connecting" in str(outcome["error"])
            assert elapsed < 3, f"calls with a 0.5 s timeout took {elapsed:.1f} s to fail"

        with connect(TcpKitchen, addr, connect_timeout=1) as c:   # no call timeout: the connect timeout's
            t = time.monotonic()
            with pytest.raises(ServiceUnavailable, match="handshake"):
                c.echo_msgpack(1)
            assert time.monotonic() - t < 4

        async def main():
            ac = connect_async(TcpKitchen, addr, timeout=0.5)
            try:
                t = time.monotonic()
                outcomes = await asyncio.gather(*(ac.echo_msgpack(i) for i in range(3)), return_exceptions=True)
                elapsed = time.monotonic() - t
                assert all(isinstance(o, CallTimeout) and "connecting" in str(o) for o in outcomes), outcomes
                assert elapsed < 3, f"calls with a 0.5 s timeout took {elapsed:.1f} s to fail"
            finally:
                await ac.aclose()
        run(main())
    finally:
        stop.set()
        if listener is not None:
            listener.close()


def test_async_handshake_timeout_leaves_no_unretrieved_exception(caplog):
    """A handshake that times out is reported once, as ServiceUnavailable, and not
    again later by asyncio as 'Future exception was never retrieved'."""
    import gc
    listener = socket.create_server(("127.0.0.1", 0))
    addr = f"tcp://127.0.0.1:{listener.getsockname()[1]}"

    async def main():
        ac = connect_async(TcpKitchen, addr, connect_timeout=0.3)
        try:
            with pytest.raises(ServiceUnavailable, match="handshake"):
                await ac.echo_msgpack(1)
        finally:
            await ac.aclose()
        await asyncio.sleep(0.05)

    try:
        with caplog.at_level("ERROR", logger="asyncio"):
            run(main())
            gc.collect()
    finally:
        listener.close()
    unretrieved = [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()]
    assert not unretrieved, unretrieved


def test_a_peer_that_is_not_speedysvc_is_a_protocol_error():
    def script(conn):
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        conn.recv(4096)

    listener, th, address = fake_server(script)
    try:
        with connect(TcpKitchen, address, timeout=5) as c:
            t = time.monotonic()
            with pytest.raises(ProtocolError, match="speedysvc protocol"):
                c.echo_msgpack(1)
            assert time.monotonic() - t < 3
    finally:
        th.join(5)
        listener.close()


def test_closing_a_client_fails_its_calls_in_flight_at_once(kitchen):
    c = connect(TcpKitchen, kitchen.tcp_address)
    assert c.echo_msgpack(1) == 1
    result = {}

    def slow_call():
        t = time.monotonic()
        try:
            result["value"] = c.sleep(2.5, "finished")
        except BaseException as e:
            result["value"] = e
        result["elapsed"] = time.monotonic() - t

    th = threading.Thread(target=slow_call)
    th.start()
    time.sleep(0.3)
    c.close()
    th.join(10)

    async def main():
        ac = connect_async(TcpKitchen, kitchen.tcp_address)
        assert await ac.echo_msgpack(1) == 1
        t = time.monotonic()
        task = asyncio.ensure_future(ac.sleep(2.5, "finished"))
        await asyncio.sleep(0.3)
        await ac.aclose()
        with pytest.raises(ConnectionLost):
            await task
        return time.monotonic() - t
    async_elapsed = run(main())
    assert async_elapsed < 1.3

    assert isinstance(result["value"], ConnectionLost), result
    assert result["elapsed"] < 1.3, f"close() ended the call in flight only after {result['elapsed']:.1f} s"

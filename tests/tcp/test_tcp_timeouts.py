"""Timeouts of calls over TCP, blocking and asyncio: neither much later nor earlier than asked,
and a late reply costs neither the connection nor the next call's answer."""
import asyncio
import time

import pytest

from speedysvc import CallTimeout, connect, connect_async
import tcp_helpers
from tcp_helpers import CountingProxy, run
from tcp_services import TcpKitchen

serve, kitchen, proxy = tcp_helpers.serve, tcp_helpers.kitchen, tcp_helpers.proxy


def test_per_call_timeout_over_tcp_and_the_connection_stays_usable(proxy):
    with connect(TcpKitchen, proxy.address, timeout=20) as c:
        assert c.echo_msgpack(0) == 0
        conn = c._transport._conn
        t = time.monotonic()
        with pytest.raises(CallTimeout):
            c.send("sleep", [1.5, "late"], timeout=0.3)
        elapsed = time.monotonic() - t
        assert c.echo_msgpack("right after") == "right after"

        quick = c.with_timeout(0.3)
        t = time.monotonic()
        with pytest.raises(CallTimeout):
            quick.sleep(1.5, "late")
        elapsed2 = time.monotonic() - t
        time.sleep(1.5)                                  # the late replies have come and gone
        for i in range(20):
            assert c.echo_msgpack(i) == i
        assert quick.echo_msgpack("quick") == "quick"
        assert c._transport._conn is conn
    assert proxy.connections == 1
    # neither much later nor earlier than asked
    assert 0.29 <= elapsed < 1.2, f"a call with a 0.3 s timeout raised CallTimeout after {elapsed:.3f} s"
    assert 0.29 <= elapsed2 < 1.2, f"a call with a 0.3 s timeout raised CallTimeout after {elapsed2:.3f} s"


def test_async_per_call_timeout_over_tcp(proxy):
    async def main():
        ac = connect_async(TcpKitchen, proxy.address, timeout=20)
        try:
            assert await ac.echo_msgpack(0) == 0
            t = time.monotonic()
            with pytest.raises(CallTimeout):
                await ac.send("sleep", [1.5, "late"], timeout=0.3)
            elapsed = time.monotonic() - t
            assert await ac.echo_msgpack("right after") == "right after"
            await asyncio.sleep(1.5)
            assert await asyncio.gather(*(ac.echo_msgpack(i) for i in range(20))) == list(range(20))
            return elapsed
        finally:
            await ac.aclose()
    elapsed = run(main())
    assert proxy.connections == 1
    assert 0.29 <= elapsed < 1.2, f"a call with a 0.3 s timeout raised CallTimeout after {elapsed:.3f} s"


def test_a_reply_arriving_after_the_client_gave_up_does_not_cost_the_connection(kitchen):
    """On a slow link the client's deadline passes before the reply arrives: the late
    reply is dropped and the connection goes on (no reconnect)."""
    with CountingProxy(kitchen.tcp_address, reply_delay=0.3) as proxy:
        with connect(TcpKitchen, proxy.address, timeout=20) as c:
            assert c.echo_msgpack(0) == 0
            conn = c._transport._conn
            with pytest.raises(CallTimeout):
                c.send("echo_msgpack", ["late"], timeout=0.1)
            time.sleep(0.4)                              # the late reply is now waiting in the socket
            assert c.echo_msgpack("next") == "next"
            assert c._transport._conn is conn, "the client reconnected after a late reply"
        assert proxy.connections == 1


def test_async_a_reply_arriving_after_the_client_gave_up_does_not_cost_the_connection(kitchen):
    with CountingProxy(kitchen.tcp_address, reply_delay=0.3) as proxy:
        async def main():
            ac = connect_async(TcpKitchen, proxy.address, timeout=20)
            try:
                assert await ac.echo_msgpack(0) == 0
                conn = ac._transport._conn
                with pytest.raises(CallTimeout):
                    await ac.send("echo_msgpack", ["late"], timeout=0.1)
                await asyncio.sleep(0.4)
                assert await ac.echo_msgpack("next") == "next"
                assert ac._transport._conn is conn
            finally:
                await ac.aclose()
        run(main())
        assert proxy.connections == 1


def test_with_timeout_applies_to_methods_already_used(kitchen):
    """A client's methods are made on first use and carry its timeout: a copy made by
    with_timeout() must make its own, over TCP as over shared memory."""
    for address in (kitchen.tcp_address, "shm://"):
        with connect(TcpKitchen, address) as c:
            assert c.echo_msgpack(1) == 1 and c.sleep(0.01, "ok") == "ok"   # both methods made
            quick = c.with_timeout(0.2)
            t = time.monotonic()
            with pytest.raises(CallTimeout):
                quick.sleep(1.5, "late")
            assert time.monotonic() - t < 1.0, address
            assert quick.timeout == 0.2 and c.timeout is None
            assert c.echo_msgpack(2) == 2   # (no timeout: the workers may still be sleeping)

"""The not-run flag (docs/tcp-protocol.md, "Calls that never ran"): a gateway tells a client
that asked in its hello which calls it never started, so that a client over several
endpoints may send them elsewhere; a client that did not ask is sent no flag it would not know."""
import asyncio

import pytest

from speedysvc import ConnectionLost, LocalService, ServiceUnavailable, connect, connect_async
from speedysvc.tcp import framing as fr
from speedysvc.tcp.protocol import ClientOptions
import tcp_helpers
from tcp_helpers import InProcessGateway, RawClient, msgpack_args
from tcp_services import TcpEcho

server_logs_clean = tcp_helpers.server_logs_clean


def closing(gw):
    """Make the gateway refuse new calls as it does while it stops (``TcpServer.close``)."""
    gw.read(lambda s: setattr(s.admission, "closing", True))


def test_the_flag_is_negotiated_in_the_handshake():
    with LocalService(TcpEcho, workers=1), InProcessGateway(TcpEcho.name) as gw:
        with RawClient(gw) as asks, RawClient(gw) as old:
            msg_type, body = asks.handshake(not_run=True)
            assert msg_type == fr.WELCOME and body.get("not_run") is True
            msg_type, body = old.handshake()
            assert msg_type == fr.WELCOME and "not_run" not in body
            closing(gw)
            for raw in (asks, old):
                raw.call(7, "echo", msgpack_args("x"))
            status, payload, frame = asks.reply()
            assert status == 1 and frame.flags == fr.F_NOT_RUN and frame.call_id == 7
            status, payload, frame = old.reply()
            assert status == 1 and frame.flags == 0   # an older client is sent what it knows


def test_a_call_a_stopping_gateway_never_started_says_so():
    """The blocking and the asyncio client send such a call again on new connections within its
    timeout (here the gateway goes on accepting them and answering so), then raise the gateway's
    error marked ``not_run``; an error the method itself raises is not marked."""
    with LocalService(TcpEcho, workers=1), InProcessGateway(TcpEcho.name) as gw:
        with connect(TcpEcho, gw.tcp_address, timeout=5, wait=0) as c:
            assert c.echo("up") == "up"
            with pytest.raises(TypeError) as raised:
                c.echo()   # the method's own error: it ran
            assert not getattr(raised.value, "not_run", False)
            closing(gw)
            with pytest.raises(ServiceUnavailable, match="stopping") as raised:
                c.with_timeout(1).echo("late")
            assert raised.value.not_run is True
            assert gw.read(lambda s: s.counters["unavailable"]) > 1   # sent again

        async def main():
            ac = connect_async(TcpEcho, gw.tcp_address, timeout=1, wait=0)
            try:
                before = gw.read(lambda s: s.counters["unavailable"])
                with pytest.raises(ServiceUnavailable, match="stopping") as raised:
                    await ac.echo("late")
                assert raised.value.not_run is True
                assert gw.read(lambda s: s.counters["unavailable"]) > before + 1   # sent again
            finally:
                await ac.aclose()
        asyncio.run(main())


def test_an_idle_connection_s_go_away_says_its_unanswered_calls_never_ran():
    """A gateway that stops sends each client a go-away; one with no call under way on its
    connection flags it, so that a call sent meanwhile is known not to have run."""
    with LocalService(TcpEcho, workers=1):
        gw = InProcessGateway(TcpEcho.name)
        try:
            asks, old = RawClient(gw).welcome(not_run=True), RawClient(gw).welcome()
            asks.call(1, "echo", msgpack_args("a"))
            assert asks.reply()[0] == 0
        finally:
            gw.close()
        (frame,) = asks.read_frames(1)
        assert frame.kind == fr.GOAWAY and frame.flags == fr.F_NOT_RUN
        (frame,) = old.read_frames(1)
        assert frame.kind == fr.GOAWAY and frame.flags == 0
        asks.close()
        old.close()
        opts = ClientOptions(TcpEcho.name, "127.0.0.1", 1)
        lost = opts.goaway_error(fr.Frame(fr.GOAWAY, fr.F_NOT_RUN, 0, 0, 0, b"", b""))
        assert isinstance(lost, ConnectionLost) and lost.not_run is True
        assert not getattr(opts.goaway_error(fr.Frame(fr.GOAWAY, 0, 0, 0, 0, b"", b"")), "not_run", False)


def test_a_call_frame_may_not_carry_the_flag():
    with LocalService(TcpEcho, workers=1), InProcessGateway(TcpEcho.name) as gw, RawClient(gw) as raw:
        raw.welcome(not_run=True)
        raw.call(1, "echo", msgpack_args("x"), flags=fr.F_NOT_RUN)
        assert "unknown frame flags" in str(raw.expect_goaway())


class _Transport:
    """Stands for the socket's transport: records writes; closing it loses the connection."""

    def __init__(self, conn):
        self.conn, self.closing, self.written = conn, False, []

    def is_closing(self):
        return self.closing

    def write(self, data):
        self.written.append(bytes(data))

    def close(self):
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_soon(self.conn.connection_lost, None)


def _connection():
    from types import SimpleNamespace
    from speedysvc.tcp.aio import AsyncConnection
    opts = SimpleNamespace(address="tcp://x:1", encode_call=lambda call_id, name, payload, flags, timeout: [name])
    conn = AsyncConnection(opts)
    conn.transport = _Transport(conn)
    conn.ready.set_result(True)
    return conn


def test_an_asyncio_call_that_never_left_a_retired_connection_is_marked_not_run():
    """A call waiting for a backlogged connection to drain when that connection is retired (its
    server said it is stopping) was never written: it fails marked ``not_run``, which the
    client sends again, not as a call that may have run.  A retired connection closes once its
    last call is over, answered or not (here: timed out)."""
    async def main():
        conn = _connection()
        conn.pause_writing()
        waiting = asyncio.ensure_future(conn.call(b"m", b"", 0, 5))
        await asyncio.sleep(0)
        conn.retire()
        conn.resume_writing()
        with pytest.raises(ConnectionLost, match="not sent") as raised:
            await waiting
        assert raised.value.not_run is True and conn.transport.written == []

        conn = _connection()
        in_flight = asyncio.ensure_future(conn.call(b"m", b"", 0, 0.05))
        await asyncio.sleep(0)
        conn.retire()
        assert not conn.transport.closing   # a call is in flight on it
        with pytest.raises(Exception):
            await in_flight                 # (nobody answers: it times out)
        assert conn.transport.closing
        with pytest.raises(ConnectionLost, match="not sent"):
            await conn.call(b"m", b"", 0, 5)   # no new call goes on it
    asyncio.run(main())

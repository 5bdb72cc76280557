"""Connections that never complete the handshake (or never authenticate) do not crowd out
clients that do: they do not count as clients, they have a small limit of their own beyond
which each new one closes the oldest, and a deadline of a few seconds."""
import socket
import time

import pytest

from speedysvc import ServiceUnavailable
from speedysvc.tcp import framing as fr
from speedysvc.tcp.options import ServeOptions
from conftest import wait_until
import tcp_helpers
from tcp_helpers import SECRET, InProcessGateway, RawClient, connect_to, guarded, logs_clean, read_hello
from tcp_services import TcpEcho

server_logs_clean = tcp_helpers.server_logs_clean


def idle_connections(gw, n):
    """``n`` connections to ``gw`` that read the server's hello and answer nothing."""
    host, port = gw.tcp_address.removeprefix("tcp://").rsplit(":", 1)
    socks = []
    for _ in range(n):
        s = socket.create_connection((host, int(port)), timeout=10)
        read_hello(s)
        socks.append(s)
    return socks


def test_the_handshake_deadline_is_a_few_seconds():
    assert ServeOptions().handshake_timeout <= 5


@logs_clean
def test_connections_that_never_authenticate_do_not_keep_clients_out():
    """With room for 50 clients, a peer without the secret holding 60 connections in their
    handshake kept 72 of 75 clients with it out: they count against ``max_connections`` no
    more, and every client with the secret gets in."""
    with guarded(tcp=None, workers=1), \
            InProcessGateway(TcpEcho.name, secret=SECRET, max_connections=50) as gw:
        idle = idle_connections(gw, 60)
        try:
            for i in range(75):
                with connect_to(gw, secret=SECRET) as c:
                    assert c.echo(i) == i
            # clients count against max_connections: 50 at once, not the 51st
            clients = [connect_to(gw, secret=SECRET) for _ in range(50)]
            try:
                assert [c.echo(i) for i, c in enumerate(clients)] == list(range(50))
                with connect_to(gw, secret=SECRET) as extra:
                    with pytest.raises(ServiceUnavailable, match="too many TCP clients"):
                        extra.echo("one too many")
                assert gw.read(lambda s: len(s.handshaking)) == 60
            finally:
                for c in clients:
                    c.close()
        finally:
            for s in idle:
                s.close()


@logs_clean
def test_beyond_the_handshake_limit_a_new_connection_closes_the_oldest_in_its_handshake():
    with guarded(tcp=None, workers=1), \
            InProcessGateway(TcpEcho.name, secret=SECRET, max_connections=50, max_handshakes=20,
                             handshake_timeout=30) as gw:
        idle = idle_connections(gw, 60)
        try:
            assert wait_until(lambda: gw.read(lambda s: len(s.handshaking)) == 20)
            # the 40 oldest were refused, each told why; the 20 newest wait still
            for s in idle[:40]:
                raw = RawClient.__new__(RawClient)
                raw.sock = s
                exc = raw.expect_refused(timeout=5)
                assert isinstance(exc, ServiceUnavailable) and "handshake" in str(exc), exc
            assert gw.read(lambda s: s.counters["handshakes_evicted"]) == 40
            for i in range(30):   # a client that completes its handshake gets in, each time
                with connect_to(gw, secret=SECRET) as c:
                    assert c.echo(i) == i
            # (the first of them found 20 in the handshake, and closed the oldest)
            assert gw.read(lambda s: (len(s.handshaking), s.counters["handshakes_evicted"])) == (19, 41)
            for s in idle[41:]:   # still waiting for their handshake's deadline
                s.settimeout(0)
                with pytest.raises(BlockingIOError):
                    s.recv(1)
        finally:
            for s in idle:
                s.close()


@logs_clean
def test_a_wrong_secret_is_refused_at_once_and_takes_no_room():
    with guarded(tcp=None, workers=1), \
            InProcessGateway(TcpEcho.name, secret=SECRET, max_connections=2, max_handshakes=2) as gw:
        for _ in range(10):
            raw = RawClient(gw.tcp_address)
            msg_type, body = raw.handshake(proof=b"x" * 32)
            assert msg_type == fr.REFUSED
            raw.close()
        with connect_to(gw, secret=SECRET) as a, connect_to(gw, secret=SECRET) as b:
            assert (a.echo(1), b.echo(2)) == (1, 2)
        t = time.monotonic()
        assert wait_until(lambda: gw.read(lambda s: len(s.connections)) == 0, timeout=10)
        assert time.monotonic() - t < 9

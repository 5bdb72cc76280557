"""Who may call over TCP: the shared secret (proved both ways, never replayed, never skipped by a
fake server), pickle only for authenticated clients of a service that allows it, no
non-loopback address without a secret, and TLS."""
import asyncio
import os
import pickle
import random
import socket
import ssl
import threading
import time

import pytest

from speedysvc import (AuthenticationFailed, LocalService, NotAllowed, ProtocolError, ServiceUnavailable, connect,
                       connect_async)
from speedysvc.tcp import framing as fr
import tcp_helpers
from tcp_helpers import (MSGPACK, SECRET, RawClient, check, connect_to, fake_handshake, fake_server, guarded,
                         logs_clean, make_self_signed_cert, msgpack_args, run, tcp_service)
from tcp_services import TcpEcho, TcpKitchen, TcpOther, TcpSecretEcho, TcpSecure

serve, kitchen, client, tls_files = tcp_helpers.serve, tcp_helpers.kitchen, tcp_helpers.client, tcp_helpers.tls_files
server_logs_clean = tcp_helpers.server_logs_clean


def test_pickle_is_refused_over_tcp_without_a_secret(client):
    with pytest.raises(NotAllowed, match="pickle") as info:
        client.echo_pickle({1, 2})
    assert "echo_pickle" in str(info.value)
    assert client.echo_msgpack("still usable") == "still usable"

    async def main():
        ac = connect_async(TcpKitchen, client._transport.opts.address)
        try:
            with pytest.raises(NotAllowed, match="pickle"):
                await ac.echo_pickle((1, 2))
            assert await ac.echo_json("ok") == "ok"
        finally:
            await ac.aclose()
    run(main())


def test_authentication(monkeypatch):
    monkeypatch.delenv("SPEEDYSVC_SECRET", raising=False)
    with LocalService(TcpSecure, workers=1, tcp="127.0.0.1:0", tcp_secret=SECRET) as svc:
        addr = svc.tcp_address
        with connect(TcpSecure, addr, secret=SECRET, timeout=10) as c:
            assert c.echo("in") == "in"
            # a secret but no tcp_allow_pickle: pickle still refused
            with pytest.raises(NotAllowed, match="pickle"):
                c.echo_pickle({1})
        with connect(TcpSecure, addr, secret=SECRET.encode(), timeout=10) as c:
            assert c.echo("bytes secret") == "bytes secret"

        with connect(TcpSecure, addr, secret="wrong", timeout=10) as c:
            t = time.monotonic()
            with pytest.raises(AuthenticationFailed, match="wrong"):
                c.echo("x")
            assert time.monotonic() - t < 3

        with connect(TcpSecure, addr, timeout=10) as c:
            with pytest.raises(AuthenticationFailed, match="secret") as info:
                c.echo("x")
            msg = str(info.value)
            assert addr in msg and "SPEEDYSVC_SECRET" in msg and "secret=" in msg

        monkeypatch.setenv("SPEEDYSVC_SECRET", SECRET)
        with connect(TcpSecure, addr, timeout=10) as c:
            assert c.echo("from env") == "from env"
        monkeypatch.delenv("SPEEDYSVC_SECRET")

        async def main():
            for secret, expected in ((SECRET, None), ("wrong", AuthenticationFailed), (None, AuthenticationFailed)):
                ac = connect_async(TcpSecure, addr, secret=secret)
                try:
                    if expected is None:
                        assert await ac.echo(1) == 1
                    else:
                        with pytest.raises(expected):
                            await ac.echo(1)
                finally:
                    await ac.aclose()
        run(main())

        # the service went on serving the right clients
        with connect(TcpSecure, addr, secret=SECRET, timeout=10) as c:
            assert c.echo("end") == "end"


def test_authentication_off_accepts_clients_without_secret_and_a_client_with_one_refuses_it(kitchen):
    with connect(TcpKitchen, kitchen.tcp_address, timeout=10) as c:
        assert c.echo_msgpack(1) == 1
    # a server that does not ask for the secret cannot prove it is the service
    with connect(TcpKitchen, kitchen.tcp_address, secret="anything", timeout=10) as c:
        with pytest.raises(AuthenticationFailed, match="does not ask for the shared secret"):
            c.echo_msgpack(2)


def test_pickle_allowed_with_secret_and_allow_pickle():
    with LocalService(TcpSecure, workers=1, tcp="127.0.0.1:0", tcp_secret=SECRET, tcp_allow_pickle=True) as svc:
        with connect(TcpSecure, svc.tcp_address, secret=SECRET, timeout=10) as c:
            for value in [{1, 2}, (1, (2, 3)), complex(1, 2), frozenset({"a"}), b"x" * 100_000]:
                assert c.echo_pickle(value) == value

        async def main():
            ac = connect_async(TcpSecure, svc.tcp_address, secret=SECRET)
            try:
                assert await ac.echo_pickle({3, 4}) == {3, 4}
            finally:
                await ac.aclose()
        run(main())


def test_client_refuses_a_server_that_cannot_prove_the_secret():
    """A fake server asks for authentication, then answers with a bogus proof."""
    def script(conn):
        if fake_handshake(conn, TcpSecure.name, auth=True, proof=b"\0" * 32):
            conn.recv(4096)

    listener, th, address = fake_server(script)
    try:
        with connect(TcpSecure, address, secret=SECRET, timeout=5) as c:
            with pytest.raises(AuthenticationFailed, match="prove"):
                c.echo(1)
    finally:
        th.join(5)
        listener.close()


def test_client_with_a_secret_refuses_a_server_that_does_not_authenticate():
    """docs/tcp-protocol.md: "the client checks the server's proof too, so a server that does not
    know the secret cannot impersonate the service".  A fake server that simply says ``auth: false``
    is refused, and its (pickle) reply is never unpickled by the client."""
    marker = f"/tmp/speedysvc-test-pwned-{os.getpid()}"

    class Evil:
        def __reduce__(self):
            return (open, (marker, "w"))

    def script(conn):
        if not fake_handshake(conn, TcpEcho.name, auth=False, proof=None):
            return
        parser = fr.FrameParser(1 << 20, frozenset((fr.CALL,)))
        frames = []
        while not frames:
            data = conn.recv(65536)
            if not data:
                raise EOFError("the client closed the connection")
            frames = parser.feed(data)
        body = pickle.dumps(Evil())
        conn.sendall(fr.reply_header(frames[0].call_id, 0, len(body)) + body)
        conn.recv(1)

    listener, th, address = fake_server(script)
    try:
        with connect(TcpEcho, address, secret=SECRET, timeout=5) as c:
            try:
                with pytest.raises(AuthenticationFailed):
                    c.echo_pickle("anything")
            finally:
                pwned = os.path.exists(marker)
                if pwned:
                    os.unlink(marker)
        assert not pwned, "an unauthenticated server made the client run open() through pickle"
    finally:
        listener.close()
        th.join(5)


@logs_clean
def test_wrong_or_missing_secret_is_refused_and_nothing_is_served(tmp_path, monkeypatch):
    monkeypatch.delenv("SPEEDYSVC_SECRET", raising=False)
    mark = tmp_path / "served"
    with guarded(TcpSecretEcho, tcp_secret="right") as svc:
        good = connect_to(svc, TcpSecretEcho, secret="right")
        assert good.echo("in") == "in"
        with pytest.raises(AuthenticationFailed):
            with connect_to(svc, TcpSecretEcho, secret="wrong") as bad:
                bad.echo(1)
        with pytest.raises(AuthenticationFailed, match="secret"):
            with connect_to(svc, TcpSecretEcho) as bad:
                bad.echo(1)

        payload = msgpack_args(str(mark))
        call = fr.call_header(1, b"mark", MSGPACK.flags, 0, len(payload)) + payload

        def refused(proof, service=TcpSecretEcho.name, extra=call):
            with RawClient(svc, service=service) as raw:
                raw.read_server_hello()
                raw.send(raw.client_hello(proof=proof) + extra)   # a call pipelined behind the hello
                return raw.expect_refused(timeout=3)

        assert isinstance(refused(os.urandom(32)), AuthenticationFailed)
        assert isinstance(refused(None), AuthenticationFailed)
        assert isinstance(refused(b""), AuthenticationFailed)
        assert isinstance(refused("not bytes"), AuthenticationFailed)
        assert isinstance(refused(os.urandom(1000)), AuthenticationFailed)
        # a proof made with the right secret for another connection (a replay) is refused
        with RawClient(svc, service=TcpSecretEcho.name) as first:
            server_nonce = first.read_server_hello()["nonce"]
            client_nonce = fr.new_nonce()
            proof = fr.client_proof(b"right", server_nonce, client_nonce, TcpSecretEcho.name)
            recorded = first.client_hello(nonce=client_nonce, proof=proof)
            first.send(recorded)
            msg_type, _, body, _ = first._read_message()
            assert msg_type == fr.WELCOME
            assert body["proof"] == fr.server_proof(b"right", server_nonce, client_nonce, TcpSecretEcho.name)
        with RawClient(svc, service=TcpSecretEcho.name) as replay:
            replay.read_server_hello()
            replay.send(recorded + call)
            assert isinstance(replay.expect_refused(timeout=3), AuthenticationFailed)
        # frames with no handshake at all
        with RawClient(svc) as raw:
            raw.send(call * 3)
            assert isinstance(raw.expect_refused(timeout=3), ProtocolError)
        # a connection that never authenticates is not served either, and is dropped in time
        with RawClient(svc) as raw:
            raw.read_server_hello()
            assert isinstance(raw.expect_refused(timeout=4), ProtocolError)

        assert good.echo("still in") == "still in"
        with connect_to(svc, TcpSecretEcho, secret="right") as again:
            assert again.echo("new") == "new"
            assert again.mark(str(tmp_path / "legit")) is True
        good.close()
    assert (tmp_path / "legit").exists()
    assert not mark.exists(), "a call from an unauthenticated client was served"


@logs_clean
def test_frames_without_a_handshake_are_never_served(tmp_path):
    mark = tmp_path / "served"
    payload = msgpack_args(str(mark))
    call = fr.call_header(1, b"mark", MSGPACK.flags, 0, len(payload)) + payload
    with guarded() as svc, connect_to(svc) as before:
        with RawClient(svc) as raw:              # straight away, without reading the server's hello
            raw.send(call)
            assert isinstance(raw.expect_refused(timeout=3), ProtocolError)
        with RawClient(svc) as raw:              # after reading it
            raw.read_server_hello()
            raw.send(call * 5)
            assert isinstance(raw.expect_refused(timeout=3), ProtocolError)
        with RawClient(svc) as raw:              # behind a hello of the wrong type
            raw.read_server_hello()
            raw.send(fr.pack_hello(fr.WELCOME, {"proof": None}) + call)
            assert isinstance(raw.expect_refused(timeout=3), ProtocolError)
        with RawClient(svc) as raw:              # behind a hello for another service
            raw.read_server_hello()
            raw.send(raw.client_hello(service=TcpSecretEcho.name) + call)
            assert isinstance(raw.expect_refused(timeout=3), ServiceUnavailable)
        check(before)
        assert before.mark(str(tmp_path / "legit")) is True
    assert not mark.exists(), "a call sent without a handshake was served"


def test_non_loopback_bind_without_secret_is_refused_at_start():
    with pytest.raises(RuntimeError, match="TCP server") as refused:
        LocalService(TcpOther, workers=1, tcp="0.0.0.0:0").start()
    assert "secret" in str(refused.value) and "0.0.0.0" in str(refused.value)


def test_tls_with_a_self_signed_certificate(tls_files):
    certfile, keyfile = tls_files
    with LocalService(TcpSecure, workers=2, tcp="127.0.0.1:0", tcp_tls=(certfile, keyfile)) as svc:
        addr = svc.tcp_address
        with connect(TcpSecure, addr, tls=certfile, timeout=10) as c:
            assert c.echo("over tls") == "over tls"
            data = random.Random(2).randbytes(3 << 20)
            assert c.echo_raw(data) == data
            assert isinstance(c._transport._conn.sock, ssl.SSLSocket)
        ctx = ssl.create_default_context(cafile=certfile)
        with connect(TcpSecure, addr, tls=ctx, timeout=10) as c:
            assert c.echo("ctx") == "ctx"

        # the system's CAs do not trust a self-signed certificate
        with connect(TcpSecure, addr, tls=True, timeout=10) as c:
            t = time.monotonic()
            with pytest.raises(ServiceUnavailable, match="(?i)certificate verify failed") as info:
                c.echo(1)
            assert addr in str(info.value) and "TLS" in str(info.value)
            assert time.monotonic() - t < 3

        # a plain client of a TLS service fails (not hangs) with a clear error
        with connect(TcpSecure, addr, timeout=10, connect_timeout=1) as c:
            t = time.monotonic()
            with pytest.raises(ServiceUnavailable):
                c.echo(1)
            assert time.monotonic() - t < 4

        async def main():
            ac = connect_async(TcpSecure, addr, tls=certfile)
            try:
                assert await asyncio.gather(*(ac.echo(i) for i in range(50))) == list(range(50))
            finally:
                await ac.aclose()
            ac = connect_async(TcpSecure, addr, tls=True)
            try:
                with pytest.raises(ServiceUnavailable, match="(?i)certificate verify failed"):
                    await ac.echo(1)
            finally:
                await ac.aclose()
        run(main())


def test_tls_client_of_a_plain_service_fails_clearly(kitchen, tls_files):
    with connect(TcpKitchen, kitchen.tcp_address, tls=tls_files[0], timeout=10, connect_timeout=2) as c:
        t = time.monotonic()
        with pytest.raises(ServiceUnavailable, match="TLS"):
            c.echo_msgpack(1)
        assert time.monotonic() - t < 4


def test_tls_one_client_shared_by_threads(tls_files):
    """Threads share one TLS connection: one sends while another reads."""
    certfile, keyfile = tls_files
    errors = []
    with LocalService(TcpSecure, workers=2, tcp="127.0.0.1:0", tcp_tls=(certfile, keyfile)) as svc, \
            connect(TcpSecure, svc.tcp_address, tls=certfile, timeout=30) as c:
        assert c.echo(0) == 0
        conn = c._transport._conn

        def worker(t):
            try:
                rnd = random.Random(t)
                for i in range(30):
                    data = rnd.randbytes(rnd.choice([100, 20_000, 200_000]))
                    assert c.echo_raw(data) == data
                    assert c.echo([t, i]) == [t, i]
            except BaseException as e:
                errors.append((t, repr(e)))

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(16)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert not any(th.is_alive() for th in threads), "a thread hung"
        assert not errors, errors[:5]
        assert c._transport._conn is conn


def test_tls_connections_that_never_handshake_are_dropped_in_time(tmp_path):
    certfile, keyfile = make_self_signed_cert(tmp_path)
    with tcp_service(TcpEcho, tcp_tls=(certfile, keyfile), tcp_handshake_timeout=1.0) as svc:
        host, port = svc.tcp_address.removeprefix("tcp://").rsplit(":", 1)
        socks = [socket.create_connection((host, int(port))) for _ in range(5)]
        try:
            time.sleep(4)
            still_open = 0
            for s in socks:
                s.settimeout(0.2)
                try:
                    if s.recv(1) != b"":
                        still_open += 1
                except socket.timeout:
                    still_open += 1
                except OSError:
                    pass
            assert still_open == 0, (f"{still_open} silent connections still open 4 s after a 1 s "
                                     f"handshake timeout (asyncio's ssl_handshake_timeout is 60 s)")
        finally:
            for s in socks:
                s.close()

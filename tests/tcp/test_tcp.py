"""Calls over TCP between real processes and real sockets: codecs, errors, compression,
large payloads, many calls on one connection, many connections, authentication,
TLS, restarts under a connected client, timeouts and clear connection errors."""
import asyncio
import datetime
import ipaddress
import os
import random
import socket
import ssl
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from speedysvc import (AuthenticationFailed, BadArguments, CallTimeout, ConnectionLost, LocalService, NotAllowed,
                       PayloadTooLarge, ProtocolError, ServiceUnavailable, connect, connect_async)
from speedysvc.tcp import compression
from speedysvc.tcp import framing as fr
from speedysvc.errors import decode_exception
from tcp_services import TcpError, TcpKitchen, TcpOther, TcpRestart, TcpSecure

SECRET = "s3cret"


# ---- helpers ---------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CountingProxy:
    """A plain TCP forwarder in front of a service: counts the connections made
    through it and the bytes that cross it each way (client->server: ``up``)."""

    def __init__(self, target_address: str, reply_delay: float = 0.0):
        self.reply_delay = reply_delay      # seconds each chunk from the server is held (latency)
        host, port = target_address.removeprefix("tcp://").rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.address = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.lock = threading.Lock()
        self.connections = 0
        self.up = 0
        self.down = 0
        self.sockets = []
        self.threads = []
        self.stopping = False
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self):
        while not self.stopping:
            try:
                client, _ = self.listener.accept()
            except (socket.timeout, OSError):
                continue
            client.settimeout(None)
            server = socket.create_connection(self.target)
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.connections += 1
                self.sockets += [client, server]
            for src, dst, attr in ((client, server, "up"), (server, client, "down")):
                t = threading.Thread(target=self._pipe, args=(src, dst, attr), daemon=True)
                t.start()
                self.threads.append(t)

    def _pipe(self, src, dst, attr):
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                with self.lock:
                    setattr(self, attr, getattr(self, attr) + len(data))
                if attr == "down" and self.reply_delay:
                    time.sleep(self.reply_delay)
                dst.sendall(data)
        except OSError:
            pass
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def counts(self):
        with self.lock:
            return self.up, self.down

    def close(self):
        self.stopping = True
        self.acceptor.join(5)
        self.listener.close()
        with self.lock:
            socks = list(self.sockets)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self.threads:
            t.join(5)
        for s in socks:
            s.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_self_signed_cert(directory):
    """A self-signed certificate for 127.0.0.1 and localhost; returns (certfile, keyfile)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "speedysvc test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                                         data_encipherment=False, key_agreement=True, key_cert_sign=True,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return str(certfile), str(keyfile)


def run(coro, timeout=30):
    return asyncio.run(asyncio.wait_for(coro, timeout))


# ---- fixtures --------------------------------------------------------------------------------

# Services are started per test: the TCP gateway is a long-lived shared-memory client
# whose channels stay until it stops, and conftest checks /dev/shm after every test.

@pytest.fixture
def serve():
    """serve(cls, **LocalService options) starts a service serving TCP on a free loopback port."""
    started = []

    def start(cls, workers=2, **kw):
        kw.setdefault("tcp", "127.0.0.1:0")
        svc = LocalService(cls, workers=workers, **kw).start()
        started.append(svc)
        return svc

    yield start
    for svc in reversed(started):
        svc.stop()


@pytest.fixture
def kitchen(serve):
    svc = serve(TcpKitchen, workers=2)
    assert svc.tcp_address.startswith("tcp://127.0.0.1:")
    assert not svc.tcp_address.endswith(":0")
    return svc


@pytest.fixture
def client(kitchen):
    with connect(TcpKitchen, kitchen.tcp_address, timeout=20) as c:
        yield c


@pytest.fixture
def proxy(kitchen):
    with CountingProxy(kitchen.tcp_address) as p:
        yield p


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    return make_self_signed_cert(tmp_path_factory.mktemp("tls"))


# ---- codecs, arguments, errors ---------------------------------------------------------------

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


# ---- compression -----------------------------------------------------------------------------

@pytest.mark.parametrize("algo", compression.available())
def test_compression_both_ways(kitchen, algo):
    assert set(compression.available()) >= {"zlib", "lz4", "snappy", "zstd"}
    compressible = b"speedysvc compresses this line rather well. " * 25_000     # ~1.1 MB
    incompressible = random.Random(algo).randbytes(300_000)
    with CountingProxy(kitchen.tcp_address) as proxy, \
            connect(TcpKitchen, proxy.address, compression=algo, timeout=20) as c:
        assert c.echo_msgpack("hello") == "hello"     # the handshake is done

        up0, down0 = proxy.counts()
        assert c.echo_raw(compressible) == compressible
        up1, down1 = proxy.counts()
        assert up1 - up0 < len(compressible) // 10, "the request was not compressed"
        assert down1 - down0 < len(compressible) // 10, "the reply was not compressed"

        text = ["a line of json text that repeats"] * 5000
        assert c.echo_json(text) == text

        up1, down1 = proxy.counts()
        assert c.echo_raw(incompressible) == incompressible
        up2, down2 = proxy.counts()
        assert up2 - up1 >= len(incompressible)       # sent as it is, not inflated
        assert down2 - down1 >= len(incompressible)
        assert up2 - up1 < len(incompressible) + 1024

        # compressed, yet larger than the receive buffer: arrives into its own buffer
        semi = random.Random(3).randbytes(600_000) + bytes(1_400_000)
        up2, down2 = proxy.counts()
        assert c.echo_raw(semi) == semi
        up3, down3 = proxy.counts()
        assert 600_000 <= up3 - up2 < 1_000_000 and 600_000 <= down3 - down2 < 1_000_000

        up2, _ = proxy.counts()
        small = b"a" * 1000                            # below the threshold: not compressed
        assert c.echo_raw(small) == small
        up3, _ = proxy.counts()
        assert up3 - up2 >= len(small)
        assert proxy.connections == 1

    async def main():
        ac = connect_async(TcpKitchen, kitchen.tcp_address, compression=algo)
        try:
            assert await ac.echo_raw(compressible) == compressible
            assert await ac.echo_raw(incompressible) == incompressible
        finally:
            await ac.aclose()
    run(main())


# ---- large payloads --------------------------------------------------------------------------

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


def test_payload_over_the_service_limit_is_refused_and_the_connection_survives():
    with LocalService(TcpRestart, workers=1, tcp="127.0.0.1:0", max_payload=1 << 20) as svc, \
            connect(TcpRestart, svc.tcp_address, timeout=10) as c:
        assert c.echo(b"x" * 1000) == b"x" * 1000
        with pytest.raises(PayloadTooLarge):
            c.echo(b"x" * (2 << 20))
        assert c.echo("still usable") == "still usable"

        async def main():
            ac = connect_async(TcpRestart, svc.tcp_address)
            try:
                with pytest.raises(PayloadTooLarge):
                    await ac.echo(b"x" * (2 << 20))
                assert await ac.echo("ok") == "ok"
            finally:
                await ac.aclose()
        run(main())


# ---- many calls, many connections ------------------------------------------------------------

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


# ---- authentication --------------------------------------------------------------------------

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


def _fake_handshake(conn, service: str, auth: bool, proof) -> bool:
    """A fake server's side of the handshake; False if the client hung up first."""
    conn.sendall(fr.pack_hello(fr.SERVER_HELLO, {
        "versions": [fr.VERSION], "service": service, "compression": [], "auth": auth,
        "nonce": fr.new_nonce(), "max_payload": 1 << 20}))
    reader = fr.HelloReader()
    while True:
        data = conn.recv(4096)
        if not data:
            return False
        if reader.feed(data) is not None:
            break
    conn.sendall(fr.pack_hello(fr.WELCOME, {"proof": proof}))
    return True


def test_client_refuses_a_server_that_cannot_prove_the_secret():
    """A fake server asks for authentication, then answers with a bogus proof."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def fake():
        conn, _ = listener.accept()
        with conn:
            if _fake_handshake(conn, TcpSecure.name, auth=True, proof=b"\0" * 32):
                conn.recv(4096)

    th = threading.Thread(target=fake, daemon=True)
    th.start()
    try:
        with connect(TcpSecure, f"tcp://127.0.0.1:{port}", secret=SECRET, timeout=5) as c:
            with pytest.raises(AuthenticationFailed, match="prove"):
                c.echo(1)
    finally:
        th.join(5)
        listener.close()


def test_a_peer_that_is_not_speedysvc_is_a_protocol_error():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def fake():
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            conn.recv(4096)

    th = threading.Thread(target=fake, daemon=True)
    th.start()
    try:
        with connect(TcpKitchen, f"tcp://127.0.0.1:{port}", timeout=5) as c:
            t = time.monotonic()
            with pytest.raises(ProtocolError, match="speedysvc protocol"):
                c.echo_msgpack(1)
            assert time.monotonic() - t < 3
    finally:
        th.join(5)
        listener.close()


# ---- TLS -------------------------------------------------------------------------------------

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


# ---- restarts --------------------------------------------------------------------------------

def test_service_restarted_on_the_same_port_under_a_connected_client():
    port = free_port()
    addr = f"tcp://127.0.0.1:{port}"
    svc = LocalService(TcpRestart, workers=1, tcp=f"127.0.0.1:{port}").start()
    try:
        assert svc.tcp_address == addr
        c = connect(TcpRestart, addr, timeout=10)
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
        ac = connect_async(TcpRestart, addr, timeout=10)
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


def test_calls_in_flight_during_a_stop_fail_instead_of_hanging():
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
            assert isinstance(result[kind], (ConnectionLost, ServiceUnavailable)), result
            assert result[f"{kind}_at"] - t < 3, f"{kind} call failed only after {result[f'{kind}_at'] - t:.1f} s"
        assert "stopping" in str(result["sync"])
        c.close()


def test_tcp_server_exits_promptly_on_sigterm_with_a_call_in_flight():
    """After SIGTERM the TCP gateway waits up to stop_timeout for calls in flight,
    tells its clients and exits; it must not wait for the slow call itself."""
    with LocalService(TcpRestart, workers=1, tcp="127.0.0.1:0", stop_timeout=1) as svc:
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


# ---- timeouts --------------------------------------------------------------------------------

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


# ---- asyncio over shared memory --------------------------------------------------------------

def test_async_client_over_shm(serve):
    serve(TcpKitchen, workers=4, tcp=None)

    async def main():
        ac = connect_async(TcpKitchen)
        assert ac._transport.scheme == "shm"
        try:
            async def one(i):
                if i % 10 == 0:
                    return await ac.sleep(0.3, i)
                return await ac.echo_msgpack([i, "x" * i])

            t = time.monotonic()
            results = await asyncio.gather(*(one(i) for i in range(100)))
            elapsed = time.monotonic() - t
            with pytest.raises(ValueError, match="shm error"):
                await ac.fail_value("shm error")
            assert await ac.add(1, b=2, scale=3) == 9
            return results, elapsed
        finally:
            await ac.aclose()

    results, elapsed = run(main())
    assert results == [i if i % 10 == 0 else [i, "x" * i] for i in range(100)]
    assert elapsed < 2.0, f"10 calls of 0.3 s on 4 workers took {elapsed:.2f} s"


def test_async_client_over_shm_per_call_timeout(serve):
    serve(TcpKitchen, workers=1, tcp=None)

    async def main():
        ac = connect_async(TcpKitchen)
        try:
            times = {}
            for timeout in (0.05, 0.3):
                t = time.monotonic()
                with pytest.raises(CallTimeout):
                    await ac.send("sleep", [0.6], timeout=timeout)
                times[timeout] = time.monotonic() - t
            await asyncio.sleep(0.6)
            assert await ac.echo_msgpack("after") == "after"
            return times
        finally:
            await ac.aclose()

    times = run(main())
    for timeout, elapsed in times.items():
        assert timeout * 0.95 <= elapsed < timeout + 0.5, \
            f"a call with a {timeout} s timeout raised CallTimeout after {elapsed:.3f} s"


# ---- connection errors -----------------------------------------------------------------------

def test_nobody_listening_is_service_unavailable_quickly():
    addr = f"tcp://127.0.0.1:{free_port()}"
    with connect(TcpKitchen, addr) as c:
        t = time.monotonic()
        with pytest.raises(ServiceUnavailable, match="cannot connect") as info:
            c.echo_msgpack(1)
        assert time.monotonic() - t < 2
        assert addr in str(info.value)

    async def main():
        ac = connect_async(TcpKitchen, addr)
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


def read_hello(sock):
    reader = fr.HelloReader()
    while True:
        data = sock.recv(4096)
        if not data:
            raise ConnectionError("closed during the handshake")
        msg = reader.feed(data)
        if msg is not None:
            return msg


def read_until_closed(sock, timeout):
    sock.settimeout(timeout)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def test_handshake_and_stall_timeouts_drop_stuck_clients_but_keep_idle_ones(serve):
    svc = serve(TcpRestart, workers=1, tcp_handshake_timeout=1, tcp_stall_timeout=1)
    host, port = svc.tcp_address.removeprefix("tcp://").rsplit(":", 1)
    with connect(TcpRestart, svc.tcp_address, timeout=10) as good, \
            socket.create_connection((host, int(port))) as silent, \
            socket.create_connection((host, int(port))) as staller:
        assert good.echo("before") == "before"
        conn = good._transport._conn

        # never answers the server's hello
        msg_type, _, body, _ = read_hello(silent)
        assert msg_type == fr.SERVER_HELLO and body["service"] == TcpRestart.name

        # shakes hands, then sends half a call header and stops
        msg_type, _, body, _ = read_hello(staller)
        staller.sendall(fr.pack_hello(fr.CLIENT_HELLO, {"service": TcpRestart.name, "compression": "",
                                                        "compress_min": 4096, "nonce": fr.new_nonce(),
                                                        "proof": None}))
        assert read_hello(staller)[0] == fr.WELCOME
        staller.sendall(fr.call_header(1, b"echo", 0, 0, 10)[:7])

        t = time.monotonic()
        rest = read_until_closed(silent, 5)
        assert time.monotonic() - t < 3.5
        refused = fr.HelloReader().feed(rest)
        assert refused[0] == fr.REFUSED
        assert "handshake" in str(decode_exception(refused[2]["error"]))

        rest = read_until_closed(staller, 5)
        assert time.monotonic() - t < 3.5
        frames = fr.FrameParser(1 << 20, frozenset((fr.REPLY, fr.GOAWAY))).feed(rest)
        assert [f.kind for f in frames] == [fr.GOAWAY]
        assert "progress" in str(decode_exception(frames[0].payload))

        time.sleep(max(0.0, 2.5 - (time.monotonic() - t)))
        # the idle, well-behaved client kept its connection
        assert good.echo("after") == "after"
        assert good._transport._conn is conn


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


def test_non_loopback_bind_without_secret_is_refused_at_start(capfd):
    with pytest.raises(RuntimeError, match="TCP server"):
        LocalService(TcpOther, workers=1, tcp="0.0.0.0:0").start()
    err = capfd.readouterr().err
    assert "secret" in err and "0.0.0.0" in err


def _call_in_thread(method, *args):
    """Start ``method(*args)`` in a thread: (the thread, a dict that gets its "value" or "error")."""
    outcome = {}

    def run():
        try:
            outcome["value"] = method(*args)
        except Exception as e:   # noqa: BLE001 - the tests check the type
            outcome["error"] = e

    th = threading.Thread(target=run)
    th.start()
    return th, outcome


def test_worker_killed_mid_call_over_tcp_fails_that_call_and_the_connection_goes_on(kitchen, client):
    """kill -9 of the worker running a TCP call: the caller gets WorkerDied well within its
    timeout, and the same connection is served by the other worker afterwards."""
    import signal as _signal
    pids = set(kitchen.pids)
    started = time.monotonic()
    t, outcome = _call_in_thread(client.sleep, 30, "never")
    from conftest import wait_until
    from speedysvc import shm as _shm
    seg = _shm.ServiceSegment.attach(TcpKitchen.name)
    assert wait_until(lambda: any(w["busy"] for w in seg.workers()), 10)
    busy = next(w["pid"] for w in seg.workers() if w["busy"])
    os.kill(busy, _signal.SIGKILL)
    t.join(15)
    assert not t.is_alive()
    from speedysvc import WorkerDied
    assert isinstance(outcome.get("error"), WorkerDied), outcome
    assert time.monotonic() - started < 10
    assert client.echo_msgpack([1, "after"]) == [1, "after"]
    assert client.whoami() in pids - {busy}


class _Interrupted(BaseException):
    pass


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="needs signals")
def test_a_call_without_timeout_interrupted_while_waiting_ends_cleanly(kitchen):
    """A call with no timeout waits in a blocking read; an exception from a signal handler
    ends that call at once.  Its turn as the reader ended halfway, so the connection is
    dropped; later calls connect anew and get their own answers, not the late one."""
    import signal as _signal
    c = connect(TcpKitchen, kitchen.tcp_address)   # no timeout: the blocking read, not poll()
    try:
        assert c.echo_msgpack("warm") == "warm"
        conn = c._transport._conn
        old = _signal.signal(_signal.SIGALRM, lambda *a: (_ for _ in ()).throw(_Interrupted()))
        try:
            _signal.setitimer(_signal.ITIMER_REAL, 0.3)
            t = time.monotonic()
            with pytest.raises(_Interrupted):
                c.sleep(1.0, "late")
            assert time.monotonic() - t < 0.9
        finally:
            _signal.setitimer(_signal.ITIMER_REAL, 0)
            _signal.signal(_signal.SIGALRM, old)
        assert c.echo_msgpack("next") == "next"
        time.sleep(1.0)                              # the late reply has come by now
        assert c.echo_msgpack("after") == "after"
        assert c._transport._conn is not conn
    finally:
        c.close()


def test_breaking_a_connection_wakes_the_thread_reading_it():
    """A thread blocked reading a connection that another thread finds broken (a send cut
    short, a go-away) wakes up with ConnectionLost instead of waiting for bytes that will
    never come."""
    listener, th, address = _fake_tcp_service(lambda call_id, payload: [])   # never answers
    try:
        c = connect(TcpKitchen, address)   # no timeout
        conn = c._transport._conn = c._transport._connection()
        t, outcome = _call_in_thread(c.echo_msgpack, "never answered")
        time.sleep(0.3)
        with conn.lock:
            assert conn.reading
            conn._break(ConnectionLost("broken by another thread"))
        t.join(5)
        assert not t.is_alive(), "the reader still waits on a broken connection"
        assert isinstance(outcome.get("error"), ConnectionLost), outcome
        c.close()
    finally:
        listener.close()


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


def test_a_call_without_timeout_fails_when_the_gateway_is_killed(serve):
    """No timeout and the gateway process dies (kill -9) mid-call: the blocking read ends
    with ConnectionLost at once, not a hang; the next call finds nobody listening."""
    svc = serve(TcpKitchen, workers=1)
    c = connect(TcpKitchen, svc.tcp_address)
    try:
        assert c.echo_msgpack(1) == 1
        th, outcome = _call_in_thread(c.sleep, 20, "never")
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


def _fake_tcp_service(replies):
    """A listening socket that shakes hands like a TcpKitchen gateway and answers each
    call with ``replies(call_id, payload)``: a list of byte strings sent apart (50 ms
    between them).  Serves each connection in a thread, until the listener is closed."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve(conn):
        with conn:
            if not _fake_handshake(conn, TcpKitchen.name, auth=False, proof=None):
                return
            parser = fr.FrameParser(1 << 20, frozenset((fr.CALL,)))
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                for frame in parser.feed(data):
                    for i, piece in enumerate(replies(frame.call_id, frame.payload)):
                        if i:
                            time.sleep(0.05)
                        conn.sendall(piece)

    def run():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:   # closed
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return listener, th, f"tcp://127.0.0.1:{listener.getsockname()[1]}"


def _msgpack_echo_replies(call_id, payload):
    """For ``_fake_tcp_service``: echo a msgpack call's one argument; "split" comes in two pieces."""
    import msgpack
    arg = msgpack.unpackb(payload)[0]
    body = msgpack.packb(arg)
    reply = fr.reply_header(call_id, 0, len(body)) + body
    return [reply[:fr.HEADER_SIZE + 2], reply[fr.HEADER_SIZE + 2:]] if arg == "split" else [reply]


@pytest.mark.parametrize("timeout", [None, 5.0])
@pytest.mark.parametrize("piece", [1, 2])
def test_a_read_interrupted_after_bytes_came_drops_the_connection(timeout, piece):
    """An exception (a signal handler's) between receiving bytes and parsing them would
    lose those bytes and leave the stream out of step, so that later replies are misread or
    never found.  The connection is dropped instead: the next call connects anew.  The
    reply comes in two pieces: the first is read by the call's usual path (in C) and
    parsed by ``_read_on``, the second is read and parsed in ``_wait``."""
    listener, th, address = _fake_tcp_service(_msgpack_echo_replies)
    try:
        with connect(TcpKitchen, address, timeout=timeout) as c:
            assert c.echo_msgpack("warm") == "warm"
            conn = c._transport._conn
            parser = conn.parser
            real = parser.buffer_updated
            calls = []

            def interrupted(n):
                calls.append(n)
                if len(calls) == piece:
                    raise _Interrupted()
                return real(n)

            parser.buffer_updated = interrupted
            with pytest.raises(_Interrupted):
                c.echo_msgpack("split")
            assert len(calls) == piece
            parser.buffer_updated = real
            for arg in ["after", "split", "plain"]:
                assert c.echo_msgpack(arg) == arg
            assert c._transport._conn is not conn
    finally:
        listener.close()


@pytest.mark.parametrize("timeout", [None, 5.0])
def test_the_usual_call_runs_in_c_and_the_rest_in_python(kitchen, timeout):
    """A call alone on its connection goes all the way in ``core.call_alone`` (even after the
    connection was idle: its idle check is done there too); a call that is not alone (another
    thread's call is in flight) goes through ``_Connection.call``, and both get their answers."""
    with connect(TcpKitchen, kitchen.tcp_address, timeout=timeout) as c:
        assert c.echo_msgpack("warm") == "warm"
        conn = c._transport._conn
        real, python_calls = conn.call, []

        def counted(*args):
            python_calls.append(args[0])
            return real(*args)

        conn.call = counted
        for i in range(20):
            assert c.echo_msgpack(i) == i
            assert c.echo_raw(b"r%d" % i) == b"r%d" % i
        time.sleep(0.01)   # idle for longer than IDLE_CHECK_AFTER
        assert c.echo_msgpack("after idle") == "after idle"
        assert python_calls == []
        slow = threading.Thread(target=lambda: c.sleep(0.5, "slow"))
        slow.start()
        from conftest import wait_until
        assert wait_until(lambda: conn.reading, timeout=5)
        assert c.echo_msgpack("beside") == "beside"
        slow.join()
        assert python_calls == [b"echo_msgpack"]
        assert c._transport._conn is conn


@pytest.mark.parametrize("timeout", [None, 5.0])
def test_replies_in_pieces_or_after_strangers_reach_the_right_call(timeout):
    """A reply split across reads, or preceded in the same read by a reply to a call
    nobody waits for (one that timed out), still reaches its call; with no timeout the
    client reads with one blocking recv() and takes the short way only for exactly its
    own reply."""
    import msgpack

    def replies(call_id, payload):
        arg = msgpack.unpackb(payload)[0]
        body = msgpack.packb(arg)
        reply = fr.reply_header(call_id, 0, len(body)) + body
        if arg == "split":
            return [reply[:fr.HEADER_SIZE + 2], reply[fr.HEADER_SIZE + 2:]]
        if arg == "stranger first":
            stray = msgpack.packb("not yours")
            return [fr.reply_header(call_id ^ 0x5A5A, 0, len(stray)) + stray + reply]
        if arg == "stranger alone first":
            stray = msgpack.packb("not yours")
            return [fr.reply_header(call_id ^ 0x5A5A, 0, len(stray)) + stray, reply]
        if arg == "two pieces of header":
            return [reply[:5], reply[5:]]
        return [reply]

    listener, th, address = _fake_tcp_service(replies)
    try:
        with connect(TcpKitchen, address, timeout=timeout) as c:
            for arg in ["plain", "split", "stranger first", "stranger alone first", "two pieces of header",
                        "plain again"]:
                assert c.echo_msgpack(arg) == arg
    finally:
        listener.close()
        th.join(5)


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

"""What the TCP tests share: services on a free loopback port, a counting proxy, fake peers, a
client that speaks (or abuses) the protocol by hand, an in-process gateway with options
LocalService does not pass, and measures of a process (memory, sockets, channels).

Fixtures are defined here and bound in each test module that uses them
(``serve = tcp_helpers.serve``): pytest finds fixtures by name in a module.
"""
import asyncio
import contextlib
import datetime
import ipaddress
import os
import socket
import struct
import threading
import time

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from speedysvc import LocalService, codecs, connect
from speedysvc import _shmcore as core
from speedysvc.errors import decode_exception
from speedysvc.tcp import compression
from speedysvc.tcp import framing as fr
from conftest import channel_states
from tcp_services import TcpEcho, TcpKitchen

MiB = 1 << 20
LIMIT = 1 * MiB                       # max_payload of the guarded services
MSGPACK, RAW, JSON = codecs.MSGPACK, codecs.RAW, codecs.JSON
SECRET = "s3cret"


def run(coro, timeout=30):
    return asyncio.run(asyncio.wait_for(coro, timeout))


class Interrupted(BaseException):
    """What the tests' signal handlers raise, as KeyboardInterrupt would."""


def call_in_thread(method, *args):
    """Start ``method(*args)`` in a thread: (the thread, a dict that gets its "value" or "error")."""
    outcome = {}

    def call():
        try:
            outcome["value"] = method(*args)
        except Exception as e:   # noqa: BLE001 - the tests check the type
            outcome["error"] = e

    th = threading.Thread(target=call)
    th.start()
    return th, outcome


# ---- services ----------------------------------------------------------------------------------

# Services are started per test: the TCP gateway is a long-lived shared-memory client
# whose channels stay until it stops, and conftest checks /dev/shm after every test.

def tcp_service(cls, **kw) -> LocalService:
    """A LocalService of ``cls`` serving TCP on a free loopback port (not started yet: use it in a
    ``with``)."""
    opts = dict(workers=2, tcp="127.0.0.1:0", start_timeout=20)
    opts.update(kw)
    return LocalService(cls, **opts)


def guarded(cls=TcpEcho, **kw) -> LocalService:
    """``tcp_service`` with short handshake and stall timeouts (1 s) and a payload limit of LIMIT."""
    opts = dict(tcp_handshake_timeout=1.0, tcp_stall_timeout=1.0, max_payload=LIMIT)
    opts.update(kw)
    return tcp_service(cls, **opts)


def connect_to(svc, cls=TcpEcho, **kw):
    """A client of ``svc`` (a LocalService or an InProcessGateway) over TCP."""
    kw.setdefault("timeout", 10)
    return connect(cls, svc.tcp_address, **kw)


def check(c, tag="ok"):
    """A normal client gets correct answers: small, structured and large (> scratch buffer) payloads."""
    assert c.echo(tag) == tag
    assert c.echo({"k": [1, 2.5, None, b"\x00"]}) == {"k": [1, 2.5, None, b"\x00"]}
    big = bytes(range(256)) * 1200      # 300 KiB: goes through the parser's big-frame path both ways
    assert c.echo_raw(big) == big


def timed_check(c, tag="ok") -> float:
    t = time.monotonic()
    assert c.echo(tag) == tag
    return time.monotonic() - t


@contextlib.contextmanager
def pinging(c, every=0.05):
    """Times calls of client ``c`` in a thread while the block runs: yields their latencies."""
    latencies, done = [], threading.Event()

    def ping():
        while not done.is_set():
            latencies.append(timed_check(c, "ping"))
            time.sleep(every)

    th = threading.Thread(target=ping)
    th.start()
    try:
        yield latencies
    finally:
        done.set()
        th.join(30)


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


@pytest.fixture
def server_logs_clean(capfd):
    """The gateway and the workers write to our stderr: nothing bad may crash a callback there."""
    yield
    _, err = capfd.readouterr()
    for bad in ("Traceback", "Fatal error", "Exception in callback", "exception was never retrieved"):
        assert bad not in err, f"the server logged {bad!r}:\n{err[-4000:]}"


logs_clean = pytest.mark.usefixtures("server_logs_clean")


class InProcessGateway:
    """A TcpServer with options LocalService does not pass, on an event loop in a thread, in
    front of a LocalService's workers."""

    def __init__(self, service: str, **kw):
        from speedysvc.tcp.server import TcpServer
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = TcpServer(service, **kw)
        self.run(self.server.start())
        self.tcp_address = f"tcp://127.0.0.1:{self.server.port}"

    def run(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def read(self, fn):
        """``fn(server)`` called on the server's loop."""
        async def call():
            return fn(self.server)
        return self.run(call())

    def close(self, timeout=10.0):
        try:
            self.run(self.server.close(timeout), timeout + 30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---- TLS ---------------------------------------------------------------------------------------

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


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    return make_self_signed_cert(tmp_path_factory.mktemp("tls"))


# ---- a proxy -----------------------------------------------------------------------------------

class CountingProxy:
    """A plain TCP forwarder in front of a service: counts the connections made through it
    and the bytes that cross it each way (client->server: ``up``); can hold each chunk
    from the server for ``reply_delay`` seconds (latency), and stop forwarding the
    client's bytes while ``go`` is clear (the client's sends then block)."""

    def __init__(self, target_address: str, reply_delay: float = 0.0):
        self.reply_delay = reply_delay
        host, port = target_address.removeprefix("tcp://").rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.address = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.go = threading.Event()
        self.go.set()
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
                if attr == "up":
                    self.go.wait()
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
        self.go.set()
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


# ---- fake peers --------------------------------------------------------------------------------

def read_hello(sock):
    """The next handshake message on ``sock``: (msg_type, version, body, leftover bytes)."""
    reader = fr.HelloReader()
    while True:
        data = sock.recv(65536)
        if not data:   # the peer hung up (else a fake server's thread would spin on EOF for the rest of the run)
            raise EOFError("the peer closed the connection during the handshake")
        msg = reader.feed(data)
        if msg is not None:
            return msg


def fake_handshake(conn, service: str, auth: bool, proof) -> bool:
    """A fake server's side of the handshake; False if the client hung up first."""
    conn.sendall(fr.pack_hello(fr.SERVER_HELLO, {
        "versions": [fr.VERSION], "service": service, "compression": [], "auth": auth,
        "nonce": fr.new_nonce(), "max_payload": 1 << 20}))
    try:
        read_hello(conn)
    except EOFError:
        return False
    conn.sendall(fr.pack_hello(fr.WELCOME, {"proof": proof}))
    return True


def fake_server(script):
    """A listening socket whose single connection is handled by ``script(conn)`` in a thread:
    (the listener, the thread, its address)."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve_one():
        conn, _ = listener.accept()
        with conn:
            try:
                script(conn)
            except (EOFError, OSError):   # the client hung up: the script is over
                pass

    th = threading.Thread(target=serve_one, daemon=True)
    th.start()
    return listener, th, f"tcp://127.0.0.1:{listener.getsockname()[1]}"


def fake_service(replies):
    """A listening socket that shakes hands like a TcpKitchen gateway and answers each
    call with ``replies(call_id, payload)``: a list of byte strings sent apart (50 ms
    between them; a None closes the connection there).  Serves each connection in a thread,
    until the listener is closed:
    (the listener, the accepting thread, its address)."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve_one(conn):
        with conn:
            if not fake_handshake(conn, TcpKitchen.name, auth=False, proof=None):
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
                        if piece is None:
                            return
                        conn.sendall(piece)

    def accept():
        while listener.fileno() != -1:   # (closing a listener does not wake its accept(): look again)
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:   # closed
                return
            conn.settimeout(None)
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    listener.settimeout(0.1)
    th = threading.Thread(target=accept, daemon=True)
    th.start()
    return listener, th, f"tcp://127.0.0.1:{listener.getsockname()[1]}"


# ---- the protocol by hand ----------------------------------------------------------------------

def msgpack_args(*args) -> bytes:
    return MSGPACK.dumps(list(args))


def compressed_raw(algo, data: bytes) -> bytes:
    """``data`` compressed with ``algo``, without the length prefix the protocol adds."""
    return bytes(compression.ALGORITHMS[algo][0](data))


def compressed_call(raw, call_id, name, payload, algo):
    packed = compression.compress(algo, payload)
    raw.send(fr.call_header(call_id, name.encode(), MSGPACK.flags, 0, len(packed), fr.F_COMPRESSED) + packed)


def handshake_messages(data: bytes) -> list:
    """Split bytes into handshake messages (msg_type, body)."""
    out = []
    while data:
        msg = fr.HelloReader().feed(data)
        if msg is None:
            break
        out.append((msg[0], msg[2]))
        data = msg[3]
    return out


class RawClient:
    """Speaks (or abuses) the protocol by hand over a plain socket."""

    def __init__(self, svc_or_address, timeout=5.0, rcvbuf=None, service=TcpEcho.name):
        address = svc_or_address if isinstance(svc_or_address, str) else svc_or_address.tcp_address
        host, port = address[len("tcp://"):].rsplit(":", 1)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((host, int(port)))
        self.service = service
        self.server_hello = None
        self.parser = fr.FrameParser(1 << 31, frozenset({fr.REPLY, fr.GOAWAY}))
        self.pending = []
        self.compression = None

    # -- handshake --
    def _read_message(self):
        msg = read_hello(self.sock)
        if msg[3]:
            self.pending.extend(self.parser.feed(msg[3]))
        return msg

    def read_server_hello(self) -> dict:
        msg_type, version, body, _ = self.server_hello = self._read_message()
        assert msg_type == fr.SERVER_HELLO and version == fr.VERSION
        return body

    def client_hello(self, **fields) -> bytes:
        body = {"service": self.service, "compression": "", "compress_min": 4096, "nonce": fr.new_nonce(),
                "proof": None}
        body.update(fields)
        return fr.pack_hello(fr.CLIENT_HELLO, body)

    def handshake(self, **fields) -> tuple:
        """Full handshake; returns the server's answer (msg_type, body)."""
        if self.server_hello is None:
            self.read_server_hello()
        self.sock.sendall(self.client_hello(**fields))
        msg_type, _, body, _ = self._read_message()
        if msg_type == fr.WELCOME:
            self.compression = fields.get("compression") or None
        return msg_type, body

    def welcome(self, **fields) -> "RawClient":
        msg_type, body = self.handshake(**fields)
        assert msg_type == fr.WELCOME, (msg_type, body)
        return self

    # -- frames --
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def call(self, call_id, name, payload=b"", codec_flags=MSGPACK.flags, timeout_ms=0, flags=0) -> None:
        if isinstance(name, str):
            name = name.encode()
        self.sock.sendall(fr.call_header(call_id, name, codec_flags, timeout_ms, len(payload), flags) + payload)

    def read_frames(self, n, timeout=10.0) -> list:
        deadline = time.monotonic() + timeout
        while len(self.pending) < n:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(1 << 20)
            if not data:
                raise EOFError(f"closed after {len(self.pending)} of {n} frames")
            self.pending.extend(self.parser.feed(data))
        frames, self.pending = self.pending[:n], self.pending[n:]
        return frames

    def reply(self, timeout=10.0):
        """(status, payload) of the next reply frame."""
        (frame,) = self.read_frames(1, timeout)
        assert frame.kind == fr.REPLY, frame
        payload = bytes(frame.payload)
        if frame.flags & fr.F_COMPRESSED:
            payload = bytes(compression.decompress(self.compression, payload, 1 << 31))
        return frame.arg, payload, frame

    def error_reply(self, timeout=10.0) -> BaseException:
        status, payload, _ = self.reply(timeout)
        assert status == 1, payload
        return decode_exception(payload)

    def read_to_eof(self, timeout=5.0) -> bytes:
        """Everything the server sends until it closes; fails if it does not close in time."""
        deadline = time.monotonic() + timeout
        data = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"the server did not close the connection within {timeout} s")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 20)
            except ConnectionResetError:
                break
            except socket.timeout:
                continue
            if not chunk:
                break
            data.append(chunk)
        return b"".join(data)

    def expect_refused(self, timeout=5.0) -> BaseException:
        msgs = handshake_messages(self.read_to_eof(timeout))
        msgs = [m for m in msgs if m[0] != fr.SERVER_HELLO]
        assert msgs and msgs[-1][0] == fr.REFUSED, f"expected a refusal, got {msgs}"
        return decode_exception(msgs[-1][1]["error"])

    def expect_goaway(self, timeout=5.0) -> BaseException:
        frames = self.pending + self.parser.feed(self.read_to_eof(timeout))
        self.pending = []
        goaways = [f for f in frames if f.kind == fr.GOAWAY]
        assert goaways, f"expected a go-away frame, got {frames}"
        assert frames[-1].kind == fr.GOAWAY and goaways[0].call_id == 0
        return decode_exception(goaways[0].payload)

    def close(self, reset=False) -> None:
        if reset:   # abortive close: RST instead of FIN
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---- hypothesis: frames, mostly garbage ---------------------------------------------------------

FUZZ = settings(max_examples=100, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
FUZZ_LIMIT = 2 * fr.SCRATCH_SIZE + 1000

# headers that look nearly right, so fuzzing gets past the first check now and then
plausible_headers = st.builds(
    lambda kind, flags, name_len, call_id, arg, tmo, length: fr.FRAME.pack(kind, flags, name_len, call_id, arg,
                                                                          tmo, length),
    st.sampled_from([0, 1, 1, 1, 2, 2, 3, 4, 255]), st.sampled_from([0, 0, 0, 1, 2, 0x80]),
    st.one_of(st.integers(0, 70), st.just(0xFFFF)), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.one_of(st.integers(0, 300), st.integers(fr.SCRATCH_SIZE - 100, FUZZ_LIMIT + 20), st.just(2**64 - 1)))
garbage = st.lists(st.one_of(st.binary(max_size=300), plausible_headers), max_size=12).map(b"".join)


# ---- measures of a process ---------------------------------------------------------------------

def server_pids(svc) -> list[int]:
    """The processes that serve ``svc``'s TCP clients: its gateway, or (TCP served by the
    workers, the default) its workers.  The measures below take one pid or such a list (summed)."""
    if svc.tcp_in_workers:
        return list(svc.pids)
    return [svc.tcp_process.pid]


@pytest.fixture(params=["workers", "gateway"])
def tcp_mode(request, monkeypatch):
    """The test runs twice: with TCP served by the workers (the default) and by a gateway process
    (``tcp_in_workers=False``), for the LocalServices it starts without choosing."""
    monkeypatch.setenv("SPEEDYSVC_TCP_IN_WORKERS", "1" if request.param == "workers" else "0")
    return request.param


def _summed(measure):
    def summed(pid, *args):
        if isinstance(pid, (list, tuple)):
            return sum(measure(p, *args) for p in pid)
        return measure(pid, *args)
    summed.__doc__ = measure.__doc__
    return summed


@_summed
def memory_mib(pid, field="VmRSS") -> float:
    """A /proc/PID/status memory line: VmRSS, or RssAnon (the process's private memory,
    without the shared-memory segments it touched)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field}")


def rss_mib(pid) -> float:
    return memory_mib(pid)


def anon_mib(pid) -> float:
    return memory_mib(pid, "RssAnon")


def server_mib(svc) -> float:
    """The memory of the processes serving ``svc``'s TCP clients, as the TCP side's bounds count
    it: a gateway's resident memory; the workers' private memory (RssAnon) when they serve TCP,
    since their resident memory also counts the pages of the service's shared memory they wrote
    (answers waiting in their channels, as they wait with a gateway, whose RSS does not count
    them)."""
    if svc.tcp_in_workers:
        return anon_mib(server_pids(svc))
    return rss_mib(server_pids(svc))


def shm_mib(service: str, pid) -> float:
    """The memory in /dev/shm of the channels process ``pid`` (or each of a list) holds with
    ``service``: their data segments (the blocks they use, not the size they could grow to)."""
    if isinstance(pid, (list, tuple)):
        return sum(shm_mib(service, p) for p in pid)
    from speedysvc import shm
    prefix = f"{shm.PREFIX}.{shm.USER}.{service}.{pid}-"
    total = 0
    for name in os.listdir(shm.SHM_DIR):
        if name.startswith(prefix):
            try:
                total += os.stat(os.path.join(shm.SHM_DIR, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total / MiB


def welcomed_sockets(svc_or_address, n, service=TcpEcho.name, secret=None) -> list:
    """``n`` connections that completed the handshake (with ``secret``, if given) and send
    nothing more: plain sockets, so that the test's own process holds little per connection
    (the caller closes them)."""
    from speedysvc.tcp.server import raise_fd_limit
    raise_fd_limit()
    address = svc_or_address if isinstance(svc_or_address, str) else svc_or_address.tcp_address
    host, port = address[len("tcp://"):].rsplit(":", 1)
    key = fr.as_secret(secret)
    socks = []
    try:
        for _ in range(n):
            s = socket.create_connection((host, int(port)), timeout=10)
            socks.append(s)
            _, _, hello, _ = read_hello(s)
            nonce = fr.new_nonce()
            proof = None if key is None else fr.client_proof(key, hello["nonce"], nonce, service)
            s.sendall(fr.pack_hello(fr.CLIENT_HELLO, {"service": service, "compression": "", "compress_min": 4096,
                                                      "nonce": nonce, "proof": proof}))
            msg_type, _, body, _ = read_hello(s)
            assert msg_type == fr.WELCOME, body
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


@_summed
def open_sockets(pid) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return n


def busy_channels(svc) -> dict:
    """Channels whose call is not finished (requested, claimed, abandoned...)."""
    return {slot: code for slot, (_, code) in channel_states(svc).items()
            if code not in (core.ST_IDLE, core.ST_RESPONSE)}


def server_alive(svc) -> bool:
    """The TCP server is up: the gateway process, or (TCP served by the workers) every worker."""
    if svc.tcp_in_workers:
        return svc.tcp_reservation is not None and len(svc.pids) == svc.n_workers
    return svc.tcp_process is not None and svc.tcp_process.poll() is None

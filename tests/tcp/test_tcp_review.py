"""Review of the TCP transport: each test demonstrates one bug (it fails on the code
as reviewed).  Run with SPEEDYSVC_NAMESPACE=review."""
import asyncio
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import msgpack
import pytest

from speedysvc import AuthenticationFailed, LocalService, codecs, connect, connect_async
from speedysvc.tcp import compression
from speedysvc.tcp import framing as fr
from review_services import ReviewEcho

SECRET = "review-secret"
MiB = 1 << 20


def serve(**kw) -> LocalService:
    opts = dict(workers=2, tcp="127.0.0.1:0", start_timeout=20)
    opts.update(kw)
    return LocalService(ReviewEcho, **opts)


def fake_server(script):
    """A listening socket whose single connection is handled by ``script(conn)`` in a thread."""
    listener = socket.create_server(("127.0.0.1", 0))

    def run():
        conn, _ = listener.accept()
        with conn:
            try:
                script(conn)
            except (EOFError, OSError):   # the client hung up: the script is over
                pass

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return listener, th, f"tcp://127.0.0.1:{listener.getsockname()[1]}"


def read_hello(conn):
    reader = fr.HelloReader()
    while True:
        data = conn.recv(4096)
        if not data:   # the client hung up (else this thread would spin on EOF for the rest of the run)
            raise EOFError("the client closed the connection during the handshake")
        msg = reader.feed(data)
        if msg is not None:
            return msg


class HoldingProxy:
    """Forwards TCP both ways; client->server forwarding can be held (the client's sends then block)."""

    def __init__(self, target: str):
        host, port = target.removeprefix("tcp://").rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.go = threading.Event()
        self.go.set()
        self.socks = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.listener.accept()
            except OSError:
                return
            s = socket.create_connection(self.target)
            self.socks += [c, s]
            threading.Thread(target=self._pipe, args=(c, s, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(s, c, False), daemon=True).start()

    def _pipe(self, src, dst, up):
        try:
            while True:
                if up:
                    self.go.wait()
                data = src.recv(1 << 16)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.go.set()
        self.listener.close()
        for s in self.socks:
            try:
                s.close()
            except OSError:
                pass


# ---- 1. a client with a secret accepts a server that skips authentication ----------------------

def test_client_with_a_secret_refuses_a_server_that_does_not_authenticate():
    """docs/tcp-protocol.md: "the client checks the server's proof too, so a server that does not
    know the secret cannot impersonate the service".  A fake server that simply says ``auth: false``
    is accepted, and its (pickle) reply is unpickled by the client."""
    marker = f"/tmp/speedysvc-review-pwned-{os.getpid()}"

    class Evil:
        def __reduce__(self):
            return (open, (marker, "w"))

    def script(conn):
        conn.sendall(fr.pack_hello(fr.SERVER_HELLO, {
            "versions": [fr.VERSION], "service": ReviewEcho.name, "compression": [], "auth": False,
            "nonce": fr.new_nonce(), "max_payload": 1 << 20}))
        read_hello(conn)
        conn.sendall(fr.pack_hello(fr.WELCOME, {"proof": None}))
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
        with connect(ReviewEcho, address, secret=SECRET, timeout=5) as c:
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


# ---- 2. a TCP client inherited across fork() ------------------------------------------------

def test_tcp_client_used_in_both_processes_after_fork():
    """ShmTransport re-attaches after fork; TcpTransport keeps the parent's socket, and both
    processes draw call ids from the same counter state: they read each other's replies."""
    with serve() as svc, connect(ReviewEcho, svc.tcp_address, timeout=1) as c:
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


# ---- 3. an exception in the middle of sendall leaves half a frame on the connection -----------

class Interrupted(BaseException):
    pass


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="needs signals")
def test_interrupted_send_does_not_poison_the_connection():
    """KeyboardInterrupt (or any exception from a signal handler) during ``sendall`` of a large
    call: ``_Connection.call`` only breaks the connection on OSError, so the next call's bytes
    become the rest of the interrupted frame's payload and every later call hangs."""
    with serve() as svc:
        proxy = HoldingProxy(svc.tcp_address)
        old = signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(Interrupted()))
        try:
            with connect(ReviewEcho, proxy.address, timeout=3) as c:
                assert c.echo("warm") == "warm"
                proxy.go.clear()                       # the gateway stops receiving: sendall blocks
                signal.setitimer(signal.ITIMER_REAL, 0.3)
                with pytest.raises(Interrupted):
                    c.echo_raw(b"x" * (64 * MiB))
                proxy.go.set()
                time.sleep(0.2)
                assert c.echo("after") == "after"     # CallTimeout: the connection is desynchronised
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
            proxy.close()


# ---- 4. asyncio over shm: a cancelled call leaks its channel -----------------------------------

def test_cancelled_async_shm_call_gives_its_channel_back():
    """``AsyncShmTransport.call`` hands ``finish`` to the default executor; when the task is
    cancelled before a thread picks it up, ``finish`` never runs and the channel is neither
    given back nor settled."""
    with serve(max_channels=8):
        async def main():
            asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(1))
            client = connect_async(ReviewEcho)
            try:
                busy = asyncio.ensure_future(client.sleep(1.0, "a"))     # takes the executor's thread
                await asyncio.sleep(0.1)
                victim = asyncio.ensure_future(client.sleep(0.2, "b"))   # queued behind it
                await asyncio.sleep(0.1)
                victim.cancel()
                assert await busy == "a"
                await asyncio.sleep(0.5)
                chans = client._transport.shm._channels
                return len(chans.owned), len(chans.free)
            finally:
                await client.aclose()

        owned, free = asyncio.run(main())
        assert owned == free, f"{owned - free} channel(s) owned but never given back"


# ---- 5. asyncio over shm: a cancelled call keeps asyncio.run() from returning -------------------

def test_cancelled_async_shm_call_does_not_block_loop_shutdown(tmp_path):
    """``asyncio.wait_for(client.sleep(8), 0.3)`` times out, but the default executor's thread
    still waits for the worker (no call timeout), and asyncio.run() joins it at exit."""
    with serve():
        script = tmp_path / "main.py"
        script.write_text(
            "import asyncio, sys, time\n"
            f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
            "from speedysvc import connect_async\n"
            "from review_services import ReviewEcho\n"
            "async def main():\n"
            "    c = connect_async(ReviewEcho)\n"
            "    try:\n"
            "        await asyncio.wait_for(c.sleep(8), 0.3)\n"
            "    except asyncio.TimeoutError:\n"
            "        pass\n"
            "    await c.aclose()\n"
            "t = time.monotonic()\n"
            "asyncio.run(main())\n"
            "print(round(time.monotonic() - t, 1))\n")
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert float(out.stdout) < 3, f"asyncio.run() took {out.stdout.strip()} s to return"


# ---- 6. decompression runs on the gateway's event loop ------------------------------------------

def _raw_welcome(address, service, algo):
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    read_hello(sock)
    sock.sendall(fr.pack_hello(fr.CLIENT_HELLO, {"service": service, "compression": algo, "compress_min": 0,
                                                 "nonce": fr.new_nonce(), "proof": None}))
    assert read_hello(sock)[0] == fr.WELCOME
    return sock


def test_compression_bombs_do_not_stall_other_clients():
    """A 8 KiB zstd payload that really inflates to 256 MiB is inflated on the event loop (which,
    under the manager, also supervises every service).  Six of them, sent in one 50 KiB write,
    keep the loop from even greeting a new client for seconds (and cost the gateway ~2.5 GiB)."""
    limit = 256 * MiB
    bomb = compression.compress("zstd", bytes(limit))
    with serve(max_payload=limit) as svc:
        host, port = svc.tcp_address.removeprefix("tcp://").rsplit(":", 1)
        sock = _raw_welcome(svc.tcp_address, ReviewEcho.name, "zstd")
        latencies, stop = [], threading.Event()

        def greet():    # the event loop alone: connect and read the server's hello
            while not stop.is_set():
                t = time.monotonic()
                with socket.create_connection((host, int(port)), timeout=60) as s:
                    read_hello(s)
                latencies.append(time.monotonic() - t)
                time.sleep(0.02)

        th = threading.Thread(target=greet)
        th.start()
        time.sleep(0.2)
        sock.sendall(b"".join(fr.call_header(i + 1, b"size_of", codecs.MSGPACK.flags, 0, len(bomb),
                                             fr.F_COMPRESSED) + bomb for i in range(6)))
        time.sleep(4)
        stop.set()
        th.join(60)
        sock.close()
        assert max(latencies) < 0.5, (f"{6 * len(bomb)} bytes from one client kept the gateway's loop "
                                      f"from greeting a new client for {max(latencies):.1f} s")


# ---- 7. TLS: connections that never start TLS escape the handshake timeout ----------------------

def test_tls_connections_that_never_handshake_are_dropped_in_time(tmp_path):
    from test_tcp import make_self_signed_cert
    certfile, keyfile = make_self_signed_cert(tmp_path)
    with serve(tcp_tls=(certfile, keyfile), tcp_handshake_timeout=1.0) as svc:
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


# ---- 8. LocalService: the TCP gateway outlives its owner ----------------------------------------

def test_tcp_gateway_does_not_outlive_a_killed_owner(tmp_path):
    """The workers notice their owner died; ``python -m speedysvc.tcp.serve`` does not: it keeps
    the port and its shared-memory channels (and the service segment stays in /dev/shm)."""
    script = tmp_path / "owner.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "from speedysvc import LocalService\n"
        "from review_services import ReviewEcho\n"
        "svc = LocalService(ReviewEcho, workers=1, tcp='127.0.0.1:0').start()\n"
        "print(svc.tcp_process.pid, svc.pids[0], flush=True)\n"
        "time.sleep(60)\n")
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True)
    gateway, worker = map(int, owner.stdout.readline().split())
    owner.kill()
    owner.wait()
    owner.stdout.close()
    def alive(pid):   # a zombie waiting to be reaped has exited
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if not alive(gateway) and not alive(worker):
                break
            time.sleep(0.1)
        worker_alive, gateway_alive = alive(worker), alive(gateway)
        assert (worker_alive, gateway_alive) == (False, False), \
            f"15 s after its owner was killed: worker alive {worker_alive}, TCP gateway alive {gateway_alive}"
    finally:
        for pid in (gateway, worker):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        time.sleep(1)
        from speedysvc import shm
        shm.remove_service_segments(ReviewEcho.name)   # the killed owner could not


def test_tcp_gateway_whose_owner_died_while_it_started_exits():
    """The owner may die between starting the gateway and the gateway's first look at its
    parent; by then the gateway is someone else's child, so it is told its owner's pid."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    gateway = subprocess.Popen([sys.executable, "-m", "speedysvc.tcp.serve", ReviewEcho.name, "--port", "0",
                                "--exit-with-parent", str(gone.pid)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert gateway.stdout.readline().startswith("listening on ")
        assert gateway.wait(10) == 0
    finally:
        if gateway.poll() is None:
            gateway.kill()
            gateway.wait()
        gateway.stdout.close()


# ---- 9. replies a client never reads are buffered without limit ---------------------------------

def _rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) // 1024


def test_replies_a_client_never_reads_are_bounded():
    """docs/tcp-protocol.md: "replies a client does not read: the transport's write buffer; the
    server stops reading that client's calls".  But every call already read still runs and its
    reply is appended to the (unbounded) write buffer: 1.4 KB of calls pin >1 GiB in the gateway,
    for as long as the client keeps the socket open (the stall sweep only looks at half frames)."""
    with serve() as svc:
        sock = _raw_welcome(svc.tcp_address, ReviewEcho.name, "")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        args = msgpack.packb([32 * MiB])
        sock.sendall(b"".join(fr.call_header(i + 1, b"blob", codecs.MSGPACK.flags, 0, len(args)) + args
                              for i in range(40)))
        before = _rss_mib(svc.tcp_process.pid)
        time.sleep(6)
        grown = _rss_mib(svc.tcp_process.pid) - before
        sock.close()
        assert grown < 256, f"{40 * (len(args) + 28)} bytes of calls never read pinned {grown} MiB in the gateway"


# ---- 10. an async TCP client used from a second event loop ---------------------------------------

def test_async_tcp_client_works_in_a_second_event_loop():
    """Over shm an AsyncClient works under any loop; over TCP it keeps the connection (and the
    asyncio.Lock) of the first loop, which asyncio.run() closed: the next call never gets its
    reply (CallTimeout here; a hang without a timeout)."""
    with serve() as svc:
        c = connect_async(ReviewEcho, svc.tcp_address, timeout=3)

        async def main():
            return await c.echo("hi")

        assert asyncio.run(main()) == "hi"
        assert asyncio.run(main()) == "hi"


# ---- 11. the C paths of the usual TCP call (core.call_alone, core.Gateway) ----------------------

def _alone_connection(max_payload=None):
    """A client connection over a socketpair, its far end standing in for the gateway."""
    from speedysvc.tcp import client as tc
    a, b = socket.socketpair()
    opts = tc.ClientOptions(ReviewEcho.name, "127.0.0.1", 1)
    opts.max_payload = max_payload
    conn = tc.BlockingConnection(a, opts, b"")
    conn.last_read = time.monotonic() + 1e6   # (no idle check: nothing stands behind a socketpair)
    return conn, b


def test_call_alone_never_reads_a_socket_opened_after_its_own_was_closed():
    """A call waiting with a timeout while another thread closes its connection must not read
    from whatever socket takes the closed one's descriptor number next: it looks the
    descriptor up again before each system call, as the socket module does (EBADF)."""
    from speedysvc._shmcore import call_alone
    stolen = []
    for _ in range(60):
        conn, far = _alone_connection()
        seen = {}

        def read_on(call_id, n, error, deadline, timeout, conn=conn, seen=seen):
            seen["bytes"] = bytes(conn.parser._buf[:n]) if n else b""
            raise ConnectionError("stop")

        conn._read_on = read_on
        t = threading.Thread(target=lambda: pytest.raises(ConnectionError, call_alone, conn,
                                                          fr.call_header(7, b"echo", 0, 0, 2) + b"hi", 7, 5.0))
        t.start()
        far.recv(100)          # sent: the call waits in poll()
        time.sleep(0.001)
        conn.close()           # shutdown (which wakes it), then close: the number is free
        c, d = socket.socketpair()
        d.sendall(b"NEW-CONNECTION")
        t.join(10)
        assert not t.is_alive()
        stolen += [seen["bytes"]] if seen.get("bytes", b"").startswith(b"NEW") else []
        for s in (far, c, d):
            s.close()
    assert stolen == []


def test_an_exception_as_the_c_path_hands_over_still_drops_the_connection():
    """An exception that becomes pending while the usual call waits in C (a signal handler's,
    here an asynchronous one) is raised as the Python code it hands over to starts, before that
    code's own clean-up is armed: the call's registration and the reader's turn must still
    end (the connection is dropped), or every later call on it would wait forever."""
    import ctypes
    from speedysvc.tcp import client as tc
    from speedysvc._shmcore import call_alone

    class Injected(Exception):
        pass

    conn, far = _alone_connection()
    out = {}

    def caller():
        try:
            out["r"] = call_alone(conn, fr.call_header(7, b"echo", 0, 0, 2) + b"hi", 7, None)
        except BaseException as e:
            out["e"] = e

    t = threading.Thread(target=caller)
    t.start()
    far.recv(1000)
    time.sleep(0.2)          # in recv(), without the GIL
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(t.ident), ctypes.py_object(Injected))
    far.sendall((fr.reply_header(7, 0, 2) + b"ok")[:10])   # half a reply: handed over to _read_on
    t.join(10)
    assert isinstance(out.get("e"), Injected)
    assert conn.reading is False and conn.waiting == {} and conn.broken is not None
    with pytest.raises(tc._Stale):   # the next call finds it broken at once (and reconnects)
        conn.call(b"echo", b"hi", 0, None)
    far.close()


def test_call_alone_errors_stay_what_they_are():
    """An error while the connection's lock is held comes out as itself (not as a SystemError
    from releasing the lock with it pending), and the lock is released; a socket closed under
    an idle connection is left to the Python path, which reconnects."""
    from speedysvc._shmcore import call_alone

    class NoParser:
        def __init__(self):
            self.lock, self.broken, self.reading, self.waiting = threading.Lock(), None, False, {}

    odd = NoParser()
    with pytest.raises(AttributeError):
        call_alone(odd, b"x" * 30, 1, None)
    assert not odd.lock.locked()
    conn, far = _alone_connection()
    conn.last_read = 0.0   # idle: checked with poll() first
    conn.sock.close()
    assert call_alone(conn, b"x" * 30, 1, None) is None
    assert not conn.lock.locked() and conn.reading is False and conn.waiting == {}
    far.close()


def test_size_limits_beyond_64_bits_of_signed_int_work_in_both_c_paths():
    """A max_payload of 2**63 or more ("no limit") is what the Python parser accepts; the C
    paths read it as an unsigned 64-bit size, clamped, instead of failing every call."""
    from speedysvc._shmcore import Gateway, call_alone
    conn, far = _alone_connection(max_payload=2 ** 64)

    def gateway():
        far.recv(100)
        far.sendall(fr.reply_header(7, 0, 2) + b"ok")

    t = threading.Thread(target=gateway)
    t.start()
    assert call_alone(conn, fr.call_header(7, b"echo", 0, 0, 2) + b"hi", 7, 5.0) == (0, b"ok")
    t.join()
    far.close()
    conn.close()

    class Server:
        closing, inflight, max_inflight, _waiting = False, 0, 10, {}

    class NotAttached:
        _channels = None

    parser = fr.FrameParser(2 ** 64, frozenset({fr.CALL}))
    frame = fr.call_header(1, b"echo", 0, 0, 2) + b"hi"
    buf = parser.get_buffer()
    buf[:len(frame)] = frame
    del buf
    # checked, then declined only because there is no attachment to post it on
    assert Gateway(NotAttached(), Server(), {}, codecs.CODEC_SHIFT, codecs.PICKLE.id)(parser, len(frame)) is None
    assert parser.whole_frame(len(frame)) is not None

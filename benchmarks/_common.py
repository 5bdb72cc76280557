"""What bench_shm.py and bench_tcp.py share: CPU pinning, the baseline echo servers
(each a process of its own) with their clients, and the measurements.

A baseline client has ``name``, ``pids`` (its server's processes), ``echo(payload)``
returning the payload it got back, and ``close()``; it may have ``prepare(payload)``
to turn the bytes to send into what its ``echo`` takes.
"""
from __future__ import annotations

import multiprocessing
import os
import socket
import statistics
import struct
import tempfile
import time

MiB = 1 << 20
CPUS = sorted(os.sched_getaffinity(0))
SMALL = 64 << 10          # frames below this go out in one send() where a client coalesces them


def pin(pids, placement, role):
    if placement == "default" or len(CPUS) < 2 and placement == "split":
        cpus = set(CPUS)
    elif placement == "same":
        cpus = {CPUS[0]}
    else:  # split
        cpus = {CPUS[0]} if role == "client" else {CPUS[1]}
    for pid in pids:
        os.sched_setaffinity(pid, cpus)


# ---- a length-prefixed echo over a stream socket (Unix or TCP) -------------------------------

def _recv_exact(sock, view):
    got, n = 0, len(view)
    while got < n:
        r = sock.recv_into(view[got:], n - got)
        if not r:
            raise EOFError
        got += r


def stream_echo_server(listener, coalesce):
    """Echo 4-byte-length-prefixed frames on the first connection ``listener`` accepts."""
    conn, _ = listener.accept()
    listener.close()
    if conn.family in (socket.AF_INET, socket.AF_INET6):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    hdr = bytearray(4)
    buf = bytearray(32 * MiB)
    view = memoryview(buf)
    try:
        while True:
            _recv_exact(conn, memoryview(hdr))
            n = struct.unpack("<I", hdr)[0]
            _recv_exact(conn, view[:n])
            if coalesce and n < SMALL:
                conn.sendall(hdr + view[:n])
            else:
                conn.sendall(hdr)
                conn.sendall(view[:n])
    except (EOFError, ConnectionError):
        pass


class StreamEchoClient:
    """Client of ``stream_echo_server``.  ``coalesce``: send a small frame's length
    and payload in one send() (both ends), as a tuned TCP client would."""

    def __init__(self, family, coalesce=False):
        self.dir = None
        listener = socket.socket(family, socket.SOCK_STREAM)
        if family == socket.AF_UNIX:
            self.dir = tempfile.mkdtemp()
            address = os.path.join(self.dir, "s")
        else:
            address = ("127.0.0.1", 0)
        listener.bind(address)
        listener.listen(1)
        address = listener.getsockname()
        self.coalesce = coalesce
        self.proc = multiprocessing.Process(target=stream_echo_server, args=(listener, coalesce), daemon=True)
        self.proc.start()
        listener.close()
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.connect(address)
        if family != socket.AF_UNIX:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.hdr = bytearray(4)
        self.buf = bytearray(32 * MiB)
        self.pids = [self.proc.pid]

    def echo(self, payload):
        if self.coalesce and len(payload) < SMALL:
            self.sock.sendall(struct.pack("<I", len(payload)) + payload)
        else:
            self.sock.sendall(struct.pack("<I", len(payload)))
            self.sock.sendall(payload)
        _recv_exact(self.sock, memoryview(self.hdr))
        n = struct.unpack("<I", self.hdr)[0]
        view = memoryview(self.buf)[:n]
        _recv_exact(self.sock, view)
        return bytes(view)

    def close(self):
        self.sock.close()
        self.proc.join(5)
        if self.dir:
            try:
                os.unlink(os.path.join(self.dir, "s"))
                os.rmdir(self.dir)
            except OSError:
                pass


class UnixSocketClient(StreamEchoClient):
    name = "Unix socket, 4-byte length prefix"

    def __init__(self):
        super().__init__(socket.AF_UNIX)


class RawTcpClient(StreamEchoClient):
    name = "raw TCP, 4-byte length prefix, TCP_NODELAY"

    def __init__(self):
        super().__init__(socket.AF_INET, coalesce=True)


# ---- pyzmq REQ/REP ---------------------------------------------------------------------------

def zmq_server(addr, conn):
    """Bind a REP socket to ``addr`` (``tcp://127.0.0.1:*`` picks a port), tell
    ``conn`` the endpoint, echo until an empty message."""
    import zmq
    ctx = zmq.Context()
    s = ctx.socket(zmq.REP)
    s.bind(addr)
    conn.send(s.getsockopt_string(zmq.LAST_ENDPOINT))
    conn.close()
    while True:
        msg = s.recv(copy=False)
        if len(msg) == 0:
            s.send(b"")
            break
        s.send(msg, copy=False)


class ZmqClient:
    def __init__(self, transport="ipc"):
        import zmq
        self.dir = None
        if transport == "ipc":
            self.dir = tempfile.mkdtemp()
            addr = f"ipc://{self.dir}/z"
        else:
            addr = "tcp://127.0.0.1:*"
        self.name = f"pyzmq REQ/REP {transport}://"
        parent, child = multiprocessing.Pipe()
        self.proc = multiprocessing.Process(target=zmq_server, args=(addr, child), daemon=True)
        self.proc.start()
        child.close()
        if not parent.poll(10):
            raise RuntimeError("the pyzmq server did not start")
        endpoint = parent.recv()
        parent.close()
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.REQ)
        self.sock.connect(endpoint)
        self.pids = [self.proc.pid]

    def echo(self, payload):
        self.sock.send(payload, copy=len(payload) < 65536)
        return self.sock.recv()

    def close(self):
        self.sock.send(b"")
        self.sock.recv()
        self.sock.close()
        self.ctx.term()
        self.proc.join(5)
        if self.dir:
            try:
                os.unlink(os.path.join(self.dir, "z"))
                os.rmdir(self.dir)
            except OSError:
                pass


# ---- measurements ---------------------------------------------------------------------------

def prepare(client, payload):
    return client.prepare(payload) if hasattr(client, "prepare") else payload


def round_trips(client, n):
    """Median and p99 round trip of a 64-byte echo, in µs, over ``n`` calls (after a warm-up)."""
    payload = prepare(client, b"x" * 64)
    # warm up for a while, not a number of calls: the previous row's processes are still
    # exiting and the scheduler is still placing this pair
    warm_until = time.perf_counter() + (0.1 if n < 5000 else 0.5)
    while time.perf_counter() < warm_until:
        client.echo(payload)
    times = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t = clock()
        client.echo(payload)
        times.append(clock() - t)
    times.sort()
    return times[len(times) // 2] / 1000, times[int(len(times) * 0.99)] / 1000


def throughput(client, size, seconds, payload=None):
    """MB/s each way of echoing ``size`` bytes (random unless ``payload`` is given),
    from the median call over ``seconds``."""
    payload = prepare(client, os.urandom(size) if payload is None else payload)
    assert client.echo(payload) == payload
    calls, start = 0, time.perf_counter()
    samples = []
    while time.perf_counter() - start < seconds or calls < 3:
        t = time.perf_counter()
        client.echo(payload)
        samples.append(time.perf_counter() - t)
        calls += 1
    return size / statistics.median(samples) / 1e6


# ---- the seed's hand-written client against the generated method ------------------------------

TARGET_SEED_PATH = 1.2   # the seed-style client's 64 B call: at most this many times the generated one's


def verdict(ok):
    return "met" if ok else "**not met**"


def seed_style_client(server_cls, method_name):
    """A client written as the seed README writes one: a ClientMethodsBase subclass whose
    method calls ``self.send(Server.method, [data])``."""
    from speedysvc import ClientMethodsBase

    method = getattr(server_cls, method_name)

    class SeedClient(ClientMethodsBase):
        def echo(self, data):
            return self.send(method, [data])

    return SeedClient


def seed_path(connect_client, server_cls, codecs, calls, rounds):
    """Per codec: the median 64 B round trip (µs) through the generated method and through a
    seed-style client on the same connection, measured in interleaved rounds; and their ratio."""
    rows = []
    for codec in codecs:
        name = f"echo_{codec}"
        client = connect_client()
        try:
            seed = seed_style_client(server_cls, name)(client)

            class Via:
                def __init__(self, fn):
                    self.echo = fn

                def prepare(self, payload):
                    return payload.decode("latin-1") if codec == "json" else payload

            generated, handwritten = Via(getattr(client, name)), Via(seed.echo)
            gen, hand = [], []
            for _ in range(rounds):
                gen.append(round_trips(generated, calls)[0])
                hand.append(round_trips(handwritten, calls)[0])
            g, h = statistics.median(gen), statistics.median(hand)
            rows.append({"codec": codec, "generated": g, "seed": h, "ratio": h / g})
        finally:
            client.close()
    return rows


def print_seed_path(rows, transport):
    print(f"### The seed's client path over {transport}: `ClientMethodsBase` + `self.send(...)` "
          f"against the generated method, 64 B\n")
    print("| codec | generated µs | seed-style µs | ratio | ask | verdict |")
    print("|---|---:|---:|---:|---|---|")
    for r in rows:
        print(f"| {r['codec']} | {r['generated']:.2f} | {r['seed']:.2f} | {r['ratio']:.2f}× | "
              f"≤ {TARGET_SEED_PATH:g}× | {verdict(r['ratio'] <= TARGET_SEED_PATH)} |")
    print(flush=True)

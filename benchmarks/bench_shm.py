"""speedysvc over shared memory against the usual ways two processes talk, measured in one run.

    python benchmarks/bench_shm.py [--quick] [--placements default,same,split]

For each transport: the round trip of a 64-byte echo (median and p99, in µs),
the echo throughput at 1 MiB and 16 MiB (MB/s each way), and ratios against a
raw Unix-socket echo with a 4-byte length prefix measured in the same run.
Placement matters as much as the transport on a small VM, so each row is
measured with the client and the server free to move ("default"), pinned to the
same CPU ("same") and pinned to different CPUs ("split").  Finally the CPU an
idle service uses with a connected client.  Prints Markdown tables.
"""
from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import os
import socket
import statistics
import struct
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import psutil  # noqa: E402

from echo_service import BenchEcho  # noqa: E402
from speedysvc import LocalService, connect  # noqa: E402

MiB = 1 << 20
CPUS = sorted(os.sched_getaffinity(0))


def pin(pids, placement, role):
    if placement == "default" or len(CPUS) < 2 and placement == "split":
        cpus = set(CPUS)
    elif placement == "same":
        cpus = {CPUS[0]}
    else:  # split
        cpus = {CPUS[0]} if role == "client" else {CPUS[1]}
    for pid in pids:
        os.sched_setaffinity(pid, cpus)


# ---- baselines: a server process each, echoing what it receives ------------------------------

def _recv_exact(sock, view):
    got, n = 0, len(view)
    while got < n:
        r = sock.recv_into(view[got:], n - got)
        if not r:
            raise EOFError
        got += r


def uds_server(path, ready):
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    ready.set()
    conn, _ = srv.accept()
    hdr = bytearray(4)
    buf = bytearray(32 * MiB)
    view = memoryview(buf)
    try:
        while True:
            _recv_exact(conn, memoryview(hdr))
            n = struct.unpack("<I", hdr)[0]
            _recv_exact(conn, view[:n])
            conn.sendall(hdr)
            conn.sendall(view[:n])
    except (EOFError, ConnectionError):
        pass


class UnixSocketClient:
    name = "Unix socket, 4-byte length prefix"

    def __init__(self):
        self.dir = tempfile.mkdtemp()
        path = os.path.join(self.dir, "s")
        ready = multiprocessing.Event()
        self.proc = multiprocessing.Process(target=uds_server, args=(path, ready), daemon=True)
        self.proc.start()
        ready.wait(10)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.hdr = bytearray(4)
        self.buf = bytearray(32 * MiB)
        self.pids = [self.proc.pid]

    def echo(self, payload):
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


def pipe_server(conn):
    try:
        while True:
            conn.send_bytes(conn.recv_bytes())
    except EOFError:
        pass


class PipeClient:
    name = "multiprocessing.Pipe"

    def __init__(self):
        self.conn, child = multiprocessing.Pipe()
        self.proc = multiprocessing.Process(target=pipe_server, args=(child,), daemon=True)
        self.proc.start()
        child.close()
        self.pids = [self.proc.pid]

    def echo(self, payload):
        self.conn.send_bytes(payload)
        return self.conn.recv_bytes()

    def close(self):
        self.conn.close()
        self.proc.join(5)


def zmq_server(addr, ready):
    import zmq
    ctx = zmq.Context()
    s = ctx.socket(zmq.REP)
    s.bind(addr)
    ready.set()
    while True:
        msg = s.recv(copy=False)
        if len(msg) == 0:
            s.send(b"")
            break
        s.send(msg, copy=False)


class ZmqClient:
    name = "pyzmq REQ/REP ipc://"

    def __init__(self):
        import zmq
        self.dir = tempfile.mkdtemp()
        addr = f"ipc://{self.dir}/z"
        ready = multiprocessing.Event()
        self.proc = multiprocessing.Process(target=zmq_server, args=(addr, ready), daemon=True)
        self.proc.start()
        ready.wait(10)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.REQ)
        self.sock.connect(addr)
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


class SpeedysvcClient:
    def __init__(self, codec, service):
        self.codec = codec
        self.name = f"speedysvc shm, {codec}"
        self.client = connect(BenchEcho)
        self.method = getattr(self.client, f"echo_{codec}")
        self.pids = service.pids

    def prepare(self, payload):
        return payload.decode("latin-1") if self.codec == "json" else payload

    def echo(self, payload):
        return self.method(payload)

    def close(self):
        self.client.close()


# ---- measurements ---------------------------------------------------------------------------

def round_trips(client, n):
    payload = prepare(client, b"x" * 64)
    for _ in range(min(2000, n)):
        client.echo(payload)
    times = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t = clock()
        client.echo(payload)
        times.append(clock() - t)
    times.sort()
    return times[len(times) // 2] / 1000, times[int(len(times) * 0.99)] / 1000


def prepare(client, payload):
    return client.prepare(payload) if hasattr(client, "prepare") else payload


def throughput(client, size, seconds):
    payload = prepare(client, os.urandom(size))
    assert client.echo(payload) == payload
    calls, start = 0, time.perf_counter()
    samples = []
    while time.perf_counter() - start < seconds or calls < 3:
        t = time.perf_counter()
        client.echo(payload)
        samples.append(time.perf_counter() - t)
        calls += 1
    return size / statistics.median(samples) / 1e6


def measure(make, placement, args):
    client = make()
    try:
        pin(client.pids, placement, "server")
        pin([0], placement, "client")
        med, p99 = round_trips(client, args.calls)
        mb1 = throughput(client, MiB, args.seconds)
        mb16 = throughput(client, 16 * MiB, args.seconds * 2)
        return {"name": client.name, "median": med, "p99": p99, "1MiB": mb1, "16MiB": mb16}
    finally:
        pin([0], "default", "client")
        client.close()


def idle_cpu(service, seconds=3.0):
    with connect(BenchEcho) as c:
        for i in range(1000):
            c.echo_msgpack(i)
        procs = [psutil.Process(p) for p in service.pids]
        time.sleep(0.5)
        before = [sum(p.cpu_times()[:2]) for p in procs]
        mine = time.process_time()
        time.sleep(seconds)
        workers = sum(sum(p.cpu_times()[:2]) - b for p, b in zip(procs, before)) / seconds
        client = (time.process_time() - mine) / seconds
    return workers * 100, client * 100


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls, for a smoke run")
    parser.add_argument("--placements", default="default,same,split")
    parser.add_argument("--codecs", default="msgpack,raw,json,pickle")
    args = parser.parse_args()
    args.calls = 3000 if args.quick else 20000
    args.seconds = 0.3 if args.quick else 1.0
    multiprocessing.set_start_method("fork")

    baselines = [UnixSocketClient, PipeClient]
    if importlib.util.find_spec("zmq"):
        baselines.append(ZmqClient)
    else:
        print("(pyzmq not installed: its row is skipped)")

    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}\n")
    with LocalService(BenchEcho, workers=1) as service:
        for placement in args.placements.split(","):
            rows = [measure(b, placement, args) for b in baselines]
            for codec in args.codecs.split(","):
                rows.append(measure(lambda: SpeedysvcClient(codec, service), placement, args))
            uds = rows[0]
            print(f"### placement: {placement}\n")
            print("| transport | 64 B median µs | p99 µs | × faster than Unix socket | "
                  "1 MiB MB/s | 16 MiB MB/s | 16 MiB × Unix socket |")
            print("|---|---:|---:|---:|---:|---:|---:|")
            for r in rows:
                print(f"| {r['name']} | {r['median']:.1f} | {r['p99']:.1f} | {uds['median'] / r['median']:.1f} | "
                      f"{r['1MiB']:,.0f} | {r['16MiB']:,.0f} | {r['16MiB'] / uds['16MiB']:.2f} |")
            print(flush=True)
        workers, client = idle_cpu(service)
        print(f"Idle service (1 worker) with a connected client: worker {workers:.2f} % of a core, "
              f"client {client:.2f} %")


if __name__ == "__main__":
    main()

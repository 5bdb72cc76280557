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
import functools
import importlib.util
import multiprocessing
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import psutil  # noqa: E402

from _common import (MiB, UnixSocketClient, ZmqClient, pin, print_seed_path, round_trips, seed_path,  # noqa: E402
                     throughput, verdict)
from echo_service import BenchEcho  # noqa: E402
from speedysvc import LocalService, connect  # noqa: E402


# ---- baselines: a server process each, echoing what it receives (the others are in _common) --

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


TARGET_SMALL = 20.0          # 64 B generated msgpack call: at least this many times faster than the socket
TARGET_MSGPACK_16MIB = 1.0   # 16 MiB bytes through @msgpack_method: at least the socket's echo throughput
TARGET_IDLE = 1.0            # % of a core an idle worker with a connected client may use


# ---- measurements (round trips and throughput: _common) ------------------------------------

def measure_placement(makers, placement, args):
    """The rows of one placement.  The 64 B round trips are measured in ``args.rounds`` rounds,
    each going through every transport in turn, and each figure is the median over the rounds:
    this VM's speed drifts over seconds, and interleaving keeps a slow spell from landing on
    one row only.  Throughput: one measurement per transport."""
    clients = []
    try:
        for make in makers:
            clients.append(make())
        trips = {id(c): [] for c in clients}
        for _ in range(args.rounds):
            for c in clients:
                pin(c.pids, placement, "server")
                pin([0], placement, "client")
                try:
                    trips[id(c)].append(round_trips(c, args.calls))
                finally:
                    pin([0], "default", "client")
        rows = []
        for c in clients:
            pin(c.pids, placement, "server")
            pin([0], placement, "client")
            try:
                rows.append({"name": c.name,
                             "median": statistics.median(t[0] for t in trips[id(c)]),
                             "p99": statistics.median(t[1] for t in trips[id(c)]),
                             "1MiB": throughput(c, MiB, args.seconds),
                             "16MiB": throughput(c, 16 * MiB, args.seconds * 2)})
            finally:
                pin([0], "default", "client")
        return rows
    finally:
        for c in clients:
            c.close()


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
    args.rounds = 1 if args.quick else 3
    args.seconds = 0.3 if args.quick else 1.0
    multiprocessing.set_start_method("fork")

    baselines = [UnixSocketClient, PipeClient]
    if importlib.util.find_spec("zmq"):
        baselines.append(ZmqClient)
    else:
        print("(pyzmq not installed: its row is skipped)")

    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}\n")
    asks = None
    with LocalService(BenchEcho, workers=1) as service:
        for placement in args.placements.split(","):
            makers = list(baselines) + [functools.partial(SpeedysvcClient, codec, service)
                                        for codec in args.codecs.split(",")]
            rows = measure_placement(makers, placement, args)
            uds = rows[0]
            print(f"### placement: {placement}\n")
            if args.rounds > 1:
                print(f"(64 B figures: the median of {args.rounds} interleaved rounds of {args.calls:,} calls)\n")
            print("| transport | 64 B median µs | p99 µs | × faster than Unix socket | "
                  "1 MiB MB/s | 16 MiB MB/s | 16 MiB × Unix socket |")
            print("|---|---:|---:|---:|---:|---:|---:|")
            for r in rows:
                print(f"| {r['name']} | {r['median']:.1f} | {r['p99']:.1f} | {uds['median'] / r['median']:.1f} | "
                      f"{r['1MiB']:,.0f} | {r['16MiB']:,.0f} | {r['16MiB'] / uds['16MiB']:.2f} |")
            print(flush=True)
            if placement == "default":
                asks = rows
        pin(service.pids, "default", "server")   # (the placements above left it pinned)
        print_seed_path(seed_path(lambda: connect(BenchEcho), BenchEcho, args.codecs.split(","),
                                  args.calls, args.rounds), "shared memory")
        workers, client = idle_cpu(service, 3.0 if args.quick else 10.0)   # CPU time comes in 10 ms ticks
        print(f"Idle service (1 worker) with a connected client: worker {workers:.2f} % of a core, "
              f"client {client:.2f} %\n")
    if asks is not None:
        print_asks(asks, workers)


def print_asks(rows, idle_worker):
    """The asks on the default placement's rows, each with its verdict."""
    uds = rows[0]
    by_name = {r["name"]: r for r in rows}
    print("### Asks (default placement)\n")
    print("| ask | measured | verdict |")
    print("|---|---:|---|")
    msgpack = by_name.get("speedysvc shm, msgpack")
    if msgpack is not None:
        x = uds["median"] / msgpack["median"]
        print(f"| 64 B msgpack call ≥ {TARGET_SMALL:g}× faster than the Unix socket | {x:.1f}× | "
              f"{verdict(x >= TARGET_SMALL)} |")
        x = msgpack["16MiB"] / uds["16MiB"]
        print(f"| 16 MiB bytes through msgpack ≥ {TARGET_MSGPACK_16MIB:g}× the Unix socket's echo | {x:.2f}× "
              f"({msgpack['16MiB']:,.0f} vs {uds['16MiB']:,.0f} MB/s) | {verdict(x >= TARGET_MSGPACK_16MIB)} |")
    print(f"| idle worker with a connected client < {TARGET_IDLE:g} % of a core | {idle_worker:.2f} % | "
          f"{verdict(idle_worker < TARGET_IDLE)} |")
    print()


if __name__ == "__main__":
    main()

"""Many TCP callers at once (bench_tcp.py's load part): C caller processes x W workers, 64 B echo,
total calls per second, against a pre-forked raw TCP echo server with W processes and a grpcio
server with a pool of 2W threads, each measured in the same run.

Each caller process connects, warms up, and calls without pause for the window; the figure is
the sum over callers of the calls finished within it (bench_load.run_callers).  grpcio callers
import grpc only after the fork (a fork after gRPC has started is unsafe)."""
from __future__ import annotations

import multiprocessing
import os
import socket
import struct
import time

from bench_load import PAYLOAD, _count_calls, run_callers
from echo_service import BenchEcho
from speedysvc import LocalService, connect

GRPC_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def speedysvc_caller(address, start_at, seconds, out):
    with connect(BenchEcho, address, timeout=30) as c:
        echo = c.echo_msgpack
        _count_calls(lambda: echo(PAYLOAD), start_at, seconds, out)


def raw_caller(port, start_at, seconds, out):
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    frame = struct.pack("<I", len(PAYLOAD)) + PAYLOAD

    def call():
        s.sendall(frame)
        got = 0
        while got < len(frame):
            got += len(s.recv(len(frame) - got))
    _count_calls(call, start_at, seconds, out)
    s.close()


def raw_server(listener):
    """One of W pre-forked processes sharing one listening socket: accepts connections and
    echoes each 4-byte-length-prefixed frame (blocking I/O, a selector over its connections)."""
    import selectors
    sel = selectors.DefaultSelector()
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            if key.fileobj is listener:
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    continue
                conn.setblocking(True)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sel.register(conn, selectors.EVENT_READ)
            else:
                conn = key.fileobj
                hdr = conn.recv(4, socket.MSG_WAITALL)
                if len(hdr) < 4:
                    sel.unregister(conn)
                    conn.close()
                    continue
                n = struct.unpack("<I", hdr)[0]
                conn.sendall(hdr + conn.recv(n, socket.MSG_WAITALL))


def _grpc_echo(request, context):
    return request


def grpc_server(threads, conn):
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    server = grpc.server(ThreadPoolExecutor(max_workers=threads), options=GRPC_OPTIONS)
    handler = grpc.method_handlers_generic_handler("bench.Echo", {
        "Echo": grpc.unary_unary_rpc_method_handler(_grpc_echo)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    conn.send(port)
    try:
        conn.recv()
    except EOFError:
        pass
    server.stop(0).wait()


def grpc_caller(port, start_at, seconds, out):
    import grpc
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS)
    grpc.channel_ready_future(channel).result(timeout=30)
    call = channel.unary_unary("/bench.Echo/Echo")
    _count_calls(lambda: call(PAYLOAD), start_at, seconds, out)
    channel.close()


def measure_speedysvc(callers, workers, seconds):
    with LocalService(BenchEcho, workers=workers, tcp="127.0.0.1:0") as service:
        return run_callers(speedysvc_caller, (service.tcp_address,), callers, seconds)


def measure_raw(callers, workers, seconds):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    port = listener.getsockname()[1]
    servers = [multiprocessing.Process(target=raw_server, args=(listener,), daemon=True) for _ in range(workers)]
    for p in servers:
        p.start()
    listener.close()
    try:
        return run_callers(raw_caller, (port,), callers, seconds)
    finally:
        for p in servers:
            p.kill()
            p.join(5)


def measure_grpc(callers, workers, seconds):
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=grpc_server, args=(2 * workers, child), daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(60):
            raise RuntimeError("the grpcio server did not start")
        return run_callers(grpc_caller, (parent.recv(),), callers, seconds)
    finally:
        parent.close()
        proc.join(10)
        if proc.is_alive():
            proc.kill()


def measure_shapes(shapes, seconds, rounds, have_grpc, progress):
    """{shape: {"speedysvc": [...], "raw": [...], "grpc": [...]}}: calls/s per round, interleaved."""
    results = {shape: {"speedysvc": [], "raw": [], "grpc": []} for shape in shapes}
    for rnd in range(rounds):
        for c, w in shapes:
            progress(f"round {rnd + 1}/{rounds}: {c} callers x {w} workers")
            r = results[c, w]
            r["speedysvc"].append(measure_speedysvc(c, w, seconds))
            r["raw"].append(measure_raw(c, w, seconds))
            if have_grpc:
                r["grpc"].append(measure_grpc(c, w, seconds))
            time.sleep(0.2)
    return results


def measure_pinned(callers, workers, seconds, rounds, progress, cpu=0):
    """{"speedysvc": [...], "raw": [...]}: calls/s with every process of the measure (callers,
    workers or raw servers, and this one) on one CPU, in interleaved rounds.  Where each process
    runs then no longer varies (on this VM a wake-up across CPUs costs ~30 µs, and which caller
    shares a CPU with which server moves the default figures by half), so the ratio shows what
    a call costs in CPU against the raw echo's.  (Children inherit the affinity.)"""
    results = {"speedysvc": [], "raw": []}
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        for rnd in range(rounds):
            progress(f"round {rnd + 1}/{rounds}: {callers} callers x {workers} workers on CPU {cpu}")
            results["speedysvc"].append(measure_speedysvc(callers, workers, seconds))
            results["raw"].append(measure_raw(callers, workers, seconds))
    finally:
        os.sched_setaffinity(0, before)
    return results

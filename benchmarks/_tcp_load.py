"""Many TCP callers at once (bench_tcp.py's load part): C caller processes x W workers, 64 B echo,
total calls per second, against a pre-forked raw TCP echo server with W processes and a grpcio
server with a pool of 2W threads, all measured in the same run in interleaved windows
(measure_shapes, below); measure_pinned measures one shape so with every process on one CPU.
grpcio callers import grpc only after the fork (a fork after gRPC has started is unsafe)."""
from __future__ import annotations

import contextlib
import mmap
import multiprocessing
import os
import random
import socket
import struct
import time

from bench_load import PAYLOAD, framed_echo
from echo_service import BenchEcho, BenchEchoAgain
from speedysvc import LocalService, connect

GRPC_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def raw_server(listener):
    """One of W pre-forked processes, each with a listener of its own on the port
    (``_start_raw``): accepts connections and echoes each 4-byte-length-prefixed frame (blocking
    I/O, a selector over its connections)."""
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


# ---- every shape in interleaved windows ----------------------------------------------------
#
# On this VM a shape's calls/s swings by half between runs of a few seconds (where the scheduler
# puts which caller and which server, and the host's own load, both of which move over seconds).
# Measured one after the other, two shapes or two servers meet different luck.  So every server
# runs at once, each with the most callers any shape asks of it, and the run is a sequence of
# short windows: in each, one server's first C callers call and every other caller waits in a
# read of its own pipe (a blocked process costs nothing).  The windows visit every (shape,
# server) pair once per round, in a shuffled order, for several rounds; a figure is the calls
# made in all its windows over their time.  Slow stretches then fall on every figure alike.
# Which server process serves which connection is drawn once per run, by the same SO_REUSEPORT
# hash for speedysvc's workers and the raw server's processes (each listens on the port).

SETTLE = 0.1   # s after a window's callers wake before it counts (they find their CPUs)
DRAIN = 0.05   # s after they stop before the next window begins


class _Board:
    """Per caller slot, in shared memory inherited across fork: calls so far, its switch (1 call,
    0 wait, -1 leave) and ready (connected, one call made); and a pipe it waits on while its
    switch is 0.  A switch to 1 or -1 writes one byte to the pipe, which never blocks this side
    (a caller that died cannot hold it up, as a waiter on a multiprocessing.Event could)."""

    def __init__(self, slots):
        self.slots = slots
        self._mem = mmap.mmap(-1, 8 * 3 * max(slots, 1))
        self.cells = memoryview(self._mem).cast("q")
        self.pipes = [os.pipe() for _ in range(slots)]

    def switch(self, slots, to):
        for i in slots:
            self.cells[self.slots + i] = to
            if to:
                os.write(self.pipes[i][1], b"x")

    def calls(self, i):
        return self.cells[i]

    def ready(self, slots):
        return all(self.cells[2 * self.slots + i] for i in slots)

    def wait(self, slot):
        """In the caller: until its switch is not 0; True to call, False to leave."""
        switch = self.slots + slot
        while self.cells[switch] == 0:
            os.read(self.pipes[slot][0], 64)   # (bytes of earlier switches just loop)
        return self.cells[switch] > 0

    def close(self):
        for r, w in self.pipes:
            os.close(r)
            os.close(w)


def _speedysvc_call(arg):
    cls, address = arg
    c = connect(cls, address, timeout=30)
    echo = c.echo_msgpack
    return lambda: echo(PAYLOAD), c.close


def _raw_call(port):
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return framed_echo(s), s.close


def _grpc_call(port):
    import grpc   # after the fork
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS)
    grpc.channel_ready_future(channel).result(timeout=30)
    call = channel.unary_unary("/bench.Echo/Echo")
    return lambda: call(PAYLOAD), channel.close


def _window_caller(board, slot, make, arg):
    call, close = make(arg)
    call()
    cells = board.cells
    cells[2 * board.slots + slot] = 1
    n = 0
    while board.wait(slot):
        call()
        n += 1
        cells[slot] = n
    close()


def _start_raw(workers, stack):
    """W processes, each accepting on a listener of its own on one port (SO_REUSEPORT: the
    kernel spreads connections as it does over the workers that serve TCP)."""
    listeners = []
    for _ in range(workers):
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind(("127.0.0.1", listeners[0].getsockname()[1] if listeners else 0))
        listener.listen(1024)
        listeners.append(listener)
    port = listeners[0].getsockname()[1]
    servers = [multiprocessing.Process(target=raw_server, args=(listener,), daemon=True) for listener in listeners]
    for p in servers:
        p.start()
    for listener in listeners:
        listener.close()

    def stop():
        for p in servers:
            p.kill()
            p.join(5)
    stack.callback(stop)
    return port


def _start_grpc(workers, stack):
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=grpc_server, args=(2 * workers, child), daemon=True)
    proc.start()
    child.close()

    def stop():
        parent.close()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    stack.callback(stop)
    if not parent.poll(60):
        raise RuntimeError("the grpcio server did not start")
    return parent.recv()


def measure_shapes(shapes, window, rounds, have_grpc, progress, seed=None):
    """{shape: {"speedysvc": figure, "raw": figure, "grpc": figure or None}}, each figure
    {"rate": calls/s over all its windows, "windows": [calls/s of each window]}; and the seed of
    the windows' order.  A caller that dies, or makes no call in a window, ends it (RuntimeError)."""
    kinds = ["speedysvc", "raw"] + (["grpc"] if have_grpc else [])
    most = {}
    for c, w in shapes:
        most[w] = max(most.get(w, 0), c)
    if len(most) > 2:
        raise ValueError("at most two worker counts at once (one service each)")
    board = _Board(sum(most.values()) * len(kinds))
    slots, procs, targets = {}, {}, {}
    with contextlib.ExitStack() as stack:
        stack.callback(board.close)
        progress(f"starting servers and {board.slots} callers")
        for (w, n), cls in zip(most.items(), (BenchEcho, BenchEchoAgain)):
            service = stack.enter_context(LocalService(cls, workers=w, tcp="127.0.0.1:0"))
            targets[w, "speedysvc"] = _speedysvc_call, (cls, service.tcp_address)
            targets[w, "raw"] = _raw_call, _start_raw(w, stack)
            if have_grpc:
                targets[w, "grpc"] = _grpc_call, _start_grpc(w, stack)

        def leave():   # (before the servers stop: callback order)
            board.switch(range(board.slots), -1)
            deadline = time.monotonic() + 10
            for p in procs.values():
                p.join(max(0.0, deadline - time.monotonic()))
                if p.is_alive():
                    p.kill()
                    p.join(5)
        stack.callback(leave)
        for (w, kind), (make, arg) in targets.items():
            slots[w, kind] = list(range(len(procs), len(procs) + most[w]))
            for slot in slots[w, kind]:
                procs[slot] = multiprocessing.Process(target=_window_caller, args=(board, slot, make, arg),
                                                      daemon=True)
                procs[slot].start()
        deadline = time.monotonic() + 120
        while not board.ready(range(board.slots)):
            if time.monotonic() > deadline or any(p.exitcode is not None for p in procs.values()):
                raise RuntimeError("a caller did not connect")
            time.sleep(0.05)

        def counts(active):
            before = time.perf_counter()
            got = [board.calls(i) for i in active]
            return got, (before + time.perf_counter()) / 2

        results = {shape: {k: {"calls": 0, "seconds": 0.0, "windows": []} for k in kinds} for shape in shapes}
        pairs = [(shape, kind) for shape in shapes for kind in kinds]
        seed = random.randrange(1 << 32) if seed is None else seed
        order = random.Random(seed)
        for rnd in range(rounds + 1):     # round 0 visits every pair once, not counted
            progress(f"round {rnd}/{rounds} of {len(pairs)} windows" + (" (warm-up)" if not rnd else ""))
            order.shuffle(pairs)
            for (c, w), kind in pairs:
                active = slots[w, kind][:c]
                board.switch(active, 1)
                time.sleep(SETTLE)
                n0, t0 = counts(active)
                time.sleep(window)
                n1, t1 = counts(active)
                board.switch(active, 0)
                stuck = [i for i, a, b in zip(active, n0, n1) if b <= a or procs[i].exitcode is not None]
                if stuck:
                    raise RuntimeError(f"{kind} caller(s) {stuck} made no call in a {c}x{w} window "
                                       f"(exit codes: {[procs[i].exitcode for i in stuck]})")
                time.sleep(DRAIN)
                if rnd:
                    r = results[c, w][kind]
                    r["calls"] += sum(n1) - sum(n0)
                    r["seconds"] += t1 - t0
                    r["windows"].append((sum(n1) - sum(n0)) / (t1 - t0))
    figures = {shape: {k: {"rate": r[k]["calls"] / r[k]["seconds"], "windows": r[k]["windows"]} if k in r else None
                       for k in ("speedysvc", "raw", "grpc")} for shape, r in results.items()}
    return figures, seed


def measure_pinned(callers, workers, window, rounds, progress, cpu=0):
    """``{"speedysvc": calls/s, "raw": calls/s}`` for one shape with every process of the measure
    (callers, workers or raw servers, and this one) on one CPU, in the same interleaved windows.
    Where each process runs then no longer varies (on this VM a wake-up across CPUs costs ~30 µs,
    and which caller shares a CPU with which server moves the default figures by half), so the
    ratio shows what a call costs in CPU against the raw echo's.  (Children inherit the affinity.)"""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        figures, _ = measure_shapes([(callers, workers)], window, rounds, False,
                                    lambda what: progress(f"on CPU {cpu}: {what}"))
    finally:
        os.sched_setaffinity(0, before)
    return {k: f["rate"] for k, f in figures[callers, workers].items() if f}

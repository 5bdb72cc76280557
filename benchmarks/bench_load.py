"""Many callers on few cores: C caller processes calling a service of W workers at once, 64 B
msgpack echo, total calls per second, against a pre-forked Unix-socket echo server with W
processes and, as the floor, C client/server pairs in plain C (floor.c), in one run.

    python benchmarks/bench_load.py [--quick] [--shapes 1x1,2x2,8x4,16x2]

Each caller process connects, warms up, and calls without pause for the measured seconds; the
figure is the sum over callers of the calls finished within the window.  Shapes are measured in
interleaved rounds (this VM's speed drifts over seconds) and the median of the rounds is shown.
Prints each ask with its verdict.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import verdict  # noqa: E402
from echo_service import BenchEcho  # noqa: E402
from speedysvc import LocalService, connect  # noqa: E402

TARGET_8X4 = 2.0     # 8 callers x 4 workers: at least this many times the socket server's calls/s
TARGET_1X1 = 20.0    # one caller, one worker: the lead of a single call (bench_shm's 64 B ask)
HERE = os.path.dirname(os.path.abspath(__file__))
PAYLOAD = b"x" * 64


def _count_calls(call, start_at, seconds, out):
    """Call until start_at + seconds (after a warm-up until start_at); put the calls made in the window."""
    while time.time() < start_at:
        call()
    n, end = 0, start_at + seconds
    while True:
        call()
        n += 1
        if not n & 63 and time.time() >= end:
            break
    out.put(n)


def speedysvc_caller(start_at, seconds, out):
    with connect(BenchEcho, timeout=30) as c:
        echo = c.echo_msgpack
        _count_calls(lambda: echo(PAYLOAD), start_at, seconds, out)


def framed_echo(s):
    """One call of the raw baselines over the connected socket ``s``: PAYLOAD after a 4-byte
    length, sent, and its echo read back whole."""
    frame = struct.pack("<I", len(PAYLOAD)) + PAYLOAD

    def call():
        s.sendall(frame)
        got = 0
        while got < len(frame):
            got += len(s.recv(len(frame) - got))
    return call


def socket_caller(path, start_at, seconds, out):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    _count_calls(framed_echo(s), start_at, seconds, out)
    s.close()


def socket_server(listener):
    """One of W pre-forked processes: accepts connections and echoes each in turn (a process
    per connection at a time, as a pre-forking server does with blocking I/O)."""
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


def run_callers(target, args, callers, seconds):
    out = multiprocessing.Queue()
    start_at = time.time() + 0.5 + 0.02 * callers
    procs = [multiprocessing.Process(target=target, args=args + (start_at, seconds, out)) for _ in range(callers)]
    for p in procs:
        p.start()
    total = sum(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    return total / seconds


def measure_speedysvc(callers, workers, seconds):
    with LocalService(BenchEcho, workers=workers):
        return run_callers(speedysvc_caller, (), callers, seconds)


def measure_socket(callers, workers, seconds):
    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "s")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(256)
    servers = [multiprocessing.Process(target=socket_server, args=(listener,), daemon=True) for _ in range(workers)]
    for p in servers:
        p.start()
    listener.close()
    try:
        return run_callers(socket_caller, (path,), callers, seconds)
    finally:
        for p in servers:
            p.kill()
            p.join(5)
        shutil.rmtree(folder, ignore_errors=True)


def build_floor() -> str | None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    exe = os.path.join(tempfile.mkdtemp(), "floor")
    subprocess.run([cc, "-O2", "-o", exe, os.path.join(HERE, "floor.c")], check=True)
    return exe


def measure_floor(exe, pairs, seconds):
    return float(subprocess.run([exe, str(pairs), str(seconds)], capture_output=True, text=True,
                                check=True).stdout)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter windows, one round")
    parser.add_argument("--shapes", default="1x1,2x2,8x4,16x2")
    args = parser.parse_args()
    multiprocessing.set_start_method("fork")
    seconds = 1.0 if args.quick else 2.0
    rounds = 1 if args.quick else 3
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    floor = build_floor()
    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}, "
          f"{seconds:g} s windows, {rounds} round(s)\n")
    results = {shape: {"speedysvc": [], "socket": [], "floor": []} for shape in shapes}
    for _ in range(rounds):
        for c, w in shapes:
            r = results[(c, w)]
            r["speedysvc"].append(measure_speedysvc(c, w, seconds))
            r["socket"].append(measure_socket(c, w, seconds))
            if floor:
                r["floor"].append(measure_floor(floor, c, seconds))
    print("| callers x workers | speedysvc calls/s | pre-forked Unix socket calls/s | × socket | "
          "C floor: C pairs, calls/s | speedysvc / floor |")
    print("|---|---:|---:|---:|---:|---:|")
    med = {}
    for shape in shapes:
        r = {k: statistics.median(v) if v else None for k, v in results[shape].items()}
        med[shape] = r
        fl = f"{r['floor']:,.0f}" if r["floor"] else "(no C compiler)"
        of = f"{r['speedysvc'] / r['floor']:.2f}" if r["floor"] else ""
        print(f"| {shape[0]}x{shape[1]} | {r['speedysvc']:,.0f} | {r['socket']:,.0f} | "
              f"{r['speedysvc'] / r['socket']:.2f} | {fl} | {of} |")
    print()
    print("### Asks\n")
    print("| ask | measured | verdict |")
    print("|---|---:|---|")
    if (8, 4) in med:
        x = med[8, 4]["speedysvc"] / med[8, 4]["socket"]
        print(f"| 8 callers x 4 workers ≥ {TARGET_8X4:g}× the socket server | {x:.2f}× | {verdict(x >= TARGET_8X4)} |")
    if (1, 1) in med:
        x = med[1, 1]["speedysvc"] / med[1, 1]["socket"]
        print(f"| 1 caller x 1 worker ≥ {TARGET_1X1:g}× the socket (the single call's lead) | {x:.2f}× | "
              f"{verdict(x >= TARGET_1X1)} |")


if __name__ == "__main__":
    main()

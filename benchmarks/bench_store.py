"""The cost of the manager's store: the manager's CPU while a client makes ~10,000 calls/s of which
100/s log one record each, with the store on and with it off (``[store] enabled``), in rounds
that alternate (this machine's speed drifts).

    python benchmarks/bench_store.py [--seconds 15] [--rounds 2]

The manager's CPU is its process's (every thread: the event loop, the store's writer, the
executor's readers) over the measured window, after a warm-up.  Prints each round, the medians,
and the ask with its verdict: the manager's CPU with the store on stays under 2 % of a core
(the store's own share, on minus off, is printed beside it).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import verdict  # noqa: E402

ASK = 0.02            # of a core: what the store may add to the manager's CPU
CALLS_PER_S = 10_000
LOGS_PER_S = 100

SERVICE = '''
import logging
from speedysvc import ServerMethodsBase, msgpack_method


class StoreBench(ServerMethodsBase):
    port = 5611
    name = "store_bench"

    @msgpack_method
    def echo(self, data):
        return data

    @msgpack_method
    def log(self, i):
        logging.getLogger("bench").info("record %d: a line of the kind a service writes, with some words", i)
        return i
'''

INI = """
[defaults]
log_dir = logs

[StoreBench]
import_from = store_bench_service
min_proc_num = 2
max_proc_num = 2

[web monitor]
port = {port}

[store]
enabled = {enabled}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def caller(seconds: float, out) -> None:
    """~CALLS_PER_S calls for ``seconds``, one in CALLS_PER_S / LOGS_PER_S of them logging."""
    sys.path.insert(0, os.getcwd())
    from speedysvc import connect
    from store_bench_service import StoreBench
    every = CALLS_PER_S // LOGS_PER_S
    with connect(StoreBench, timeout=30) as c:
        start = time.monotonic()
        n = 0
        while True:
            now = time.monotonic()
            if now - start >= seconds:
                break
            due = int((now - start) * CALLS_PER_S)
            if n >= due:
                time.sleep(0.001)
                continue
            while n < due:
                if n % every == 0:
                    c.log(n)
                else:
                    c.echo(n)
                n += 1
    out.put(n / seconds)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_round(folder: str, enabled: bool, seconds: float) -> dict:
    port = free_port()
    with open(os.path.join(folder, "service.ini"), "w") as f:
        f.write(textwrap.dedent(INI).format(port=port, enabled="true" if enabled else "false"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    log = open(os.path.join(folder, "manager.out"), "w")
    manager = subprocess.Popen([sys.executable, "-m", "speedysvc.service", "service.ini"], cwd=folder, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or manager.poll() is not None:
                raise RuntimeError(f"the manager did not start: see {folder}/manager.out")
            time.sleep(0.1)
        warm = 5.0
        out = multiprocessing.Queue()
        client = multiprocessing.Process(target=caller, args=(warm + seconds, out))
        os.chdir(folder)
        client.start()
        time.sleep(warm)
        cpu0, t0 = cpu_seconds(manager.pid), time.monotonic()
        time.sleep(seconds)
        cpu1, t1 = cpu_seconds(manager.pid), time.monotonic()
        rate = out.get(timeout=60)
        client.join(30)
        with urllib.request.urlopen(url + "/api/status", timeout=5) as r:
            store = json.loads(r.read())["manager"]["store"]
        return {"cpu": (cpu1 - cpu0) / (t1 - t0), "calls_per_s": rate, "store": store}
    finally:
        manager.send_signal(signal.SIGTERM)
        try:
            manager.wait(30)
        except subprocess.TimeoutExpired:
            manager.kill()
            manager.wait()
        log.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="measured seconds per round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (store on, store off)")
    args = parser.parse_args()
    here = os.getcwd()
    results: dict[bool, list[dict]] = {True: [], False: []}
    with tempfile.TemporaryDirectory(prefix="bench_store_") as folder:
        with open(os.path.join(folder, "store_bench_service.py"), "w") as f:
            f.write(SERVICE)
        try:
            for i in range(args.rounds):
                for enabled in (True, False):
                    r = one_round(folder, enabled, args.seconds)
                    results[enabled].append(r)
                    print(f"round {i + 1}, store {'on ' if enabled else 'off'}: manager CPU {r['cpu'] * 100:.2f} % "
                          f"of a core at {r['calls_per_s']:,.0f} calls/s"
                          + (f" (store ok: {r['store']['ok']}, write lag {r['store']['write_lag_s']:.3f} s, "
                             f"dropped {r['store']['dropped']})" if enabled else ""), flush=True)
            size = sum(os.path.getsize(os.path.join(folder, "logs.state", n))
                       for n in os.listdir(os.path.join(folder, "logs.state")))
        finally:
            os.chdir(here)
    on = statistics.median(r["cpu"] for r in results[True])
    off = statistics.median(r["cpu"] for r in results[False])
    rate = statistics.median(r["calls_per_s"] for r in results[True] + results[False])
    print(f"\nmedian manager CPU: store on {on * 100:.2f} %, store off {off * 100:.2f} % of a core "
          f"({rate:,.0f} calls/s, {LOGS_PER_S} log records/s); the store's file after the rounds: "
          f"{size / 2**20:.1f} MiB")
    added = on - off
    print(f"ask: the manager's CPU with the store on stays < {ASK * 100:.0f} % of a core at ~{CALLS_PER_S:,} "
          f"calls/s and {LOGS_PER_S} log records/s: {on * 100:.2f} % -> {verdict(on < ASK)}")
    print(f"(the store's own share: {added * 100:+.2f} % of a core, the difference with the store off)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

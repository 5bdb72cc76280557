"""The client of tests/hosts/test_hosts.py, run in the fourth network namespace (``ip netns
exec``): it calls the three hosts, does to them what a phase says (kill -9 a manager, pull a
host's cable at the bridge, add a host to the resolver's answer), and prints what it measured
as one JSON line.  ``python hosts_client.py CONFIG_JSON PHASE``."""
import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time

from speedysvc import connect
from speedysvc.tcp import balanced
from services import Spread

config = json.loads(sys.argv[1])
phase = sys.argv[2]
SECRET = config["secret"]
HOSTS = config["hosts"]            # name -> {"address", "pid", "veth"}
ALL = "tcp://" + ",".join(h["address"] for h in HOSTS.values())


def client(address=ALL, **kw):
    kw.setdefault("timeout", 20)
    return connect(Spread, address, secret=SECRET, **kw)


def wait_ready():
    for name, h in HOSTS.items():
        with client(f"tcp://{h['address']}", timeout=90, wait=90) as c:
            assert c.where() == name


class Load:
    """``threads`` callers of ``method`` (with ``arg``) until stopped: each answer or failure
    with the time it came."""

    def __init__(self, c, method, arg, threads):
        self.c, self.method, self.arg = c, method, arg
        self.answers, self.failures = [], []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def run(self):
        call = getattr(self.c, self.method)
        while not self.stop.is_set():
            try:
                who = call(self.arg)
                self.answers.append((time.monotonic(), who))
            except Exception as e:   # noqa: BLE001 - reported
                self.failures.append((time.monotonic(), type(e).__name__, str(e)[:200]))

    def end(self):
        self.stop.set()
        for t in self.threads:
            t.join()


def inflight_of(c, address):
    return next(e["inflight"] for e in c.endpoints() if e["address"].startswith(f"tcp://{address}:"))


def healthy(c, address):
    return next(e["healthy"] for e in c.endpoints() if e["address"].startswith(f"tcp://{address}:"))


def kill_under_load(c, victim, method, threads=6, seconds=0.02):
    """A steady load, kill -9 of ``victim``'s manager in the middle: what the callers saw."""
    load = Load(c, method, seconds, threads)
    time.sleep(1.5)
    before = collections.Counter(who for _, who in load.answers)
    os.kill(HOSTS[victim]["pid"], signal.SIGKILL)
    killed = time.monotonic()
    in_flight = inflight_of(c, HOSTS[victim]["address"])   # (the calls that cannot be answered now)
    time.sleep(2.0)
    load.end()
    after = [(t, who) for t, who in load.answers if t > killed]
    # (replies the victim wrote before it died may still be read just after the kill: its
    # answers are counted from half a second on)
    # the share moved: when each of the other hosts' answers came back to its steady pace
    # (the first full second after the kill, compared with the rate before)
    first_second = [who for t, who in after if t <= killed + 1.0 and not (who == victim and t <= killed + 0.5)]
    return {"before": dict(before), "failures": load.failures, "in_flight_at_kill": in_flight,
            "answers_after": len(after), "victim_after": sum(1 for t, who in after if who == victim and t > killed + 0.5),
            "first_second": dict(collections.Counter(first_second)),
            "pace_before": sum(before.values()) / 1.5, "pace_first_second": len(first_second),
            "max_gap_after_kill": max_gap(sorted(t for t, _ in load.answers), killed)}


def max_gap(times, since):
    """The longest time without any answer, from ``since`` on."""
    gaps, last = [], since
    for t in times:
        if t > since:
            gaps.append(t - last)
            last = t
    return max(gaps) if gaps else None


def phase_kill():
    wait_ready()
    out = {}
    with client() as c:
        answers = [c.where() for _ in range(3000)]
        out["spread"] = {k: v / len(answers) for k, v in collections.Counter(answers).items()}
        out["idempotent"] = kill_under_load(c, "h1", "where_slowly")
        out["not_idempotent"] = kill_under_load(c, "h2", "once_slowly")
        out["endpoints"] = c.endpoints()
    return out


def set_link(name, up):
    subprocess.run(["ip", "-n", config["bridge_ns"], "link", "set", HOSTS[name]["veth"], "up" if up else "down"],
                   check=True)


def phase_link():
    wait_ready()
    out = {}
    connect_timeout = config["connect_timeout"]
    victim = HOSTS["h3"]["address"]
    with client(connect_timeout=connect_timeout) as c:
        [c.where() for _ in range(30)]   # (connected to each)
        load = Load(c, "where_slowly", 0.01, 4)
        time.sleep(1.0)
        set_link("h3", False)
        down = time.monotonic()
        while healthy(c, victim) and time.monotonic() - down < connect_timeout + 30:
            time.sleep(0.01)
        out["ejected_after"] = time.monotonic() - down
        time.sleep(2 * connect_timeout + 1)
        set_link("h3", True)
        up = time.monotonic()
        while not any(t > up and who == "h3" for t, who in load.answers[-400:]) and time.monotonic() - up < 60:
            time.sleep(0.01)
        out["back_after"] = time.monotonic() - up
        load.end()
        out["failures"] = load.failures
        out["endpoints"] = c.endpoints()

    answer = [HOSTS["h1"]["address"], HOSTS["h2"]["address"]]
    every = config["resolve_every"]
    with client("tcp://spread.hosts", resolver=lambda host, port: list(answer), resolve_every=every) as c:
        assert {c.where() for _ in range(30)} == {"h1", "h2"}
        answer.append(HOSTS["h3"]["address"])
        added = time.monotonic()
        while c.where() != "h3" and time.monotonic() - added < 60:
            pass
        out["new_host_after"] = time.monotonic() - added
    out["resolve_every"] = every
    out["eject_max"] = balanced.EJECT_MAX
    return out


print(json.dumps({"kill": phase_kill, "link": phase_link}[phase]()), flush=True)

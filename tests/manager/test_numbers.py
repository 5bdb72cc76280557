"""Numbers that never mislead, against a real manager: a stopped service shows no calls and no
latency; a quantile never exceeds the slowest call; a restart starts the counters from zero
rather than against the old ones; calls refused while a service is stopped, and calls lost
with their worker, are counted; the wait for a worker is measured (posted -> claimed)."""
import threading
import time

import pytest

from speedysvc import ServiceUnavailable, WorkerDied, connect
from services import Chatty, Fragile

INI = """
    [defaults]
    log_dir=logs

    [Chatty]
    import_from=services
    min_proc_num=1
    max_proc_num=1

    [Fragile]
    import_from=services
    restart_backoff=0.1

    [web monitor]
    port={port}
"""


def points_after(m, name, t):
    return [p for p in m.get(f"/api/services/{name}/history")["points"] if p["t"] > t]


def wait_points(m, name, t, n=1, pred=lambda p: True, timeout=30):
    """The history points of ``name`` recorded after ``t`` (time.time()), once ``n`` of them
    satisfy ``pred``."""
    m.wait(lambda: len([p for p in points_after(m, name, t) if pred(p)]) >= n, timeout, f"{n} history point(s)")
    return points_after(m, name, t)


def serving(point):
    return point.get("state", "running") == "running"


class Load:
    """Callers calling ``method`` in a loop from threads until stopped; counts the answers."""

    def __init__(self, service, method, *args, threads=1):
        self.done = threading.Event()
        self.answered = 0
        self.failures: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(service, method, args)) for _ in range(threads)]

    def _run(self, service, method, args):
        with connect(service) as c:
            while not self.done.is_set():
                try:
                    getattr(c, method)(*args)
                    self.answered += 1
                except Exception as e:   # (counted: the test says which it expects)
                    self.failures.append(e)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        for t in self.threads:
            t.join(60)


def test_a_stopped_service_shows_no_calls_and_no_latency(running):
    m = running(INI)
    with Load(Chatty, "whoami"):
        wait_points(m, "Chatty", time.time(), pred=lambda p: p.get("calls_per_s", 0) > 0)
        assert m.service("Chatty")["calls_per_s"] > 0
    status, _ = m.post("/api/services/Chatty/stop")
    assert status == 200
    s = m.service("Chatty")
    assert s["state"] == "stopped"
    assert s["calls_per_s"] == 0 and s["p50_ms"] is None and s["p99_ms"] is None
    assert s["wait_p99_ms"] is None and s["errors_per_s"] == 0
    # the methods keep their counters (what was served), not their recent figures
    row = next(r for r in s["methods"] if r["name"] == "whoami")
    assert row["calls"] > 0 and row["recent"]["calls_per_s"] == 0 and row["recent"]["p99_ms"] is None
    # points go on while stopped, saying so
    t = time.time()
    p = wait_points(m, "Chatty", t, 2)[-1]
    assert p["state"] == "stopped" and p["calls_per_s"] == 0 and p["p99_ms"] is None and p["p50_ms"] is None
    assert p["methods"]["whoami"]["calls_per_s"] == 0 and p["methods"]["whoami"]["p99_ms"] is None
    # `speedysvc status` says "-"
    out = m.cli("status").stdout
    line = next(line for line in out.splitlines() if line.startswith("Chatty"))
    assert line.split()[3:7] == ["0.0", "-", "-", "-"], out


def test_p99_is_never_above_the_slowest_call(running):
    """A 20 ms method lies in the bucket [16.4, 32.8) ms: the bucket's top (32.8 ms) is above
    every call; the quantiles are held at the slowest call seen, and say they are a bound."""
    m = running(INI)
    t = time.time()
    with Load(Chatty, "sleep", 0.02):
        points = wait_points(m, "Chatty", t, 3, pred=lambda p: p.get("calls_per_s", 0) > 0)
    s = m.service("Chatty")
    row = next(r for r in s["methods"] if r["name"] == "sleep")
    assert row["max_ms"] >= 20   # (a slow one may be in a higher bucket: the machine is shared)
    assert row["p99_ms"] <= row["max_ms"]
    if row["max_ms"] < 32.768:   # every call in the bucket [16.4, 32.8) ms: p99 is held at the slowest
        assert row["p99_bound"]
    served = [p for p in points if p.get("calls_per_s", 0) > 0]
    for p in served:
        assert p["p99_ms"] <= row["max_ms"], p
        assert p["p99_ms"] <= p["max_ms"] <= row["max_ms"], p
        assert p["p50_ms"] <= p["p99_ms"]
        sleep = p["methods"]["sleep"]
        assert sleep["p99_ms"] <= sleep["max_ms"] <= row["max_ms"] and sleep["calls_per_s"] > 0
        assert 16.384 <= sleep["p50_ms"]   # within the bucket (or above) the calls are in
    # a point whose calls all lie in that bucket (on a loaded machine some may be slower, in the
    # next bucket, where the interpolated p99 can be below their maximum) says its p99 is a bound
    assert all(p["p99_bound"] for p in served if p["max_ms"] < 30)


def test_a_restart_starts_the_counters_from_zero(running):
    """A hard restart makes a new segment whose counters start at zero: the first point after
    it is computed from zero, so under a steady load it does not drop to ~0 calls/s."""
    m = running(INI)
    with Load(Chatty, "whoami") as load:
        before = [p["calls_per_s"] for p in wait_points(m, "Chatty", time.time(), 3,
                                                          pred=lambda p: p.get("calls_per_s", 0) > 0)]
        status, _ = m.post("/api/services/Chatty/restart", {"hard": True})
        assert status == 200
        done = time.time()
        first = [p for p in wait_points(m, "Chatty", done, 1, pred=serving) if serving(p)][0]
    assert not load.failures   # (callers waited for the new segment)
    typical = sorted(before)[len(before) // 2]
    assert first["calls_per_s"] > 0.1 * typical, (first, before)


def test_calls_refused_and_lost_are_counted(running):
    m = running(INI)
    with connect(Chatty) as c:
        c.whoami()
    assert m.service("Chatty")["refused"] == 0
    assert m.post("/api/services/Chatty/stop")[0] == 200
    wait_points(m, "Chatty", time.time(), 1)   # (so that a point's interval holds the calls below)
    with connect(Chatty) as c:
        for _ in range(5):
            with pytest.raises(ServiceUnavailable):
                c.whoami()
    s = m.service("Chatty")
    assert s["refused"] == 5 and s["lost"] == 0
    # in the history, as a rate, and in the CLI
    p = wait_points(m, "Chatty", time.time(), 1)[-1]
    assert p["state"] == "stopped" and "refused_per_s" in p
    points = m.get("/api/services/Chatty/history")["points"]
    assert sum(p["refused_per_s"] for p in points) > 0
    line = next(line for line in m.cli("status").stdout.splitlines() if line.startswith("Chatty"))
    assert line.split()[8] == "5", line
    # started again: the count goes on (the stopped segment's callers are not forgotten)
    assert m.post("/api/services/Chatty/start")[0] == 200
    assert m.service("Chatty")["refused"] == 5
    # a call whose worker dies in it is lost
    with connect(Fragile) as f:
        with pytest.raises(WorkerDied):
            f.die()
    assert m.service("Fragile")["lost"] == 1


def test_the_wait_for_a_worker_grows_when_calls_queue(running):
    """Four callers and one worker busy 100 ms a call: each call waits for the ones ahead of it."""
    m = running(INI)
    with connect(Chatty) as c:
        for _ in range(20):
            c.whoami()
    alone = next(r for r in m.service("Chatty")["methods"] if r["name"] == "whoami")
    t = time.time()
    with Load(Chatty, "sleep", 0.1, threads=4):
        points = wait_points(m, "Chatty", t, 2, pred=lambda p: (p.get("wait_p99_ms") or 0) > 0)
    row = next(r for r in m.service("Chatty")["methods"] if r["name"] == "sleep")
    # a queued call waits for at least one whole call ahead of it (100 ms)
    assert row["wait_max_ms"] >= 90 and row["wait_p99_ms"] >= 50 and row["wait_mean_ms"] >= 30
    assert row["wait_p99_ms"] <= row["wait_max_ms"]
    assert alone["wait_max_ms"] < row["wait_max_ms"]
    queued = [p for p in points if (p.get("wait_p99_ms") or 0) > 0]
    assert max(p["wait_p99_ms"] for p in queued) >= 50
    assert max(p["methods"]["sleep"]["wait_p99_ms"] or 0 for p in queued) >= 50
    out = m.cli("status").stdout
    assert "WAIT P99 MS" in out


def test_tcp_calls_the_gateway_refuses_while_stopping_are_counted(running):
    """A TCP call that arrives while the gateway closes (the service stopping, a call still in
    flight) is answered ServiceUnavailable by the gateway itself: counted as refused."""
    from services import Other
    m = running("""
        [Other]
        import_from=services
        bind_tcp=127.0.0.1
        tcp_in_workers=no
        stop_timeout=20

        [web monitor]
        port={port}
    """)
    with connect(Other, "tcp://127.0.0.1", timeout=30) as busy, connect(Other, "tcp://127.0.0.1", timeout=30) as late:
        late.whoami()
        slow = threading.Thread(target=busy.sleep, args=(3,))
        slow.start()
        m.wait(lambda: m.service("Other")["in_flight"] == 1, 20, "the slow call to be in flight")
        stopping = threading.Thread(target=m.post, args=("/api/services/Other/stop",))
        stopping.start()
        m.wait(lambda: m.service("Other")["state"] == "stopping", 20, "the service to be stopping")
        with pytest.raises(ServiceUnavailable):
            late.whoami()
        slow.join(60)
        stopping.join(60)
    s = m.service("Other")
    assert s["state"] == "stopped" and s["refused"] == 1, s["refused"]

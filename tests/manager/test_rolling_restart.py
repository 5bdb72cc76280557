"""Rolling restarts: new workers (fresh processes, the code as it is now) replace the old ones
while the service serves; calls go on and none fails.  A restart whose new workers cannot
start leaves the old ones serving and says why.  ``--hard`` stops, then starts."""
import asyncio
import os
import threading
import time
import urllib.parse

import pytest

from speedysvc import ServerMethodsBase, connect, connect_async, json_method
from conftest import wait_until

PORTS = int(os.environ["SPEEDYSVC_TEST_PORT_BASE"])

# The service's module as the tests write (and rewrite) it in the manager's folder.
MODULE = '''
import os
import time

from speedysvc import ServerMethodsBase, json_method

{prelude}


class Versioned(ServerMethodsBase):
    name = "versioned"
    port = int(os.environ["SPEEDYSVC_TEST_PORT_BASE"]) + 160

    def __init__(self):
        {init}

    @json_method
    def version(self):
        return {version!r}

    @json_method
    def slow(self, seconds):
        time.sleep(seconds)
        return {version!r}
'''

INI = """
    [defaults]
    log_dir=logs

    [Versioned]
    import_from=versioned
    min_proc_num={workers}
    max_proc_num={workers}
    scale_interval=0.05
    crash_limit={crash_limit}
    start_timeout={start_timeout}
    {extra}

    [web monitor]
    port={{port}}
"""


class Versioned(ServerMethodsBase):
    """The client's view of the service (its name and methods)."""
    name = "versioned"
    port = PORTS + 160

    @json_method
    def version(self):
        ...

    @json_method
    def slow(self, seconds):
        ...


def write_module(folder, version, prelude="", init="pass"):
    path = os.path.join(str(folder), "versioned.py")
    with open(path, "w") as f:
        f.write(MODULE.format(version=version, prelude=prelude, init=init))
    return path


def versioned(running, tmp_path, version="v1", workers=2, start_timeout=30, extra="", crash_limit=1):
    write_module(tmp_path, version)
    ini = INI.format(workers=workers, start_timeout=start_timeout, extra=extra, crash_limit=crash_limit)
    # no .pyc: a module rewritten within the second with the same size would pass as unchanged
    return running(ini, env={"PYTHONDONTWRITEBYTECODE": "1"})


def worker_pids(m):
    return sorted(w["pid"] for w in m.service("Versioned")["worker_list"])


def log_lines(m, text):
    """The service's log records that contain ``text``."""
    return m.get("/api/services/Versioned/logs?" + urllib.parse.urlencode({"lines": 0, "q": text}))["records"]


def restart(m, body=None):
    return m.post("/api/services/Versioned/restart", body)


class Callers:
    """Threads calling ``version()`` without pause; every result and every error, with the time
    each call began."""

    def __init__(self, clients):
        self.clients = clients
        self.results = []   # (began, version)
        self.errors = []
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(c,)) for c in clients]
        for t in self.threads:
            t.start()

    def _run(self, client):
        while not self.done.is_set():
            began = time.monotonic()
            try:
                self.results.append((began, client.version()))
            except Exception as e:
                self.errors.append(repr(e))

    def stop(self):
        self.done.set()
        for t in self.threads:
            t.join(60)


class AsyncioCaller:
    """The asyncio TCP client, called from one thread at a time through an event loop of its own."""

    def __init__(self, address):
        self.loop = asyncio.new_event_loop()
        self.client = connect_async(Versioned, address, timeout=30)

    def version(self):
        return self.loop.run_until_complete(self.client.version())

    def close(self):
        self.loop.run_until_complete(self.client.aclose())
        self.loop.close()


def test_calls_go_on_through_rolling_restarts_and_see_the_new_code(running, tmp_path):
    """The done-when test: 5 threads (3 over shared memory, 2 over TCP: the blocking and the
    asyncio client, served by the workers) call without pause through 3 rolling restarts, the
    module edited before each: no call fails (a call a leaving worker answers as never started is
    sent again), and every call begun after a restart returned sees that restart's code.  min =
    max = 2 workers, with autoscaling deciding every 0.05 s: the extra workers of a restart must
    not be scaled away."""
    m = versioned(running, tmp_path, extra="bind_tcp=127.0.0.1")
    tcp_port = m.service("Versioned")["tcp_server"]
    clients = [connect(Versioned, timeout=30) for _ in range(3)]
    clients.append(connect(Versioned, f"tcp://127.0.0.1:{PORTS + 160}", timeout=30))
    clients.append(AsyncioCaller(f"tcp://127.0.0.1:{PORTS + 160}"))
    assert {c.version() for c in clients} == {"v1"}
    callers = Callers(clients)
    try:
        marks, asked = [], []
        time.sleep(0.5)
        for version in ("v2", "v3", "v4"):
            before = worker_pids(m)
            asked.append(time.monotonic())
            write_module(tmp_path, version)
            status, body = restart(m)
            assert status == 200, body
            marks.append((time.monotonic(), version))
            assert body["state"] == "running" and body["workers"] == 2, body
            assert not set(worker_pids(m)) & set(before), "the old workers were all replaced"
            time.sleep(0.7)
    finally:
        callers.stop()
    assert callers.errors == []
    # between a restart's answer and the next edit, only that restart's code answers
    for (since, version), until in zip(marks, asked[1:] + [float("inf")]):
        seen = {v for began, v in callers.results if since < began < until}
        assert seen == {version}, (version, seen)
    # every thread was served all along (the TCP one through the same gateway)
    assert len(callers.results) > 100
    assert m.service("Versioned")["tcp_server"]["port"] == tcp_port["port"]
    log = log_lines(m, "rolling restart done")
    assert len(log) == 3
    assert log_lines(m, "stopped") == []
    for c in clients:
        c.close()


def test_a_call_in_hand_finishes_on_its_old_worker(running, tmp_path):
    """An old worker leaves only after the call it runs has returned its answer (the old code's)."""
    m = versioned(running, tmp_path)
    with connect(Versioned, timeout=60) as c:
        c.version()
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("r", c.slow(2.0)))
        t.start()
        assert wait_until(lambda: m.service("Versioned")["in_flight"] == 1, 10)
        write_module(tmp_path, "v2")
        status, body = restart(m)
        t.join(30)
        assert status == 200, body
        assert out["r"] == "v1"
        assert c.version() == "v2"


def test_serving_workers_never_drop_below_the_pool_size(running, tmp_path):
    """Sampled all through a restart (new workers that take 1 s to import): at least 2 workers are
    in the worker table and not leaving, every time; and more than 2 while old and new overlap
    (an old worker finishes a 3 s call meanwhile)."""
    m = versioned(running, tmp_path)
    write_module(tmp_path, "v2", prelude="time.sleep(1.0)")
    counts = []
    done = threading.Event()
    slow = {}
    caller = connect(Versioned, timeout=60)
    t_slow = threading.Thread(target=lambda: slow.setdefault("r", caller.slow(3.0)))
    t_slow.start()
    assert wait_until(lambda: m.service("Versioned")["in_flight"] == 1, 10)

    def sample():
        while not done.is_set():
            rows = m.service("Versioned")["worker_list"]
            counts.append((sum(1 for w in rows if w["serving"] and not w["leaving"]),
                           sum(1 for w in rows if w["serving"])))
            time.sleep(0.01)

    t = threading.Thread(target=sample)
    t.start()
    try:
        status, body = restart(m)
    finally:
        done.set()
        t.join()
        t_slow.join(30)
        caller.close()
    assert status == 200, body
    assert slow["r"] == "v1"
    assert len(counts) > 20
    assert min(c[0] for c in counts) >= 2, counts
    assert max(c[1] for c in counts) > 2, counts


@pytest.mark.parametrize("prelude, init, says", [
    ("raise RuntimeError('broken on purpose')", "pass", "RuntimeError: broken on purpose"),
    ("def broken(:", "pass", "SyntaxError"),
    ("", "raise ValueError('no start today')", "ValueError: no start today"),
])
def test_new_workers_that_crash_leave_the_old_ones_serving(running, tmp_path, prelude, init, says):
    """New code that fails to import, or a service class that fails to start: the restart answers
    409 with the new worker's last traceback line; the old workers serve on, and the service
    (crash_limit 1) is not marked failed.  A fixed module then restarts fine."""
    m = versioned(running, tmp_path)
    before = worker_pids(m)
    write_module(tmp_path, "v2", prelude=prelude, init=init)
    with connect(Versioned, timeout=30) as c:
        status, body = restart(m)
        assert status == 409, body
        assert "restart failed" in body["error"] and says in body["error"], body
        s = m.service("Versioned")
        assert s["state"] == "running" and s["failure"] is None and not s["restarting"]
        assert worker_pids(m) == before
        assert c.version() == "v1"
        write_module(tmp_path, "v3")
        status, body = restart(m)
        assert status == 200, body
        assert c.version() == "v3"


def test_new_workers_that_do_not_serve_within_start_timeout_are_killed(running, tmp_path):
    m = versioned(running, tmp_path, start_timeout=1.5)
    before = worker_pids(m)
    write_module(tmp_path, "v2", prelude="time.sleep(60)")
    status, body = restart(m)
    assert status == 409
    assert "did not serve within start_timeout (1.5 s)" in body["error"]
    assert worker_pids(m) == before
    with connect(Versioned, timeout=30) as c:
        assert c.version() == "v1"


def test_hard_restart_stops_then_starts(running, tmp_path):
    """restart --hard (CLI) and {"hard": true} (API): the service is stopped, then started."""
    m = versioned(running, tmp_path)
    before = worker_pids(m)
    write_module(tmp_path, "v2")
    out = m.cli("restart", "--hard", "Versioned")
    assert out.returncode == 0, out.stderr
    assert "Versioned: running, 2 worker(s)" in out.stdout
    assert not set(worker_pids(m)) & set(before)
    assert len(log_lines(m, "stopped")) == 1
    assert log_lines(m, "rolling restart") == []
    status, body = restart(m, {"hard": True})
    assert status == 200 and body["state"] == "running", body
    assert len(log_lines(m, "stopped")) == 2
    with connect(Versioned, timeout=30) as c:
        assert c.version() == "v2"


def test_cli_restart_is_rolling_and_reports_a_failure(running, tmp_path):
    m = versioned(running, tmp_path)
    write_module(tmp_path, "v2")
    out = m.cli("restart", "Versioned")
    assert out.returncode == 0, out.stderr
    assert "Versioned: running, 2 worker(s)" in out.stdout
    assert len(log_lines(m, "rolling restart done")) == 1
    assert log_lines(m, "stopped") == []
    write_module(tmp_path, "v3", prelude="raise ImportError('missing piece')")
    out = m.cli("restart", "Versioned")
    assert out.returncode == 1
    assert "restart failed" in out.stderr and "ImportError: missing piece" in out.stderr, out.stderr
    assert m.service("Versioned")["state"] == "running"


def test_restart_body_is_checked(running, tmp_path):
    m = versioned(running, tmp_path)
    for body in ([1], {"hard": 1}, {"hard": "yes"}):
        status, answer = restart(m, body)
        assert status == 400 and "hard" in answer["error"], (body, answer)


def test_restart_of_a_stopped_service_starts_it(running, tmp_path):
    m = versioned(running, tmp_path)
    status, body = m.post("/api/services/Versioned/stop")
    assert status == 200 and body["state"] == "stopped"
    write_module(tmp_path, "v2")
    status, body = restart(m)
    assert status == 200 and body["state"] == "running" and body["workers"] == 2, body
    with connect(Versioned, timeout=30) as c:
        assert c.version() == "v2"


def test_restarts_asked_at_once_queue(running, tmp_path):
    """Two restarts asked for while one runs (its new workers take 1.5 s to import): all three
    answer 200; the two that waited share one restart after the first (two in all), whose workers
    import the module as it was when it began."""
    m = versioned(running, tmp_path)
    # the new workers say when they have read the module, then take 1.5 s more
    write_module(tmp_path, "v2", prelude="open(f'imported-{os.getpid()}', 'w').close()\ntime.sleep(1.5)")
    answers = []

    def ask():
        answers.append(restart(m))

    threads = [threading.Thread(target=ask)]
    threads[0].start()
    assert wait_until(lambda: len([f for f in os.listdir(tmp_path) if f.startswith("imported-")]) == 2, 20)
    assert m.service("Versioned")["restarting"]
    write_module(tmp_path, "v3")
    threads += [threading.Thread(target=ask) for _ in range(2)]
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join(120)
    assert [a[0] for a in answers] == [200, 200, 200], answers
    assert len(log_lines(m, "rolling restart done")) == 2
    assert len(m.service("Versioned")["worker_list"]) == 2
    with connect(Versioned, timeout=30) as c:
        assert c.version() == "v3"


# -- the worker table's room, with a pool run in this process ---------------------------------

def run_pool(tmp_path, table_size, monkeypatch, body):
    """A ServicePool of 2 workers run by this test's own loop, its worker table cut to
    ``table_size`` entries for the restart; ``body(pool)`` runs once it serves."""
    from speedysvc.manager import config as configmod, pool as poolmod
    from speedysvc.manager.manager import describe_services
    write_module(tmp_path, "v1")
    (tmp_path / "service.ini").write_text(
        "[Versioned]\nimport_from=versioned\nmin_proc_num=2\nstart_timeout=30\nlog_dir=logs\n")
    cfg = configmod.load(str(tmp_path / "service.ini"))
    describe_services(cfg)

    async def main():
        p = poolmod.ServicePool(cfg.services[0], cfg.folder, asyncio.get_running_loop())
        await p.start()
        try:
            monkeypatch.setattr(poolmod, "WORKER_TABLE_SIZE", table_size)
            return await body(p)
        finally:
            await p.stop()
            p.close()

    return asyncio.run(main())


def test_without_room_for_all_new_workers_the_restart_goes_in_batches(tmp_path, monkeypatch):
    async def body(p):
        before = {w.pid for w in p.workers}
        write_module(tmp_path, "v2")
        await p.restart()
        return before, {w.pid for w in p.workers}, [r["message"] for r in p.log.recent]

    before, after, log = run_pool(tmp_path, 3, monkeypatch, body)
    assert len(after) == 2 and not before & after
    # one new worker at a time: each started once one old worker had gone
    started = [i for i, msg in enumerate(log) if msg.startswith("started worker")][2:]
    exited = [i for i, msg in enumerate(log) if "exited" in msg]
    assert len(started) == 2 and len(exited) == 2
    assert started[0] < exited[0] < started[1] < exited[1], log


def test_a_full_worker_table_fails_the_restart(tmp_path, monkeypatch):
    from speedysvc.manager.pool import RestartFailed

    async def body(p):
        before = {w.pid for w in p.workers}
        with pytest.raises(RestartFailed, match="no room in the worker table"):
            await p.restart()
        assert {w.pid for w in p.workers} == before and p.state == "running" and not p.restarting

    run_pool(tmp_path, 2, monkeypatch, body)


def test_an_old_worker_that_dies_during_a_failed_restart_is_replaced(running, tmp_path):
    """While the new workers import (and then fail), an old one is killed: the new ones counted
    toward the pool then, so once the restart has failed the pool is topped up to its size."""
    import signal
    m = versioned(running, tmp_path, extra="restart_backoff=0.05", crash_limit=5)
    before = worker_pids(m)
    # the new workers say when they have read the module, then fail 2 s later
    write_module(tmp_path, "v2", prelude="open(f'imported-{os.getpid()}', 'w').close()\n"
                                         "time.sleep(2.0)\nraise RuntimeError('late failure')")
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("answer", restart(m)))
    t.start()
    assert wait_until(lambda: len([f for f in os.listdir(tmp_path) if f.startswith("imported-")]) == 2, 20)
    write_module(tmp_path, "v1")   # what the replacement of the killed worker imports
    os.kill(before[0], signal.SIGKILL)
    t.join(60)
    status, body = out["answer"]
    assert status == 409 and "late failure" in body["error"], body
    assert wait_until(lambda: len([w for w in m.service("Versioned")["worker_list"] if w["serving"]]) == 2, 30)
    pids = worker_pids(m)
    assert before[1] in pids and before[0] not in pids
    assert m.service("Versioned")["state"] == "running"
    with connect(Versioned, timeout=30) as c:
        assert c.version() == "v1"


def test_a_restart_whose_caller_is_cancelled_runs_to_its_end(tmp_path, monkeypatch):
    """Cancelling the caller of restart() (a request given up, the code watcher closing) does not cut
    the restart in the middle: the new workers are adopted and the old ones retired all the same."""
    async def body(p):
        before = {w.pid for w in p.workers}
        write_module(tmp_path, "v2")
        caller = asyncio.get_running_loop().create_task(p.restart())
        while not p.restarting:
            await asyncio.sleep(0.01)
        caller.cancel()
        while p.restarting:
            await asyncio.sleep(0.01)
        after = {w.pid for w in p.workers}
        assert len(after) == 2 and not before & after
        assert not any(w.candidate or w.leaving for w in p.workers)
        assert {r["pid"] for r in p.registered()} == after

    run_pool(tmp_path, 64, monkeypatch, body)


def test_a_restart_after_a_change_of_the_pool_bounds_runs_within_them(tmp_path, monkeypatch):
    """A configuration swapped in before a restart (min_proc_num 3 now): the new workers number
    within its bounds."""
    import dataclasses

    async def body(p):
        p.cfg = dataclasses.replace(p.cfg, min_proc_num=3, max_proc_num=3)
        await p.restart()
        assert len(p.workers) == 3 and p.target == 3
        assert len(p.registered()) == 3

    run_pool(tmp_path, 64, monkeypatch, body)

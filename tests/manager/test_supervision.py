"""The manager supervises its services' workers: crashes are noticed and restarted (or the
service marked failed), load scales the workers, stops let calls finish (within stop_timeout),
a call running too long is killed, and a killed manager leaves no orphan behind."""
import os
import signal
import threading
import time

import psutil
import pytest

from speedysvc import RemoteError, ServiceUnavailable, WorkerDied, connect
from conftest import our_segments, wait_until
from manager_fixture import RunningManager, chatty_ini
from services import Chatty, EchoServer, Fragile


CRASH_LOOP_INI = """
    [EchoServer]
    import_from=services

    [CrashOnStart]
    import_from=services
    restart_backoff=0.05
    crash_limit={crash_limit}

    [web monitor]
    port={{port}}
"""


def test_worker_crash_is_noticed_and_restarted(running):
    m = running(chatty_ini(2, 2, "restart_backoff=0.1"))
    before = {w["pid"] for w in m.service("Chatty")["worker_list"]}
    victim = sorted(before)[0]
    t = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    m.wait(lambda: {w["pid"] for w in m.service("Chatty")["worker_list"] if w["serving"]} - before
           and len(m.service("Chatty")["worker_list"]) == 2, 20, "a replacement worker")
    assert time.monotonic() - t < 10
    s = m.service("Chatty")
    assert victim not in {w["pid"] for w in s["worker_list"]} and s["restarts"] == 1 and s["state"] == "running"
    assert any("died (signal SIGKILL)" in r["message"] for r in m.get("/api/services/Chatty/logs")["records"])
    with connect(Chatty) as c:
        assert c.whoami() in {w["pid"] for w in s["worker_list"]}


def test_crash_looping_service_is_marked_failed_and_others_run(running):
    m = running(CRASH_LOOP_INI.format(crash_limit=3), wait_ready=False)
    m.wait(lambda: m.service("CrashOnStart")["state"] == "failed", 60, "the service to be marked failed")
    s = m.service("CrashOnStart")
    assert "3 workers in a row" in s["failure"] and s["workers"] == 0
    assert m.get("/readyz", ok_only=False) == 503
    logs = m.get("/api/services/CrashOnStart/logs")["records"]
    assert any("cannot load the model" in r["message"] for r in logs)
    assert m.service("EchoServer")["state"] == "running"
    with connect(EchoServer) as c:
        assert c.echo_json("still") == "still"
    status = m.cli("status")
    assert "failed" in status.stdout and "CrashOnStart" in status.stdout


def test_starting_a_failing_service_again_reports_the_failure(running):
    m = running(CRASH_LOOP_INI.format(crash_limit=2), wait_ready=False)
    m.wait(lambda: m.service("CrashOnStart")["state"] == "failed", 60, "failed")
    code, body = m.post("/api/services/CrashOnStart/start")
    assert code == 409 and "died while starting, before they served" in body["error"]
    out = m.cli("start", "CrashOnStart")
    assert out.returncode == 1


FRAGILE_INI = """
    [Fragile]
    import_from=services
    restart_backoff=0.05
    restart_backoff_max=0.2
    crash_limit=3
    call_timeout=1

    [web monitor]
    port={port}
"""


def test_calls_that_kill_their_worker_are_not_a_crash_loop(running):
    """Workers killed by calls, each one by the first call it took right after starting (the
    call waited for it), do not count as start crashes: the service stays up, each caller gets
    WorkerDied, and the log names the method and how the worker ended."""
    m = running(FRAGILE_INI)
    with connect(Fragile) as c:
        for kill in (c.die, lambda: c.exit_now(7), c.die, lambda: c.exit_now(9), c.die):
            with pytest.raises(WorkerDied):
                kill()
        m.wait(lambda: any(w["serving"] for w in m.service("Fragile")["worker_list"]), 30, "a worker serving again")
        before = c.whoami()
        with pytest.raises(RemoteError, match="SystemExit"):
            c.exit(3)                       # answered, and its worker keeps serving
        assert c.whoami() == before
        with pytest.raises(WorkerDied):
            c.sleep(30)                     # killed by the call watchdog
        m.wait(lambda: any(w["serving"] for w in m.service("Fragile")["worker_list"]), 30, "a worker serving again")
        s = m.service("Fragile")
        assert s["state"] == "running" and s["failure"] is None and s["restarts"] >= 6
        assert c.whoami() == s["worker_list"][0]["pid"]
    logs = [r["message"] for r in m.get("/api/services/Fragile/logs?lines=1000")["records"]]

    def logged(*parts):
        return sum(all(p in r for p in parts) for r in logs)

    assert logged("died (signal SIGKILL) in a call to die()", "its caller got WorkerDied") == 3
    assert logged("died (code 7) in a call to exit_now()") == 1
    assert logged("died (code 9) in a call to exit_now()") == 1
    assert not logged("died (code 3)")
    assert logged("killed by the call watchdog", "in a call to sleep()") == 1
    assert logged("more than call_timeout (1.0 s) on one call to sleep(): killing it") == 1
    # said loudly, every crash_limit of them in a row
    assert logged("workers in a row died while serving, within crash_window", "calls may be killing them") == 2
    assert not logged("marked failed") and not logged("start crash")


@pytest.mark.parametrize("service, code, where", [
    ("CrashOnStart", 1, ("while starting",)),
    ("DiesIdle", 5, ("before its first call", "while starting")),   # the latter if it was held up 0.3 s
])
def test_workers_that_die_before_they_serve_are_start_crashes(running, service, code, where):
    """Workers that die before they serve (while starting, or idle before their first call)
    count towards crash_limit."""
    m = running(f"""
        [{service}]
        import_from=services
        restart_backoff=0.05
        crash_limit=2

        [web monitor]
        port={{port}}
    """, wait_ready=False)
    m.wait(lambda: m.service(service)["state"] == "failed", 60, "the service to be marked failed")
    logs = [r["message"] for r in m.get(f"/api/services/{service}/logs")["records"]]
    died = [r for r in logs if f"died (code {code}) " in r]
    assert len(died) == 2 and [r for r in logs if "start crash" in r] == died
    assert all(any(f"died (code {code}) {w}," in r for w in where) for r in died), died
    assert "2 workers in a row died while starting, before they served" in m.service(service)["failure"]


def test_autoscaling_up_under_load_and_down_when_idle(running):
    m = running(chatty_ini(1, 3, """
        scale_interval=0.2
        scale_up_cooldown=0.2
        scale_down_after=1.0
    """))
    assert m.service("Chatty")["workers"] == 1
    stop = threading.Event()

    def load():
        with connect(Chatty) as c:
            while not stop.is_set():
                c.burn(0.05)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        m.wait(lambda: m.service("Chatty")["workers"] == 3, 30, "scaling up to 3 workers")
    finally:
        stop.set()
        for t in threads:
            t.join()
    m.wait(lambda: m.service("Chatty")["workers"] == 1, 30, "scaling back down to 1 worker")
    records = [r["message"] for r in m.get("/api/services/Chatty/logs?q=autoscale")["records"]]
    assert any("autoscale up" in r for r in records) and any("autoscale down" in r for r in records)


def test_sigterm_lets_calls_in_flight_finish(running):
    m = running(chatty_ini(2, 2))
    results, errors = [], []

    def call(i):
        try:
            with connect(Chatty) as c:
                results.append(c.sleep(1.0, i))
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    m.wait(lambda: m.service("Chatty")["in_flight"] == 2, 10, "two calls in flight")
    assert m.stop(signal.SIGTERM) == 0
    for t in threads:
        t.join()
    assert sorted(results) == [0, 1] and not errors
    with pytest.raises(ServiceUnavailable):
        connect(Chatty, wait=0).whoami()   # (gone: no waiting for it to come back)


def test_stop_timeout_kills_calls_that_run_too_long(running):
    m = running(chatty_ini(1, 1, "stop_timeout=0.5"))
    errors = []

    def call():
        try:
            with connect(Chatty) as c:
                c.sleep(20)
        except Exception as e:
            errors.append(e)

    t = threading.Thread(target=call)
    t.start()
    m.wait(lambda: m.service("Chatty")["in_flight"] == 1, 10, "a call in flight")
    t0 = time.monotonic()
    assert m.stop(signal.SIGTERM) == 0
    assert time.monotonic() - t0 < 10
    t.join(10)
    assert errors and isinstance(errors[0], ConnectionError)


def test_call_timeout_kills_a_stuck_worker(running):
    m = running(chatty_ini(1, 1, "call_timeout=0.5\nrestart_backoff=0.1"))
    from speedysvc import WorkerDied
    with connect(Chatty) as c:
        t = time.monotonic()
        with pytest.raises(WorkerDied):
            c.sleep(30)
        assert time.monotonic() - t < 10
        m.wait(lambda: m.service("Chatty")["workers"] == 1 and m.service("Chatty")["worker_list"][0]["serving"])
        assert c.sleep(0, "ok") == "ok"


def test_manager_killed_leaves_no_orphans_and_next_start_is_clean(running, tmp_path):
    m = running(chatty_ini(2, 2))
    pids = [w["pid"] for w in m.service("Chatty")["worker_list"]]
    with connect(Chatty) as c:
        c.whoami()
    m.stop(signal.SIGKILL)
    assert wait_until(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                                      for p in pids), timeout=10)
    assert any(n.endswith(".chatty") for n in our_segments())  # left behind by the killed manager
    m2 = running(chatty_ini(2, 2))
    with connect(Chatty) as c:
        assert c.whoami() in {w["pid"] for w in m2.service("Chatty")["worker_list"]}


def test_second_manager_for_the_same_services_is_refused(running, tmp_path):
    running(chatty_ini(1, 1))
    other = tmp_path / "second"
    other.mkdir()
    m2 = RunningManager(other, chatty_ini(1, 1), wait_ready=False)
    assert m2.proc.wait(60) == 1
    assert "already served" in m2.output()
    m2.out.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="a file of another user (uid 65534) is made as root")
def test_a_service_whose_segment_name_is_squatted_fails_and_the_others_run(running):
    """Another user's file under the service's segment name: that service fails with a reason
    that names the file and its owner and says what to do; the manager runs the others."""
    from speedysvc.shm import SHM_DIR, segment
    path = os.path.join(SHM_DIR, segment.service_segment_name(Chatty.name))
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    os.fchown(fd, 65534, 65534)
    os.close(fd)
    try:
        m = running("""
            [EchoServer]
            import_from=services

            [Chatty]
            import_from=services

            [web monitor]
            port={port}
        """, wait_ready=False)
        m.wait(lambda: m.service("Chatty")["state"] == "failed" and m.service("EchoServer")["state"] == "running",
               60, "Chatty failed and EchoServer running")
        failure = m.service("Chatty")["failure"]
        assert path in failure and "uid 65534" in failure and "as root" in failure
        assert "SPEEDYSVC_NAMESPACE" in failure
        with connect(EchoServer) as c:
            assert c.echo_json("still") == "still"
        code, body = m.post("/api/services/Chatty/start")
        assert code == 409 and path in body["error"]
        assert os.lstat(path).st_uid == 65534
    finally:
        os.unlink(path)

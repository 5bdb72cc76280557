"""The service manager as a user runs it: real processes, a real ini file, the HTTP API and the CLI."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest

from speedysvc import ServiceUnavailable, connect
from conftest import our_segments, wait_until
from manager_fixture import RunningManager
from services import Chatty, EchoServer


CHATTY = """
    [defaults]
    log_dir=logs

    [Chatty]
    import_from=services
    min_proc_num={min}
    max_proc_num={max}
    {extra}

    [web monitor]
    port={{port}}
"""


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


def chatty_ini(min=1, max=1, extra=""):
    return CHATTY.format(min=min, max=max, extra=textwrap.dedent(extra).replace("\n", "\n    "))


def test_quick_example_verbatim_end_to_end(tmp_path):
    """The seed README: its three files, its command, its port."""
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "echo")
    for name in ("echoserver.py", "echoclient.py", "service.ini"):
        with open(os.path.join(example, name)) as src, open(tmp_path / name, "w") as dst:
            dst.write(src.read())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    mgr = subprocess.Popen([sys.executable, "-m", "speedysvc.service", "service.ini"], cwd=tmp_path, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        def up():
            try:
                import urllib.request
                return urllib.request.urlopen("http://127.0.0.1:5155/readyz", timeout=2).status == 200
            except OSError:
                return False
        assert wait_until(up, timeout=60), mgr.stdout.read1().decode() if mgr.poll() is not None else "not ready"
        out = subprocess.run([sys.executable, "echoclient.py"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=60, env=env)
        assert out.stdout == "Hello World!\n", out.stderr
        assert os.path.exists("/tmp/test_server_logs/EchoServer.log")
    finally:
        mgr.send_signal(signal.SIGTERM)
        assert mgr.wait(30) == 0


def test_three_workers_serve_and_logs_are_written(running, tmp_path):
    m = running(chatty_ini(3, 3))
    s = m.service("Chatty")
    assert s["state"] == "running" and s["workers"] == 3
    pids = {w["pid"] for w in s["worker_list"]}
    with connect(Chatty) as c:
        served = {c.log("WARNING", f"hello from call {i}") for i in range(30)}
        assert served <= pids
        c.shout("printed line")
    logfile = tmp_path / "logs" / "Chatty.log"
    assert wait_until(lambda: "printed line" in logfile.read_text())
    text = logfile.read_text()
    line = next(l for l in text.splitlines() if "hello from call 0" in l)
    assert "WARNING chatty: hello from call 0" in line and "[pid " in line and line[:4].isdigit()
    assert "INFO stdout: printed line" in text
    assert (tmp_path / "logs" / "manager.log").exists()
    # the API serves the same records, filtered
    recs = m.get("/api/services/Chatty/logs?level=WARNING&q=call%205")["records"]
    assert [r["message"] for r in recs] == ["hello from call 5"]


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
        connect(Chatty).whoami()


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


def test_control_one_service_at_run_time(running):
    m = running("""
        [EchoServer]
        import_from=services

        [Chatty]
        import_from=services
        min_proc_num=1
        max_proc_num=3

        [web monitor]
        port={port}
    """)
    assert m.cli("stop", "Chatty").returncode == 0
    assert m.service("Chatty")["state"] == "stopped"
    with pytest.raises(ServiceUnavailable):
        connect(Chatty).whoami()
    with connect(EchoServer) as c:
        assert c.echo_json(1) == 1   # the other service is untouched
    out = m.cli("start", "Chatty")
    assert out.returncode == 0 and "running" in out.stdout
    with connect(Chatty) as c:
        first = c.whoami()
        assert m.cli("restart", "Chatty").returncode == 0
        assert c.whoami() != first   # the client follows the restarted service
    out = m.cli("scale", "Chatty", "3")
    assert out.returncode == 0, out.stderr
    m.wait(lambda: m.service("Chatty")["workers"] == 3, 20, "3 workers")
    out = m.cli("scale", "Chatty", "9")
    assert out.returncode == 1 and "1 to 3" in out.stderr
    out = m.cli("stop", "NoSuchService")
    assert out.returncode == 1 and "no service named" in out.stderr
    status = m.cli("status")
    assert "EchoServer" in status.stdout and "Chatty" in status.stdout and "running" in status.stdout


def test_cli_logs_and_follow(running):
    m = running(chatty_ini())
    with connect(Chatty) as c:
        c.log("ERROR", "first record")
    m.wait(lambda: any("first record" in r["message"] for r in m.get("/api/services/Chatty/logs")["records"]))
    out = m.cli("logs", "Chatty", "--level", "ERROR")
    assert "ERROR chatty: first record" in out.stdout and "started worker" not in out.stdout
    follow = subprocess.Popen([sys.executable, "-m", "speedysvc.cli", "--url", m.url, "logs", "Chatty", "-f",
                               "-n", "0", "--grep", "live"], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        with connect(Chatty) as c:
            c.log("INFO", "a live record")
        line = follow.stdout.readline()
        assert "INFO chatty: a live record" in line
    finally:
        follow.kill()
        follow.wait()


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


def test_api_refuses_forged_requests(running):
    m = running(chatty_ini())
    code, body = m.post("/api/services/Chatty/stop", headers={"X-Speedysvc-Request": ""})
    assert code == 403 and "X-Speedysvc-Request" in body["error"]
    code, body = m.post("/api/services/Chatty/stop", headers={"Origin": "http://evil.example"})
    assert code == 403
    assert m.service("Chatty")["state"] == "running"
    code, body = m.post("/api/services/Chatty/scale", {"workers": "x"})
    assert code == 400
    assert m.get("/healthz") == {"ok": True}


def test_access_token(running):
    m = running(chatty_ini(), env={"SPEEDYSVC_WEB_TOKEN": "s3cret"})
    assert m.get("/api/status", ok_only=False) == 401
    assert m.get("/healthz") == {"ok": True}
    out = m.cli("status")
    assert out.returncode == 1 and "token" in out.stderr
    env_out = subprocess.run([sys.executable, "-m", "speedysvc.cli", "--url", m.url, "--token", "s3cret", "status"],
                             capture_output=True, text=True, timeout=60)
    assert env_out.returncode == 0 and "Chatty" in env_out.stdout


def test_refuses_foreign_host_names_without_a_token(running):
    """A page whose domain re-resolves to 127.0.0.1 (DNS rebinding) sends its own Host."""
    import urllib.request
    m = running(chatty_ini())
    req = urllib.request.Request(m.url + "/api/services/Chatty/stop", data=b"{}", method="POST",
                                 headers={"Host": f"evil.example:{m.port}", "Origin": f"http://evil.example:{m.port}",
                                          "X-Speedysvc-Request": "1"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=10)
    assert info.value.code == 421
    assert m.service("Chatty")["state"] == "running"
    assert m.get("/healthz") == {"ok": True}   # 127.0.0.1 still answers


def test_starting_a_failing_service_again_reports_the_failure(running):
    m = running(CRASH_LOOP_INI.format(crash_limit=2), wait_ready=False)
    m.wait(lambda: m.service("CrashOnStart")["state"] == "failed", 60, "failed")
    code, body = m.post("/api/services/CrashOnStart/start")
    assert code == 409 and "died within crash_window" in body["error"]
    out = m.cli("start", "CrashOnStart")
    assert out.returncode == 1


def test_log_pipe_lines_that_are_not_records_are_kept_as_text(tmp_path):
    from speedysvc.manager.logs import ServiceLog
    log = ServiceLog(str(tmp_path / "s.log"), 1 << 20, 1)
    for line in ("null", "[1, 2]", '{"t": 1e300, "l": "INFO", "m": "x"}', '{"no": "t"}', "not json"):
        log.write_json_line(123, line)
    log.write_json_line(123, '{"t": 1700000000.5, "l": "ERROR", "n": "svc", "m": "real"}')
    recs = log.tail(0)
    assert [r["message"] for r in recs[:5]] == ["null", "[1, 2]", '{"t": 1e300, "l": "INFO", "m": "x"}',
                                                '{"no": "t"}', "not json"]
    assert (recs[-1]["level"], recs[-1]["logger"], recs[-1]["message"]) == ("ERROR", "svc", "real")
    log.close()
    assert "ERROR svc: real" in (tmp_path / "s.log").read_text()


def test_bind_tcp_serves_remote_clients_and_follows_restarts(running):
    from services import Other
    m = running("""
        [Other]
        import_from=services
        bind_tcp=127.0.0.1
        tcp_secret=letmein

        [web monitor]
        port={port}
    """)
    status = m.service("Other")
    assert status["tcp"].startswith("127.0.0.1:5557") and status["tcp_server"]["secret"] is True
    with connect(Other, "tcp://127.0.0.1", secret="letmein", timeout=10) as c, connect(Other) as local:
        first = c.whoami()
        assert first == local.whoami() or first in m.service("Other")["worker_list"][0].values()
        assert m.service("Other")["tcp_server"]["connections"] == 1
        import urllib.request
        with urllib.request.urlopen(m.url + "/metrics", timeout=10) as r:
            metrics = r.read().decode()
        assert 'speedysvc_tcp_connections{service="Other"} 1.0' in metrics
        assert m.cli("restart", "Other").returncode == 0
        assert c.whoami() != first          # reconnected to the restarted service
        assert m.cli("stop", "Other").returncode == 0
        with pytest.raises(ServiceUnavailable):
            c.whoami()


def test_tcp_port_in_use_fails_the_service_clearly(running):
    import socket
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", 5557))
    blocker.listen()
    try:
        m = running("""
            [Other]
            import_from=services
            bind_tcp=127.0.0.1

            [EchoServer]
            import_from=services

            [web monitor]
            port={port}
        """, wait_ready=False)
        m.wait(lambda: m.service("Other")["state"] == "failed", 20, "Other to fail")
        assert "cannot accept TCP clients on 127.0.0.1:5557" in m.service("Other")["failure"]
        with connect(EchoServer) as c:
            assert c.echo_json(1) == 1
    finally:
        blocker.close()

"""The service manager as a user runs it: real processes, a real ini file; its services serve
over shared memory and TCP, and write their logs."""
import os

import pytest

from speedysvc import ServiceUnavailable, connect
from conftest import wait_until
from manager_fixture import chatty_ini, run_seed_script
from services import Chatty, EchoServer


SEED_RUN = """\
import signal, subprocess, sys, time, urllib.request
mgr = subprocess.Popen([sys.executable, "-m", "speedysvc.service", "service.ini"])
try:
    for _ in range(600):
        try:
            if urllib.request.urlopen("http://127.0.0.1:5155/readyz", timeout=2).status == 200:
                break
        except OSError:
            if mgr.poll() is not None:
                sys.exit(f"the manager exited with {mgr.returncode}")
            time.sleep(0.1)
    out = subprocess.run([sys.executable, "echoclient.py"], capture_output=True, text=True, timeout=60)
    sys.stdout.write(out.stdout)
    sys.stderr.write(out.stderr)
finally:
    mgr.send_signal(signal.SIGTERM)
    sys.exit(mgr.wait(30))
"""


def test_quick_example_verbatim_end_to_end(tmp_path):
    """The seed README: its three files, its command, its port (5155).  In a network namespace of
    its own when the tests run as root, so that it passes while the README's example runs
    beside the tests (its shared memory is apart already: SPEEDYSVC_NAMESPACE)."""
    out = run_seed_script(tmp_path, SEED_RUN, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout == "Hello World!\n", out.stderr[-3000:]
    assert os.path.exists("/tmp/test_server_logs/EchoServer.log")


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
    assert status["tcp"].startswith(f"127.0.0.1:{Other.port}") and status["tcp_server"]["secret"] is True
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
    from services import Other
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", Other.port))
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
        assert f"cannot accept TCP clients on 127.0.0.1:{Other.port}" in m.service("Other")["failure"]
        with connect(EchoServer) as c:
            assert c.echo_json(1) == 1
    finally:
        blocker.close()

"""The command line (``speedysvc status|start|stop|restart|scale|logs``) against a running manager."""
import subprocess
import sys
import time

import pytest

from speedysvc import ServiceUnavailable, connect
from manager_fixture import chatty_ini
from services import Chatty, EchoServer


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


def test_the_manager_is_what_speedysvc_manager_names():
    """The package keeps the names the single module had (loaded when asked for)."""
    import speedysvc.manager as manager_package
    from speedysvc.manager.manager import Manager, describe_services, main
    assert (manager_package.Manager, manager_package.main, manager_package.describe_services) == \
        (Manager, main, describe_services)
    with pytest.raises(AttributeError):
        manager_package.nothing_of_that_name


def test_logs_into_a_pipe_closed_early_end_quietly(running):
    """``speedysvc logs X | head -1``: the reader goes, the command ends with no traceback."""
    m = running(chatty_ini())
    with connect(Chatty) as c:
        for i in range(200):
            c.log("INFO", f"record {i} " + "x" * 200)
    m.wait(lambda: len(m.get("/api/services/Chatty/logs?lines=0")["records"]) > 150)
    cmd = f"{sys.executable} -m speedysvc.cli --url {m.url} logs Chatty -n 0 | head -1"
    out = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("\n") == 1 and "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr

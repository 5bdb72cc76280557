"""The manager's HTTP API: health and readiness, and what it refuses (forged requests, foreign
host names, a missing access token)."""
import subprocess
import time
import sys

import pytest

import web_helpers
from manager_fixture import chatty_ini
from web_helpers import fetch

manager = web_helpers.manager


def test_health_and_readiness(manager):
    assert fetch(manager.url + "/healthz")[0] == 200
    assert fetch(manager.url + "/readyz")[0] == 200
    manager.post("/api/services/Chatty/stop")
    assert manager.get("/readyz", ok_only=False) == 503


def test_api_refuses_forged_requests(running):
    m = running(chatty_ini())
    code, body = m.post("/api/services/Chatty/stop", headers={"X-Speedysvc-Request": ""})
    assert code == 403 and "X-Speedysvc-Request" in body["error"]
    code, body = m.post("/api/services/Chatty/stop", headers={"Origin": "http://evil.example"})
    assert code == 403
    assert m.service("Chatty")["state"] == "running"
    for workers in ("x", "2", 2.9, True, None, [2]):
        code, body = m.post("/api/services/Chatty/scale", {"workers": workers})
        assert code == 400 and "whole number" in body["error"], workers
    assert m.service("Chatty")["target_workers"] == 1
    for lines in ("-5", "x", "1.5"):
        assert m.get(f"/api/services/Chatty/logs?lines={lines}", ok_only=False) == 400, lines
    assert m.get("/healthz") == {"ok": True}


def test_access_token(running):
    """(Another user needs it: see test_access.py.)  The command sends the one it is given, or
    the one in the manager's token file; a wrong one is refused even to the manager's user."""
    m = running(chatty_ini(), env={"SPEEDYSVC_WEB_TOKEN": "s3cret"})
    assert m.get("/healthz") == {"ok": True}
    for args in ([], ["--token", "s3cret"]):
        out = subprocess.run([sys.executable, "-m", "speedysvc.cli", "--url", m.url, *args, "status"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "Chatty" in out.stdout, out.stderr
    wrong = subprocess.run([sys.executable, "-m", "speedysvc.cli", "--url", m.url, "--token", "wrong", "status"],
                           capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 0, wrong.stderr   # a wrong token from the manager's own user: its uid lets it in


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


KITCHEN = """
    [defaults]
    log_dir=logs

    [Kitchen]
    import_from=services

    [web monitor]
    port={port}
"""


def test_the_last_errors_of_each_method(running):
    """What a method raises reaches /api/services/{name}/errors with its traceback, newest first."""
    from speedysvc import connect
    from services import Kitchen
    m = running(KITCHEN)
    assert m.get("/api/services/Kitchen/errors") == {"methods": []}
    with connect(Kitchen) as c:
        for i in range(3):
            with pytest.raises(ValueError):
                c.fail_value(f"bad input {i}")
    m.wait(lambda: m.get("/api/services/Kitchen/errors")["methods"], 20, "the errors to be logged")
    m.wait(lambda: m.get("/api/services/Kitchen/errors")["methods"][0]["logged"] == 3, 20, "three errors")
    (method,) = m.get("/api/services/Kitchen/errors")["methods"]
    assert method["method"] == "fail_value" and method["left_out"] == 0
    assert [e["message"] for e in method["errors"]] == ["bad input 2", "bad input 1", "bad input 0"]
    e = method["errors"][0]
    assert e["type"] == "ValueError" and e["pid"] in {w["pid"] for w in m.service("Kitchen")["worker_list"]}
    assert "raise ValueError(message)" in e["traceback"] and e["traceback"].startswith("Traceback")
    assert m.get("/api/services/Nope/errors", ok_only=False) == 404


def test_the_last_errors_outlive_a_restart_of_the_manager(running):
    """A new manager reads them back from the records its store kept."""
    from speedysvc import connect
    from services import Kitchen
    m = running(KITCHEN)
    with connect(Kitchen) as c:
        for i in range(2):
            with pytest.raises(ValueError):
                c.fail_value(f"before the restart {i}")
    m.wait(lambda: (m.get("/api/services/Kitchen/errors")["methods"] or [{}])[0].get("logged") == 2, 20, "two errors")
    time.sleep(2)   # (the store commits within about a second)
    m.stop()
    m2 = running(KITCHEN, port=m.port)
    (method,) = m2.get("/api/services/Kitchen/errors")["methods"]
    assert [e["message"] for e in method["errors"]] == ["before the restart 1", "before the restart 0"]
    assert "raise ValueError(message)" in method["errors"][0]["traceback"]

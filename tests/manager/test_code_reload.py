"""``speedysvc run service.ini --reload`` (and ``python3 -m speedysvc.service --reload``): a real
edit of a service's module rolling-restarts that service; an edit of another .py file under the
folder restarts every service; a burst of edits is one restart; a broken edit leaves the old
workers serving."""
import time
import urllib.parse

from speedysvc import connect
from conftest import wait_until
from services import EchoServer
from test_rolling_restart import Versioned, worker_pids, write_module

INI = """
    [defaults]
    log_dir=logs
    crash_limit=1

    [Versioned]
    import_from=versioned
    min_proc_num=1

    [EchoServer]
    import_from=services

    [web monitor]
    port={port}
"""


def start(running, tmp_path, via_cli=False):
    write_module(tmp_path, "v1")
    args = ["-m", "speedysvc.cli", "run", "--reload", "service.ini"] if via_cli else \
        ["-m", "speedysvc.service", "service.ini", "--reload"]
    m = running(INI, env={"PYTHONDONTWRITEBYTECODE": "1"}, args=args)
    # the watch is set up as the manager's loop goes on from there
    assert wait_until(lambda: "reloading services when a .py file under" in m.output(), 10)
    time.sleep(0.5)
    return m


def restarts_done(m, name):
    query = urllib.parse.urlencode({"lines": 0, "q": "rolling restart done"})
    return len(m.get(f"/api/services/{name}/logs?{query}")["records"])


def pids(m, name):
    return sorted(w["pid"] for w in m.service(name)["worker_list"])


def test_an_edit_of_a_module_restarts_its_service_only(running, tmp_path):
    m = start(running, tmp_path, via_cli=True)
    echo_pids = pids(m, "EchoServer")
    with connect(Versioned, timeout=30) as c:
        assert c.version() == "v1"
        write_module(tmp_path, "v2")
        assert wait_until(lambda: c.version() == "v2", 30), m.output()[-3000:]
        assert wait_until(lambda: restarts_done(m, "Versioned") == 1, 10)
    time.sleep(1.0)   # (a restart of the other service would have come by now)
    assert pids(m, "EchoServer") == echo_pids
    assert restarts_done(m, "EchoServer") == 0
    assert "versioned.py changed: restarting Versioned" in m.output()


def test_an_edit_of_another_file_restarts_every_service(running, tmp_path):
    m = start(running, tmp_path)
    before = {name: pids(m, name) for name in ("Versioned", "EchoServer")}
    (tmp_path / "helper.py").write_text("HELPER = 1\n")
    assert wait_until(lambda: restarts_done(m, "Versioned") == 1 and restarts_done(m, "EchoServer") == 1, 30), \
        m.output()[-3000:]
    for name, old in before.items():
        assert not set(pids(m, name)) & set(old)
    with connect(EchoServer, timeout=30) as c:
        assert c.echo_json("still here") == "still here"
    # files that are not .py are not watched: the log files, say, change all the time
    (tmp_path / "notes.txt").write_text("x")
    time.sleep(1.0)
    assert restarts_done(m, "Versioned") == 1


def test_a_burst_of_edits_is_one_restart(running, tmp_path):
    m = start(running, tmp_path)
    for i in range(5):
        write_module(tmp_path, f"v{i + 2}")
        time.sleep(0.02)
    with connect(Versioned, timeout=30) as c:
        assert wait_until(lambda: c.version() == "v6", 30)
    time.sleep(1.0)
    assert restarts_done(m, "Versioned") == 1


def test_a_broken_edit_keeps_the_old_workers_serving(running, tmp_path):
    m = start(running, tmp_path)
    before = worker_pids(m)
    with connect(Versioned, timeout=30) as c:
        write_module(tmp_path, "v2", prelude="def broken(:")
        assert wait_until(lambda: "reload failed, the old workers serve on" in m.output(), 30), m.output()[-3000:]
        assert "SyntaxError" in m.output()
        assert worker_pids(m) == before
        s = m.service("Versioned")
        assert s["state"] == "running" and s["failure"] is None
        assert c.version() == "v1"
        write_module(tmp_path, "v3")   # fixed: the next change restarts it
        assert wait_until(lambda: c.version() == "v3", 30), m.output()[-3000:]


def test_without_reload_nothing_is_watched(running, tmp_path):
    write_module(tmp_path, "v1")
    m = running(INI, env={"PYTHONDONTWRITEBYTECODE": "1"})
    write_module(tmp_path, "v2")
    time.sleep(1.5)
    assert restarts_done(m, "Versioned") == 0
    assert "reloading services" not in m.output()


def test_the_module_files_of_a_service():
    from speedysvc.manager.codewatch import affected, module_files
    assert module_files("pkg.mod:C", "/srv") == {"/srv/pkg/mod.py", "/srv/pkg/mod/__init__.py"}
    assert module_files("sub/file.py:C", "/srv") == {"/srv/sub/file.py"}

    class P:
        def __init__(self, target):
            self.cfg = type("Cfg", (), {"target": target})

    a, b, c = P("a:A"), P("b:B"), P("a:A2")
    assert affected([a, b, c], {"/srv/a.py"}, "/srv") == [a, c]
    assert affected([a, b, c], {"/srv/b.py"}, "/srv") == [b]
    assert affected([a, b, c], {"/srv/b.py", "/srv/util.py"}, "/srv") == [a, b, c]



def test_reload_without_watchfiles_says_what_to_do(tmp_path):
    """Without the watchfiles package, --reload refuses to start (exit 1) and says what to install."""
    import subprocess
    import sys
    from manager_fixture import manager_env, prepare_folder
    write_module(tmp_path, "v1")
    prepare_folder(tmp_path, INI.replace("{port}", "0"))
    code = ("import sys; sys.modules['watchfiles'] = None\n"
            "from speedysvc.manager.manager import main\n"
            "sys.exit(main(['service.ini', '--reload']))")
    out = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True, text=True,
                         timeout=60, env=manager_env())
    assert out.returncode == 1
    assert "--reload needs the watchfiles package (pip install watchfiles)" in out.stderr


def test_a_watch_that_fails_is_logged_and_the_manager_runs_on(tmp_path, caplog):
    """Watching can fail (a folder gone, the system's limit of inotify watches): the manager's log
    says --reload is off; nothing else stops."""
    import asyncio
    import logging
    from speedysvc.manager.codewatch import CodeWatcher

    class NoPools:
        pools = {}

    async def main():
        w = CodeWatcher(NoPools(), str(tmp_path / "gone")).start()
        for _ in range(200):
            if w._task.done():
                break
            await asyncio.sleep(0.01)
        await w.close()

    with caplog.at_level(logging.ERROR, logger="speedysvc.manager"):
        asyncio.run(main())
    assert any("--reload is off" in r.getMessage() for r in caplog.records), caplog.records

"""The store in a real manager: what survives a restart of the manager (history, events, the log
and its search), and a manager whose store cannot work (a corrupt file, a read-only folder), which
says so and serves its calls as ever."""
import os
import shutil
import signal
import sqlite3
import time

import pytest

from manager_fixture import chatty_ini, run_manager
from services import Chatty
from speedysvc import connect
from speedysvc.manager import config
from speedysvc.manager.logs import RECENT
from speedysvc.shm import process_alive


def test_history_events_and_logs_survive_a_manager_restart(running, tmp_path):
    m = running(chatty_ini())
    m.wait(lambda: len(m.get("/api/services/Chatty/history")["points"]) >= 2, 30, "two history points")
    with connect(Chatty) as c:
        c.log("WARNING", "the needle, before the flood")
        for i in range(RECENT + 100):   # more than the ring holds: the needle leaves it
            c.log("INFO", f"flood {i}")
    m.wait(lambda: m.get("/api/services/Chatty/logs?grep=flood%20" + str(RECENT + 99))["records"], 30,
           "the last record in the index")
    assert m.get("/api/services/Chatty/logs?q=needle&lines=0")["records"] == []   # not in memory
    out = m.cli("logs", "Chatty", "--grep", "NEEDLE")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("\n") == 1 and "WARNING chatty: the needle, before the flood" in out.stdout
    assert m.cli("stop", "Chatty").returncode == 0
    before = m.get("/api/services/Chatty/history")["points"]
    first_pid = m.get("/api/status")["manager"]["pid"]
    assert m.stop() == 0

    again = running(chatty_ini())
    assert again.get("/api/status")["manager"]["pid"] != first_pid
    points = again.get("/api/services/Chatty/history")["points"]
    assert [p["t"] for p in points[:len(before)]] == [p["t"] for p in before]
    kinds = [(e["kind"], e["by"]) for e in again.get("/api/events?service=Chatty")["events"]]
    assert kinds[:3] == [("start", "manager"), ("stop", "cli"), ("start", "manager")]
    out = again.cli("logs", "Chatty", "--grep", "needle")
    assert "the needle, before the flood" in out.stdout, out.stderr
    # the ring starts with what the last manager wrote, so the live view shows it
    tail = again.get("/api/services/Chatty/logs?lines=5")["records"]
    assert any(r["message"] == "stopped" for r in tail)
    assert again.get("/api/services/manager/logs?grep=manager%20" + str(first_pid))["records"]
    with connect(Chatty) as c:
        assert c.whoami() > 0


def services_answer():
    with connect(Chatty) as c:
        return c.whoami() > 0


def assert_runs_without_store(m, why: str):
    store = m.get("/api/status")["manager"]["store"]
    assert store["ok"] is False and why in store["error"], store
    assert services_answer()
    said = m.get("/api/services/manager/logs?q=store%20unavailable")["records"]
    assert len(said) == 1 and why in said[0]["message"] and said[0]["level"] == "ERROR"
    m.wait(lambda: m.get("/api/services/Chatty/history")["points"], 30, "a history point (in memory)")
    found = m.get("/api/services/Chatty/logs?grep=running%20with")
    assert found["source"] == "memory" and found["records"]
    status = m.post("/api/services/Chatty/restart")[0]
    assert status == 200
    assert [e["kind"] for e in m.get("/api/events?service=Chatty")["events"]] == ["start", "restart"]
    assert services_answer()


def test_a_corrupt_store_is_reported_and_the_manager_serves_on(running, tmp_path):
    os.makedirs(tmp_path / "logs.state")
    with open(tmp_path / "logs.state" / "store.sqlite3", "wb") as f:
        f.write(os.urandom(8192))
    m = running(chatty_ini())
    assert_runs_without_store(m, "not a database")


RO_MOUNT = """
import ctypes, os, subprocess, sys
# a mount namespace of its own, where the state folder is mounted read-only (even root cannot write it)
if ctypes.CDLL(None, use_errno=True).unshare(0x00020000) != 0:
    sys.exit("unshare(CLONE_NEWNS) failed")
subprocess.run(["mount", "--make-rprivate", "/"], check=True)
subprocess.run(["mount", "--bind", "-o", "ro", sys.argv[1], sys.argv[1]], check=True)
os.execv(sys.executable, [sys.executable, "-m", "speedysvc.service", "service.ini"])
"""


def test_a_read_only_state_folder_is_reported_and_the_manager_serves_on(running, tmp_path):
    state = tmp_path / "logs.state"
    os.makedirs(state, mode=0o700)   # (as the store makes it)
    if os.getuid() == 0:
        if not shutil.which("mount"):
            pytest.skip("root ignores file modes, and mount(8) is missing for a read-only mount")
        (tmp_path / "ro.py").write_text(RO_MOUNT)
        args = ["ro.py", str(state)]
    else:
        os.chmod(state, 0o555)
        args = None
    m = running(chatty_ini(), args=args)
    assert_runs_without_store(m, "Read-only file system" if os.getuid() == 0 else "Permission denied")
    assert os.listdir(state) == []


def test_a_store_turned_off_writes_nothing(running, tmp_path):
    m = running(chatty_ini() + "\n[store]\nenabled = false\n")
    store = m.get("/api/status")["manager"]["store"]
    assert store["ok"] is False and store["path"] is None and "disabled" in store["error"]
    assert services_answer()
    assert not os.path.exists(tmp_path / "logs.state")
    assert m.get("/api/services/manager/logs?q=store%20unavailable")["records"] == []


def test_the_store_keys(tmp_path):
    ini = chatty_ini().replace("{port}", "0") + "\n[store]\nstate_dir = var/state\npoints_keep = 2h\n"
    from manager_fixture import prepare_folder
    cfg = config.load(prepare_folder(tmp_path, ini))
    assert cfg.store.state_dir == str(tmp_path / "var" / "state") and cfg.store.points_keep == 7200
    assert cfg.store.path == str(tmp_path / "var" / "state" / "store.sqlite3")
    for bad, said in (("points_keep = 40d", "longer than minutes_keep"), ("logs_keep = 1w", "duration"),
                      ("colour = red", "unknown key"), ("logs_max_records = 0", "whole number >= 1")):
        out = run_manager(tmp_path, chatty_ini().replace("{port}", "0") + f"\n[store]\n{bad}\n")
        assert out.returncode == 2 and "[store]" in out.stderr and said in out.stderr, (bad, out.stderr)


def test_a_store_left_by_a_killed_manager_is_read_by_the_next(running, tmp_path):
    """SIGKILL: no chance to close the file; WAL keeps what was committed."""
    m = running(chatty_ini())
    m.wait(lambda: len(m.get("/api/services/Chatty/history")["points"]) >= 2, 30, "two history points")
    time.sleep(1.5)   # (a commit every 0.5 s)
    workers = [w["pid"] for w in m.service("Chatty")["worker_list"]]
    m.stop(signal.SIGKILL)
    deadline = time.monotonic() + 30   # (its workers notice their parent is gone and leave)
    while any(process_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    with sqlite3.connect(str(tmp_path / "logs.state" / "store.sqlite3")) as db:
        assert db.execute("SELECT count(*) FROM points").fetchone()[0] >= 2
    again = running(chatty_ini())
    assert again.get("/api/status")["manager"]["store"]["ok"] is True
    assert len(again.get("/api/services/Chatty/history")["points"]) >= 2


EVENTS_INI = """
    [Chatty]
    import_from=services
    min_proc_num=1
    max_proc_num=2
    autoscale=uppolicy:Up
    scale_interval=0.1

    [CrashOnStart]
    import_from=services
    restart_backoff=0.05
    crash_limit=2

    [web monitor]
    port={port}
"""

UP_POLICY = """
class Up:
    '''Two workers, whatever the load.'''
    def __init__(self, cfg):
        pass

    def started(self, now):
        pass

    def scaled(self, now):
        pass

    def decide(self, signals):
        return 1 if signals.workers < 2 else 0
"""


def test_crashes_failures_and_autoscaling_are_events(running, tmp_path):
    (tmp_path / "uppolicy.py").write_text(UP_POLICY)
    m = running(EVENTS_INI, wait_ready=False)
    m.wait(lambda: m.service("CrashOnStart")["state"] == "failed", 60, "the service to be marked failed")
    m.wait(lambda: m.get("/api/events?service=Chatty")["events"][-1:] and
           m.get("/api/events?service=Chatty")["events"][-1]["kind"] == "autoscale", 30, "the autoscaler")
    crashing = [(e["kind"], e["by"]) for e in m.get("/api/events?service=CrashOnStart")["events"]]
    assert crashing == [("crash", "manager"), ("crash", "manager"), ("failed", "manager")]
    failed = m.get("/api/events?service=CrashOnStart")["events"][-1]
    assert "2 workers in a row died while starting" in failed["detail"]
    assert "cannot load the model" in m.get("/api/events?service=CrashOnStart")["events"][0]["detail"]
    scaled = m.get("/api/events?service=Chatty")["events"][-1]
    assert scaled["by"] == "autoscaler" and scaled["detail"].startswith("1 -> 2 worker(s): up")
    everything = m.get("/api/events")["events"]
    assert {e["service"] for e in everything} == {"Chatty", "CrashOnStart"}
    assert [e["t"] for e in everything] == sorted(e["t"] for e in everything)


def test_a_reload_is_an_event(running, tmp_path):
    m = running(chatty_ini(max=2))
    with open(m.ini) as f:
        text = f.read()
    with open(m.ini, "w") as f:
        f.write(text.replace("max_proc_num=2", "max_proc_num=3"))
    t0 = time.time()
    assert m.cli("reload").returncode == 0
    events = [(e["service"], e["kind"], e["by"]) for e in m.get(f"/api/events?since={t0}")["events"]]
    assert events[-2:] == [("Chatty", "reload", "cli"), ("manager", "reload", "cli")]
    assert m.get(f"/api/events?since={t0}&service=manager")["events"][0]["detail"].startswith("added: none")
    assert "max_proc_num" in m.get(f"/api/events?since={t0}&service=Chatty")["events"][-1]["detail"]


def test_store_settings_wait_for_the_manager_to_restart(running):
    m = running(chatty_ini())
    with open(m.ini, "a") as f:
        f.write("\n[store]\npoints_keep = 1h\n")
    code, result = m.post("/api/reload")
    assert code == 200 and result["needs_manager_restart"] == ["[store]"]
    assert m.get("/api/status")["manager"]["store"]["ok"] is True

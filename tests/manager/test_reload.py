"""Reloading service.ini (POST /api/reload, speedysvc reload, SIGHUP): services added start,
removed ones stop and leave nothing behind, changed ones restart with their new settings,
the others are not touched; an invalid file changes nothing."""
import os
import re
import signal
import textwrap


from speedysvc import LocalService, connect, shm
from speedysvc.manager.config import SERVICE_KEYS, TCP_KEYS
from conftest import wait_until
from services import Chatty, Other, Second

BEFORE = """
    [defaults]
    log_dir=logs

    [Chatty]
    import_from=services

    [Second]
    import_from=services

    [Third]
    import_from=services
    depends_on=Second

    [web monitor]
    port={port}
"""

# Chatty unchanged, Second changed (two workers), Third removed, Other added
AFTER = """
    [defaults]
    log_dir=logs

    [Chatty]
    import_from=services

    [Second]
    import_from=services
    min_proc_num=2

    [Other]
    import_from=services
    depends_on=Chatty

    [web monitor]
    port={port}
"""


def rewrite(m, text):
    with open(m.ini, "w") as f:
        f.write(textwrap.dedent(text).replace("{port}", str(m.port)))


def states(m) -> dict:
    return {s["name"]: s for s in m.get("/api/status")["services"]}


def pids(status) -> set:
    return {w["pid"] for w in status["worker_list"]}


def segment_inode(service: str):
    try:
        return os.stat(os.path.join(shm.SHM_DIR, shm.segment.service_segment_name(service))).st_ino
    except FileNotFoundError:
        return None


def check_after(m, before):
    """The state AFTER describes, from the state BEFORE."""
    now = states(m)
    assert list(now) == ["Chatty", "Second", "Other"]
    # untouched: the same workers, the same segment
    assert pids(now["Chatty"]) == pids(before["Chatty"]) and now["Chatty"]["state"] == "running"
    assert segment_inode("chatty") == before["chatty_inode"]
    # changed: restarted with the new settings
    assert now["Second"]["state"] == "running" and now["Second"]["workers"] == 2
    assert pids(now["Second"]).isdisjoint(pids(before["Second"]))
    # removed: gone, and its segment with it
    assert segment_inode("third") is None
    assert m.get("/api/services/Third", ok_only=False) == 404
    # added: serving
    assert now["Other"]["state"] == "running"
    with connect(Other) as c, connect(Second) as c2, connect(Chatty) as c3:
        assert c.whoami() in pids(now["Other"])
        assert c2.whoami() in pids(now["Second"])
        assert c3.whoami() in pids(now["Chatty"])


def snapshot(m):
    before = states(m)
    before["chatty_inode"] = segment_inode("chatty")
    assert before["chatty_inode"] is not None and segment_inode("third") is not None
    return before


def test_reload_over_the_api_adds_removes_restarts_and_leaves_the_rest(running, tmp_path):
    m = running(BEFORE)
    before = snapshot(m)
    rewrite(m, AFTER)
    code, body = m.post("/api/reload")
    assert code == 200, body
    assert (body["added"], body["removed"], body["restarted"], body["unchanged"]) == \
        (["Other"], ["Third"], ["Second"], ["Chatty"])
    assert body["changes"]["Second"] == {"keys": ["min_proc_num", "max_proc_num"], "how": "rolling restart"}
    assert body["failed"] == {} and body["waiting"] == [] and body["needs_manager_restart"] == []
    check_after(m, before)
    # the manager's log says what changed
    assert wait_until(lambda: "reloaded /" in (tmp_path / "logs" / "manager.log").read_text())
    assert "added: Other; removed: Third; restarted: Second (rolling restart); unchanged: Chatty" in \
        (tmp_path / "logs" / "manager.log").read_text()
    # a second reload of the same file changes nothing
    code, body = m.post("/api/reload")
    assert code == 200 and body["unchanged"] == ["Chatty", "Second", "Other"] and body["restarted"] == []


def test_sighup_reloads_as_the_api_does(running, tmp_path):
    m = running(BEFORE)
    before = snapshot(m)
    rewrite(m, AFTER)
    m.proc.send_signal(signal.SIGHUP)
    m.wait(lambda: "reloaded /" in m.output(), 60, "the reload")
    assert re.search(r"reloaded \S+service\.ini: added: Other; removed: Third; restarted: Second \(rolling "
                     r"restart\); unchanged: Chatty", m.output())
    check_after(m, before)
    # an invalid file: a log line, nothing changed, the manager runs on
    now = states(m)
    rewrite(m, AFTER + "\n[Fourth]\nimport_from=no_such_module\n")
    m.proc.send_signal(signal.SIGHUP)
    m.wait(lambda: "refused" in m.output(), 60, "the refusal")
    assert re.search(r"reload of \S+service\.ini refused, nothing changed: configuration error: service\.ini, "
                     r"section \[Fourth\], key import_from: ", m.output())
    assert {k: pids(v) for k, v in states(m).items()} == {k: pids(v) for k, v in now.items()}
    assert m.get("/readyz", ok_only=False) == 200


def test_the_command_line_prints_the_changes(running):
    m = running(BEFORE)
    rewrite(m, AFTER)
    out = m.cli("reload")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "added: Other", "removed: Third", "restarted: Second (rolling restart: min_proc_num, max_proc_num)",
        "unchanged: Chatty"]
    rewrite(m, AFTER.replace("min_proc_num=2", "min_proc_num=zwei"))
    out = m.cli("reload")
    assert out.returncode == 1 and out.stdout == ""
    assert "configuration error, nothing changed: service.ini, section [Second], key min_proc_num: must be a " \
           "whole number >= 1, got 'zwei' (HTTP 400)" in out.stderr


BROKEN = [
    # (what is wrong, text added to BEFORE or the whole file, section, key, words)
    ("parse error", BEFORE + "\n[Fourth\n", None, None, "contains parsing errors"),
    ("unknown key", BEFORE + "\n[Other]\nimport_from=services\nmin_proc=2\n", "Other", "min_proc", "unknown key"),
    ("import failure", BEFORE + "\n[Fourth]\nimport_from=no_such_module\n", "Fourth", "import_from",
     "No module named 'no_such_module'"),
    ("duplicate name", BEFORE + "\n[Kitchen]\nimport_from=services\n[KitchenNewer]\nimport_from=services\n",
     "KitchenNewer", None, "'kitchen', as for [Kitchen]"),
    ("duplicate port", BEFORE.replace("[Third]", "[Signaller]\nimport_from=services\n\n[Third]"),
     "Signaller", None, "as for [Chatty]"),
    ("unknown dependency", BEFORE.replace("depends_on=Second", "depends_on=Fifth"), "Third", "depends_on",
     "no service section [Fifth]"),
    ("dependency cycle", BEFORE.replace("[Second]\n", "[Second]\n    depends_on=Third\n"), "Second", "depends_on",
     "dependency cycle: Second -> Third -> Second"),
    ("removed dependency", BEFORE.replace("[Second]\n    import_from=services\n", ""), "Third", "depends_on",
     "no service section [Second]"),
]


def test_an_invalid_file_changes_nothing(running):
    m = running(BEFORE)
    before = snapshot(m)
    # each of these also adds, removes or changes something that must not happen
    for what, text, section, key, words in BROKEN:
        text = text.replace("[Chatty]\n    import_from=services", "[Chatty]\n    import_from=services\n"
                                                                   "    min_proc_num=2")
        rewrite(m, text + "\n[Other]\nimport_from=services\n" if "[Other]" not in text else text)
        code, body = m.post("/api/reload")
        assert code == 400, (what, body)
        assert body["error"].startswith("configuration error, nothing changed: service.ini"), (what, body)
        assert words in body["error"] and (body["section"], body["key"]) == (section, key), (what, body)
        assert body["file"] == m.ini
        now = states(m)
        assert list(now) == ["Chatty", "Second", "Third"], what
        assert {k: (v["state"], pids(v)) for k, v in now.items()} == \
            {k: ("running", pids(before[k])) for k in ("Chatty", "Second", "Third")}, what
        assert segment_inode("other") is None and segment_inode("chatty") == before["chatty_inode"], what
    # and the file, put right, reloads
    rewrite(m, AFTER)
    code, body = m.post("/api/reload")
    assert code == 200 and body["added"] == ["Other"]


def test_segment_shaping_keys_stop_then_start(running):
    m = running(BEFORE)
    before = snapshot(m)
    second_inode = segment_inode("second")
    rewrite(m, BEFORE.replace("[Second]\n", "[Second]\n    max_channels=64\n    max_payload=1M\n"))
    code, body = m.post("/api/reload")
    assert code == 200, body
    assert body["restarted"] == ["Second"] and body["unchanged"] == ["Chatty", "Third"]
    assert body["changes"]["Second"] == {"keys": ["max_channels", "max_payload"], "how": "stop and start"}
    now = states(m)
    assert now["Second"]["state"] == "running" and pids(now["Second"]).isdisjoint(pids(before["Second"]))
    assert segment_inode("second") not in (None, second_inode)
    assert shm.ServiceSegment.attach("second").max_channels == 64
    # its dependent (Third) was not stopped
    assert pids(now["Third"]) == pids(before["Third"]) and pids(now["Chatty"]) == pids(before["Chatty"])
    with connect(Second) as c:
        assert c.whoami() in pids(now["Second"])


def test_tcp_keys_restart_the_gateway_and_not_the_workers(running):
    """With a gateway (tcp_in_workers = no), TCP keys restart it and the workers run on."""
    m = running(BEFORE)
    before = states(m)
    assert before["Second"]["tcp"] is None
    rewrite(m, BEFORE.replace("[Second]\n", "[Second]\n    bind_tcp=127.0.0.1\n    tcp_in_workers=no\n"))
    code, body = m.post("/api/reload")
    assert code == 200, body
    assert body["changes"]["Second"] == {"keys": ["bind_tcp", "tcp_in_workers"], "how": "TCP gateway restarted"}
    now = states(m)
    assert now["Second"]["tcp"] and pids(now["Second"]) == pids(before["Second"])
    with connect(Second, "tcp://127.0.0.1", timeout=10) as c:
        assert c.whoami() in pids(before["Second"])
    # and taken away again
    rewrite(m, BEFORE)
    code, body = m.post("/api/reload")
    assert code == 200 and body["changes"]["Second"]["how"] == "TCP gateway restarted"
    assert states(m)["Second"]["tcp"] is None and pids(states(m)["Second"]) == pids(before["Second"])


def test_tcp_keys_of_workers_that_serve_tcp_are_a_rolling_restart(running):
    """Workers that serve TCP (the default) take new TCP keys by a rolling restart: new workers
    listen with them, the old ones leave."""
    m = running(BEFORE)
    before = states(m)
    rewrite(m, BEFORE.replace("[Second]\n", "[Second]\n    bind_tcp=127.0.0.1\n"))
    code, body = m.post("/api/reload")
    assert code == 200, body
    assert body["changes"]["Second"] == {"keys": ["bind_tcp"], "how": "rolling restart"}
    now = states(m)
    assert now["Second"]["tcp"] and not pids(now["Second"]) & pids(before["Second"])
    with connect(Second, "tcp://127.0.0.1", timeout=10) as c:
        assert c.whoami() in pids(now["Second"])
    rewrite(m, BEFORE)
    code, body = m.post("/api/reload")
    assert code == 200 and body["changes"]["Second"]["how"] == "rolling restart"
    assert states(m)["Second"]["tcp"] is None


def test_web_monitor_changes_wait_for_a_manager_restart(running):
    m = running(BEFORE)
    before = states(m)
    rewrite(m, BEFORE.replace("port={port}", "port=1"))
    code, body = m.post("/api/reload")
    assert code == 200, body
    assert body["needs_manager_restart"] == ["[web monitor]"] and body["unchanged"] == ["Chatty", "Second", "Third"]
    assert {k: pids(v) for k, v in states(m).items()} == {k: pids(v) for k, v in before.items()}
    out = m.cli("reload")
    assert "not applied until the manager restarts: [web monitor]" in out.stdout


def test_removed_services_stop_dependents_first(running, tmp_path):
    m = running(BEFORE)
    rewrite(m, BEFORE.replace("[Second]\n    import_from=services\n", "")
            .replace("[Third]\n    import_from=services\n    depends_on=Second\n", ""))
    code, body = m.post("/api/reload")
    assert code == 200 and body["removed"] == ["Second", "Third"]
    lines = (tmp_path / "logs" / "manager.log").read_text().splitlines()
    third_stopped = next(i for i, line in enumerate(lines) if "Third: stopped" in line)
    second_exits = next(i for i, line in enumerate(lines) if re.search(r"Second: worker \d+ exited", line))
    assert third_stopped < second_exits
    assert segment_inode("second") is None and segment_inode("third") is None


def test_every_key_has_a_reload_path():
    """The docs say how each key is applied; TCP keys are those the TCP gateway reads."""
    assert set(TCP_KEYS) - {"port"} <= set(SERVICE_KEYS)
    assert {k for k in SERVICE_KEYS if k.startswith("tcp_")} <= set(TCP_KEYS)


def test_a_reload_waits_for_a_dependency_to_serve(running):
    """A service added with depends_on on one that failed is reported waiting."""
    m = running(BEFORE)
    rewrite(m, BEFORE + "\n[CrashOnStart]\nimport_from=services\ncrash_limit=1\n\n"
                     "[Other]\nimport_from=services\ndepends_on=CrashOnStart\n")
    code, body = m.post("/api/reload")
    assert code == 200, body
    assert body["added"] == ["CrashOnStart", "Other"] and body["waiting"] == ["Other"]
    assert "CrashOnStart" in body["failed"]
    s = states(m)
    assert (s["Other"]["state"], s["Other"]["waiting_for"]) == ("waiting", ["CrashOnStart"])


def test_a_stopped_service_takes_new_settings_and_a_failed_one_starts_again(running, tmp_path):
    gate = tmp_path / "gate"
    ini = BEFORE + "\n[SlowStart]\nimport_from=services\nstart_timeout=0.5\n"
    m = running(ini, wait_ready=False, env={"SPEEDYSVC_TEST_GATE": str(gate)})
    m.wait(lambda: states(m)["SlowStart"]["state"] == "failed", 60, "SlowStart to fail (it cannot start)")
    m.wait(lambda: states(m)["Third"]["state"] == "running", 60, "the others to run")
    code, body = m.post("/api/services/Second/stop")
    assert code == 200 and body["state"] == "stopped"
    gate.touch()
    rewrite(m, ini.replace("start_timeout=0.5", "start_timeout=60").replace("[Second]\n", "[Second]\n    min_proc_num=2\n"))
    code, body = m.post("/api/reload")
    assert code == 200, body
    assert body["restarted"] == ["Second", "SlowStart"] and body["failed"] == {}
    assert body["changes"]["Second"]["how"] == "settings only (it is stopped)"
    assert body["changes"]["SlowStart"]["how"] == "stop and start (it had failed)"
    s = states(m)
    assert s["Second"]["state"] == "stopped" and s["SlowStart"]["state"] == "running"
    code, body = m.post("/api/services/Second/start")
    assert code == 200 and body["state"] == "running" and body["workers"] == 2


def test_an_added_service_whose_name_is_taken_fails_alone(running):
    """Another process serves the name an added section's class has: that service is failed,
    the manager and the other services run on."""
    m = running(BEFORE)
    before = states(m)
    with LocalService(Other, workers=1):
        rewrite(m, BEFORE + "\n[Other]\nimport_from=services\n")
        code, body = m.post("/api/reload")
        assert code == 200, body
        assert body["added"] == ["Other"] and "already served by pid" in body["failed"]["Other"]
        assert states(m)["Other"]["state"] == "failed"
        assert {k: pids(v) for k, v in states(m).items() if k != "Other"} == \
            {k: pids(v) for k, v in before.items()}
    assert m.get("/api/status")["manager"]["pid"] == m.proc.pid


def test_how_each_kind_of_change_is_applied(tmp_path):
    """reload_action: segment shape and name stop and start, TCP keys restart the gateway,
    depends_on alone restarts nothing, the rest is a restart of the workers."""
    import dataclasses
    from speedysvc.manager import config
    from speedysvc.manager.manager import reload_action
    ini = tmp_path / "service.ini"
    ini.write_text("[S]\nimport_from=s\n")
    old = config.load(str(ini)).services[0]
    old.name, old.port = "s", 5000
    for changes, how in [({"max_channels": 8}, "stop and start"), ({"max_payload": 1 << 20}, "stop and start"),
                         ({"name": "t"}, "stop and start"), ({"name": "t", "tcp_min_rate": 0}, "stop and start"),
                         ({"bind_tcp": "127.0.0.1"}, "TCP gateway restarted"), ({"port": 5001}, "TCP gateway restarted"),
                         ({"tcp_stall_timeout": 5.0}, "TCP gateway restarted"), ({"depends_on": ("A",)}, "settings only"),
                         ({"min_proc_num": 2, "max_proc_num": 2}, "rolling restart"),
                         ({"log_level": "DEBUG", "bind_tcp": "127.0.0.1"}, "rolling restart"),
                         ({"import_from": "t"}, "rolling restart")]:
        assert reload_action(old, dataclasses.replace(old, **changes)) == how, changes


SLOW_IMPORT = '''
import os
import time

from speedysvc import ServerMethodsBase, msgpack_method

open("importing", "w").close()
deadline = time.monotonic() + 60
while not os.path.exists("gate") and time.monotonic() < deadline:
    time.sleep(0.02)


class SlowImport(ServerMethodsBase):
    name = "slow_import"

    @msgpack_method
    def ping(self):
        return 1
'''


def test_a_stop_during_a_reload_waits_for_it_then_stops_everything(running, tmp_path):
    """SIGTERM while a reload imports a new section's class: the reload is applied, then every
    service (the one it started too) is stopped; nothing is left running."""
    import threading
    m = running(BEFORE)
    (tmp_path / "slowimport.py").write_text(SLOW_IMPORT)
    rewrite(m, BEFORE + "\n[SlowImport]\nimport_from=slowimport\n")
    answers = []
    th = threading.Thread(target=lambda: answers.append(m.post("/api/reload")))
    th.start()
    try:
        m.wait(lambda: (tmp_path / "importing").exists(), 60, "the reload to import slowimport")
        m.proc.send_signal(signal.SIGTERM)
        m.wait(lambda: "INFO speedysvc.manager: stopping" in m.output(), 20, "the manager to begin its stop")
    finally:
        (tmp_path / "gate").touch()
        th.join(90)
    assert m.proc.wait(60) == 0
    out = m.output()
    assert answers and answers[0][0] == 200 and answers[0][1]["added"] == ["SlowImport"], answers
    assert out.index("reloaded /") < out.index("SlowImport: stopped") < out.index("manager stopped")
    assert segment_inode("slow_import") is None and segment_inode("chatty") is None


def test_a_new_log_dir_moves_the_services_log(running, tmp_path):
    m = running(BEFORE)
    first_seq = m.get("/api/services/Second/logs?lines=0")["records"][0]["seq"]
    rewrite(m, BEFORE.replace("[Second]\n", "[Second]\n    log_dir=logs2\n"))
    code, body = m.post("/api/reload")
    assert code == 200 and body["changes"]["Second"] == {"keys": ["log_dir"], "how": "rolling restart"}, body
    new_log = tmp_path / "logs2" / "Second.log"
    assert wait_until(lambda: new_log.exists() and "rolling restart done" in new_log.read_text())
    # the records kept in memory go on, in the same sequence
    records = m.get("/api/services/Second/logs?lines=0")["records"]
    assert records[0]["seq"] == first_seq and any("settings of [Second] reloaded" in r["message"] for r in records)
    assert [r["seq"] for r in records] == sorted(r["seq"] for r in records)
    assert m.service("Second")["log_file"] == str(new_log)


def test_a_reload_is_refused_once_the_manager_stops(running):
    """A call in hand holds the stop (stop_timeout lets it finish): a reload asked for meanwhile
    is refused with 409, and SIGHUP is ignored (not the default action, which ends a process)."""
    import threading
    m = running(BEFORE)
    started = threading.Event()

    def long_call():
        with connect(Chatty) as c:
            started.set()
            c.sleep(4)
    th = threading.Thread(target=long_call)
    th.start()
    try:
        assert started.wait(10)
        m.wait(lambda: m.service("Chatty")["in_flight"] == 1, 10, "the call to be in hand")
        m.proc.send_signal(signal.SIGTERM)
        m.wait(lambda: "INFO speedysvc.manager: stopping" in m.output(), 20, "the manager to begin its stop")
        code, body = m.post("/api/reload")
        assert (code, body) == (409, {"error": "reload refused: the manager is stopping"})
        m.proc.send_signal(signal.SIGHUP)
        m.wait(lambda: "SIGHUP ignored: the manager is stopping" in m.output(), 20, "the SIGHUP to be ignored")
    finally:
        th.join(30)
    assert m.proc.wait(30) == 0

"""depends_on: a service starts once the services it names serve, stops before them, is shown
waiting meanwhile, and is not stopped when one of them restarts.  Bad dependencies are
configuration errors naming the file, the section and the key."""
import re
import textwrap
import urllib.request

import pytest

from speedysvc import connect
from speedysvc.manager import config
from speedysvc.manager.config import ConfigError
from manager_fixture import run_manager
from services import Chatty, Second, Third

# SlowStart holds its start until the test creates the gate file; Second waits for it, Third for
# both; Chatty depends on nothing.
CHAIN = """
    [defaults]
    log_dir=logs

    [Third]
    import_from=services
    depends_on=Second, SlowStart

    [Second]
    import_from=services
    depends_on=SlowStart

    [SlowStart]
    import_from=services

    [Chatty]
    import_from=services

    [web monitor]
    port={port}
"""


def states(m) -> dict:
    return {s["name"]: s for s in m.get("/api/status")["services"]}


def log_lines(tmp_path) -> list[str]:
    return (tmp_path / "logs" / "manager.log").read_text().splitlines()


def first(lines, pattern) -> int:
    """The index of the first line matching ``pattern`` (a regular expression)."""
    return next(i for i, line in enumerate(lines) if re.search(pattern, line))


def pids(status) -> set:
    return {w["pid"] for w in status["worker_list"]}


@pytest.fixture
def gated_chain(running, tmp_path):
    gate = tmp_path / "gate"
    m = running(CHAIN, wait_ready=False, env={"SPEEDYSVC_TEST_GATE": str(gate)})
    return m, gate


def test_dependents_wait_shown_waiting_and_start_in_order(gated_chain, tmp_path):
    m, gate = gated_chain
    # Chatty, which depends on nothing, starts beside SlowStart, which is held starting
    m.wait(lambda: states(m)["Chatty"]["state"] == "running", 60, "Chatty to run")
    s = states(m)
    assert s["SlowStart"]["state"] == "starting"
    assert (s["Second"]["state"], s["Second"]["waiting_for"], s["Second"]["workers"]) == ("waiting", ["SlowStart"], 0)
    assert s["Third"]["state"] == "waiting" and s["Third"]["waiting_for"] == ["Second", "SlowStart"]
    assert s["Third"]["depends_on"] == ["Second", "SlowStart"]
    assert m.get("/readyz", ok_only=False) == 503
    # ...in the command line and on the web pages too
    out = m.cli("status")
    assert out.returncode == 0 and re.search(r"Second\s+waiting \(for SlowStart\)", out.stdout), out.stdout
    with urllib.request.urlopen(m.url + "/", timeout=10) as r:
        index = r.read().decode()
    assert "waiting (for Second, SlowStart)" in index and 'class="pill waiting"' in index
    with urllib.request.urlopen(m.url + "/services/Second", timeout=10) as r:
        assert "waiting (for SlowStart)" in r.read().decode()

    gate.touch()
    m.wait(lambda: m.get("/readyz", ok_only=False) == 200, 60, "every service to run")
    s = states(m)
    assert all(x["state"] == "running" and x["waiting_for"] == [] for x in s.values())
    assert s["SlowStart"]["started"] < s["Second"]["started"] < s["Third"]["started"]
    lines = log_lines(tmp_path)
    assert first(lines, r"SlowStart: running with") < first(lines, r"Second: starting")
    assert first(lines, r"Second: running with") < first(lines, r"Third: starting")
    with connect(Third) as c:
        assert c.whoami() in pids(s["Third"])

    # stopping the manager stops the dependents first
    assert m.stop() == 0
    lines = log_lines(tmp_path)
    assert first(lines, r"Third: stopped") < first(lines, r"Second: worker \d+ exited")
    assert first(lines, r"Second: stopped") < first(lines, r"SlowStart: worker \d+ exited")
    assert first(lines, r"Third: stopped") < first(lines, r"SlowStart: worker \d+ exited")


def test_a_restart_of_a_dependency_leaves_its_dependents_running(running, tmp_path):
    (tmp_path / "gate").touch()
    m = running(CHAIN, env={"SPEEDYSVC_TEST_GATE": str(tmp_path / "gate")})
    before = states(m)
    code, body = m.post("/api/services/SlowStart/restart")
    assert code == 200 and body["state"] == "running"
    after = states(m)
    assert pids(after["SlowStart"]).isdisjoint(pids(before["SlowStart"]))
    for name in ("Second", "Third"):
        assert after[name]["state"] == "running" and pids(after[name]) == pids(before[name]), name
    with connect(Second) as c:
        assert c.whoami() in pids(after["Second"])


FAILING_DEPENDENCY = """
    [defaults]
    log_dir=logs

    [CrashOnStart]
    import_from=services
    crash_limit=1

    [Second]
    import_from=services
    depends_on=CrashOnStart

    [Third]
    import_from=services
    depends_on=Second

    [Chatty]
    import_from=services

    [web monitor]
    port={port}
"""


def test_dependents_of_a_service_that_failed_stay_waiting(running):
    m = running(FAILING_DEPENDENCY, wait_ready=False)
    m.wait(lambda: states(m)["CrashOnStart"]["state"] == "failed", 60, "CrashOnStart to fail")
    m.wait(lambda: states(m)["Chatty"]["state"] == "running", 60, "Chatty to run")
    s = states(m)
    assert (s["Second"]["state"], s["Second"]["waiting_for"]) == ("waiting", ["CrashOnStart"])
    assert (s["Third"]["state"], s["Third"]["waiting_for"]) == ("waiting", ["Second"])
    assert s["Second"]["workers"] == 0 and s["Third"]["workers"] == 0
    m.wait(lambda: "Second: waiting for CrashOnStart (failed)" in m.output(), 20, "the log to say so")
    # a stop calls the wait off: it no longer starts by itself
    code, body = m.post("/api/services/Second/stop")
    assert code == 200 and body["state"] == "stopped" and body["waiting_for"] == []
    # Third still waits (for Second); starting Second by request starts Third after it
    code, body = m.post("/api/services/Second/start")
    assert code == 200 and body["state"] == "running"
    m.wait(lambda: states(m)["Third"]["state"] == "running", 60, "Third to start after Second")
    with connect(Third) as c, connect(Second) as c2, connect(Chatty) as c3:
        assert c.whoami() and c2.whoami() and c3.whoami()


def write(tmp_path, text):
    p = tmp_path / "service.ini"
    p.write_text(textwrap.dedent(text))
    return str(p)


@pytest.mark.parametrize("sections, section, words", [
    ("[A]\nimport_from=s\ndepends_on=Nope\n", "A", "no service section [Nope]"),
    ("[A]\nimport_from=s\ndepends_on=A\n", "A", "A depends on itself"),
    ("[A]\nimport_from=s\ndepends_on=B\n[B]\nimport_from=s\ndepends_on=A\n", "A", "dependency cycle: A -> B -> A"),
    ("[A]\nimport_from=s\n[B]\nimport_from=s\ndepends_on=C\n[C]\nimport_from=s\ndepends_on=A, B\n", "B",
     "dependency cycle: B -> C -> B"),
    ("[A]\nimport_from=s\ndepends_on=not-a-name\n", "A", "section names separated by commas"),
    ("[A]\nimport_from=s\ndepends_on=B, B\n[B]\nimport_from=s\n", "A", "names a section twice"),
    ("[defaults]\ndepends_on=B\n[A]\nimport_from=s\n[B]\nimport_from=s\n", "defaults", "own section"),
])
def test_bad_dependencies_name_the_file_section_and_key(tmp_path, sections, section, words):
    with pytest.raises(ConfigError) as info:
        config.load(write(tmp_path, sections))
    e = info.value
    assert (e.section, e.key) == (section, "depends_on") and words in str(e), str(e)
    assert str(e).startswith(f"service.ini, section [{section}], key depends_on: ")


def test_dependencies_are_read(tmp_path):
    cfg = config.load(write(tmp_path, "[A]\nimport_from=s\ndepends_on = B,C\n[B]\nimport_from=s\n"
                                      "[C]\nimport_from=s\ndepends_on=B\n"))
    assert [s.depends_on for s in cfg.services] == [("B", "C"), (), ("B",)]


def test_a_manager_refuses_a_dependency_cycle_at_start(tmp_path):
    out = run_manager(tmp_path, """
        [Second]
        import_from=services
        depends_on=Third
        [Third]
        import_from=services
        depends_on=Second
    """)
    assert out.returncode == 2
    assert "configuration error: service.ini, section [Second], key depends_on: dependency cycle: " \
           "Second -> Third -> Second" in out.stderr
